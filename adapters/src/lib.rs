//! Custos' edges: the JetStream event log, the nats-server child process,
//! Bitcoin-family nodes over JSON-RPC and the Slack Web API. Each adapter is a
//! thin translation between the engine's types and a real system.

pub mod bitcoind;
pub mod files;
pub mod jetstream;
pub mod nats_server;
pub mod slack;
