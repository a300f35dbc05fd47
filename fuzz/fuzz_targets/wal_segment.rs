//! WAL segments as a crash, a power loss or a bad disk can leave them: the reader finds
//! every readable record, tells a tail from damage, and never panics.
#![no_main]

use funnelhouse_storage::wal::{decode_events, scan_segment};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let scan = scan_segment(1, data);
    assert!(scan.valid_prefix <= data.len());
    let mut last = None;
    for (at, _) in &scan.records {
        assert!(*at < data.len());
        assert!(last.is_none_or(|l| l < *at), "records in order");
        last = Some(*at);
    }
    if let Some(d) = &scan.damage {
        assert_eq!(d.offset, scan.valid_prefix);
    }
    let _ = decode_events(data);
});
