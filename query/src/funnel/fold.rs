//! The per-user fold of the funnel engine, in two phases.
//!
//! Collect: each scan partition turns its batches into compact [`Row`]s (user key, ts,
//! step mask, group id, where its event_id is) and files them into buckets by the top
//! bits of the user key, so all rows of a user land in the same bucket number of every
//! partition. Fold: tasks take disjoint ranges of bucket numbers; a bucket's rows from
//! all partitions are grouped by user ([`UserIndex`]), each user's rows are sorted by
//! (ts, event_id), repeated event_ids are dropped, the user is evaluated with
//! [`Evaluator`] and the outcome is added to the counters of the user's group. Nothing
//! is allocated per user.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::builder::make_view;
use arrow::array::{Array, AsArray, RecordBatch, StringViewArray};
use arrow::datatypes::TimestampMicrosecondType;
use datafusion::execution::memory_pool::MemoryReservation;
use funnelhouse_schemas::MemoryCounter;
use serde_json::Value;
use xxhash_rust::xxh3::{Xxh3DefaultBuilder, xxh3_64, xxh3_128};

use super::chain::{ChainParams, Evaluator, FunnelEvent, UserOutcome};
use super::engine::StepStats;
use super::spec::{Breakdown, FunnelSpec, StepSpec};
use crate::error::{QueryError, Result};

const MICROS: i64 = 1_000_000;

/// Buckets per partition. A bucket of 10M-event data holds a few thousand rows, so its
/// sort runs in L2 cache.
const ROW_BUCKETS: usize = 1024;

/// One event row kept for the fold. A user is identified by a 128-bit hash of user_id
/// (the bet the ingest dedup index makes for event_ids: a collision among a billion
/// ids has odds below 10^-20), so rows need no per-user allocation.
#[derive(Clone, Copy)]
struct Row {
    /// Halves of the user key (u64s keep the row 8-byte aligned: 56 bytes).
    user: [u64; 2],
    ts: i64,
    steps: u64,
    /// Compared before the bytes, which are a cache miss away.
    eid_hash: u64,
    /// Where the event_id is: partition, batch of that partition, row of that batch.
    part: u32,
    batch: u32,
    row: u32,
    /// The partition's group id (see `FoldContext::group_remap`).
    group: u32,
}

/// Counters of one group, before rates are derived.
#[derive(Debug, Clone, Default)]
pub(super) struct Tally {
    counts: Vec<u64>,
    pending: Vec<u64>,
    /// Per step, the µs from step 1 to it for each user who reached it.
    durations: Vec<Vec<i64>>,
}

impl Tally {
    /// Counters for `k` steps; `durations` are kept only when medians are wanted.
    fn new(k: usize, durations: bool) -> Self {
        Self {
            counts: vec![0; k],
            pending: vec![0; k],
            durations: if durations {
                vec![Vec::new(); k]
            } else {
                Vec::new()
            },
        }
    }

    fn add(&mut self, out: &UserOutcome, k: usize) {
        for i in 0..out.level {
            self.counts[i] += 1;
        }
        for (d, ts) in self.durations.iter_mut().zip(&out.step_ts) {
            d.push(ts - out.step_ts[0]);
        }
        if out.open && out.level < k {
            self.pending[out.level] += 1;
        }
    }

    fn merge(&mut self, other: Tally) {
        for (i, (n, p)) in other.counts.into_iter().zip(other.pending).enumerate() {
            self.counts[i] += n;
            self.pending[i] += p;
        }
        for (mine, theirs) in self.durations.iter_mut().zip(other.durations) {
            mine.extend(theirs);
        }
    }

    /// Merge the tallies of one group and derive its numbers.
    fn merged_stats(mut tallies: Vec<Tally>) -> StepStats {
        // Extend the largest: merging copies durations.
        tallies.sort_by_key(|t| std::cmp::Reverse(t.counts.first().copied()));
        let mut it = tallies.into_iter();
        let mut acc = it.next().unwrap_or_default();
        for t in it {
            acc.merge(t);
        }
        acc.stats()
    }

    fn stats(mut self) -> StepStats {
        let mut durations = std::mem::take(&mut self.durations);
        durations.resize_with(self.counts.len(), Vec::new);
        let median_seconds = durations
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
        StepStats::new(self.counts, self.pending, median_seconds)
    }
}

/// The folded numbers: the total, per group value and per (trend bucket, group value).
/// Without a breakdown `groups` is empty and bucket keys hold `""`. Trend requests
/// track no durations, so their medians are null.
pub(super) struct Partial {
    pub total: StepStats,
    pub groups: HashMap<String, StepStats>,
    pub buckets: HashMap<(i64, String), Vec<u64>>,
}

/// Which steps an event row matches and which group it belongs to.
pub(super) struct StepMatcher {
    /// Step masks by event name for steps without property filters (a handful: a
    /// linear scan beats hashing), with the inline view of names up to 12 bytes.
    plain: Vec<(String, Option<u128>, u64)>,
    /// Steps with property filters and their 0-based index.
    filtered: Vec<(usize, StepSpec)>,
    breakdown: Option<Breakdown>,
    needs_properties: bool,
}

impl StepMatcher {
    pub(super) fn new(spec: &FunnelSpec) -> Self {
        let mut plain: Vec<(String, Option<u128>, u64)> = Vec::new();
        for (i, s) in spec.steps.iter().enumerate() {
            if s.filter.is_empty() {
                match plain.iter_mut().find(|(e, _, _)| *e == s.event) {
                    Some((_, _, mask)) => *mask |= 1 << i,
                    None => plain.push((s.event.clone(), inline_key_of(&s.event), 1 << i)),
                }
            }
        }
        let filtered: Vec<_> = spec
            .steps
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.filter.is_empty())
            .map(|(i, s)| (i, s.clone()))
            .collect();
        let needs_properties =
            !filtered.is_empty() || matches!(spec.breakdown, Some(Breakdown::Property(_)));
        Self {
            plain,
            filtered,
            breakdown: spec.breakdown.clone(),
            needs_properties,
        }
    }

    /// Whether the scan must read `properties`.
    pub(super) fn needs_properties(&self) -> bool {
        self.needs_properties
    }

    /// The steps row `r` matches, and its properties when the matcher reads them.
    pub(super) fn row_steps(
        &self,
        events: &StringViewArray,
        props_col: Option<&StringViewArray>,
        r: usize,
    ) -> (u64, Option<serde_json::Map<String, Value>>) {
        let mut steps = self.plain_steps(events, r);
        // Parsed only when a filtered step or a property breakdown can use it: live-buffer
        // rows include every event of the campaign.
        let wanted = matches!(self.breakdown, Some(Breakdown::Property(_)))
            || self
                .filtered
                .iter()
                .any(|(_, s)| s.event == events.value(r));
        let props: Option<serde_json::Map<String, Value>> = props_col
            .filter(|p| wanted && p.is_valid(r))
            .and_then(|p| serde_json::from_str(p.value(r)).ok());
        for (i, s) in &self.filtered {
            if s.event == events.value(r)
                && s.filter
                    .iter()
                    .all(|(k, v)| v.matches(props.as_ref().and_then(|p| p.get(k))))
            {
                steps |= 1 << i;
            }
        }
        (steps, props)
    }

    /// Step mask of an event name without property filters.
    fn plain_steps(&self, events: &StringViewArray, r: usize) -> u64 {
        let found = match inline_key(events.views()[r]) {
            Some(key) => self.plain.iter().find(|(_, k, _)| *k == Some(key)),
            None => {
                let event = events.value(r);
                self.plain.iter().find(|(e, _, _)| e == event)
            }
        };
        found.map_or(0, |(_, _, mask)| *mask)
    }
}

/// The bits of a Utf8View view that hold a string of at most 12 bytes (length and
/// bytes, not the padding), or None for a longer string.
fn inline_key(view: u128) -> Option<u128> {
    let len = view as u32;
    (len <= 12).then(|| {
        if len == 12 {
            view
        } else {
            view & ((1u128 << (32 + 8 * len)) - 1)
        }
    })
}

fn inline_key_of(s: &str) -> Option<u128> {
    inline_key(make_view(s.as_bytes(), 0, 0))
}

/// The rows of one scan partition, bucketed by user key.
pub(super) struct RowCollector {
    matcher: Arc<StepMatcher>,
    part: u32,
    buckets: Vec<Vec<Row>>,
    /// The event_id column of each batch, read only to break ties and confirm repeats.
    event_ids: Vec<StringViewArray>,
    groups: HashMap<String, u32, Xxh3DefaultBuilder>,
    /// Groups of short values by their inline view, found without hashing.
    short_groups: Vec<(u128, u32)>,
    group_names: Vec<String>,
    /// The rows and event_id columns held, in the query memory pool until the fold ends.
    reservation: MemoryReservation,
    /// Counts a buffer shared by several batches' event ids (a Parquet page) once.
    event_id_memory: MemoryCounter,
}

impl RowCollector {
    pub(super) fn new(
        matcher: Arc<StepMatcher>,
        part: usize,
        reservation: MemoryReservation,
    ) -> Self {
        let no_breakdown = matcher.breakdown.is_none();
        let mut collector = Self {
            matcher,
            part: part as u32,
            buckets: vec![Vec::new(); ROW_BUCKETS],
            event_ids: Vec::new(),
            groups: HashMap::default(),
            short_groups: Vec::new(),
            group_names: Vec::new(),
            reservation,
            event_id_memory: MemoryCounter::default(),
        };
        if no_breakdown {
            // Every row is in group 0.
            collector.group_id("");
        }
        collector
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

    fn group_of(&mut self, column: &StringViewArray, r: usize) -> u32 {
        const MAX_SHORT_GROUPS: usize = 64;
        let Some(key) = inline_key(column.views()[r]) else {
            return self.group_id(column.value(r));
        };
        if let Some(&(_, g)) = self.short_groups.iter().find(|(k, _)| *k == key) {
            return g;
        }
        let g = self.group_id(column.value(r));
        if self.short_groups.len() < MAX_SHORT_GROUPS {
            self.short_groups.push((key, g));
        }
        g
    }

    /// Batch columns: user_id, event_id, ts, event, [breakdown column], [properties].
    pub(super) fn add_batch(&mut self, b: &RecordBatch) -> Result<()> {
        let matcher = Arc::clone(&self.matcher);
        let users = string_col(b, 0)?;
        let ids = string_col(b, 1)?;
        let ts = b.column(2).as_primitive::<TimestampMicrosecondType>();
        let events = string_col(b, 3)?;
        let mut next = 4;
        let breakdown_col = match &matcher.breakdown {
            Some(Breakdown::Column(_)) => {
                next += 1;
                Some(string_col(b, 4)?)
            }
            _ => None,
        };
        let props_col = if matcher.needs_properties {
            Some(string_col(b, next)?)
        } else {
            None
        };
        let batch = self.event_ids.len() as u32;
        let mut kept = 0;
        for r in 0..b.num_rows() {
            if ts.is_null(r) {
                continue;
            }
            let (steps, props) = matcher.row_steps(events, props_col, r);
            if steps == 0 {
                continue;
            }
            let group = match (&matcher.breakdown, breakdown_col) {
                (Some(Breakdown::Column(_)), Some(c)) => self.group_of(c, r),
                (Some(Breakdown::Property(key)), _) => {
                    let v = Breakdown::property_value(props.as_ref().and_then(|p| p.get(key)));
                    self.group_id(&v)
                }
                _ => 0,
            };
            let user = xxh3_128(users.value(r).as_bytes());
            self.buckets[(user >> 118) as usize % ROW_BUCKETS].push(Row {
                user: [(user >> 64) as u64, user as u64],
                ts: ts.value(r),
                steps,
                eid_hash: xxh3_64(ids.value(r).as_bytes()),
                part: self.part,
                batch,
                row: r as u32,
                group,
            });
            kept += 1;
        }
        let ids_bytes = self.event_id_memory.add(ids);
        self.reservation
            .try_grow(kept * std::mem::size_of::<Row>() + ids_bytes)?;
        self.event_ids.push(ids.clone());
        Ok(())
    }
}

pub(super) fn string_col(b: &RecordBatch, i: usize) -> Result<&StringViewArray> {
    b.column(i).as_string_view_opt().ok_or_else(|| {
        QueryError::Internal(format!(
            "column {i} is {} not Utf8View",
            b.column(i).data_type()
        ))
    })
}

/// What the fold tasks share, read-only.
struct FoldContext {
    params: ChainParams,
    /// Trend bucket width (µs) for trend requests.
    interval: Option<i64>,
    has_breakdown: bool,
    /// Per partition, per batch: the event_id column.
    event_ids: Vec<Vec<StringViewArray>>,
    /// Per partition: its group id -> the merged group id.
    group_remap: Vec<Vec<u32>>,
}

impl FoldContext {
    fn event_id(&self, r: &Row) -> &[u8] {
        self.event_ids[r.part as usize][r.batch as usize]
            .value(r.row as usize)
            .as_bytes()
    }
}

/// Fold everything the partitions collected into named counters, with `tasks` tasks.
pub(super) async fn fold_all(
    matcher: &StepMatcher,
    collectors: Vec<RowCollector>,
    params: ChainParams,
    interval: Option<i64>,
    tasks: usize,
) -> Result<Partial> {
    let k = params.steps;
    let has_breakdown = matcher.breakdown.is_some();
    // Merge the partitions' group names; every partition's ids map into one space.
    let mut names: Vec<String> = Vec::new();
    let mut ids: HashMap<String, u32> = HashMap::new();
    let mut group_remap = Vec::new();
    let mut event_ids = Vec::new();
    // by_bucket[b][p]: bucket b of partition p.
    let mut by_bucket: Vec<Vec<Vec<Row>>> = (0..ROW_BUCKETS).map(|_| Vec::new()).collect();
    // Released when the fold is done with the rows.
    let mut _held = Vec::with_capacity(collectors.len());
    for c in collectors {
        _held.push(c.reservation);
        let remap = c
            .group_names
            .into_iter()
            .map(|name| {
                *ids.entry(name.clone()).or_insert_with(|| {
                    names.push(name);
                    names.len() as u32 - 1
                })
            })
            .collect();
        group_remap.push(remap);
        event_ids.push(c.event_ids);
        for (b, rows) in c.buckets.into_iter().enumerate() {
            by_bucket[b].push(rows);
        }
    }
    let ctx = Arc::new(FoldContext {
        params,
        interval,
        has_breakdown,
        event_ids,
        group_remap,
    });
    let tasks = tasks.clamp(1, ROW_BUCKETS);
    let per_task = ROW_BUCKETS.div_ceil(tasks);
    let mut handles = Vec::new();
    while !by_bucket.is_empty() {
        let rest = by_bucket.split_off(per_task.min(by_bucket.len()));
        let work = std::mem::replace(&mut by_bucket, rest);
        let ctx = Arc::clone(&ctx);
        let groups = names.len();
        handles.push(tokio::spawn(
            async move { fold_buckets(&ctx, work, groups) },
        ));
    }
    let mut totals = Vec::new();
    let mut per_group: Vec<Vec<Tally>> = vec![Vec::new(); names.len()];
    let mut buckets: HashMap<(i64, u32), Vec<u64>> = HashMap::new();
    for handle in handles {
        let part = handle.await.map_err(task_failed)?;
        totals.push(part.total);
        for (g, tally) in part.groups.into_iter().enumerate() {
            per_group[g].extend(tally);
        }
        for (key, counts) in part.buckets {
            let e = buckets.entry(key).or_insert_with(|| vec![0; k]);
            e.iter_mut().zip(counts).for_each(|(a, b)| *a += b);
        }
    }
    let name = |g: usize| {
        if has_breakdown {
            names[g].clone()
        } else {
            String::new()
        }
    };
    // A median needs its group's durations in one vector: each group (and the total)
    // is merged on its own blocking task.
    let stats = |tallies: Vec<Tally>| tokio::task::spawn_blocking(|| Tally::merged_stats(tallies));
    let total = stats(totals);
    let group_stats: Vec<_> = per_group
        .into_iter()
        .enumerate()
        .filter(|(_, t)| !t.is_empty())
        .map(|(g, t)| (name(g), stats(t)))
        .collect();
    let mut groups = HashMap::new();
    for (value, handle) in group_stats {
        groups.insert(value, handle.await.map_err(task_failed)?);
    }
    Ok(Partial {
        total: total.await.map_err(task_failed)?,
        groups,
        buckets: buckets
            .into_iter()
            .map(|((b, g), counts)| ((b, name(g as usize)), counts))
            .collect(),
    })
}

pub(super) fn task_failed(e: tokio::task::JoinError) -> QueryError {
    QueryError::Internal(format!("funnel task failed: {e}"))
}

/// The counters of one fold task, by merged group id.
struct TaskTally {
    total: Tally,
    groups: Vec<Option<Tally>>,
    buckets: HashMap<(i64, u32), Vec<u64>>,
}

fn fold_buckets(ctx: &FoldContext, work: Vec<Vec<Vec<Row>>>, groups: usize) -> TaskTally {
    let p = &ctx.params;
    let k = p.steps;
    let durations = ctx.interval.is_none();
    let mut out = TaskTally {
        total: Tally::new(k, durations),
        groups: vec![None; groups],
        buckets: HashMap::new(),
    };
    let mut evaluator = Evaluator::default();
    let mut rows: Vec<Row> = Vec::new();
    let mut index = UserIndex::default();
    let mut user_rows: Vec<Row> = Vec::new();
    let mut events: Vec<FunnelEvent> = Vec::new();
    for parts in work {
        rows.clear();
        for part in parts {
            rows.extend_from_slice(&part);
        }
        index.build(&rows);
        for first in index.users() {
            user_rows.clear();
            user_rows.extend(index.rows_of(first).map(|i| rows[i]));
            user_rows.sort_unstable_by(|a, b| {
                a.ts.cmp(&b.ts)
                    .then_with(|| ctx.event_id(a).cmp(ctx.event_id(b)))
            });
            dedup_event_ids(&mut user_rows, |r| ctx.event_id(r));
            events.clear();
            events.extend(user_rows.iter().map(|r| FunnelEvent {
                ts: r.ts,
                steps: r.steps,
            }));
            let outcome = evaluator.evaluate(&events, p);
            let Some(start) = outcome.start else { continue };
            let start = user_rows[start];
            let group = ctx.group_remap[start.part as usize][start.group as usize];
            out.total.add(outcome, k);
            if let Some(interval) = ctx.interval {
                let bucket = start.ts - start.ts.rem_euclid(interval);
                let counts = out
                    .buckets
                    .entry((bucket, group))
                    .or_insert_with(|| vec![0; k]);
                counts.iter_mut().take(outcome.level).for_each(|c| *c += 1);
            }
            if ctx.has_breakdown {
                out.groups[group as usize]
                    .get_or_insert_with(|| Tally::new(k, durations))
                    .add(outcome, k);
            }
        }
    }
    out
}

/// The rows of each user of one bucket, found through an open-addressing table of
/// per-user chains. This is linear in the rows where sorting the bucket was not, and
/// only a user's few rows get sorted.
#[derive(Default)]
struct UserIndex {
    /// Slot -> the user's last row, or NONE.
    slots: Vec<u32>,
    /// Row -> the same user's previous row, or NONE.
    next: Vec<u32>,
    /// The slots in use.
    used: Vec<u32>,
}

impl UserIndex {
    const NONE: u32 = u32::MAX;

    fn build(&mut self, rows: &[Row]) {
        let capacity = (rows.len() * 2).next_power_of_two().max(16);
        let mask = capacity - 1;
        self.slots.clear();
        self.slots.resize(capacity, Self::NONE);
        self.next.clear();
        self.next.resize(rows.len(), Self::NONE);
        self.used.clear();
        for (i, row) in rows.iter().enumerate() {
            // The bucket was picked by the key's top bits; its low bits pick the slot.
            let mut slot = row.user[1] as usize & mask;
            loop {
                let last = self.slots[slot];
                if last == Self::NONE {
                    self.used.push(slot as u32);
                    self.slots[slot] = i as u32;
                    break;
                }
                if rows[last as usize].user == row.user {
                    self.next[i] = last;
                    self.slots[slot] = i as u32;
                    break;
                }
                slot = (slot + 1) & mask;
            }
        }
    }

    /// One row per user: the start of its chain.
    fn users(&self) -> impl Iterator<Item = u32> + '_ {
        self.used.iter().map(|&slot| self.slots[slot as usize])
    }

    fn rows_of(&self, first: u32) -> impl Iterator<Item = usize> + '_ {
        std::iter::successors(Some(first), |&i| {
            Some(self.next[i as usize]).filter(|&n| n != Self::NONE)
        })
        .map(|i| i as usize)
    }
}

/// Keep the first row of each event_id (rows are sorted by ts, event_id). Users have
/// few rows, so all pairs of hashes are compared; long histories sort the hashes.
fn dedup_event_ids<'e>(rows: &mut Vec<Row>, eid: impl Fn(&Row) -> &'e [u8]) {
    const PAIRWISE: usize = 32;
    let same = |a: &Row, b: &Row| a.eid_hash == b.eid_hash && eid(a) == eid(b);
    if rows.len() < 2 {
        return;
    }
    let mut drop = Vec::new();
    if rows.len() <= PAIRWISE {
        for j in 1..rows.len() {
            if (0..j).any(|i| same(&rows[i], &rows[j])) {
                drop.push(j);
            }
        }
    } else {
        let mut hashes: Vec<(u64, usize)> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| (r.eid_hash, i))
            .collect();
        hashes.sort_unstable();
        for w in hashes.windows(2) {
            if same(&rows[w[0].1], &rows[w[1].1]) {
                drop.push(w[1].1.max(w[0].1));
            }
        }
        drop.sort_unstable();
        drop.dedup();
    }
    if drop.is_empty() {
        return;
    }
    let mut i = 0;
    rows.retain(|_| {
        let keep = drop.binary_search(&i).is_err();
        i += 1;
        keep
    });
}
