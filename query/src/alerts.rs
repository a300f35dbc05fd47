//! Campaign alert rules, evaluated every 10 s per channel over their trailing period:
//! which rules fire now, since when, and a webhook POST when one starts or stops firing.
//!
//! The firing set is kept in `data_dir/alerts.json` (written atomically after each
//! change), so a restart neither forgets `since` nor sends a webhook again for an alert
//! that was already firing. Webhooks go out from their own task with retries and never
//! hold up ingest, queries or the next evaluation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use funnelhouse_schemas::time::{Micros, format_micros, now_micros};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::campaign::{AlertConfig, CampaignConfig};
use crate::error::Result;
use crate::funnel::{self, FunnelReport};
use crate::session::QueryEngine;

/// How often rules are evaluated.
pub const EVALUATION_INTERVAL: Duration = Duration::from_secs(10);
/// Webhook attempts before giving up on one notification.
const WEBHOOK_ATTEMPTS: u32 = 8;

/// One rule firing for one channel: the contract's alert object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FiringAlert {
    pub campaign: String,
    pub channel: String,
    pub step: String,
    /// The step's step_conversion over the period.
    pub observed: f64,
    pub threshold: f64,
    /// Step-1 users counted over the period.
    pub users: u64,
    /// When the rule started firing for this channel.
    pub since: String,
}

impl FiringAlert {
    fn key(&self) -> (String, String, String) {
        (
            self.campaign.clone(),
            self.channel.clone(),
            self.step.clone(),
        )
    }
}

/// A change to notify: the alert and whether it started (`firing`) or stopped (`resolved`).
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub status: &'static str,
    pub alert: FiringAlert,
    pub webhook: Option<String>,
}

type Key = (String, String, String);

pub struct Alerts {
    campaigns: Arc<Vec<CampaignConfig>>,
    firing: Mutex<BTreeMap<Key, FiringAlert>>,
    state_file: PathBuf,
    http: reqwest::Client,
}

impl Alerts {
    /// Load the persisted firing set of `data_dir` (none on a first start).
    pub fn open(campaigns: Arc<Vec<CampaignConfig>>, data_dir: &Path) -> Self {
        let state_file = data_dir.join("alerts.json");
        let firing = std::fs::read(&state_file)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Vec<FiringAlert>>(&bytes).ok())
            .unwrap_or_default()
            .into_iter()
            .map(|a| (a.key(), a))
            .collect();
        Self {
            campaigns,
            firing: Mutex::new(firing),
            state_file,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
        }
    }

    /// The rules of `campaign` firing at the latest evaluation.
    pub fn firing(&self, campaign: &str) -> Vec<FiringAlert> {
        self.firing
            .lock()
            .expect("alerts lock")
            .values()
            .filter(|a| a.campaign == campaign)
            .cloned()
            .collect()
    }

    /// Evaluate every rule at `now`, update the firing set, persist it, and return what
    /// changed (the caller sends the webhooks: see [`Alerts::notify`]). A rule whose funnel
    /// fails keeps its previous state.
    pub async fn evaluate(&self, engine: &QueryEngine, now: Micros) -> Vec<Transition> {
        let mut found: BTreeMap<Key, FiringAlert> = BTreeMap::new();
        for campaign in self.campaigns.iter() {
            // Rules over the same trailing period ask the same question: one funnel each.
            let mut reports: Vec<(Duration, std::result::Result<FunnelReport, String>)> =
                Vec::new();
            for rule in &campaign.alerts {
                if !reports.iter().any(|(over, _)| *over == rule.over) {
                    let report = trailing_report(engine, campaign, rule.over, now).await;
                    reports.push((rule.over, report.map_err(|e| e.to_string())));
                }
                let (_, report) = reports
                    .iter()
                    .find(|(over, _)| *over == rule.over)
                    .expect("computed above");
                match report {
                    Ok(report) => found.extend(
                        rule_firing(campaign, rule, report, now)
                            .into_iter()
                            .map(|a| (a.key(), a)),
                    ),
                    Err(e) => {
                        // One failing funnel (a limit, a timeout) must not resolve this
                        // rule's alerts or hold up the other rules: keep its last state.
                        tracing::warn!(campaign = %campaign.name, step = %rule.step, error = %e, "alert rule not evaluated");
                        let kept = self.firing.lock().expect("alerts lock");
                        found.extend(
                            kept.iter()
                                .filter(|(k, _)| k.0 == campaign.name && k.2 == rule.step)
                                .map(|(k, a)| (k.clone(), a.clone())),
                        );
                    }
                }
            }
        }
        let transition = |status, alert: FiringAlert| Transition {
            status,
            webhook: self.webhook_of(&alert.key()),
            alert,
        };
        let mut transitions = Vec::new();
        let snapshot = {
            let mut firing = self.firing.lock().expect("alerts lock");
            let mut previous = std::mem::take(&mut *firing);
            for (key, mut alert) in found {
                match previous.remove(&key) {
                    // Still firing: keep `since`, refresh the numbers.
                    Some(before) => alert.since = before.since,
                    None => transitions.push(transition("firing", alert.clone())),
                }
                firing.insert(key, alert);
            }
            // What fired before and no longer does.
            transitions.extend(previous.into_values().map(|a| transition("resolved", a)));
            firing.values().cloned().collect::<Vec<_>>()
        };
        if !transitions.is_empty() {
            self.persist(&snapshot);
        }
        transitions
    }

    fn webhook_of(&self, key: &Key) -> Option<String> {
        self.campaigns
            .iter()
            .find(|c| c.name == key.0)
            .and_then(|c| c.alerts.iter().find(|r| r.step == key.2))
            .and_then(|r| r.webhook.clone())
    }

    fn persist(&self, firing: &[FiringAlert]) {
        let bytes = serde_json::to_vec_pretty(firing).expect("alerts serialise");
        if let Err(e) = funnelhouse_storage::fsutil::write_atomic(
            &funnelhouse_storage::disk::OsDisk,
            &self.state_file,
            &bytes,
        ) {
            tracing::warn!(file = %self.state_file.display(), error = %e, "cannot save alert state");
        }
    }

    /// POST each transition to its rule's webhook from a task of its own, retried with
    /// exponential backoff (1 s, 2 s, ... up to 60 s, 8 attempts).
    pub fn notify(&self, transitions: Vec<Transition>) {
        for t in transitions {
            tracing::info!(
                status = t.status,
                campaign = %t.alert.campaign,
                channel = %t.alert.channel,
                step = %t.alert.step,
                observed = t.alert.observed,
                "alert"
            );
            let Some(url) = t.webhook else { continue };
            let http = self.http.clone();
            let mut body = serde_json::to_value(&t.alert).unwrap_or_default();
            body["status"] = json!(t.status);
            tokio::spawn(async move {
                let mut delay = Duration::from_secs(1);
                for attempt in 1..=WEBHOOK_ATTEMPTS {
                    match http.post(&url).json(&body).send().await {
                        Ok(r) if r.status().is_success() => return,
                        Ok(r) => {
                            tracing::warn!(%url, status = %r.status(), attempt, "webhook refused")
                        }
                        Err(e) => tracing::warn!(%url, error = %e, attempt, "webhook failed"),
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(60));
                }
                tracing::error!(%url, "webhook given up after {WEBHOOK_ATTEMPTS} attempts");
            });
        }
    }

    /// Evaluate every [`EVALUATION_INTERVAL`] until the task is dropped.
    pub async fn run(self: Arc<Self>, engine: QueryEngine) {
        if self.campaigns.iter().all(|c| c.alerts.is_empty()) {
            return;
        }
        let mut tick = tokio::time::interval(EVALUATION_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let transitions = self.evaluate(&engine, now_micros()).await;
            self.notify(transitions);
        }
    }
}

/// The campaign's funnel by channel over the trailing `over` before `now`.
async fn trailing_report(
    engine: &QueryEngine,
    campaign: &CampaignConfig,
    over: Duration,
    now: Micros,
) -> Result<FunnelReport> {
    let from = format_micros(now - over.as_micros() as i64);
    let spec = campaign.spec(Some(from), Some(format_micros(now)), Some("channel".into()))?;
    funnel::funnel(engine, &spec).await
}

/// The channels of `report` for which `rule` fires at `now`.
fn rule_firing(
    campaign: &CampaignConfig,
    rule: &AlertConfig,
    report: &FunnelReport,
    now: Micros,
) -> Vec<FiringAlert> {
    let Some(k) = report.header.steps.iter().position(|s| *s == rule.step) else {
        return Vec::new();
    };
    report
        .groups
        .iter()
        .filter(|g| {
            g.stats.counts[0] >= rule.min_users
                && g.stats.step_conversion[k] < rule.min_step_conversion
        })
        .map(|g| FiringAlert {
            campaign: campaign.name.clone(),
            channel: g.value.clone(),
            step: rule.step.clone(),
            observed: g.stats.step_conversion[k],
            threshold: rule.min_step_conversion,
            users: g.stats.counts[0],
            since: format_micros(now),
        })
        .collect()
}
