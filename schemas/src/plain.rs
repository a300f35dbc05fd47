//! The fast path of [`validate_event`](crate::validate_event): one pass over an event
//! object in the plain form SDKs and pages send, straight to an [`Event`].
//!
//! Plain means compact JSON (no whitespace), only the contract's fields, each once,
//! `event_id` among them, `event`, `user_id`, `campaign` and `channel` strings without
//! escapes, `ts` an RFC 3339 string or an i64 integer, and `properties` an object without
//! escapes or exponents. Such an event is decoded without serde's field matching, its raw
//! values and a second pass over its properties, which were a fifth of the server's
//! samples at peak ingest (benches/README.md). Anything else, and any event that would be refused, gets
//! `None`: the general path then decides, with errors that name the field. This path
//! accepts nothing the general one refuses and makes the same event (a test compares both
//! on thousands of mutated events).

use crate::event::{Event, EventRef, limits};
use crate::time::{epoch_ms_to_micros, parse_rfc3339};
use crate::validate::{DecodeContext, check_event_name, checked_ts};

/// The event of a plain event object `text` (trimmed), or `None` to take the general path.
pub(crate) fn plain_event(text: &str, ctx: &DecodeContext) -> Option<Event> {
    let mut c = Cursor { text, i: 0 };
    c.eat(b'{')?;
    // event_id, event, user_id, campaign, channel.
    let mut strings: [Option<&str>; 5] = [None; 5];
    let mut ts = None;
    let mut properties = None;
    let mut seen = 0u8;
    loop {
        let field = match c.plain_string()? {
            "event_id" => 0,
            "event" => 1,
            "user_id" => 2,
            "campaign" => 3,
            "channel" => 4,
            "ts" => 5,
            "properties" => 6,
            _ => return None,
        };
        if seen & (1 << field) != 0 {
            return None;
        }
        seen |= 1 << field;
        c.eat(b':')?;
        match field {
            0..=4 => strings[field] = Some(c.plain_string()?),
            5 if c.peek()? == b'"' => ts = Some(parse_rfc3339(c.plain_string()?)?),
            5 => ts = Some(epoch_ms_to_micros(c.integer()?.parse().ok()?)?),
            _ => properties = Some(c.properties()?),
        }
        if c.eat(b',').is_none() {
            c.eat(b'}')?;
            break;
        }
    }
    if c.i != text.len() {
        return None;
    }
    let [
        Some(event_id),
        Some(event),
        Some(user_id),
        Some(campaign),
        channel,
    ] = strings
    else {
        return None;
    };
    let channel = channel.unwrap_or_default();
    let within = |s: &str, min: usize, max: usize| (min..=max).contains(&s.len());
    let fits = within(event_id, 1, limits::EVENT_ID_MAX)
        && within(event, 1, limits::EVENT_NAME_MAX)
        && within(user_id, 1, limits::USER_ID_MAX)
        && within(campaign, 1, limits::CAMPAIGN_MAX)
        && within(channel, 0, limits::CHANNEL_MAX);
    if !fits || check_event_name(event).is_err() {
        return None;
    }
    let ts = match ts {
        Some(sent) => checked_ts("ts", sent, ctx).ok()?,
        None => ctx.received_at,
    };
    Some(Event::from(EventRef {
        event_id,
        event,
        user_id,
        campaign,
        channel,
        ts,
        received_at: ctx.received_at,
        properties,
    }))
}

struct Cursor<'a> {
    text: &'a str,
    i: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.i).copied()
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.i += 1)
    }

    /// A string without escapes or control characters: its contents.
    fn plain_string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.i;
        let rest = &self.text.as_bytes()[start..];
        let end = string_end(rest)?;
        if rest[end] != b'"' {
            return None;
        }
        self.i += end + 1;
        // Both ends are ASCII quotes, so character boundaries.
        self.text.get(start..start + end)
    }

    /// A JSON integer (`-?(0|[1-9][0-9]*)`): its text.
    fn integer(&mut self) -> Option<&'a str> {
        let start = self.i;
        self.eat(b'-');
        let digits = self.digits();
        let first = self.text.as_bytes().get(self.i - digits).copied();
        if digits == 0 || (first == Some(b'0') && digits > 1) {
            return None;
        }
        Some(&self.text[start..self.i])
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.i += 1;
        }
        self.i - start
    }

    /// A plain properties object within the contract's limits: its text.
    fn properties(&mut self) -> Option<&'a str> {
        let start = self.i;
        if self.peek()? != b'{' {
            return None;
        }
        let keys = self.value(1)?;
        let text = &self.text[start..self.i];
        (text.len() <= limits::PROPERTIES_MAX && keys <= limits::PROPERTIES_KEYS_MAX)
            .then_some(text)
    }

    /// One JSON value at nesting `depth` (the properties object is 1), without
    /// whitespace, escapes or exponents; an object returns its number of keys.
    fn value(&mut self, depth: usize) -> Option<usize> {
        match self.peek()? {
            open @ (b'{' | b'[') => {
                if depth > limits::PROPERTIES_DEPTH_MAX {
                    return None;
                }
                self.i += 1;
                let (close, object) = if open == b'{' {
                    (b'}', true)
                } else {
                    (b']', false)
                };
                let mut count = 0;
                if self.eat(close).is_some() {
                    return Some(0);
                }
                loop {
                    if object {
                        self.plain_string()?;
                        self.eat(b':')?;
                    }
                    self.value(depth + 1)?;
                    count += 1;
                    if self.eat(b',').is_none() {
                        self.eat(close)?;
                        return Some(count);
                    }
                }
            }
            b'"' => self.plain_string().map(|_| 0),
            b't' => self.literal("true"),
            b'f' => self.literal("false"),
            b'n' => self.literal("null"),
            _ => {
                self.integer()?;
                if self.eat(b'.').is_some() && self.digits() == 0 {
                    return None;
                }
                Some(0)
            }
        }
    }

    fn literal(&mut self, word: &str) -> Option<usize> {
        self.text[self.i..].starts_with(word).then(|| {
            self.i += word.len();
            0
        })
    }
}

/// Where the first quote, backslash or control character of `bytes` is: eight bytes at a time,
/// since most strings here are short ids and names, where a search call per string and a
/// second pass for control characters cost more than the scan.
fn string_end(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // High bit set in each byte below `n` (exact up to the first such byte, which is all
    // that is read: a borrow only carries into the bytes after it).
    let below = |w: u64, n: u8| w.wrapping_sub(ONES * n as u64) & !w & HIGH;
    let special = |w: u64| {
        below(w ^ (ONES * b'"' as u64), 1) | below(w ^ (ONES * b'\\' as u64), 1) | below(w, 0x20)
    };
    let mut chunks = bytes.chunks_exact(8);
    for (n, chunk) in chunks.by_ref().enumerate() {
        let w = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let found = special(w);
        if found != 0 {
            return Some(n * 8 + found.trailing_zeros() as usize / 8);
        }
    }
    let tail = chunks.remainder();
    let at = tail
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
    Some(bytes.len() - tail.len() + at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::general_event;

    fn ctx() -> DecodeContext {
        DecodeContext::new(1_800_000_000_000_000)
    }

    const PLAIN: [&str; 6] = [
        r#"{"event_id":"u1-0","event":"package","user_id":"u1","campaign":"parcel","channel":"jd","ts":"2026-11-06T13:18:31Z","properties":{"card":"A1","carrier":"yto"}}"#,
        r#"{"event_id":"e-2","event":"scan","user_id":"oXabc","campaign":"c","ts":1762435111000}"#,
        r#"{"properties":{"n":-12.50,"ok":true,"no":false,"x":null,"a":[1,[2,{}],"s"],"o":{"k":[]}},"ts":1762435111000,"channel":"","campaign":"c","user_id":"u","event":"draw:win","event_id":"x"}"#,
        r#"{"event_id":"id","event":"view","user_id":"u","campaign":"c","channel":"抖音","properties":{"城市":"上海"}}"#,
        r#"{"event_id":"id","event":"view","user_id":"u","campaign":"c","ts":"2026-11-06T13:18:31.123+08:00","properties":{}}"#,
        r#"{"event_id":"id","event":"view","user_id":"u","campaign":"c","ts":0}"#,
    ];

    #[test]
    fn plain_events_take_the_fast_path() {
        for (i, text) in PLAIN.iter().enumerate() {
            let fast = plain_event(text, &ctx());
            // The last one is refused (before 2000): the general path says why.
            assert_eq!(fast.is_some(), i < 5, "{text}");
            if let Some(fast) = fast {
                assert_eq!(Ok(fast), general_event(text, &ctx()));
            }
        }
    }

    #[test]
    fn other_forms_take_the_general_path() {
        let rest = r#""event":"e","user_id":"u","campaign":"c""#;
        for text in [
            format!(r#"{{"event_id": "a",{rest}}}"#),
            format!(r#"{{"event_id":"a\u0062",{rest}}}"#),
            format!(r#"{{"event_id":"a","event_id":"b",{rest}}}"#),
            format!(r#"{{"event_id":"a","extra":1,{rest}}}"#),
            format!(r#"{{"event_id":"a","channel":null,{rest}}}"#),
            format!(r#"{{"event_id":"a","ts":01762435111000,{rest}}}"#),
            format!(r#"{{"event_id":"a","ts":1762435111000.0,{rest}}}"#),
            format!(r#"{{"event_id":"a","properties":{{"n":1e3}},{rest}}}"#),
            format!(r#"{{"event_id":"a","properties":{{"s":"q\"q"}},{rest}}}"#),
            format!(r#"{{"event_id":"a","properties":[],{rest}}}"#),
            format!(r#"{{"event_id":"a","properties":{{"n":-}},{rest}}}"#),
            format!(r#"{{"event_id":"a","properties":{{"n":1.}},{rest}}}"#),
            format!(r#"{{"event_id":"a","properties":{{"n":tru}},{rest}}}"#),
            format!(r#"{{"event_id":"a",{rest}}} "#),
            format!(r#"{{"event_id":"a",{rest},}}"#),
            format!(r#"{{"event_id":"",{rest}}}"#),
            r#"{"event_id":"a","event":"$x","user_id":"u","campaign":"c"}"#.to_string(),
            format!("{{\"event_id\":\"a\tb\",{rest}}}"),
            format!(r#"{{{rest}}}"#),
        ] {
            assert_eq!(plain_event(&text, &ctx()), None, "{text}");
        }
        let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        let nested = |n| {
            format!(
                r#"{{"event_id":"a","properties":{{"a":{}}},{rest}}}"#,
                deep(n)
            )
        };
        let limit = limits::PROPERTIES_DEPTH_MAX;
        assert!(plain_event(&nested(limit - 1), &ctx()).is_some());
        assert_eq!(plain_event(&nested(limit), &ctx()), None);
    }

    #[test]
    fn string_ends_are_found_at_any_offset() {
        for len in 0..80 {
            for special in [b'"', b'\\', b'\n', 0x1f, 0] {
                // Bytes that are none of them, high ones included (signed compares would
                // take those for control characters).
                let mut bytes: Vec<u8> = (0..len)
                    .map(|i| [b'a', 0xe4, 0xb8, 0x8a, 0x7f, 0x20, 0xff, 0x80][i % 8])
                    .collect();
                bytes.extend([special, b'"', 0xe4, 0xb8, 0x8a]);
                assert_eq!(string_end(&bytes), Some(len), "{len} {special}");
                bytes[len] = 0x20;
                bytes[len + 1] = b'b';
                assert_eq!(string_end(&bytes), None, "{len}");
            }
        }
        assert_eq!(string_end("上海\"".as_bytes()), Some(6));
    }

    /// Thousands of byte-level mutations of plain events: whatever the fast path accepts,
    /// the general path accepts as the same event.
    #[test]
    fn the_fast_path_agrees_with_the_general_path_on_mutated_events() {
        const INSERTS: &[u8] = b"\"\\,:{}[]0-.e1 \tatfnu\xc3";
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let (mut fast, mut tried) = (0, 0);
        for round in 0..50_000 {
            let mut bytes = PLAIN[round % PLAIN.len()].as_bytes().to_vec();
            for _ in 0..1 + next(3) {
                let at = next(bytes.len());
                match next(3) {
                    0 => {
                        bytes.remove(at);
                    }
                    1 => bytes.insert(at, INSERTS[next(INSERTS.len())]),
                    _ => bytes[at] = INSERTS[next(INSERTS.len())],
                }
            }
            let Ok(text) = std::str::from_utf8(&bytes) else {
                continue;
            };
            let text = text.trim();
            tried += 1;
            if let Some(event) = plain_event(text, &ctx()) {
                fast += 1;
                assert_eq!(Ok(event), general_event(text, &ctx()), "{text}");
            }
        }
        assert!(
            fast > tried / 25,
            "{fast} of {tried} mutations took the fast path"
        );
    }
}
