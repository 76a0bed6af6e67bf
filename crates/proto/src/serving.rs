//! What every dynseg gRPC server shares: gRPC health checking
//! (`grpc.health.v1.Health`, what Kubernetes' gRPC probes and load balancers
//! ask), server reflection (`grpc.reflection.v1` and `v1alpha`, so grpcurl and
//! friends need no .proto files), and how connections are accepted.

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::{Router, TcpIncoming};

use crate::auth::Access;
pub use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// The encoded descriptors of `dynseg.v1`, compiled from proto/ at build time.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/dynseg_v1_descriptors.bin"));

/// Adds health and reflection to `router`, which serves `services` (full
/// names, such as `dynseg.v1.Node`): reflection lists those, health and
/// itself. Health answers for the server as a whole (service `""`) and for
/// each of `services`, all SERVING; [`Health::set`] changes that.
pub async fn add_standard_services<L>(
    router: Router<L>,
    services: &[&str],
) -> std::io::Result<(Router<L>, Health)> {
    let (reporter, health) = tonic_health::server::health_reporter();
    // Each version of reflection lists itself.
    let reflection = |version: &str| {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name(format!("grpc.reflection.{version}.ServerReflection"));
        for service in services {
            builder = builder.with_service_name(*service);
        }
        builder
    };
    let invalid = |e: tonic_reflection::server::Error| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
    };
    let v1 = reflection("v1").build_v1().map_err(invalid)?;
    let v1alpha = reflection("v1alpha").build_v1alpha().map_err(invalid)?;
    let health_status = Health {
        reporter,
        services: services.iter().map(|s| (*s).to_owned()).collect(),
    };
    health_status.set(ServingStatus::Serving).await;
    Ok((
        router
            .add_service(health)
            .add_service(v1)
            .add_service(v1alpha),
        health_status,
    ))
}

/// The health a server reports, for itself and each of its services.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    services: Vec<String>,
}

impl Health {
    /// Reports `status` for the server and every one of its services.
    pub async fn set(&self, status: ServingStatus) {
        self.reporter.set_service_status("", status).await;
        for service in &self.services {
            self.reporter.set_service_status(service, status).await;
        }
    }
}

/// A server builder for a process with `access`: over TLS when it has TLS
/// (`members_only`: with mutual TLS, callers need a certificate the CA
/// signed, as on the node and control servers).
pub fn builder(access: &Access, members_only: bool) -> std::io::Result<Server> {
    let builder = Server::builder();
    match access.tls() {
        Some(tls) => builder.tls_config(tls.server(members_only)).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("TLS: {e}"))
        }),
        None => Ok(builder),
    }
}

/// The TLS of a process's HTTP listeners, when it has TLS.
pub fn http_tls(access: &Access) -> std::io::Result<Option<std::sync::Arc<rustls::ServerConfig>>> {
    access
        .tls()
        .map(|tls| {
            tls.rustls_server()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
        })
        .transpose()
}

/// Accepted connections with `TCP_NODELAY`: tonic sets it only on listeners it
/// binds itself, and without it small replies wait out delayed ACKs (measured:
/// about 40 ms per single-event ingest call).
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use prost::Message;

    #[test]
    fn the_descriptors_hold_every_dynseg_service() {
        let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
        let services: Vec<String> = set
            .file
            .iter()
            .flat_map(|f| {
                f.service
                    .iter()
                    .map(move |s| format!("{}.{}", f.package(), s.name()))
            })
            .collect();
        for service in [
            "dynseg.v1.Node",
            "dynseg.v1.Control",
            "dynseg.v1.Gateway",
            "dynseg.v1.RaftPeer",
        ] {
            assert!(
                services.iter().any(|s| s == service),
                "{service} missing: {services:?}"
            );
        }
    }
}
