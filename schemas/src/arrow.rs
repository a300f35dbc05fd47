//! The stored columns as an Arrow schema, and the builder that turns events into batches.
//!
//! Strings are `Utf8View` everywhere (live buffer and Parquet alike) because DataFusion
//! reads Parquet strings as `Utf8View` by default: one type per column for every client.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock};

use arrow::array::builder::make_view;
use arrow::array::{
    Array, ArrayData, ArrayRef, AsArray, ByteView, NullBufferBuilder, RecordBatch, StringViewArray,
    TimestampMicrosecondArray,
};
use arrow::buffer::{Buffer, ScalarBuffer};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit, TimestampMicrosecondType};

use crate::event::Event;
#[cfg(test)]
use crate::event::EventRef;

/// Column positions in [`event_schema`].
pub mod col {
    pub const EVENT_ID: usize = 0;
    pub const EVENT: usize = 1;
    pub const USER_ID: usize = 2;
    pub const CAMPAIGN: usize = 3;
    pub const CHANNEL: usize = 4;
    pub const TS: usize = 5;
    pub const RECEIVED_AT: usize = 6;
    pub const PROPERTIES: usize = 7;
}

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("event_id", DataType::Utf8View, false),
        Field::new("event", DataType::Utf8View, false),
        Field::new("user_id", DataType::Utf8View, false),
        Field::new("campaign", DataType::Utf8View, false),
        Field::new("channel", DataType::Utf8View, false),
        Field::new("ts", ts.clone(), false),
        Field::new("received_at", ts, false),
        Field::new("properties", DataType::Utf8View, true),
    ]))
});

/// The schema of the `events` table.
pub fn event_schema() -> SchemaRef {
    Arc::clone(&SCHEMA)
}

/// The string columns, in the order [`EventBatchBuilder`] keeps their views.
const STRING_COLUMNS: [usize; 6] = [
    col::EVENT_ID,
    col::EVENT,
    col::USER_ID,
    col::CAMPAIGN,
    col::CHANNEL,
    col::PROPERTIES,
];
/// Columns whose values mostly repeat row to row.
const REPEATING: [usize; 3] = [col::EVENT, col::CAMPAIGN, col::CHANNEL];
/// Longest string a view holds inline; longer ones live in a data buffer.
const INLINE_MAX: usize = 12;
/// Data buffers are addressed by u32 offsets.
const BUFFER_MAX: usize = u32::MAX as usize;

/// Appends events column by column and finishes them as one `RecordBatch`.
///
/// The string columns share their data: strings longer than a view's 12 inline bytes are
/// copied once into one buffer sized for the whole batch, and every string column's
/// views point into it. Per-column builders grow a chain of doubling blocks each, ~40
/// allocations per batch and up to half of each last block unused; a live buffer
/// holding hundreds of thousands of rows is the collector's largest memory, and on small
/// machines fresh memory is the costliest part of ingest (benches/README.md). Use
/// [`batch_memory_size`] to measure such batches: shared buffers count once.
pub struct EventBatchBuilder {
    views: [Vec<u128>; 6],
    properties_valid: NullBufferBuilder,
    ts: Vec<i64>,
    received_at: Vec<i64>,
    data: Vec<u8>,
    /// Buffers filled to [`BUFFER_MAX`] before `data`.
    full: Vec<Buffer>,
}

impl EventBatchBuilder {
    /// A builder for `rows` events whose strings longer than 12 bytes total `data_bytes`.
    pub fn with_capacity(rows: usize, data_bytes: usize) -> Self {
        Self {
            views: std::array::from_fn(|_| Vec::with_capacity(rows)),
            properties_valid: NullBufferBuilder::new(rows),
            ts: Vec::with_capacity(rows),
            received_at: Vec::with_capacity(rows),
            data: Vec::with_capacity(data_bytes.min(BUFFER_MAX)),
            full: Vec::new(),
        }
    }

    /// Bytes appending `events` in turn adds to the data buffer: their strings that do not
    /// fit inline in a view, less the repeating ones equal to the event before's.
    fn data_bytes<'a>(events: impl IntoIterator<Item = &'a Event>) -> usize {
        let long = |v: &str| if v.len() > INLINE_MAX { v.len() } else { 0 };
        let repeating = |v: &str, p: Option<&str>| if p == Some(v) { 0 } else { long(v) };
        let mut prev: Option<&Event> = None;
        let mut bytes = 0;
        for e in events {
            bytes += long(e.event_id())
                + repeating(e.event(), prev.map(Event::event))
                + long(e.user_id())
                + repeating(e.campaign(), prev.map(Event::campaign))
                + repeating(e.channel(), prev.map(Event::channel))
                + e.properties().map_or(0, long);
            prev = Some(e);
        }
        bytes
    }

    pub fn append(&mut self, e: &Event) {
        let values = [
            e.event_id(),
            e.event(),
            e.user_id(),
            e.campaign(),
            e.channel(),
            e.properties().unwrap_or_default(),
        ];
        for (c, v) in values.into_iter().enumerate() {
            let view = match self.views[c].last() {
                Some(&last)
                    if REPEATING.contains(&STRING_COLUMNS[c])
                        && self.stored_bytes(last) == Some(v.as_bytes()) =>
                {
                    last
                }
                _ => self.store(v.as_bytes()),
            };
            self.views[c].push(view);
        }
        self.properties_valid.append(e.properties().is_some());
        self.ts.push(e.ts);
        self.received_at.push(e.received_at);
    }

    /// The view of `v`, its bytes copied into the data buffer unless they fit inline.
    fn store(&mut self, v: &[u8]) -> u128 {
        if v.len() <= INLINE_MAX {
            return make_view(v, 0, 0);
        }
        if self.data.len() + v.len() > BUFFER_MAX {
            let full = std::mem::replace(&mut self.data, Vec::with_capacity(v.len()));
            self.full.push(Buffer::from_vec(full));
        }
        let offset = self.data.len() as u32;
        self.data.extend_from_slice(v);
        make_view(v, self.full.len() as u32, offset)
    }

    /// The bytes of a view made by `store` that points into a data buffer; `None` for a
    /// view that holds its string inline (storing those again costs nothing).
    fn stored_bytes(&self, view: u128) -> Option<&[u8]> {
        if is_inline(view) {
            return None;
        }
        let v = ByteView::from(view);
        let buffer = match self.full.get(v.buffer_index as usize) {
            Some(full) => full.as_slice(),
            None => self.data.as_slice(),
        };
        buffer.get(v.offset as usize..(v.offset + v.length) as usize)
    }

    pub fn len(&self) -> usize {
        self.ts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ts.is_empty()
    }

    /// The batch, its buffers on the heap: a request's events until its group commits.
    pub fn finish(&mut self) -> RecordBatch {
        self.assemble(false)
    }

    /// The batch, its buffers packed into one allocation of [`region`](crate::region)
    /// memory when large enough: the live buffer's batches, held until their flush.
    pub fn finish_packed(&mut self) -> RecordBatch {
        self.assemble(true)
    }

    /// The rows of `batch` (a batch of the event schema, or a slice of one). Long strings
    /// are copied one by one, not their buffers (a slice's buffers hold the strings of the
    /// rows cut from it), and a string in consecutive rows of a column is stored once:
    /// within one array equal views are equal strings ([`packed_bytes`] counts the same).
    pub fn append_batch(&mut self, batch: &RecordBatch) {
        for (c, &column) in STRING_COLUMNS.iter().enumerate() {
            let array = batch.column(column).as_string_view();
            let buffers = array.data_buffers();
            let mut last: Option<(u128, u128)> = None;
            for &view in array.views() {
                let stored = match last {
                    _ if is_inline(view) => view,
                    Some((from, to)) if from == view => to,
                    _ => {
                        let v = ByteView::from(view);
                        let start = v.offset as usize;
                        let bytes = &buffers[v.buffer_index as usize][start..][..v.length as usize];
                        let to = self.store(bytes);
                        last = Some((view, to));
                        to
                    }
                };
                self.views[c].push(stored);
            }
        }
        match batch.column(col::PROPERTIES).nulls() {
            Some(nulls) => self.properties_valid.append_buffer(nulls),
            None => self.properties_valid.append_n_non_nulls(batch.num_rows()),
        }
        for (c, out) in [
            (col::TS, &mut self.ts),
            (col::RECEIVED_AT, &mut self.received_at),
        ] {
            let times = batch.column(c).as_primitive::<TimestampMicrosecondType>();
            out.extend_from_slice(times.values());
        }
    }

    fn assemble(&mut self, packed: bool) -> RecordBatch {
        let rows = self.len();
        let mut data = std::mem::take(&mut self.full);
        // The six columns' views, the two timestamps, the data buffer being filled: when
        // packed, moved into a mapping of their own if large enough (see `region`).
        let mut own: Vec<Buffer> = (self.views.iter_mut())
            .map(|v| Buffer::from_vec(std::mem::take(v)))
            .collect();
        own.push(Buffer::from_vec(std::mem::take(&mut self.ts)));
        own.push(Buffer::from_vec(std::mem::take(&mut self.received_at)));
        if !self.data.is_empty() {
            own.push(Buffer::from_vec(std::mem::take(&mut self.data)));
        }
        if packed {
            let parts: Vec<&[u8]> = own.iter().map(Buffer::as_slice).collect();
            if let Some(moved) = crate::region::copy_to_region(&parts) {
                own = moved;
            }
        }
        let mut own = own.into_iter();
        let views: Vec<Buffer> = own.by_ref().take(STRING_COLUMNS.len()).collect();
        let mut columns: Vec<Option<ArrayRef>> = vec![None; event_schema().fields().len()];
        for c in [col::TS, col::RECEIVED_AT] {
            let times = ScalarBuffer::new(own.next().expect("two timestamp buffers"), 0, rows);
            let array = TimestampMicrosecondArray::new(times, None).with_timezone("UTC");
            columns[c] = Some(Arc::new(array));
        }
        data.extend(own);
        let nulls = self.properties_valid.finish();
        for (views, c) in views.into_iter().zip(STRING_COLUMNS) {
            let nulls = (c == col::PROPERTIES).then(|| nulls.clone()).flatten();
            let views = ScalarBuffer::new(views, 0, rows);
            // SAFETY: every view was made by `store` from a whole UTF-8 string, inline or
            // at an offset of `data` that holds all of its bytes.
            let array = unsafe { StringViewArray::new_unchecked(views, data.clone(), nulls) };
            columns[c] = Some(Arc::new(array));
        }
        let columns = columns.into_iter().map(|c| c.expect("every column built"));
        RecordBatch::try_new(event_schema(), columns.collect())
            .expect("builder columns match the event schema")
    }
}

/// Build one batch from events.
pub fn events_to_batch<'a, I>(events: I) -> RecordBatch
where
    I: IntoIterator<Item = &'a Event>,
    I::IntoIter: Clone,
{
    let iter = events.into_iter();
    let rows = iter.clone().count();
    let data = EventBatchBuilder::data_bytes(iter.clone());
    let mut builder = EventBatchBuilder::with_capacity(rows, data);
    for e in iter {
        builder.append(e);
    }
    builder.finish()
}

/// Whether a string view holds its value whole (at most 12 bytes, `INLINE_MAX`): equal
/// inline views are equal strings in any batch (one string may still be padded
/// differently by other writers).
pub fn is_inline(view: u128) -> bool {
    (view as u32) as usize <= INLINE_MAX
}

/// The data-buffer bytes [`EventBatchBuilder::append_batch`] stores for `array`.
fn packed_bytes(array: &StringViewArray) -> usize {
    let mut last = None;
    let mut bytes = 0;
    for &view in array.views() {
        if !is_inline(view) && last != Some(view) {
            bytes += (view as u32) as usize;
            last = Some(view);
        }
    }
    bytes
}

/// One batch of `batches`' rows (batches of the event schema or slices of them), then
/// `events`, packed for the live buffer ([`EventBatchBuilder::finish_packed`]): the
/// collector's writer makes one per group commit from its requests' new events.
pub fn pack_events(batches: &[RecordBatch], events: &[&Event]) -> RecordBatch {
    let mut rows = events.len();
    // The data buffer is sized for exactly what `append_batch` and `append` store: a
    // slice's buffers also hold its cut rows' strings (all of them, for a retried
    // request), and a heap buffer keeps its capacity.
    let mut data = 0;
    for batch in batches {
        rows += batch.num_rows();
        for &c in &STRING_COLUMNS {
            data += packed_bytes(batch.column(c).as_string_view());
        }
    }
    data += EventBatchBuilder::data_bytes(events.iter().copied());
    let mut builder = EventBatchBuilder::with_capacity(rows, data);
    for batch in batches {
        builder.append_batch(batch);
    }
    for &e in events {
        builder.append(e);
    }
    builder.finish_packed()
}

/// Memory held by `batch`, each allocation counted once however many columns or slices
/// share it (`RecordBatch::get_array_memory_size` counts a shared buffer once per column).
pub fn batch_memory_size(batch: &RecordBatch) -> usize {
    let mut counter = MemoryCounter::default();
    (batch.columns().iter()).map(|c| counter.add(c)).sum()
}

/// Memory held by arrays, each allocation counted once however many arrays, columns or
/// slices share it: the live buffer's batches share one data buffer among their string
/// columns, and arrays read from Parquet may be views into one page.
#[derive(Default)]
pub struct MemoryCounter {
    /// Start addresses of the allocations counted.
    seen: HashSet<usize>,
}

impl MemoryCounter {
    /// Bytes of the allocations `array` holds (children included) not counted before.
    pub fn add(&mut self, array: &dyn Array) -> usize {
        self.add_data(&array.to_data())
    }

    fn add_data(&mut self, data: &ArrayData) -> usize {
        let nulls = data.nulls().map(|n| n.buffer());
        let own: usize = (data.buffers().iter().chain(nulls))
            .filter(|b| self.seen.insert(b.data_ptr().as_ptr() as usize))
            .map(Buffer::capacity)
            .sum();
        own + (data.child_data().iter())
            .map(|child| self.add_data(child))
            .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: usize) -> Event {
        let user_id = if i.is_multiple_of(2) {
            format!("u{i}")
        } else {
            format!("user-with-a-long-id-{i}")
        };
        let properties = format!(r#"{{"card":"A{i}","city":"Hangzhou"}}"#);
        Event::from(EventRef {
            event_id: &format!("a-long-event-id-{i:06}"),
            event: if i.is_multiple_of(3) {
                "package_delivered"
            } else {
                "scan"
            },
            user_id: &user_id,
            campaign: "parcel-lottery-2026",
            channel: if i.is_multiple_of(4) { "" } else { "jd" },
            ts: i as i64 * 1_000,
            received_at: 7 + i as i64,
            properties: (!i.is_multiple_of(5)).then_some(properties.as_str()),
        })
    }

    /// `batch` holds exactly `events`, in order.
    fn assert_holds(batch: &RecordBatch, events: &[&Event]) {
        assert_eq!(batch.num_rows(), events.len());
        let strings = |c: usize| batch.column(c).as_string_view();
        let times = |c: usize| batch.column(c).as_primitive::<TimestampMicrosecondType>();
        for (r, e) in events.iter().enumerate() {
            assert_eq!(strings(col::EVENT_ID).value(r), e.event_id());
            assert_eq!(strings(col::EVENT).value(r), e.event());
            assert_eq!(strings(col::USER_ID).value(r), e.user_id());
            assert_eq!(strings(col::CAMPAIGN).value(r), e.campaign());
            assert_eq!(strings(col::CHANNEL).value(r), e.channel());
            let props = strings(col::PROPERTIES);
            assert_eq!(props.is_valid(r).then(|| props.value(r)), e.properties());
            assert_eq!(times(col::TS).value(r), e.ts);
            assert_eq!(times(col::RECEIVED_AT).value(r), e.received_at);
        }
    }

    /// Slices of a request's batch (the rows around its duplicates) and small requests'
    /// events pack into one batch that holds those rows, and their bytes only: not the
    /// cut rows' strings, as a concatenation sharing the request's buffers would.
    #[test]
    fn packed_pieces_hold_their_rows_and_only_their_bytes() {
        let events: Vec<Event> = (0..3000).map(event).collect();
        let request = events_to_batch(&events[..2000]);
        let pieces = [request.slice(0, 500), request.slice(1500, 500)];
        let small: Vec<&Event> = events[2000..].iter().collect();
        let packed = pack_events(&pieces, &small);
        let kept: Vec<&Event> = events[..500].iter().chain(&events[1500..]).collect();
        assert_holds(&packed, &kept);
        for c in STRING_COLUMNS {
            let buffers = packed.column(c).as_string_view().data_buffers().len();
            assert_eq!(buffers, 1, "column {c}: one data buffer for all");
        }
        let size = batch_memory_size(&packed);
        let built = batch_memory_size(&events_to_batch(kept.iter().copied()));
        assert!(size <= built + 256, "packed {size} bytes, built {built}");
    }

    /// Equal views in two requests' batches (same length, prefix, buffer and offset) are
    /// not equal strings: each batch's strings are looked up in its own buffers.
    #[test]
    fn equal_views_of_two_batches_pack_as_their_own_strings() {
        let one = |event_id: &str| {
            let e = Event::from(EventRef {
                event_id,
                event: "scan",
                user_id: "u1",
                campaign: "c",
                channel: "jd",
                ts: 1,
                received_at: 2,
                properties: None,
            });
            events_to_batch([&e])
        };
        let (a, b) = (one("same-prefix-a-00001"), one("same-prefix-b-00002"));
        let ids = |batch: &RecordBatch| batch.column(col::EVENT_ID).as_string_view().views()[0];
        assert_eq!(ids(&a), ids(&b), "the two views are equal");
        let packed = pack_events(&[a, b], &[]);
        let packed = packed.column(col::EVENT_ID).as_string_view();
        assert_eq!(packed.value(0), "same-prefix-a-00001");
        assert_eq!(packed.value(1), "same-prefix-b-00002");
    }

    /// Two arrays over one allocation (two batches' views into one page) count once.
    #[test]
    fn a_counter_counts_an_allocation_shared_by_two_arrays_once() {
        let events: Vec<Event> = (0..100).map(event).collect();
        let batch = events_to_batch(&events);
        let ids = batch.column(col::EVENT_ID);
        let mut counter = MemoryCounter::default();
        assert!(counter.add(&ids.slice(0, 50)) >= 100 * 16);
        assert_eq!(counter.add(&ids.slice(50, 50)), 0);
    }

    /// A list's values are counted, not only its offsets.
    #[test]
    fn memory_size_counts_child_arrays() {
        use arrow::array::ListArray;
        use arrow::datatypes::Int64Type;
        let rows = (0..1000).map(|i| Some(vec![Some(i); 10]));
        let list = ListArray::from_iter_primitive::<Int64Type, _, _>(rows);
        let batch = RecordBatch::try_from_iter([("l", Arc::new(list) as ArrayRef)]).unwrap();
        assert!(batch_memory_size(&batch) >= 10_000 * 8 + 1001 * 4);
    }

    /// Every value reads back as appended, inline or from the shared buffer, repeated
    /// values included; the shared data counts once in the batch's memory.
    #[test]
    fn a_batch_reads_back_every_value_and_counts_shared_data_once() {
        // Packed for the live buffer, 10 rows stay on the heap and 1000 go to a mapping of
        // their own (`region`).
        for n in [10, 1000] {
            let events: Vec<Event> = (0..n).map(event).collect();
            let events: Vec<&Event> = events.iter().collect();
            let batch = pack_events(&[], &events);
            assert_holds(&batch, &events);
            let strings = |c: usize| batch.column(c).as_string_view();
            // Repeated campaigns and event names are stored once per run, not per row, and
            // the buffer is sized for exactly what is stored.
            let long = |v: &str| if v.len() > INLINE_MAX { v.len() } else { 0 };
            let all: usize = events
                .iter()
                .map(|e| {
                    long(e.event_id()) + long(e.event()) + long(e.user_id()) + long(e.campaign())
                })
                .sum::<usize>()
                + events
                    .iter()
                    .filter_map(|e| e.properties())
                    .map(long)
                    .sum::<usize>();
            let buffer = &strings(col::EVENT_ID).data_buffers()[0];
            let stored = buffer.len();
            assert!(
                stored < all - 10 * events.len(),
                "stored {stored} of {all} long-string bytes"
            );
            let views_and_times = 6 * 16 * events.len() + 2 * 8 * events.len();
            let size = batch_memory_size(&batch);
            assert!(size >= views_and_times + stored, "{size}");
            assert!(
                size < views_and_times + stored + 1024,
                "{size}: shared data counted more than once"
            );
            assert!(batch.get_array_memory_size() > size + 4 * stored);
        }
    }
}
