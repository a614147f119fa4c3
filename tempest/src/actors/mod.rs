//! The actors of a topology process and the messages between them.
//!
//! ```text
//! SourceActor ──SourceBatch──► PipelineActor ◄──Fetch / Results── task workers
//!  (own thread)  ◄──Settle────  (inflight table,  ──Vec<TaskMsg>──►
//!        ▲                       ready queues,
//!        │                       sweeper)
//!        └──── StopPolling / ShutdownSource ── TopologyActor ── Drain / Finish ──┘
//! ```
//!
//! Every hop carries a batch. The source only polls while it has credit:
//! `max_pending` minus the messages in flight, returned with each `Settle`.

mod held;
pub(crate) mod pipeline;
mod ready;
mod routing;
pub(crate) mod source;
pub(crate) mod topology;

use std::fmt;
use std::sync::Arc;

use actix::Message;
use tempest_source::{FailedMsg, MsgId, SourceMsg};

use crate::msg::{Emitted, TaskMsg};
pub(crate) use crate::msg::{Results, Verdict, WorkerId};
use crate::worker::SharedBatch;

/// A batch of freshly polled source messages.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct SourceBatch {
    pub msgs: Vec<SourceMsg>,
    /// Every ack of the settles up to this one ([`Settle::seq`]) had been
    /// handed to the source when this batch was polled: a redelivery in
    /// it of an id acked by a later settle was polled before that ack
    /// reached the source, and is settled by it.
    pub acked_through: u64,
}

/// What the pipeline tells the source after a batch: what to ack, what it
/// gave up on, and how much credit returns.
///
/// Credit counts deliveries, not ids: a source message the pipeline
/// completed returns its credit when its ack has been *sent* to the source
/// (each id in `acks` returns one, and `ack_extra` more for deliveries of
/// those ids that arrived while they were in flight and are settled by the
/// same ack); a message given up on returns its credit at once
/// (`released`), as the source has it back.
#[derive(Debug, Default, Message)]
#[rtype(result = "()")]
pub(crate) struct Settle {
    pub acks: Vec<MsgId>,
    /// Deliveries settled by `acks` beyond one per id.
    pub ack_extra: usize,
    pub failed: Vec<FailedMsg>,
    /// Credit that returns now: messages given up on (and their duplicate
    /// deliveries), and acks the source will never be sent.
    pub released: usize,
    /// Source batches the pipeline has taken in since the last settle.
    pub batches_taken: usize,
    /// The pipeline's number for this settle, counting from 1.
    pub seq: u64,
}

impl Settle {
    pub fn is_empty(&self) -> bool {
        self.acks.is_empty()
            && self.ack_extra == 0
            && self.failed.is_empty()
            && self.released == 0
            && self.batches_taken == 0
    }
}

/// A worker asks for up to `max` task messages; `max == 0` withdraws its
/// outstanding fetches (it is draining).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Fetch {
    pub worker: WorkerId,
    pub max: usize,
}

/// A worker's task ticked and emitted these outputs: each is a new root.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Ticks {
    pub worker: WorkerId,
    pub outputs: Vec<Emitted>,
}

/// Where the pipeline delivers a worker's batches.
pub(crate) trait DeliverySink: Send {
    /// Hands over a batch, or gives it back. An in-process worker's batch
    /// comes back as a handle through which the pipeline can take back
    /// what the worker has not claimed yet.
    fn deliver(&mut self, batch: Vec<TaskMsg>) -> Result<Option<Arc<SharedBatch>>, Undelivered>;

    /// Hands over a batch the pipeline keeps too (a worker that can be
    /// lost: what it holds goes back to the queue if it is), or gives it
    /// back. The sink only reads it.
    fn deliver_shared(&mut self, batch: Arc<Vec<TaskMsg>>) -> Result<(), Undelivered> {
        self.deliver(unshared(batch)).map(|_| ())
    }

    /// The topology is stopping: tell the worker (a remote one is told to
    /// disconnect; an in-process one stops when its queue is dropped).
    fn close(&mut self) {}

    /// The most payload bytes (plus per-message overhead) one batch may
    /// carry: the frame limit for a remote worker, none in process.
    fn max_batch_bytes(&self) -> Option<usize> {
        None
    }

    /// Asks a remote worker to give back the messages it holds and has not
    /// started; it answers with results whose `returned` names them. (An
    /// in-process worker's are taken back through its batches' handles.)
    fn give_back(&mut self);
}

/// The messages of a shared batch as a vector of their own: moved out if
/// nobody else holds the batch, else cloned.
pub(crate) fn unshared(batch: Arc<Vec<TaskMsg>>) -> Vec<TaskMsg> {
    Arc::unwrap_or_clone(batch)
}

/// A batch a worker could not take.
#[derive(Debug)]
pub(crate) enum Undelivered {
    /// The worker has not taken its earlier batches yet.
    Busy(Vec<TaskMsg>),
    /// The worker is gone for good.
    Gone(Vec<TaskMsg>),
}

/// Why a topology stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopReason {
    /// The source is exhausted and everything in flight finished.
    SourceExhausted,
    /// The test harness's condition became true.
    Condition,
    /// The run's deadline passed.
    Deadline,
    /// SIGINT or SIGTERM (or a shutdown handle).
    Shutdown,
    /// The source failed and cannot go on.
    SourceFailed(String),
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::SourceExhausted => f.write_str("the source is exhausted"),
            StopReason::Condition => f.write_str("the stop condition was met"),
            StopReason::Deadline => f.write_str("the deadline passed"),
            StopReason::Shutdown => f.write_str("shutdown was requested"),
            StopReason::SourceFailed(e) => write!(f, "the source failed: {e}"),
        }
    }
}

/// Asks the topology to stop.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Stop(pub StopReason);
