//! The write-ahead log: numbered segment files of checksummed records.
//!
//! A record is `[len: u32 LE][crc32: u32 LE][payload]`; one record holds the accepted
//! events of one group commit. The steps are:
//! - [`Wal::open`] replays every segment after the last flushed one and starts a fresh
//!   segment. A torn or zero-filled tail (what a crash or power loss leaves) is cut at the
//!   last valid record; a bad record with valid ones after it is damage, not a tail: open
//!   refuses, naming the segment and offset, and [`check`] / [`salvage`] report it and
//!   keep every readable record;
//! - [`Wal::append`] writes a record and fsyncs it: only then may a request be acknowledged;
//! - [`Wal::rotate`] closes the current segment so its events can be flushed to Parquet;
//! - [`Wal::remove_through`] deletes segments whose events are in committed Parquet files.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use funnelhouse_schemas::Event;

use crate::error::{IngestError, Result};

const HEADER: usize = 8;
const SUFFIX: &str = ".wal";

/// The segment being appended to.
pub struct WalSegment {
    seq: u64,
    path: PathBuf,
    file: File,
    len: u64,
}

/// What replay found, for the start-up log line.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReplayStats {
    pub segments: usize,
    pub records: usize,
    pub events: usize,
    pub dropped_bytes: u64,
}

pub struct Wal {
    dir: PathBuf,
    current: WalSegment,
    /// The last append to `current` failed: the next one starts a new segment.
    failed: bool,
}

impl Wal {
    /// Replay segments numbered after `flushed_through` into `on_record`, delete older
    /// ones, and open a new segment after the last one found.
    pub fn open(
        dir: &Path,
        flushed_through: u64,
        mut on_record: impl FnMut(Vec<Event>),
    ) -> Result<(Wal, ReplayStats)> {
        crate::fsutil::create_dir_durable(dir)?;
        let mut stats = ReplayStats::default();
        let mut last = flushed_through;
        for (seq, path) in list_segments(dir)? {
            last = last.max(seq);
            if seq <= flushed_through {
                fs::remove_file(&path).map_err(IngestError::io(&path))?;
                continue;
            }
            stats.segments += 1;
            let data = fs::read(&path).map_err(IngestError::io(&path))?;
            let scan = scan_segment(&data);
            if let Some(damage) = scan.damage.filter(|d| d.records_after > 0) {
                return Err(IngestError::Corrupt {
                    path: path.clone(),
                    reason: format!(
                        "{damage}; run `funnelhouse wal check` to see it and `funnelhouse wal salvage` to keep every readable record"
                    ),
                });
            }
            for (_, events) in scan.records {
                stats.records += 1;
                stats.events += events.len();
                on_record(events);
            }
            let dropped = data.len() as u64 - scan.valid_prefix as u64;
            if dropped > 0 {
                tracing::warn!(
                    segment = %path.display(),
                    dropped_bytes = dropped,
                    kept_bytes = scan.valid_prefix,
                    "WAL segment has a torn or zero-filled tail; cut at the last valid record"
                );
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(IngestError::io(&path))?;
                f.set_len(scan.valid_prefix as u64)
                    .map_err(IngestError::io(&path))?;
                f.sync_all().map_err(IngestError::io(&path))?;
                stats.dropped_bytes += dropped;
            }
        }
        let current = WalSegment::create(dir, last + 1)?;
        Ok((
            Wal {
                dir: dir.to_path_buf(),
                current,
                failed: false,
            },
            stats,
        ))
    }

    /// Append one record and fsync it. On error the segment is cut back to its previous
    /// length, so a record that was not acknowledged is not replayed either, and it is
    /// never appended to again: after a failed write or fsync its state on disk is
    /// unknown, and later acknowledged records must not land after garbage. The next
    /// append starts a new segment (replay cuts any leftover as a tail).
    pub fn append(&mut self, payload: &[u8]) -> std::io::Result<std::time::Duration> {
        if self.failed {
            let next = WalSegment::create(&self.dir, self.current.seq + 1)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            self.current = next;
            self.failed = false;
        }
        let seg = &mut self.current;
        let mut frame = Vec::with_capacity(HEADER + payload.len());
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        frame.extend_from_slice(payload);
        let result = seg.file.write_all(&frame).and_then(|()| {
            let start = Instant::now();
            seg.file.sync_data()?;
            Ok(start.elapsed())
        });
        match result {
            Ok(d) => {
                seg.len += frame.len() as u64;
                Ok(d)
            }
            Err(e) => {
                if let Err(cut) = seg.file.set_len(seg.len).and_then(|()| seg.file.sync_all()) {
                    tracing::error!(segment = %seg.path.display(), error = %cut, "cannot cut a failed WAL append; the next append starts a new segment");
                }
                self.failed = true;
                Err(e)
            }
        }
    }

    /// Close the current segment and start the next one; returns the closed segment's number.
    pub fn rotate(&mut self) -> Result<u64> {
        let next = WalSegment::create(&self.dir, self.current.seq + 1)?;
        let closed = std::mem::replace(&mut self.current, next);
        self.failed = false;
        Ok(closed.seq)
    }

    /// Events of the segments after `flushed_through`, read without changing anything
    /// (a torn tail is skipped, not cut): for readers of a data dir a server may own.
    pub fn read_unflushed(dir: &Path, flushed_through: u64) -> Result<Vec<Vec<Event>>> {
        let mut out = Vec::new();
        if !dir.exists() {
            return Ok(out);
        }
        for (seq, path) in list_segments(dir)? {
            if seq <= flushed_through {
                continue;
            }
            let data = match fs::read(&path) {
                Ok(d) => d,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(IngestError::io(&path)(e)),
            };
            out.extend(scan_segment(&data).records.into_iter().map(|(_, e)| e));
        }
        Ok(out)
    }

    pub fn current_seq(&self) -> u64 {
        self.current.seq
    }

    pub fn current_len(&self) -> u64 {
        self.current.len
    }

    /// Delete segments numbered `<= seq`: their events are in committed Parquet files.
    /// One that cannot go does not keep the others.
    pub fn remove_through(dir: &Path, seq: u64) -> Result<()> {
        let mut first_error = None;
        for (s, path) in list_segments(dir)? {
            if s > seq {
                continue;
            }
            if let Err(e) = fs::remove_file(&path) {
                first_error.get_or_insert(IngestError::io(&path)(e));
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl WalSegment {
    fn create(dir: &Path, seq: u64) -> Result<Self> {
        let path = dir.join(format!("{seq:020}{SUFFIX}"));
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(IngestError::io(&path))?;
        crate::fsutil::sync_dir(dir)?;
        Ok(WalSegment {
            seq,
            path,
            file,
            len: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(IngestError::io(dir))? {
        let path = entry.map_err(IngestError::io(dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(seq) = name
            .strip_suffix(SUFFIX)
            .and_then(|s| s.parse::<u64>().ok())
        {
            out.push((seq, path));
        }
    }
    out.sort();
    Ok(out)
}

/// What a segment holds: its readable records, and where it stops being readable.
#[derive(Debug, Default)]
pub struct SegmentScan {
    /// (offset, events) of every readable record, the ones after damage included.
    pub records: Vec<(usize, Vec<Event>)>,
    /// Length of the run of readable records from the start.
    pub valid_prefix: usize,
    /// The first unreadable record, if any.
    pub damage: Option<Damage>,
}

/// An unreadable record. With `records_after == 0` it is a tail (torn by a crash,
/// zero-filled by a power loss) and is cut; otherwise readable records follow it.
#[derive(Debug, Clone)]
pub struct Damage {
    pub offset: usize,
    pub reason: String,
    pub records_after: usize,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "unreadable record at byte offset {} ({}) with {} readable records after it",
            self.offset, self.reason, self.records_after
        )
    }
}

/// The record at `pos`: its events and length, or why it is unreadable.
fn read_record(data: &[u8], pos: usize) -> std::result::Result<(Vec<Event>, usize), String> {
    let header = data
        .get(pos..pos + HEADER)
        .ok_or("header cut short (torn write)")?;
    let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().unwrap());
    if len == 0 {
        // Never written (a record holds at least its event count): zero fill.
        return Err("zero length (zero-filled)".into());
    }
    let payload = data
        .get(pos + HEADER..pos + HEADER + len)
        .ok_or("payload cut short (torn write)")?;
    if crc32fast::hash(payload) != crc {
        return Err("checksum mismatch".into());
    }
    let events = decode_events(payload)?;
    Ok((events, HEADER + len))
}

/// Read a segment: records from the start until one is unreadable; then, to tell a
/// tail from damage, every later offset that holds a readable record.
pub fn scan_segment(data: &[u8]) -> SegmentScan {
    let mut scan = SegmentScan::default();
    let mut pos = 0;
    while pos < data.len() {
        match read_record(data, pos) {
            Ok((events, len)) => {
                scan.records.push((pos, events));
                pos += len;
            }
            Err(reason) => {
                scan.damage = Some(Damage {
                    offset: pos,
                    reason,
                    records_after: 0,
                });
                break;
            }
        }
    }
    scan.valid_prefix = pos;
    let Some(damage) = scan.damage.as_mut() else {
        return scan;
    };
    if data[pos..].iter().all(|&b| b == 0) {
        return scan;
    }
    // Resynchronise: a readable record can start at any later byte.
    let mut at = pos + 1;
    while at + HEADER <= data.len() {
        match read_record(data, at) {
            Ok((events, len)) => {
                scan.records.push((at, events));
                damage.records_after += 1;
                at += len;
            }
            Err(_) => at += 1,
        }
    }
    scan
}

/// One segment as `funnelhouse wal check` reports it.
#[derive(Debug)]
pub struct SegmentReport {
    pub path: PathBuf,
    pub bytes: usize,
    pub records: usize,
    pub events: usize,
    pub damage: Option<Damage>,
}

impl SegmentReport {
    fn of(path: PathBuf, data: &[u8], scan: &SegmentScan) -> Self {
        Self {
            path,
            bytes: data.len(),
            records: scan.records.len(),
            events: scan.records.iter().map(|(_, e)| e.len()).sum(),
            damage: scan.damage.clone(),
        }
    }
}

/// Every segment of `data_dir/wal`: what is readable and where it is damaged. Changes
/// nothing.
pub fn check(wal_dir: &Path) -> Result<Vec<SegmentReport>> {
    let mut out = Vec::new();
    if !wal_dir.exists() {
        return Ok(out);
    }
    for (_, path) in list_segments(wal_dir)? {
        let data = fs::read(&path).map_err(IngestError::io(&path))?;
        out.push(SegmentReport::of(path, &data, &scan_segment(&data)));
    }
    Ok(out)
}

/// Rewrite every segment with damage before its tail so that it holds each readable
/// record, in order, and nothing else; the original is kept as `<segment>.damaged`.
/// Returns the segments rewritten. The data dir must not be in use (the caller locks it).
pub fn salvage(wal_dir: &Path) -> Result<Vec<SegmentReport>> {
    let mut out = Vec::new();
    for report in check(wal_dir)? {
        if report.damage.as_ref().is_none_or(|d| d.records_after == 0) {
            continue;
        }
        let path = &report.path;
        let data = fs::read(path).map_err(IngestError::io(path))?;
        let mut clean = Vec::with_capacity(data.len());
        for (_, events) in scan_segment(&data).records {
            let mut payload = Vec::new();
            encode_events(events.iter(), &mut payload);
            clean.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            clean.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            clean.extend_from_slice(&payload);
        }
        let mut keep = path.clone().into_os_string();
        keep.push(".damaged");
        fs::copy(path, &keep).map_err(IngestError::io(PathBuf::from(&keep)))?;
        crate::fsutil::write_atomic(path, &clean)?;
        out.push(report);
    }
    Ok(out)
}

// ---- record payload: the events of one group commit ----

const NO_PROPERTIES: u32 = u32::MAX;

/// Append the binary encoding of `events` to `out`.
pub fn encode_events<'a>(events: impl ExactSizeIterator<Item = &'a Event>, out: &mut Vec<u8>) {
    out.extend_from_slice(&(events.len() as u32).to_le_bytes());
    for e in events {
        for s in [&e.event_id, &e.event, &e.user_id, &e.campaign, &e.channel] {
            put_str(out, s);
        }
        out.extend_from_slice(&e.ts.to_le_bytes());
        out.extend_from_slice(&e.received_at.to_le_bytes());
        match &e.properties {
            Some(p) => put_str(out, p),
            None => out.extend_from_slice(&NO_PROPERTIES.to_le_bytes()),
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

pub fn decode_events(mut buf: &[u8]) -> std::result::Result<Vec<Event>, String> {
    let n = take_u32(&mut buf)? as usize;
    let mut events = Vec::with_capacity(n.min(1 << 20));
    for _ in 0..n {
        let event_id = take_str(&mut buf)?;
        let event = take_str(&mut buf)?;
        let user_id = take_str(&mut buf)?;
        let campaign = take_str(&mut buf)?;
        let channel = take_str(&mut buf)?;
        let ts = take_i64(&mut buf)?;
        let received_at = take_i64(&mut buf)?;
        let properties = if buf.get(..4) == Some(&NO_PROPERTIES.to_le_bytes()[..]) {
            buf = &buf[4..];
            None
        } else {
            Some(take_str(&mut buf)?)
        };
        events.push(Event {
            event_id,
            event,
            user_id,
            campaign,
            channel,
            ts,
            received_at,
            properties,
        });
    }
    if !buf.is_empty() {
        return Err(format!("{} trailing bytes in a WAL record", buf.len()));
    }
    Ok(events)
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> std::result::Result<&'a [u8], String> {
    if buf.len() < n {
        return Err("truncated WAL record".to_string());
    }
    let (head, tail) = buf.split_at(n);
    *buf = tail;
    Ok(head)
}

fn take_u32(buf: &mut &[u8]) -> std::result::Result<u32, String> {
    Ok(u32::from_le_bytes(take(buf, 4)?.try_into().unwrap()))
}

fn take_i64(buf: &mut &[u8]) -> std::result::Result<i64, String> {
    Ok(i64::from_le_bytes(take(buf, 8)?.try_into().unwrap()))
}

fn take_str(buf: &mut &[u8]) -> std::result::Result<String, String> {
    let n = take_u32(buf)? as usize;
    String::from_utf8(take(buf, n)?.to_vec())
        .map_err(|_| "non-UTF-8 string in a WAL record".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, props: Option<&str>) -> Event {
        Event {
            event_id: id.into(),
            event: "scan".into(),
            user_id: "u".into(),
            campaign: "c".into(),
            channel: String::new(),
            ts: 1,
            received_at: 2,
            properties: props.map(Into::into),
        }
    }

    #[test]
    fn torn_tail_is_cut_and_earlier_records_survive() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 0, |_| panic!("empty")).unwrap();
        for i in 0..3 {
            let mut buf = Vec::new();
            let e = event(&format!("e{i}"), (i == 1).then_some("{\"a\":1}"));
            encode_events([&e].into_iter(), &mut buf);
            wal.append(&buf).unwrap();
        }
        let path = wal.current.path().to_path_buf();
        drop(wal);
        let full = fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(full - 3).unwrap();
        let mut seen = Vec::new();
        let (wal, stats) = Wal::open(dir.path(), 0, |evs| seen.extend(evs)).unwrap();
        assert_eq!(
            seen,
            vec![event("e0", None), event("e1", Some("{\"a\":1}"))]
        );
        assert!(stats.dropped_bytes > 0);
        assert_eq!(wal.current_seq(), 2);
    }
}
