//! The routes a browser opens: scan links (`GET /s/{campaign}/{channel}`, what a QR code
//! points at) and the browser SDK (`GET /sdk.js`). They answer people, so errors are a
//! short page rather than JSON.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use funnelhouse_schemas::event::limits;
use funnelhouse_schemas::time::now_micros;
use funnelhouse_schemas::{Event, EventRef};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

use crate::collector::CollectorState;
use crate::error::IngestError;

/// The browser SDK of the contract, served as it is in the repository.
pub const SDK_JS: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../sdk/funnelhouse.js"
));

/// The cookie (on the collector's origin) that keeps a scanner's anonymous id.
pub const UID_COOKIE: &str = "fh_uid";

/// Characters left as they are in query values and cookies: RFC 3986's unreserved set.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A user agent longer than this is cut (at a character boundary) before it is stored.
const MAX_USER_AGENT: usize = 512;

pub async fn sdk_js() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                "application/javascript; charset=utf-8",
            ),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        SDK_JS,
    )
        .into_response()
}

/// Record a durable `scan` event, then send the scanner on to the campaign's landing
/// page with who they are and where they came from appended (`fh_uid`, `fh_campaign`,
/// `fh_channel`), so the page's SDK continues the same user's funnel.
pub async fn scan_link(
    State(state): State<CollectorState>,
    Path((campaign, channel)): Path<(String, String)>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let Some(landing) = state.landing_pages.get(&campaign) else {
        return page(
            StatusCode::NOT_FOUND,
            "Unknown campaign",
            &format!(
                "There is no campaign named \u{201c}{campaign}\u{201d}. Check the link on the card, or ask the campaign's operator."
            ),
        );
    };
    if channel.len() > limits::CHANNEL_MAX {
        return page(
            StatusCode::BAD_REQUEST,
            "Bad link",
            &format!("channel: must be at most {} bytes", limits::CHANNEL_MAX),
        );
    }
    // An empty or over-long uid (a template printed without its id, a cookie another
    // page wrote) must not cost the scan: such a scanner gets a new id.
    let valid = |uid: &String| !uid.is_empty() && uid.len() <= limits::USER_ID_MAX;
    let user_id = params
        .get("uid")
        .cloned()
        .filter(valid)
        .or_else(|| uid_cookie(&headers).filter(valid))
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    // The answer is built before the write, so a scan is stored only if it can be answered.
    let mut response = match landing {
        Some(url) => {
            let target = landing_url(
                url,
                &[
                    ("fh_uid", user_id.as_str()),
                    ("fh_campaign", campaign.as_str()),
                    ("fh_channel", channel.as_str()),
                ],
            );
            match HeaderValue::from_str(&target) {
                Ok(location) => (StatusCode::FOUND, [(header::LOCATION, location)]).into_response(),
                Err(_) => {
                    return error_page(IngestError::BadRequest(format!(
                        "the campaign's landing_url {url:?} is not a valid URL"
                    )));
                }
            }
        }
        None => page(
            StatusCode::OK,
            "Scan recorded",
            "Thank you! This campaign has no landing page configured (landing_url).",
        ),
    };
    let store = match state.store() {
        Ok(store) => store,
        Err(e) => return error_page(e),
    };
    let received_at = now_micros();
    let event = Event::from(EventRef {
        event_id: &uuid::Uuid::now_v7().to_string(),
        event: "scan",
        user_id: &user_id,
        campaign: &campaign,
        channel: &channel,
        ts: received_at,
        received_at,
        properties: user_agent_properties(&headers).as_deref(),
    });
    if let Err(e) = store.write(vec![event], received_at).await {
        return error_page(e.into());
    }

    let cookie = format!(
        "{UID_COOKIE}={}; Path=/; Max-Age=31536000; SameSite=Lax",
        utf8_percent_encode(&user_id, QUERY_VALUE)
    );
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        headers.insert(header::SET_COOKIE, v);
    }
    // Every scan must reach us: no cached redirect.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `url` with `params` appended to its query, before any `#fragment`.
pub fn landing_url(url: &str, params: &[(&str, &str)]) -> String {
    let (base, fragment) = match url.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (url, None),
    };
    let mut out = base.to_string();
    let mut sep = if base.contains('?') {
        if base.ends_with('?') || base.ends_with('&') {
            ""
        } else {
            "&"
        }
    } else {
        "?"
    };
    for (key, value) in params {
        out.push_str(sep);
        out.push_str(key);
        out.push('=');
        out.extend(utf8_percent_encode(value, QUERY_VALUE));
        sep = "&";
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

fn uid_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == UID_COOKIE).then(|| percent_decode_str(value).decode_utf8_lossy().into_owned())
        })
}

fn user_agent_properties(headers: &HeaderMap) -> Option<String> {
    let ua = headers.get(header::USER_AGENT)?.to_str().ok()?;
    let mut end = ua.len().min(MAX_USER_AGENT);
    while !ua.is_char_boundary(end) {
        end -= 1;
    }
    Some(serde_json::json!({ "user_agent": &ua[..end] }).to_string())
}

fn error_page(e: IngestError) -> Response {
    let status = e.status();
    let mut response = page(status, "Please try again", &e.to_string());
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(1));
    }
    response
}

/// A small readable page for people who followed a link.
fn page(status: StatusCode, title: &str, message: &str) -> Response {
    let body = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{title}</title></head>\
         <body style=\"font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem;color:#222\">\
         <h1 style=\"font-size:1.4rem\">{title}</h1><p>{}</p></body></html>",
        html_escape(message)
    );
    (status, Html(body)).into_response()
}

fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn landing_url_keeps_query_and_fragment() {
        let p = [("fh_uid", "a b"), ("fh_channel", "京东")];
        assert_eq!(
            landing_url("https://x.test/l", &p),
            "https://x.test/l?fh_uid=a%20b&fh_channel=%E4%BA%AC%E4%B8%9C"
        );
        assert_eq!(
            landing_url("https://x.test/l?a=1#top", &p[..1]),
            "https://x.test/l?a=1&fh_uid=a%20b#top"
        );
    }
}
