//! The validated event: what the store keeps, one row of the `events` table.

/// One accepted event. Timestamps are microseconds since the Unix epoch, UTC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub event_id: String,
    pub event: String,
    pub user_id: String,
    pub campaign: String,
    /// Empty means unknown.
    pub channel: String,
    pub ts: i64,
    pub received_at: i64,
    /// Compact JSON object text, or `None` when the event had no properties.
    pub properties: Option<String>,
}

impl Event {
    /// Approximate heap bytes this event holds; used for memory accounting.
    pub fn heap_bytes(&self) -> usize {
        self.event_id.len()
            + self.event.len()
            + self.user_id.len()
            + self.campaign.len()
            + self.channel.len()
            + self.properties.as_ref().map_or(0, String::len)
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
