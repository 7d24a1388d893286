//! Custos' edges: the JetStream event log, the nats-server child process and the
//! Slack Web API. Each adapter is a thin translation between the engine's types
//! and a real system.

pub mod files;
pub mod jetstream;
pub mod nats_server;
pub mod slack;
