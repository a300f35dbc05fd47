//! Who may write and who may read: the `[auth]` section, how a key is read from a
//! request's `Authorization` header, and how it is compared. The collector, the query
//! endpoints and the Postgres wire all check keys here.

use base64::Engine;
use serde::Deserialize;

/// `[auth]`: write keys for ingest and read tokens for queries. Empty lists: no auth.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Keys accepted on the ingest endpoints; required exactly when non-empty. Default none.
    pub write_keys: Vec<String>,
    /// Tokens accepted by the query endpoints and the Postgres wire. Default none.
    pub read_tokens: Vec<String>,
    /// Allow a non-loopback `http_addr` with neither keys nor tokens. Default false.
    pub open: bool,
}

impl AuthConfig {
    /// Whether an ingest request with this key (if any) may write.
    pub fn accepts_write_key(&self, key: Option<&str>) -> bool {
        self.write_keys.is_empty() || key.is_some_and(|k| contains_secret(&self.write_keys, k))
    }
}

/// Whether `candidate` is one of `secrets`, in time that does not depend on where the
/// bytes differ (so response timing does not reveal a key byte by byte).
pub fn contains_secret(secrets: &[String], candidate: &str) -> bool {
    secrets.iter().fold(false, |found, secret| {
        found | constant_time_eq(secret.as_bytes(), candidate.as_bytes())
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The key a request carries in its `Authorization` header: a Bearer token, or the user
/// of HTTP Basic (Segment's SDKs send the write key as the Basic user, empty password).
pub fn header_key(headers: &http::HeaderMap) -> Option<String> {
    let value = headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(authorization: &str) -> Option<String> {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, authorization.parse().unwrap());
        header_key(&headers)
    }

    #[test]
    fn keys_come_from_bearer_or_the_basic_user() {
        assert_eq!(key_of("Bearer rt_1 ").as_deref(), Some("rt_1"));
        // "wk_1:" in base64, as Segment's SDKs send it.
        assert_eq!(key_of("Basic d2tfMTo=").as_deref(), Some("wk_1"));
        assert_eq!(key_of("Digest x"), None);
        assert_eq!(header_key(&http::HeaderMap::new()), None);
        let keys = vec!["wk_1".to_string(), "wk_2".to_string()];
        assert!(contains_secret(&keys, "wk_2"));
        assert!(!contains_secret(&keys, "wk_3"));
        assert!(!contains_secret(&keys, "wk_"));
    }
}
