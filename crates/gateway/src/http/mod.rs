//! The gateway's HTTP API: Segment's tracking API (`/v1/track`, `/v1/identify`,
//! `/v1/alias`, `/v1/page`, `/v1/screen`, `/v1/group`, `/v1/batch`), so
//! Segment's and RudderStack's client libraries send to dynseg unchanged, and
//! `/healthz`. Handlers are thin: read the request ([`request`]), convert each
//! message ([`message`]), hand the events to the same [`Ingestor`] as gRPC.
//!
//! Answers: 200 `{"success": true, "accepted", "duplicates", "rejected"}` when
//! any event was taken (bad ones are listed by index with a reason); otherwise
//! an error body `{"success": false, "code", "message"}` (what Segment's clients
//! read), with `Retry-After` on 429 and 503.

pub mod message;
pub mod request;

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use dynseg_proto::auth::{Access, Role, TokenStore, authorize};
use dynseg_proto::pb;
use serde_json::value::RawValue;
use serde_json::{Value as Json, json};
use tokio::sync::{Semaphore, watch};

use crate::error::{GatewayError, HttpError};
use crate::ingest::Ingestor;
use crate::routing::Routing;
use message::{Call, Envelope};

/// Limits and credentials of the HTTP API.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Request body bytes at most, after gzip is undone (Segment: 500 KB).
    pub max_body_bytes: usize,
    /// Bytes of one message at most (Segment: 32 KB).
    pub max_message_bytes: usize,
    /// Levels of nested objects in properties and traits at most.
    pub max_depth: usize,
    /// Requests being ingested at once at most; more get 429.
    pub max_inflight: usize,
    /// Write keys accepted besides the tokens with the `ingest` role; with
    /// neither, any key or none is accepted (dev).
    pub write_keys: BTreeSet<String>,
}

impl Default for HttpConfig {
    fn default() -> HttpConfig {
        HttpConfig {
            max_body_bytes: 512 * 1024,
            max_message_bytes: 32 * 1024,
            max_depth: 4,
            max_inflight: 256,
            write_keys: BTreeSet::new(),
        }
    }
}

#[derive(Clone)]
struct Api {
    /// Tokens and write keys that may send, when sending needs a key.
    keys: Option<Arc<TokenStore>>,
    ingestor: Ingestor,
    routing: watch::Receiver<Arc<Routing>>,
    config: Arc<HttpConfig>,
    inflight: Arc<Semaphore>,
}

/// The HTTP API's routes: write keys are `config`'s and the tokens of
/// `access` (those with the `ingest` role may send).
pub fn router(
    ingestor: Ingestor,
    routing: watch::Receiver<Arc<Routing>>,
    config: HttpConfig,
    access: &Access,
) -> Router {
    let mut keys = access.tokens().cloned().unwrap_or_default();
    for key in &config.write_keys {
        keys.add("write key", key, &[Role::Ingest]);
    }
    let enforced = access.is_enforced() || !keys.is_empty();
    let api = Api {
        keys: enforced.then(|| Arc::new(keys)),
        ingestor,
        routing,
        inflight: Arc::new(Semaphore::new(config.max_inflight.max(1))),
        config: Arc::new(config.clone()),
    };
    let mut routes = Router::new()
        .route("/healthz", get(health))
        .merge(dynseg_telemetry::metrics::router());
    // Segment's names, and the one-letter forms analytics.js uses.
    for (paths, call) in [
        (["/v1/track", "/v1/t"], Some(Call::Track)),
        (["/v1/identify", "/v1/i"], Some(Call::Identify)),
        (["/v1/alias", "/v1/a"], Some(Call::Alias)),
        (["/v1/page", "/v1/p"], Some(Call::Page)),
        (["/v1/screen", "/v1/s"], Some(Call::Screen)),
        (["/v1/group", "/v1/g"], Some(Call::Group)),
        (["/v1/batch", "/v1/b"], None),
    ] {
        for path in paths {
            routes = routes.route(
                path,
                post(
                    move |State(api): State<Api>,
                          headers: HeaderMap,
                          body: Result<Bytes, BytesRejection>| async move {
                        answer(receive(&api, &headers, body, call).await)
                    },
                ),
            );
        }
    }
    // Compressed bodies are bounded here, decompressed ones in `request::body`.
    routes
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .with_state(api)
}

async fn health(State(api): State<Api>) -> Response {
    if api.routing.borrow().is_complete() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for shard placement\n",
        )
            .into_response()
    }
}

/// One request's work, from bytes to the merged ingest reply.
async fn receive(
    api: &Api,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    call: Option<Call>,
) -> Result<pb::IngestReply, GatewayError> {
    let header_key = request::write_key(headers)?;
    if let Some(key) = &header_key {
        api.check_key(Some(key))?;
    }
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            GatewayError::TooLarge(format!(
                "the body is over the {}-byte limit",
                api.config.max_body_bytes
            ))
        } else {
            GatewayError::InvalidArgument(rejection.body_text())
        }
    })?;
    let body = request::body(headers, &body, api.config.max_body_bytes)?;
    let text = std::str::from_utf8(&body)
        .map_err(|e| GatewayError::InvalidArgument(format!("the body is not UTF-8: {e}")))?;
    let batch = Batch::parse(text, call)?;
    if header_key.is_none() {
        api.check_key(batch.write_key.as_deref())?;
    }
    let _permit = api.inflight.clone().try_acquire_owned().map_err(|_| {
        GatewayError::Overloaded(format!(
            "{} requests are being ingested; retry shortly",
            api.config.max_inflight
        ))
    })?;

    let received_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let envelope = Envelope {
        received_ms,
        sent_at: batch.sent_at.as_ref(),
        max_depth: api.config.max_depth,
    };
    let mut events = Vec::with_capacity(batch.messages.len());
    let mut positions = Vec::with_capacity(batch.messages.len());
    let mut rejected = Vec::new();
    for (index, raw) in batch.messages.iter().enumerate() {
        match api.convert(raw, call, &envelope) {
            Ok(event) => {
                positions.push(index as u32);
                events.push(dynseg_proto::encoded::encode(&event));
            }
            Err(reason) => rejected.push(pb::RejectedEvent {
                index: index as u32,
                reason,
            }),
        }
    }
    crate::metrics::record_refused(rejected.len());
    let mut reply = if events.is_empty() {
        pb::IngestReply::default()
    } else {
        api.ingestor.ingest(events).await?
    };
    for r in &mut reply.rejected {
        r.index = positions.get(r.index as usize).copied().unwrap_or(u32::MAX);
    }
    reply.rejected.append(&mut rejected);
    reply.rejected.sort_by_key(|r| r.index);
    Ok(reply)
}

impl Api {
    fn check_key(&self, key: Option<&str>) -> Result<(), GatewayError> {
        let Some(keys) = &self.keys else {
            return Ok(());
        };
        if key.is_none() {
            return Err(GatewayError::Unauthenticated(
                "no write key: send it as the basic-auth user name".into(),
            ));
        }
        Ok(authorize(keys, key, Role::Ingest, "sending events")?)
    }

    fn convert(
        &self,
        raw: &RawValue,
        call: Option<Call>,
        envelope: &Envelope<'_>,
    ) -> Result<pb::Event, String> {
        let text = raw.get();
        if text.len() > self.config.max_message_bytes {
            return Err(format!(
                "the message is {} bytes; the limit is {}",
                text.len(),
                self.config.max_message_bytes
            ));
        }
        let json: Json = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let mut event = message::to_event(&json, call, envelope)?;
        if event.message_id.is_empty() {
            // A resend of the same message is still a duplicate.
            event.message_id = message::derived_id("http", text);
        }
        Ok(event)
    }
}

/// A request's messages: the `batch` array of `/v1/batch`, or the one message
/// of a single call; with the batch's `sentAt` and `writeKey`.
struct Batch<'a> {
    messages: Vec<&'a RawValue>,
    sent_at: Option<Json>,
    write_key: Option<String>,
}

impl<'a> Batch<'a> {
    fn parse(text: &'a str, call: Option<Call>) -> Result<Batch<'a>, GatewayError> {
        let bad = |e: serde_json::Error| {
            GatewayError::InvalidArgument(format!("the body is not a JSON object: {e}"))
        };
        let fields: std::collections::HashMap<String, &'a RawValue> =
            serde_json::from_str(text).map_err(bad)?;
        let write_key = match fields.get("writeKey") {
            Some(raw) => match serde_json::from_str::<Json>(raw.get()).map_err(bad)? {
                Json::String(key) => Some(key),
                _ => None,
            },
            None => None,
        };
        let sent_at = match fields.get("sentAt") {
            Some(raw) => Some(serde_json::from_str::<Json>(raw.get()).map_err(bad)?),
            None => None,
        };
        let messages = match call {
            Some(_) => vec![serde_json::from_str::<&RawValue>(text).map_err(bad)?],
            None => {
                let batch = fields.get("batch").ok_or_else(|| {
                    GatewayError::InvalidArgument("a batch needs a \"batch\" array".into())
                })?;
                serde_json::from_str::<Vec<&'a RawValue>>(batch.get()).map_err(|_| {
                    GatewayError::InvalidArgument("\"batch\" must be an array of messages".into())
                })?
            }
        };
        Ok(Batch {
            messages,
            // A single call's own sentAt is read with the message.
            sent_at: if call.is_none() { sent_at } else { None },
            write_key,
        })
    }
}

/// The HTTP answer for a request's outcome.
fn answer(outcome: Result<pb::IngestReply, GatewayError>) -> Response {
    let response = respond(outcome);
    crate::metrics::record_http(response.status().as_u16());
    response
}

fn respond(outcome: Result<pb::IngestReply, GatewayError>) -> Response {
    let reply = match outcome {
        Ok(reply) => reply,
        Err(e) => return error_response(HttpError::from(e), None),
    };
    let rejected: Vec<Json> = reply
        .rejected
        .iter()
        .map(|r| json!({"index": r.index, "reason": r.reason}))
        .collect();
    if reply.accepted == 0 && reply.duplicates == 0 && !reply.rejected.is_empty() {
        let first = &reply.rejected[0];
        let error = HttpError {
            status: 400,
            code: "invalid_request",
            message: format!(
                "no event was taken; message {}: {}",
                first.index, first.reason
            ),
            retry_after: None,
        };
        return error_response(error, Some(rejected));
    }
    let body = json!({
        "success": true,
        "accepted": reply.accepted,
        "duplicates": reply.duplicates,
        "rejected": rejected,
    });
    (StatusCode::OK, axum_json(&body)).into_response()
}

fn error_response(error: HttpError, rejected: Option<Vec<Json>>) -> Response {
    let mut body = json!({"success": false, "code": error.code, "message": error.message});
    if let Some(rejected) = rejected {
        body["rejected"] = Json::Array(rejected);
    }
    let status = StatusCode::from_u16(error.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, axum_json(&body)).into_response();
    if let Some(seconds) = error.retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"dynseg\""),
        );
    }
    response
}

/// A JSON body with its content type.
fn axum_json(body: &Json) -> ([(header::HeaderName, &'static str); 1], String) {
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}
