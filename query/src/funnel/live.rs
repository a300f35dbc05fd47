//! Cheap polling: funnels kept up to date as events arrive.
//!
//! A [`LiveFunnel`] keeps, for one funnel question (a campaign's, by channel), each
//! user's step events (ts, step mask, channel, event_id) and the counters their
//! outcomes add up to: per channel the users per level, each step's durations in an
//! order-statistic multiset (for medians), and the times each unfinished user's last
//! open window closes (pending is counted against them at each poll's `as_of`), plus
//! users per hour of the attributing first step (for trends). A refresh takes a store
//! [`Snapshot`], reads only the live-buffer batches pushed since the last refresh, and
//! re-evaluates only the users those touch: each user's old outcome leaves the counters
//! and the new one enters. Late events and repeated event_ids are handled because a
//! touched user is re-evaluated from all of their events. The first build scans the
//! committed files once. So a poll costs the new events plus a few lookups, and its
//! answer equals a full recomputation, which the tests check.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray, PrimitiveArray, RecordBatch, StringViewArray};
use arrow::datatypes::TimestampMicrosecondType;
use funnelhouse_storage::Snapshot;
use futures::StreamExt;
use xxhash_rust::xxh3::xxh3_128;

use super::chain::{ChainParams, Evaluator, FunnelEvent, UserOutcome};
use super::engine::{self, StepStats};
use super::fold::{Partial, StepMatcher, string_col};
use super::spec::{Breakdown, FunnelSpec};
use crate::error::{QueryError, Result};
use crate::session::QueryEngine;

const MICROS: i64 = 1_000_000;
/// Trend counts are kept per hour; an interval of whole hours is a sum of them.
const HOUR: i64 = 3600 * MICROS;

/// The live funnels of an engine; a funnel question one of them keeps is answered from it.
#[derive(Default)]
pub struct LiveFunnels {
    funnels: Mutex<Vec<Arc<LiveFunnel>>>,
}

impl LiveFunnels {
    /// Keep `spec`'s funnel, by channel, up to date from the next [`LiveFunnel::refresh`] on.
    pub fn track(&self, mut spec: FunnelSpec) -> Arc<LiveFunnel> {
        spec.breakdown = Some(Breakdown::Column("channel".into()));
        spec.interval_secs = None;
        let mut funnels = lock(&self.funnels);
        if let Some(f) = funnels.iter().find(|f| f.spec == spec) {
            return Arc::clone(f);
        }
        let f = Arc::new(LiveFunnel::new(spec));
        funnels.push(Arc::clone(&f));
        f
    }

    pub fn all(&self) -> Vec<Arc<LiveFunnel>> {
        lock(&self.funnels).iter().map(Arc::clone).collect()
    }

    pub(super) fn find(&self, spec: &FunnelSpec) -> Option<Arc<LiveFunnel>> {
        lock(&self.funnels)
            .iter()
            .find(|f| f.answers(spec))
            .map(Arc::clone)
    }

    /// Refresh every live funnel every `period`, so each keeps pace with the live buffer
    /// between polls (and is built, or rebuilt after falling behind). Runs until dropped.
    pub async fn run(engine: QueryEngine, period: Duration) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for f in engine.live().all() {
                if let Err(e) = f.refresh(&engine).await {
                    tracing::warn!(campaign = %f.spec.campaign, error = %e, "live funnel refresh failed; polls scan until it succeeds");
                }
            }
        }
    }
}

/// One funnel question kept up to date (see the module docs).
pub struct LiveFunnel {
    spec: FunnelSpec,
    matcher: StepMatcher,
    params: ChainParams,
    /// None until built, and after falling behind the live buffer.
    state: Mutex<Option<LiveState>>,
    /// Polls answered from the state (the others scanned).
    answers: AtomicU64,
}

/// What a live funnel holds, for logs and the memory figures of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveStats {
    pub users: usize,
    pub events: usize,
    /// Polls answered without a scan.
    pub answers: u64,
}

impl LiveFunnel {
    fn new(spec: FunnelSpec) -> Self {
        let params = ChainParams {
            steps: spec.steps.len(),
            window: spec.window_secs.saturating_mul(MICROS),
            from: spec.from,
            to: spec.to,
            // Pending is counted at each poll instead.
            as_of: None,
        };
        Self {
            matcher: StepMatcher::new(&spec),
            spec,
            params,
            state: Mutex::new(None),
            answers: AtomicU64::new(0),
        }
    }

    pub fn spec(&self) -> &FunnelSpec {
        &self.spec
    }

    /// Users and events held, once built.
    pub fn stats(&self) -> Option<LiveStats> {
        lock(&self.state).as_ref().map(|s| LiveStats {
            users: s.users.len(),
            events: s.users.values().map(|u| u.events.len()).sum(),
            answers: self.answers.load(Relaxed),
        })
    }

    /// The same question, with or without the channel breakdown.
    fn answers(&self, spec: &FunnelSpec) -> bool {
        let mine = &self.spec;
        spec.campaign == mine.campaign
            && spec.steps == mine.steps
            && spec.window_secs == mine.window_secs
            && spec.from == mine.from
            && spec.to == mine.to
            && (spec.breakdown.is_none() || spec.breakdown == mine.breakdown)
    }

    /// Build the funnel if it has none, else take in the events pushed since the last
    /// refresh.
    pub async fn refresh(&self, engine: &QueryEngine) -> Result<()> {
        if self.catch_up(&engine.snapshot())? {
            return Ok(());
        }
        let started = Instant::now();
        let state = LiveState::build(engine, self).await?;
        tracing::info!(
            campaign = %self.spec.campaign,
            users = state.users.len(),
            took = ?started.elapsed(),
            "live funnel built; polls of this campaign's funnel no longer scan"
        );
        *lock(&self.state) = Some(state);
        Ok(())
    }

    /// Take in the snapshot's new batches. False when there is no state, or when batches
    /// were flushed before this funnel saw them (the state is dropped for a rebuild).
    fn catch_up(&self, snapshot: &Snapshot) -> Result<bool> {
        let mut guard = lock(&self.state);
        let Some(state) = guard.as_mut() else {
            return Ok(false);
        };
        let shared_changed = state.shared_version != snapshot.shared_version;
        match state.apply_snapshot(self, snapshot) {
            Ok(true) => Ok(true),
            Ok(false) => {
                if shared_changed {
                    tracing::debug!(campaign = %self.spec.campaign, "other nodes committed files; rebuilding the live funnel");
                } else {
                    tracing::warn!(campaign = %self.spec.campaign, "live funnel fell behind the live buffer; rebuilding");
                }
                *guard = None;
                Ok(false)
            }
            Err(e) => {
                *guard = None;
                Err(e)
            }
        }
    }

    /// The numbers of `spec` (a question this funnel [`answers`](Self::answers)) at
    /// `as_of`, or None when not built or `interval` is not whole hours: then scan.
    pub(super) fn partial(
        &self,
        engine: &QueryEngine,
        spec: &FunnelSpec,
        as_of: i64,
        interval: Option<i64>,
    ) -> Option<Partial> {
        if interval.is_some_and(|iv| iv <= 0 || iv % HOUR != 0) {
            return None;
        }
        // Taken after `as_of`, so every event acknowledged before it is in.
        let snapshot = engine.snapshot();
        if !self.catch_up(&snapshot).ok()? {
            return None;
        }
        let guard = lock(&self.state);
        let state = guard.as_ref()?;
        self.answers.fetch_add(1, Relaxed);
        Some(
            state
                .counters
                .partial(as_of, interval, spec.breakdown.is_some()),
        )
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves counters half-updated: fail loudly.
    m.lock().expect("live funnel lock poisoned")
}

/// User keys are already hashes (xxh3-128 of user_id): fold them instead of rehashing.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0 = xxhash_rust::xxh3::xxh3_64(bytes);
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = (n >> 64) as u64 ^ n as u64;
    }
}

type KeyBuild = BuildHasherDefault<KeyHasher>;

struct LiveState {
    /// How many live-buffer batches (`Snapshot::batches_pushed`) are taken in.
    consumed: u64,
    /// `Snapshot::shared_version` of the build: other nodes' files are read by a scan,
    /// so when they change the state is built again.
    shared_version: u64,
    users: HashMap<u128, UserEvents, KeyBuild>,
    counters: Counters,
    evaluator: Evaluator,
    scratch: Vec<FunnelEvent>,
    /// Reused by [`UserEvents::normalize`].
    order: Vec<usize>,
}

/// One user's step events, sorted by (ts, event_id), each event_id once.
#[derive(Default)]
struct UserEvents {
    events: Vec<LiveEvent>,
    /// The event_ids, concatenated in the order of `events`.
    ids: Vec<u8>,
}

#[derive(Clone, Copy)]
struct LiveEvent {
    ts: i64,
    steps: u64,
    group: u32,
    /// Where this event's id ends in `ids` (it starts where the previous one ends).
    id_end: u32,
}

/// The columns a batch is read through: scan output (by position, channel aliased as
/// `breakdown`) or live-buffer batches (the full schema, by name).
struct Columns<'a> {
    users: &'a StringViewArray,
    ids: &'a StringViewArray,
    ts: &'a PrimitiveArray<TimestampMicrosecondType>,
    events: &'a StringViewArray,
    channels: &'a StringViewArray,
    /// Live-buffer batches hold every campaign; the scan was filtered.
    campaigns: Option<&'a StringViewArray>,
    properties: Option<&'a StringViewArray>,
}

impl<'a> Columns<'a> {
    fn of_scan(b: &'a RecordBatch, matcher: &StepMatcher) -> Result<Self> {
        Ok(Self {
            users: string_col(b, 0)?,
            ids: string_col(b, 1)?,
            ts: b.column(2).as_primitive(),
            events: string_col(b, 3)?,
            channels: string_col(b, 4)?,
            campaigns: None,
            properties: if matcher.needs_properties() {
                Some(string_col(b, 5)?)
            } else {
                None
            },
        })
    }

    fn of_buffer(b: &'a RecordBatch, matcher: &StepMatcher) -> Result<Self> {
        let schema = b.schema();
        let index = |name: &str| {
            schema
                .index_of(name)
                .map_err(|e| QueryError::Internal(format!("live buffer batch: {e}")))
        };
        let by_name = |name: &str| string_col(b, index(name)?);
        Ok(Self {
            users: by_name("user_id")?,
            ids: by_name("event_id")?,
            ts: b.column(index("ts")?).as_primitive(),
            events: by_name("event")?,
            channels: by_name("channel")?,
            campaigns: Some(by_name("campaign")?),
            properties: if matcher.needs_properties() {
                Some(by_name("properties")?)
            } else {
                None
            },
        })
    }
}

impl LiveState {
    fn new(f: &LiveFunnel) -> Self {
        Self {
            consumed: 0,
            shared_version: 0,
            users: HashMap::default(),
            counters: Counters::new(f.params.steps, f.params.window),
            evaluator: Evaluator::default(),
            scratch: Vec::new(),
            order: Vec::new(),
        }
    }

    /// The committed files of a snapshot by one scan, then its live-buffer batches.
    async fn build(engine: &QueryEngine, f: &LiveFunnel) -> Result<Self> {
        let snapshot = engine.snapshot();
        let mut state = Self::new(f);
        let files = engine.over_files(Arc::clone(&snapshot.files))?;
        // Each scan partition decodes on its own task while this one files the rows.
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let mut decoding = tokio::task::JoinSet::new();
        for mut stream in engine::scan(&files, &f.spec, &f.matcher).await? {
            let tx = tx.clone();
            decoding.spawn(async move {
                while let Some(batch) = stream.next().await {
                    if tx.send(batch).await.is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        while let Some(batch) = rx.recv().await {
            let batch = batch?;
            state.add_batch(f, &Columns::of_scan(&batch, &f.matcher)?, None);
        }
        let everyone: Vec<u128> = state.users.keys().copied().collect();
        state.settle(f, everyone);
        state.consumed = snapshot.batches_pushed - snapshot.batches.len() as u64;
        state.shared_version = snapshot.shared_version;
        if !state.apply_snapshot(f, &snapshot)? {
            return Err(QueryError::Internal(
                "live funnel build missed a batch".into(),
            ));
        }
        Ok(state)
    }

    /// Take in the snapshot's batches not seen yet (the last flush's included); false if
    /// some were missed.
    fn apply_snapshot(&mut self, f: &LiveFunnel, snapshot: &Snapshot) -> Result<bool> {
        if snapshot.shared_version != self.shared_version {
            return Ok(false);
        }
        if snapshot.batches_pushed <= self.consumed {
            return Ok(true);
        }
        let held = snapshot.retired.len() + snapshot.batches.len();
        let first = snapshot.batches_pushed - held as u64;
        if first > self.consumed {
            return Ok(false);
        }
        let mut touched = HashSet::default();
        let new = snapshot
            .retired
            .iter()
            .chain(&snapshot.batches)
            .skip((self.consumed - first) as usize);
        for b in new {
            self.add_batch(f, &Columns::of_buffer(b, &f.matcher)?, Some(&mut touched));
        }
        self.settle(f, touched);
        self.consumed = snapshot.batches_pushed;
        Ok(true)
    }

    /// Store the batch's rows of this funnel; a user's old outcome leaves the counters
    /// when their first new row arrives (recorded in `touched`; None while building,
    /// when nobody has an outcome yet), the new one enters in [`Self::settle`].
    fn add_batch(
        &mut self,
        f: &LiveFunnel,
        c: &Columns,
        mut touched: Option<&mut HashSet<u128, KeyBuild>>,
    ) {
        let last_ts = f.spec.to.map(|to| to.saturating_add(f.params.window));
        for r in 0..c.ts.len() {
            if c.ts.is_null(r) {
                continue;
            }
            let ts = c.ts.value(r);
            if f.spec.from.is_some_and(|from| ts < from)
                || last_ts.is_some_and(|last| ts > last)
                || c.campaigns.is_some_and(|cs| cs.value(r) != f.spec.campaign)
            {
                continue;
            }
            let (steps, _) = f.matcher.row_steps(c.events, c.properties, r);
            if steps == 0 {
                continue;
            }
            let group = self.counters.group_id(c.channels.value(r));
            let key = xxh3_128(c.users.value(r).as_bytes());
            let user = self.users.entry(key).or_default();
            let first_touch = touched.as_mut().is_some_and(|t| t.insert(key));
            if first_touch && !user.events.is_empty() {
                let events = user.funnel_events(&mut self.scratch);
                let out = self.evaluator.evaluate(events, &f.params);
                self.counters.apply(user, out, false);
            }
            user.push(ts, steps, group, c.ids.value(r).as_bytes());
        }
    }

    /// Re-evaluate the touched users and put their outcomes in the counters.
    fn settle(&mut self, f: &LiveFunnel, touched: impl IntoIterator<Item = u128>) {
        for key in touched {
            let user = self.users.get_mut(&key).expect("a touched user is stored");
            user.normalize(&mut self.order);
            let events = user.funnel_events(&mut self.scratch);
            let out = self.evaluator.evaluate(events, &f.params);
            self.counters.apply(user, out, true);
        }
    }
}

impl UserEvents {
    fn push(&mut self, ts: i64, steps: u64, group: u32, id: &[u8]) {
        self.ids.extend_from_slice(id);
        self.events.push(LiveEvent {
            ts,
            steps,
            group,
            id_end: self.ids.len() as u32,
        });
    }

    fn id(&self, i: usize) -> &[u8] {
        let start = if i == 0 {
            0
        } else {
            self.events[i - 1].id_end as usize
        };
        &self.ids[start..self.events[i].id_end as usize]
    }

    /// Sort by (ts, event_id) and keep the first event of each event_id, as the full
    /// fold does. Most users are already in order with distinct ids: left as they are.
    fn normalize(&mut self, order: &mut Vec<usize>) {
        const PAIRWISE: usize = 32;
        let n = self.events.len();
        let key = |a: usize, b: usize| {
            self.events[a]
                .ts
                .cmp(&self.events[b].ts)
                .then_with(|| self.id(a).cmp(self.id(b)))
        };
        let in_order = (1..n).all(|i| key(i - 1, i).is_lt());
        let distinct =
            n <= 1 || (n <= PAIRWISE && (1..n).all(|j| (0..j).all(|i| self.id(i) != self.id(j))));
        if !(in_order && distinct) {
            order.clear();
            order.extend(0..n);
            order.sort_by(|&a, &b| key(a, b));
            let mut kept: Vec<usize> = Vec::with_capacity(n);
            if n <= PAIRWISE {
                for &i in order.iter() {
                    if !kept.iter().any(|&j| self.id(j) == self.id(i)) {
                        kept.push(i);
                    }
                }
            } else {
                let mut seen = HashSet::with_capacity(n);
                kept.extend(order.iter().copied().filter(|&i| seen.insert(self.id(i))));
            }
            let mut events = Vec::with_capacity(kept.len());
            let mut ids = Vec::with_capacity(self.ids.len());
            for &i in &kept {
                ids.extend_from_slice(self.id(i));
                events.push(LiveEvent {
                    id_end: ids.len() as u32,
                    ..self.events[i]
                });
            }
            self.events = events;
            self.ids = ids;
        }
        self.events.shrink_to_fit();
        self.ids.shrink_to_fit();
    }

    fn funnel_events<'s>(&self, scratch: &'s mut Vec<FunnelEvent>) -> &'s [FunnelEvent] {
        scratch.clear();
        scratch.extend(self.events.iter().map(|e| FunnelEvent {
            ts: e.ts,
            steps: e.steps,
        }));
        scratch
    }
}

/// The users' outcomes, summed.
struct Counters {
    steps: usize,
    window: i64,
    groups: Vec<String>,
    group_ids: HashMap<String, u32>,
    /// By group id.
    tallies: Vec<GroupTally>,
    /// Users per (hour of the attributing first step, group) and level.
    hours: HashMap<(i64, u32), Vec<u64>>,
}

struct GroupTally {
    counts: Vec<u64>,
    /// Per step, the µs from step 1 to it of each user who reached it (step 1: unused).
    durations: Vec<TimeMultiset>,
    /// Per level short of the last step, when each such user's last open window closes.
    closes: Vec<TimeMultiset>,
}

impl Counters {
    fn new(steps: usize, window: i64) -> Self {
        Self {
            steps,
            window,
            groups: Vec::new(),
            group_ids: HashMap::new(),
            tallies: Vec::new(),
            hours: HashMap::new(),
        }
    }

    fn group_id(&mut self, value: &str) -> u32 {
        if let Some(&g) = self.group_ids.get(value) {
            return g;
        }
        let g = self.groups.len() as u32;
        self.groups.push(value.to_string());
        self.group_ids.insert(value.to_string(), g);
        self.tallies.push(GroupTally {
            counts: vec![0; self.steps],
            durations: (0..self.steps).map(|_| TimeMultiset::default()).collect(),
            closes: (0..self.steps).map(|_| TimeMultiset::default()).collect(),
        });
        g
    }

    /// Add (or take out) one user's outcome.
    fn apply(&mut self, user: &UserEvents, out: &UserOutcome, add: bool) {
        let Some(start) = out.start else { return };
        let first = user.events[start];
        let step = |n: &mut u64| {
            if add { *n += 1 } else { *n -= 1 }
        };
        let t = &mut self.tallies[first.group as usize];
        for i in 0..out.level {
            step(&mut t.counts[i]);
            if i > 0 {
                t.durations[i].change(out.step_ts[i] - out.step_ts[0], add);
            }
        }
        if out.level < self.steps {
            t.closes[out.level].change(out.last_start.saturating_add(self.window), add);
        }
        let key = (first.ts - first.ts.rem_euclid(HOUR), first.group);
        let counts = self.hours.entry(key).or_insert_with(|| vec![0; self.steps]);
        counts.iter_mut().take(out.level).for_each(step);
        if counts[0] == 0 {
            self.hours.remove(&key);
        }
    }

    /// The numbers at `as_of`, in the shape the scan's fold produces.
    fn partial(&self, as_of: i64, interval: Option<i64>, by_group: bool) -> Partial {
        let k = self.steps;
        let live: Vec<(usize, &GroupTally)> = self
            .tallies
            .iter()
            .enumerate()
            .filter(|(_, t)| t.counts[0] > 0)
            .collect();
        let pending_of = |t: &GroupTally| -> Vec<u64> {
            t.closes
                .iter()
                .map(|c| c.count_above(as_of) as u64)
                .collect()
        };
        let mut counts = vec![0; k];
        let mut pending = vec![0; k];
        let mut groups = HashMap::new();
        for &(g, t) in &live {
            let p = pending_of(t);
            counts.iter_mut().zip(&t.counts).for_each(|(a, b)| *a += b);
            pending.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
            if by_group {
                let medians = medians(&t.counts, &[t]);
                groups.insert(
                    self.groups[g].clone(),
                    StepStats::new(t.counts.clone(), p, medians),
                );
            }
        }
        let tallies: Vec<&GroupTally> = live.iter().map(|(_, t)| *t).collect();
        let total = StepStats::new(counts.clone(), pending, medians(&counts, &tallies));
        let mut buckets: HashMap<(i64, String), Vec<u64>> = HashMap::new();
        if let Some(iv) = interval {
            for (&(hour, g), c) in &self.hours {
                let name = if by_group {
                    self.groups[g as usize].clone()
                } else {
                    String::new()
                };
                let sum = buckets
                    .entry((hour - hour.rem_euclid(iv), name))
                    .or_insert_with(|| vec![0; k]);
                sum.iter_mut().zip(c).for_each(|(a, b)| *a += b);
            }
        }
        Partial {
            total,
            groups,
            buckets,
        }
    }
}

/// Lower medians (seconds) of each step's durations over `tallies`: a value search
/// over the groups' multisets, so the total needs no multiset of its own.
fn medians(counts: &[u64], tallies: &[&GroupTally]) -> Vec<Option<f64>> {
    (0..counts.len())
        .map(|i| {
            if counts[i] == 0 {
                return None;
            }
            if i == 0 {
                return Some(0.0);
            }
            let sets: Vec<&TimeMultiset> = tallies.iter().map(|t| &t.durations[i]).collect();
            let n: usize = sets.iter().map(|s| s.len()).sum();
            let rank = (n - 1) / 2;
            // The smallest value with more than `rank` values at or below it.
            let (mut lo, mut hi) = (
                sets.iter().filter_map(|s| s.min()).min()?,
                sets.iter().filter_map(|s| s.max()).max()?,
            );
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                if sets.iter().map(|s| s.count_at_most(mid)).sum::<usize>() > rank {
                    hi = mid;
                } else {
                    lo = mid + 1;
                }
            }
            Some(lo as f64 / MICROS as f64)
        })
        .collect()
}

/// A sorted multiset of µs values in chunks of at most `CHUNK`: inserting or removing
/// moves at most one chunk, counting walks the chunks. A flat sorted vector would move
/// half of a few million values on every change.
#[derive(Default)]
struct TimeMultiset {
    chunks: Vec<Vec<i64>>,
    len: usize,
}

impl TimeMultiset {
    const CHUNK: usize = 2048;

    fn len(&self) -> usize {
        self.len
    }

    fn min(&self) -> Option<i64> {
        self.chunks.first().and_then(|c| c.first().copied())
    }

    fn max(&self) -> Option<i64> {
        self.chunks.last().and_then(|c| c.last().copied())
    }

    /// The chunk where `v` belongs: the first whose last value is >= v (else the last).
    fn chunk_of(&self, v: i64) -> usize {
        self.chunks
            .partition_point(|c| c.last().is_some_and(|&last| last < v))
            .min(self.chunks.len().saturating_sub(1))
    }

    fn change(&mut self, v: i64, add: bool) {
        if add { self.insert(v) } else { self.remove(v) }
    }

    fn insert(&mut self, v: i64) {
        if self.chunks.is_empty() {
            self.chunks.push(Vec::with_capacity(Self::CHUNK));
        }
        let c = self.chunk_of(v);
        let chunk = &mut self.chunks[c];
        let at = chunk.partition_point(|&x| x < v);
        chunk.insert(at, v);
        if chunk.len() > Self::CHUNK {
            let upper = chunk.split_off(Self::CHUNK / 2);
            self.chunks.insert(c + 1, upper);
        }
        self.len += 1;
    }

    fn remove(&mut self, v: i64) {
        let c = self.chunk_of(v);
        let Some(chunk) = self.chunks.get_mut(c) else {
            debug_assert!(false, "removing {v} from an empty multiset");
            return;
        };
        let at = chunk.partition_point(|&x| x < v);
        if chunk.get(at) != Some(&v) {
            debug_assert!(false, "removing {v}, which is not held");
            return;
        }
        chunk.remove(at);
        if chunk.is_empty() {
            self.chunks.remove(c);
        }
        self.len -= 1;
    }

    fn count_at_most(&self, v: i64) -> usize {
        let mut n = 0;
        for c in &self.chunks {
            if c.last().is_some_and(|&last| last <= v) {
                n += c.len();
            } else {
                return n + c.partition_point(|&x| x <= v);
            }
        }
        n
    }

    fn count_above(&self, v: i64) -> usize {
        self.len - self.count_at_most(v)
    }
}

#[cfg(test)]
mod tests {
    use super::TimeMultiset;

    #[test]
    fn multiset_counts_match_a_sorted_vector_through_inserts_and_removes() {
        let mut set = TimeMultiset::default();
        let mut reference: Vec<i64> = Vec::new();
        let mut x: u64 = 12345;
        for round in 0..20_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = (x >> 40) as i64 % 5000;
            if round % 3 == 2 && !reference.is_empty() {
                let victim = reference[(x as usize >> 7) % reference.len()];
                set.remove(victim);
                let at = reference.iter().position(|&r| r == victim).unwrap();
                reference.remove(at);
            } else {
                set.insert(v);
                reference.push(v);
            }
            if round % 997 == 0 {
                reference.sort_unstable();
                for probe in [-1, 0, 17, 2500, 4999, 5000] {
                    let at_most = reference.iter().filter(|&&r| r <= probe).count();
                    assert_eq!(set.count_at_most(probe), at_most, "probe {probe}");
                }
                assert_eq!(set.len(), reference.len());
                assert_eq!(set.min(), reference.first().copied());
                assert_eq!(set.max(), reference.last().copied());
            }
        }
    }
}
