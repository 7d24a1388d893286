//! A chat incoming-webhook stand-in: records every JSON body posted to it.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use tokio::task::JoinHandle;

#[derive(Debug)]
pub struct WebhookReceiver {
    port: u16,
    posts: Arc<Mutex<Vec<serde_json::Value>>>,
    task: JoinHandle<()>,
}

impl WebhookReceiver {
    pub async fn start() -> WebhookReceiver {
        let posts = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new()
            .route("/hooks/{id}", post(receive))
            .with_state(Arc::clone(&posts));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        WebhookReceiver { port, posts, task }
    }

    /// The URL to configure; its last segment stands for the secret part.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks/secret-part", self.port)
    }

    pub fn posts(&self) -> Vec<serde_json::Value> {
        self.posts.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

async fn receive(
    State(posts): State<Arc<Mutex<Vec<serde_json::Value>>>>,
    body: axum::body::Bytes,
) -> &'static str {
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&body).into()));
    if let Ok(mut p) = posts.lock() {
        p.push(value);
    }
    "ok"
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
