//! Request bodies -> validated events: JSON array, single object, NDJSON, or the
//! `{"sent_at", "events"}` envelope. Per-event problems become [`Rejection`]s; only a
//! body that is not JSON at all is an error for the whole request.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::SchemaError;
use crate::event::Event;
use crate::validate::{DecodeContext, clock_skew, parse_ts, validate_event};

/// How the body is framed, from the request's `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// A JSON array, a single object or an envelope.
    Json,
    /// One JSON object per line.
    Ndjson,
}

/// One invalid event of a batch: its index and a reason a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub index: usize,
    pub error: String,
}

/// The outcome of decoding one request body.
#[derive(Debug, Default)]
pub struct DecodedBatch {
    pub events: Vec<Event>,
    pub rejected: Vec<Rejection>,
}

impl DecodedBatch {
    pub(crate) fn push(&mut self, index: usize, result: Result<Event, String>) {
        match result {
            Ok(event) => self.events.push(event),
            Err(error) => self.rejected.push(Rejection { index, error }),
        }
    }
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    events: Option<&'a RawValue>,
    #[serde(borrow, default)]
    sent_at: Option<&'a RawValue>,
}

/// Decode and validate a whole request body.
pub fn decode_body(
    body: &[u8],
    format: BodyFormat,
    ctx: &DecodeContext,
) -> Result<DecodedBatch, SchemaError> {
    match format {
        BodyFormat::Ndjson => Ok(decode_ndjson(body, ctx)),
        BodyFormat::Json => decode_json(body, ctx),
    }
}

fn decode_ndjson(body: &[u8], ctx: &DecodeContext) -> DecodedBatch {
    let mut out = DecodedBatch::default();
    // memchr finds the line ends several bytes at a time; `split` looks at every byte.
    let mut start = 0;
    let lines = (memchr::memchr_iter(b'\n', body).chain([body.len()]))
        .map(|end| {
            let line = &body[start..end];
            start = end + 1;
            line
        })
        .filter(|l| !l.trim_ascii().is_empty());
    for (index, line) in lines.enumerate() {
        let result = match std::str::from_utf8(line.trim_ascii()) {
            Ok(text) => validate_event(text, ctx),
            Err(_) => Err("event: line is not valid UTF-8".to_string()),
        };
        out.push(index, result);
    }
    out
}

fn decode_json(body: &[u8], ctx: &DecodeContext) -> Result<DecodedBatch, SchemaError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| SchemaError::BadBody("body is not valid UTF-8".into()))?;
    let text = text.trim();
    match text.as_bytes().first() {
        Some(b'[') => decode_array(text, ctx),
        Some(b'{') => {
            let envelope: Envelope = serde_json::from_str(text).map_err(not_json)?;
            match envelope.events {
                None => {
                    let mut out = DecodedBatch::default();
                    out.push(0, validate_event(text, ctx));
                    Ok(out)
                }
                Some(events) => {
                    let mut ctx = *ctx;
                    if let Some(sent_at) = envelope.sent_at {
                        let sent_at = parse_ts(sent_at)
                            .ok_or_else(|| SchemaError::BadBody("sent_at: not RFC 3339 or epoch ms".into()))?;
                        ctx.skew = clock_skew(ctx.received_at, sent_at);
                    }
                    if !events.get().starts_with('[') {
                        return Err(SchemaError::BadBody("events: must be an array".into()));
                    }
                    decode_array(events.get(), &ctx)
                }
            }
        }
        Some(_) => Err(SchemaError::BadBody(
            "body is not a JSON array or object (send NDJSON with Content-Type: application/x-ndjson)".into(),
        )),
        None => Err(SchemaError::BadBody("body is empty".into())),
    }
}

fn decode_array(text: &str, ctx: &DecodeContext) -> Result<DecodedBatch, SchemaError> {
    let items: Vec<&RawValue> = serde_json::from_str(text).map_err(not_json)?;
    let mut out = DecodedBatch {
        events: Vec::with_capacity(items.len()),
        rejected: Vec::new(),
    };
    for (index, item) in items.into_iter().enumerate() {
        out.push(index, validate_event(item.get(), ctx));
    }
    Ok(out)
}

pub(crate) fn not_json(e: serde_json::Error) -> SchemaError {
    SchemaError::BadBody(format!("body is not valid JSON: {e}"))
}
