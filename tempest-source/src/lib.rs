//! What a Tempest source crate implements, and nothing more.
//!
//! # How this crate is laid out
//!
//! - [`Source`]: the trait a source implements. It is built from a typed
//!   [`Source::Config`] (`Serialize` and `Deserialize`: the runtime merges
//!   `[source.config]` of `Topology.toml` over the configuration compiled
//!   into the package, unknown keys rejected), polled in batches on a thread of
//!   its own (so `poll` may block), and told which messages to ack.
//! - [`SourceMsg`] and [`MsgId`]: one message as the source hands it to the
//!   runtime. Payloads are [`bytes::Bytes`], so copies are reference counts.
//! - [`SourceSettings`] and [`AckPolicy`]: the plain fields the runtime reads
//!   to schedule polls, acks and the monitor hook.
//! - [`SourceError`]: one error type that keeps its cause and says whether a
//!   retry may help ([`SourceError::is_retryable`]).
//! - [`SourceContext`] and [`metrics::Metrics`]: what the runtime hands a
//!   source at setup, including a handle to record its own metrics, so a
//!   source crate never depends on the runtime.
//!
//! The crate depends on `serde` (a config derives `Serialize` and
//! `Deserialize`), `thiserror`, `bytes` and `hdrhistogram` (behind
//! [`metrics::Histogram`]) only.
//!
//! # A minimal source
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use tempest_source::{MsgId, Source, SourceError, SourceMsg};
//!
//! #[derive(Debug, Serialize, Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct CounterConfig {
//!     limit: u64,
//! }
//!
//! struct Counter {
//!     next: u64,
//!     limit: u64,
//!     acked: u64,
//! }
//!
//! impl Source for Counter {
//!     type Config = CounterConfig;
//!
//!     fn name(&self) -> &str {
//!         "counter"
//!     }
//!
//!     fn from_config(config: CounterConfig) -> Result<Self, SourceError> {
//!         Ok(Counter { next: 0, limit: config.limit, acked: 0 })
//!     }
//!
//!     fn poll(&mut self, max: usize, out: &mut Vec<SourceMsg>) -> Result<(), SourceError> {
//!         while out.len() < max && self.next < self.limit {
//!             out.push(SourceMsg::new(self.next, self.next.to_string()));
//!             self.next += 1;
//!         }
//!         Ok(())
//!     }
//!
//!     fn ack(&mut self, _id: &MsgId) -> Result<(), SourceError> {
//!         self.acked += 1;
//!         Ok(())
//!     }
//! }
//!
//! let mut source = Counter::from_config(CounterConfig { limit: 3 }).unwrap();
//! let mut batch = Vec::new();
//! source.poll(10, &mut batch).unwrap();
//! assert_eq!(batch.len(), 3);
//! ```

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub mod headers;
pub mod metrics;

pub use headers::{HeaderError, Headers};
pub use metrics::Metrics;

/// The identity of a source message, as the source needs it to ack.
///
/// Numeric ids (sequence numbers, offsets) are stored inline; any other id
/// (a Redis stream id, a receipt handle) as shared bytes. Cloning never
/// copies the id's bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MsgId {
    /// A numeric id: a sequence number or an offset.
    Int(u64),
    /// Any other id, as the source's own bytes.
    Bytes(Bytes),
}

impl MsgId {
    /// The numeric id, if this is one.
    pub fn as_int(&self) -> Option<u64> {
        match self {
            MsgId::Int(n) => Some(*n),
            MsgId::Bytes(_) => None,
        }
    }
}

impl From<u64> for MsgId {
    fn from(n: u64) -> Self {
        MsgId::Int(n)
    }
}

impl From<&'static str> for MsgId {
    fn from(s: &'static str) -> Self {
        MsgId::Bytes(Bytes::from_static(s.as_bytes()))
    }
}

impl From<String> for MsgId {
    fn from(s: String) -> Self {
        MsgId::Bytes(Bytes::from(s))
    }
}

impl From<Bytes> for MsgId {
    fn from(b: Bytes) -> Self {
        MsgId::Bytes(b)
    }
}

impl fmt::Display for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MsgId::Int(n) => write!(f, "{n}"),
            MsgId::Bytes(b) => match std::str::from_utf8(b) {
                Ok(s) => f.write_str(s),
                Err(_) => {
                    for byte in b.iter() {
                        write!(f, "{byte:02x}")?;
                    }
                    Ok(())
                }
            },
        }
    }
}

impl fmt::Debug for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MsgId::Int(n) => write!(f, "MsgId({n})"),
            MsgId::Bytes(_) => write!(f, "MsgId({self})"),
        }
    }
}

/// One message as a source hands it to the runtime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceMsg {
    /// What the source needs to ack this message.
    pub id: MsgId,
    /// The message body; the root task receives it as is.
    pub payload: Bytes,
    /// When the message entered the source system, in milliseconds since the
    /// Unix epoch (the broker's time where it has one, else the poll time).
    pub timestamp: u64,
    /// How many times the source has delivered this message, this delivery
    /// included (1 on first delivery).
    pub delivered: u32,
    /// The message's key, if the source has one (a Kafka key, a field of a
    /// Redis entry). Every task message derived from this one inherits it
    /// unless a task sets another.
    pub key: Option<Bytes>,
    /// Headers the source attaches (a broker's message headers), inherited
    /// like the key.
    pub headers: Headers,
}

impl SourceMsg {
    /// A message delivered for the first time, stamped with the current time.
    pub fn new(id: impl Into<MsgId>, payload: impl Into<Bytes>) -> Self {
        SourceMsg {
            id: id.into(),
            payload: payload.into(),
            timestamp: now_millis(),
            delivered: 1,
            key: None,
            headers: Headers::new(),
        }
    }

    /// The message with this key.
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// The message with header `name` set to `value`.
    pub fn with_header(
        mut self,
        name: impl Into<String>,
        value: impl Into<Bytes>,
    ) -> Result<Self, HeaderError> {
        self.headers.insert(name, value)?;
        Ok(self)
    }
}

/// Milliseconds since the Unix epoch, as [`SourceMsg::timestamp`] holds them.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How the runtime acks messages at the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckPolicy {
    /// [`Source::ack`] once per completed message, as soon as it completes.
    Individual,
    /// [`Source::batch_ack`] with up to this many ids at once, and at least
    /// every [`SourceSettings::ack_interval`] for a partial batch.
    Batch(usize),
    /// Never ack: for sources without acknowledgements (at most once).
    None,
}

/// The settings the runtime reads from a source to drive it.
///
/// Plain fields: a source computes them from its config once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceSettings {
    /// The most messages one `poll` is asked for.
    pub poll_count: usize,
    /// The wait after an empty poll; doubled after each further empty poll
    /// up to `max_backoff`.
    pub poll_interval: Duration,
    /// The longest wait between polls while the source is empty or failing.
    pub max_backoff: Duration,
    /// How completed messages are acked.
    pub ack_policy: AckPolicy,
    /// The longest a partial ack batch waits (with [`AckPolicy::Batch`]).
    pub ack_interval: Duration,
    /// How often [`Source::monitor`] runs.
    pub monitor_interval: Duration,
    /// Whether an id names exactly one entry of the source (a Redis stream
    /// id, a Kafka offset): then a second delivery of an id still in flight
    /// is the same entry delivered again, and the runtime does not run it a
    /// second time; it settles it when the first delivery completes. Leave
    /// it `false` where two entries may share an id (a list source whose
    /// ids are payloads): every delivery then runs.
    pub unique_ids: bool,
    /// Whether [`SourceMsg::delivered`] counts every delivery of an entry,
    /// across restarts of the topology: a message delivered before always
    /// comes with `delivered > 1`. With at-most-once state updates, the
    /// runtime then looks up only those messages' updates in the state
    /// backend; leave it `false` (every message is looked up) unless the
    /// source system keeps the count (a Redis stream's pending list does).
    pub counts_deliveries: bool,
}

impl Default for SourceSettings {
    fn default() -> Self {
        SourceSettings {
            poll_count: 1024,
            poll_interval: Duration::from_millis(1),
            max_backoff: Duration::from_millis(100),
            ack_policy: AckPolicy::Batch(1024),
            ack_interval: Duration::from_millis(10),
            monitor_interval: Duration::from_secs(10),
            unique_ids: false,
            counts_deliveries: false,
        }
    }
}

/// Why the runtime gave up on a message without acking it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailReason {
    /// A task returned an error.
    TaskError {
        /// The task's name.
        task: String,
        /// The error as the task reported it.
        message: String,
    },
    /// A task panicked while handling the message.
    TaskPanic {
        /// The task's name.
        task: String,
        /// The panic's message.
        message: String,
    },
    /// The message did not complete within the topology's `msg_timeout`.
    Timeout,
    /// The worker holding the message disconnected.
    WorkerLost {
        /// The task the worker served.
        task: String,
    },
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailReason::TaskError { task, message } => write!(f, "task {task} failed: {message}"),
            FailReason::TaskPanic { task, message } => {
                write!(f, "task {task} panicked: {message}")
            }
            FailReason::Timeout => f.write_str("timed out"),
            FailReason::WorkerLost { task } => write!(f, "the worker for task {task} was lost"),
        }
    }
}

/// A message the runtime gave up on, as [`Source::fail`] receives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailedMsg {
    /// The message's id.
    pub id: MsgId,
    /// Why the last attempt failed.
    pub reason: FailReason,
    /// How many times the runtime ran it (retries included).
    pub attempts: u32,
}

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in a source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The configuration is invalid; names the key and the problem.
    #[error("invalid source configuration: {0}")]
    Config(String),
    /// The system behind the source cannot be reached (connection refused,
    /// lost, timed out). Retryable: the runtime backs off and tries again.
    #[error("{what}: {source}")]
    Unavailable {
        /// What the source was doing, e.g. "connecting to redis://host:6379".
        what: String,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
    /// An operation failed in a way a retry will not fix.
    #[error("{what}")]
    Failed {
        /// What failed and why.
        what: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
}

impl SourceError {
    /// A configuration error naming the problem.
    pub fn config(message: impl Into<String>) -> Self {
        SourceError::Config(message.into())
    }

    /// A retryable error: the system behind the source is unreachable.
    pub fn unavailable(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        SourceError::Unavailable {
            what: what.into(),
            source: source.into(),
        }
    }

    /// A permanent failure with an optional cause.
    pub fn failed(what: impl Into<String>) -> Self {
        SourceError::Failed {
            what: what.into(),
            source: None,
        }
    }

    /// A permanent failure caused by `source`.
    pub fn failed_with(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        SourceError::Failed {
            what: what.into(),
            source: Some(source.into()),
        }
    }

    /// Whether a retry (after a backoff) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SourceError::Unavailable { .. })
    }
}

/// What the runtime hands a source at [`Source::setup`].
#[derive(Clone, Debug)]
pub struct SourceContext {
    /// The topology's name.
    pub topology: String,
    /// A handle to record the source's own metrics, labelled with the
    /// topology and the source's name.
    pub metrics: Metrics,
}

impl SourceContext {
    /// A context for tests of a source, with a private metrics registry.
    pub fn for_tests(topology: &str) -> Self {
        SourceContext {
            topology: topology.to_string(),
            metrics: Metrics::new_registry().with_label("topology", topology.to_string()),
        }
    }
}

/// A source of messages: a queue, a log, a broker.
///
/// The runtime calls every method from one thread, the source's own, so a
/// method may block (a `poll` may wait for data for a while). Hooks other
/// than [`poll`](Source::poll) and [`ack`](Source::ack) default to doing
/// nothing.
///
/// Delivery is at least once: a message is acked only when every task of the
/// pipeline has handled it. A message that is never acked must come back
/// from the source (a visibility timeout, a pending-entries list); the
/// runtime tells the source of messages it gave up on through
/// [`fail`](Source::fail).
pub trait Source: Send + 'static {
    /// The source's typed configuration. A package compiles one in
    /// (`TopologyBuilder::source_config::<S>(config)`); the runtime
    /// serializes it to a TOML table, merges `[source.config]` of
    /// `Topology.toml` over it (keys the file sets win) and deserializes the
    /// result, so it needs both `Serialize` and `Deserialize`, and the two
    /// must round-trip (derive both; `Option` fields that are `None` are
    /// left out). Use `#[serde(deny_unknown_fields)]` so a misspelt key is
    /// an error.
    type Config: Serialize + DeserializeOwned + Send + 'static;

    /// A short name for logs and metrics, e.g. `"redis-stream"`.
    fn name(&self) -> &str;

    /// Builds the source from its configuration, validating it. Should not
    /// connect yet: [`connect`](Source::connect) does.
    fn from_config(config: Self::Config) -> Result<Self, SourceError>
    where
        Self: Sized;

    /// The settings the runtime drives this source with.
    fn settings(&self) -> SourceSettings {
        SourceSettings::default()
    }

    /// Called once before [`connect`](Source::connect), with the runtime's
    /// context (metrics handle, topology name).
    fn setup(&mut self, _ctx: &SourceContext) -> Result<(), SourceError> {
        Ok(())
    }

    /// Connects to the system behind the source. Called at start and again
    /// after a retryable error, with backoff.
    fn connect(&mut self) -> Result<(), SourceError> {
        Ok(())
    }

    /// Whether the source is currently connected and working.
    fn healthy(&self) -> bool {
        true
    }

    /// Appends up to `max` messages to `out`. Appending none means nothing
    /// is available now; the runtime polls again after
    /// [`SourceSettings::poll_interval`], backing off.
    fn poll(&mut self, max: usize, out: &mut Vec<SourceMsg>) -> Result<(), SourceError>;

    /// Acks one completed message.
    fn ack(&mut self, id: &MsgId) -> Result<(), SourceError>;

    /// Acks several completed messages; by default one [`ack`](Source::ack)
    /// each. Override it where the system acks in one round trip.
    fn batch_ack(&mut self, ids: &[MsgId]) -> Result<(), SourceError> {
        for id in ids {
            self.ack(id)?;
        }
        Ok(())
    }

    /// The runtime gave up on these messages without acking them (failure
    /// policy `None`, or `Retry` exhausted). By default nothing happens and
    /// the source's own redelivery takes over; a source may dead-letter them.
    fn fail(&mut self, _msgs: &[FailedMsg]) -> Result<(), SourceError> {
        Ok(())
    }

    /// Runs every [`SourceSettings::monitor_interval`]: reclaim stale
    /// deliveries, report lag.
    fn monitor(&mut self) -> Result<(), SourceError> {
        Ok(())
    }

    /// A bounded source returns `true` once it will never produce another
    /// message. The topology then finishes what is in flight and stops.
    fn exhausted(&self) -> bool {
        false
    }

    /// Called once when the topology stops, after the last acks.
    fn shutdown(&mut self) -> Result<(), SourceError> {
        Ok(())
    }

    /// Called before each metrics flush: record gauges such as lag here.
    fn flush_metrics(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msg_ids_display_text_and_hex() {
        assert_eq!(MsgId::from(42).to_string(), "42");
        assert_eq!(MsgId::from("1700-0").to_string(), "1700-0");
        assert_eq!(
            MsgId::Bytes(Bytes::from_static(&[0xff, 0x01])).to_string(),
            "ff01"
        );
        assert_eq!(format!("{:?}", MsgId::from(7)), "MsgId(7)");
    }

    #[test]
    fn only_unavailable_is_retryable() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(SourceError::unavailable("connecting", io).is_retryable());
        assert!(!SourceError::failed("bad reply").is_retryable());
        assert!(!SourceError::config("count must be > 0").is_retryable());
    }

    #[test]
    fn errors_keep_their_cause() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err = SourceError::unavailable("connecting to redis://127.0.0.1:1", io);
        assert_eq!(
            err.to_string(),
            "connecting to redis://127.0.0.1:1: refused"
        );
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn ack_policy_reads_from_config_text() {
        #[derive(Deserialize)]
        struct C {
            p: AckPolicy,
        }
        let c: C = serde_json_like("individual");
        assert_eq!(c.p, AckPolicy::Individual);

        fn serde_json_like(s: &str) -> C {
            use serde::de::value::{MapDeserializer, StrDeserializer};
            let map = MapDeserializer::<_, serde::de::value::Error>::new(
                [("p", StrDeserializer::<serde::de::value::Error>::new(s))].into_iter(),
            );
            C::deserialize(map).unwrap()
        }
    }
}
