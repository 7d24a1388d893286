//! The pure core of Custos. No IO, no clock, no randomness: every input, including
//! the time, arrives as an argument, so every decision can be replayed and checked
//! (guardians re-run it before they sign).

pub mod chain;
pub mod chains;
pub mod change;
pub mod intake;
pub mod ledger;
pub mod mfa;
pub mod policy;
pub mod transfer;
pub mod webauthn;
