//! The HTTP collector: thin axum handlers that extract the request, call the store and
//! map errors (see [`IngestError`]'s `IntoResponse`).

use std::io::Read;
use std::sync::{Arc, OnceLock};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use funnelhouse_schemas::time::now_micros;
use funnelhouse_schemas::{BodyFormat, DecodeContext, Rejection, decode_body};
use serde::{Deserialize, Serialize};

use crate::config::{AuthConfig, IngestConfig};
use crate::error::{IngestError, Result};
use crate::metrics::Metrics;
use crate::store::EventStore;

/// Shared by all handlers. The store is set once the WAL is replayed; until then the
/// ingest endpoints and `/readyz` answer 503.
#[derive(Clone)]
pub struct CollectorState {
    pub store: Arc<OnceLock<Arc<EventStore>>>,
    pub metrics: Arc<Metrics>,
    pub auth: Arc<AuthConfig>,
    pub ingest: Arc<IngestConfig>,
}

impl CollectorState {
    pub fn new(ingest: IngestConfig, auth: AuthConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            store: Arc::new(OnceLock::new()),
            metrics,
            auth: Arc::new(auth),
            ingest: Arc::new(ingest),
        }
    }

    pub fn store(&self) -> Result<&Arc<EventStore>> {
        self.store.get().ok_or(IngestError::NotReady)
    }
}

/// The answer to an ingest request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestResponse {
    pub accepted: usize,
    pub duplicates: usize,
    pub rejected: Vec<Rejection>,
}

pub fn router(state: CollectorState) -> Router {
    Router::new()
        .route("/v1/events", post(post_events))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn post_events(
    State(state): State<CollectorState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<IngestResponse>> {
    check_write_key(&state.auth, &headers)?;
    let store = state.store()?;
    let format = body_format(&headers)?;
    let bytes = read_body(&headers, body, state.ingest.max_request_bytes.0).await?;
    let _admission = store.admit(bytes.len())?;
    let response = ingest(&state, store, &bytes, format).await?;
    Ok(Json(response))
}

/// Decode, validate and store one body. Shared by every ingest endpoint.
pub async fn ingest(
    state: &CollectorState,
    store: &EventStore,
    body: &[u8],
    format: BodyFormat,
) -> Result<IngestResponse> {
    let received_at = now_micros();
    let ctx = DecodeContext {
        received_at,
        skew: 0,
        max_event_bytes: state.ingest.max_event_bytes.0,
        max_future: state.ingest.max_future.map(|d| d.as_micros() as i64),
    };
    let decoded = decode_body(body, format, &ctx)?;
    let outcome = store.write(decoded.events, received_at).await?;
    state.metrics.rejected.fetch_add(
        decoded.rejected.len() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    Ok(IngestResponse {
        accepted: outcome.accepted,
        duplicates: outcome.duplicates,
        rejected: decoded.rejected,
    })
}

async fn readyz(State(state): State<CollectorState>) -> Response {
    match state.store() {
        Ok(_) => (StatusCode::OK, "ready").into_response(),
        Err(e) => e.into_response(),
    }
}

async fn metrics(State(state): State<CollectorState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// Keys are required exactly when `[auth] write_keys` is non-empty; accepted as a Bearer
/// token or as the HTTP Basic user name (Segment's convention, empty password).
pub fn check_write_key(auth: &AuthConfig, headers: &HeaderMap) -> Result<()> {
    if auth.write_keys.is_empty() {
        return Ok(());
    }
    match header_key(headers) {
        Some(key) if auth.write_keys.contains(&key) => Ok(()),
        _ => Err(IngestError::Unauthorized),
    }
}

/// The key of an `Authorization: Bearer` or `Basic` header.
pub fn header_key(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        Some(rest.trim().to_string())
    } else if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        Some(
            text.split_once(':')
                .map_or(text.as_str(), |(user, _)| user)
                .to_string(),
        )
    } else {
        None
    }
}

/// JSON (array, object, envelope) unless the content type says NDJSON.
pub fn body_format(headers: &HeaderMap) -> Result<BodyFormat> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(BodyFormat::Json);
    };
    let mime = value
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        "" | "application/json" | "text/plain" => Ok(BodyFormat::Json),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => {
            Ok(BodyFormat::Ndjson)
        }
        other => Err(IngestError::UnsupportedMediaType(format!(
            "Content-Type {other:?} is not supported: send application/json or application/x-ndjson"
        ))),
    }
}

/// Read the body within `limit` bytes after decompression (`Content-Encoding: gzip`).
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes> {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase())
        .unwrap_or_default();
    let gzip = match encoding.as_str() {
        "" | "identity" => false,
        "gzip" | "x-gzip" => true,
        other => {
            return Err(IngestError::UnsupportedMediaType(format!(
                "Content-Encoding {other:?} is not supported: send gzip or no encoding"
            )));
        }
    };
    // A gzip stream of incompressible data is slightly larger than the data itself.
    let wire_limit = if gzip {
        limit + limit / 8 + 1024
    } else {
        limit
    };
    let too_large = IngestError::TooLarge { limit };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > wire_limit) {
        return Err(too_large);
    }
    let raw = axum::body::to_bytes(body, wire_limit).await.map_err(|e| {
        let source = std::error::Error::source(&e);
        if source.is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            || e.to_string().contains("length limit")
        {
            IngestError::TooLarge { limit }
        } else {
            IngestError::BadRequest(format!("could not read the request body: {e}"))
        }
    })?;
    if !gzip {
        return Ok(raw);
    }
    let mut out = Vec::with_capacity(raw.len() * 4);
    flate2::read::MultiGzDecoder::new(&raw[..])
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| IngestError::BadRequest(format!("body is not valid gzip: {e}")))?;
    if out.len() > limit {
        return Err(too_large);
    }
    Ok(Bytes::from(out))
}
