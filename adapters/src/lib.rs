//! Custos' edges: the JetStream event log and the nats-server child process. Each
//! adapter is a thin translation between the engine's types and a real system.

pub mod files;
pub mod jetstream;
pub mod nats_server;
