//! Tempest: a stream-topology runtime in the spirit of Apache Storm.
//!
//! A **topology** is a name, a [`Source`](tempest_source::Source) and a
//! [`Pipeline`]: a DAG of [`Task`]s. The runtime polls the source in
//! batches, routes every source message through the DAG, tracks it until
//! every task has handled it, and then acks it at the source. A message that
//! fails or times out is handled by the topology's [`FailurePolicy`].
//!
//! # How this crate is laid out
//!
//! - [`task`]: the [`Task`] and [`AsyncTask`] traits, their [`Output`] and
//!   [`TaskError`].
//! - [`join`]: the [`JoinTask`] trait, for a fan-in task that handles all
//!   its parents emitted for a source message in one call ([`Joined`]).
//! - [`typed`]: [`TypedTask`], a task over Rust types, and its adapter.
//! - [`codec`]: [`Codec`] (JSON, postcard, raw), the codec of each edge.
//! - [`grouping`]: [`Grouping`] (shuffle, key, all, global, partial key),
//!   which worker of a task gets a message, per edge.
//! - [`pipeline`]: the [`Pipeline`] builder, its validation (every problem
//!   at once) and its export as DOT or Mermaid; the compiled [`Dag`].
//! - [`topology`]: [`TopologyBuilder`], [`TopologyOptions`],
//!   [`FailurePolicy`].
//! - `inflight`: the inflight table: integer-indexed records, fan-in
//!   barriers, the deadline list the sweeper walks, retries.
//! - `actors`: the `SourceActor` (its own thread), the `PipelineActor`
//!   (inflight table, ready queues) and the `TopologyActor` (lifecycle).
//! - `worker`: the task-side loop, shared by every transport.
//! - `async_worker`: the loop of an [`AsyncTask`]'s workers: many calls in
//!   flight on a single-threaded runtime, results as they end.
//! - [`state`]: [`KeyedState`], a task's keyed state, in memory or
//!   checkpointed to a [`StateBackend`].
//! - [`window`]: [`Window`]s (tumbling, sliding; by count or time) and
//!   [`WindowTask`], aggregations over them, on keyed state and ticks.
//! - [`standalone`]: runs a whole topology in one process.
//! - [`testing`]: [`TestRun`](testing::TestRun), to unit-test a topology.
//! - [`rt`]: [`rt::run`], the `main` of a topology package.
//! - [`metrics`]: the names of every metric the runtime records.
//!
//! # Routing
//!
//! Every output of a task goes to every child of the task. A task with
//! several parents runs once all its parent edges are complete for that
//! source message, on the union of their outputs, one message at a time;
//! a [join](JoinTask) gets the whole union in one call. A task that emits
//! nothing completes the descendants that have no other live parent. When
//! every task is complete the source message is acked.

mod actors;
mod async_worker;
pub mod codec;
pub mod config;
mod envelope;
mod error;
pub mod grouping;
mod inflight;
pub mod join;
pub mod metrics;
mod msg;
pub mod pipeline;
mod policy;
mod remote;
pub mod rt;
mod server;
pub mod standalone;
pub mod state;
pub mod task;
pub mod testing;
pub mod topology;
pub mod typed;
pub mod window;
pub mod wire;
mod worker;

pub use actors::pipeline::{MsgReport, Stats, Unfinished, WorkerStats};
pub use actors::StopReason;
pub use codec::{Codec, CodecError};
pub use error::Error;
pub use grouping::Grouping;
pub use inflight::{InflightEntry, Outcome, TrackerConfig};
pub use join::{JoinTask, Joined, Part};
pub use msg::Verdict;
pub use msg::{Emitted, MsgCtx, TaskIdx, TaskMsg, Ticket};
pub use pipeline::{Dag, Pipeline, PipelineError, PipelineErrors};
pub use state::{Changes, KeyedState, Loaded, StateBackend, StateError, UpdateId};
pub use task::{
    AsyncTask, Msg, Out, Output, Task, TaskContext, TaskError, TaskResult, DEFAULT_CONCURRENCY,
};
pub use topology::{FailurePolicy, Topology, TopologyBuilder, TopologyOptions};
pub use typed::{Typed, TypedOut, TypedResult, TypedTask};
pub use window::{Clock, Span, Window, WindowTask};

pub use tempest_source as source;
