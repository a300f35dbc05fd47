//! The `[http]` section of `funnelhouse.toml`: the limits of the HTTP server loop and
//! CORS. Every field documents its default.

use std::time::Duration;

use funnelhouse_schemas::units::de_duration;
use serde::Deserialize;

/// `[http]`: connection limits, and what browsers on other origins may do.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// A request's headers must arrive within this, else the connection is closed.
    /// Default `"10s"`.
    #[serde(deserialize_with = "de_duration")]
    pub header_timeout: Duration,
    /// A request's body must arrive within this, else 408 and the connection closes.
    /// Default `"60s"`.
    #[serde(deserialize_with = "de_duration")]
    pub request_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog. Default 10 000.
    pub max_connections: usize,
    /// Origins whose pages may post to the ingest routes (CORS); `"*"` is any. Default `["*"]`.
    pub cors_origins: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            cors_origins: vec!["*".into()],
        }
    }
}

impl HttpConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.header_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err("http.header_timeout and http.request_timeout must be above 0".into());
        }
        if self.max_connections == 0 {
            return Err("http.max_connections must be at least 1".into());
        }
        for origin in &self.cors_origins {
            if origin != "*" && axum::http::HeaderValue::from_str(origin).is_err() {
                return Err(format!(
                    "http.cors_origins: {origin:?} is not a valid origin"
                ));
            }
        }
        Ok(())
    }
}
