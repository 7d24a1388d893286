//! Looks for signing secrets in what a test can read (the events stream).
//!
//! Nonces never leave a guardian, so a test cannot know them; it knows their
//! public images: every commitment a guardian answers with (`D = d·G`,
//! `E = e·G`) and every verifying share (`Y = s·G`). [`Watch`] collects those
//! from the guardians' replies; [`find`] takes every 32-byte candidate in a
//! message (raw bytes, hex text, arrays of byte values) and reports one whose
//! multiple of `G` has the x-coordinate of a collected image: a nonce or a key
//! share (or its negation, which FROST's Taproot signing uses) in the clear.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use custos_custody::frost::keys::{PublicKeyPackage, SigningShare, VerifyingShare};
use custos_custody::frost::round1::SigningCommitments;
use custos_schemas::codec;
use custos_workers::signing::SignReply;
use futures::StreamExt;

/// x-coordinates of points whose discrete logarithms are secrets.
#[derive(Debug, Clone, Default)]
pub struct Images(HashSet<[u8; 32]>);

fn x_of(compressed: &[u8]) -> Option<[u8; 32]> {
    (compressed.len() == 33)
        .then(|| compressed[1..].try_into().ok())
        .flatten()
}

impl Images {
    pub fn add_commitments(&mut self, c: &SigningCommitments) {
        for point in [c.hiding().serialize(), c.binding().serialize()]
            .into_iter()
            .flatten()
        {
            self.0.extend(x_of(&point));
        }
    }

    pub fn add_verifying_shares(&mut self, public: &PublicKeyPackage) {
        for share in public.verifying_shares().values() {
            self.0.extend(share.serialize().ok().and_then(|p| x_of(&p)));
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `candidate`, read as a scalar, is the logarithm of an image.
    fn hit(&self, candidate: &[u8]) -> bool {
        let Ok(scalar) = SigningShare::deserialize(candidate) else {
            return false;
        };
        VerifyingShare::from(scalar)
            .serialize()
            .ok()
            .and_then(|p| x_of(&p))
            .is_some_and(|x| self.0.contains(&x))
    }
}

/// Collects the images of every commitment and key share in the guardians'
/// answers to any coordinator (replies travel on `_INBOX.>`).
#[derive(Debug)]
pub struct Watch {
    images: Arc<Mutex<Images>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watch {
    pub async fn start(client: &async_nats::Client) -> Watch {
        let mut replies = client.subscribe("_INBOX.>").await.expect("subscribe");
        // The subscription is in place once the server has seen it.
        client.flush().await.expect("flush");
        let images = Arc::new(Mutex::new(Images::default()));
        let collected = images.clone();
        let task = tokio::spawn(async move {
            while let Some(msg) = replies.next().await {
                let Ok(SignReply::Preprocessed {
                    commitments,
                    public_key_package,
                    ..
                }) = codec::from_msgpack::<SignReply>(&msg.payload)
                else {
                    continue;
                };
                let Ok(mut images) = collected.lock() else {
                    return;
                };
                for c in commitments {
                    if let Ok(c) = SigningCommitments::deserialize(&c) {
                        images.add_commitments(&c);
                    }
                }
                if let Ok(p) = PublicKeyPackage::deserialize(&public_key_package) {
                    images.add_verifying_shares(&p);
                }
            }
        });
        Watch { images, task }
    }

    pub fn images(&self) -> Images {
        self.images.lock().expect("images").clone()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Every 32-byte candidate in `body`: raw windows, hex runs, and arrays of byte
/// values in its MessagePack or JSON reading.
fn candidates(body: &[u8]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = body.windows(32).map(<[u8]>::to_vec).collect();
    let mut run = Vec::new();
    for &b in body.iter().chain(std::iter::once(&b' ')) {
        if b.is_ascii_hexdigit() {
            run.push(b);
            continue;
        }
        for w in run.windows(64) {
            out.extend(
                std::str::from_utf8(w)
                    .ok()
                    .and_then(|s| hex::decode(s).ok()),
            );
        }
        run.clear();
    }
    let value = codec::from_msgpack::<serde_json::Value>(body)
        .ok()
        .or_else(|| serde_json::from_slice(body).ok());
    if let Some(value) = value {
        byte_arrays(&value, &mut out);
    }
    out
}

fn byte_arrays(value: &serde_json::Value, out: &mut Vec<Vec<u8>>) {
    match value {
        serde_json::Value::Array(items) => {
            let bytes: Option<Vec<u8>> = items
                .iter()
                .map(|v| v.as_u64().and_then(|n| u8::try_from(n).ok()))
                .collect();
            match bytes {
                Some(bytes) => out.extend(bytes.windows(32).map(<[u8]>::to_vec)),
                None => items.iter().for_each(|v| byte_arrays(v, out)),
            }
        }
        serde_json::Value::Object(fields) => fields.values().for_each(|v| byte_arrays(v, out)),
        _ => {}
    }
}

/// The index of each message in `bodies` that holds a secret of `images`.
pub fn find(bodies: &[Vec<u8>], images: &Images) -> Vec<usize> {
    bodies
        .iter()
        .enumerate()
        .filter(|(_, body)| candidates(body).iter().any(|c| images.hit(c)))
        .map(|(i, _)| i)
        .collect()
}

/// Every message body of the events stream, in order.
pub async fn stream_bodies(js: &async_nats::jetstream::Context) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    custos_adapters::jetstream::read_events(js, 1, None, |stored| {
        out.push(stored.body.to_vec());
        Ok(())
    })
    .await
    .expect("read events");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scan finds a nonce and a key share however they are written.
    #[test]
    fn finds_secrets_raw_hex_and_as_byte_arrays() {
        let mut rng = rand::rngs::OsRng;
        let share = SigningShare::deserialize(&[7u8; 32]).expect("share");
        let (nonces, commitments) = custos_custody::frost::round1::commit(&share, &mut rng);
        let mut images = Images::default();
        images.add_commitments(&commitments);
        let hiding = nonces.hiding().serialize();
        let binding = nonces.binding().serialize();
        let clean = codec::to_msgpack(&serde_json::json!({"summary": "signed", "n": [1, 2, 3]}));
        let mut raw = b"prefix".to_vec();
        raw.extend(&hiding);
        let hex_text = codec::to_msgpack(&serde_json::json!({"reason": hex::encode(&binding)}));
        let array = codec::to_msgpack(&serde_json::json!({ "nonce": hiding }));
        let bodies = vec![clean, raw, hex_text, array];
        assert_eq!(find(&bodies, &images), vec![1, 2, 3]);
        // A key share, through its verifying share.
        let verifying = VerifyingShare::from(share);
        let mut images = Images::default();
        images
            .0
            .extend(x_of(&verifying.serialize().expect("serialize")));
        assert_eq!(find(&[share.serialize()], &images), vec![0]);
    }
}
