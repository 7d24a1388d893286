//! What upstream systems send, and what they get back.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ids::{IdError, validate_token};

/// Longest memo accepted, in bytes.
pub const MAX_MEMO_LEN: usize = 256;
/// Most digits accepted in the integer part of an amount: anything larger is absurd
/// for any asset Custos holds and is refused rather than risked.
pub const MAX_AMOUNT_INTEGER_DIGITS: usize = 12;
/// Most fractional digits accepted (EVM assets have 18).
pub const MAX_AMOUNT_DECIMALS: usize = 18;

/// A transfer request from an upstream system, published to
/// [`crate::subjects::REQ_TRANSFER`] as JSON (`Content-Type: application/json`) or
/// MessagePack. Retrying with the same `requestId` returns the same workflow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TransferRequest {
    /// Upstream's idempotency key: A-Z, a-z, 0-9, '-', '_' (1 to 128).
    pub request_id: String,
    /// Wallet name.
    pub wallet: String,
    /// Asset symbol, e.g. `LTC`, `ETH`.
    pub asset: String,
    /// Destination address on the wallet's chain.
    pub destination: String,
    /// Positive decimal string in the asset's units, e.g. `"0.015"`. Never a number:
    /// floats lose money.
    pub amount: String,
    #[serde(default)]
    pub memo: Option<String>,
    /// Directory user id of the person or system initiating the transfer.
    pub initiator: String,
}

/// A field that failed validation, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<IdError> for FieldError {
    fn from(e: IdError) -> Self {
        FieldError::new(
            e.field(),
            e.to_string()
                .split_once(": ")
                .map_or(String::new(), |(_, r)| r.to_string()),
        )
    }
}

/// A positive decimal amount, exact: `units / 10^scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decimal {
    pub units: u128,
    pub scale: u8,
}

impl Decimal {
    /// The amount in base units of an asset with `decimals` (satoshi for 8, wei
    /// for 18); refused when it has more fractional digits than the asset.
    pub fn to_base_units(&self, decimals: u8) -> Result<u128, String> {
        let extra = decimals
            .checked_sub(self.scale)
            .ok_or_else(|| format!("has more than {decimals} decimal places"))?;
        10u128
            .checked_pow(u32::from(extra))
            .and_then(|f| self.units.checked_mul(f))
            .ok_or_else(|| "is too large".to_string())
    }

    /// Parses a plain positive decimal (`"12"`, `"0.015"`); no sign, exponent,
    /// separators or whitespace.
    pub fn parse(s: &str) -> Result<Decimal, String> {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if s.starts_with('-') {
            return Err("must be positive".into());
        }
        let (int, frac) = s.split_once('.').unwrap_or((s, ""));
        if int.is_empty() || (s.contains('.') && frac.is_empty()) {
            return Err(format!("{s:?} is not a decimal number like \"12.5\""));
        }
        if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return Err(format!("{s:?} is not a decimal number like \"12.5\""));
        }
        let int_trimmed = int.trim_start_matches('0');
        if int_trimmed.len() > MAX_AMOUNT_INTEGER_DIGITS {
            return Err(format!(
                "absurdly large (more than {MAX_AMOUNT_INTEGER_DIGITS} integer digits)"
            ));
        }
        if frac.len() > MAX_AMOUNT_DECIMALS {
            return Err(format!("more than {MAX_AMOUNT_DECIMALS} decimal places"));
        }
        let digits = format!("{int_trimmed}{frac}");
        let units: u128 = if digits.trim_start_matches('0').is_empty() {
            0
        } else {
            digits
                .parse()
                .map_err(|_| format!("{s:?} is out of range"))?
        };
        if units == 0 {
            return Err("must be greater than zero".into());
        }
        // At most 12 + 18 digits, which always fits u128 and u8.
        Ok(Decimal {
            units,
            scale: frac.len() as u8,
        })
    }

    /// Fractional digits actually used (trailing zeros do not count).
    pub fn significant_decimals(&self) -> u8 {
        let mut units = self.units;
        let mut scale = self.scale;
        while scale > 0 && units.is_multiple_of(10) {
            units /= 10;
            scale -= 1;
        }
        scale
    }
}

impl TransferRequest {
    /// Checks every field's form (not whether the wallet exists or the address
    /// fits the chain: that needs the directory, see the engine).
    pub fn validate_shape(&self) -> Result<Decimal, FieldError> {
        validate_token("requestId", &self.request_id)?;
        validate_token("wallet", &self.wallet)?;
        validate_token("initiator", &self.initiator)?;
        if self.asset.is_empty()
            || self.asset.len() > 16
            || !self.asset.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(FieldError::new(
                "asset",
                "must be 1 to 16 letters or digits, e.g. \"LTC\"",
            ));
        }
        if self.destination.is_empty()
            || self.destination.len() > 128
            || !self.destination.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(FieldError::new(
                "destination",
                "must be an address: 1 to 128 letters or digits",
            ));
        }
        if let Some(memo) = &self.memo {
            if memo.len() > MAX_MEMO_LEN {
                return Err(FieldError::new(
                    "memo",
                    format!("longer than {MAX_MEMO_LEN} bytes"),
                ));
            }
            if memo.chars().any(char::is_control) {
                return Err(FieldError::new(
                    "memo",
                    "must not contain control characters",
                ));
            }
        }
        Decimal::parse(&self.amount).map_err(|reason| FieldError::new("amount", reason))
    }
}

/// Intake's answer, encoded like the request (JSON for JSON, else MessagePack).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "status", rename_all = "camelCase")]
pub enum IntakeReply {
    /// The workflow exists; `duplicate` is true when an earlier request with the same
    /// id created it.
    #[serde(rename_all = "camelCase")]
    Accepted {
        workflow_id: String,
        duplicate: bool,
    },
    /// Refused; nothing was created. `field` names the offending field when there is one.
    #[serde(rename_all = "camelCase")]
    Rejected(IntakeError),
    /// Custos could not record the request right now; retry with the same request id.
    #[serde(rename_all = "camelCase")]
    Unavailable { reason: String },
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IntakeError {
    #[serde(default)]
    pub field: Option<String>,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_units() {
        let d = |s| Decimal::parse(s).expect("decimal");
        assert_eq!(d("1.5").to_base_units(8), Ok(150_000_000));
        assert_eq!(d("0.00000001").to_base_units(8), Ok(1));
        assert_eq!(d("2").to_base_units(18), Ok(2_000_000_000_000_000_000));
        assert!(d("0.000000001").to_base_units(8).is_err());
    }

    #[test]
    fn decimals() {
        assert_eq!(
            Decimal::parse("12"),
            Ok(Decimal {
                units: 12,
                scale: 0
            })
        );
        assert_eq!(
            Decimal::parse("0.015"),
            Ok(Decimal {
                units: 15,
                scale: 3
            })
        );
        assert_eq!(
            Decimal::parse("1.50").map(|d| d.significant_decimals()),
            Ok(1)
        );
        for bad in [
            "",
            "-1",
            "0",
            "0.000",
            "1e5",
            "1.",
            ".5",
            " 1",
            "1,5",
            "NaN",
            "999999999999999",
        ] {
            assert!(Decimal::parse(bad).is_err(), "{bad} accepted");
        }
        assert!(Decimal::parse("0.0000000000000000001").is_err());
        assert!(Decimal::parse("999999999999.999999999999999999").is_ok());
    }
}
