//! The funnel semantics of the contract for one user, independent of DataFusion.
//!
//! A chain is e1..ek matching steps 1..k with e1.ts <= ... <= ek.ts, ek.ts - e1.ts <= W,
//! and no event in two positions. For a fixed start e1 the deepest chain is found by
//! walking later events in ts order and, at each timestamp, extending the chain by as
//! many steps as distinct events of that timestamp can fill (a small bipartite matching,
//! because one event may match several steps). Reaching a deeper step earlier never
//! hurts, so this greedy walk is exact, and it takes each next step at its earliest
//! matching event, which is how the contract measures `median_seconds`.

/// One event of one user as the funnel sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FunnelEvent {
    /// UTC microseconds.
    pub ts: i64,
    /// Bit i set: the event matches step i (0-based).
    pub steps: u64,
}

/// The outcome for one user.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserOutcome {
    /// Deepest level reached, 0..=k.
    pub level: usize,
    /// Index (into the sorted events) of the step-1 event starting the attributing chain.
    pub start: Option<usize>,
    /// Timestamps of steps 1..=level along the attributing chain.
    pub step_ts: Vec<i64>,
    /// Some chain reaching `level` still has its window open at `as_of`.
    pub open: bool,
    /// The ts of the latest step-1 event starting a chain that reaches `level`: the user
    /// is open while `as_of < last_start + W`, which a live funnel checks at each poll.
    pub last_start: i64,
}

/// Which first-step events count and when "now" is.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct ChainParams {
    pub steps: usize,
    /// Conversion window in microseconds (inclusive).
    pub window: i64,
    /// `[from, to)` on the first step's ts.
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub as_of: Option<i64>,
}

/// Evaluate one user. `events` must be sorted by ts, equal timestamps in event_id order
/// (the attribution tie-break), and hold each event_id once.
pub fn evaluate(events: &[FunnelEvent], p: &ChainParams) -> UserOutcome {
    let mut evaluator = Evaluator::default();
    evaluator.evaluate(events, p);
    evaluator.best
}

/// [`evaluate`] with buffers kept between users, so folding millions of users
/// allocates nothing per user.
#[derive(Debug, Default)]
pub struct Evaluator {
    best: UserOutcome,
    times: Vec<i64>,
    group: Vec<u64>,
}

impl Evaluator {
    /// The outcome for `events`, valid until the next call.
    pub fn evaluate(&mut self, events: &[FunnelEvent], p: &ChainParams) -> &UserOutcome {
        let best = &mut self.best;
        best.level = 0;
        best.start = None;
        best.step_ts.clear();
        best.open = false;
        best.last_start = 0;
        let mut group_start = 0;
        for (s, e) in events.iter().enumerate() {
            if s > 0 && events[s - 1].ts != e.ts {
                group_start = s;
            }
            if e.steps & 1 == 0
                || p.from.is_some_and(|f| e.ts < f)
                || p.to.is_some_and(|t| e.ts >= t)
            {
                continue;
            }
            let depth = chain_from(events, s, group_start, p, &mut self.times, &mut self.group);
            if depth > best.level {
                best.level = depth;
                best.start = Some(s);
                best.step_ts.clone_from(&self.times);
                best.open = false;
            }
            if depth == best.level {
                best.last_start = e.ts;
                best.open |= p.as_of.is_some_and(|now| e.ts + p.window > now);
            }
            if best.level == p.steps {
                break;
            }
        }
        &self.best
    }
}

/// Depth of the deepest chain starting at `events[s]`; fills `times` with its step times.
fn chain_from(
    events: &[FunnelEvent],
    s: usize,
    group_start: usize,
    p: &ChainParams,
    times: &mut Vec<i64>,
    group: &mut Vec<u64>,
) -> usize {
    let start_ts = events[s].ts;
    let deadline = start_ts.saturating_add(p.window);
    times.clear();
    times.push(start_ts);
    let mut level = 1;
    let mut i = group_start;
    while level < p.steps && i < events.len() && events[i].ts <= deadline {
        let ts = events[i].ts;
        let mut j = i + 1;
        while j < events.len() && events[j].ts == ts {
            j += 1;
        }
        // Most timestamps hold one event: no matching needed.
        let added = if j == i + 1 {
            usize::from(i != s && events[i].steps >> level & 1 == 1)
        } else {
            group.clear();
            group.extend((i..j).filter(|&x| x != s).map(|x| events[x].steps));
            extend_in_group(group, level, p.steps)
        };
        times.extend(std::iter::repeat_n(ts, added));
        level += added;
        i = j;
    }
    level
}

/// How many consecutive steps from `level` (0-based next step) distinct events of one
/// timestamp can fill: augmenting-path matching, step by step, stopping at the first miss.
fn extend_in_group(group: &[u64], level: usize, steps: usize) -> usize {
    if group.len() == 1 {
        return usize::from(level < steps && group[0] >> level & 1 == 1);
    }
    let mut owner: Vec<Option<usize>> = vec![None; group.len()]; // event -> step
    let mut added = 0;
    for step in level..steps {
        let mut seen = vec![false; group.len()];
        if !augment(step, group, &mut owner, &mut seen) {
            break;
        }
        added += 1;
    }
    added
}

fn augment(step: usize, group: &[u64], owner: &mut [Option<usize>], seen: &mut [bool]) -> bool {
    for (e, mask) in group.iter().enumerate() {
        if mask >> step & 1 == 0 || seen[e] {
            continue;
        }
        seen[e] = true;
        if owner[e].is_none_or(|other| augment(other, group, owner, seen)) {
            owner[e] = Some(step);
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(ts: i64, steps: u64, _rank: u32) -> FunnelEvent {
        FunnelEvent { ts, steps }
    }

    fn params(steps: usize, window: i64) -> ChainParams {
        ChainParams {
            steps,
            window,
            from: None,
            to: None,
            as_of: None,
        }
    }

    #[test]
    fn window_is_inclusive() {
        let at_w = [ev(0, 1, 0), ev(10, 2, 1)];
        assert_eq!(evaluate(&at_w, &params(2, 10)).level, 2);
        let past_w = [ev(0, 1, 0), ev(11, 2, 1)];
        assert_eq!(evaluate(&past_w, &params(2, 10)).level, 1);
    }

    #[test]
    fn one_event_fills_one_step_but_equal_ts_events_chain() {
        // A single event matching both steps of "view -> view" reaches only level 1...
        assert_eq!(evaluate(&[ev(5, 0b11, 0)], &params(2, 100)).level, 1);
        // ...two events at the same ts reach 2.
        assert_eq!(
            evaluate(&[ev(5, 0b11, 0), ev(5, 0b11, 1)], &params(2, 100)).level,
            2
        );
        // Matching must not take the flexible event for the wrong step.
        let group = [ev(0, 0b001, 0), ev(3, 0b110, 1), ev(3, 0b010, 2)];
        assert_eq!(evaluate(&group, &params(3, 10)).level, 3);
    }

    #[test]
    fn attribution_prefers_the_earliest_start_of_the_deepest_chain() {
        let events = [ev(0, 1, 0), ev(50, 1, 1), ev(60, 2, 2)];
        let out = evaluate(&events, &params(2, 20));
        assert_eq!(
            (out.level, out.start, out.step_ts.clone()),
            (2, Some(1), vec![50, 60])
        );
        let out = evaluate(&events, &params(2, 100));
        assert_eq!((out.level, out.start), (2, Some(0)));
    }

    #[test]
    fn from_to_apply_to_the_first_step_only() {
        let events = [ev(10, 1, 0), ev(30, 2, 1)];
        let p = ChainParams {
            from: Some(0),
            to: Some(20),
            ..params(2, 100)
        };
        assert_eq!(evaluate(&events, &p).level, 2);
        let p = ChainParams {
            from: Some(11),
            to: Some(40),
            ..params(2, 100)
        };
        assert_eq!(evaluate(&events, &p).level, 0);
    }

    #[test]
    fn open_windows_are_pending() {
        let events = [ev(0, 1, 0), ev(100, 1, 1)];
        let p = ChainParams {
            as_of: Some(120),
            ..params(2, 50)
        };
        assert!(evaluate(&events, &p).open);
        let p = ChainParams {
            as_of: Some(150),
            ..params(2, 50)
        };
        assert!(!evaluate(&events, &p).open, "start + W > as_of is required");
    }
}
