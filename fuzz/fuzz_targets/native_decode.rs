//! `/v1/events` bodies: JSON (array, object, envelope) and NDJSON. Every line or item is
//! either accepted or rejected with a reason; nothing panics, and every accepted event
//! passed validation.
#![no_main]

use funnelhouse_schemas::{BodyFormat, DecodeContext, decode_body};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let format = if mode & 1 == 0 {
        BodyFormat::Json
    } else {
        BodyFormat::Ndjson
    };
    let ctx = DecodeContext::new(1_794_000_000_000_000);
    if let Ok(batch) = decode_body(body, format, &ctx) {
        for e in &batch.events {
            assert!(!e.event_id().is_empty() && !e.event().is_empty() && !e.user_id().is_empty());
        }
        for r in &batch.rejected {
            assert!(!r.error.is_empty());
        }
    }
});
