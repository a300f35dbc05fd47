//! The funnel engine against a brute-force reference written from the contract's text,
//! with the events spread over two Parquet files and the live buffer, and in half the
//! cases 400 more users and an 8 KiB memory limit, so the fold spills its rows to disk:
//! every chain of distinct events is enumerated, so equal timestamps, steps exactly W
//! and W+1 µs after the first, duplicates, later steps after `to`, users in several
//! channels and property filters are all judged by the definition itself.

use std::collections::{BTreeMap, HashSet};

use funnelhouse_query::QueryOptions;
use funnelhouse_query::funnel::{self, FoldExchange, FunnelRequest};
use funnelhouse_schemas::Event;
use funnelhouse_schemas::time::{format_micros, now_micros, parse_rfc3339};
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::support::{FILE_A, FILE_B, LIVE, engine_over_layout, ev, spill_count};

const SEC: i64 = 1_000_000;
const W: i64 = 10 * SEC;
const UNIT: i64 = 5 * SEC;
const PROPS: [Option<&str>; 7] = [
    None,
    Some(r#"{"prize":"gold"}"#),
    Some(r#"{"prize":"silver"}"#),
    Some(r#"{"prize":5}"#),
    Some(r#"{"prize":5.0}"#),
    Some(r#"{"prize":"5"}"#),
    Some(r#"{"prize":true}"#),
];

#[derive(Debug, Clone)]
struct Case {
    events: Vec<Event>,
    steps: Vec<Value>,
    from_to: (Option<i64>, Option<i64>),
    /// Where each event is kept (see `engine_over_layout`).
    places: Vec<u8>,
    /// Run with a memory limit so small the fold spills its rows.
    spill: bool,
}

/// Extra users of a case run under a small memory limit.
const FILLER_USERS: usize = 400;

/// Steps as the request writes them: an event name, or with a property filter.
fn steps_json(steps: &[(usize, usize)]) -> Vec<Value> {
    steps
        .iter()
        .map(|&(name, filter)| {
            let name = ["a", "b", "c"][name];
            match filter {
                0 => json!({"event": name, "where": {"prize": "gold"}}),
                1 => json!({"event": name, "where": {"prize": 5}}),
                _ => json!(name),
            }
        })
        .collect()
}

fn case() -> impl Strategy<Value = Case> {
    let event = (
        0..5usize,
        0..4usize,
        0..3usize,
        0..9i64,
        0..2i64,
        0..7usize,
        0..1000u32,
    );
    let steps = prop::collection::vec((0..3usize, 0..4usize), 1..=4);
    (
        prop::collection::vec(event, 0..24),
        prop::collection::vec(0..24usize, 0..4),
        steps,
        0..4usize,
        0..9i64,
        0..9i64,
        prop::collection::vec(prop::sample::select(vec![FILE_A, FILE_B, LIVE]), 1..8),
        any::<bool>(),
    )
        .prop_map(|(raw, dups, steps, range, a, b, places, spill)| {
            let base = now_micros() / SEC * SEC - 30 * SEC;
            let mut events: Vec<Event> = raw
                .iter()
                .enumerate()
                .map(|(i, &(u, name, ch, slot, jitter, props, id))| {
                    ev(
                        &format!("e{id}-{i}"),
                        &format!("u{u}"),
                        ["a", "b", "c", "x"][name],
                        ["jd", "tmall", ""][ch],
                        base + slot * UNIT + jitter,
                        PROPS[props],
                    )
                })
                .collect();
            for d in dups {
                if let Some(e) = events.get(d).cloned() {
                    events.push(e);
                }
            }
            let steps = steps_json(&steps);
            let (lo, hi) = (a.min(b), a.max(b) + 1);
            let from_to = match range {
                0 => (None, None),
                1 => (Some(base + lo * UNIT), Some(base + hi * UNIT)),
                2 => (Some(base + lo * UNIT), None),
                _ => (None, Some(base + hi * UNIT)),
            };
            if spill {
                // Many one-event users, each matching a step: more rows than a 8 KiB pool
                // holds, while each spilled slice (1/128 of the users) still fits.
                for (i, step) in (0..FILLER_USERS).zip(steps.iter().cycle()) {
                    let props = step.get("where").map(Value::to_string);
                    let event = step.get("event").unwrap_or(step).as_str().unwrap();
                    let ts = from_to.0.unwrap_or(base);
                    events.push(ev(
                        &format!("f{i}"),
                        &format!("filler{i}"),
                        event,
                        "offline",
                        ts,
                        props.as_deref(),
                    ));
                }
            }
            Case {
                events,
                steps,
                from_to,
                places,
                spill,
            }
        })
}

/// Per-step numbers as the reference computes them.
#[derive(Debug, Default, PartialEq)]
struct Expected {
    counts: Vec<u64>,
    pending: Vec<u64>,
    median_seconds: Vec<Option<f64>>,
}

fn step_matches(step: &Value, e: &Event) -> bool {
    let (name, filter) = match step {
        Value::String(s) => (s.as_str(), None),
        obj => (obj["event"].as_str().unwrap(), obj.get("where")),
    };
    if e.event() != name {
        return false;
    }
    let Some(filter) = filter else { return true };
    let props: Value = e
        .properties()
        .map_or(Value::Null, |p| serde_json::from_str(p).unwrap());
    filter
        .as_object()
        .unwrap()
        .iter()
        .all(|(k, want)| match (want, props.get(k)) {
            (Value::String(a), Some(Value::String(b))) => a == b,
            (Value::Number(a), Some(Value::Number(b))) => a.as_f64() == b.as_f64(),
            (Value::Bool(a), Some(Value::Bool(b))) => a == b,
            _ => false,
        })
}

/// All chains from `chain` onwards; records per start the deepest depth and, for that
/// depth, the lexicographically smallest timestamp vector.
fn extend(
    events: &[&Event],
    steps: &[Value],
    chain: &mut Vec<usize>,
    best: &mut (usize, Vec<i64>),
) {
    let times: Vec<i64> = chain.iter().map(|&i| events[i].ts).collect();
    if chain.len() > best.0 || (chain.len() == best.0 && times < best.1) {
        *best = (chain.len(), times);
    }
    if chain.len() == steps.len() {
        return;
    }
    let first = events[chain[0]].ts;
    let last = events[*chain.last().unwrap()].ts;
    for i in 0..events.len() {
        let e = events[i];
        if !chain.contains(&i)
            && e.ts >= last
            && e.ts - first <= W
            && step_matches(&steps[chain.len()], e)
        {
            chain.push(i);
            extend(events, steps, chain, best);
            chain.pop();
        }
    }
}

fn reference(case: &Case, as_of: i64) -> (Expected, BTreeMap<String, Expected>) {
    let k = case.steps.len();
    let mut seen = HashSet::new();
    let unique: Vec<&Event> = case
        .events
        .iter()
        .filter(|e| seen.insert(e.event_id().to_string()))
        .collect();
    let mut users: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in unique {
        users.entry(e.user_id()).or_default().push(e);
    }
    type Acc = (Vec<u64>, Vec<u64>, Vec<Vec<i64>>);
    let mut total: Acc = (vec![0; k], vec![0; k], vec![vec![]; k]);
    let mut groups: BTreeMap<String, Acc> = BTreeMap::new();
    let (from, to) = case.from_to;
    for events in users.values() {
        // (depth, times, start event) for each possible first step.
        let mut starts = Vec::new();
        for (i, e) in events.iter().enumerate() {
            if !step_matches(&case.steps[0], e)
                || from.is_some_and(|f| e.ts < f)
                || to.is_some_and(|t| e.ts >= t)
            {
                continue;
            }
            let mut best = (0, vec![]);
            extend(events, &case.steps, &mut vec![i], &mut best);
            starts.push((best.0, best.1, *e));
        }
        let Some(level) = starts.iter().map(|s| s.0).max() else {
            continue;
        };
        let attributing = starts
            .iter()
            .filter(|s| s.0 == level)
            .min_by(|a, b| {
                (a.2.ts, a.2.event_id().as_bytes()).cmp(&(b.2.ts, b.2.event_id().as_bytes()))
            })
            .unwrap();
        let open = level < k && starts.iter().any(|s| s.0 == level && s.2.ts + W > as_of);
        for acc in [
            &mut total,
            groups
                .entry(attributing.2.channel().to_string())
                .or_insert((vec![0; k], vec![0; k], vec![vec![]; k])),
        ] {
            for i in 0..level {
                acc.0[i] += 1;
                acc.2[i].push(attributing.1[i] - attributing.1[0]);
            }
            if open {
                acc.1[level] += 1;
            }
        }
    }
    let finish = |(counts, pending, mut durations): Acc| Expected {
        counts,
        pending,
        median_seconds: durations
            .iter_mut()
            .map(|d| {
                d.sort();
                (!d.is_empty()).then(|| d[(d.len() - 1) / 2] as f64 / SEC as f64)
            })
            .collect(),
    };
    (
        finish(total),
        groups
            .into_iter()
            .map(|(g, acc)| (g, finish(acc)))
            .collect(),
    )
}

fn actual(stats: &Value) -> Expected {
    let nums = |key: &str| {
        stats[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect()
    };
    Expected {
        counts: nums("counts"),
        pending: nums("pending"),
        median_seconds: stats["median_seconds"]
            .as_array()
            .unwrap()
            .iter()
            .map(Value::as_f64)
            .collect(),
    }
}

fn run(case: &Case) -> Result<(), TestCaseError> {
    let memory_limit = if case.spill { 8 << 10 } else { 64 << 20 };
    let opts = QueryOptions {
        memory_limit,
        ..QueryOptions::default()
    };
    let (engine, _dir) = engine_over_layout(&case.events, &case.places, opts);
    let mut req =
        json!({"campaign": "c", "steps": case.steps, "window": W / SEC, "breakdown": "channel"});
    if let Some(f) = case.from_to.0 {
        req["from"] = json!(format_micros(f));
    }
    if let Some(t) = case.from_to.1 {
        req["to"] = json!(format_micros(t));
    }
    let spec = serde_json::from_value::<FunnelRequest>(req)
        .unwrap()
        .into_spec()
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let report = rt.block_on(funnel::funnel(&engine, &spec)).unwrap();
    let report = serde_json::to_value(&report).unwrap();
    let as_of = parse_rfc3339(report["as_of"].as_str().unwrap()).unwrap();
    let (total, groups) = reference(case, as_of);
    // The distributable shape, repartitioned by user_id, folds to the same numbers.
    let plan_rows = |exchange| -> Vec<String> {
        let plan = rt
            .block_on(funnel::funnel_plan(&engine, &spec, as_of, None, exchange))
            .unwrap();
        let batches = rt
            .block_on(datafusion::physical_plan::collect(
                plan,
                engine.context().task_ctx(),
            ))
            .unwrap();
        let table = datafusion::arrow::util::pretty::pretty_format_batches(&batches).unwrap();
        let mut rows: Vec<String> = table.to_string().lines().map(String::from).collect();
        rows.sort();
        rows
    };
    prop_assert_eq!(
        plan_rows(FoldExchange::Broadcast),
        plan_rows(FoldExchange::Repartition)
    );
    prop_assert_eq!(&actual(&report["total"]), &total);
    let got: BTreeMap<String, Expected> = report["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["value"].as_str().unwrap().to_string(), actual(g)))
        .collect();
    prop_assert_eq!(got, groups);
    if case.spill {
        let plan = rt
            .block_on(funnel::explain_analyze(&engine, &spec))
            .unwrap();
        prop_assert!(
            spill_count(&plan) > 0,
            "the fold's rows were spilled:\n{}",
            plan
        );
    }
    // SQL aggregations are not what a tiny memory limit is here to test.
    if !case.spill && case.from_to == (None, None) && case.steps.iter().all(Value::is_string) {
        // window_funnel in SQL reaches the same levels (duplicates removed in SQL).
        let conds: Vec<String> = case
            .steps
            .iter()
            .map(|s| format!("event = '{}'", s.as_str().unwrap()))
            .collect();
        let sql = format!(
            "SELECT level FROM (SELECT user_id, window_funnel({}, ts, {}) AS level \
             FROM (SELECT DISTINCT event_id, user_id, event, ts FROM events) GROUP BY user_id)",
            W / SEC,
            conds.join(", ")
        );
        let result = rt.block_on(engine.sql(&sql)).unwrap();
        let mut counts = vec![0u64; case.steps.len()];
        for b in &result.batches {
            let levels =
                arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(b.column(0));
            for l in levels.values() {
                counts.iter_mut().take(*l as usize).for_each(|c| *c += 1);
            }
        }
        prop_assert_eq!(&counts, &total.counts, "window_funnel levels");
    }
    let sum: u64 = report["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["counts"][0].as_u64().unwrap())
        .sum();
    prop_assert_eq!(
        sum,
        report["total"]["counts"][0].as_u64().unwrap(),
        "group counts sum to the total"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn the_engine_agrees_with_the_definition(case in case()) {
        run(&case)?;
    }
}
