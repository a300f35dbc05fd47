//! Segment-compatible messages -> events, so existing SDKs (segment-analytics-python,
//! rudder-sdk-python, analytics-next, ...) send to Funnelhouse unchanged.
//!
//! The mapping is the contract's: messageId -> event_id, userId else anonymousId ->
//! user_id, properties.campaign else context.campaign.name -> campaign,
//! context.campaign.source else properties.channel -> channel, timestamp -> ts
//! (skew-corrected with sentAt), properties -> properties. track keeps its event name
//! as sent; page and screen become `view` with their name in `properties.name`;
//! identify, group and alias become `$identify`, `$group` and `$alias` (with traits,
//! groupId or previousId as properties). The message's own `channel` ("server",
//! "browser") says which SDK sent it, not which campaign channel, and is ignored.

use std::borrow::Cow;
use std::collections::HashMap;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::decode::{DecodedBatch, not_json};
use crate::error::SchemaError;
use crate::event::{Event, EventRef, limits};
use crate::validate::{
    DecodeContext, bounded_string, clock_skew, event_ts, json_kind, parse_ts, properties_text,
};

/// The message types of the Segment spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Track,
    Page,
    Screen,
    Identify,
    Group,
    Alias,
}

impl MessageType {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "track" => Self::Track,
            "page" => Self::Page,
            "screen" => Self::Screen,
            "identify" => Self::Identify,
            "group" => Self::Group,
            "alias" => Self::Alias,
            _ => return None,
        })
    }
}

/// A decoded Segment request: the events, the per-item rejections, and the write key
/// the body carried (Segment SDKs may send it as `writeKey` instead of a header).
#[derive(Debug, Default)]
pub struct SegmentBatch {
    pub decoded: DecodedBatch,
    pub write_key: Option<String>,
    /// track events whose name is over 64 bytes: dropped, as the contract says.
    pub long_names: usize,
}

/// The batch envelope of `/v1/batch`, `/v1/import` and `/v1/b`.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    batch: Option<Vec<&'a RawValue>>,
    #[serde(borrow, default)]
    context: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "sentAt")]
    sent_at: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "writeKey")]
    write_key: Option<Cow<'a, str>>,
}

/// One message, every field still raw so each can be checked and named on its own.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Message<'a> {
    #[serde(borrow, default, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    message_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    user_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    anonymous_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    event: Option<&'a RawValue>,
    #[serde(borrow, default)]
    name: Option<&'a RawValue>,
    #[serde(borrow, default)]
    properties: Option<&'a RawValue>,
    #[serde(borrow, default)]
    traits: Option<&'a RawValue>,
    #[serde(borrow, default)]
    context: Option<&'a RawValue>,
    #[serde(borrow, default)]
    timestamp: Option<&'a RawValue>,
    #[serde(borrow, default)]
    original_timestamp: Option<&'a RawValue>,
    #[serde(borrow, default)]
    sent_at: Option<&'a RawValue>,
    #[serde(borrow, default)]
    group_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    previous_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    write_key: Option<Cow<'a, str>>,
}

/// Decode a Segment request body. `route_type` is the type a single-message route
/// implies (`/v1/track`, `/v1/p`, ...); `None` for the batch routes, where each item
/// names its own `type`.
pub fn decode_segment(
    body: &[u8],
    route_type: Option<MessageType>,
    ctx: &DecodeContext,
) -> Result<SegmentBatch, SchemaError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| SchemaError::BadBody("body is not valid UTF-8".into()))?
        .trim();
    if !text.starts_with('{') {
        return Err(SchemaError::BadBody(
            "body is not a JSON object: send a Segment message or {\"batch\": [...]}".into(),
        ));
    }
    let mut out = SegmentBatch::default();
    match route_type {
        Some(kind) => {
            let message: Message = serde_json::from_str(text).map_err(not_json)?;
            out.write_key = message.write_key.as_deref().map(str::to_string);
            let mut ctx = *ctx;
            if let Some(sent_at) = message.sent_at.and_then(parse_ts) {
                ctx.skew = clock_skew(ctx.received_at, sent_at);
            }
            let result = to_event(text, &message, Some(kind), None, &ctx, &mut out.long_names);
            out.decoded.push(0, result);
        }
        None => {
            let envelope: Envelope = serde_json::from_str(text).map_err(not_json)?;
            out.write_key = envelope.write_key.as_deref().map(str::to_string);
            let items = envelope.batch.ok_or_else(|| {
                SchemaError::BadBody("batch: missing (send {\"batch\": [...]})".into())
            })?;
            let mut batch_ctx = *ctx;
            if let Some(sent_at) = envelope.sent_at.and_then(parse_ts) {
                batch_ctx.skew = clock_skew(ctx.received_at, sent_at);
            }
            out.decoded.events.reserve(items.len());
            for (index, item) in items.into_iter().enumerate() {
                let result = decode_item(item.get(), envelope.context, &batch_ctx, &mut out);
                out.decoded.push(index, result);
            }
        }
    }
    Ok(out)
}

fn decode_item(
    text: &str,
    batch_context: Option<&RawValue>,
    ctx: &DecodeContext,
    out: &mut SegmentBatch,
) -> Result<Event, String> {
    if !text.starts_with('{') {
        return Err(format!(
            "message: must be an object, got {}",
            json_kind(text)
        ));
    }
    let message: Message =
        serde_json::from_str(text).map_err(|e| format!("message: invalid JSON object ({e})"))?;
    let mut ctx = *ctx;
    if let Some(sent_at) = message.sent_at.and_then(parse_ts) {
        ctx.skew = clock_skew(ctx.received_at, sent_at);
    }
    to_event(
        text,
        &message,
        None,
        batch_context,
        &ctx,
        &mut out.long_names,
    )
}

fn to_event(
    text: &str,
    m: &Message,
    route_type: Option<MessageType>,
    batch_context: Option<&RawValue>,
    ctx: &DecodeContext,
    long_names: &mut usize,
) -> Result<Event, String> {
    if text.len() > ctx.max_event_bytes {
        return Err(format!(
            "max_event_bytes: message is {} bytes, the limit is {}",
            text.len(),
            ctx.max_event_bytes
        ));
    }
    let kind = match (route_type, m.kind.as_deref()) {
        (Some(kind), _) => kind,
        (None, Some(name)) => MessageType::parse(name).ok_or_else(|| {
            format!("type: {name:?} is not one of track, page, screen, identify, group, alias")
        })?,
        (None, None) => return Err("type: missing".into()),
    };
    let properties = object(m.properties, "properties")?;
    let contexts = [
        object(m.context, "context")?,
        object(batch_context, "context")?,
    ];
    let in_context = |outer: &str, inner: &str| {
        contexts
            .iter()
            .flatten()
            .find_map(|c| lookup(c, outer).and_then(|v| lookup(&parse_object(v)?, inner)))
    };

    // The one key a type adds to the stored properties, if the sender left it out.
    let (event, extra): (Cow<str>, Option<(&str, &RawValue)>) = match kind {
        MessageType::Track => {
            let name = m.event.ok_or("event: missing")?;
            let name = bounded_string("event", name, 1, usize::MAX)?;
            if name.len() > limits::EVENT_NAME_MAX {
                *long_names += 1;
                return Err(format!(
                    "event: name is {} bytes, the limit is {}; the event was dropped",
                    name.len(),
                    limits::EVENT_NAME_MAX
                ));
            }
            (name, None)
        }
        MessageType::Page | MessageType::Screen => ("view".into(), m.name.map(|n| ("name", n))),
        MessageType::Identify => ("$identify".into(), None),
        MessageType::Group => ("$group".into(), m.group_id.map(|g| ("groupId", g))),
        MessageType::Alias => ("$alias".into(), m.previous_id.map(|p| ("previousId", p))),
    };

    let event_id = match m.message_id {
        Some(v) => id_text("messageId", v, limits::EVENT_ID_MAX)?,
        None => Cow::Owned(uuid::Uuid::now_v7().to_string()),
    };
    let user_id = match (m.user_id, m.anonymous_id) {
        (Some(v), _) => id_text("userId", v, limits::USER_ID_MAX)?,
        (None, Some(v)) => id_text("anonymousId", v, limits::USER_ID_MAX)?,
        (None, None) => return Err("userId: missing, and no anonymousId either".into()),
    };
    let from_properties = |key: &str| properties.as_ref().and_then(|p| lookup(p, key));
    let campaign = match from_properties("campaign").or_else(|| in_context("campaign", "name")) {
        Some(v) => scalar_text("campaign", v, limits::CAMPAIGN_MAX)?,
        None => Cow::Borrowed(""),
    };
    let channel = match in_context("campaign", "source").or_else(|| from_properties("channel")) {
        Some(v) => scalar_text("channel", v, limits::CHANNEL_MAX)?,
        None => Cow::Borrowed(""),
    };
    let ts = event_ts("timestamp", m.timestamp.or(m.original_timestamp), ctx)?;

    // identify and group carry traits rather than properties (rudder-sdk-python sends
    // identify's in context.traits).
    let traits = match kind {
        MessageType::Identify | MessageType::Group if m.properties.is_none() => m
            .traits
            .or_else(|| contexts[0].as_ref().and_then(|c| lookup(c, "traits"))),
        _ => None,
    };
    let traits_keys = object(traits, "traits")?;
    let (base, base_keys) = match traits {
        Some(t) => (Some(t), &traits_keys),
        None => (m.properties, &properties),
    };
    let extra = extra.filter(|(k, _)| base_keys.as_ref().is_none_or(|o| !o.contains_key(*k)));
    let properties = match (base, extra) {
        (None, None) => None,
        // The common case: the properties as sent, nothing to add.
        (Some(base), None) => Some(properties_text(base)?),
        (base, extra) => {
            let text = with_key(base.map(RawValue::get), extra);
            let raw = RawValue::from_string(text).map_err(|e| format!("properties: {e}"))?;
            Some(Cow::Owned(properties_text(&raw)?.into_owned()))
        }
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

type Object<'a> = HashMap<Cow<'a, str>, &'a RawValue>;

fn parse_object(value: &RawValue) -> Option<Object<'_>> {
    serde_json::from_str(value.get()).ok()
}

/// A JSON object field, or an error naming it when it is something else.
fn object<'a>(value: Option<&'a RawValue>, field: &str) -> Result<Option<Object<'a>>, String> {
    match value {
        None => Ok(None),
        Some(v) if v.get().starts_with('{') => parse_object(v)
            .map(Some)
            .ok_or_else(|| format!("{field}: invalid JSON object")),
        Some(v) => Err(format!(
            "{field}: must be an object, got {}",
            json_kind(v.get())
        )),
    }
}

/// A key of an object, JSON `null` counting as absent.
fn lookup<'a>(object: &Object<'a>, key: &str) -> Option<&'a RawValue> {
    object.get(key).copied().filter(|v| v.get() != "null")
}

/// Segment ids may be strings or numbers (`userId: 42`); both are stored as text.
fn id_text<'a>(field: &str, value: &'a RawValue, max: usize) -> Result<Cow<'a, str>, String> {
    scalar_text(field, value, max).and_then(|s| {
        if s.is_empty() {
            Err(format!("{field}: must not be empty"))
        } else {
            Ok(s)
        }
    })
}

/// A string, or a number as its JSON text, of at most `max` bytes.
fn scalar_text<'a>(field: &str, value: &'a RawValue, max: usize) -> Result<Cow<'a, str>, String> {
    let text = value.get();
    if text.starts_with('"') {
        return bounded_string(field, value, 0, max);
    }
    match json_kind(text) {
        "a number" if text.len() <= max => Ok(Cow::Borrowed(text)),
        kind => Err(format!("{field}: must be a string, got {kind}")),
    }
}

/// The JSON object `base` (or `{}`) with `extra` added as its first key.
fn with_key(base: Option<&str>, extra: Option<(&str, &RawValue)>) -> String {
    let inner = base
        .map(str::trim)
        .and_then(|b| b.strip_prefix('{')?.strip_suffix('}'))
        .map(str::trim)
        .unwrap_or("");
    let first = extra.map(|(key, value)| {
        format!(
            "{}:{}",
            serde_json::to_string(key).unwrap_or_default(),
            value.get()
        )
    });
    match (first, inner.is_empty()) {
        (Some(first), true) => format!("{{{first}}}"),
        (Some(first), false) => format!("{{{first},{inner}}}"),
        (None, _) => format!("{{{inner}}}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(body: &str, kind: Option<MessageType>) -> SegmentBatch {
        let ctx = DecodeContext::new(1_800_000_000_000_000);
        decode_segment(body.as_bytes(), kind, &ctx).unwrap()
    }

    #[test]
    fn page_becomes_view_with_its_name() {
        let out = decode(
            r#"{"anonymousId":"a1","name":"Home","properties":{"campaign":"c","url":"/x"},"context":{"campaign":{"source":"jd"}},"channel":"browser"}"#,
            Some(MessageType::Page),
        );
        let e = &out.decoded.events[0];
        assert_eq!((e.event(), e.user_id()), ("view", "a1"));
        assert_eq!((e.campaign(), e.channel()), ("c", "jd"));
        assert_eq!(
            e.properties(),
            Some(r#"{"name":"Home","campaign":"c","url":"/x"}"#)
        );
    }

    #[test]
    fn batch_context_is_merged_and_item_context_wins() {
        let out = decode(
            r#"{"writeKey":"wk","context":{"campaign":{"name":"outer","source":"tmall"}},"batch":[
                {"type":"track","event":"scan","userId":7,"context":{"campaign":{"source":"jd"}}},
                {"type":"identify","userId":"u","traits":{"plan":"gold"}},
                {"type":"bogus","userId":"u"},
                {"type":"alias","previousId":"old","userId":"new"}]}"#,
            None,
        );
        assert_eq!(out.write_key.as_deref(), Some("wk"));
        let [scan, identify, alias] = &out.decoded.events[..] else {
            panic!("{:?}", out.decoded)
        };
        assert_eq!(
            (scan.user_id(), scan.campaign(), scan.channel()),
            ("7", "outer", "jd")
        );
        assert_eq!(identify.event(), "$identify");
        assert_eq!(identify.properties(), Some(r#"{"plan":"gold"}"#));
        assert_eq!(alias.properties(), Some(r#"{"previousId":"old"}"#));
        assert_eq!(out.decoded.rejected[0].index, 2);
        assert!(out.decoded.rejected[0].error.starts_with("type:"));
    }

    #[test]
    fn long_track_names_are_dropped_and_counted() {
        let name = "x".repeat(65);
        let out = decode(
            &format!(r#"{{"batch":[{{"type":"track","event":"{name}","userId":"u"}}]}}"#),
            None,
        );
        assert_eq!(out.long_names, 1);
        assert!(out.decoded.events.is_empty());
    }

    #[test]
    fn timestamps_follow_the_native_rules() {
        let mut ctx = DecodeContext::new(1_800_000_000_000_000);
        ctx.max_future = Some(3_600_000_000);
        let body = r#"{"batch":[
            {"type":"track","event":"e","userId":"u","timestamp":"2099-01-01T00:00:00Z"},
            {"type":"track","event":"e","userId":"u","timestamp":1700000000}]}"#;
        let out = decode_segment(body.as_bytes(), None, &ctx).unwrap();
        let errors: Vec<&str> = out
            .decoded
            .rejected
            .iter()
            .map(|r| r.error.as_str())
            .collect();
        assert!(errors[0].contains("max_future"), "{errors:?}");
        assert!(errors[1].contains("before 2000"), "{errors:?}");
    }

    #[test]
    fn sent_at_corrects_the_device_clock() {
        // The device clock is 10 s behind the server's.
        let received = 1_800_000_000_000_000;
        let sent = crate::time::format_micros(received - 10_000_000);
        let ts = crate::time::format_micros(received - 60_000_000);
        let out = decode(
            &format!(
                r#"{{"sentAt":"{sent}","batch":[{{"type":"track","event":"e","userId":"u","timestamp":"{ts}"}}]}}"#
            ),
            None,
        );
        assert_eq!(out.decoded.events[0].ts, received - 50_000_000);
    }
}
