//! `funnelhouse serve --demo`: a demo campaign so a newcomer sees a moving dashboard
//! within seconds. The campaign's config is written to `data_dir/demo.toml` (copy it to
//! start your own); on the first start three days of history are written through the
//! store, and while the server runs a trickle of new users walks the funnel live.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use funnelhouse_query::CampaignConfig;
use funnelhouse_schemas::time::{format_micros, now_micros};
use funnelhouse_schemas::{BodyFormat, DecodeContext, Event, EventRef, decode_body};
use funnelhouse_storage::EventStore;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::error::CliError;
use crate::generate::{GenArgs, Generator};

pub const CAMPAIGN: &str = "parcel-lottery";
const HOUR: i64 = 3_600_000_000;
const DAY: i64 = 24 * HOUR;
/// Users per channel of the demo's targets for package; later steps follow the rates below.
const TARGETS: [(&str, [u64; 4]); 4] = [
    ("jd", [12_000, 5_000, 4_000, 2_200]),
    ("tmall", [10_000, 4_000, 3_000, 1_600]),
    ("douyin", [8_000, 2_800, 1_600, 1_000]),
    ("offline", [6_000, 1_500, 1_300, 500]),
];

/// The demo campaign's config: written to `data_dir/demo.toml` once, read back after.
pub fn campaign(data_dir: &Path) -> Result<CampaignConfig, CliError> {
    let path = data_dir.join("demo.toml");
    if !path.exists() {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| CliError::Io(format!("{}: {e}", data_dir.display())))?;
        let now = now_micros();
        let start = now - now.rem_euclid(HOUR) - 3 * DAY;
        let mut text = format!(
            "# The demo campaign of `funnelhouse serve --demo`; copy it into funnelhouse.toml to start your own.\n\
             [[campaigns]]\n\
             name = \"{CAMPAIGN}\"\n\
             landing_url = \"https://shop.example/lottery\"\n\
             start = \"{}\"\n\
             end = \"{}\"\n\
             [campaigns.funnel]\n\
             steps = [\"package\", \"scan\", \"view\", \"draw\"]\n\
             window = \"24h\"\n",
            format_micros(start),
            format_micros(start + 7 * DAY)
        );
        for (channel, t) in TARGETS {
            text.push_str(&format!(
                "[campaigns.targets.{channel}]\npackage = {}\nscan = {}\nview = {}\ndraw = {}\n",
                t[0], t[1], t[2], t[3]
            ));
        }
        text.push_str(
            "[[campaigns.alerts]]\nstep = \"view\"\nmin_step_conversion = 0.3\nover = \"6h\"\nmin_users = 30\n",
        );
        std::fs::write(&path, text)
            .map_err(|e| CliError::Io(format!("{}: {e}", path.display())))?;
    }
    #[derive(serde::Deserialize)]
    struct File {
        campaigns: Vec<CampaignConfig>,
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|e| CliError::Io(format!("{}: {e}", path.display())))?;
    let file: File =
        toml::from_str(&text).map_err(|e| CliError::Config(format!("{}: {e}", path.display())))?;
    file.campaigns
        .into_iter()
        .next()
        .ok_or_else(|| CliError::Config(format!("{}: no campaign", path.display())))
}

/// Three days of history up to now, written once (a marker file remembers it).
pub async fn seed_history(
    store: &EventStore,
    data_dir: &Path,
    campaign: &CampaignConfig,
) -> Result<(), CliError> {
    let marker = data_dir.join("demo.seeded");
    if marker.exists() {
        return Ok(());
    }
    let now = now_micros();
    let start = campaign
        .start_micros()
        .ok()
        .flatten()
        .unwrap_or(now - 3 * DAY);
    let args = GenArgs::demo(format_micros(start), 3, 60_000);
    let mut generator = Generator::new(args)?;
    let mut lines = Vec::new();
    let mut written = 0usize;
    while written < 60_000 {
        lines.clear();
        while lines.len() < 2_000 {
            generator.next_user(&mut lines);
        }
        let events: Vec<Event> = decode(&lines.join("\n"), now)
            .into_iter()
            .filter(|e| e.ts <= now)
            .collect();
        written += lines.len();
        store.write(events, now).await?;
    }
    std::fs::write(&marker, b"").map_err(|e| CliError::Io(format!("{}: {e}", marker.display())))?;
    tracing::info!(events = written, "demo: wrote three days of history");
    Ok(())
}

/// New users walking package -> scan -> view -> draw, a few a second, until dropped.
pub async fn trickle(store: Arc<EventStore>) {
    let mut rng = SmallRng::from_os_rng();
    // Events not due yet: (due time, event).
    let mut due: VecDeque<(i64, Event)> = VecDeque::new();
    let mut user = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let now = now_micros();
        for _ in 0..rng.random_range(0..4) {
            user += 1;
            let (channel, rates) = [
                ("jd", [0.45, 0.8, 0.55]),
                ("tmall", [0.4, 0.75, 0.5]),
                ("douyin", [0.2, 0.55, 0.6]),
                ("offline", [0.25, 0.85, 0.4]),
            ][rng.random_range(0..4)];
            let user_id = format!("live-{}-{user}", now / 1_000_000);
            let mut ts = now;
            for (step, name) in ["package", "scan", "view", "draw"].iter().enumerate() {
                if step > 0 {
                    if !rng.random_bool(rates[step - 1]) {
                        break;
                    }
                    ts += rng.random_range(2_000_000..40_000_000);
                }
                due.push_back((ts, live_event(&user_id, name, channel, ts)));
            }
        }
        due.make_contiguous().sort_by_key(|(t, _)| *t);
        let ready: Vec<Event> = std::iter::from_fn(|| {
            (due.front().is_some_and(|(t, _)| *t <= now))
                .then(|| due.pop_front().map(|(_, e)| e))?
        })
        .collect();
        if let Err(e) = store.write(ready, now).await {
            tracing::warn!(error = %e, "demo: live events not written");
        }
    }
}

fn live_event(user_id: &str, name: &str, channel: &str, ts: i64) -> Event {
    Event::from(EventRef {
        event_id: &format!("{user_id}-{name}"),
        event: name,
        user_id,
        campaign: CAMPAIGN,
        channel,
        ts,
        received_at: ts,
        properties: None,
    })
}

fn decode(ndjson: &str, received_at: i64) -> Vec<Event> {
    decode_body(
        ndjson.as_bytes(),
        BodyFormat::Ndjson,
        &DecodeContext::new(received_at),
    )
    .map(|d| d.events)
    .unwrap_or_default()
}
