//! # dynseg-telemetry: what a running dynseg process tells its operator
//!
//! | module | what it holds |
//! |---|---|
//! | [`metrics`] | the process's Prometheus registry, scrape-time refresh hooks, and the `/metrics` endpoint |
//! | [`http`] | serving an HTTP router, plain or over TLS |
//! | [`traces`] | logs, OTLP span export, and trace context carried across gRPC calls |

pub mod http;
pub mod metrics;
pub mod traces;
