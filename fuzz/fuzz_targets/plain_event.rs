//! One event object through the plain fast path and the general path: whatever the fast
//! path takes, the general path accepts as the same event; neither panics.
#![no_main]

use funnelhouse_schemas::{DecodeContext, plain_and_general};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let ctx = DecodeContext::new(1_794_000_000_000_000);
    if let (Some(fast), general) = plain_and_general(text, &ctx) {
        assert_eq!(Ok(fast), general, "{text}");
    }
});
