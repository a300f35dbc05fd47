//! gzip request bodies: any input is decompressed or refused, and never past the limit
//! (gzip bombs included).
#![no_main]

use funnelhouse_ingest::collector::gunzip_within;
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    if let Ok(out) = gunzip_within(data, LIMIT) {
        assert!(out.len() <= LIMIT);
    }
});
