//! Funnel requests as a POST body (JSON) and as GET query parameters.
#![no_main]

use std::collections::HashMap;

use funnelhouse_query::FunnelRequest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(req) = serde_json::from_str::<FunnelRequest>(text) {
        if let Ok(spec) = req.into_spec() {
            assert!(!spec.steps.is_empty());
            assert!(spec.window_secs >= 0);
        }
    }
    let params: HashMap<String, String> = text
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if let Ok(req) = FunnelRequest::from_query(&params) {
        let _ = req.into_spec();
    }
});
