//! The one error type of the collector, and its mapping to HTTP in one place.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use funnelhouse_schemas::SchemaError;
use funnelhouse_storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    BadBody(#[from] SchemaError),
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or unknown write key: send it as HTTP Basic user, Bearer token or writeKey")]
    Unauthorized,
    #[error("request body is over max_request_bytes ({limit} bytes after decompression)")]
    TooLarge { limit: usize },
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error(
        "the request body did not arrive within http.request_timeout; send it faster or in smaller requests"
    )]
    BodyTimeout,
    #[error("starting up: the WAL is being replayed; retry shortly")]
    NotReady,
    #[error("not ready: {0}")]
    Unhealthy(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

pub type Result<T, E = IngestError> = std::result::Result<T, E>;

impl IngestError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadBody(_) | Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::NotReady | Self::Unhealthy(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Storage(e) => e.status(),
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::NotReady | Self::Unhealthy(_) => Some(1),
            Self::Storage(e) => e.retry_after(),
            _ => None,
        }
    }
}

/// Refusals with Retry-After come by the hundred thousand in a burst (the burst benchmark
/// saw 550,000 in a minute): one warning per 10 s with their count keeps the log readable
/// and keeps hostile load from filling the disk with it.
fn warn_refusal(status: StatusCode, err: &IngestError) {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    static NEXT_WARN_AT: AtomicU64 = AtomicU64::new(0);
    static SINCE_LAST: AtomicU64 = AtomicU64::new(0);
    SINCE_LAST.fetch_add(1, Relaxed);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let next = NEXT_WARN_AT.load(Relaxed);
    if now >= next
        && NEXT_WARN_AT
            .compare_exchange(next, now + 10, Relaxed, Relaxed)
            .is_ok()
    {
        let refused_since_last_warning = SINCE_LAST.swap(0, Relaxed);
        tracing::warn!(
            %status,
            error = %err,
            refused_since_last_warning,
            "refusing requests with Retry-After (this warning repeats at most every 10 s)"
        );
    }
}

/// Every error body is `{"error": "..."}`.
impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let status = self.status();
        let retry = self.retry_after();
        if retry.is_some() {
            warn_refusal(status, &self);
        } else if status.is_server_error() {
            tracing::warn!(%status, error = %self, "request failed");
        }
        let mut resp = (
            status,
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response();
        if let Some(secs) = retry {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
