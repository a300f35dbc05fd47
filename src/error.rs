//! The binary's error type: what a command reports before exiting non-zero.

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("config: {0}")]
    Config(String),
    #[error(transparent)]
    Storage(#[from] funnelhouse_storage::StorageError),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Delivery(String),
    #[error("query: {0}")]
    Query(String),
}
