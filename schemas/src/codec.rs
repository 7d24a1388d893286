//! Encoding and decoding. Custos writes MessagePack (structs as maps, so unknown
//! fields are detected); upstream may send JSON and says so in `Content-Type`.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Wire encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType {
    MsgPack,
    Json,
}

impl ContentType {
    pub const MSGPACK: &'static str = "application/msgpack";
    pub const JSON: &'static str = "application/json";

    /// From a `Content-Type` header value; absent means MessagePack.
    pub fn from_header(value: Option<&str>) -> Result<Self, DecodeError> {
        match value.map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        }) {
            None => Ok(ContentType::MsgPack),
            Some(v) if v == Self::MSGPACK || v == "application/x-msgpack" => {
                Ok(ContentType::MsgPack)
            }
            Some(v) if v == Self::JSON => Ok(ContentType::Json),
            Some(v) => Err(DecodeError {
                field: None,
                reason: format!(
                    "unsupported Content-Type {v:?}: use {} or {}",
                    Self::JSON,
                    Self::MSGPACK
                ),
            }),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ContentType::MsgPack => Self::MSGPACK,
            ContentType::Json => Self::JSON,
        }
    }

    pub fn encode<T: Serialize>(self, value: &T) -> Vec<u8> {
        match self {
            ContentType::MsgPack => to_msgpack(value),
            // Serializing our own types to JSON cannot fail (string keys, no NaN).
            ContentType::Json => serde_json::to_vec(value).unwrap_or_default(),
        }
    }

    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, DecodeError> {
        match self {
            ContentType::MsgPack => from_msgpack(bytes),
            ContentType::Json => {
                let mut de = serde_json::Deserializer::from_slice(bytes);
                let value =
                    serde_path_to_error::deserialize(&mut de).map_err(DecodeError::from_path)?;
                de.end().map_err(|e| DecodeError {
                    field: None,
                    reason: e.to_string(),
                })?;
                Ok(value)
            }
        }
    }
}

/// Canonical MessagePack: structs as maps in declaration order.
pub fn to_msgpack<T: Serialize>(value: &T) -> Vec<u8> {
    // Writing to a Vec only fails for types serde cannot represent; ours never do.
    rmp_serde::to_vec_named(value).unwrap_or_default()
}

pub fn from_msgpack<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let mut de = rmp_serde::Deserializer::new(std::io::Cursor::new(bytes));
    // Every replica decodes every event, so the path is tracked (which slows
    // each step of decoding) only to name the field of a failure.
    let value = match T::deserialize(&mut de) {
        Ok(value) => value,
        Err(plain) => {
            let mut de = rmp_serde::Deserializer::new(std::io::Cursor::new(bytes));
            let traced = serde_path_to_error::deserialize::<_, T>(&mut de).err();
            return Err(traced.map(DecodeError::from_path).unwrap_or(DecodeError {
                field: None,
                reason: plain.to_string(),
            }));
        }
    };
    if de.position() as usize != bytes.len() {
        return Err(DecodeError {
            field: None,
            reason: "trailing bytes after the message".into(),
        });
    }
    Ok(value)
}

/// Why bytes did not decode, naming the field where one is known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{reason}", field.as_ref().map(|f| format!("{f}: ")).unwrap_or_default())]
pub struct DecodeError {
    pub field: Option<String>,
    pub reason: String,
}

impl DecodeError {
    fn from_path<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> Self {
        let path = e.path().to_string();
        let reason = e.inner().to_string();
        // For an unknown or missing field serde names it in the message, and the
        // path is the enclosing struct.
        let named = reason
            .split('`')
            .nth(1)
            .filter(|_| reason.starts_with("unknown field") || reason.starts_with("missing field"));
        let field = match (named, path.as_str()) {
            (Some(name), "." | "") => Some(name.to_string()),
            (Some(name), p) if p == name || p.ends_with(&format!(".{name}")) => Some(p.to_string()),
            (Some(name), p) => Some(format!("{p}.{name}")),
            (None, "." | "") => None,
            (None, p) => Some(p.to_string()),
        };
        DecodeError { field, reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::TransferRequest;

    fn req() -> TransferRequest {
        TransferRequest {
            request_id: "r1".into(),
            wallet: "w".into(),
            asset: "LTC".into(),
            destination: "addr".into(),
            amount: "1.5".into(),
            memo: None,
            initiator: "alice".into(),
        }
    }

    #[test]
    fn both_encodings_round_trip() {
        for ct in [ContentType::Json, ContentType::MsgPack] {
            let bytes = ct.encode(&req());
            assert_eq!(ct.decode::<TransferRequest>(&bytes), Ok(req()));
        }
    }

    #[test]
    fn errors_name_the_field() {
        let e = ContentType::Json.decode::<TransferRequest>(br#"{"requestId":"r","wallet":"w","asset":"A","destination":"d","amount":5,"initiator":"i"}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("amount"));
        let e = ContentType::Json.decode::<TransferRequest>(br#"{"requestId":"r","wallet":"w","asset":"A","destination":"d","amount":"5","initiator":"i","fee":1}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("fee"), "{e}");
        let e = ContentType::Json
            .decode::<TransferRequest>(br#"{"requestId":"r"}"#)
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("wallet"), "{e}");
        assert!(
            ContentType::MsgPack
                .decode::<TransferRequest>(b"\xc1garbage")
                .is_err()
        );
        assert!(ContentType::from_header(Some("text/plain")).is_err());
        assert_eq!(
            ContentType::from_header(Some("application/json; charset=utf-8")),
            Ok(ContentType::Json)
        );
    }
}
