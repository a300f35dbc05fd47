//! The stored columns as an Arrow schema, and the builder that turns events into batches.
//!
//! Strings are `Utf8View` everywhere (live buffer and Parquet alike) because DataFusion
//! reads Parquet strings as `Utf8View` by default: one type per column for every client.

use std::sync::{Arc, LazyLock};

use arrow::array::{ArrayRef, RecordBatch, StringViewBuilder, TimestampMicrosecondBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

use crate::event::Event;

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

/// Appends events column by column and finishes them as one `RecordBatch`.
pub struct EventBatchBuilder {
    event_id: StringViewBuilder,
    event: StringViewBuilder,
    user_id: StringViewBuilder,
    campaign: StringViewBuilder,
    channel: StringViewBuilder,
    ts: TimestampMicrosecondBuilder,
    received_at: TimestampMicrosecondBuilder,
    properties: StringViewBuilder,
    rows: usize,
}

impl EventBatchBuilder {
    pub fn with_capacity(rows: usize) -> Self {
        Self {
            event_id: StringViewBuilder::with_capacity(rows),
            event: StringViewBuilder::with_capacity(rows),
            user_id: StringViewBuilder::with_capacity(rows),
            campaign: StringViewBuilder::with_capacity(rows),
            channel: StringViewBuilder::with_capacity(rows),
            ts: TimestampMicrosecondBuilder::with_capacity(rows),
            received_at: TimestampMicrosecondBuilder::with_capacity(rows),
            properties: StringViewBuilder::with_capacity(rows),
            rows: 0,
        }
    }

    pub fn append(&mut self, e: &Event) {
        self.event_id.append_value(&e.event_id);
        self.event.append_value(&e.event);
        self.user_id.append_value(&e.user_id);
        self.campaign.append_value(&e.campaign);
        self.channel.append_value(&e.channel);
        self.ts.append_value(e.ts);
        self.received_at.append_value(e.received_at);
        self.properties.append_option(e.properties.as_deref());
        self.rows += 1;
    }

    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    pub fn finish(&mut self) -> RecordBatch {
        self.rows = 0;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.event_id.finish()),
            Arc::new(self.event.finish()),
            Arc::new(self.user_id.finish()),
            Arc::new(self.campaign.finish()),
            Arc::new(self.channel.finish()),
            Arc::new(self.ts.finish().with_timezone("UTC")),
            Arc::new(self.received_at.finish().with_timezone("UTC")),
            Arc::new(self.properties.finish()),
        ];
        RecordBatch::try_new(event_schema(), columns)
            .expect("builder columns match the event schema")
    }
}

/// Build one batch from a slice of events.
pub fn events_to_batch<'a>(events: impl IntoIterator<Item = &'a Event>) -> RecordBatch {
    let iter = events.into_iter();
    let mut builder = EventBatchBuilder::with_capacity(iter.size_hint().0);
    for e in iter {
        builder.append(e);
    }
    builder.finish()
}
