//! Custos' edges: the JetStream event log, the nats-server child process, and
//! Bitcoin-family nodes over JSON-RPC. Each adapter is a thin translation between
//! the engine's types and a real system.

pub mod bitcoind;
pub mod files;
pub mod jetstream;
pub mod nats_server;
