//! Cheap polling: a live funnel answers every poll exactly as a full recomputation at
//! the same `as_of`, while events arrive (late ones, repeated event_ids, equal
//! timestamps, channels changing), flushes move them into Parquet, and short windows
//! close between polls so pending changes.

use std::time::Duration;

use funnelhouse_query::funnel::{self, FunnelRequest, FunnelSpec};
use funnelhouse_query::{QueryState, funnel::LiveFunnel};
use funnelhouse_schemas::time::{format_micros, now_micros};
use funnelhouse_storage::IngestConfig;
use serde_json::{Value, json};

use crate::support::TestServer;

const SEC: i64 = 1_000_000;
const CHANNELS: [&str; 4] = ["jd", "tmall", "抖音", "offline"];
const STEPS: [&str; 3] = ["scan", "view", "draw"];

fn spec(body: Value) -> FunnelSpec {
    serde_json::from_value::<FunnelRequest>(body)
        .unwrap()
        .into_spec()
        .unwrap()
}

/// A small deterministic generator (the test must fail the same way twice).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// One round of traffic: mostly fresh steps of 40 users, plus late events an hour
/// back, repeats of earlier event_ids (some at another ts), and equal-ts pairs.
fn round(rng: &mut Lcg, round: usize, sent: &mut Vec<Value>) -> Vec<Value> {
    let now = now_micros();
    let mut out = Vec::new();
    for i in 0..40 {
        let kind = rng.below(10);
        if kind == 0 && !sent.is_empty() {
            let mut again = sent[rng.below(sent.len() as u64) as usize].clone();
            if rng.below(2) == 0 {
                again["ts"] = json!(format_micros(now - rng.below(4 * SEC as u64) as i64));
            }
            out.push(again);
            continue;
        }
        let user = rng.below(40);
        let step = STEPS[rng.below(3) as usize];
        let channel = CHANNELS[((user + rng.below(8) / 7) % 4) as usize];
        let ts = match kind {
            1 => now - 3600 * SEC - rng.below(600 * SEC as u64) as i64,
            _ => now - rng.below(3 * SEC as u64) as i64,
        };
        let prize = ["gold", "silver"][rng.below(2) as usize];
        let e = json!({"event_id": format!("r{round}-e{i}"), "event": step,
            "user_id": format!("u{user}"), "campaign": "c", "channel": channel,
            "ts": format_micros(ts), "properties": {"prize": prize}});
        if kind == 2 {
            // The same instant, another step and channel: ties broken by event_id.
            let mut twin = e.clone();
            twin["event_id"] = json!(format!("r{round}-e{i}-twin"));
            twin["event"] = json!(STEPS[rng.below(3) as usize]);
            twin["channel"] = json!(CHANNELS[rng.below(4) as usize]);
            out.push(twin);
        }
        out.push(e);
    }
    sent.extend(out.iter().cloned());
    out
}

async fn assert_live_equals_full(server: &TestServer, spec: &FunnelSpec, what: &str) {
    let engine = &server.engine;
    for breakdown in [None, Some("channel")] {
        let mut spec = spec.clone();
        spec.breakdown = breakdown.map(|b| funnel::Breakdown::parse(b).unwrap());
        let as_of = now_micros();
        let live = funnel::funnel_at(engine, &spec, as_of, true).await.unwrap();
        let full = funnel::funnel_at(engine, &spec, as_of, false)
            .await
            .unwrap();
        assert_eq!(live, full, "{what}, breakdown {breakdown:?}");
        for hours in [1, 2] {
            spec.interval_secs = Some(hours * 3600);
            let live = funnel::trend_at(engine, &spec, as_of, true).await.unwrap();
            let full = funnel::trend_at(engine, &spec, as_of, false).await.unwrap();
            assert_eq!(live, full, "{what} trend {hours}h, breakdown {breakdown:?}");
        }
    }
}

fn answers(f: &LiveFunnel) -> u64 {
    f.stats().expect("built").answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_of_a_live_funnel_equal_a_full_recomputation_while_events_arrive() {
    // No dedup window: repeated event_ids reach storage, and the funnel must count them once.
    let cfg = IngestConfig {
        flush_interval: Duration::from_secs(3600),
        dedup_window: Duration::ZERO,
        ..Default::default()
    };
    let server =
        TestServer::start_with_config(QueryState::default(), cfg, Default::default()).await;
    let engine = &server.engine;
    let now = now_micros();
    let whole = spec(json!({"campaign": "c", "steps": STEPS, "window": 2}));
    let ranged = spec(json!({"campaign": "c", "window": 3,
        "steps": ["scan", "view", {"event": "draw", "where": {"prize": "gold"}}],
        "from": format_micros(now - 1200 * SEC), "to": format_micros(now + 1200 * SEC)}));

    let mut rng = Lcg(7);
    let mut sent = Vec::new();
    server
        .post_events(&json!(round(&mut rng, 0, &mut sent)))
        .await;
    server.store.flush().await.unwrap();
    server
        .post_events(&json!(round(&mut rng, 1, &mut sent)))
        .await;
    let live: Vec<_> = [&whole, &ranged]
        .iter()
        .map(|s| engine.live().track((*s).clone()))
        .collect();
    for f in &live {
        f.refresh(engine).await.unwrap();
    }

    for r in 2..14 {
        server
            .post_events(&json!(round(&mut rng, r, &mut sent)))
            .await;
        if r % 4 == 0 {
            // The batches the live funnels took in move into Parquet: neither lost nor doubled.
            server.store.flush().await.unwrap();
        }
        if r % 3 == 0 {
            for f in &live {
                f.refresh(engine).await.unwrap();
            }
        }
        assert_live_equals_full(&server, &whole, &format!("whole history, round {r}")).await;
        assert_live_equals_full(
            &server,
            &ranged,
            &format!("from/to and a filter, round {r}"),
        )
        .await;
        // Two- and three-second windows close between rounds.
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    // Each round asked each funnel two reports and four trends: all were live answers.
    for f in &live {
        assert_eq!(answers(f), 12 * 2 * 3, "{:?}", f.spec().campaign);
    }
    let stored = server
        .sql_json("SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM events")
        .await;
    let row = &stored["rows"][0];
    assert!(
        row[0].as_i64().unwrap() > row[1].as_i64().unwrap(),
        "repeated event_ids must reach storage for this test to mean anything: {stored}"
    );

    // Over HTTP too: the same question without a breakdown is a live answer.
    let before = answers(&live[0]);
    let resp = server
        .get_json("/v1/funnel?campaign=c&steps=scan,view,draw&window=2")
        .await;
    assert_eq!(answers(&live[0]), before + 1);
    let full = funnel::funnel_at(engine, &whole, now_micros(), false)
        .await
        .unwrap();
    assert_eq!(resp["total"]["counts"], json!(full.total.counts));
    assert_eq!(
        resp["total"]["median_seconds"],
        json!(full.total.median_seconds)
    );
}
