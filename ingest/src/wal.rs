//! The write-ahead log: numbered segment files of checksummed records.
//!
//! A record is `[len: u32 LE][crc32: u32 LE][payload]`; one record holds the accepted
//! events of one group commit. The steps are:
//! - [`Wal::open`] replays every segment after the last flushed one (a torn or corrupt
//!   tail is cut at the last valid record) and starts a fresh segment;
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
            let (valid, records) = scan_records(&data);
            for payload in records {
                let events = decode_events(payload).map_err(|reason| IngestError::Corrupt {
                    path: path.clone(),
                    reason,
                })?;
                stats.records += 1;
                stats.events += events.len();
                on_record(events);
            }
            let dropped = data.len() as u64 - valid as u64;
            if dropped > 0 {
                tracing::warn!(
                    segment = %path.display(),
                    dropped_bytes = dropped,
                    kept_bytes = valid,
                    "WAL segment has a torn or corrupt tail; cut at the last valid record"
                );
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(IngestError::io(&path))?;
                f.set_len(valid as u64).map_err(IngestError::io(&path))?;
                f.sync_all().map_err(IngestError::io(&path))?;
                stats.dropped_bytes += dropped;
            }
        }
        let current = WalSegment::create(dir, last + 1)?;
        Ok((
            Wal {
                dir: dir.to_path_buf(),
                current,
            },
            stats,
        ))
    }

    /// Append one record and fsync it. On error the segment is cut back to its previous
    /// length, so a record that was not acknowledged is not replayed either.
    pub fn append(&mut self, payload: &[u8]) -> std::io::Result<std::time::Duration> {
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
                let _ = seg.file.set_len(seg.len);
                Err(e)
            }
        }
    }

    /// Close the current segment and start the next one; returns the closed segment's number.
    pub fn rotate(&mut self) -> Result<u64> {
        let next = WalSegment::create(&self.dir, self.current.seq + 1)?;
        let closed = std::mem::replace(&mut self.current, next);
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
            for payload in scan_records(&data).1 {
                out.push(
                    decode_events(payload).map_err(|reason| IngestError::Corrupt {
                        path: path.clone(),
                        reason,
                    })?,
                );
            }
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
    /// Remove every segment up to `seq`; one that cannot go does not keep the others.
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

/// Valid records from the start of `data`, and the length of the valid prefix.
fn scan_records(data: &[u8]) -> (usize, Vec<&[u8]>) {
    let mut pos = 0;
    let mut records = Vec::new();
    while data.len() - pos >= HEADER {
        let len = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(data[pos + 4..pos + 8].try_into().unwrap());
        let Some(payload) = data.get(pos + HEADER..pos + HEADER + len) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        records.push(payload);
        pos += HEADER + len;
    }
    (pos, records)
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
