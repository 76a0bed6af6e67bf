//! Who may call what. Clients present a token (`authorization: Bearer
//! <token>` over gRPC; the write key over HTTP) that the server looks up by
//! its SHA-256, so token files hold no secrets. Cluster members present the
//! cluster secret (`x-dynseg-cluster-secret`) on their calls to each other.
//!
//! | role | may |
//! |---|---|
//! | `ingest` | send events (gRPC ingest, HTTP tracking API) |
//! | `read` | subscribe, look users and members up, read segments and topology |
//! | `admin` | change segments, nodes and placement; move the manual clock |
//! | cluster secret | everything, including the calls only members make |
//!
//! Health and reflection are public (probes and tools call them). A server
//! without a token store is open: anyone may call anything.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig};

use crate::tls::Tls;
use tonic::{Code, Status};

/// The header members carry the cluster secret in.
pub const CLUSTER_SECRET_HEADER: &str = "x-dynseg-cluster-secret";

/// What a token allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Send events.
    Ingest,
    /// Read memberships, changes, segments and topology.
    Read,
    /// Change segments and the cluster.
    Admin,
    /// A cluster member (the cluster secret): everything.
    Cluster,
}

impl Role {
    /// The role called `name` (`ingest`, `read`, `admin`).
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "ingest" => Some(Role::Ingest),
            "read" => Some(Role::Read),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Read => "read",
            Role::Admin => "admin",
            Role::Cluster => "cluster",
        }
    }
}

/// Who a token belongs to and what it may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// A name for logs and errors.
    pub name: String,
    /// Its roles.
    pub roles: BTreeSet<Role>,
}

/// `sha256:<hex>` of a token, as token files hold it.
pub fn token_hash(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let mut out = String::from("sha256:");
    for byte in digest {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// A new random token: 32 bytes from the OS, in hex (also fit for a
/// cluster secret).
pub fn random_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let mut out = String::with_capacity(64);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    Ok(out)
}

/// Tokens by their hash.
#[derive(Clone, Debug, Default)]
pub struct TokenStore {
    by_hash: HashMap<String, Principal>,
}

impl TokenStore {
    /// Parses a token file: one token per line, `NAME ROLE[,ROLE...]
    /// sha256:HEX`; `#` starts a comment; `;` also separates entries (for an
    /// environment variable). Errors name the line.
    pub fn parse(text: &str) -> Result<TokenStore, String> {
        let mut store = TokenStore::default();
        let entries = text
            .split(['\n', ';'])
            .map(|l| l.split('#').next().unwrap_or_default().trim());
        for (number, line) in entries.enumerate().filter(|(_, l)| !l.is_empty()) {
            let at = || format!("token entry {}", number + 1);
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [name, roles, hash] = fields[..] else {
                return Err(format!(
                    "{}: expected NAME ROLE[,ROLE...] sha256:HEX, found {line:?}",
                    at()
                ));
            };
            let roles = roles
                .split(',')
                .map(|r| {
                    Role::parse(r).ok_or_else(|| {
                        format!("{}: unknown role {r:?} (ingest, read, admin)", at())
                    })
                })
                .collect::<Result<BTreeSet<Role>, String>>()?;
            let hex = hash.strip_prefix("sha256:").unwrap_or_default();
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "{}: the hash must be sha256: and 64 hex digits (`dynseg auth hash` prints it)",
                    at()
                ));
            }
            let principal = Principal {
                name: name.to_owned(),
                roles,
            };
            if store
                .by_hash
                .insert(hash.to_ascii_lowercase(), principal)
                .is_some()
            {
                return Err(format!("{}: the same token is listed twice", at()));
            }
        }
        Ok(store)
    }

    /// Adds a token given in the clear (hashed here; only the hash is kept).
    pub fn add(&mut self, name: &str, token: &str, roles: &[Role]) {
        self.by_hash.insert(
            token_hash(token),
            Principal {
                name: name.to_owned(),
                roles: roles.iter().copied().collect(),
            },
        );
    }

    /// Whether it holds no token.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The owner of `token`, if the store knows it.
    pub fn find(&self, token: &str) -> Option<&Principal> {
        self.by_hash.get(&token_hash(token))
    }
}

/// Why a call was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No credentials, or unknown ones.
    #[error("{0}")]
    Unauthenticated(String),
    /// Known credentials without the role the call needs.
    #[error("{0}")]
    PermissionDenied(String),
}

impl From<Denied> for Status {
    fn from(denied: Denied) -> Status {
        match denied {
            Denied::Unauthenticated(m) => Status::new(Code::Unauthenticated, m),
            Denied::PermissionDenied(m) => Status::new(Code::PermissionDenied, m),
        }
    }
}

/// The role a gRPC method (`/package.Service/Method`) needs; `None`: public.
/// Unknown methods need the cluster secret (deny by default).
pub fn required_role(path: &str) -> Option<Role> {
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    match service {
        "grpc.health.v1.Health"
        | "grpc.reflection.v1.ServerReflection"
        | "grpc.reflection.v1alpha.ServerReflection" => None,
        "dynseg.v1.Gateway" => Some(match method {
            "Ingest" | "IngestStream" | "Track" | "Identify" => Role::Ingest,
            "Subscribe" | "GetUser" | "ListMembers" | "SegmentCounts" | "SegmentOverlap"
            | "SegmentHistory" | "Explain" => Role::Read,
            "PreviewSegments" | "AdvanceClock" => Role::Admin,
            _ => Role::Cluster,
        }),
        "dynseg.v1.Control" => Some(match method {
            "ValidateSegments" | "GetSegment" | "ListSegments" | "GetTopology" | "Watch"
            | "GetControlStatus" => Role::Read,
            "ApplySegments"
            | "DeleteSegment"
            | "SetShardCount"
            | "AddNode"
            | "DrainNode"
            | "Rebalance"
            | "AddControlMember"
            | "RemoveControlMember" => Role::Admin,
            // RegisterMember, DeregisterMember, Heartbeat, CommitMove,
            // AbortMove: what nodes and gateways do.
            _ => Role::Cluster,
        }),
        // The node's API and raft are between members.
        _ => Some(Role::Cluster),
    }
}

/// A server's access policy: its token store (none: open) and the cluster
/// secret members present.
#[derive(Clone, Debug, Default)]
pub struct Access {
    tokens: Option<Arc<TokenStore>>,
    cluster_secret: Option<Arc<str>>,
    tls: Option<Arc<Tls>>,
}

impl Access {
    /// Anyone may call anything.
    pub fn open() -> Access {
        Access::default()
    }

    /// Enforced by `tokens` (when given) and the cluster secret.
    pub fn new(tokens: Option<TokenStore>, cluster_secret: Option<String>) -> Access {
        Access {
            tokens: tokens.map(Arc::new),
            cluster_secret: cluster_secret.map(Arc::from),
            tls: None,
        }
    }

    /// The same, serving and calling over `tls` (when given).
    pub fn with_tls(mut self, tls: Option<Tls>) -> Access {
        self.tls = tls.map(Arc::new);
        self
    }

    /// This process's TLS, if it has any.
    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_deref()
    }

    /// Whether calls are checked.
    pub fn is_enforced(&self) -> bool {
        self.tokens.is_some()
    }

    /// The token store, when calls are checked.
    pub fn tokens(&self) -> Option<&TokenStore> {
        self.tokens.as_deref()
    }

    /// The cluster secret, for this member's own outgoing calls.
    pub fn cluster_secret(&self) -> Option<&str> {
        self.cluster_secret.as_deref()
    }

    /// Checks a gRPC call to `path` with these headers.
    pub fn check(&self, path: &str, headers: &http::HeaderMap) -> Result<(), Denied> {
        let Some(tokens) = &self.tokens else {
            return Ok(());
        };
        let Some(needed) = required_role(path) else {
            return Ok(());
        };
        if let (Some(secret), Some(given)) =
            (&self.cluster_secret, headers.get(CLUSTER_SECRET_HEADER))
        {
            return if constant_time_eq(given.as_bytes(), secret.as_bytes()) {
                Ok(())
            } else {
                Err(Denied::Unauthenticated("wrong cluster secret".into()))
            };
        }
        let token = match headers.get(http::header::AUTHORIZATION) {
            None => None,
            Some(value) => Some(
                value
                    .to_str()
                    .ok()
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .ok_or_else(|| {
                        Denied::Unauthenticated("authorization must be `Bearer <token>`".into())
                    })?
                    .trim(),
            ),
        };
        authorize(tokens, token, needed, path)
    }
}

/// The usage text of the flags [`access_from`] reads.
pub const ACCESS_USAGE: &str =
    "[--tokens-file F] (or DYNSEG_TOKENS) [--cluster-secret-file F] (or DYNSEG_CLUSTER_SECRET)";

/// The cluster secret from `file`, else `DYNSEG_CLUSTER_SECRET`; checked.
pub fn cluster_secret_from(file: Option<&str>) -> Result<Option<String>, String> {
    let secret = match file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("--cluster-secret-file {path}: {e}"))?
                .trim()
                .to_owned(),
        ),
        None => std::env::var("DYNSEG_CLUSTER_SECRET").ok(),
    };
    if let Some(secret) = &secret
        && (secret.len() < 16 || !secret.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err("the cluster secret must be at least 16 printable ASCII characters".into());
    }
    Ok(secret)
}

/// A process's access policy from its flags: tokens from `tokens_file`, else
/// `DYNSEG_TOKENS`; the cluster secret as [`cluster_secret_from`]. Tokens
/// without a cluster secret are refused: members could not call each other.
pub fn access_from(tokens_file: Option<&str>, secret_file: Option<&str>) -> Result<Access, String> {
    let tokens = match tokens_file {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("--tokens-file {path}: {e}"))?;
            Some(TokenStore::parse(&text).map_err(|e| format!("--tokens-file {path}: {e}"))?)
        }
        None => match std::env::var("DYNSEG_TOKENS") {
            Ok(text) if !text.trim().is_empty() => {
                Some(TokenStore::parse(&text).map_err(|e| format!("DYNSEG_TOKENS: {e}"))?)
            }
            _ => None,
        },
    };
    let secret = cluster_secret_from(secret_file)?;
    if tokens.is_some() && secret.is_none() {
        return Err(
            "with tokens, cluster members need a cluster secret to call each other: \
             --cluster-secret-file F or DYNSEG_CLUSTER_SECRET"
                .into(),
        );
    }
    Ok(Access::new(tokens, secret))
}

/// Checks `token` against `tokens` for `needed`.
pub fn authorize(
    tokens: &TokenStore,
    token: Option<&str>,
    needed: Role,
    what: &str,
) -> Result<(), Denied> {
    let token = token.ok_or_else(|| {
        Denied::Unauthenticated(format!(
            "{what} needs a token with the {} role",
            needed.as_str()
        ))
    })?;
    let principal = tokens
        .find(token)
        .ok_or_else(|| Denied::Unauthenticated("unknown token".into()))?;
    if principal.roles.contains(&needed) {
        Ok(())
    } else {
        Err(Denied::PermissionDenied(format!(
            "{what} needs the {} role; token {:?} has {}",
            needed.as_str(),
            principal.name,
            principal
                .roles
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

/// Compares without an early exit, so timing does not tell how much matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A tower layer that checks every call against an [`Access`] before any
/// service sees it: refused calls change nothing.
#[derive(Clone, Debug)]
pub struct AccessLayer(Access);

impl AccessLayer {
    /// Enforces `access`.
    pub fn new(access: Access) -> AccessLayer {
        AccessLayer(access)
    }
}

impl<S> tower_layer::Layer<S> for AccessLayer {
    type Service = AccessService<S>;

    fn layer(&self, inner: S) -> AccessService<S> {
        AccessService {
            access: self.0.clone(),
            inner,
        }
    }
}

/// See [`AccessLayer`].
#[derive(Clone, Debug)]
pub struct AccessService<S> {
    access: Access,
    inner: S,
}

impl<S, B, R> tower_service::Service<http::Request<B>> for AccessService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match self.access.check(request.uri().path(), request.headers()) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(denied) => {
                let response = Status::from(denied).into_http();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

/// What a client presents: a member's cluster secret, or a user's token.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    cluster_secret: Option<MetadataValue<Ascii>>,
    bearer: Option<MetadataValue<Ascii>>,
    tls: Option<ClientTlsConfig>,
}

impl Credentials {
    /// Nothing (an open cluster).
    pub fn none() -> Credentials {
        Credentials::default()
    }

    /// A member's: the cluster secret, if the cluster has one.
    pub fn member(access: &Access) -> Credentials {
        Credentials {
            cluster_secret: access.cluster_secret().and_then(|s| s.parse().ok()),
            bearer: None,
            tls: access.tls().map(Tls::client),
        }
    }

    /// The same, over TLS as `tls` says.
    pub fn with_tls(mut self, tls: ClientTlsConfig) -> Credentials {
        self.tls = Some(tls);
        self
    }

    /// The TLS to connect with, if any.
    pub fn tls(&self) -> Option<&ClientTlsConfig> {
        self.tls.as_ref()
    }

    /// A user's token (`Bearer`). A token that cannot be a header is an error.
    pub fn token(token: &str) -> Result<Credentials, String> {
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| "a token must be printable ASCII".to_owned())?;
        Ok(Credentials {
            cluster_secret: None,
            bearer: Some(bearer),
            tls: None,
        })
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(secret) = &self.cluster_secret {
            request
                .metadata_mut()
                .insert(CLUSTER_SECRET_HEADER, secret.clone());
        }
        if let Some(bearer) = &self.bearer {
            request
                .metadata_mut()
                .insert("authorization", bearer.clone());
        }
        // Every dynseg client goes through here: the call joins the caller's trace.
        dynseg_telemetry::traces::inject(request.metadata_mut());
        Ok(request)
    }
}

/// A channel that presents credentials on every call: what every dynseg
/// client is built on.
pub type Conn = InterceptedService<Channel, Credentials>;

/// `channel` presenting `credentials`.
pub fn with_credentials(channel: Channel, credentials: Credentials) -> Conn {
    InterceptedService::new(channel, credentials)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn store() -> TokenStore {
        let text = format!(
            "# ops tokens\nbackend ingest,read {}\nops admin {} # the on-call\n",
            token_hash("t-backend"),
            token_hash("t-ops")
        );
        TokenStore::parse(&text).unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (http::HeaderName::from_static(k), v.parse().unwrap()))
            .collect()
    }

    #[test]
    fn token_files_hold_hashes_and_say_what_is_wrong() {
        let store = store();
        assert_eq!(store.find("t-backend").unwrap().name, "backend");
        assert!(store.find("sha256:anything").is_none());
        for (text, needle) in [
            ("a ingest", "expected NAME ROLE"),
            ("a root sha256:00", "unknown role \"root\""),
            ("a read sha256:00", "64 hex digits"),
            (
                &format!("a read {h};b admin {h}", h = token_hash("x")),
                "entry 2: the same token",
            ),
        ] {
            let err = TokenStore::parse(text).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
        assert!(
            token_hash("abc")
                .ends_with("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
    }

    #[test]
    fn calls_need_the_role_of_their_method() {
        let access = Access::new(Some(store()), Some("s".repeat(16)));
        let ingest = "/dynseg.v1.Gateway/Ingest";
        let bearer = |t: &str| format!("Bearer {t}");
        assert_eq!(
            access.check(ingest, &headers(&[("authorization", &bearer("t-backend"))])),
            Ok(())
        );
        assert!(matches!(
            access.check(ingest, &headers(&[])),
            Err(Denied::Unauthenticated(m)) if m.contains("ingest role")
        ));
        assert!(matches!(
            access.check(ingest, &headers(&[("authorization", &bearer("nope"))])),
            Err(Denied::Unauthenticated(_))
        ));
        assert!(matches!(
            access.check(ingest, &headers(&[("authorization", "Basic abc")])),
            Err(Denied::Unauthenticated(_))
        ));
        assert!(matches!(
            access.check(ingest, &headers(&[("authorization", &bearer("t-ops"))])),
            Err(Denied::PermissionDenied(m)) if m.contains("\"ops\" has admin")
        ));
        // Member calls: the cluster secret, right or wrong.
        let node = "/dynseg.v1.Node/Ingest";
        assert!(matches!(
            access.check(node, &headers(&[("authorization", &bearer("t-backend"))])),
            Err(Denied::PermissionDenied(_))
        ));
        assert_eq!(
            access.check(node, &headers(&[(CLUSTER_SECRET_HEADER, &"s".repeat(16))])),
            Ok(())
        );
        assert!(
            access
                .check(node, &headers(&[(CLUSTER_SECRET_HEADER, "guess")]))
                .is_err()
        );
        // Probes need nothing; an open server checks nothing.
        assert_eq!(
            access.check("/grpc.health.v1.Health/Check", &headers(&[])),
            Ok(())
        );
        assert_eq!(Access::open().check(node, &headers(&[])), Ok(()));
    }

    #[test]
    fn every_method_of_the_client_facing_services_has_a_deliberate_role() {
        use Role::*;
        for (path, role) in [
            ("/dynseg.v1.Gateway/Track", Ingest),
            ("/dynseg.v1.Gateway/Subscribe", Read),
            ("/dynseg.v1.Gateway/AdvanceClock", Admin),
            ("/dynseg.v1.Control/ListSegments", Read),
            ("/dynseg.v1.Control/ApplySegments", Admin),
            ("/dynseg.v1.Control/Heartbeat", Cluster),
            ("/dynseg.v1.RaftPeer/Send", Cluster),
            ("/dynseg.v1.Gateway/SomethingNew", Cluster),
        ] {
            assert_eq!(required_role(path), Some(role), "{path}");
        }
    }
}
