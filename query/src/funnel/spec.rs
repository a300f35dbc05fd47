//! What a funnel request asks for ([`FunnelSpec`]), parsed from the GET query string or
//! the POST body, with errors that name the field.

use std::collections::HashMap;

use funnelhouse_schemas::time::parse_rfc3339;
use funnelhouse_schemas::units::parse_duration;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{QueryError, Result};
use crate::udaf::MAX_STEPS;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunnelSpec {
    pub campaign: String,
    pub steps: Vec<StepSpec>,
    /// Conversion window, seconds.
    pub window_secs: i64,
    /// `[from, to)` on the first step's ts, UTC µs.
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub breakdown: Option<Breakdown>,
    /// Trend bucket width, seconds (trend requests only).
    pub interval_secs: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepSpec {
    pub event: String,
    /// Property equality filters (all must hold).
    pub filter: Vec<(String, FilterValue)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FilterValue {
    Str(String),
    Num(f64),
    Bool(bool),
}

impl FilterValue {
    /// A string matches only a JSON string, a number an equal JSON number, a boolean the
    /// same boolean; a missing key (`None`) never.
    pub fn matches(&self, v: Option<&Value>) -> bool {
        match (self, v) {
            (Self::Str(s), Some(Value::String(x))) => s == x,
            (Self::Num(n), Some(Value::Number(x))) => x.as_f64() == Some(*n),
            (Self::Bool(b), Some(Value::Bool(x))) => b == x,
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Breakdown {
    /// `channel`, `campaign` or `event`.
    Column(String),
    /// `properties.KEY`
    Property(String),
}

impl Breakdown {
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "channel" | "campaign" | "event" => Ok(Self::Column(text.to_string())),
            _ => match text.strip_prefix("properties.") {
                Some(key) if !key.is_empty() => Ok(Self::Property(key.to_string())),
                _ => Err(bad(format!(
                    "breakdown: {text:?} is not channel, campaign, event or properties.KEY"
                ))),
            },
        }
    }

    pub fn name(&self) -> String {
        match self {
            Self::Column(c) => c.clone(),
            Self::Property(k) => format!("properties.{k}"),
        }
    }

    /// The value of a property for grouping: strings as they are, other JSON as compact
    /// text, a missing key or null as "".
    pub fn property_value(v: Option<&Value>) -> String {
        match v {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        }
    }
}

/// Unknown query parameters are a 400 naming them, except those starting with `_`, which
/// dashboards add to defeat caches.
pub fn check_params(params: &HashMap<String, String>, known: &[&str]) -> Result<()> {
    match params
        .keys()
        .find(|k| !k.starts_with('_') && !known.contains(&k.as_str()))
    {
        Some(k) => Err(bad(format!("{k}: unknown parameter"))),
        None => Ok(()),
    }
}

fn bad(msg: String) -> QueryError {
    QueryError::BadRequest(msg)
}

/// The POST body; GET query parameters are mapped onto the same shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunnelRequest {
    pub campaign: Option<String>,
    pub steps: Option<Value>,
    pub window: Option<Value>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub breakdown: Option<String>,
    pub interval: Option<Value>,
}

impl FunnelRequest {
    /// From `?campaign=C&steps=a,b,c&window=24h&from=..&to=..&breakdown=..&interval=1h`.
    pub fn from_query(params: &HashMap<String, String>) -> Result<Self> {
        check_params(
            params,
            &[
                "campaign",
                "steps",
                "window",
                "from",
                "to",
                "breakdown",
                "interval",
            ],
        )?;
        let steps = params.get("steps").map(|s| {
            Value::Array(
                s.split(',')
                    .map(|x| Value::String(x.trim().to_string()))
                    .collect(),
            )
        });
        Ok(Self {
            campaign: params.get("campaign").cloned(),
            steps,
            window: params.get("window").map(|w| Value::String(w.clone())),
            from: params.get("from").cloned(),
            to: params.get("to").cloned(),
            breakdown: params.get("breakdown").cloned(),
            interval: params.get("interval").map(|w| Value::String(w.clone())),
        })
    }

    pub fn into_spec(self) -> Result<FunnelSpec> {
        let campaign = self
            .campaign
            .filter(|c| !c.is_empty())
            .ok_or_else(|| bad("campaign: missing".into()))?;
        let steps = match self.steps {
            Some(Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| parse_step(i, v))
                .collect::<Result<Vec<_>>>()?,
            Some(_) => {
                return Err(bad(
                    "steps: must be a list of event names or {\"event\", \"where\"} objects".into(),
                ));
            }
            None => return Err(bad("steps: missing".into())),
        };
        if steps.is_empty() || steps.len() > MAX_STEPS {
            return Err(bad(format!(
                "steps: a funnel has 1..{MAX_STEPS} steps, got {}",
                steps.len()
            )));
        }
        let window_secs = match self.window {
            None => 86_400,
            Some(v) => seconds("window", &v)?,
        };
        let time = |field: &str, v: Option<String>| -> Result<Option<i64>> {
            v.map(|t| {
                parse_rfc3339(&t).ok_or_else(|| bad(format!("{field}: {t:?} is not RFC 3339")))
            })
            .transpose()
        };
        let from = time("from", self.from)?;
        let to = time("to", self.to)?;
        if let (Some(f), Some(t)) = (from, to)
            && f >= t
        {
            return Err(bad("from: must be before to".into()));
        }
        let breakdown = self
            .breakdown
            .filter(|b| !b.is_empty())
            .map(|b| Breakdown::parse(&b))
            .transpose()?;
        let interval_secs = self.interval.map(|v| seconds("interval", &v)).transpose()?;
        if interval_secs == Some(0) {
            return Err(bad("interval: must be greater than 0".into()));
        }
        Ok(FunnelSpec {
            campaign,
            steps,
            window_secs,
            from,
            to,
            breakdown,
            interval_secs,
        })
    }
}

/// Integer seconds or a duration string (`30m`, `24h`, `7d`).
fn seconds(field: &str, v: &Value) -> Result<i64> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .filter(|s| *s >= 0)
            .ok_or_else(|| bad(format!("{field}: must be whole seconds >= 0"))),
        Value::String(s) => parse_duration(s)
            .map(|d| d.as_secs() as i64)
            .map_err(|e| bad(format!("{field}: {e}"))),
        _ => Err(bad(format!(
            "{field}: must be seconds or a duration like \"24h\""
        ))),
    }
}

fn parse_step(i: usize, v: Value) -> Result<StepSpec> {
    match v {
        Value::String(event) if !event.is_empty() => Ok(StepSpec {
            event,
            filter: Vec::new(),
        }),
        Value::Object(mut obj) => {
            let event = match obj.remove("event") {
                Some(Value::String(e)) if !e.is_empty() => e,
                _ => return Err(bad(format!("steps[{i}].event: missing or not a string"))),
            };
            let mut filter = Vec::new();
            match obj.remove("where") {
                None | Some(Value::Null) => {}
                Some(Value::Object(w)) => {
                    for (k, v) in w {
                        let fv = match v {
                            Value::String(s) => FilterValue::Str(s),
                            Value::Bool(b) => FilterValue::Bool(b),
                            Value::Number(n) => FilterValue::Num(n.as_f64().unwrap_or(f64::NAN)),
                            other => {
                                return Err(bad(format!(
                                    "steps[{i}].where.{k}: {} is not a filter value (use a string, number or boolean)",
                                    kind(&other)
                                )));
                            }
                        };
                        filter.push((k, fv));
                    }
                }
                Some(_) => return Err(bad(format!("steps[{i}].where: must be an object"))),
            }
            if let Some(k) = obj.keys().next() {
                return Err(bad(format!(
                    "steps[{i}].{k}: unknown field (a step has event and where)"
                )));
            }
            Ok(StepSpec { event, filter })
        }
        _ => Err(bad(format!(
            "steps[{i}]: must be an event name or {{\"event\", \"where\"}}"
        ))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
        _ => "this value",
    }
}
