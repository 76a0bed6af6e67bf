//! TLS with rustls on every listener. A process gets a certificate and key
//! (PEM files) and the CA that signed its peers' certificates; with `mutual`
//! set, members also present their certificate when they call each other, and
//! the member-only servers (node, control) accept only callers whose
//! certificate the CA signed. The gateway accepts clients without one.

use std::sync::Arc;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// A process's TLS material.
#[derive(Clone, Debug)]
pub struct Tls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    ca_pem: Vec<u8>,
    mutual: bool,
}

/// The usage text of the flags [`Tls::from_flags`] reads.
pub const TLS_USAGE: &str = "[--tls-cert F --tls-key F [--tls-ca F] [--mtls]]";

impl Tls {
    /// From PEM bytes; the CA defaults to the certificate itself (a
    /// self-signed pair).
    pub fn from_pem(
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
        ca_pem: Option<Vec<u8>>,
        mutual: bool,
    ) -> Tls {
        Tls {
            ca_pem: ca_pem.unwrap_or_else(|| cert_pem.clone()),
            cert_pem,
            key_pem,
            mutual,
        }
    }

    /// From `--tls-cert`, `--tls-key`, `--tls-ca` and `--mtls`: `None` when
    /// no certificate is given. The files are read and checked now, so a bad
    /// one stops the process at start with its name.
    pub fn from_flags(
        cert: Option<&str>,
        key: Option<&str>,
        ca: Option<&str>,
        mutual: bool,
    ) -> Result<Option<Tls>, String> {
        let (cert, key) = match (cert, key) {
            (None, None) if ca.is_none() && !mutual => return Ok(None),
            (Some(cert), Some(key)) => (cert, key),
            _ => {
                return Err(format!(
                    "TLS needs both --tls-cert and --tls-key: {TLS_USAGE}"
                ));
            }
        };
        let read =
            |flag: &str, path: &str| std::fs::read(path).map_err(|e| format!("{flag} {path}: {e}"));
        let tls = Tls::from_pem(
            read("--tls-cert", cert)?,
            read("--tls-key", key)?,
            ca.map(|ca| read("--tls-ca", ca)).transpose()?,
            mutual,
        );
        tls.rustls_server()?;
        Ok(Some(tls))
    }

    /// A new self-signed certificate for `names` (DNS names or IP
    /// addresses), its own CA: what `dynseg dev --tls` uses.
    pub fn self_signed(names: &[&str], mutual: bool) -> Result<Tls, String> {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let generated = rcgen::generate_simple_self_signed(names).map_err(|e| e.to_string())?;
        Ok(Tls::from_pem(
            generated.cert.pem().into_bytes(),
            generated.signing_key.serialize_pem().into_bytes(),
            None,
            mutual,
        ))
    }

    /// The certificate, PEM (clients of a self-signed pair trust it).
    pub fn cert_pem(&self) -> &[u8] {
        &self.cert_pem
    }

    /// The key, PEM.
    pub fn key_pem(&self) -> &[u8] {
        &self.key_pem
    }

    /// Whether members present certificates to each other.
    pub fn is_mutual(&self) -> bool {
        self.mutual
    }

    /// A gRPC server's TLS. `members_only`: with mutual TLS, refuse callers
    /// without a certificate the CA signed.
    pub fn server(&self, members_only: bool) -> ServerTlsConfig {
        let config =
            ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        if self.mutual {
            config
                .client_ca_root(Certificate::from_pem(&self.ca_pem))
                .client_auth_optional(!members_only)
        } else {
            config
        }
    }

    /// A member's client TLS: trusts the CA; presents its certificate when
    /// mutual.
    pub fn client(&self) -> ClientTlsConfig {
        let config = client_trusting(&self.ca_pem);
        if self.mutual {
            config.identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
        } else {
            config
        }
    }

    /// rustls' server configuration, for the HTTP listeners (no client
    /// certificates: their callers are Segment's libraries and Prometheus).
    pub fn rustls_server(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("the TLS certificate is not PEM: {e}"))?;
        if certs.is_empty() {
            return Err("the TLS certificate file holds no certificate".into());
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|e| format!("the TLS key is not a PEM private key: {e}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| format!("the TLS certificate and key do not match: {e}"))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// A client's TLS that trusts the CA in `ca_pem` (the CLI's `--tls-ca`).
pub fn client_trusting(ca_pem: &[u8]) -> ClientTlsConfig {
    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn flags_need_a_pair_and_readable_pem() {
        assert!(Tls::from_flags(None, None, None, false).unwrap().is_none());
        let err = Tls::from_flags(Some("c.pem"), None, None, false).unwrap_err();
        assert!(err.contains("both --tls-cert and --tls-key"), "{err}");
        let err = Tls::from_flags(None, None, None, true).unwrap_err();
        assert!(err.contains("both"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let pair = Tls::self_signed(&["localhost", "127.0.0.1"], true).unwrap();
        let (cert, key, junk) = (
            dir.path().join("c"),
            dir.path().join("k"),
            dir.path().join("j"),
        );
        std::fs::write(&cert, pair.cert_pem()).unwrap();
        std::fs::write(&key, pair.key_pem()).unwrap();
        std::fs::write(&junk, "not pem").unwrap();
        let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
        let loaded = Tls::from_flags(Some(&path(&cert)), Some(&path(&key)), None, true)
            .unwrap()
            .unwrap();
        assert!(loaded.is_mutual());
        let err = Tls::from_flags(Some(&path(&junk)), Some(&path(&key)), None, false).unwrap_err();
        assert!(err.contains("no certificate"), "{err}");
        let err =
            Tls::from_flags(Some(&path(&cert)), Some("/nonexistent/key"), None, false).unwrap_err();
        assert!(err.contains("--tls-key /nonexistent/key"), "{err}");
        let other = Tls::self_signed(&["localhost"], false).unwrap();
        std::fs::write(&key, other.key_pem()).unwrap();
        let err = Tls::from_flags(Some(&path(&cert)), Some(&path(&key)), None, false).unwrap_err();
        assert!(err.contains("do not match"), "{err}");
    }
}
