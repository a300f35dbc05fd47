//! `funnelhouse sql "..."` and `funnelhouse funnel ...`: against a running server
//! (`--server URL`) or, without one, the config's data dir read as it is on disk.

use std::collections::BTreeMap;
use std::sync::Arc;

use clap::Args;
use funnelhouse_query::{FunnelRequest, OutputFormat, QueryEngine, QueryOptions, StaticSource};
use serde_json::Value;

use crate::config::Config;
use crate::error::CliError;

#[derive(Args)]
pub struct SqlArgs {
    /// The query (read-only).
    sql: String,
    #[command(flatten)]
    server: ServerArgs,
    /// Print the JSON answer instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct FunnelArgs {
    #[arg(long)]
    campaign: String,
    /// Comma-separated event names, in order.
    #[arg(long)]
    steps: String,
    /// Conversion window: seconds or 30m, 24h, 7d.
    #[arg(long, default_value = "24h")]
    window: String,
    /// First-step time range start (RFC 3339).
    #[arg(long)]
    from: Option<String>,
    /// First-step time range end, exclusive (RFC 3339).
    #[arg(long)]
    to: Option<String>,
    /// channel, campaign, event or properties.KEY
    #[arg(long)]
    breakdown: Option<String>,
    #[command(flatten)]
    server: ServerArgs,
    #[arg(long)]
    json: bool,
    /// Print the funnel's physical plan with each node's metrics after running it on the
    /// data dir (as EXPLAIN ANALYZE does), instead of the report.
    #[arg(long, conflicts_with = "server")]
    explain: bool,
}

/// Where to send a query instead of reading the data dir, and the read token it needs.
#[derive(Args)]
pub struct ServerArgs {
    /// Ask this server (e.g. http://127.0.0.1:8080) instead of reading the data dir.
    #[arg(long)]
    server: Option<String>,
    /// Read token for a server with `[auth] read_tokens`.
    #[arg(long, env = "FUNNELHOUSE_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl ServerArgs {
    /// POST `body` to `path` of the server, when one was given.
    async fn post(&self, path: &str, body: Value) -> Result<Option<Value>, CliError> {
        let Some(server) = &self.server else {
            return Ok(None);
        };
        let url = format!("{}{path}", server.trim_end_matches('/'));
        let mut request = reqwest::Client::new().post(&url).json(&body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let resp = request.send().await.map_err(|e| {
            CliError::Delivery(format!(
                "{url}: {e} (is the server running? check --server)"
            ))
        })?;
        let status = resp.status();
        let json: Value = resp
            .json()
            .await
            .map_err(|e| CliError::Delivery(format!("{url}: {e}")))?;
        if !status.is_success() {
            let error = json["error"].as_str().unwrap_or("query failed");
            return Err(CliError::Query(
                if status == reqwest::StatusCode::UNAUTHORIZED {
                    format!(
                        "the server needs a read token: pass it with --token or FUNNELHOUSE_TOKEN (server: {error})"
                    )
                } else {
                    error.to_string()
                },
            ));
        }
        Ok(Some(json))
    }
}

/// The data dir as it is on disk, with the other nodes' committed files when `[storage]`
/// is set.
async fn offline_engine(cfg: &Config) -> Result<QueryEngine, CliError> {
    let (dir, storage) = (cfg.data_dir.clone(), cfg.storage.clone());
    let (snapshot, shared) = tokio::task::spawn_blocking(move || {
        funnelhouse_storage::shared::read_snapshot(&dir, &storage)
    })
    .await
    .map_err(|e| CliError::Io(format!("reading the data dir panicked: {e}")))??;
    let opts = QueryOptions {
        shared,
        ..crate::serve::query_options(cfg)
    };
    QueryEngine::new(
        Arc::new(StaticSource(snapshot)),
        &cfg.data_dir,
        &opts,
        Arc::default(),
    )
    .map_err(|e| CliError::Query(e.to_string()))
}

pub async fn sql(args: SqlArgs, cfg: &Config) -> Result<(), CliError> {
    let answer = args
        .server
        .post("/v1/sql?format=json", serde_json::json!({"sql": &args.sql}))
        .await?;
    let json = match answer {
        Some(json) => json,
        None => {
            let engine = offline_engine(cfg).await?;
            let result = engine
                .sql_rendered(&args.sql, OutputFormat::Json)
                .await
                .map_err(|e| CliError::Query(e.to_string()))?;
            serde_json::from_slice(&result.body).expect("the JSON writer writes JSON")
        }
    };
    if args.json {
        println!("{json}");
        return Ok(());
    }
    let header: Vec<String> = json["columns"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c["name"].as_str().unwrap_or("").to_string())
        .collect();
    let rows: Vec<Vec<String>> = json["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r.as_array().into_iter().flatten().map(plain).collect())
        .collect();
    print_table(&header, &rows);
    if json["truncated"] == Value::Bool(true) {
        println!(
            "({} rows: truncated at [query] max_result_rows; aggregate or add LIMIT)",
            rows.len()
        );
    } else {
        println!("({} rows)", rows.len());
    }
    Ok(())
}

pub async fn funnel(args: FunnelArgs, cfg: &Config) -> Result<(), CliError> {
    let mut req = serde_json::json!({
        "campaign": args.campaign,
        "steps": args.steps.split(',').map(str::trim).collect::<Vec<_>>(),
        "window": args.window,
    });
    for (k, v) in [
        ("from", &args.from),
        ("to", &args.to),
        ("breakdown", &args.breakdown),
    ] {
        if let Some(v) = v {
            req[k] = Value::String(v.clone());
        }
    }
    let offline_spec = |req| {
        serde_json::from_value::<FunnelRequest>(req)
            .map_err(|e| CliError::Query(e.to_string()))?
            .into_spec()
            .map_err(|e| CliError::Query(e.to_string()))
    };
    if args.explain {
        let engine = offline_engine(cfg).await?;
        let plan = funnelhouse_query::funnel::explain_analyze(&engine, &offline_spec(req)?)
            .await
            .map_err(|e| CliError::Query(e.to_string()))?;
        print!("{plan}");
        return Ok(());
    }
    let report = match args.server.post("/v1/funnel", req.clone()).await? {
        Some(report) => report,
        None => {
            let engine = offline_engine(cfg).await?;
            let report = funnelhouse_query::funnel::funnel(&engine, &offline_spec(req)?)
                .await
                .map_err(|e| CliError::Query(e.to_string()))?;
            serde_json::to_value(report).expect("report serialises")
        }
    };
    if args.json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "campaign {}, window {} s, as of {}",
        plain(&report["campaign"]),
        plain(&report["window_seconds"]),
        plain(&report["as_of"])
    );
    let steps: Vec<String> = report["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(plain)
        .collect();
    let total = &report["total"];
    let header: Vec<String> = [
        "step",
        "users",
        "conversion",
        "step conversion",
        "pending",
        "median",
    ]
    .map(String::from)
    .to_vec();
    let rows: Vec<Vec<String>> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            vec![
                s.clone(),
                plain(&total["counts"][i]),
                percent(&total["conversion"][i]),
                percent(&total["step_conversion"][i]),
                plain(&total["pending"][i]),
                seconds(&total["median_seconds"][i]),
            ]
        })
        .collect();
    print_table(&header, &rows);
    if let Some(groups) = report["groups"].as_array().filter(|g| !g.is_empty()) {
        println!(
            "\nby {} (users per step, step conversion):",
            plain(&report["breakdown"])
        );
        let mut header = vec![plain(&report["breakdown"])];
        header.extend(steps.iter().cloned());
        let rows: Vec<Vec<String>> = groups
            .iter()
            .map(|g| {
                let mut row = vec![plain(&g["value"])];
                row.extend((0..steps.len()).map(|i| {
                    format!(
                        "{} ({})",
                        plain(&g["counts"][i]),
                        percent(&g["step_conversion"][i])
                    )
                }));
                row
            })
            .collect();
        print_table(&header, &rows);
    }
    Ok(())
}

fn plain(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn percent(v: &Value) -> String {
    v.as_f64()
        .map_or("-".into(), |f| format!("{:.1}%", f * 100.0))
}

fn seconds(v: &Value) -> String {
    let Some(s) = v.as_f64() else {
        return "-".into();
    };
    let s = s.round() as i64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, s % 3600 / 60),
    }
}

fn print_table(header: &[String], rows: &[Vec<String>]) {
    let mut widths: BTreeMap<usize, usize> = header
        .iter()
        .enumerate()
        .map(|(i, h)| (i, h.chars().count()))
        .collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            let w = widths.entry(i).or_default();
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[&i]))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    println!("{}", line(header));
    println!(
        "{}",
        widths
            .values()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("-+-")
    );
    for r in rows {
        println!("{}", line(r));
    }
}
