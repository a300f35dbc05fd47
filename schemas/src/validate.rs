//! Validation of one native event object into an [`Event`], with errors that name the field.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::event::{Event, EventRef, limits};
use crate::time::{Micros, epoch_ms_to_micros, parse_rfc3339};

/// What validation needs to know about the request an event arrived in.
#[derive(Debug, Clone, Copy)]
pub struct DecodeContext {
    /// Server receive time of the request, UTC µs.
    pub received_at: Micros,
    /// `received_at - sent_at` when the envelope carried `sent_at` (device clock skew).
    pub skew: Micros,
    /// Per-event size limit on the event's JSON text (`max_event_bytes`).
    pub max_event_bytes: usize,
    /// Reject `ts` later than `received_at + max_future` (`None`: off).
    pub max_future: Option<Micros>,
}

impl DecodeContext {
    pub fn new(received_at: Micros) -> Self {
        Self {
            received_at,
            skew: 0,
            max_event_bytes: 32 * 1024,
            max_future: None,
        }
    }
}

/// The native event object with every field still raw, so each one can be checked
/// on its own and named in the error. JSON `null` deserialises to `None` (absent).
#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(borrow, default)]
    event_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    event: Option<&'a RawValue>,
    #[serde(borrow, default)]
    user_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    campaign: Option<&'a RawValue>,
    #[serde(borrow, default)]
    channel: Option<&'a RawValue>,
    #[serde(borrow, default)]
    ts: Option<&'a RawValue>,
    #[serde(borrow, default)]
    properties: Option<&'a RawValue>,
}

/// Validate one event given as JSON text. The error is `"<field>: <reason>"`.
pub fn validate_event(text: &str, ctx: &DecodeContext) -> Result<Event, String> {
    if text.len() > ctx.max_event_bytes {
        return Err(format!(
            "max_event_bytes: event is {} bytes, the limit is {}",
            text.len(),
            ctx.max_event_bytes
        ));
    }
    match crate::plain::plain_event(text, ctx) {
        Some(event) => Ok(event),
        None => general_event(text, ctx),
    }
}

/// [`validate_event`] for any form of the event object, through serde.
pub(crate) fn general_event(text: &str, ctx: &DecodeContext) -> Result<Event, String> {
    let trimmed = text.trim_start();
    if !trimmed.starts_with('{') {
        return Err("event: not a JSON object".to_string());
    }
    let raw: RawEvent =
        serde_json::from_str(text).map_err(|e| format!("event: invalid JSON object ({e})"))?;

    let event_id = match raw.event_id {
        Some(v) => bounded_string("event_id", v, 1, limits::EVENT_ID_MAX)?,
        None => Cow::Owned(uuid::Uuid::now_v7().to_string()),
    };
    let event = required(raw.event, "event")?;
    let event = bounded_string("event", event, 1, limits::EVENT_NAME_MAX)?;
    check_event_name(&event)?;
    let user_id = bounded_string(
        "user_id",
        required(raw.user_id, "user_id")?,
        1,
        limits::USER_ID_MAX,
    )?;
    let campaign = bounded_string(
        "campaign",
        required(raw.campaign, "campaign")?,
        1,
        limits::CAMPAIGN_MAX,
    )?;
    let channel = match raw.channel {
        Some(v) => bounded_string("channel", v, 0, limits::CHANNEL_MAX)?,
        None => Cow::Borrowed(""),
    };
    let ts = event_ts("ts", raw.ts, ctx)?;
    let properties = match raw.properties {
        Some(v) => Some(properties_text(v)?),
        None => None,
    };
    Ok(Event::from(EventRef {
        event_id: &event_id,
        event: &event,
        user_id: &user_id,
        campaign: &campaign,
        channel: &channel,
        ts,
        received_at: ctx.received_at,
        properties: properties.as_deref(),
    }))
}

pub(crate) fn required<'a>(
    value: Option<&'a RawValue>,
    field: &str,
) -> Result<&'a RawValue, String> {
    value.ok_or_else(|| format!("{field}: missing"))
}

/// A JSON string of `min..=max` bytes (UTF-8), borrowed from the JSON text unless it
/// has escapes.
pub(crate) fn bounded_string<'a>(
    field: &str,
    value: &'a RawValue,
    min: usize,
    max: usize,
) -> Result<Cow<'a, str>, String> {
    let text = value.get();
    if !text.starts_with('"') {
        return Err(format!(
            "{field}: must be a string, got {}",
            json_kind(text)
        ));
    }
    // RawValue has checked the JSON: without escapes the text between the quotes is
    // the string itself, and most ids and names have none.
    let s: Cow<str> = if text.contains('\\') {
        Cow::Owned(serde_json::from_str(text).map_err(|e| format!("{field}: {e}"))?)
    } else {
        Cow::Borrowed(&text[1..text.len() - 1])
    };
    if s.len() < min || s.len() > max {
        return Err(format!(
            "{field}: must be {min}..{max} bytes, got {}",
            s.len()
        ));
    }
    Ok(s)
}

/// `[A-Za-z0-9_.:-]`; a leading `$` is reserved for server-made names.
pub fn check_event_name(name: &str) -> Result<(), String> {
    match name
        .bytes()
        .find(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-')))
    {
        None => Ok(()),
        Some(b'$') if name.starts_with('$') => {
            Err("event: names starting with '$' are reserved for server-made events".to_string())
        }
        Some(b) => Err(format!(
            "event: only A-Z a-z 0-9 _ . : - are allowed, found {:?}",
            char::from_u32(b as u32)
                .filter(|c| c.is_ascii())
                .unwrap_or('?')
        )),
    }
}

/// A device clock more than this far off is ignored rather than corrected (the
/// contract's rule, as Segment does): such a sender's `sent_at` is more likely wrong.
const MAX_SKEW_MICROS: Micros = 30 * 86_400 * 1_000_000;

/// The correction to add to each `ts` of a request sent at `sent_at` (device clock)
/// and received at `received_at` (server clock): their difference, or 0 past 30 days.
pub fn clock_skew(received_at: Micros, sent_at: Micros) -> Micros {
    let skew = received_at.saturating_sub(sent_at);
    if skew.abs() > MAX_SKEW_MICROS {
        0
    } else {
        skew
    }
}

/// 2000-01-01T00:00:00Z: earlier timestamps are refused, since they are most often epoch
/// seconds sent where milliseconds belong.
const TS_FLOOR: Micros = 946_684_800_000_000;

/// The stored ts of an event whose `field` is `value` (absent: the receive time): parsed,
/// then [`checked_ts`].
pub(crate) fn event_ts(
    field: &str,
    value: Option<&RawValue>,
    ctx: &DecodeContext,
) -> Result<Micros, String> {
    let Some(value) = value else {
        return Ok(ctx.received_at);
    };
    let sent = parse_ts(value).ok_or_else(|| format!("{field}: not RFC 3339 or epoch ms"))?;
    checked_ts(field, sent, ctx)
}

/// The stored ts of an event whose `field` says `sent`: refused before 2000, corrected
/// for clock skew, refused past `max_future`.
pub(crate) fn checked_ts(field: &str, sent: Micros, ctx: &DecodeContext) -> Result<Micros, String> {
    if sent < TS_FLOOR {
        return Err(format!(
            "{field}: {} is before 2000-01-01 (epoch seconds sent as milliseconds?)",
            crate::time::format_micros(sent)
        ));
    }
    let ts = sent.saturating_add(ctx.skew);
    if let Some(max_future) = ctx.max_future
        && ts > ctx.received_at.saturating_add(max_future)
    {
        return Err(format!(
            "{field}: {} is later than received_at + max_future ({} s)",
            crate::time::format_micros(ts),
            max_future / 1_000_000
        ));
    }
    Ok(ts)
}

/// RFC 3339 string or integer epoch milliseconds.
pub fn parse_ts(value: &RawValue) -> Option<Micros> {
    let text = value.get();
    if text.starts_with('"') {
        let s: std::borrow::Cow<str> = serde_json::from_str(text).ok()?;
        parse_rfc3339(&s)
    } else {
        epoch_ms_to_micros(text.parse::<i64>().ok()?)
    }
}

/// A JSON object, stored as compact text of at most 16 KiB (borrowed from the JSON text
/// when it is compact already).
pub(crate) fn properties_text(value: &RawValue) -> Result<Cow<'_, str>, String> {
    let text = value.get();
    if !text.starts_with('{') {
        return Err(format!(
            "properties: must be a JSON object, got {}",
            json_kind(text)
        ));
    }
    // Drop the whitespace a pretty-printer adds (Python's json.dumps does) without
    // re-serialising: numbers keep their text (`1e3` stays `1e3`) and keys their order.
    let shape = json_shape(text);
    let compact = if shape.whitespace {
        Cow::Owned(compact_json(text))
    } else {
        Cow::Borrowed(text)
    };
    if compact.len() > limits::PROPERTIES_MAX {
        return Err(format!(
            "properties: {} bytes serialized, the limit is {}",
            compact.len(),
            limits::PROPERTIES_MAX
        ));
    }
    if shape.depth > limits::PROPERTIES_DEPTH_MAX {
        return Err(format!(
            "properties: nested {} levels deep, the limit is {}",
            shape.depth,
            limits::PROPERTIES_DEPTH_MAX
        ));
    }
    if shape.keys > limits::PROPERTIES_KEYS_MAX {
        return Err(format!(
            "properties: {} keys, the limit is {}",
            shape.keys,
            limits::PROPERTIES_KEYS_MAX
        ));
    }
    Ok(compact)
}

/// What one pass over parser-checked JSON text tells: its deepest nesting of objects and
/// arrays, the keys of its outer object, and whether it has insignificant whitespace.
#[derive(Debug, PartialEq, Eq)]
struct JsonShape {
    depth: usize,
    keys: usize,
    whitespace: bool,
}

/// One pass over the bytes, jumping over each string to its closing quote with memchr
/// (properties are mostly string values: URLs, user agents, names).
fn json_shape(text: &str) -> JsonShape {
    let b = text.as_bytes();
    let (mut depth, mut deepest, mut commas) = (0usize, 0usize, 0usize);
    let (mut whitespace, mut has_keys) = (false, false);
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                has_keys |= depth == 1;
                i += 1;
                // To the closing quote; an escape is a backslash and one ASCII byte.
                loop {
                    let rest = b.get(i..).unwrap_or_default();
                    match memchr::memchr2(b'"', b'\\', rest) {
                        Some(j) if rest[j] == b'\\' => i += j + 2,
                        Some(j) => {
                            i += j;
                            break;
                        }
                        None => {
                            i = b.len();
                            break;
                        }
                    }
                }
            }
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b',' if depth == 1 => commas += 1,
            b' ' | b'\n' | b'\r' | b'\t' => whitespace = true,
            _ => {}
        }
        i += 1;
    }
    JsonShape {
        depth: deepest,
        keys: if has_keys { commas + 1 } else { 0 },
        whitespace,
    }
}

/// JSON text without insignificant whitespace (a space inside a string value stays).
fn compact_json(text: &str) -> String {
    let mut in_string = false;
    let mut escaped = false;
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let insignificant = if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            false
        } else {
            in_string = c == '"';
            matches!(c, ' ' | '\n' | '\r' | '\t')
        };
        if !insignificant {
            out.push(c);
        }
    }
    out
}

pub(crate) fn json_kind(text: &str) -> &'static str {
    match text.as_bytes().first() {
        Some(b'"') => "a string",
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(text: &str) -> String {
        properties_text(&RawValue::from_string(text.to_string()).unwrap())
            .unwrap()
            .into_owned()
    }

    #[test]
    fn properties_are_compacted_only_outside_strings() {
        assert_eq!(
            props(r#"{"a": "x y",  "b":[1, 2]}"#),
            r#"{"a":"x y","b":[1,2]}"#
        );
        assert_eq!(props(r#"{"a":"x y"}"#), r#"{"a":"x y"}"#);
        assert_eq!(
            props(r#"{"a":"q\" b","c":"\\"}"#),
            r#"{"a":"q\" b","c":"\\"}"#
        );
        assert_eq!(props(r#"{"a":"q\\" ,"c":1}"#), r#"{"a":"q\\","c":1}"#);
        // Numbers keep their JSON text and keys their order.
        assert_eq!(
            props("{\"z\": 1e3,\n  \"a\": [2.50, -0.0]}"),
            r#"{"z":1e3,"a":[2.50,-0.0]}"#
        );
    }

    #[test]
    fn properties_nesting_and_key_count_are_limited() {
        let nested = |n: usize| format!("{}{}{}", "{\"a\":".repeat(n - 1), "{}", "}".repeat(n - 1));
        let ok = nested(limits::PROPERTIES_DEPTH_MAX);
        assert_eq!(props(&ok), ok);
        let deep = RawValue::from_string(nested(limits::PROPERTIES_DEPTH_MAX + 1)).unwrap();
        assert_eq!(
            properties_text(&deep).unwrap_err(),
            "properties: nested 33 levels deep, the limit is 32"
        );
        let keys = |n: usize| {
            let body: Vec<String> = (0..n).map(|i| format!("\"k{i}\":1")).collect();
            format!("{{{}}}", body.join(","))
        };
        assert_eq!(props(&keys(1000)), keys(1000));
        let many = RawValue::from_string(keys(1001)).unwrap();
        assert_eq!(
            properties_text(&many).unwrap_err(),
            "properties: 1001 keys, the limit is 1000"
        );
        let shape = |t: &str| {
            let s = json_shape(t);
            (s.depth, s.keys, s.whitespace)
        };
        assert_eq!(shape("{}"), (1, 0, false));
        assert_eq!(shape("{ }"), (1, 0, true));
        assert_eq!(shape(r#"{"a":"}{,\" "}"#), (1, 1, false));
        assert_eq!(shape(r#"{"a":"\\","b":1}"#), (1, 2, false));
        assert_eq!(shape(r#"{"a":[1,2],"b":{"c":1,"d":[2]}}"#), (3, 2, false));
        assert_eq!(shape("{\"a\": [1,\n2]}"), (2, 1, true));
    }

    #[test]
    fn clock_skew_over_30_days_is_ignored() {
        let day = 86_400 * 1_000_000;
        let now = 1_800_000_000_000_000;
        assert_eq!(clock_skew(now, now - 10_000_000), 10_000_000);
        assert_eq!(clock_skew(now, now + 29 * day), -29 * day);
        assert_eq!(clock_skew(now, now - 31 * day), 0);
        assert_eq!(clock_skew(now, now + 31 * day), 0);
    }

    #[test]
    fn strings_with_and_without_escapes() {
        let s = |t: &str| {
            let raw = RawValue::from_string(t.to_string()).unwrap();
            bounded_string("f", &raw, 0, 99).map(Cow::into_owned)
        };
        assert_eq!(s(r#""plain id""#).unwrap(), "plain id");
        assert_eq!(s(r#""tab\there \u00e9""#).unwrap(), "tab\there é");
    }
}
