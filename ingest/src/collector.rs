//! The HTTP collector: thin axum handlers that extract the request, call the store and
//! map errors (see [`IngestError`]'s `IntoResponse`). Three ways in share one path
//! (decode -> [`EventStore::write`] -> answer): the native `/v1/events`, the
//! Segment-compatible routes, and scan links (see [`crate::scan`]).

use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Json, Router};
use funnelhouse_schemas::time::now_micros;
use funnelhouse_schemas::{
    BodyFormat, DecodeContext, DecodedBatch, MessageType, Rejection, decode_body, decode_segment,
};
use serde::{Deserialize, Serialize};
use tower_http::cors::{AllowOrigin, CorsLayer};

use funnelhouse_schemas::auth::{AuthConfig, header_key};
use funnelhouse_storage::{EventStore, Exposition, IngestConfig, MetricsSource};

use crate::config::HttpConfig;
use crate::error::{IngestError, Result};
use crate::metrics::CollectorMetrics;

/// Shared by all handlers. The store is set once the WAL is replayed; until then the
/// ingest endpoints and `/readyz` answer 503.
#[derive(Clone)]
pub struct CollectorState {
    pub store: Arc<OnceLock<Arc<EventStore>>>,
    pub metrics: Arc<CollectorMetrics>,
    /// The rest of what `/metrics` shows (the store's, the query engine's).
    pub exported_metrics: Arc<Vec<Arc<dyn MetricsSource>>>,
    pub auth: Arc<AuthConfig>,
    pub ingest: Arc<IngestConfig>,
    pub http: Arc<HttpConfig>,
    /// Campaigns that scan links may name, with the page a scan redirects to.
    pub landing_pages: Arc<HashMap<String, Option<String>>>,
}

impl CollectorState {
    pub fn new(ingest: IngestConfig, auth: AuthConfig) -> Self {
        Self {
            store: Arc::new(OnceLock::new()),
            metrics: Arc::default(),
            exported_metrics: Arc::default(),
            auth: Arc::new(auth),
            ingest: Arc::new(ingest),
            http: Arc::new(HttpConfig::default()),
            landing_pages: Arc::new(HashMap::new()),
        }
    }

    /// Metrics of other parts that `/metrics` shows after the collector's own.
    pub fn with_exported_metrics(mut self, sources: Vec<Arc<dyn MetricsSource>>) -> Self {
        self.exported_metrics = Arc::new(sources);
        self
    }

    pub fn with_http(mut self, http: HttpConfig) -> Self {
        self.http = Arc::new(http);
        self
    }

    /// Campaign name -> landing URL (none: the scan is recorded and a page says so).
    pub fn with_landing_pages(mut self, pages: HashMap<String, Option<String>>) -> Self {
        self.landing_pages = Arc::new(pages);
        self
    }

    pub fn store(&self) -> Result<&Arc<EventStore>> {
        self.store.get().ok_or(IngestError::NotReady)
    }

    fn decode_context(&self, received_at: i64) -> DecodeContext {
        DecodeContext {
            received_at,
            skew: 0,
            max_event_bytes: self.ingest.max_event_bytes.0,
            max_future: self.ingest.max_future.map(|d| d.as_micros() as i64),
        }
    }
}

/// The answer to an ingest request. `rejected` lists at most [`MAX_LISTED_REJECTIONS`];
/// `rejected_count` counts them all, so an answer stays small whatever the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestResponse {
    pub accepted: usize,
    pub duplicates: usize,
    pub rejected: Vec<Rejection>,
    #[serde(default)]
    pub rejected_count: usize,
}

pub const MAX_LISTED_REJECTIONS: usize = 100;

/// The answer to a Segment request: what Segment's API answers (`success`), which the
/// SDKs check, plus our counts for people reading it.
#[derive(Debug, Serialize)]
pub struct SegmentResponse {
    pub success: bool,
    #[serde(flatten)]
    pub counts: IngestResponse,
}

/// Segment's routes, each with the message type it implies (`None`: a batch).
const SEGMENT_ROUTES: &[(&str, Option<MessageType>)] = &[
    ("/v1/batch", None),
    ("/v1/import", None),
    ("/v1/b", None),
    ("/v1/track", Some(MessageType::Track)),
    ("/v1/t", Some(MessageType::Track)),
    ("/v1/page", Some(MessageType::Page)),
    ("/v1/p", Some(MessageType::Page)),
    ("/v1/screen", Some(MessageType::Screen)),
    ("/v1/s", Some(MessageType::Screen)),
    ("/v1/identify", Some(MessageType::Identify)),
    ("/v1/i", Some(MessageType::Identify)),
    ("/v1/group", Some(MessageType::Group)),
    ("/v1/g", Some(MessageType::Group)),
    ("/v1/alias", Some(MessageType::Alias)),
    ("/v1/a", Some(MessageType::Alias)),
];

/// Unknown routes and methods answer `{"error": ...}` like every other error of the API.
/// A wrong method is rewritten on its way out rather than with axum's
/// `method_not_allowed_fallback`, which would take OPTIONS from the CORS layer of the
/// ingest routes and break browsers' preflights.
pub fn with_json_fallbacks(router: Router) -> Router {
    router
        .fallback(|uri: axum::http::Uri| async move {
            (
                StatusCode::NOT_FOUND,
                Json(serde_json::json!({ "error": format!("no such route: {}", uri.path()) })),
            )
        })
        .layer(axum::middleware::from_fn(json_method_not_allowed))
}

async fn json_method_not_allowed(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    if response.status() != StatusCode::METHOD_NOT_ALLOWED
        || response.headers().contains_key(header::CONTENT_TYPE)
    {
        return response;
    }
    let body = Json(serde_json::json!({ "error": format!("{method} is not allowed on {path}") }));
    let mut json = (StatusCode::METHOD_NOT_ALLOWED, body).into_response();
    if let Some(allow) = response.headers().get(header::ALLOW) {
        json.headers_mut().insert(header::ALLOW, allow.clone());
    }
    json
}

pub fn router(state: CollectorState) -> Router {
    // Routes pages on other origins post to: they answer CORS preflights.
    let mut ingest = Router::new().route("/v1/events", post(post_events));
    for &(path, kind) in SEGMENT_ROUTES {
        let route: MethodRouter<CollectorState> = post(
            move |state: State<CollectorState>, headers: HeaderMap, body: Body| {
                post_segment(state, kind, headers, body)
            },
        );
        ingest = ingest.route(path, route);
    }
    let ingest = ingest.layer(cors_layer(&state.http));
    Router::new()
        .merge(ingest)
        .route("/s/{campaign}/{channel}", get(crate::scan::scan_link))
        .route("/sdk.js", get(crate::scan::sdk_js))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Any origin by default, `[http] cors_origins` narrows it. The SDK sends no
/// credentials, so a wildcard is safe; preflights allow the headers SDKs send.
fn cors_layer(http: &HttpConfig) -> CorsLayer {
    let origin = if http.cors_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            http.cors_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        )
    };
    CorsLayer::new()
        .allow_origin(origin)
        .allow_methods([Method::POST, Method::OPTIONS])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            header::CONTENT_ENCODING,
        ])
        .max_age(std::time::Duration::from_secs(3600))
}

async fn post_events(
    State(state): State<CollectorState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<IngestResponse>> {
    check_write_key(&state.auth, &headers)?;
    let store = state.store()?;
    let format = body_format(&headers)?;
    let (bytes, _admission) = read_admitted(store, &headers, body, &state).await?;
    let received_at = now_micros();
    let decoded = decode_body(&bytes, format, &state.decode_context(received_at))?;
    // The events are copies: the body's memory is not needed while they wait for the WAL.
    drop(bytes);
    Ok(Json(ingest(&state, store, decoded, received_at).await?))
}

async fn post_segment(
    State(state): State<CollectorState>,
    kind: Option<MessageType>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<SegmentResponse>> {
    // The key may also be in the body, so a missing header key is checked after decoding.
    let header_ok = state
        .auth
        .accepts_write_key(header_key(&headers).as_deref());
    let store = state.store()?;
    if body_format(&headers)? != BodyFormat::Json {
        return Err(IngestError::UnsupportedMediaType(
            "Segment routes take JSON (application/json or text/plain)".into(),
        ));
    }
    let (bytes, _admission) = read_admitted(store, &headers, body, &state).await?;
    if !header_ok && !contains(&bytes, b"\"writeKey\"") {
        return Err(IngestError::Unauthorized);
    }
    let received_at = now_micros();
    let segment = decode_segment(&bytes, kind, &state.decode_context(received_at))?;
    if !header_ok && !state.auth.accepts_write_key(segment.write_key.as_deref()) {
        return Err(IngestError::Unauthorized);
    }
    state
        .metrics
        .segment_long_names
        .fetch_add(segment.long_names as u64, Relaxed);
    drop(bytes);
    let counts = ingest(&state, store, segment.decoded, received_at).await?;
    Ok(Json(SegmentResponse {
        success: true,
        counts,
    }))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Store the valid events of a decoded body and count the rejected ones.
pub async fn ingest(
    state: &CollectorState,
    store: &EventStore,
    decoded: DecodedBatch,
    received_at: i64,
) -> Result<IngestResponse> {
    let outcome = store.write(decoded.events, received_at).await?;
    let mut rejected = decoded.rejected;
    let rejected_count = rejected.len();
    state
        .metrics
        .rejected
        .fetch_add(rejected_count as u64, Relaxed);
    rejected.truncate(MAX_LISTED_REJECTIONS);
    Ok(IngestResponse {
        accepted: outcome.accepted,
        duplicates: outcome.duplicates,
        rejected,
        rejected_count,
    })
}

async fn readyz(State(state): State<CollectorState>) -> Response {
    match state.store().map(|s| s.health()) {
        Ok(Ok(())) => (StatusCode::OK, "ready").into_response(),
        Ok(Err(reason)) => IngestError::Unhealthy(reason).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn metrics(State(state): State<CollectorState>) -> Response {
    let mut out = Exposition::default();
    state.metrics.render(&mut out);
    for source in state.exported_metrics.iter() {
        source.render(&mut out);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        out.into_text(),
    )
        .into_response()
}

/// Keys are required exactly when `[auth] write_keys` is non-empty; accepted as a Bearer
/// token or as the HTTP Basic user name (Segment's convention, empty password).
pub fn check_write_key(auth: &AuthConfig, headers: &HeaderMap) -> Result<()> {
    if auth.accepts_write_key(header_key(headers).as_deref()) {
        Ok(())
    } else {
        Err(IngestError::Unauthorized)
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
/// Admit a request by its declared size before reading its body (by the limit when it
/// declares none), so an overloaded server reads and decompresses nothing; then by the
/// size of the body once read and decompressed.
async fn read_admitted(
    store: &EventStore,
    headers: &HeaderMap,
    body: Body,
    state: &CollectorState,
) -> Result<(Bytes, funnelhouse_storage::store::Admission)> {
    let limit = state.ingest.max_request_bytes.0;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .map_or(limit, |n| n.min(limit));
    let mut admission = match store.admit(declared) {
        Ok(admission) => admission,
        Err(refused) => {
            // Answer at once, but read and drop the body the client may still be sending:
            // closing with it unread resets the connection, and the client would see that
            // instead of the 503. Bounded by the wire limit and by request_timeout in all.
            let drain = discard_body(body, wire_limit(limit));
            tokio::spawn(tokio::time::timeout(state.http.request_timeout, drain));
            return Err(refused.into());
        }
    };
    let bytes = read_body(headers, body, limit).await?;
    store.readmit(&mut admission, bytes.len())?;
    Ok((bytes, admission))
}

/// The most bytes a gzip body decompressing to at most `limit` may take on the wire:
/// a gzip stream of incompressible data is slightly larger than the data itself.
fn wire_limit(limit: usize) -> usize {
    limit + limit / 8 + 1024
}

/// Read up to `limit` bytes of `body` and keep none of them.
async fn discard_body(mut body: Body, limit: usize) {
    use http_body_util::BodyExt;
    let mut read = 0;
    while let Some(Ok(frame)) = body.frame().await {
        read += frame.data_ref().map_or(0, |d| d.len());
        if read > limit {
            break;
        }
    }
}

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
    let max_wire = if gzip { wire_limit(limit) } else { limit };
    let too_large = IngestError::TooLarge { limit };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max_wire) {
        return Err(too_large);
    }
    let raw = axum::body::to_bytes(body, max_wire).await.map_err(|e| {
        let mut causes = std::iter::successors(std::error::Error::source(&e), |s| s.source());
        if causes.any(|s| s.is::<tower_http::timeout::TimeoutError>()) {
            IngestError::BodyTimeout
        } else if std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
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
    gunzip_within(&raw, limit).map(Bytes::from)
}

/// Decompress a gzip body (several members allowed), refusing it as soon as it grows
/// past `limit` bytes: a gzip bomb costs at most `limit` bytes of memory.
pub fn gunzip_within(raw: &[u8], limit: usize) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(raw.len().saturating_mul(4).min(limit));
    flate2::read::MultiGzDecoder::new(raw)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| IngestError::BadRequest(format!("body is not valid gzip: {e}")))?;
    if out.len() > limit {
        return Err(IngestError::TooLarge { limit });
    }
    Ok(out)
}
