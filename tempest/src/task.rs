//! The [`Task`] trait: one step of a pipeline (Storm's bolt).

use std::fmt;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tempest_source::{HeaderError, Headers, Metrics};

use crate::codec::{Codec, TaskCodecs};
use crate::msg::{Emitted, MsgCtx, TaskIdx};

/// A message as a task receives and emits it.
pub type Msg = Bytes;

/// What [`Task::handle`] returns: the task's outputs, or an error that the
/// topology's failure policy handles.
pub type TaskResult = Result<Output, TaskError>;

/// The outputs of one [`Task::handle`] call. Every output goes to every
/// child of the task, with the key and headers of the message it came from
/// unless it is an [`Out`] that sets its own.
///
/// `Output::None` and `Output::One` do not allocate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Output {
    /// No output: the task's descendants that have no other live parent
    /// complete without running for this message.
    #[default]
    None,
    /// One output.
    One(Msg),
    /// Any number of outputs.
    Many(Vec<Msg>),
    /// Outputs that set their own key or headers.
    Outs(Vec<Out>),
}

impl Output {
    /// One output from anything that converts into bytes.
    pub fn one(msg: impl Into<Msg>) -> Self {
        Output::One(msg.into())
    }

    /// How many outputs there are.
    pub fn len(&self) -> usize {
        match self {
            Output::None => 0,
            Output::One(_) => 1,
            Output::Many(v) => v.len(),
            Output::Outs(v) => v.len(),
        }
    }

    /// Whether there is no output.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the outputs to `out`, each with its key and headers: its
    /// own, else those of the input (`ctx`). On an error (a header that
    /// cannot be added) `out` is left as it was.
    #[inline(always)]
    pub(crate) fn drain_into(self, ctx: &MsgCtx, out: &mut Vec<Emitted>) -> Result<(), TaskError> {
        // The common cases inline into the worker loop; the rest is out of
        // line.
        match self {
            Output::None => Ok(()),
            Output::One(payload) => {
                out.push(Emitted::with_meta(payload, ctx.meta.clone()));
                Ok(())
            }
            other => other.drain_many_into(ctx, out),
        }
    }

    #[inline(never)]
    fn drain_many_into(self, ctx: &MsgCtx, out: &mut Vec<Emitted>) -> Result<(), TaskError> {
        let inherit = |payload| Emitted::with_meta(payload, ctx.meta.clone());
        match self {
            Output::None => {}
            Output::One(m) => out.push(inherit(m)),
            Output::Many(v) => out.extend(v.into_iter().map(inherit)),
            Output::Outs(v) => {
                let before = out.len();
                out.reserve(v.len());
                for o in v {
                    match o.resolve(ctx) {
                        Ok(e) => out.push(e),
                        Err(e) => {
                            out.truncate(before);
                            return Err(e.into());
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// One output that sets its own key or headers; the rest it inherits from
/// the message it came from.
///
/// ```
/// use tempest::{MsgCtx, Out, Output};
///
/// # fn main() -> Result<(), tempest::source::HeaderError> {
/// let word = Out::new("alice").key("alice").header("lang", "en")?;
/// let output: Output = vec![word, Out::new("-").no_key()].into();
/// assert_eq!(output.len(), 2);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Out {
    payload: Msg,
    key: KeyChange,
    headers: HeaderChange,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum KeyChange {
    Inherit,
    Set(Bytes),
    Clear,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum HeaderChange {
    Inherit,
    /// Set these over the inherited headers.
    Add(Headers),
    /// Replace the inherited headers with these.
    Replace(Headers),
}

impl Out {
    /// An output with this payload, inheriting key and headers.
    pub fn new(payload: impl Into<Msg>) -> Self {
        Out {
            payload: payload.into(),
            key: KeyChange::Inherit,
            headers: HeaderChange::Inherit,
        }
    }

    /// The output with this key.
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = KeyChange::Set(key.into());
        self
    }

    /// The output with key `key` unless it sets (or clears) its own.
    pub(crate) fn key_if_unset(mut self, key: &Bytes) -> Self {
        if self.key == KeyChange::Inherit {
            self.key = KeyChange::Set(key.clone());
        }
        self
    }

    /// The output without a key.
    pub fn no_key(mut self) -> Self {
        self.key = KeyChange::Clear;
        self
    }

    /// The output with header `name` set to `value`, over the headers it
    /// inherits.
    pub fn header(
        mut self,
        name: impl Into<String>,
        value: impl Into<Bytes>,
    ) -> Result<Self, HeaderError> {
        match &mut self.headers {
            HeaderChange::Add(h) | HeaderChange::Replace(h) => h.insert(name, value)?,
            HeaderChange::Inherit => {
                let mut h = Headers::new();
                h.insert(name, value)?;
                self.headers = HeaderChange::Add(h);
            }
        }
        Ok(self)
    }

    /// The output with exactly these headers (none inherited).
    pub fn headers(mut self, headers: Headers) -> Self {
        self.headers = HeaderChange::Replace(headers);
        self
    }

    /// The output with this payload instead, keeping its key and headers:
    /// how a typed task's output gets its encoded value.
    pub(crate) fn with_payload(mut self, payload: Msg) -> Self {
        self.payload = payload;
        self
    }

    fn resolve(self, ctx: &MsgCtx) -> Result<Emitted, HeaderError> {
        if let (KeyChange::Inherit, HeaderChange::Inherit) = (&self.key, &self.headers) {
            return Ok(Emitted::with_meta(self.payload, ctx.meta.clone()));
        }
        let key = match self.key {
            KeyChange::Inherit => ctx.key().cloned(),
            KeyChange::Set(k) => Some(k),
            KeyChange::Clear => None,
        };
        let headers = match self.headers {
            HeaderChange::Inherit => ctx.headers().clone(),
            HeaderChange::Replace(h) => h,
            HeaderChange::Add(extra) => {
                let mut h = ctx.headers().clone();
                for (name, value) in extra.iter() {
                    h.insert(name, value.clone())?;
                }
                h
            }
        };
        Ok(Emitted::new(self.payload, key, headers))
    }
}

impl<T: Into<Msg>> From<T> for Out {
    fn from(payload: T) -> Self {
        Out::new(payload)
    }
}

impl From<Out> for Output {
    fn from(o: Out) -> Self {
        Output::Outs(vec![o])
    }
}

impl From<Vec<Out>> for Output {
    fn from(v: Vec<Out>) -> Self {
        Output::Outs(v)
    }
}

impl From<()> for Output {
    fn from((): ()) -> Self {
        Output::None
    }
}

impl From<Msg> for Output {
    fn from(m: Msg) -> Self {
        Output::One(m)
    }
}

impl From<Vec<Msg>> for Output {
    fn from(v: Vec<Msg>) -> Self {
        Output::Many(v)
    }
}

impl From<Option<Msg>> for Output {
    fn from(m: Option<Msg>) -> Self {
        m.map_or(Output::None, Output::One)
    }
}

/// A task's failure to handle one message.
///
/// Any `std::error::Error` converts into it, so `?` works inside
/// [`Task::handle`]; [`TaskError::msg`] makes one from text.
pub struct TaskError {
    message: String,
}

impl TaskError {
    /// An error with this message.
    pub fn msg(message: impl Into<String>) -> Self {
        TaskError {
            message: message.into(),
        }
    }

    /// The error's message, with its causes.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl<E: std::error::Error> From<E> for TaskError {
    fn from(err: E) -> Self {
        let mut message = err.to_string();
        let mut source = err.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        TaskError { message }
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TaskError({:?})", self.message)
    }
}

/// What the runtime hands a task when a worker starts it.
#[derive(Clone, Debug)]
pub struct TaskContext {
    /// The topology's name.
    pub topology: String,
    /// The task's name.
    pub task: String,
    /// Which of the task's workers this is, from 0.
    pub worker: usize,
    /// A handle to record the task's own metrics, labelled with the topology
    /// and the task's name.
    pub metrics: Metrics,
    /// The codecs of the pipeline's producers and the task's own.
    pub(crate) codecs: TaskCodecs,
    /// Whether messages come to it by key (an async worker then runs one
    /// message per key at a time).
    pub(crate) one_per_key: bool,
    /// How often the worker ticks, if it does.
    pub(crate) tick_interval: Option<std::time::Duration>,
    /// The keyed stores of the run, and those this worker uses.
    pub(crate) states: crate::state::WorkerStates,
    /// With a durable state backend: how often the worker checkpoints.
    pub(crate) checkpoint_interval: std::time::Duration,
}

impl TaskContext {
    /// The context of worker `worker` of task `task`, whose inputs and
    /// outputs are all JSON: for calling `started` in a unit test.
    pub fn new(
        topology: impl Into<String>,
        task: impl Into<String>,
        worker: usize,
        metrics: Metrics,
    ) -> Self {
        TaskContext {
            topology: topology.into(),
            task: task.into(),
            worker,
            metrics,
            codecs: TaskCodecs::default(),
            one_per_key: false,
            tick_interval: None,
            states: crate::state::WorkerStates::default(),
            checkpoint_interval: std::time::Duration::from_secs(1),
        }
    }

    /// The task's keyed store `name`, holding values of type `V`: shared
    /// by the task's workers of this process, each key changed only by the
    /// worker that owns it (with `key` grouping), kept in memory or, with
    /// a state backend ([`TopologyBuilder::state_backend`]), checkpointed
    /// to it. Open it in `started` and keep the handle. Fails if the store
    /// was opened with another value type.
    ///
    /// [`TopologyBuilder::state_backend`]: crate::TopologyBuilder::state_backend
    pub fn state<V>(
        &self,
        name: &str,
    ) -> Result<crate::state::KeyedState<V>, crate::state::StateError>
    where
        V: serde::Serialize + serde::de::DeserializeOwned + Clone + Send + 'static,
    {
        self.states.handle(&self.task, name)
    }

    /// The codec of the message `msg` is the context of: that of the task
    /// that emitted it (or of the source), set when the pipeline was built.
    /// Typed tasks decode with it; an untyped task may too.
    pub fn input_codec(&self, msg: &MsgCtx) -> Codec {
        self.codec_of(msg.parent.task)
    }

    /// The codec of the messages task `parent` emits (`NO_TASK`: the
    /// source's payloads).
    pub(crate) fn codec_of(&self, parent: TaskIdx) -> Codec {
        self.codecs.inputs.of(parent)
    }

    /// The codec this task's outputs are read with downstream.
    pub fn output_codec(&self) -> Codec {
        self.codecs.output
    }

    /// `msg` decoded with the codec of its producer: how an [`AsyncTask`]
    /// (or any untyped task) reads a typed input. A payload that does not
    /// decode is an error naming the task, the message, the codec, the type
    /// and the payload's first bytes, as a typed task's is.
    pub fn decode<T: DeserializeOwned>(&self, msg: &Msg, ctx: &MsgCtx) -> Result<T, TaskError> {
        self.input_codec(ctx)
            .decode(msg)
            .map_err(|e| decode_failed::<T>(&self.task, ctx, &e, msg))
    }

    /// `value` encoded with this task's output codec: how an untyped task
    /// emits a value its typed children read.
    pub fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Msg, TaskError> {
        self.codecs.output.encode(value).map_err(|e| {
            TaskError::msg(format!(
                "task \"{}\": {e} (a {})",
                self.task,
                std::any::type_name::<T>()
            ))
        })
    }
}

/// A payload that did not decode, as a task error: `task "parse": message
/// 42: cannot decode JSON from "split" as app::Word: expected value at line
/// 1 column 1; payload (5 bytes) starts b"oops!"`.
pub(crate) fn decode_failed<T>(
    task: &str,
    ctx: &MsgCtx,
    err: &crate::codec::CodecError,
    payload: &[u8],
) -> TaskError {
    let from = match ctx.parent() {
        Some(parent) => format!("\"{parent}\""),
        None if ctx.parent.task == crate::msg::NO_TASK => "the source".to_string(),
        None => format!("task #{}", ctx.parent.task),
    };
    TaskError::msg(format!(
        "task \"{task}\": message {}: cannot decode {} from {from} as {}: {}; {}",
        ctx.id(),
        err.codec().label(),
        std::any::type_name::<T>(),
        err.reason(),
        crate::codec::preview(payload)
    ))
}

/// One step of a pipeline: it handles a message and emits zero, one or many.
///
/// Each worker of a task owns its own instance (cloned from the one given to
/// [`Pipeline::task`](crate::Pipeline::task)), so `handle` takes `&mut self`
/// and needs no locking. A worker calls `handle` for one message at a time.
///
/// A panic inside `filter` or `handle` fails that message (per the failure
/// policy), not the process; the worker keeps its instance and goes on.
///
/// Blocking inside `handle` is allowed: it holds this worker's thread. For
/// I/O-bound work with an async client, an [`AsyncTask`] keeps many
/// messages in flight on one worker.
pub trait Task: Send + 'static {
    /// The task's name, unique within its pipeline.
    fn name(&self) -> &str;

    /// Called once per worker before its first message.
    fn started(&mut self, _ctx: &TaskContext) {}

    /// Returns `false` to skip a message: it counts as handled with no
    /// output.
    fn filter(&mut self, _msg: &Msg, _ctx: &MsgCtx) -> bool {
        true
    }

    /// Handles one message. `ctx` says where it comes from (the source
    /// message, attempt, parent task) and carries its key and headers,
    /// which its outputs inherit.
    fn handle(&mut self, msg: Msg, ctx: &MsgCtx) -> TaskResult;

    /// Called once per worker when it stops.
    fn shutdown(&mut self) {}

    /// Called after each batch of messages, and when the worker is idle:
    /// record batched metrics here.
    fn flush_metrics(&mut self) {}

    /// Periodic work (Storm's tick tuple): called every tick interval
    /// ([`Pipeline::tick_interval`](crate::Pipeline::tick_interval), or
    /// `tick_interval` in `Topology.toml`) on the worker's own loop,
    /// between messages, never while `handle` runs; a busy worker ticks
    /// between runs of its batch, so a tick may come late, never early.
    ///
    /// Each output is a new root: tracked through the task's descendants
    /// like a source message (timeouts, the failure policy, retries), with
    /// no source message to ack at its end. The outputs set their own key
    /// and headers ([`Out`]); there is no input to inherit them from.
    fn tick(&mut self) -> TaskResult {
        Ok(Output::None)
    }
}

/// How many messages one worker of an [`AsyncTask`] keeps in flight
/// unless the task sets its own concurrency.
pub const DEFAULT_CONCURRENCY: usize = 64;

/// A step of a pipeline for I/O-bound work: `handle` is `async`, and each
/// worker keeps many messages in flight at once (its *concurrency*,
/// [`DEFAULT_CONCURRENCY`] unless set with
/// [`Pipeline::concurrency`](crate::Pipeline::concurrency), `concurrency`
/// in `Topology.toml` or `--concurrency`).
///
/// Write `async fn handle(&self, msg: Msg, ctx: MsgCtx) -> TaskResult`.
/// `handle` takes `&self`, so the calls of one worker share its instance
/// (use a `Cell`, `RefCell` or atomic for state they change); the context
/// comes by value, so the future owns it. The futures need not be `Send`:
/// each worker polls its futures together on a single-threaded tokio
/// runtime of its own, so `tokio::time::sleep`, tokio's I/O and clients
/// built on them work inside `handle`. Blocking inside `handle` stalls
/// every message of the worker: use a [`Task`] for blocking work.
///
/// When a message's deadline ([`MsgCtx::deadline`], from `msg_timeout`)
/// passes, its future is dropped (cancelled at its current `.await`) and
/// the attempt counts as timed out: the failure policy applies. A panic
/// inside `handle` fails that message, as for a [`Task`].
pub trait AsyncTask: Send + 'static {
    /// The task's name, unique within its pipeline.
    fn name(&self) -> &str;

    /// Called once per worker before its first message.
    fn started(&mut self, _ctx: &TaskContext) {}

    /// Handles one message; many calls of one worker run at once.
    fn handle(&self, msg: Msg, ctx: MsgCtx) -> impl std::future::Future<Output = TaskResult>;

    /// Called once per worker when it stops, after its last call ended.
    fn shutdown(&mut self) {}
}

/// A future of an erased [`AsyncTask::handle`] call.
pub(crate) type HandleFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = TaskResult> + 'a>>;

/// An [`AsyncTask`] with its type erased, for the async worker loop.
pub(crate) trait AsyncRunner: Send {
    fn started(&mut self, ctx: &TaskContext);
    fn handle(&self, msg: Msg, ctx: MsgCtx) -> HandleFuture<'_>;
    fn shutdown(&mut self);
}

impl<T: AsyncTask> AsyncRunner for T {
    fn started(&mut self, ctx: &TaskContext) {
        AsyncTask::started(self, ctx);
    }

    fn handle(&self, msg: Msg, ctx: MsgCtx) -> HandleFuture<'_> {
        Box::pin(AsyncTask::handle(self, msg, ctx))
    }

    fn shutdown(&mut self) {
        AsyncTask::shutdown(self);
    }
}

/// One worker's instance of a task, of either kind.
pub(crate) enum TaskBody {
    /// A [`Task`]: one message at a time, on the worker's thread.
    Sync(Box<dyn Task>),
    /// An [`AsyncTask`]: many messages at once, on the worker's runtime.
    Async(Box<dyn AsyncRunner>),
}

/// A task that passes every message on unchanged, for the crate's unit
/// tests.
#[cfg(test)]
#[derive(Clone, Copy)]
pub(crate) struct PassOn(pub &'static str);

#[cfg(test)]
impl Task for PassOn {
    fn name(&self) -> &str {
        self.0
    }
    fn handle(&mut self, msg: Msg, _: &MsgCtx) -> TaskResult {
        Ok(Output::One(msg))
    }
}

/// An async task that passes every message on unchanged, for the crate's
/// unit tests.
#[cfg(test)]
#[derive(Clone, Copy)]
pub(crate) struct AsyncPassOn(pub &'static str);

#[cfg(test)]
impl AsyncTask for AsyncPassOn {
    fn name(&self) -> &str {
        self.0
    }
    async fn handle(&self, msg: Msg, _: MsgCtx) -> TaskResult {
        Ok(Output::One(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_convert_and_count() {
        assert_eq!(Output::from(()).len(), 0);
        assert_eq!(Output::one("a").len(), 1);
        assert_eq!(Output::from(vec![Msg::new(), Msg::new()]).len(), 2);
        assert!(Output::from(None::<Msg>).is_empty());
        let ctx = MsgCtx::new(7).with_key("k");
        let mut out = Vec::new();
        Output::from(vec![Msg::from("x"), Msg::from("y")])
            .drain_into(&ctx, &mut out)
            .unwrap();
        Output::one("z").drain_into(&ctx, &mut out).unwrap();
        let payloads: Vec<&[u8]> = out.iter().map(|e| &e.payload[..]).collect();
        assert_eq!(payloads, [&b"x"[..], b"y", b"z"]);
        assert!(out
            .iter()
            .all(|e| e.key().map(|k| &k[..]) == Some(&b"k"[..])));
    }

    #[test]
    fn outs_inherit_what_they_do_not_set() {
        let mut headers = Headers::new();
        headers.insert("trace", "t1").unwrap();
        let ctx = MsgCtx::new(1).with_key("in").with_headers(headers);
        let mut out = Vec::new();
        Output::from(vec![
            Out::new("a"),
            Out::new("b").key("word").header("lang", "en").unwrap(),
            Out::new("c").no_key().headers(Headers::new()),
        ])
        .drain_into(&ctx, &mut out)
        .unwrap();
        assert_eq!(out[0].key().map(|k| &k[..]), Some(&b"in"[..]));
        assert_eq!(out[0].headers().get_str("trace"), Some("t1"));
        assert_eq!(out[1].key().map(|k| &k[..]), Some(&b"word"[..]));
        assert_eq!(out[1].headers().get_str("trace"), Some("t1"));
        assert_eq!(out[1].headers().get_str("lang"), Some("en"));
        assert_eq!(out[2].key(), None);
        assert!(out[2].headers().is_empty());
    }

    #[test]
    fn an_output_that_would_carry_too_many_headers_fails_its_message() {
        let mut full = Headers::new();
        for i in 0..tempest_source::headers::MAX_HEADERS {
            full.insert(format!("h{i}"), "v").unwrap();
        }
        let ctx = MsgCtx::new(1).with_headers(full);
        let mut out = vec![Emitted::plain(Msg::from("earlier"))];
        let err = Output::from(vec![Out::new("a"), Out::new("b").header("x", "y").unwrap()])
            .drain_into(&ctx, &mut out)
            .unwrap_err();
        assert!(err.message().contains("at most 32 headers"), "{err}");
        assert_eq!(out.len(), 1, "a failed message emits nothing");
    }

    #[test]
    fn task_errors_keep_their_causes() {
        let err: TaskError = "12x".parse::<u32>().unwrap_err().into();
        assert_eq!(err.message(), "invalid digit found in string");
        assert_eq!(TaskError::msg("bad").to_string(), "bad");
    }
}
