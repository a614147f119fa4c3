//! Joins: a fan-in task that receives, in one call, everything its
//! parents emitted for one source message, grouped by parent.
//!
//! A task with several parents normally runs once per message its parents
//! emit (the per-message mode). A [`JoinTask`], added with
//! [`Pipeline::join`](crate::Pipeline::join), runs once per source message
//! instead, on one worker, with a [`Joined`]: the fan-in barrier already
//! waits until every parent is done with the source message, so the join
//! sees all of it, and only the current attempt's.
//!
//! ```
//! use tempest::{JoinTask, Joined, MsgCtx, Output, TaskResult};
//!
//! /// Pairs a user's profile with their orders.
//! #[derive(Clone)]
//! struct Enrich;
//!
//! impl JoinTask for Enrich {
//!     fn name(&self) -> &str { "enrich" }
//!     fn handle(&mut self, joined: Joined, _: &MsgCtx) -> TaskResult {
//!         let orders = joined.from("orders").len();
//!         let Some(profile) = joined.from("profile").first() else {
//!             return Ok(Output::None);
//!         };
//!         let name = String::from_utf8_lossy(profile.payload());
//!         Ok(Output::one(format!("{name}: {orders} orders")))
//!     }
//! }
//! ```
//!
//! Internally a join is a [`Task`] whose message is an envelope of the
//! parts (see `envelope`), so the worker loop and the wire carry it like
//! any other message.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use tempest_source::Headers;

use serde::de::DeserializeOwned;

use crate::codec::{preview, Codec};
use crate::envelope;
use crate::msg::{MsgCtx, TaskIdx};
use crate::task::{Msg, Task, TaskContext, TaskError, TaskResult};

/// A fan-in task that handles everything its parents emitted for one
/// source message in one call: a join.
///
/// Each worker owns its instance, as for a [`Task`]. The join runs once
/// per source message for which at least one parent emitted something,
/// and not at all when none did (its descendants complete as they would
/// for a task that emits nothing).
///
/// The message's [context](MsgCtx) has no parent (each part names its
/// own); its key is the parts' key if they all carry the same one, else
/// none; its headers are those every part carries with the same value.
/// The join's outputs inherit that key and those headers unless they set
/// their own (see [`Out`](crate::Out)).
pub trait JoinTask: Send + 'static {
    /// The task's name, unique within its pipeline.
    fn name(&self) -> &str;

    /// Called once per worker before its first message.
    fn started(&mut self, _ctx: &TaskContext) {}

    /// Handles everything the parents emitted for one source message.
    fn handle(&mut self, joined: Joined, ctx: &MsgCtx) -> TaskResult;

    /// Called once per worker when it stops.
    fn shutdown(&mut self) {}

    /// Called after each batch of messages, and when the worker is idle:
    /// record batched metrics here.
    fn flush_metrics(&mut self) {}

    /// Periodic work, as [`Task::tick`](crate::Task::tick).
    fn tick(&mut self) -> TaskResult {
        Ok(crate::task::Output::None)
    }
}

/// One output of one parent of a join: its payload, key and headers.
#[derive(Clone, PartialEq, Eq)]
pub struct Part {
    parent: &'static str,
    payload: Bytes,
    key: Option<Bytes>,
    headers: Headers,
    codec: Codec,
}

impl Part {
    /// A part from `parent` with this payload, without key or headers: to
    /// build a [`Joined`] in a unit test.
    pub fn new(parent: &'static str, payload: impl Into<Bytes>) -> Self {
        Part {
            parent,
            payload: payload.into(),
            key: None,
            headers: Headers::new(),
            codec: Codec::default(),
        }
    }

    /// The part as encoded with `codec` (JSON unless set).
    pub fn with_codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// The codec its parent encodes with (see [`Codec`]).
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Its payload decoded with its parent's codec: a join over typed
    /// parents reads their values with it. A payload that does not decode
    /// is an error naming the parent, the codec, the type and the first
    /// bytes.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, TaskError> {
        self.codec.decode(&self.payload).map_err(|e| {
            TaskError::msg(format!(
                "cannot decode {} from \"{}\" as {}: {}; {}",
                e.codec().label(),
                self.parent,
                std::any::type_name::<T>(),
                e.reason(),
                preview(&self.payload)
            ))
        })
    }

    /// The part with this key.
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// The part with these headers.
    pub fn with_headers(mut self, headers: Headers) -> Self {
        self.headers = headers;
        self
    }

    /// The parent that emitted it.
    pub fn parent(&self) -> &'static str {
        self.parent
    }

    /// Its payload.
    pub fn payload(&self) -> &Msg {
        &self.payload
    }

    /// Its payload, taken.
    pub fn into_payload(self) -> Msg {
        self.payload
    }

    /// Its key, if it has one.
    pub fn key(&self) -> Option<&Bytes> {
        self.key.as_ref()
    }

    /// Its key as text, if it has one and it is UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        self.key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
    }

    /// Its headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The value of its header `name`.
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers.get(name)
    }
}

impl fmt::Debug for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Part");
        d.field("parent", &self.parent)
            .field("payload", &String::from_utf8_lossy(&self.payload));
        if let Some(k) = &self.key {
            d.field("key", &String::from_utf8_lossy(k));
        }
        if !self.headers.is_empty() {
            d.field("headers", &self.headers);
        }
        d.finish()
    }
}

/// Everything a join task's parents emitted for one source message,
/// grouped by parent in the order the pipeline's edges name them, each
/// parent's parts in the order it emitted them (for a parent that handled
/// several messages, in the order those finished).
#[derive(Clone, PartialEq, Eq)]
pub struct Joined {
    parents: Arc<[&'static str]>,
    /// Grouped by parent: parent `i`'s parts are `parts[ends[i-1]..ends[i]]`.
    parts: Vec<Part>,
    ends: Vec<usize>,
}

impl Joined {
    /// A join of `parts` from `parents`, for a unit test of a [`JoinTask`]:
    /// the parts are grouped by parent in the order of `parents` (a part
    /// from a parent not listed adds it at the end), each parent's in the
    /// order given.
    ///
    /// ```
    /// use tempest::{Joined, Part};
    ///
    /// let joined = Joined::new(
    ///     &["profile", "orders"],
    ///     vec![Part::new("orders", "o1"), Part::new("profile", "alice")],
    /// );
    /// assert_eq!(joined.parts()[0].payload(), "alice");
    /// assert_eq!(joined.from("orders").len(), 1);
    /// ```
    pub fn new(parents: &[&'static str], parts: Vec<Part>) -> Self {
        let mut names = parents.to_vec();
        for p in &parts {
            if !names.contains(&p.parent) {
                names.push(p.parent);
            }
        }
        let mut parts: Vec<(usize, Part)> = parts
            .into_iter()
            .map(|p| (names.iter().position(|&n| n == p.parent).unwrap_or(0), p))
            .collect();
        parts.sort_by_key(|(i, _)| *i);
        Self::grouped(names.into(), parts)
    }

    /// From parts already sorted by their parent's position.
    fn grouped(parents: Arc<[&'static str]>, parts: Vec<(usize, Part)>) -> Self {
        let mut ends = vec![0; parents.len()];
        for (i, _) in &parts {
            if let Some(end) = ends.get_mut(*i) {
                *end += 1;
            }
        }
        let mut total = 0;
        for end in &mut ends {
            total += *end;
            *end = total;
        }
        Joined {
            parents,
            parts: parts.into_iter().map(|(_, p)| p).collect(),
            ends,
        }
    }

    /// Unpacks an envelope from the in-flight table for a join task whose
    /// parents are `parents`.
    pub(crate) fn decode(
        parents: &Arc<[&'static str]>,
        codecs: &[Codec],
        envelope: Bytes,
    ) -> Result<Self, TaskError> {
        let raw = envelope::decode(envelope)?;
        let mut parts = Vec::with_capacity(raw.len());
        let mut sorted = true;
        for r in raw {
            let i = r.parent as usize;
            let Some(&parent) = parents.get(i) else {
                return Err(TaskError::msg(format!(
                    "malformed join envelope: a part from parent #{i} of a task with {} parents",
                    parents.len()
                )));
            };
            sorted &= parts.last().is_none_or(|(last, _)| *last <= i);
            parts.push((
                i,
                Part {
                    parent,
                    payload: r.payload,
                    key: r.key,
                    headers: r.headers,
                    codec: codecs.get(i).copied().unwrap_or_default(),
                },
            ));
        }
        if !sorted {
            parts.sort_by_key(|(i, _)| *i);
        }
        Ok(Self::grouped(Arc::clone(parents), parts))
    }

    /// Every part, grouped by parent.
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// Every part, grouped by parent.
    pub fn iter(&self) -> std::slice::Iter<'_, Part> {
        self.parts.iter()
    }

    /// The parts, taken.
    pub fn into_parts(self) -> Vec<Part> {
        self.parts
    }

    /// How many parts there are.
    pub fn len(&self) -> usize {
        self.parts.len()
    }

    /// Whether there is none (never, for a join the runtime runs).
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// What `parent` emitted, in order; empty if it emitted nothing (or is
    /// not a parent of the join: see [`parents`](Self::parents)).
    pub fn from(&self, parent: &str) -> &[Part] {
        match self.parents.iter().position(|&p| p == parent) {
            Some(i) => self.group(i),
            None => &[],
        }
    }

    /// Every parent, in the order the pipeline's edges name them, with
    /// what it emitted (nothing, for some).
    pub fn parents(&self) -> impl ExactSizeIterator<Item = (&'static str, &[Part])> + '_ {
        self.parents
            .iter()
            .enumerate()
            .map(|(i, &p)| (p, self.group(i)))
    }

    fn group(&self, i: usize) -> &[Part] {
        let start = i.checked_sub(1).map_or(0, |j| self.ends[j]);
        &self.parts[start..self.ends[i]]
    }
}

impl fmt::Debug for Joined {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.parents()).finish()
    }
}

impl IntoIterator for Joined {
    type Item = Part;
    type IntoIter = std::vec::IntoIter<Part>;
    fn into_iter(self) -> Self::IntoIter {
        self.parts.into_iter()
    }
}

impl<'a> IntoIterator for &'a Joined {
    type Item = &'a Part;
    type IntoIter = std::slice::Iter<'a, Part>;
    fn into_iter(self) -> Self::IntoIter {
        self.parts.iter()
    }
}

/// A [`JoinTask`] as a [`Task`]: each message is an envelope, unpacked
/// into a [`Joined`]. `parents` names the join's parents by their position
/// in the envelope (the compiled pipeline's parent order).
pub(crate) struct JoinAdapter<J> {
    join: J,
    parents: Arc<[&'static str]>,
    /// The parents' task indices, in the same order.
    parent_idx: Arc<[TaskIdx]>,
    /// The parents' codecs, in the same order (JSON until `started`).
    codecs: Vec<Codec>,
}

impl<J: JoinTask> JoinAdapter<J> {
    pub(crate) fn new(join: J, parents: &[(TaskIdx, &'static str)]) -> Self {
        JoinAdapter {
            join,
            parents: parents.iter().map(|p| p.1).collect(),
            parent_idx: parents.iter().map(|p| p.0).collect(),
            codecs: vec![Codec::default(); parents.len()],
        }
    }
}

impl<J: JoinTask> Task for JoinAdapter<J> {
    fn name(&self) -> &str {
        self.join.name()
    }

    fn started(&mut self, ctx: &TaskContext) {
        self.codecs = self.parent_idx.iter().map(|&p| ctx.codec_of(p)).collect();
        self.join.started(ctx);
    }

    fn handle(&mut self, msg: Msg, ctx: &MsgCtx) -> TaskResult {
        let joined = Joined::decode(&self.parents, &self.codecs, msg)?;
        self.join.handle(joined, ctx)
    }

    fn shutdown(&mut self) {
        self.join.shutdown();
    }

    fn flush_metrics(&mut self) {
        self.join.flush_metrics();
    }

    fn tick(&mut self) -> TaskResult {
        self.join.tick()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::Output;

    #[derive(Clone, Default)]
    struct Collect(Vec<Joined>);

    impl JoinTask for Collect {
        fn name(&self) -> &str {
            "collect"
        }
        fn handle(&mut self, joined: Joined, _: &MsgCtx) -> TaskResult {
            let n = joined.len();
            self.0.push(joined);
            Ok(Output::one(n.to_string()))
        }
    }

    fn adapter() -> JoinAdapter<Collect> {
        JoinAdapter::new(Collect::default(), &[(0, "a"), (1, "b"), (2, "c")])
    }

    fn envelope(parts: &[(u16, &'static str)]) -> Bytes {
        let payloads: Vec<(u16, Bytes)> = parts
            .iter()
            .map(|&(i, p)| (i, Bytes::from_static(p.as_bytes())))
            .collect();
        let none = Headers::new();
        envelope::encode(payloads.iter().map(|(i, p)| (*i, p, None, &none)))
    }

    #[test]
    fn an_envelope_unpacks_grouped_by_parent() {
        let mut task = adapter();
        let out = task
            .handle(
                envelope(&[(0, "a1"), (2, "c1"), (0, "a2"), (2, "c2")]),
                &MsgCtx::new(1),
            )
            .unwrap();
        assert_eq!(out, Output::one("4"));
        let joined = &task.join.0[0];
        let payloads = |ps: &[Part]| ps.iter().map(|p| p.payload().clone()).collect::<Vec<_>>();
        assert_eq!(payloads(joined.from("a")), ["a1", "a2"]);
        assert!(joined.from("b").is_empty(), "b emitted nothing");
        assert_eq!(payloads(joined.from("c")), ["c1", "c2"]);
        assert!(joined.from("nope").is_empty());
        assert_eq!(payloads(joined.parts()), ["a1", "a2", "c1", "c2"]);
        let parents: Vec<(&str, usize)> = joined.parents().map(|(p, ps)| (p, ps.len())).collect();
        assert_eq!(parents, [("a", 2), ("b", 0), ("c", 2)]);
        assert!(joined
            .iter()
            .all(|p| p.payload()[0] == p.parent().as_bytes()[0]));
    }

    #[test]
    fn parts_decode_with_their_parents_codec() {
        let value = (7u32, "seven".to_string());
        let bytes = Codec::Postcard.encode(&value).unwrap();
        let part = Part::new("enrich", bytes.clone()).with_codec(Codec::Postcard);
        assert_eq!(part.decode::<(u32, String)>().unwrap(), value);
        let err = Part::new("enrich", bytes)
            .decode::<(u32, String)>()
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(
                "cannot decode JSON from \"enrich\" as (u32, alloc::string::String): "
            ),
            "{text}"
        );
        assert!(
            text.contains("payload (7 bytes) starts b\"\\x07\\x05seven\""),
            "{text}"
        );
    }

    #[test]
    fn a_malformed_envelope_is_a_task_error_not_a_panic() {
        let mut task = adapter();
        let ctx = MsgCtx::new(1);
        let err = task
            .handle(Bytes::from("not an envelope"), &ctx)
            .unwrap_err();
        assert!(err.message().contains("malformed join envelope"), "{err}");
        let err = task.handle(envelope(&[(3, "x")]), &ctx).unwrap_err();
        assert!(
            err.message().contains("parent #3 of a task with 3 parents"),
            "{err}"
        );
        let good = envelope(&[(1, "b1")]);
        let err = task.handle(good.slice(..good.len() - 1), &ctx).unwrap_err();
        assert!(err.message().contains("malformed join envelope"), "{err}");
        assert!(task.join.0.is_empty(), "the join never ran");
    }

    #[test]
    fn joined_for_unit_tests_groups_by_the_parents_given() {
        let j = Joined::new(
            &["x", "y"],
            vec![
                Part::new("y", "y1"),
                Part::new("z", "z1"),
                Part::new("x", "x1"),
            ],
        );
        let order: Vec<&str> = j.iter().map(|p| p.parent()).collect();
        assert_eq!(order, ["x", "y", "z"]);
        assert_eq!(j.parents().len(), 3);
        assert_eq!(format!("{j:?}").matches("Part").count(), 3);
    }
}
