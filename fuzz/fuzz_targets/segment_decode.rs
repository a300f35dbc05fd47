//! Segment bodies on the single-message routes and `/v1/batch`.
#![no_main]

use funnelhouse_schemas::{DecodeContext, MessageType, decode_segment};
use libfuzzer_sys::fuzz_target;

const ROUTES: [Option<MessageType>; 7] = [
    None,
    Some(MessageType::Track),
    Some(MessageType::Page),
    Some(MessageType::Screen),
    Some(MessageType::Identify),
    Some(MessageType::Group),
    Some(MessageType::Alias),
];

fuzz_target!(|data: &[u8]| {
    let Some((&route, body)) = data.split_first() else {
        return;
    };
    let ctx = DecodeContext::new(1_794_000_000_000_000);
    let _ = decode_segment(body, ROUTES[route as usize % ROUTES.len()], &ctx);
});
