//! The ids a stream source delivered and the runtime has neither acked nor
//! failed yet.
//!
//! A stream id `<ms>-<seq>` is kept as two integers, so tracking an entry
//! costs a hash-set insert and remove of 16 bytes, hashed with a
//! multiply-rotate hash: no allocation per entry and no SipHash on the
//! source's hot path. The ids come from Redis, which hands them out in
//! order, so the hash needs no protection against chosen keys.

use std::collections::HashSet;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

/// A stream entry id, `<ms>-<seq>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct StreamId {
    ms: u64,
    seq: u64,
}

impl StreamId {
    /// Parses `<ms>-<seq>`; `None` for anything else.
    pub fn parse(text: &[u8]) -> Option<StreamId> {
        let dash = text.iter().position(|&b| b == b'-')?;
        Some(StreamId {
            ms: digits(&text[..dash])?,
            seq: digits(&text[dash + 1..])?,
        })
    }
}

/// A non-empty run of ASCII digits as a number, without overflow.
fn digits(text: &[u8]) -> Option<u64> {
    if text.is_empty() {
        return None;
    }
    text.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// The FxHash step (as rustc uses it): fast on integers.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

/// The ids in flight. See the [module docs](self).
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    ids: HashSet<StreamId, BuildHasherDefault<IdHasher>>,
}

impl InFlight {
    /// Tracks `id`; `false` if it is not a stream id (never from Redis).
    pub fn insert(&mut self, id: &[u8]) -> bool {
        match StreamId::parse(id) {
            Some(id) => {
                self.ids.insert(id);
                true
            }
            None => false,
        }
    }

    /// Stops tracking `id`.
    pub fn remove(&mut self, id: &[u8]) {
        if let Some(id) = StreamId::parse(id) {
            self.ids.remove(&id);
        }
    }

    /// Whether `id` is in flight.
    pub fn contains(&self, id: &[u8]) -> bool {
        StreamId::parse(id).is_some_and(|id| self.ids.contains(&id))
    }

    /// How many ids are in flight.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The ids in flight, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = StreamId> + '_ {
        self.ids.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_parse_and_print_back() {
        for text in [
            "0-0",
            "1700000000000-0",
            "1700000000000-42",
            "18446744073709551615-1",
        ] {
            let id = StreamId::parse(text.as_bytes()).unwrap();
            assert_eq!(id.to_string(), text);
        }
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "1",
            "1-x",
            "x-1",
            "1-2-3",
            "18446744073709551616-0",
        ] {
            assert_eq!(StreamId::parse(bad.as_bytes()), None, "{bad}");
        }
        assert!(StreamId::parse(b"2-0") > StreamId::parse(b"1-9"));
    }

    #[test]
    fn acks_in_any_order_leave_exactly_the_rest() {
        // A small LCG: deterministic "random" ack orders.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            state >> 33
        };
        for round in 0..20 {
            let mut inflight = InFlight::default();
            let ids: Vec<String> = (0..500)
                .map(|i| format!("{}-{}", 1000 + i / 7, i % 7))
                .collect();
            for id in &ids {
                assert!(inflight.insert(id.as_bytes()));
            }
            // Delivered twice (a reclaim): still one entry.
            inflight.insert(ids[0].as_bytes());
            assert_eq!(inflight.len(), 500);
            let mut order: Vec<usize> = (0..ids.len()).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, (next() as usize) % (i + 1));
            }
            let keep = round * 20;
            for &i in &order[keep..] {
                inflight.remove(ids[i].as_bytes());
            }
            assert_eq!(inflight.len(), keep);
            for (pos, &i) in order.iter().enumerate() {
                assert_eq!(inflight.contains(ids[i].as_bytes()), pos < keep);
            }
            let mut left: Vec<String> = inflight.iter().map(|id| id.to_string()).collect();
            let mut want: Vec<String> = order[..keep].iter().map(|&i| ids[i].clone()).collect();
            left.sort();
            want.sort();
            assert_eq!(left, want);
        }
        assert!(!InFlight::default().insert(b"not-an-id"));
    }
}
