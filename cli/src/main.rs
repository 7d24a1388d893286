use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use std::time::Instant;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("exp{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("n.conf");
    std::fs::write(&conf, format!("listen: 127.0.0.1:14333\njetstream {{ store_dir: \"{}\"\n sync_interval: always }}\n", dir.display()))?;
    let mut child = std::process::Command::new("nats-server").arg("-c").arg(&conf).spawn()?;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let client = async_nats::connect("127.0.0.1:14333").await?;
    let js = jetstream::new(client.clone());
    js.create_stream(stream::Config { name: "S".into(), subjects: vec!["s.>".into()], allow_atomic_publish: true, ..Default::default() }).await?;
    let payload = bytes::Bytes::from(vec![7u8; 200]);
    let n = 5000;
    let t = Instant::now();
    let mut futs = Vec::new();
    for i in 0..n {
        futs.push(js.send_publish(format!("s.a.{}", i % 50), jetstream::message::PublishMessage::build().payload(payload.clone()).message_id(format!("m{i}"))).await?);
    }
    for f in futs { f.await?; }
    println!("pipelined individual: {:.0} msg/s", n as f64 / t.elapsed().as_secs_f64());
    for bs in [10usize, 100, 500] {
        let t = Instant::now();
        let mut st = js.get_stream("S").await?; let mut last = st.info().await?.state.last_sequence;
        let mut futs = Vec::new();
        let batches = n / bs;
        for b in 0..batches {
            let id = format!("b{bs}-{b}");
            for j in 0..bs {
                let mut h = HeaderMap::new();
                h.insert("Nats-Batch-Id", id.as_str());
                h.insert("Nats-Batch-Sequence", (j + 1).to_string().as_str());
                h.insert("Nats-Msg-Id", format!("{id}-{j}").as_str());
                if j == 0 { h.insert("Nats-Expected-Last-Sequence", last.to_string().as_str()); }
                let subj = format!("s.b.{}", j % 50);
                if j + 1 == bs {
                    h.insert("Nats-Batch-Commit", "1");
                    futs.push(client.request_with_headers(subj, h, payload.clone()));
                } else {
                    client.publish_with_headers(subj, h, payload.clone()).await?;
                }
            }
            last += bs as u64;
        }
        let mut ok = 0;
        for f in futs { let r = f.await?; if ok == 0 { println!("{}", String::from_utf8_lossy(&r.payload)); } ok += 1; }
        println!("atomic batch {bs}: {:.0} msg/s ({ok} batches)", (batches * bs) as f64 / t.elapsed().as_secs_f64());
    }
    let mut st = js.get_stream("S").await?; println!("last seq {}", st.info().await?.state.last_sequence);
    child.kill()?;
    Ok(())
}
