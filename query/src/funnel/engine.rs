//! The funnel engine behind `/v1/funnel` and `/v1/funnel/trend`.
//!
//! DataFusion scans only the campaign's step events (pruned by campaign, event and ts,
//! projected to the few columns needed) and hash-partitions them by user_id; each
//! partition is then folded independently: events grouped per user, deduplicated by
//! event_id, evaluated with [`chain::evaluate`], and added to per-group counters. The
//! partitions' counters merge into the report.

use std::collections::{BTreeMap, HashMap};

use arrow::array::{Array, AsArray, RecordBatch, StringViewArray};
use arrow::datatypes::TimestampMicrosecondType;
use datafusion::logical_expr::{col, lit};
use datafusion::scalar::ScalarValue;
use funnelhouse_schemas::time::{format_micros, now_micros};
use futures::StreamExt;
use serde::Serialize;
use serde_json::Value;

use super::chain::{self, ChainParams, FunnelEvent};
use super::spec::{Breakdown, FunnelSpec};
use crate::error::{QueryError, Result};
use crate::session::QueryEngine;

const MICROS: i64 = 1_000_000;
/// Most trend buckets one request may ask for.
const MAX_BUCKETS: i64 = 100_000;

/// Per-step numbers of the total or of one group.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepStats {
    pub counts: Vec<u64>,
    pub conversion: Vec<f64>,
    pub step_conversion: Vec<f64>,
    pub pending: Vec<u64>,
    pub median_seconds: Vec<Option<f64>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupStats {
    pub value: String,
    #[serde(flatten)]
    pub stats: StepStats,
}

/// What every funnel answer starts with: the question and the time it reflects.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReportHeader {
    pub campaign: String,
    pub steps: Vec<String>,
    pub window_seconds: i64,
    pub from: Option<String>,
    pub to: Option<String>,
    /// Every event acknowledged before this server time is included.
    pub as_of: String,
}

impl ReportHeader {
    fn new(spec: &FunnelSpec, as_of: i64) -> Self {
        Self {
            campaign: spec.campaign.clone(),
            steps: spec.steps.iter().map(|s| s.event.clone()).collect(),
            window_seconds: spec.window_secs,
            from: spec.from.map(format_micros),
            to: spec.to.map(format_micros),
            as_of: format_micros(as_of),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunnelReport {
    #[serde(flatten)]
    pub header: ReportHeader,
    pub total: StepStats,
    pub breakdown: Option<String>,
    pub groups: Vec<GroupStats>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrendBucket {
    pub start: String,
    pub counts: Vec<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<TrendGroup>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrendGroup {
    pub value: String,
    pub counts: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrendReport {
    #[serde(flatten)]
    pub header: ReportHeader,
    pub interval_seconds: i64,
    pub breakdown: Option<String>,
    pub buckets: Vec<TrendBucket>,
}

/// Counters of one group, before rates are derived.
#[derive(Debug, Clone, Default)]
struct Tally {
    counts: Vec<u64>,
    pending: Vec<u64>,
    /// Per step, the µs from step 1 to it for each user who reached it.
    durations: Vec<Vec<i64>>,
}

impl Tally {
    fn new(k: usize) -> Self {
        Self {
            counts: vec![0; k],
            pending: vec![0; k],
            durations: vec![Vec::new(); k],
        }
    }

    fn add(&mut self, out: &chain::UserOutcome, k: usize) {
        for i in 0..out.level {
            self.counts[i] += 1;
            self.durations[i].push(out.step_ts[i] - out.step_ts[0]);
        }
        if out.open && out.level < k {
            self.pending[out.level] += 1;
        }
    }

    fn merge(&mut self, other: Tally) {
        for (i, d) in other.durations.into_iter().enumerate() {
            self.counts[i] += other.counts[i];
            self.pending[i] += other.pending[i];
            self.durations[i].extend(d);
        }
    }

    fn stats(mut self) -> StepStats {
        let c = &self.counts;
        let rate = |n: u64, d: u64| if d == 0 { 0.0 } else { n as f64 / d as f64 };
        let conversion = c.iter().map(|&n| rate(n, c[0])).collect();
        let step_conversion = (0..c.len())
            .map(|i| if i == 0 { 1.0 } else { rate(c[i], c[i - 1]) })
            .collect();
        let median_seconds = self
            .durations
            .iter_mut()
            .map(|d| {
                if d.is_empty() {
                    return None;
                }
                let mid = (d.len() - 1) / 2;
                let (_, m, _) = d.select_nth_unstable(mid);
                Some(*m as f64 / MICROS as f64)
            })
            .collect();
        StepStats {
            counts: self.counts,
            conversion,
            step_conversion,
            pending: self.pending,
            median_seconds,
        }
    }
}

/// What one partition produced.
struct Partial {
    total: Tally,
    groups: HashMap<String, Tally>,
    /// (bucket start, group value) -> counts
    buckets: HashMap<(i64, String), Vec<u64>>,
}

impl Partial {
    fn new(k: usize) -> Self {
        Self {
            total: Tally::new(k),
            groups: HashMap::new(),
            buckets: HashMap::new(),
        }
    }
}

/// One event row kept for its user.
#[derive(Clone, Copy)]
struct Row {
    ts: i64,
    steps: u64,
    eid_hash: u64,
    /// Into the partition's event_id arena.
    eid: u32,
    /// Into the partition's group values.
    group: u32,
}

/// Folds the rows of one partition (its users are disjoint from other partitions').
struct PartitionFold<'a> {
    spec: &'a FunnelSpec,
    params: ChainParams,
    interval: Option<i64>,
    users: HashMap<String, u32>,
    rows: Vec<Vec<Row>>,
    eids: Vec<u8>,
    eid_ends: Vec<usize>,
    groups: HashMap<String, u32>,
    group_names: Vec<String>,
    /// Step masks by event name for steps without property filters.
    plain: HashMap<&'a str, u64>,
    needs_properties: bool,
}

impl<'a> PartitionFold<'a> {
    fn new(spec: &'a FunnelSpec, params: ChainParams, interval: Option<i64>) -> Self {
        let mut plain: HashMap<&str, u64> = HashMap::new();
        for (i, s) in spec.steps.iter().enumerate() {
            if s.filter.is_empty() {
                *plain.entry(s.event.as_str()).or_default() |= 1 << i;
            }
        }
        let needs_properties = spec.steps.iter().any(|s| !s.filter.is_empty())
            || matches!(spec.breakdown, Some(Breakdown::Property(_)));
        Self {
            spec,
            params,
            interval,
            users: HashMap::new(),
            rows: Vec::new(),
            eids: Vec::new(),
            eid_ends: Vec::new(),
            groups: HashMap::new(),
            group_names: Vec::new(),
            plain,
            needs_properties,
        }
    }

    fn eid(&self, i: u32) -> &[u8] {
        let start = if i == 0 {
            0
        } else {
            self.eid_ends[i as usize - 1]
        };
        &self.eids[start..self.eid_ends[i as usize]]
    }

    fn group_id(&mut self, value: &str) -> u32 {
        if let Some(&g) = self.groups.get(value) {
            return g;
        }
        let g = self.group_names.len() as u32;
        self.group_names.push(value.to_string());
        self.groups.insert(value.to_string(), g);
        g
    }

    /// Batch columns: user_id, event_id, ts, event, [breakdown], [properties].
    fn add_batch(&mut self, b: &RecordBatch) -> Result<()> {
        let users = string_col(b, 0)?;
        let ids = string_col(b, 1)?;
        let ts = b.column(2).as_primitive::<TimestampMicrosecondType>();
        let events = string_col(b, 3)?;
        let mut next = 4;
        let breakdown_col = match &self.spec.breakdown {
            Some(Breakdown::Column(_)) => {
                next += 1;
                Some(string_col(b, 4)?)
            }
            _ => None,
        };
        let props_col = if self.needs_properties {
            Some(string_col(b, next)?)
        } else {
            None
        };
        for r in 0..b.num_rows() {
            let event = events.value(r);
            let mut steps = self.plain.get(event).copied().unwrap_or(0);
            let props: Option<serde_json::Map<String, Value>> = props_col
                .filter(|p| p.is_valid(r))
                .and_then(|p| serde_json::from_str(p.value(r)).ok());
            for (i, s) in self.spec.steps.iter().enumerate() {
                if !s.filter.is_empty()
                    && s.event == event
                    && s.filter
                        .iter()
                        .all(|(k, v)| v.matches(props.as_ref().and_then(|p| p.get(k))))
                {
                    steps |= 1 << i;
                }
            }
            if steps == 0 || ts.is_null(r) {
                continue;
            }
            let group = match (&self.spec.breakdown, breakdown_col) {
                (Some(Breakdown::Column(_)), Some(c)) => self.group_id(c.value(r)),
                (Some(Breakdown::Property(key)), _) => {
                    let v = Breakdown::property_value(props.as_ref().and_then(|p| p.get(key)));
                    self.group_id(&v)
                }
                _ => 0,
            };
            let user = users.value(r);
            let u = match self.users.get(user) {
                Some(&u) => u,
                None => {
                    let u = self.rows.len() as u32;
                    self.users.insert(user.to_string(), u);
                    self.rows.push(Vec::new());
                    u
                }
            };
            let id = ids.value(r).as_bytes();
            self.eids.extend_from_slice(id);
            self.eid_ends.push(self.eids.len());
            let eid = (self.eid_ends.len() - 1) as u32;
            let eid_hash = fnv1a(id);
            self.rows[u as usize].push(Row {
                ts: ts.value(r),
                steps,
                eid_hash,
                eid,
                group,
            });
        }
        Ok(())
    }

    fn finish(mut self) -> Partial {
        let k = self.spec.steps.len();
        let mut partial = Partial::new(k);
        let mut events = Vec::new();
        let all_rows = std::mem::take(&mut self.rows);
        for mut rows in all_rows {
            rows.sort_by(|a, b| {
                a.ts.cmp(&b.ts)
                    .then_with(|| self.eid(a.eid).cmp(self.eid(b.eid)))
            });
            dedup_event_ids(&mut rows, |i| self.eid(i));
            events.clear();
            events.extend(rows.iter().map(|r| FunnelEvent {
                ts: r.ts,
                steps: r.steps,
            }));
            let out = chain::evaluate(&events, &self.params);
            let Some(start) = out.start else { continue };
            let start = rows[start];
            partial.total.add(&out, k);
            let value = if self.spec.breakdown.is_some() {
                self.group_names[start.group as usize].clone()
            } else {
                String::new()
            };
            if let Some(interval) = self.interval {
                let bucket = start.ts - start.ts.rem_euclid(interval);
                let counts = partial
                    .buckets
                    .entry((bucket, value.clone()))
                    .or_insert_with(|| vec![0; k]);
                counts.iter_mut().take(out.level).for_each(|c| *c += 1);
            }
            if self.spec.breakdown.is_some() {
                partial
                    .groups
                    .entry(value)
                    .or_insert_with(|| Tally::new(k))
                    .add(&out, k);
            }
        }
        partial
    }
}

/// Keep the first row of each event_id (rows are sorted; duplicates are rare).
fn dedup_event_ids<'e>(rows: &mut Vec<Row>, eid: impl Fn(u32) -> &'e [u8]) {
    if rows.len() < 2 {
        return;
    }
    let mut hashes: Vec<(u64, usize)> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (r.eid_hash, i))
        .collect();
    hashes.sort_unstable();
    let mut drop = Vec::new();
    for w in hashes.windows(2) {
        if w[0].0 == w[1].0 && eid(rows[w[0].1].eid) == eid(rows[w[1].1].eid) {
            drop.push(w[1].1.max(w[0].1));
        }
    }
    if drop.is_empty() {
        return;
    }
    drop.sort_unstable();
    drop.dedup();
    let mut i = 0;
    rows.retain(|_| {
        let keep = drop.binary_search(&i).is_err();
        i += 1;
        keep
    });
}

/// FNV-1a: for short ids; used only to shard users and to find candidate duplicate
/// event_ids (confirmed by their bytes).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Split a batch into one batch per shard by the hash of user_id (column 0).
fn split_by_user(batch: &RecordBatch, shards: usize) -> Result<Vec<RecordBatch>> {
    if shards == 1 {
        return Ok(vec![batch.clone()]);
    }
    let users = string_col(batch, 0)?;
    let mut indices: Vec<Vec<u32>> = vec![Vec::new(); shards];
    for r in 0..batch.num_rows() {
        indices[(fnv1a(users.value(r).as_bytes()) % shards as u64) as usize].push(r as u32);
    }
    indices
        .into_iter()
        .map(|idx| {
            Ok(arrow::compute::take_record_batch(
                batch,
                &arrow::array::UInt32Array::from(idx),
            )?)
        })
        .collect::<std::result::Result<_, arrow::error::ArrowError>>()
        .map_err(|e| QueryError::DataFusion(e.into()))
}

fn string_col(b: &RecordBatch, i: usize) -> Result<&StringViewArray> {
    b.column(i).as_string_view_opt().ok_or_else(|| {
        QueryError::BadRequest(format!(
            "internal: column {i} is {} not Utf8View",
            b.column(i).data_type()
        ))
    })
}

/// Scan, fold per partition, merge.
async fn compute(
    engine: &QueryEngine,
    spec: &FunnelSpec,
    as_of: i64,
    interval: Option<i64>,
) -> Result<Partial> {
    let window = spec.window_secs.saturating_mul(MICROS);
    let ctx = engine.context();
    let names: Vec<_> = {
        let mut n: Vec<&str> = spec.steps.iter().map(|s| s.event.as_str()).collect();
        n.sort_unstable();
        n.dedup();
        n.into_iter().map(lit).collect()
    };
    let ts_lit = |us: i64| {
        lit(ScalarValue::TimestampMicrosecond(
            Some(us),
            Some("UTC".into()),
        ))
    };
    let mut filter = col("campaign")
        .eq(lit(spec.campaign.as_str()))
        .and(col("event").in_list(names, false));
    if let Some(from) = spec.from {
        filter = filter.and(col("ts").gt_eq(ts_lit(from)));
    }
    if let Some(to) = spec.to {
        filter = filter.and(col("ts").lt_eq(ts_lit(to.saturating_add(window))));
    }
    let mut columns = vec![col("user_id"), col("event_id"), col("ts"), col("event")];
    if let Some(Breakdown::Column(c)) = &spec.breakdown {
        columns.push(col(c.as_str()));
    }
    if spec.steps.iter().any(|s| !s.filter.is_empty())
        || matches!(spec.breakdown, Some(Breakdown::Property(_)))
    {
        columns.push(col("properties"));
    }
    let shards = ctx.state().config().target_partitions().max(1);
    let df = ctx.table("events").await?.filter(filter)?.select(columns)?;
    let streams = engine.partitioned_streams(df).await?;
    let params = ChainParams {
        steps: spec.steps.len(),
        window,
        from: spec.from,
        to: spec.to,
        as_of: Some(as_of),
    };
    // Route every row to the shard of its user, so each shard folds whole users.
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..shards)
        .map(|_| tokio::sync::mpsc::channel::<RecordBatch>(4))
        .unzip();
    let routers: Vec<_> = streams
        .into_iter()
        .map(|mut stream| {
            let senders = senders.clone();
            tokio::spawn(async move {
                while let Some(batch) = stream.next().await {
                    for (shard, part) in split_by_user(&batch?, senders.len())?
                        .into_iter()
                        .enumerate()
                    {
                        if part.num_rows() > 0 && senders[shard].send(part).await.is_err() {
                            return Ok(());
                        }
                    }
                }
                Ok::<_, QueryError>(())
            })
        })
        .collect();
    drop(senders);
    let folds = receivers.into_iter().map(|mut rx| {
        let spec = spec.clone();
        tokio::spawn(async move {
            let mut fold = PartitionFold::new(&spec, params, interval);
            while let Some(batch) = rx.recv().await {
                fold.add_batch(&batch)?;
            }
            Ok::<_, QueryError>(fold.finish())
        })
    });
    let folds: Vec<_> = folds.collect();
    for r in routers {
        r.await
            .map_err(|e| QueryError::BadRequest(format!("funnel task failed: {e}")))??;
    }
    let mut merged = Partial::new(spec.steps.len());
    for handle in folds {
        let part = handle
            .await
            .map_err(|e| QueryError::BadRequest(format!("funnel task failed: {e}")))??;
        merged.total.merge(part.total);
        for (value, tally) in part.groups {
            match merged.groups.get_mut(&value) {
                Some(t) => t.merge(tally),
                None => {
                    merged.groups.insert(value, tally);
                }
            }
        }
        for (key, counts) in part.buckets {
            let e = merged
                .buckets
                .entry(key)
                .or_insert_with(|| vec![0; spec.steps.len()]);
            e.iter_mut().zip(counts).for_each(|(a, b)| *a += b);
        }
    }
    Ok(merged)
}

/// The funnel report of the contract.
pub async fn funnel(engine: &QueryEngine, spec: &FunnelSpec) -> Result<FunnelReport> {
    let as_of = now_micros();
    let partial = engine
        .with_timeout(compute(engine, spec, as_of, None))
        .await?;
    let mut groups: Vec<GroupStats> = partial
        .groups
        .into_iter()
        .map(|(value, t)| GroupStats {
            value,
            stats: t.stats(),
        })
        .collect();
    groups.sort_by(|a, b| {
        b.stats.counts[0]
            .cmp(&a.stats.counts[0])
            .then_with(|| a.value.cmp(&b.value))
    });
    Ok(FunnelReport {
        header: ReportHeader::new(spec, as_of),
        total: partial.total.stats(),
        breakdown: spec.breakdown.as_ref().map(Breakdown::name),
        groups,
    })
}

/// Counts per time bucket of the attributing first step.
pub async fn trend(engine: &QueryEngine, spec: &FunnelSpec) -> Result<TrendReport> {
    let as_of = now_micros();
    let interval_secs = spec.interval_secs.unwrap_or(3600);
    let interval = interval_secs.saturating_mul(MICROS);
    let partial = engine
        .with_timeout(compute(engine, spec, as_of, Some(interval)))
        .await?;
    let k = spec.steps.len();
    let align = |t: i64| t - t.rem_euclid(interval);
    let starts: Vec<i64> = partial.buckets.keys().map(|(b, _)| *b).collect();
    let first = spec
        .from
        .map(align)
        .or_else(|| starts.iter().copied().min());
    let last = match spec.to {
        Some(to) => Some(align(to - 1)),
        None => starts.iter().copied().max(),
    };
    let mut by_bucket: BTreeMap<i64, Vec<(String, Vec<u64>)>> = BTreeMap::new();
    for ((b, value), counts) in partial.buckets {
        by_bucket.entry(b).or_default().push((value, counts));
    }
    let mut buckets = Vec::new();
    if let (Some(first), Some(last)) = (first, last) {
        if (last - first) / interval > MAX_BUCKETS {
            return Err(QueryError::BadRequest(format!(
                "interval: more than {MAX_BUCKETS} buckets; use a wider interval"
            )));
        }
        let mut b = first;
        while b <= last {
            let mut entries = by_bucket.remove(&b).unwrap_or_default();
            let mut counts = vec![0; k];
            for (_, c) in &entries {
                counts.iter_mut().zip(c).for_each(|(a, x)| *a += x);
            }
            let groups = spec.breakdown.as_ref().map(|_| {
                entries.sort_by(|a, b| b.1[0].cmp(&a.1[0]).then_with(|| a.0.cmp(&b.0)));
                entries
                    .drain(..)
                    .map(|(value, counts)| TrendGroup { value, counts })
                    .collect()
            });
            buckets.push(TrendBucket {
                start: format_micros(b),
                counts,
                groups,
            });
            b += interval;
        }
    }
    Ok(TrendReport {
        header: ReportHeader::new(spec, as_of),
        interval_seconds: interval_secs,
        breakdown: spec.breakdown.as_ref().map(Breakdown::name),
        buckets,
    })
}
