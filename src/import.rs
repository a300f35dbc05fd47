//! `funnelhouse import FILE...`: read NDJSON, CSV or Parquet and post the events to a
//! running server as NDJSON batches, so they pass the same validation, dedup and WAL.
//! Retries 429/503 after `Retry-After`; exit 0 when nothing was rejected, 1 when some
//! events were, 2 when a file could not be read or the server could not be reached.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, TimeUnit};
use clap::Args;
use funnelhouse_ingest::IngestResponse;
use funnelhouse_schemas::time::format_micros;
use serde_json::{Map, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::error::CliError;

#[derive(Args)]
pub struct ImportArgs {
    /// Files to import: .ndjson/.jsonl/.json (one object per line), .csv, .parquet.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Server to post to [default: http://<http_addr of the config>].
    #[arg(long)]
    server: Option<String>,
    /// Events per request.
    #[arg(long, default_value_t = 2000)]
    batch_size: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Write key, when the server requires one.
    #[arg(long, env = "FUNNELHOUSE_WRITE_KEY")]
    write_key: Option<String>,
}

/// Where an event came from, to point at it in a rejection.
#[derive(Clone)]
struct Origin {
    file: Arc<str>,
    /// 1-based line (NDJSON, CSV) or row (Parquet) number.
    first_line: Vec<usize>,
}

#[derive(Default)]
struct Totals {
    sent: usize,
    accepted: usize,
    duplicates: usize,
    rejected: usize,
    examples: Vec<String>,
}

pub async fn run(args: ImportArgs, cfg: &Config) -> Result<ExitCode, CliError> {
    let server = args
        .server
        .clone()
        .unwrap_or_else(|| format!("http://{}", cfg.http_addr));
    let client = Poster::new(&server, args.write_key.clone())?;
    let started = Instant::now();
    let mut totals = Totals::default();
    let mut progress = Progress::new();
    let limit = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut tasks: JoinSet<Result<(Origin, usize, IngestResponse), CliError>> = JoinSet::new();
    for path in &args.files {
        let batches = read_batches(path, args.batch_size)
            .map_err(|e| CliError::Io(format!("{}: {e}", path.display())))?;
        for batch in batches {
            let (lines, origin) =
                batch.map_err(|e| CliError::Io(format!("{}: {e}", path.display())))?;
            let permit = Arc::clone(&limit)
                .acquire_owned()
                .await
                .expect("semaphore open");
            let client = client.clone();
            tasks.spawn(async move {
                let _permit = permit;
                let n = origin.first_line.len();
                let resp = client.post(lines).await?;
                Ok((origin, n, resp))
            });
            while let Some(done) = tasks.try_join_next() {
                absorb(&mut totals, done)?;
                progress.show(&totals, started);
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        absorb(&mut totals, done)?;
        progress.show(&totals, started);
    }
    progress.finish();
    println!(
        "imported {} events in {:.1}s: accepted {}, duplicates {}, rejected {}",
        totals.sent,
        started.elapsed().as_secs_f64(),
        totals.accepted,
        totals.duplicates,
        totals.rejected
    );
    for e in &totals.examples {
        println!("  rejected {e}");
    }
    if totals.rejected > totals.examples.len() {
        println!("  ... and {} more", totals.rejected - totals.examples.len());
    }
    Ok(if totals.rejected == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn absorb(
    totals: &mut Totals,
    done: Result<Result<(Origin, usize, IngestResponse), CliError>, tokio::task::JoinError>,
) -> Result<(), CliError> {
    let (origin, n, resp) =
        done.map_err(|e| CliError::Delivery(format!("import task failed: {e}")))??;
    totals.sent += n;
    totals.accepted += resp.accepted;
    totals.duplicates += resp.duplicates;
    totals.rejected += resp.rejected_count.max(resp.rejected.len());
    for r in resp.rejected {
        if totals.examples.len() < 20 {
            let line = origin.first_line.get(r.index).copied().unwrap_or(0);
            totals
                .examples
                .push(format!("{}:{line}: {}", origin.file, r.error));
        }
    }
    Ok(())
}

/// Posts NDJSON bodies, retrying what the server asks to be retried.
#[derive(Clone)]
pub struct Poster {
    http: reqwest::Client,
    url: String,
    write_key: Option<String>,
}

impl Poster {
    pub fn new(server: &str, write_key: Option<String>) -> Result<Self, CliError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| CliError::Delivery(format!("http client: {e}")))?;
        Ok(Self {
            http,
            url: format!("{}/v1/events", server.trim_end_matches('/')),
            write_key,
        })
    }

    /// Post one NDJSON body. 429/503 wait for `Retry-After`; connection errors are retried
    /// a few times (safe for events with an event_id: the server deduplicates them).
    pub async fn post(&self, body: String) -> Result<IngestResponse, CliError> {
        let mut failures = 0;
        loop {
            let mut req = self
                .http
                .post(&self.url)
                .header("content-type", "application/x-ndjson")
                .body(body.clone());
            if let Some(k) = &self.write_key {
                req = req.bearer_auth(k);
            }
            match req.send().await {
                Ok(resp) if resp.status().is_success() => {
                    let text = resp
                        .text()
                        .await
                        .map_err(|e| CliError::Delivery(format!("{}: {e}", self.url)))?;
                    return serde_json::from_str(&text).map_err(|e| {
                        CliError::Delivery(format!("{}: unexpected answer {text:?}: {e}", self.url))
                    });
                }
                Ok(resp) if matches!(resp.status().as_u16(), 429 | 503) => {
                    let wait = resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                        .unwrap_or(1);
                    tokio::time::sleep(Duration::from_secs(wait.clamp(1, 60))).await;
                }
                Ok(resp) => {
                    let status = resp.status();
                    let text = resp.text().await.unwrap_or_default();
                    return Err(CliError::Delivery(format!(
                        "{}: HTTP {status}: {text}",
                        self.url
                    )));
                }
                Err(e) if failures < 5 => {
                    failures += 1;
                    tracing::warn!(error = %e, attempt = failures, "post failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200 << failures)).await;
                }
                Err(e) => {
                    return Err(CliError::Delivery(format!(
                        "{}: {e} (is `funnelhouse serve` running there? pass --server URL)",
                        self.url
                    )));
                }
            }
        }
    }
}

/// One NDJSON body and where its lines came from.
type Batch = (String, Origin);
type Batches = Box<dyn Iterator<Item = Result<Batch, String>>>;

fn read_batches(path: &Path, batch_size: usize) -> Result<Batches, String> {
    let file: Arc<str> = path.display().to_string().into();
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let f = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    match ext.as_str() {
        "csv" => Ok(Box::new(chunked(csv_lines(f)?, batch_size, file))),
        "parquet" => Ok(Box::new(chunked(parquet_lines(f)?, batch_size, file))),
        "ndjson" | "jsonl" | "json" | "" => {
            let lines = BufReader::new(f)
                .lines()
                .enumerate()
                .map(|(i, l)| l.map(|l| (i + 1, l)).map_err(|e| e.to_string()))
                .filter(|l| !matches!(l, Ok((_, s)) if s.trim().is_empty()));
            Ok(Box::new(chunked(lines, batch_size, file)))
        }
        other => Err(format!(
            "unknown file type .{other}: use .ndjson, .csv or .parquet"
        )),
    }
}

fn chunked(
    lines: impl Iterator<Item = Result<(usize, String), String>>,
    batch_size: usize,
    file: Arc<str>,
) -> impl Iterator<Item = Result<Batch, String>> {
    let mut lines = lines.peekable();
    std::iter::from_fn(move || {
        lines.peek()?;
        let mut body = String::new();
        let mut first_line = Vec::with_capacity(batch_size);
        for line in lines.by_ref().take(batch_size) {
            match line {
                Ok((n, text)) => {
                    body.push_str(text.trim());
                    body.push('\n');
                    first_line.push(n);
                }
                Err(e) => return Some(Err(e)),
            }
        }
        Some(Ok((
            body,
            Origin {
                file: Arc::clone(&file),
                first_line,
            },
        )))
    })
}

/// CSV with a header naming the stored columns; `properties` holds JSON text, `ts`
/// RFC 3339 or epoch ms; other columns are ignored.
fn csv_lines(f: File) -> Result<impl Iterator<Item = Result<(usize, String), String>>, String> {
    let mut reader = csv::Reader::from_reader(f);
    let headers = reader.headers().map_err(|e| e.to_string())?.clone();
    Ok(reader.into_records().enumerate().map(move |(i, rec)| {
        let rec = rec.map_err(|e| e.to_string())?;
        let mut obj = Map::new();
        for (name, value) in headers.iter().zip(rec.iter()) {
            let v = match name {
                "event_id" | "event" | "user_id" | "campaign" | "channel" => {
                    Value::String(value.to_string())
                }
                "ts" if !value.is_empty()
                    && value.bytes().all(|b| b.is_ascii_digit() || b == b'-') =>
                {
                    value
                        .parse::<i64>()
                        .map(Value::from)
                        .unwrap_or_else(|_| Value::String(value.to_string()))
                }
                "ts" => Value::String(value.to_string()),
                "properties" if value.is_empty() => continue,
                "properties" => {
                    serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()))
                }
                _ => continue,
            };
            if !((name == "event_id" || name == "ts") && value.is_empty()) {
                obj.insert(name.to_string(), v);
            }
        }
        Ok((i + 2, Value::Object(obj).to_string()))
    }))
}

/// Parquet with the stored columns (as Funnelhouse writes them, or from another tool).
fn parquet_lines(f: File) -> Result<impl Iterator<Item = Result<(usize, String), String>>, String> {
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .and_then(|b| b.with_batch_size(8192).build())
        .map_err(|e| e.to_string())?;
    let mut row = 0;
    Ok(reader.flat_map(move |batch| {
        let rows = match batch
            .map_err(|e| e.to_string())
            .and_then(|b| batch_to_json(&b))
        {
            Ok(rows) => rows.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(e) => vec![Err(e)],
        };
        rows.into_iter()
            .map(|r| {
                row += 1;
                r.map(|text| (row, text))
            })
            .collect::<Vec<_>>()
    }))
}

fn batch_to_json(batch: &RecordBatch) -> Result<Vec<String>, String> {
    let schema = batch.schema();
    let mut rows = vec![Map::new(); batch.num_rows()];
    for (field, col) in schema.fields().iter().zip(batch.columns()) {
        let name = field.name().as_str();
        if !matches!(
            name,
            "event_id" | "event" | "user_id" | "campaign" | "channel" | "ts" | "properties"
        ) {
            continue;
        }
        let col =
            arrow::compute::cast(col, &cast_target(col.data_type())).map_err(|e| e.to_string())?;
        for (i, obj) in rows.iter_mut().enumerate() {
            if col.is_null(i) {
                continue;
            }
            let v = match col.data_type() {
                DataType::Timestamp(..) => Value::String(format_micros(
                    col.as_primitive::<arrow::datatypes::TimestampMicrosecondType>()
                        .value(i),
                )),
                _ => {
                    let s = col.as_string::<i32>().value(i);
                    if name == "properties" {
                        serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.to_string()))
                    } else {
                        Value::String(s.to_string())
                    }
                }
            };
            obj.insert(name.to_string(), v);
        }
    }
    Ok(rows
        .into_iter()
        .map(|m| Value::Object(m).to_string())
        .collect())
}

fn cast_target(dt: &DataType) -> DataType {
    match dt {
        DataType::Timestamp(..) => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        _ => DataType::Utf8,
    }
}

/// A progress line on stderr, at most twice a second.
struct Progress {
    last: Instant,
    tty: bool,
}

impl Progress {
    fn new() -> Self {
        use std::io::IsTerminal;
        Self {
            last: Instant::now(),
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn show(&mut self, t: &Totals, started: Instant) {
        if self.last.elapsed() < Duration::from_millis(500) {
            return;
        }
        self.last = Instant::now();
        let rate = t.sent as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let line = format!(
            "sent {} events ({:.0}/s): accepted {}, duplicates {}, rejected {}",
            t.sent, rate, t.accepted, t.duplicates, t.rejected
        );
        if self.tty {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    }

    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}
