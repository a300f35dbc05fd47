//! The validated event: what the store keeps, one row of the `events` table.

/// One accepted event. Timestamps are microseconds since the Unix epoch, UTC.
///
/// Its six strings share one allocation: six allocations per event were most of the
/// allocator's ~9% of the server's samples at peak ingest; one takes a fifth off
/// decoding and batch building (benches/README.md). Make one from an [`EventRef`].
#[derive(Clone, PartialEq, Eq)]
pub struct Event {
    /// event_id, event, user_id, campaign, channel and properties, one after another.
    text: Box<str>,
    /// Where each of the first five strings ends in `text`; properties take the rest.
    ends: [u32; 5],
    has_properties: bool,
    pub ts: i64,
    pub received_at: i64,
}

/// The fields of an [`Event`], borrowed: how every `Event` is made (validation, WAL
/// replay, scan links, tests) and what [`Event::fields`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventRef<'a> {
    pub event_id: &'a str,
    pub event: &'a str,
    pub user_id: &'a str,
    pub campaign: &'a str,
    /// Empty means unknown.
    pub channel: &'a str,
    pub ts: i64,
    pub received_at: i64,
    /// Compact JSON object text, or `None` when the event had no properties.
    pub properties: Option<&'a str>,
}

impl From<EventRef<'_>> for Event {
    fn from(e: EventRef<'_>) -> Self {
        let parts = [e.event_id, e.event, e.user_id, e.campaign, e.channel];
        let props = e.properties.unwrap_or_default();
        let mut text =
            String::with_capacity(parts.iter().map(|p| p.len()).sum::<usize>() + props.len());
        // The five strings before properties are at most 128 bytes each (`limits`).
        let ends = parts.map(|p| {
            text.push_str(p);
            u32::try_from(text.len()).expect("an event's ids and names fit in u32 offsets")
        });
        text.push_str(props);
        Event {
            text: text.into_boxed_str(),
            ends,
            has_properties: e.properties.is_some(),
            ts: e.ts,
            received_at: e.received_at,
        }
    }
}

impl Event {
    fn part(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.text[start..self.ends[i] as usize]
    }

    pub fn event_id(&self) -> &str {
        self.part(0)
    }

    pub fn event(&self) -> &str {
        self.part(1)
    }

    pub fn user_id(&self) -> &str {
        self.part(2)
    }

    pub fn campaign(&self) -> &str {
        self.part(3)
    }

    /// Empty means unknown.
    pub fn channel(&self) -> &str {
        self.part(4)
    }

    /// Compact JSON object text, or `None` when the event had no properties.
    pub fn properties(&self) -> Option<&str> {
        self.has_properties
            .then(|| &self.text[self.ends[4] as usize..])
    }

    /// The fields, borrowed.
    pub fn fields(&self) -> EventRef<'_> {
        EventRef {
            event_id: self.event_id(),
            event: self.event(),
            user_id: self.user_id(),
            campaign: self.campaign(),
            channel: self.channel(),
            ts: self.ts,
            received_at: self.received_at,
            properties: self.properties(),
        }
    }

    /// Approximate heap bytes this event holds; used for memory accounting.
    pub fn heap_bytes(&self) -> usize {
        self.text.len()
    }
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let e = self.fields();
        f.debug_struct("Event")
            .field("event_id", &e.event_id)
            .field("event", &e.event)
            .field("user_id", &e.user_id)
            .field("campaign", &e.campaign)
            .field("channel", &e.channel)
            .field("ts", &e.ts)
            .field("received_at", &e.received_at)
            .field("properties", &e.properties)
            .finish()
    }
}

/// Field limits from the contract's event table, in bytes.
pub mod limits {
    pub const EVENT_ID_MAX: usize = 128;
    pub const EVENT_NAME_MAX: usize = 64;
    pub const USER_ID_MAX: usize = 128;
    pub const CAMPAIGN_MAX: usize = 64;
    pub const CHANNEL_MAX: usize = 64;
    pub const PROPERTIES_MAX: usize = 16 * 1024;
    /// Objects and arrays nested in `properties`, the outer object counting as 1.
    pub const PROPERTIES_DEPTH_MAX: usize = 32;
    /// Keys of the `properties` object itself.
    pub const PROPERTIES_KEYS_MAX: usize = 1000;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_come_back_as_given() {
        let cases = [
            EventRef {
                event_id: "é-1",
                event: "scan",
                user_id: "用户",
                campaign: "c",
                channel: "",
                ts: 1,
                received_at: 2,
                properties: Some(r#"{"city":"杭州"}"#),
            },
            EventRef {
                event_id: "",
                event: "",
                user_id: "",
                campaign: "",
                channel: "jd",
                ts: -1,
                received_at: 0,
                properties: None,
            },
            EventRef {
                event_id: "x",
                event: "y",
                user_id: "z",
                campaign: "w",
                channel: "v",
                ts: 0,
                received_at: 0,
                properties: Some(""),
            },
        ];
        for fields in cases {
            let event = Event::from(fields);
            assert_eq!(event.fields(), fields);
            assert_eq!(event.clone(), event);
        }
        assert_ne!(
            Event::from(cases[2]).properties(),
            None,
            "Some(\"\") is not None"
        );
    }
}
