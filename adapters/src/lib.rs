//! Custos' edges: the JetStream event log, the nats-server child process,
//! Bitcoin-family and EVM nodes over JSON-RPC (and local litecoind and anvil
//! children), the Slack Web API and outgoing mail. Each
//! adapter is a thin translation between the engine's types and a real system.

pub mod anvil;
pub mod bitcoind;
pub mod evm;
pub mod files;
pub mod jetstream;
pub mod mail;
pub mod nats_server;
pub mod regtest;
pub mod slack;
