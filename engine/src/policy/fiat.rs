//! Fiat values: the policy currency, prices passed in as a snapshot, and exact
//! conversion. Amounts are integers in micro-units of the currency (10^-6), never
//! floats; conversion rounds up, so a value is never understated.

use std::collections::BTreeMap;

use custos_schemas::{Decimal, FieldError};

/// Fiat currencies policies can state amounts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Currency {
    #[serde(rename = "EUR")]
    Eur,
    #[serde(rename = "USD")]
    Usd,
}

impl Currency {
    pub const fn as_str(self) -> &'static str {
        match self {
            Currency::Eur => "EUR",
            Currency::Usd => "USD",
        }
    }

    pub fn parse(s: &str) -> Option<Currency> {
        match s {
            "EUR" => Some(Currency::Eur),
            "USD" => Some(Currency::Usd),
            _ => None,
        }
    }

    const fn index(self) -> usize {
        match self {
            Currency::Eur => 0,
            Currency::Usd => 1,
        }
    }
}

/// Micro-units per unit of fiat.
pub const MICROS: u128 = 1_000_000;

/// One price: the value of one unit of an asset, observed at `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quote {
    pub price: Decimal,
    /// Milliseconds since the Unix epoch, UTC.
    pub at: i64,
}

/// The prices an evaluation may use, with the time each was observed. Passed in
/// by the caller (a configured table or a price-feed adapter); the engine never
/// fetches one. A missing or stale price fails closed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriceSnapshot {
    quotes: BTreeMap<String, [Option<Quote>; 2]>,
}

/// Why a fiat value is not available.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PriceProblem {
    Missing {
        asset: String,
        currency: Currency,
    },
    Stale {
        asset: String,
        currency: Currency,
        age_ms: i64,
        max_age_ms: u64,
    },
    FromTheFuture {
        asset: String,
        currency: Currency,
        at: i64,
        now: i64,
    },
    Overflow,
}

impl std::fmt::Display for PriceProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PriceProblem::Missing { asset, currency } => {
                write!(f, "no {asset}/{} price is available", currency.as_str())
            }
            PriceProblem::Stale {
                asset,
                currency,
                age_ms,
                max_age_ms,
            } => write!(
                f,
                "the {asset}/{} price is {} old, older than the {} the policy accepts",
                currency.as_str(),
                format_duration(u64::try_from(*age_ms).unwrap_or(0)),
                format_duration(*max_age_ms)
            ),
            PriceProblem::FromTheFuture {
                asset,
                currency,
                at,
                now,
            } => write!(
                f,
                "the {asset}/{} price is dated {at}, after the evaluation time {now}",
                currency.as_str()
            ),
            PriceProblem::Overflow => write!(f, "the amount is too large to value"),
        }
    }
}

impl PriceSnapshot {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the price of one unit of `asset` in `currency` (a positive decimal
    /// string), observed at `at` (ms since the epoch).
    pub fn insert(
        &mut self,
        asset: &str,
        currency: Currency,
        price: &str,
        at: i64,
    ) -> Result<(), FieldError> {
        let price = Decimal::parse(price).map_err(|r| FieldError::new("price", r))?;
        self.quotes.entry(asset.to_string()).or_default()[currency.index()] =
            Some(Quote { price, at });
        Ok(())
    }

    pub fn quote(&self, asset: &str, currency: Currency) -> Option<Quote> {
        self.quotes.get(asset).and_then(|q| q[currency.index()])
    }

    /// The value of `amount` of `asset` in micro-units of `currency`, with a price
    /// no older than `max_age_ms` at `now`.
    pub fn value_micros(
        &self,
        asset: &str,
        amount: Decimal,
        currency: Currency,
        now: i64,
        max_age_ms: u64,
    ) -> Result<u128, PriceProblem> {
        let quote = self
            .quote(asset, currency)
            .ok_or_else(|| PriceProblem::Missing {
                asset: asset.to_string(),
                currency,
            })?;
        if quote.at > now {
            return Err(PriceProblem::FromTheFuture {
                asset: asset.to_string(),
                currency,
                at: quote.at,
                now,
            });
        }
        let age = now.saturating_sub(quote.at);
        if u64::try_from(age).map_or(true, |a| a > max_age_ms) {
            return Err(PriceProblem::Stale {
                asset: asset.to_string(),
                currency,
                age_ms: age,
                max_age_ms,
            });
        }
        to_micros(amount, quote.price).ok_or(PriceProblem::Overflow)
    }
}

/// `amount × price` in micro-units, rounded up; `None` on overflow.
pub fn to_micros(amount: Decimal, price: Decimal) -> Option<u128> {
    let product = amount.units.checked_mul(price.units)?;
    let scale = u32::from(amount.scale) + u32::from(price.scale);
    if scale >= 6 {
        let divisor = 10u128.checked_pow(scale - 6)?;
        Some(product.div_ceil(divisor))
    } else {
        product.checked_mul(10u128.pow(6 - scale))
    }
}

/// Parses a fiat amount from a policy (`"1000"`, `"10000.50"`) into micro-units.
pub fn parse_micros(s: &str) -> Result<u64, String> {
    let d = Decimal::parse(s)?;
    if d.significant_decimals() > 6 {
        return Err(format!("{s:?} has more than 6 decimal places"));
    }
    let micros = if d.scale >= 6 {
        d.units / 10u128.pow(u32::from(d.scale) - 6)
    } else {
        d.units.saturating_mul(10u128.pow(6 - u32::from(d.scale)))
    };
    u64::try_from(micros).map_err(|_| format!("{s:?} is too large"))
}

/// `"1,500.00"`-style rendering of micro-units, rounded up to cents.
pub fn format_micros(micros: u128) -> String {
    let cents = micros.div_ceil(10_000);
    let units = (cents / 100).to_string();
    let mut grouped = String::with_capacity(units.len() + units.len() / 3 + 3);
    for (i, c) in units.chars().enumerate() {
        if i > 0 && (units.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    format!("{grouped}.{:02}", cents % 100)
}

/// Plain decimal rendering of micro-units rounded up to cents, e.g. `"1500.00"`.
pub fn plain_micros(micros: u128) -> String {
    let cents = micros.div_ceil(10_000);
    format!("{}.{:02}", cents / 100, cents % 100)
}

/// `"90s"`, `"5m"`, `"24h"`, `"2d"`, or a combination such as `"1h30m"`.
pub fn format_duration(ms: u64) -> String {
    if ms == 0 {
        return "0s".into();
    }
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let mut s = ms / 1000;
    let mut out = String::new();
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if s >= size {
            out.push_str(&format!("{}{unit}", s / size));
            s %= size;
        }
    }
    out
}

/// Parses `"30s"`, `"5m"`, `"24h"`, `"7d"` (or combinations like `"1h30m"`) into
/// milliseconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a duration like \"30s\", \"5m\", \"24h\" or \"7d\"");
    if s.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let size: u64 = match c {
            's' => 1_000,
            'm' => 60_000,
            'h' => 3_600_000,
            'd' => 86_400_000,
            _ => return Err(bad()),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        digits.clear();
        total = n
            .checked_mul(size)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
    }
    if !digits.is_empty() {
        return Err(bad());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::parse(s).unwrap_or(Decimal { units: 0, scale: 0 })
    }

    #[test]
    fn conversion_is_exact_and_rounds_up() {
        assert_eq!(to_micros(d("2"), d("500")), Some(1_000 * MICROS));
        assert_eq!(to_micros(d("0.000000000000000001"), d("3000")), Some(1));
        assert_eq!(to_micros(d("1.5"), d("80.25")), Some(120_375_000));
        assert_eq!(
            to_micros(
                d("999999999999.999999999999999999"),
                d("999999999999.99999999")
            ),
            None
        );
    }

    #[test]
    fn formats() {
        assert_eq!(format_micros(1_500 * MICROS), "1,500.00");
        assert_eq!(format_micros(1), "0.01");
        assert_eq!(format_micros(999_999_990_000), "999,999.99");
        assert_eq!(plain_micros(120_375_000), "120.38");
        assert_eq!(parse_micros("1000"), Ok(1_000_000_000));
        assert_eq!(parse_micros("0.5"), Ok(500_000));
        assert!(parse_micros("0.0000001").is_err());
        assert_eq!(parse_duration("1h30m"), Ok(5_400_000));
        assert_eq!(parse_duration("24h"), Ok(86_400_000));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5w").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(format_duration(5_400_000), "1h30m");
        assert_eq!(format_duration(86_400_000), "1d");
    }
}
