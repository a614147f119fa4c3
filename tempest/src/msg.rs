//! The messages the runtime's layers exchange: task messages with their
//! context, tickets, verdicts and results.
//!
//! This module is the bottom of the runtime: it imports no other module of
//! the crate, so the in-flight table, the actors, the worker loop and the
//! wire protocol can all depend on it without depending on each other.

use std::fmt;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::Instant;

use actix::Message;
use bytes::Bytes;
use tempest_source::{Headers, MsgId};

/// The smallest frame limit (`max_frame`) a topology may set: the frames
/// of the handshake must fit.
pub(crate) const MIN_FRAME_LIMIT: usize = 1024;

/// A worker's index in its pipeline actor.
pub type WorkerId = u32;

/// The index of a task in its pipeline's [`Dag`](crate::Dag).
pub type TaskIdx = u16;

/// The [`TaskIdx`] that stands for "no task": the parent of a message that
/// came from the source, or of a join of several parents.
pub(crate) const NO_TASK: TaskIdx = TaskIdx::MAX;

/// Names one task message: its record, the attempt it belongs to, its task,
/// and which delivery of it a remote worker holds.
///
/// The in-flight table tells task messages apart by `slot`, `gen` and
/// `task` only: the siblings of a fan-out (several outputs of one parent
/// for one source message, headed for the same task) share those, and it
/// counts them. `copy` makes each message delivered to a remote worker
/// exact: the pipeline stamps a number of its own, unique among what that
/// worker holds, when it delivers the message, and the worker echoes the
/// ticket unchanged in its answer (or give-back), so an answer names the
/// very message it is for. The table creates tickets with `copy` 0 and
/// ignores it; queued, and in process, it is 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ticket {
    /// The record's slot.
    pub slot: u32,
    /// The record's generation when the message was dispatched.
    pub gen: u32,
    /// The task the message is for.
    pub task: TaskIdx,
    /// Which delivery to a remote worker this is (0 until one): compared
    /// only by what tracks that worker's messages, never by the in-flight
    /// table.
    pub copy: u32,
}

impl Ticket {
    /// The ticket of a message the in-flight table dispatches: for `task`,
    /// of the attempt `gen` of the record in `slot`, not delivered yet.
    pub(crate) fn new(slot: u32, gen: u32, task: TaskIdx) -> Self {
        Ticket {
            slot,
            gen,
            task,
            copy: 0,
        }
    }
}

/// One message for one task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskMsg {
    /// Which source message and attempt it belongs to.
    pub ticket: Ticket,
    /// The message.
    pub payload: Bytes,
    /// Where it comes from, its key and headers.
    pub ctx: MsgCtx,
}

/// What a task can know about the message it handles, besides the payload:
/// which source message it derives from, the attempt, the task that emitted
/// it, its key and headers, and its deadline.
///
/// Reading any of it never allocates. A task's outputs inherit the key and
/// headers of the message it handled unless it sets others (see
/// [`Out`](crate::Out)).
///
/// Build one with [`MsgCtx::new`] to call a task's `handle` in a unit test.
#[derive(Clone, PartialEq, Eq)]
pub struct MsgCtx {
    pub(crate) id: MsgId,
    pub(crate) origin: Origin,
    pub(crate) parent: Parent,
    pub(crate) meta: Meta,
}

/// What every task message of one attempt at a source message shares,
/// besides the id: kept whole in the in-flight record, so a context is
/// made by copying it (not field by field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Origin {
    pub attempt: u32,
    pub delivered: u32,
    pub timestamp: u64,
    /// Nanoseconds after [`epoch`] plus one; 0 for no deadline. (An
    /// `Option<Instant>` takes twice the room, and every task message
    /// carries this.)
    pub deadline: u64,
}

/// The task that emitted a message: its index and its interned name
/// ([`FROM_SOURCE`]: none). The `Dag` keeps one per task, so a context
/// copies it whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Parent {
    pub task: TaskIdx,
    pub name: NameId,
}

/// The parent of a message from the source, or of a join.
pub(crate) const FROM_SOURCE: Parent = Parent {
    task: NO_TASK,
    name: NO_NAME,
};

impl MsgCtx {
    /// The context of a first attempt of source message `id`, delivered
    /// once, stamped now, straight from the source, without key, headers or
    /// deadline: for calling a task directly in a unit test.
    pub fn new(id: impl Into<MsgId>) -> Self {
        MsgCtx {
            id: id.into(),
            origin: Origin {
                attempt: 1,
                delivered: 1,
                timestamp: tempest_source::now_millis(),
                deadline: 0,
            },
            parent: FROM_SOURCE,
            meta: Meta::default(),
        }
    }

    /// The id of the source message this message derives from.
    pub fn id(&self) -> &MsgId {
        &self.id
    }

    /// The attempt at the source message, from 1; a retry after a failure
    /// or a timeout is the next attempt.
    pub fn attempt(&self) -> u32 {
        self.origin.attempt
    }

    /// How many times the source has delivered the source message (1 on
    /// first delivery; more after a restart or a redelivery; 0 for a
    /// message that derives from a tick's output, not from the source).
    pub fn delivered(&self) -> u32 {
        self.origin.delivered
    }

    /// Whether the message derives from a tick's output rather than from
    /// a source message.
    pub fn from_tick(&self) -> bool {
        self.origin.delivered == 0
    }

    /// When the source message entered the source system, in milliseconds
    /// since the Unix epoch.
    pub fn timestamp(&self) -> u64 {
        self.origin.timestamp
    }

    /// The task that emitted this message; `None` for the root task's
    /// message (it comes from the source) and for a join (its parts name
    /// their parents).
    pub fn parent(&self) -> Option<&'static str> {
        name_of(self.parent.name)
    }

    /// The message's key, if it has one.
    pub fn key(&self) -> Option<&Bytes> {
        self.meta.key()
    }

    /// The key as text, if it has one and it is UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        self.key().and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The message's headers.
    pub fn headers(&self) -> &Headers {
        self.meta.headers()
    }

    /// The value of header `name`.
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers().get(name)
    }

    /// When the attempt times out (`msg_timeout` after it started), if the
    /// topology has a timeout. Work for the message after this is wasted:
    /// the message is retried or given up on.
    pub fn deadline(&self) -> Option<Instant> {
        from_nanos(self.origin.deadline)
    }

    /// Where this message is in its source message's processing: a hash of
    /// the tasks and output indices from the source to it, the same on
    /// every attempt and every redelivery (0 for the root task's message).
    /// With [at-most-once updates](crate::TopologyBuilder::at_most_once_updates)
    /// it and the source message's id name the message's state updates;
    /// without, it is 0 on every message.
    pub fn path(&self) -> u64 {
        self.meta.path()
    }

    /// With at-most-once updates: whether this message may have been
    /// handled before — a later attempt, a source delivery after the first
    /// (or any, from a source that does not count them), a message that
    /// went back to the queue from a lost worker, or one that derives from
    /// such a message. Only those have their updates looked up; the rest
    /// cannot have been applied yet.
    pub(crate) fn maybe_handled_before(&self) -> bool {
        self.origin.attempt > 1 || self.meta.seen()
    }

    /// The context marked as maybe handled before (in unit tests).
    pub fn handled_before(mut self) -> Self {
        self.meta = self.meta.with_seen();
        self
    }

    /// The context with this path.
    pub fn with_path(mut self, path: u64) -> Self {
        self.meta = self.meta.with_path(path);
        self
    }

    /// The context with this attempt.
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.origin.attempt = attempt;
        self
    }

    /// The context with this key.
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.meta = Meta::new(Some(key.into()), self.headers().clone());
        self
    }

    /// The context with these headers.
    pub fn with_headers(mut self, headers: Headers) -> Self {
        self.meta = Meta::new(self.key().cloned(), headers);
        self
    }

    /// The context with this source timestamp (ms since the Unix epoch).
    pub fn with_timestamp(mut self, millis: u64) -> Self {
        self.origin.timestamp = millis;
        self
    }

    /// The context with this deadline.
    pub fn with_deadline(mut self, deadline: Instant) -> Self {
        self.origin.deadline = to_nanos(deadline);
        self
    }
}

impl fmt::Debug for MsgCtx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("MsgCtx");
        d.field("id", &self.id)
            .field("attempt", &self.origin.attempt)
            .field("delivered", &self.origin.delivered)
            .field("timestamp", &self.origin.timestamp)
            .field("parent", &self.parent().unwrap_or("(source)"));
        if let Some(k) = self.key() {
            d.field("key", &String::from_utf8_lossy(k));
        }
        if !self.headers().is_empty() {
            d.field("headers", self.headers());
        }
        if self.path() != 0 {
            d.field("path", &format_args!("{:016x}", self.path()));
        }
        d.finish()
    }
}

/// One output of a task as it leaves the worker: the payload with the key
/// and headers it carries on (its own, or those of the input it came from).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Emitted {
    /// The payload.
    pub payload: Bytes,
    /// Its key, headers and (with at-most-once updates) the path of the
    /// message it becomes ([`MsgCtx::path`]).
    pub(crate) meta: Meta,
}

impl Emitted {
    /// An output with this key and these headers.
    pub fn new(payload: Bytes, key: Option<Bytes>, headers: Headers) -> Self {
        Emitted {
            payload,
            meta: Meta::new(key, headers),
        }
    }

    /// An output with neither key nor headers.
    pub fn plain(payload: Bytes) -> Self {
        Emitted {
            payload,
            meta: Meta::default(),
        }
    }

    /// An output inheriting `meta`.
    pub(crate) fn with_meta(payload: Bytes, meta: Meta) -> Self {
        Emitted { payload, meta }
    }

    /// The path of the message it becomes (0: none).
    pub(crate) fn path(&self) -> u64 {
        self.meta.path()
    }

    /// Sets the path of the message it becomes, and whether it may have
    /// been handled before.
    pub(crate) fn set_path(&mut self, path: u64, seen: bool) {
        self.meta = std::mem::take(&mut self.meta).with_path_seen(path, seen);
    }

    /// Whether the message it becomes may have been handled before.
    pub(crate) fn seen(&self) -> bool {
        self.meta.seen()
    }

    /// Its key.
    pub fn key(&self) -> Option<&Bytes> {
        self.meta.key()
    }

    /// Its headers.
    pub fn headers(&self) -> &Headers {
        self.meta.headers()
    }
}

/// A message's key, headers and path, together behind one shared pointer:
/// none takes no allocation, a clone never copies, and a task message
/// stays small (it is moved through every queue, and is most of the memory
/// a message in flight takes). A task that sets a key per output pays one
/// allocation per output, and so does every output with at-most-once
/// updates (its path); a topology without pays nothing for paths.
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct Meta(Option<Arc<MetaInner>>);

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MetaInner {
    key: Option<Bytes>,
    headers: Headers,
    path: u64,
    /// With at-most-once updates: the message may have been handled
    /// before (see [`MsgCtx::maybe_handled_before`]).
    seen: bool,
}

/// The headers of a message without any.
static NO_HEADERS: Headers = Headers::new();

impl Meta {
    pub(crate) fn new(key: Option<Bytes>, headers: Headers) -> Self {
        Meta::with_all(key, headers, 0, false)
    }

    fn with_all(key: Option<Bytes>, headers: Headers, path: u64, seen: bool) -> Self {
        if key.is_none() && headers.is_empty() && path == 0 && !seen {
            Meta(None)
        } else {
            Meta(Some(Arc::new(MetaInner {
                key,
                headers,
                path,
                seen,
            })))
        }
    }

    pub(crate) fn key(&self) -> Option<&Bytes> {
        self.0.as_ref().and_then(|m| m.key.as_ref())
    }

    /// Neither key, headers nor path.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    pub(crate) fn headers(&self) -> &Headers {
        self.0.as_ref().map_or(&NO_HEADERS, |m| &m.headers)
    }

    pub(crate) fn path(&self) -> u64 {
        self.0.as_ref().map_or(0, |m| m.path)
    }

    pub(crate) fn seen(&self) -> bool {
        self.0.as_ref().is_some_and(|m| m.seen)
    }

    /// The same key and headers with this path.
    pub(crate) fn with_path(self, path: u64) -> Self {
        let seen = self.seen();
        self.with_path_seen(path, seen)
    }

    /// The same key and headers with this path, marked as maybe handled
    /// before or not.
    pub(crate) fn with_path_seen(self, path: u64, seen: bool) -> Self {
        if self.path() == path && self.seen() == seen {
            return self;
        }
        match self.0 {
            None => Meta::with_all(None, Headers::new(), path, seen),
            Some(inner) => {
                let MetaInner { key, headers, .. } =
                    Arc::try_unwrap(inner).unwrap_or_else(|shared| (*shared).clone());
                Meta::with_all(key, headers, path, seen)
            }
        }
    }

    /// The same, marked as maybe handled before.
    pub(crate) fn with_seen(self) -> Self {
        let path = self.path();
        self.with_path_seen(path, true)
    }
}

impl fmt::Debug for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Meta")
            .field("key", &self.key().map(|k| String::from_utf8_lossy(k)))
            .field("headers", self.headers())
            .field("path", &self.path())
            .field("seen", &self.seen())
            .finish()
    }
}

/// The seed of task `name`'s output paths: its name's hash (stable across
/// builds and processes, so a path stored with a checkpoint names the same
/// message after a restart).
pub(crate) fn path_seed(name: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(name.as_bytes())
}

/// The path of output `index` of the task with seed `seed` ([`path_seed`])
/// handling a message at `path`.
#[inline]
pub(crate) fn output_path(path: u64, seed: u64, index: u32) -> u64 {
    let mut bytes = [0u8; 12];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..].copy_from_slice(&index.to_le_bytes());
    xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, path)
}

/// The output index a join's message stands at in [`output_path`]: a join
/// has one message per source message.
pub(crate) const JOIN_INDEX: u32 = u32::MAX;

/// An interned task name's number (see [`intern`]).
pub(crate) type NameId = u32;

/// No name: the parent of a message from the source, or of a join.
pub(crate) const NO_NAME: NameId = NameId::MAX;

/// Interned task names: `intern` stores each name once per process and
/// numbers it, so a message's context names its parent in four bytes and
/// hands out a `&'static str` without a lifetime (async tasks hold the
/// context across awaits). Task names are few and fixed.
static NAMES: RwLock<Vec<&'static str>> = RwLock::new(Vec::new());

/// `name`'s number and its interned copy.
pub(crate) fn intern(name: &str) -> (NameId, &'static str) {
    let known = |names: &[&'static str]| {
        names
            .iter()
            .position(|n| *n == name)
            .map(|i| (i as NameId, names[i]))
    };
    if let Some(found) = known(&NAMES.read().unwrap_or_else(PoisonError::into_inner)) {
        return found;
    }
    let mut names = NAMES.write().unwrap_or_else(PoisonError::into_inner);
    if let Some(found) = known(&names) {
        return found;
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.push(leaked);
    ((names.len() - 1) as NameId, leaked)
}

/// The interned name numbered `id`.
pub(crate) fn name_of(id: NameId) -> Option<&'static str> {
    if id == NO_NAME {
        return None;
    }
    NAMES
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(id as usize)
        .copied()
}

/// The instant deadlines are counted from, fixed at first use.
pub(crate) fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// `t` as a context's deadline: nanoseconds after [`epoch`], plus one.
pub(crate) fn to_nanos(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_nanos() as u64 + 1
}

/// A context's deadline as an instant (0: none).
pub(crate) fn from_nanos(n: u64) -> Option<Instant> {
    n.checked_sub(1)
        .map(|n| epoch() + std::time::Duration::from_nanos(n))
}

/// What a task did with one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Handled, with this many outputs (taken in order from the batch's
    /// `outputs`).
    Done(u32),
    /// `filter` returned false.
    Filtered,
    /// `handle` returned an error.
    Error(String),
    /// `filter` or `handle` panicked.
    Panicked(String),
    /// The message's deadline passed while an async task handled it: the
    /// call was cancelled (its future dropped), and the attempt counts as
    /// timed out.
    TimedOut,
}

/// A worker's results for one batch, in the order of the batch.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Results {
    pub worker: WorkerId,
    pub items: Vec<(Ticket, Verdict)>,
    pub outputs: Vec<Emitted>,
    /// The batch's emptied vector, returned for reuse.
    pub spent: Vec<TaskMsg>,
    /// Whether these are the batch's last results. A worker whose batch
    /// takes long sends what it has early, so fast messages are not held
    /// back by slow ones.
    pub complete: bool,
    /// Messages a remote worker gave back without starting them; they end
    /// no batch.
    pub returned: Vec<TaskMsg>,
    /// With a batch's last results from an in-process worker: the time it
    /// spent handling the batch (0: not measured).
    pub busy_ns: u64,
}
