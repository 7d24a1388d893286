//! Custos' edges: the JetStream event log, the nats-server child process and
//! outgoing mail. Each adapter is a thin translation between the engine's types
//! and a real system.

pub mod files;
pub mod jetstream;
pub mod mail;
pub mod nats_server;
