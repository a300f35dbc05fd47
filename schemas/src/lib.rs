//! Funnelhouse's event model. This crate owns what an event is and how it gets in:
//! the validated [`Event`], the field rules of the contract (with errors that name the
//! field), the decoding of request bodies (JSON array, object, NDJSON, `sent_at`
//! envelope, and Segment-compatible messages) into events and per-event rejections, and the Arrow schema of the stored
//! columns with the builder that turns events into `RecordBatch`es. It also holds the
//! vocabulary every other crate shares: the units of the config file (`"24h"`, `"8MiB"`)
//! and how write keys and read tokens are read from a request and compared.

pub mod arrow;
pub mod auth;
pub mod decode;
pub mod error;
pub mod event;
mod plain;
pub mod region;
pub mod segment;
pub mod time;
pub mod units;
pub mod validate;

pub use arrow::{MemoryCounter, batch_memory_size, event_schema, events_to_batch, pack_events};
pub use auth::AuthConfig;
pub use decode::{BodyFormat, DecodedBatch, Rejection, decode_body};
pub use error::SchemaError;
pub use event::{Event, EventRef};
pub use segment::{MessageType, SegmentBatch, decode_segment};
pub use validate::{DecodeContext, validate_event};

/// Both decoders of one event object, for the differential fuzz target (`cargo fuzz`
/// builds with `--cfg fuzzing`): the plain fast path's event when it takes the text, and
/// the general path's verdict, which must then be that same event.
#[cfg(fuzzing)]
#[doc(hidden)]
pub fn plain_and_general(
    text: &str,
    ctx: &DecodeContext,
) -> (Option<Event>, Result<Event, String>) {
    (
        plain::plain_event(text, ctx),
        validate::general_event(text, ctx),
    )
}
