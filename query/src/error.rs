//! The one error type of the query crate, and its mapping to HTTP in one place.

use std::time::Duration;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use datafusion::error::DataFusionError;

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// Planning or execution failed; the message is DataFusion's.
    #[error("{0}")]
    DataFusion(#[from] DataFusionError),
    #[error("read-only: {0} (Funnelhouse SQL answers queries; it does not change data)")]
    ReadOnly(String),
    #[error("the query ran longer than query.timeout ({0:?}) and was cancelled")]
    Timeout(Duration),
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or unknown read token: send it as a Bearer token")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    /// A failure of ours, not of the request (a panicked task, a column of the wrong type).
    #[error("internal error: {0}")]
    Internal(String),
    #[error(transparent)]
    Storage(#[from] funnelhouse_storage::StorageError),
    #[error("starting up: the WAL is being replayed; retry shortly")]
    NotReady,
}

pub type Result<T, E = QueryError> = std::result::Result<T, E>;

/// Arrow errors (IPC spill files, batch building) are reported like DataFusion's own.
impl From<arrow::error::ArrowError> for QueryError {
    fn from(e: arrow::error::ArrowError) -> Self {
        QueryError::DataFusion(e.into())
    }
}

/// Back into DataFusion inside a plan node: its own errors unwrapped, so a memory
/// limit stays `ResourcesExhausted` on the way out.
impl From<QueryError> for DataFusionError {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::DataFusion(e) => e,
            other => DataFusionError::External(Box::new(other)),
        }
    }
}

impl QueryError {
    /// SQLOptions refusals (DDL, DML, COPY, statements) become read-only errors.
    pub fn from_planning(e: DataFusionError) -> Self {
        let msg = e.strip_backtrace();
        if [
            "DDL not supported",
            "DML not supported",
            "Statement not supported",
        ]
        .iter()
        .any(|p| msg.contains(p))
        {
            QueryError::ReadOnly(msg)
        } else {
            QueryError::DataFusion(e)
        }
    }

    /// An error out of a plan of ours: our own errors come back as they were raised
    /// (an internal error stays a 500), DataFusion's as DataFusion's.
    pub fn from_plan(e: DataFusionError) -> Self {
        match e {
            DataFusionError::External(inner) => match inner.downcast::<QueryError>() {
                Ok(ours) => *ours,
                Err(other) => QueryError::DataFusion(DataFusionError::External(other)),
            },
            e => QueryError::DataFusion(e),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::DataFusion(e) if is_memory_limit(e) => StatusCode::SERVICE_UNAVAILABLE,
            Self::DataFusion(_) | Self::ReadOnly(_) | Self::BadRequest(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::NotReady => StatusCode::SERVICE_UNAVAILABLE,
            Self::Storage(e) => e.status(),
        }
    }
}

/// The pool ran out, also when the error was shared by several partitions' streams.
fn is_memory_limit(e: &DataFusionError) -> bool {
    matches!(e.find_root(), DataFusionError::ResourcesExhausted(_))
}

/// Every error body is `{"error": "..."}`.
impl IntoResponse for QueryError {
    fn into_response(self) -> Response {
        let message = match &self {
            Self::DataFusion(e) if is_memory_limit(e) => format!(
                "the query needs more memory than query.memory_limit allows; narrow it or raise the limit ({})",
                e.strip_backtrace()
            ),
            Self::DataFusion(e) => e.strip_backtrace(),
            other => other.to_string(),
        };
        (self.status(), Json(serde_json::json!({ "error": message }))).into_response()
    }
}
