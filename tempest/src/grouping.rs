//! Groupings: which worker of a task gets a message, per edge (Storm's
//! stream groupings).
//!
//! - [`Grouping::Shuffle`] (the default): any worker; idle workers first.
//! - [`Grouping::Key`]: every message with the same key goes to the same
//!   worker while the task's set of workers does not change (Storm's fields
//!   grouping, on the message's [key](crate::MsgCtx::key)).
//! - [`Grouping::All`]: a copy to every worker.
//! - [`Grouping::Global`]: one worker, the same for every message.
//! - [`Grouping::PartialKey`]: a key goes to the less loaded of two workers
//!   chosen by the key (Storm's partial key grouping, for skewed keys).
//!
//! Keys are assigned by rendezvous hashing over the workers' *slots*: a
//! worker of a task takes the lowest slot no live worker of the task
//! holds, so a worker that restarts gets its old slot and its old keys
//! back, and when one joins or leaves only the keys it gains or loses move
//! (a share of 1/n of them). This module is pure: it knows no actors.

use std::fmt;
use std::str::FromStr;

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// How an edge spreads messages over the workers of its child. See the
/// [module docs](self).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Grouping {
    /// Any worker (idle ones first); unstarted work moves to idle workers.
    #[default]
    Shuffle,
    /// The same worker for the same key, in the order messages were emitted.
    Key,
    /// A copy to every worker; each copy counts toward completion.
    All,
    /// One worker for every message.
    Global,
    /// The less loaded of two workers the key picks.
    PartialKey,
}

impl Grouping {
    /// Its name in `Topology.toml`.
    pub fn name(self) -> &'static str {
        match self {
            Grouping::Shuffle => "shuffle",
            Grouping::Key => "key",
            Grouping::All => "all",
            Grouping::Global => "global",
            Grouping::PartialKey => "partial_key",
        }
    }

    /// Whether a message needs a key on such an edge.
    pub fn needs_key(self) -> bool {
        matches!(self, Grouping::Key | Grouping::PartialKey)
    }

    /// Whether messages on such an edge go to a chosen worker (never moved
    /// to an idle one).
    pub fn is_pinned(self) -> bool {
        self != Grouping::Shuffle
    }
}

impl fmt::Display for Grouping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Grouping {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [
            Grouping::Shuffle,
            Grouping::Key,
            Grouping::All,
            Grouping::Global,
            Grouping::PartialKey,
        ]
        .into_iter()
        .find(|g| g.name() == s)
        .ok_or_else(|| {
            format!("unknown grouping {s:?}: expected shuffle, key, all, global or partial_key")
        })
    }
}

impl<'de> serde::Deserialize<'de> for Grouping {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Grouping {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// The score of worker slot `slot` for `key`: the highest wins.
fn score(key: &[u8], slot: u32) -> u64 {
    xxh3_64_with_seed(
        key,
        u64::from(slot).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x7465_6d70,
    )
}

/// The slot that owns `key` among `slots` (rendezvous hashing); `None`
/// without slots.
pub(crate) fn owner(key: &[u8], slots: impl IntoIterator<Item = u32>) -> Option<u32> {
    slots.into_iter().max_by_key(|&s| (score(key, s), s))
}

/// The two slots `key` may go to under partial key grouping: the owner
/// and the runner-up (the same one twice with a single slot).
pub(crate) fn two_owners(key: &[u8], slots: impl IntoIterator<Item = u32>) -> Option<(u32, u32)> {
    let mut best: Option<(u64, u32)> = None;
    let mut second: Option<(u64, u32)> = None;
    for s in slots {
        let c = (score(key, s), s);
        if best.is_none_or(|b| c > b) {
            second = best;
            best = Some(c);
        } else if second.is_none_or(|b| c > b) {
            second = Some(c);
        }
    }
    let (_, a) = best?;
    Some((a, second.map_or(a, |(_, b)| b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_refused() {
        for g in [
            Grouping::Shuffle,
            Grouping::Key,
            Grouping::All,
            Grouping::Global,
            Grouping::PartialKey,
        ] {
            assert_eq!(g.name().parse::<Grouping>(), Ok(g));
        }
        let e = "fields".parse::<Grouping>().unwrap_err();
        assert!(e.contains("\"fields\"") && e.contains("partial_key"), "{e}");
    }

    #[test]
    fn keys_spread_over_slots() {
        let mut counts = [0usize; 4];
        for i in 0..40_000u32 {
            let key = format!("user-{i}");
            counts[owner(key.as_bytes(), 0..4).unwrap() as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
        assert_eq!(owner(b"x", std::iter::empty()), None);
    }

    /// A worker joining a task of `n` takes its share of the keys, 1/(n+1),
    /// and no more (within 1.5 points over 40,000 keys), all from the
    /// others: the move the topology logs when a worker joins.
    #[test]
    fn a_joining_slot_takes_only_its_share_of_the_keys() {
        for n in 1u32..=6 {
            let total = 40_000u32;
            let moved = (0..total)
                .filter(|i| {
                    let key = format!("word-{i}");
                    let before = owner(key.as_bytes(), 0..n).unwrap();
                    let after = owner(key.as_bytes(), 0..=n).unwrap();
                    assert!(after == before || after == n);
                    after != before
                })
                .count();
            let share = moved as f64 / f64::from(total);
            let fair = 1.0 / f64::from(n + 1);
            assert!(
                (share - fair).abs() < 0.015,
                "{n} -> {} slots: {moved} of {total} keys moved ({share:.3}, fair {fair:.3})",
                n + 1
            );
        }
    }

    proptest! {
        /// Removing a slot moves only the keys it owned; adding one moves
        /// only keys to it.
        #[test]
        fn only_the_changed_slot_s_keys_move(keys in proptest::collection::vec(any::<Vec<u8>>(), 1..200), n in 2u32..8, gone in 0u32..8) {
            let gone = gone % n;
            for k in &keys {
                let before = owner(k, 0..n).unwrap();
                let after = owner(k, (0..n).filter(|&s| s != gone)).unwrap();
                if before != gone {
                    prop_assert_eq!(before, after);
                }
                let grown = owner(k, 0..=n).unwrap();
                prop_assert!(grown == before || grown == n);
            }
        }

        #[test]
        fn the_two_choices_are_the_owner_and_another(key in any::<Vec<u8>>(), n in 1u32..8) {
            let (a, b) = two_owners(&key, 0..n).unwrap();
            prop_assert_eq!(Some(a), owner(&key, 0..n));
            prop_assert!(b < n);
            prop_assert!(n == 1 || a != b);
        }
    }
}
