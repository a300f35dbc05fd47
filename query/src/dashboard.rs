//! The live dashboard at `/`: one page and its scripts, embedded in the binary (ECharts
//! is vendored under `web/vendor/` with its licence), so it works without network access.
//! The page polls the campaign endpoints; with read tokens it passes `?token=` on as a
//! Bearer token, since a browser opening a URL cannot send one itself.

use std::collections::HashMap;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use funnelhouse_schemas::auth::header_key;

use crate::error::Result;
use crate::http::QueryState;

const PAGE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../web/dashboard.html"
));
const SCRIPT: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../web/dashboard.js"));
const ECHARTS: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../web/vendor/echarts.min.js"
));

pub fn routes() -> Router<QueryState> {
    Router::new()
        .route("/", get(page))
        .route(
            "/assets/dashboard.js",
            get(|| async { script(SCRIPT, "no-cache") }),
        )
        .route(
            "/assets/echarts.min.js",
            get(|| async { script(ECHARTS, "public, max-age=86400") }),
        )
}

async fn page(
    State(state): State<QueryState>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response> {
    let token = params
        .get("token")
        .cloned()
        .or_else(|| header_key(&headers));
    state.authorize(token.as_deref())?;
    Ok(Html(PAGE).into_response())
}

fn script(body: &'static str, cache: &'static str) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                "application/javascript; charset=utf-8",
            ),
            (header::CACHE_CONTROL, cache),
        ],
        body,
    )
        .into_response()
}
