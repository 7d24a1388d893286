//! Headless Debian Chromium driven over WebDriver (Debian's `chromedriver`), with
//! nothing but HTTP and JSON: a fresh profile per browser, stopped in `Drop`.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;

/// WebDriver's key for element references.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

#[derive(Debug)]
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    http: reqwest::Client,
    _profile: TempDir,
}

impl Browser {
    /// Starts chromedriver (`CUSTOS_CHROMEDRIVER`) and a headless Chromium
    /// (`CUSTOS_CHROMIUM`), Debian's by default.
    pub async fn start() -> Browser {
        let profile = tempfile::tempdir().expect("temp dir");
        let port = custos_adapters::nats_server::free_port().expect("free port");
        let driver_bin =
            std::env::var("CUSTOS_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let chromium =
            std::env::var("CUSTOS_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let driver = Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "chromedriver starts (apt-get install chromium-driver, or scripts/install-deps)",
            );
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let up = crate::eventually(Duration::from_secs(20), || async {
            http.get(format!("{base}/status")).send().await.is_ok()
        })
        .await;
        assert!(up, "chromedriver did not answer on port {port}");
        let caps = json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run",
                format!("--user-data-dir={}", profile.path().display()),
            ],
        }}}});
        let mut browser = Browser {
            driver,
            port,
            session: String::new(),
            http,
            _profile: profile,
        };
        let created = browser.call("POST", "/session", Some(caps)).await;
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {created}"))
            .to_string();
        browser
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let value = self.try_call(method, path, body).await;
        assert!(
            value["error"].is_null(),
            "WebDriver {method} {path}: {value}"
        );
        value
    }

    /// The command's `value`, which names an `error` when it failed.
    async fn try_call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let request = match method {
            "POST" => self.http.post(url).json(&body.unwrap_or_else(|| json!({}))),
            "DELETE" => self.http.delete(url),
            _ => self.http.get(url),
        };
        let response = request.send().await.expect("WebDriver request");
        let value: Value = response.json().await.expect("WebDriver JSON");
        value["value"].clone()
    }

    fn at(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    pub async fn goto(&self, url: &str) {
        self.call("POST", &self.at("/url"), Some(json!({ "url": url })))
            .await;
    }

    async fn element(&self, css: &str) -> String {
        let found = self
            .call(
                "POST",
                &self.at("/element"),
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        found[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {found}"))
            .to_string()
    }

    /// The visible text of the whole page. Right after a click the old page may
    /// still be going away (its body turns stale): read the new one then.
    pub async fn text(&self) -> String {
        let mut last = serde_json::Value::Null;
        for _ in 0..50 {
            // Mid-navigation (a script's form submit) there may be no body yet.
            let found = self
                .try_call(
                    "POST",
                    &self.at("/element"),
                    Some(json!({"using": "css selector", "value": "body"})),
                )
                .await;
            let Some(body) = found[ELEMENT].as_str() else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let text = self
                .try_call("GET", &self.at(&format!("/element/{body}/text")), None)
                .await;
            // The body found may belong to the page being left: a stale
            // reference, or (Chromium) a node of another document.
            if !text["error"].is_null() {
                last = text;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            return text.as_str().unwrap_or_default().to_string();
        }
        panic!("the page kept changing under the reader: {last}")
    }

    /// The page's text once it contains `needle` (after a form post the old page
    /// may still show for a moment), or as it is after 10 s.
    pub async fn text_with(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.text().await;
            if text.contains(needle) || std::time::Instant::now() > deadline {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        let el = self.element(css).await;
        self.call("POST", &self.at(&format!("/element/{el}/clear")), None)
            .await;
        self.call(
            "POST",
            &self.at(&format!("/element/{el}/value")),
            Some(json!({ "text": text })),
        )
        .await;
    }

    /// Adds a WebDriver virtual authenticator (CTAP2, platform, resident keys,
    /// user verification that succeeds), so pages create and use passkeys
    /// without a person. Returns its id.
    pub async fn add_virtual_authenticator(&self) -> String {
        let added = self
            .call(
                "POST",
                &self.at("/webauthn/authenticator"),
                Some(json!({
                    "protocol": "ctap2",
                    "transport": "internal",
                    "hasResidentKey": true,
                    "hasUserVerification": true,
                    "isUserVerified": true,
                })),
            )
            .await;
        added
            .as_str()
            .unwrap_or_else(|| panic!("no virtual authenticator: {added}"))
            .to_string()
    }

    /// The credentials the virtual authenticator `id` holds.
    pub async fn authenticator_credentials(&self, id: &str) -> Vec<Value> {
        let got = self
            .call(
                "GET",
                &self.at(&format!("/webauthn/authenticator/{id}/credentials")),
                None,
            )
            .await;
        got.as_array().cloned().unwrap_or_default()
    }

    pub async fn click(&self, css: &str) {
        let el = self.element(css).await;
        self.call("POST", &self.at(&format!("/element/{el}/click")), None)
            .await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ending the session quits Chromium; then the driver goes.
        if !self.session.is_empty() {
            let _ = blocking_delete(self.port, &format!("/session/{}", self.session));
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// A plain HTTP DELETE from `Drop`, where no runtime may be at hand.
fn blocking_delete(port: u16, path: &str) -> std::io::Result<()> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "DELETE {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    Ok(())
}
