//! Identifiers that end up inside NATS subjects, so they must be single, safe tokens.

/// Longest identifier accepted anywhere a subject token is built from it.
pub const MAX_TOKEN_LEN: usize = 128;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{field}: must not be empty")]
    Empty { field: &'static str },
    #[error("{field}: longer than {MAX_TOKEN_LEN} characters")]
    TooLong { field: &'static str },
    #[error("{field}: character {found:?} not allowed (use A-Z, a-z, 0-9, '-' and '_')")]
    BadChar { field: &'static str, found: char },
}

impl IdError {
    /// The field the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            IdError::Empty { field }
            | IdError::TooLong { field }
            | IdError::BadChar { field, .. } => field,
        }
    }
}

/// Checks that `value` can be used as one NATS subject token: ASCII letters,
/// digits, `-` and `_`, 1 to [`MAX_TOKEN_LEN`] characters.
pub fn validate_token(field: &'static str, value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { field });
    }
    if value.len() > MAX_TOKEN_LEN {
        return Err(IdError::TooLong { field });
    }
    match value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        Some(found) => Err(IdError::BadChar { field, found }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert!(validate_token("f", "wf_01-AB").is_ok());
        assert_eq!(validate_token("f", ""), Err(IdError::Empty { field: "f" }));
        assert_eq!(
            validate_token("f", "a.b"),
            Err(IdError::BadChar {
                field: "f",
                found: '.'
            })
        );
        assert_eq!(
            validate_token("f", "a*"),
            Err(IdError::BadChar {
                field: "f",
                found: '*'
            })
        );
        assert!(validate_token("f", &"x".repeat(129)).is_err());
    }
}
