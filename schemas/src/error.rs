//! The one error type of this crate.

/// Errors that concern a whole request body rather than one event in it.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The body is not JSON / NDJSON at all (HTTP 400).
    #[error("{0}")]
    BadBody(String),
}
