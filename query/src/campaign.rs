//! Named campaign funnels from `[[campaigns]]`: their config, the funnel of a campaign
//! with targets, attainment, the bottleneck step of each channel and the campaign's pace
//! (`GET /v1/campaigns/{c}/funnel`), and the list of campaigns (`GET /v1/campaigns`).

use std::collections::BTreeMap;
use std::time::Duration;

use funnelhouse_schemas::time::{Micros, parse_rfc3339};
use funnelhouse_schemas::units::de_duration;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{QueryError, Result};
use crate::funnel::engine::StepStats;
use crate::funnel::{self, FunnelReport, FunnelRequest, FunnelSpec};
use crate::session::QueryEngine;

/// `[[campaigns]]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignConfig {
    pub name: String,
    /// Where scan links redirect to. Default none.
    #[serde(default)]
    pub landing_url: Option<String>,
    /// Campaign start and end (RFC 3339): the default funnel range and the pace. Default none.
    #[serde(default)]
    pub start: Option<String>,
    #[serde(default)]
    pub end: Option<String>,
    /// The campaign's funnel. Default none (scan links only).
    #[serde(default)]
    pub funnel: Option<FunnelConfig>,
    /// channel -> step event -> target user count. Default none.
    #[serde(default)]
    pub targets: BTreeMap<String, BTreeMap<String, u64>>,
    /// Default none.
    #[serde(default)]
    pub alerts: Vec<AlertConfig>,
}

/// `[campaigns.funnel]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FunnelConfig {
    /// Event names, or `{event = "draw", where = {prize = "gold"}}`.
    pub steps: Vec<Value>,
    /// Conversion window. Default `"24h"`.
    #[serde(
        default = "default_window",
        deserialize_with = "de_duration",
        serialize_with = "seconds"
    )]
    pub window: Duration,
}

/// `[[campaigns.alerts]]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// The step's event name, as the funnel names it.
    pub step: String,
    /// Fire when the step's conversion is below this.
    pub min_step_conversion: f64,
    /// The trailing period evaluated. Default `"1h"`.
    #[serde(
        default = "default_over",
        deserialize_with = "de_duration",
        serialize_with = "seconds"
    )]
    pub over: Duration,
    /// Fewer step-1 users than this over `over` never fire. Default 30.
    #[serde(default = "default_min_users")]
    pub min_users: u64,
    /// POSTed `{"status": "firing" | "resolved", ...}` on each change. Default none.
    #[serde(default)]
    pub webhook: Option<String>,
}

fn default_window() -> Duration {
    Duration::from_secs(86_400)
}

fn default_over() -> Duration {
    Duration::from_secs(3600)
}

fn default_min_users() -> u64 {
    30
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

impl CampaignConfig {
    /// Start-up checks; the error names the key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let name = &self.name;
        if name.is_empty() {
            return Err("campaigns.name: must not be empty".into());
        }
        if let Some(url) = &self.landing_url
            && (!(url.starts_with("https://") || url.starts_with("http://"))
                || !url.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(format!(
                "campaigns.landing_url: {url:?} of campaign {name:?} must be an http(s) URL without spaces or non-ASCII characters (percent-encode them)"
            ));
        }
        let start = self.start_micros()?;
        let end = self.end_micros()?;
        if let (Some(s), Some(e)) = (start, end)
            && s >= e
        {
            return Err(format!(
                "campaigns.end: campaign {name:?} ends before it starts"
            ));
        }
        let steps = match &self.funnel {
            Some(_) => self
                .spec(None, None, None)
                .map_err(|e| format!("campaigns.funnel.{e}"))?
                .steps
                .into_iter()
                .map(|s| s.event)
                .collect::<Vec<_>>(),
            None if !self.targets.is_empty() || !self.alerts.is_empty() => {
                return Err(format!(
                    "campaigns.funnel: campaign {name:?} has targets or alerts but no funnel"
                ));
            }
            None => Vec::new(),
        };
        for (channel, per_step) in &self.targets {
            if let Some(step) = per_step.keys().find(|s| !steps.contains(s)) {
                return Err(format!(
                    "campaigns.targets.{channel}.{step}: campaign {name:?} has no step {step:?}"
                ));
            }
        }
        for (i, rule) in self.alerts.iter().enumerate() {
            if self.alerts[..i].iter().any(|r| r.step == rule.step) {
                return Err(format!(
                    "campaigns.alerts.step: campaign {name:?} has two rules on step {:?}; keep one",
                    rule.step
                ));
            }
            match steps.iter().filter(|s| **s == rule.step).count() {
                0 => {
                    return Err(format!(
                        "campaigns.alerts.step: campaign {name:?} has no step {:?}",
                        rule.step
                    ));
                }
                1 => {}
                _ => {
                    return Err(format!(
                        "campaigns.alerts.step: {:?} is in campaign {name:?}'s funnel twice",
                        rule.step
                    ));
                }
            }
            if steps.first() == Some(&rule.step) {
                return Err(format!(
                    "campaigns.alerts.step: {:?} is the first step, which has no conversion rate",
                    rule.step
                ));
            }
            if rule.over.is_zero() {
                return Err("campaigns.alerts.over: must be greater than 0".into());
            }
        }
        Ok(())
    }

    pub fn start_micros(&self) -> std::result::Result<Option<Micros>, String> {
        rfc3339("start", &self.name, self.start.as_deref())
    }

    pub fn end_micros(&self) -> std::result::Result<Option<Micros>, String> {
        rfc3339("end", &self.name, self.end.as_deref())
    }

    /// What `GET /v1/campaigns` lists of this campaign.
    pub fn describe(&self) -> Value {
        json!({
            "name": self.name,
            "landing_url": self.landing_url,
            "start": self.start,
            "end": self.end,
            "steps": self.funnel.as_ref().map(|f| &f.steps),
            "window": self.funnel.as_ref().map(|f| f.window.as_secs()),
            "targets": self.targets,
            "alerts": self.alerts,
        })
    }

    /// The funnel question of this campaign. `from`/`to` default to start/end.
    pub fn spec(
        &self,
        from: Option<String>,
        to: Option<String>,
        breakdown: Option<String>,
    ) -> Result<FunnelSpec> {
        let funnel = self.funnel.as_ref().ok_or_else(|| {
            QueryError::NotFound(format!("campaign {:?} has no funnel configured", self.name))
        })?;
        FunnelRequest {
            campaign: Some(self.name.clone()),
            steps: Some(Value::Array(funnel.steps.clone())),
            window: Some(json!(funnel.window.as_secs())),
            from: from.or_else(|| self.start.clone()),
            to: to.or_else(|| self.end.clone()),
            breakdown,
            interval: None,
        }
        .into_spec()
    }
}

fn rfc3339(key: &str, name: &str, v: Option<&str>) -> std::result::Result<Option<Micros>, String> {
    v.map(|t| {
        parse_rfc3339(t)
            .ok_or_else(|| format!("campaigns.{key}: {t:?} of campaign {name:?} is not RFC 3339"))
    })
    .transpose()
}

/// The funnel of a campaign as the contract's campaign endpoint answers it.
pub async fn campaign_funnel(
    engine: &QueryEngine,
    campaign: &CampaignConfig,
    from: Option<String>,
    to: Option<String>,
    breakdown: Option<String>,
) -> Result<Value> {
    let breakdown = breakdown.or_else(|| Some("channel".into()));
    let by_channel = breakdown.as_deref() == Some("channel");
    let spec = campaign.spec(from, to, breakdown)?;
    let report = funnel::funnel(engine, &spec).await?;
    Ok(annotate(campaign, &report, by_channel))
}

/// The funnel report plus `targets`, `attainment` and `bottleneck` in the total and each
/// group, and the campaign's `elapsed` share at `as_of`.
pub fn annotate(campaign: &CampaignConfig, report: &FunnelReport, by_channel: bool) -> Value {
    let steps = &report.header.steps;
    let target_of = |channel: &str, step: &str| -> Option<u64> {
        campaign
            .targets
            .get(channel)
            .and_then(|t| t.get(step))
            .copied()
    };
    let total_targets: Vec<Option<u64>> = steps
        .iter()
        .map(|step| {
            let per_channel: Vec<u64> = campaign
                .targets
                .keys()
                .filter_map(|c| target_of(c, step))
                .collect();
            (!per_channel.is_empty()).then(|| per_channel.iter().sum())
        })
        .collect();
    let mut value = serde_json::to_value(report).unwrap_or(Value::Null);
    extend(&mut value["total"], &report.total, &total_targets);
    for (i, group) in report.groups.iter().enumerate() {
        let targets: Vec<Option<u64>> = steps
            .iter()
            .map(|step| {
                if by_channel {
                    target_of(&group.value, step)
                } else {
                    None
                }
            })
            .collect();
        extend(&mut value["groups"][i], &group.stats, &targets);
    }
    value["elapsed"] = json!(elapsed(campaign, &report.header.as_of));
    value
}

fn extend(out: &mut Value, stats: &StepStats, targets: &[Option<u64>]) {
    let attainment: Vec<Option<f64>> = stats
        .counts
        .iter()
        .zip(targets)
        .map(|(&c, t)| t.filter(|&t| t > 0).map(|t| c as f64 / t as f64))
        .collect();
    out["targets"] = json!(targets);
    out["attainment"] = json!(attainment);
    out["bottleneck"] = json!(bottleneck(stats, targets));
}

/// The step (0-based, never 0) that most holds a group back: with targets for every
/// step, the largest shortfall `targets[i]/targets[i-1] - step_conversion[i]`; without,
/// the lowest step_conversion. Ties go to the earlier step; none with one step or no
/// users.
pub fn bottleneck(stats: &StepStats, targets: &[Option<u64>]) -> Option<usize> {
    let k = stats.counts.len();
    if k < 2 || stats.counts[0] == 0 {
        return None;
    }
    let all_targets: Option<Vec<u64>> = targets.iter().copied().collect();
    let score = |i: usize| -> f64 {
        match &all_targets {
            Some(t) => {
                let target_rate = if t[i - 1] == 0 {
                    0.0
                } else {
                    t[i] as f64 / t[i - 1] as f64
                };
                target_rate - stats.step_conversion[i]
            }
            None => -stats.step_conversion[i],
        }
    };
    (1..k).fold(None, |best: Option<usize>, i| match best {
        Some(b) if score(b) >= score(i) => Some(b),
        _ => Some(i),
    })
}

/// The share of the campaign's time gone at `as_of` (0..1), when it has start and end.
fn elapsed(campaign: &CampaignConfig, as_of: &str) -> Option<f64> {
    let start = campaign.start_micros().ok()??;
    let end = campaign.end_micros().ok()??;
    let now = parse_rfc3339(as_of)?;
    Some(((now - start) as f64 / (end - start) as f64).clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(counts: &[u64]) -> StepStats {
        let k = counts.len();
        let rate = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        StepStats {
            counts: counts.to_vec(),
            conversion: counts.iter().map(|&c| rate(c, counts[0])).collect(),
            step_conversion: (0..k)
                .map(|i| {
                    if i == 0 {
                        1.0
                    } else {
                        rate(counts[i], counts[i - 1])
                    }
                })
                .collect(),
            pending: vec![0; k],
            median_seconds: vec![None; k],
        }
    }

    #[test]
    fn bottleneck_without_targets_is_the_lowest_step_conversion() {
        // scan 50%, view 40%, draw 50%
        assert_eq!(bottleneck(&stats(&[100, 50, 20, 10]), &[None; 4]), Some(2));
        // a tie goes to the earlier step
        assert_eq!(bottleneck(&stats(&[100, 50, 25, 20]), &[None; 4]), Some(1));
        assert_eq!(bottleneck(&stats(&[100]), &[None]), None);
        assert_eq!(bottleneck(&stats(&[0, 0, 0]), &[None; 3]), None);
    }

    #[test]
    fn bottleneck_with_targets_is_the_largest_shortfall() {
        // Targets expect 40% scan, 75% view, 66.7% draw; actual 50%, 40%, 50%:
        // shortfalls -0.1, 0.35, 0.167 -> view.
        let t = [Some(50_000), Some(20_000), Some(15_000), Some(10_000)];
        assert_eq!(bottleneck(&stats(&[100, 50, 20, 10]), &t), Some(2));
        // Every step beats its target (expected 10%, 20%, 25%): the smallest surplus
        // still names one.
        let easy = [Some(1000), Some(100), Some(20), Some(5)];
        assert_eq!(bottleneck(&stats(&[100, 50, 20, 10]), &easy), Some(2));
        // Targets for some steps only: fall back to the lowest rate.
        let partial = [Some(100), None, Some(10), Some(5)];
        assert_eq!(bottleneck(&stats(&[100, 90, 20, 19]), &partial), Some(2));
    }
}
