//! The cluster crate's errors.

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{0}")]
    Config(String),
    #[error("ballista: {0}")]
    Ballista(#[from] ballista_core::error::BallistaError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = ClusterError> = std::result::Result<T, E>;
