//! The write-ahead log: numbered segment files of checksummed records.
//!
//! A record is `[len: u32 LE][crc32: u32 LE][payload]`; one record holds the accepted
//! events of one group commit. The steps are:
//! - [`Wal::open`] replays every segment after the last flushed one and starts a fresh
//!   segment. A torn or zero-filled tail (what a crash or power loss leaves) is cut at the
//!   last valid record; a bad record with valid ones after it is damage, not a tail: open
//!   refuses, naming the segment and offset, and [`check`] / [`salvage`] report it and
//!   keep every readable record;
//! - [`Wal::append`] writes a record and fsyncs it: only then may a request be acknowledged.
//!   A failed append is cut back, and the segment is abandoned: the next append opens a
//!   new segment whose first record is a cut mark, "segment N ends at byte L", so replay
//!   ignores whatever the failed write left in N even when the cut itself failed;
//! - [`Wal::rotate`] closes the current segment so its events can be flushed to Parquet;
//! - [`Wal::remove_through`] deletes segments whose events are in committed Parquet files.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use funnelhouse_schemas::{Event, EventRef};

use crate::disk::{Disk, DiskFile};
use crate::error::{Result, StorageError};

const HEADER: usize = 8;
const SUFFIX: &str = ".wal";
/// First bytes of a cut mark's payload; an events payload starts with its event count,
/// which never comes near this.
const CUT_MARK: u32 = u32::MAX;
const CUT_MARK_LEN: usize = 4 + 8 + 8;

/// The segment being appended to.
pub struct WalSegment {
    seq: u64,
    path: PathBuf,
    file: Box<dyn DiskFile>,
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
    disk: Arc<dyn Disk>,
    current: WalSegment,
    next_seq: u64,
    /// The last append to `current` failed: the next one starts a new segment.
    failed: bool,
}

impl Wal {
    /// Replay segments numbered after `flushed_through` into `on_record`, delete older
    /// ones, and open a new segment after the last one found.
    pub fn open(
        dir: &Path,
        flushed_through: u64,
        disk: Arc<dyn Disk>,
        mut on_record: impl FnMut(u64, Vec<Event>),
    ) -> Result<(Wal, ReplayStats)> {
        crate::fsutil::create_dir_durable(&*disk, dir)?;
        let mut stats = ReplayStats::default();
        let mut last = flushed_through;
        let segments = list_segments(dir)?;
        let cuts = cut_marks(&segments)?;
        for (seq, path) in segments {
            last = last.max(seq);
            if seq <= flushed_through {
                fs::remove_file(&path).map_err(StorageError::io(&path))?;
                continue;
            }
            stats.segments += 1;
            let data = read_segment(seq, &path, &cuts)?;
            // Records go to `on_record` as they are decoded, so replay holds one record's
            // events at a time, not a segment's. Damage makes open fail, and the caller
            // drops what it was handed.
            let (valid_prefix, damage) = scan_records(&data, |_, events| {
                // A cut mark is an empty record.
                if !events.is_empty() {
                    stats.records += 1;
                    stats.events += events.len();
                    on_record(seq, events);
                }
            });
            if let Some(damage) = damage.filter(|d| d.records_after > 0) {
                return Err(StorageError::Corrupt {
                    path: path.clone(),
                    reason: format!(
                        "{damage}; run `funnelhouse wal check` to see it and `funnelhouse wal salvage` to keep every readable record"
                    ),
                });
            }
            let dropped = data.len() as u64 - valid_prefix as u64;
            if dropped > 0 && !cuts.contains_key(&seq) {
                tracing::warn!(
                    segment = %path.display(),
                    dropped_bytes = dropped,
                    kept_bytes = valid_prefix,
                    "WAL segment has a torn or zero-filled tail; cut at the last valid record"
                );
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(StorageError::io(&path))?;
                f.set_len(valid_prefix as u64)
                    .map_err(StorageError::io(&path))?;
                f.sync_all().map_err(StorageError::io(&path))?;
                stats.dropped_bytes += dropped;
            }
        }
        let current = WalSegment::create(&*disk, dir, last + 1)?;
        Ok((
            Wal {
                dir: dir.to_path_buf(),
                disk,
                current,
                next_seq: last + 2,
                failed: false,
            },
            stats,
        ))
    }

    /// Append one record and fsync it. On error the segment is cut back to its previous
    /// length, so a record that was not acknowledged is not replayed either, and it is
    /// never appended to again: after a failed write or fsync its state on disk is
    /// unknown, and later acknowledged records must not land after garbage. The next
    /// append starts a new segment with a cut mark for this one, which replay obeys even
    /// if the cut here failed or was lost.
    pub fn append(&mut self, payload: &[u8]) -> std::io::Result<std::time::Duration> {
        if self.failed {
            self.start_after_failure()?;
        }
        let seg = &mut self.current;
        match write_record(&mut *seg.file, payload) {
            Ok(d) => {
                seg.len += (HEADER + payload.len()) as u64;
                Ok(d)
            }
            Err(e) => {
                if let Err(cut) = seg.file.set_len(seg.len).and_then(|()| seg.file.sync()) {
                    tracing::error!(segment = %seg.path.display(), error = %cut, "cannot cut a failed WAL append; the next append starts a new segment");
                }
                self.failed = true;
                Err(e)
            }
        }
    }

    /// Open the next segment and make its first record the cut mark of the failed one.
    /// Until that mark is durable, nothing more is appended (and so nothing acknowledged).
    /// A segment whose mark could not be written is left behind (at most a torn tail,
    /// or the same mark) and the next attempt takes the number after it.
    fn start_after_failure(&mut self) -> std::io::Result<()> {
        let mut next = self
            .next_segment()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut mark = Vec::with_capacity(CUT_MARK_LEN);
        mark.extend_from_slice(&CUT_MARK.to_le_bytes());
        mark.extend_from_slice(&self.current.seq.to_le_bytes());
        mark.extend_from_slice(&self.current.len.to_le_bytes());
        write_record(&mut *next.file, &mark)?;
        next.len = (HEADER + mark.len()) as u64;
        let failed = std::mem::replace(&mut self.current, next);
        tracing::warn!(
            abandoned = %failed.path.display(),
            valid_bytes = failed.len,
            segment = %self.current.path.display(),
            "WAL continues in a new segment after a failed append"
        );
        self.failed = false;
        Ok(())
    }

    /// Close the current segment and start the next one; returns the closed segment's number.
    /// After a failed append the closed segment is cut by the next one's mark.
    pub fn rotate(&mut self) -> Result<u64> {
        if self.failed {
            self.start_after_failure()
                .map_err(StorageError::io(&self.dir))?;
        }
        let next = self.next_segment()?;
        let closed = std::mem::replace(&mut self.current, next);
        Ok(closed.seq)
    }

    /// Create the next segment. Every attempt takes a new number, so one whose file was
    /// created before a failure is never created again.
    fn next_segment(&mut self) -> Result<WalSegment> {
        let seq = self.next_seq;
        self.next_seq += 1;
        WalSegment::create(&*self.disk, &self.dir, seq)
    }

    /// Events of the segments after `flushed_through`, read without changing anything
    /// (a torn tail is skipped, not cut): for readers of a data dir a server may own.
    pub fn read_unflushed(dir: &Path, flushed_through: u64) -> Result<Vec<Vec<Event>>> {
        let mut out = Vec::new();
        if !dir.exists() {
            return Ok(out);
        }
        let segments = list_segments(dir)?;
        let cuts = cut_marks(&segments)?;
        for (seq, path) in segments {
            if seq <= flushed_through {
                continue;
            }
            let data = match read_segment(seq, &path, &cuts) {
                Ok(d) => d,
                Err(StorageError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            let records = scan_segment(&data).records.into_iter();
            out.extend(records.map(|(_, e)| e).filter(|e| !e.is_empty()));
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
                first_error.get_or_insert(StorageError::io(&path)(e));
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Write one framed record and fsync it; returns the time the fsync and the page-cache
/// release after it took (both delay the ack).
fn write_record(file: &mut dyn DiskFile, payload: &[u8]) -> std::io::Result<std::time::Duration> {
    let mut header = [0u8; HEADER];
    header[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    header[4..].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    // Two writes rather than a copy of the payload behind its header: a torn record is
    // a torn record however it was written, and the copy was a megabyte per commit.
    file.write_all(&header)?;
    file.write_all(payload)?;
    let start = Instant::now();
    file.sync()?;
    file.release_synced();
    Ok(start.elapsed())
}

impl WalSegment {
    fn create(disk: &dyn Disk, dir: &Path, seq: u64) -> Result<Self> {
        let path = dir.join(format!("{seq:020}{SUFFIX}"));
        let file = disk.create(&path).map_err(StorageError::io(&path))?;
        crate::fsutil::sync_dir(disk, dir)?;
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

/// The cut marks of `segments`: segment number -> bytes of it that count.
fn cut_marks(segments: &[(u64, PathBuf)]) -> Result<HashMap<u64, u64>> {
    use std::io::Read;
    let mut cuts = HashMap::new();
    for (_, path) in segments {
        let mut head = Vec::with_capacity(HEADER + CUT_MARK_LEN);
        match fs::File::open(path) {
            Ok(f) => f
                .take((HEADER + CUT_MARK_LEN) as u64)
                .read_to_end(&mut head)
                .map_err(StorageError::io(path))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(StorageError::io(path)(e)),
        };
        if let Some((seq, len)) = read_record(&head, 0).ok().and_then(|r| r.cut) {
            let at = cuts.entry(seq).or_insert(len);
            *at = (*at).min(len);
        }
    }
    Ok(cuts)
}

/// A segment's bytes, up to its cut mark if a later segment has one.
fn read_segment(seq: u64, path: &Path, cuts: &HashMap<u64, u64>) -> Result<Vec<u8>> {
    let mut data = fs::read(path).map_err(StorageError::io(path))?;
    if let Some(&len) = cuts.get(&seq) {
        data.truncate(len as usize);
    }
    Ok(data)
}

fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(StorageError::io(dir))? {
        let path = entry.map_err(StorageError::io(dir))?.path();
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

/// A readable record: the events of a group commit, or a cut mark.
struct Record {
    events: Vec<Event>,
    /// (segment, valid bytes) of a cut mark.
    cut: Option<(u64, u64)>,
    len: usize,
}

/// The record at `pos`, or why it is unreadable.
fn read_record(data: &[u8], pos: usize) -> std::result::Result<Record, String> {
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
    if len == CUT_MARK_LEN && payload[..4] == CUT_MARK.to_le_bytes() {
        let word = |i: usize| u64::from_le_bytes(payload[i..i + 8].try_into().unwrap());
        return Ok(Record {
            events: Vec::new(),
            cut: Some((word(4), word(12))),
            len: HEADER + len,
        });
    }
    Ok(Record {
        events: decode_events(payload)?,
        cut: None,
        len: HEADER + len,
    })
}

/// Read a segment: records from the start until one is unreadable; then, to tell a
/// tail from damage, every later offset that holds a readable record.
pub fn scan_segment(data: &[u8]) -> SegmentScan {
    let mut records = Vec::new();
    let (valid_prefix, damage) = scan_records(data, |at, events| records.push((at, events)));
    SegmentScan {
        records,
        valid_prefix,
        damage,
    }
}

/// [`scan_segment`], handing each readable record (offset, events) to `on_record` as it
/// is decoded instead of collecting them; returns the valid prefix and the damage.
fn scan_records(
    data: &[u8],
    mut on_record: impl FnMut(usize, Vec<Event>),
) -> (usize, Option<Damage>) {
    let mut pos = 0;
    let mut damage = None;
    while pos < data.len() {
        match read_record(data, pos) {
            Ok(r) => {
                on_record(pos, r.events);
                pos += r.len;
            }
            Err(reason) => {
                damage = Some(Damage {
                    offset: pos,
                    reason,
                    records_after: 0,
                });
                break;
            }
        }
    }
    let Some(found) = damage.as_mut() else {
        return (pos, None);
    };
    if data[pos..].iter().all(|&b| b == 0) {
        return (pos, damage);
    }
    // Resynchronise: a readable record can start at any later byte.
    let mut at = pos + 1;
    while at + HEADER <= data.len() {
        match read_record(data, at) {
            Ok(r) => {
                on_record(at, r.events);
                found.records_after += 1;
                at += r.len;
            }
            Err(_) => at += 1,
        }
    }
    (pos, damage)
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
    let segments = list_segments(wal_dir)?;
    let cuts = cut_marks(&segments)?;
    for (seq, path) in segments {
        let data = read_segment(seq, &path, &cuts)?;
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
        let data = fs::read(path).map_err(StorageError::io(path))?;
        let mut clean = Vec::with_capacity(data.len());
        for (at, _) in scan_segment(&data).records {
            let len = read_record(&data, at).map_or(0, |r| r.len);
            clean.extend_from_slice(&data[at..at + len]);
        }
        let mut keep = path.clone().into_os_string();
        keep.push(".damaged");
        fs::copy(path, &keep).map_err(StorageError::io(PathBuf::from(&keep)))?;
        crate::fsutil::write_atomic(&crate::disk::OsDisk, path, &clean)?;
        out.push(report);
    }
    Ok(out)
}

// ---- record payload: the events of one group commit ----

const NO_PROPERTIES: u32 = u32::MAX;

/// Append the binary encoding of `events` to `out`: their count, then each event.
pub fn encode_events<'a>(events: impl ExactSizeIterator<Item = &'a Event>, out: &mut Vec<u8>) {
    out.extend_from_slice(&(events.len() as u32).to_le_bytes());
    for e in events {
        encode_event(e, out);
    }
}

fn encode_event(e: &Event, out: &mut Vec<u8>) {
    for s in [
        e.event_id(),
        e.event(),
        e.user_id(),
        e.campaign(),
        e.channel(),
    ] {
        put_str(out, s);
    }
    out.extend_from_slice(&e.ts.to_le_bytes());
    out.extend_from_slice(&e.received_at.to_le_bytes());
    match e.properties() {
        Some(p) => put_str(out, p),
        None => out.extend_from_slice(&NO_PROPERTIES.to_le_bytes()),
    }
}

/// One request's events encoded as they go into a record, by the request's own task, so
/// that the WAL writer only copies bytes; where each event ends lets it leave duplicates
/// out without decoding anything.
#[derive(Debug)]
pub struct EncodedEvents {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl EncodedEvents {
    pub fn new(events: &[Event]) -> Self {
        // Each event: its text, six u32 lengths (or the no-properties mark), two i64 times.
        let size = events.iter().map(|e| e.heap_bytes() + 6 * 4 + 2 * 8).sum();
        let mut out = EncodedEvents {
            bytes: Vec::with_capacity(size),
            ends: Vec::with_capacity(events.len()),
        };
        for e in events {
            encode_event(e, &mut out.bytes);
            out.ends.push(out.bytes.len());
        }
        out
    }

    /// The bytes of event `i`.
    fn event(&self, i: usize) -> &[u8] {
        let start = i.checked_sub(1).map_or(0, |p| self.ends[p]);
        &self.bytes[start..self.ends[i]]
    }
}

/// The payload of one record, built from requests' encoded events. The writer keeps one
/// between commits: a fresh megabyte per commit is fresh memory for the OS to fault in.
#[derive(Debug, Default)]
pub struct RecordPayload {
    bytes: Vec<u8>,
}

impl RecordPayload {
    /// The payload of a record of `parts`: each request's events, or those of them its
    /// mask keeps (as `encode_events` would write them).
    pub fn build<'a>(
        &mut self,
        parts: impl IntoIterator<Item = (&'a EncodedEvents, Option<&'a [bool]>)>,
    ) -> &[u8] {
        /// Past this a payload's buffer is not kept for the next record.
        const KEEP: usize = 16 << 20;
        if self.bytes.capacity() > KEEP {
            self.bytes = Vec::new();
        }
        self.bytes.clear();
        self.bytes.extend_from_slice(&[0; 4]);
        let mut count = 0u32;
        for (events, keep) in parts {
            match keep {
                None => {
                    self.bytes.extend_from_slice(&events.bytes);
                    count += events.ends.len() as u32;
                }
                Some(keep) => {
                    debug_assert_eq!(keep.len(), events.ends.len());
                    for (i, _) in keep.iter().enumerate().filter(|(_, k)| **k) {
                        self.bytes.extend_from_slice(events.event(i));
                        count += 1;
                    }
                }
            }
        }
        self.bytes[..4].copy_from_slice(&count.to_le_bytes());
        &self.bytes
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
        events.push(Event::from(EventRef {
            event_id,
            event,
            user_id,
            campaign,
            channel,
            ts,
            received_at,
            properties,
        }));
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

fn take_str<'a>(buf: &mut &'a [u8]) -> std::result::Result<&'a str, String> {
    let n = take_u32(buf)? as usize;
    std::str::from_utf8(take(buf, n)?).map_err(|_| "non-UTF-8 string in a WAL record".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, props: Option<&str>) -> Event {
        Event::from(EventRef {
            event_id: id,
            event: "scan",
            user_id: "u",
            campaign: "c",
            channel: "",
            ts: 1,
            received_at: 2,
            properties: props,
        })
    }

    /// A record built from requests' encoded events, some left out by a mask, is the
    /// record `encode_events` writes of the kept events, and decodes back to them.
    #[test]
    fn a_record_of_encoded_requests_is_the_record_of_their_kept_events() {
        let first = [event("a", None), event("b", Some("{\"x\":1}"))];
        let second = [
            event("c", Some("")),
            event("d", None),
            event("e", Some("{}")),
        ];
        let (enc1, enc2) = (EncodedEvents::new(&first), EncodedEvents::new(&second));
        let mut payload = RecordPayload::default();
        let keep = [true, false, true];
        let built = payload
            .build([(&enc1, None), (&enc2, Some(&keep[..]))])
            .to_vec();
        let kept = [&first[0], &first[1], &second[0], &second[2]];
        let mut expected = Vec::new();
        encode_events(kept.into_iter(), &mut expected);
        assert_eq!(built, expected);
        assert_eq!(decode_events(&built).unwrap(), kept.map(Clone::clone));
        // The buffer is reused: a second record holds only its own events.
        let again = payload.build([(&enc2, None)]).to_vec();
        assert_eq!(decode_events(&again).unwrap(), second);
    }

    #[test]
    fn torn_tail_is_cut_and_earlier_records_survive() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 0, Arc::new(crate::disk::OsDisk), |_, _| {
            panic!("empty")
        })
        .unwrap();
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
        let (wal, stats) = Wal::open(dir.path(), 0, Arc::new(crate::disk::OsDisk), |_, evs| {
            seen.extend(evs)
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![event("e0", None), event("e1", Some("{\"a\":1}"))]
        );
        assert!(stats.dropped_bytes > 0);
        assert_eq!(wal.current_seq(), 2);
    }

    /// Synced WAL bytes leave the page cache at once (all but the last partial page), and
    /// replay still reads every record back from the disk.
    #[cfg(target_os = "linux")]
    #[test]
    fn synced_records_leave_the_page_cache() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        // tmpfs pages are the file itself: nothing to release there.
        // SAFETY: statfs fills the struct it is given.
        let mut fs_info: libc::statfs = unsafe { std::mem::zeroed() };
        let c_dir = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::statfs(c_dir.as_ptr(), &mut fs_info) }, 0);
        if fs_info.f_type == libc::TMPFS_MAGIC {
            eprintln!("skipped: {} is on tmpfs", dir.path().display());
            return;
        }
        let (mut wal, _) = Wal::open(dir.path(), 0, Arc::new(crate::disk::OsDisk), |_, _| {
            panic!("empty")
        })
        .unwrap();
        let props = format!("{{\"pad\":\"{}\"}}", "x".repeat(3000));
        for i in 0..100 {
            let mut buf = Vec::new();
            encode_events(
                [&event(&format!("e{i}"), Some(&props))].into_iter(),
                &mut buf,
            );
            wal.append(&buf).unwrap();
        }
        let path = wal.current.path().to_path_buf();
        let file = fs::File::open(&path).unwrap();
        let len = file.metadata().unwrap().len() as usize;
        // SAFETY: sysconf reads a constant of the system.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let pages = len.div_ceil(page);
        let mut resident = vec![0u8; pages];
        // Safety: a read-only shared mapping of a file this test owns, unmapped below.
        unsafe {
            let map = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(map, libc::MAP_FAILED);
            assert_eq!(libc::mincore(map, len, resident.as_mut_ptr()), 0);
            libc::munmap(map, len);
        }
        let cached = resident.iter().filter(|r| **r & 1 == 1).count();
        assert!(
            cached <= 1,
            "{cached} of {pages} WAL pages still in the page cache after sync"
        );
        drop(wal);
        let mut seen = 0;
        Wal::open(dir.path(), 0, Arc::new(crate::disk::OsDisk), |_, evs| {
            assert_eq!(evs[0].properties(), Some(props.as_str()));
            seen += evs.len();
        })
        .unwrap();
        assert_eq!(seen, 100);
    }
}
