//! Query endpoints: `POST /v1/sql`, `GET|POST /v1/funnel`, `GET|POST /v1/funnel/trend`.
//! Thin handlers: extract, call the engine, map the error.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use funnelhouse_schemas::auth::{contains_secret, header_key};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::alerts::Alerts;
use crate::campaign::{self, CampaignConfig};
use crate::error::{QueryError, Result};
use crate::funnel::{self, FunnelRequest, FunnelSpec};
use crate::output::OutputFormat;
use crate::session::QueryEngine;

/// The engine is set once the store is open; until then queries answer 503.
#[derive(Clone, Default)]
pub struct QueryState {
    pub engine: Arc<OnceLock<QueryEngine>>,
    pub read_tokens: Arc<Vec<String>>,
    /// `[[campaigns]]` of the config.
    pub campaigns: Arc<Vec<CampaignConfig>>,
    /// The latest evaluation of the campaigns' alert rules.
    pub alerts: Option<Arc<Alerts>>,
}

impl QueryState {
    /// With read tokens configured, `token` must be one of them.
    pub(crate) fn authorize(&self, token: Option<&str>) -> Result<()> {
        if self.read_tokens.is_empty()
            || token.is_some_and(|t| contains_secret(&self.read_tokens, t))
        {
            Ok(())
        } else {
            Err(QueryError::Unauthorized)
        }
    }

    fn engine(&self, headers: &HeaderMap) -> Result<&QueryEngine> {
        self.authorize(header_key(headers).as_deref())?;
        self.engine.get().ok_or(QueryError::NotReady)
    }

    fn campaign(&self, name: &str) -> Result<&CampaignConfig> {
        self.campaigns
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| {
                QueryError::NotFound(format!("no campaign named {name:?} in the config"))
            })
    }
}

pub fn router(state: QueryState) -> Router {
    Router::new()
        .route("/v1/sql", post(sql))
        .route("/v1/funnel", get(funnel_get).post(funnel_post))
        .route("/v1/funnel/trend", get(trend_get).post(trend_post))
        .route("/v1/campaigns", get(campaigns))
        .route("/v1/campaigns/{campaign}/funnel", get(campaign_funnel))
        .route("/v1/campaigns/{campaign}/alerts", get(campaign_alerts))
        .merge(crate::dashboard::routes())
        .with_state(state)
}

#[derive(Deserialize)]
struct SqlBody {
    sql: String,
}

async fn sql(
    State(state): State<QueryState>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    let engine = state.engine(&headers)?;
    let format = OutputFormat::negotiate(
        params.get("format").map(String::as_str),
        headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()),
    )?;
    let text = sql_text(&headers, &body)?;
    let result = engine.sql_rendered(&text, format).await?;
    let mut response =
        ([(header::CONTENT_TYPE, format.content_type())], result.body).into_response();
    if result.truncated {
        // CSV and Arrow have no place in the body to say so.
        response.headers_mut().insert(
            "funnelhouse-truncated",
            header::HeaderValue::from_static("true"),
        );
    }
    Ok(response)
}

/// A body that parses as `{"sql": "..."}` is taken as one whatever its Content-Type
/// (`curl -d` says form-urlencoded); otherwise the body is the SQL text itself.
fn sql_text(headers: &HeaderMap, body: &[u8]) -> Result<String> {
    match serde_json::from_slice::<SqlBody>(body) {
        Ok(parsed) => Ok(parsed.sql),
        Err(e)
            if headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|ct| ct.starts_with("application/json")) =>
        {
            Err(QueryError::BadRequest(format!(
                "body: expected {{\"sql\": \"...\"}}: {e}"
            )))
        }
        Err(_) => String::from_utf8(body.to_vec())
            .map_err(|_| QueryError::BadRequest("body: not UTF-8 text".into())),
    }
}

fn spec_from_body(body: &[u8]) -> Result<FunnelSpec> {
    serde_json::from_slice::<FunnelRequest>(body)
        .map_err(|e| QueryError::BadRequest(format!("body: {e}")))?
        .into_spec()
}

async fn funnel_get(
    State(state): State<QueryState>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Json<funnel::FunnelReport>> {
    let engine = state.engine(&headers)?;
    Ok(Json(
        funnel::funnel(engine, &FunnelRequest::from_query(&params)?.into_spec()?).await?,
    ))
}

async fn funnel_post(
    State(state): State<QueryState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<funnel::FunnelReport>> {
    let engine = state.engine(&headers)?;
    Ok(Json(funnel::funnel(engine, &spec_from_body(&body)?).await?))
}

async fn trend_get(
    State(state): State<QueryState>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Json<funnel::TrendReport>> {
    let engine = state.engine(&headers)?;
    Ok(Json(
        funnel::trend(engine, &FunnelRequest::from_query(&params)?.into_spec()?).await?,
    ))
}

async fn trend_post(
    State(state): State<QueryState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<funnel::TrendReport>> {
    let engine = state.engine(&headers)?;
    Ok(Json(funnel::trend(engine, &spec_from_body(&body)?).await?))
}

async fn campaigns(State(state): State<QueryState>, headers: HeaderMap) -> Result<Json<Value>> {
    state.engine(&headers)?;
    let list: Vec<Value> = state
        .campaigns
        .iter()
        .map(CampaignConfig::describe)
        .collect();
    Ok(Json(json!({ "campaigns": list })))
}

async fn campaign_funnel(
    State(state): State<QueryState>,
    Path(name): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Json<Value>> {
    let engine = state.engine(&headers)?;
    let campaign = state.campaign(&name)?;
    funnel::spec::check_params(&params, &["from", "to", "breakdown"])?;
    let param = |k: &str| params.get(k).filter(|v| !v.is_empty()).cloned();
    Ok(Json(
        campaign::campaign_funnel(
            engine,
            campaign,
            param("from"),
            param("to"),
            param("breakdown"),
        )
        .await?,
    ))
}

async fn campaign_alerts(
    State(state): State<QueryState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>> {
    state.engine(&headers)?;
    state.campaign(&name)?;
    let firing = state
        .alerts
        .as_ref()
        .map(|a| a.firing(&name))
        .unwrap_or_default();
    Ok(Json(json!({ "alerts": firing })))
}
