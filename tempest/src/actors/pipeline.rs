//! The pipeline actor: routes every source message through the DAG.
//!
//! It owns the inflight table, one ready queue per task, and the fetch
//! requests of the workers waiting for work (a worker's request is answered
//! as soon as its task has messages: a long poll, no busy waiting). Every
//! handler ends in [`PipelineActor::settle`], which sends the source what
//! to ack in one message and hands ready messages to waiting workers.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use rustc_hash::FxHashMap;
use tempest_source::metrics::Histogram;
use tempest_source::{FailReason, FailedMsg, Metrics, MsgId};
use tokio::sync::oneshot;

use super::held::Held;
use super::ready::ReadyQueue;
use super::routing::Routes;
use crate::grouping::Grouping;

/// A queue messages are taken from: a task's shared one, or a worker's own.
#[derive(Clone, Copy, Debug)]
enum Queue {
    Shared(usize),
    Own(WorkerId),
}
use super::{
    DeliverySink, Fetch, Results, Settle, SourceBatch, Stop, StopReason, Ticks, Undelivered,
    Verdict, WorkerId,
};
use crate::inflight::{Dispatch, Finished, InflightEntry, Outcome, Tracker};
use crate::metrics::names;
use crate::msg::{Emitted, TaskMsg, Ticket};
use crate::pipeline::TaskIdx;
use crate::worker::SharedBatch;

/// Counters of one topology run, as the pipeline sees them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Source messages received from the source.
    pub read: u64,
    /// Source messages acked (completed, or given up under `BestEffort`).
    pub acked: u64,
    /// Source messages given up on after a task failure.
    pub failed: u64,
    /// Source messages given up on after a timeout.
    pub timed_out: u64,
    /// Retries started.
    pub retried: u64,
    /// Task messages that returned an error.
    pub task_errors: u64,
    /// Task messages whose task panicked.
    pub task_panics: u64,
    /// Task messages a task's `filter` skipped.
    pub filtered: u64,
    /// Results that arrived for a message already retried, failed or timed out.
    pub stale_results: u64,
    /// Deliveries of an id already in flight, from a source whose ids name
    /// one entry: not run again, settled with the delivery in flight.
    pub duplicates: u64,
    /// Source messages acked although an attempt failed or timed out
    /// (`BestEffort`): their work is lost.
    pub acked_after_failure: u64,
    /// Task messages a busy worker gave back unstarted, for an idle worker
    /// of its task to take.
    pub returned: u64,
    /// Outputs of ticks taken in, each a new root (not a source message:
    /// not in `read` or `acked`).
    pub tick_outputs: u64,
    /// Tick outputs given up on (failed or timed out under the policy).
    pub tick_outputs_failed: u64,
    /// Source messages in flight now.
    pub inflight: usize,
    /// The most source messages ever in flight at once.
    pub max_inflight: usize,
    /// Connected workers per task (in-process threads or remote sessions).
    /// In a run's final counters: the workers connected when it stopped.
    pub workers: Vec<(String, usize)>,
    /// Every worker that joined during the run, connected or gone, with
    /// the task messages it handled.
    pub per_worker: Vec<WorkerStats>,
}

impl Stats {
    /// Source messages whose work was given up on: failed, timed out, or
    /// acked after a failure under `BestEffort`. A run that gives any up
    /// exits with code 3 (see `rt`).
    pub fn given_up(&self) -> u64 {
        self.failed + self.timed_out + self.acked_after_failure
    }
}

/// One worker of a task, as the counters see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerStats {
    /// The task it serves.
    pub task: String,
    /// Its id in the pipeline (in the order workers joined).
    pub worker: WorkerId,
    /// Task messages it handled (results returned, errors included).
    pub handled: u64,
    /// Whether it is still connected.
    pub connected: bool,
}

/// What happened to one source message (recorded by the test harness).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MsgReport {
    /// The final outcome.
    pub outcome: Outcome,
    /// How many attempts it took.
    pub attempts: u32,
    /// Task errors and panics seen across its attempts.
    pub errors: u32,
    /// Timeouts across its attempts.
    pub timeouts: u32,
    /// Why the last attempt failed, if it did.
    pub reason: Option<FailReason>,
    /// From entering the inflight table to leaving it.
    pub latency: Duration,
    /// This delivery arrived while the same id was in flight, or after it
    /// completed but before its ack reached the source (from a source
    /// whose ids name one entry): it did not run, and was settled with the
    /// delivery that did.
    pub duplicate: bool,
}

/// A condition on the counters that ends a run (checked after every batch).
pub type StopCondition = Box<dyn FnMut(&Stats) -> bool + Send>;

/// How often the failure, no-worker and progress checks run.
const REPORT_CHECK_EVERY: Duration = Duration::from_secs(1);
/// The shortest interval between two failure summaries.
const FAILURE_WARN_EVERY: Duration = Duration::from_secs(10);
/// Messages waiting this long for a task with no worker are logged (and
/// again every `NO_WORKER_WARN_EVERY` while it lasts).
const NO_WORKER_WARN_AFTER: Duration = Duration::from_secs(5);
const NO_WORKER_WARN_EVERY: Duration = Duration::from_secs(30);
/// The interval of the progress line.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// A worker busy with a batch this long while another worker of its task
/// is idle with nothing to do is asked to give back what it has not
/// started.
const GIVE_BACK_AFTER: Duration = Duration::from_millis(20);
/// How often that is checked.
const GIVE_BACK_CHECK_EVERY: Duration = Duration::from_millis(5);
/// The index of ids in flight (sources with unique ids) is dropped after
/// this long without a redelivery, and rebuilt at the next one.
const DEDUP_INDEX_IDLE: Duration = Duration::from_secs(60);
/// A queue worth at least this much work at the task's pace is shared
/// among idle workers; a smaller one goes to one worker whole.
const SHARE_ABOVE: Duration = Duration::from_millis(1);

/// Failures of one task since the last summary.
#[derive(Debug, Default)]
struct FailWindow {
    errors: u64,
    timeouts: u64,
    first: Option<(String, Option<MsgId>)>,
}

impl FailWindow {
    fn note(&mut self, reason: impl FnOnce() -> String, id: Option<&MsgId>) {
        if self.first.is_none() {
            self.first = Some((reason(), id.cloned()));
        }
    }
}

/// The operator-facing reports: failure summaries, tasks without workers,
/// progress lines. Each is rate-limited.
#[derive(Debug)]
struct Reports {
    failures: Vec<FailWindow>,
    window_start: Instant,
    last_failure_warn: Option<Instant>,
    no_worker_since: Vec<Option<Instant>>,
    no_worker_warned: Vec<Option<Instant>>,
    next_check: Instant,
    next_progress: Instant,
    progress_at: (Instant, u64),
    /// Read, acked and failed at the last progress line.
    last_progress: Option<(u64, u64, u64)>,
}

impl Reports {
    fn new(tasks: usize, now: Instant) -> Self {
        Reports {
            failures: (0..tasks).map(|_| FailWindow::default()).collect(),
            window_start: now,
            last_failure_warn: None,
            no_worker_since: vec![None; tasks],
            no_worker_warned: vec![None; tasks],
            next_check: now + REPORT_CHECK_EVERY,
            next_progress: now + PROGRESS_EVERY,
            progress_at: (now, 0),
            last_progress: None,
        }
    }
}
/// Where the in-flight table's task messages go: the ready queues, whose
/// new chunks come from the pool of spent batch buffers.
struct Ready<'a> {
    queues: &'a mut [ReadyQueue],
    routes: &'a mut Routes,
    pool: &'a mut Vec<Vec<TaskMsg>>,
    /// The table's early ends when this was made: a chunk started now
    /// notes them (a count that is low by the time only costs a check).
    ended_early: u64,
}

impl Dispatch for Ready<'_> {
    #[inline]
    fn dispatch(&mut self, task: TaskIdx, grouping: Grouping, msg: TaskMsg) {
        if grouping.is_pinned() {
            self.routes
                .route(task, grouping, msg, self.pool, self.ended_early);
        } else {
            self.queues[task as usize].push_back(msg, self.pool, self.ended_early);
        }
    }

    fn copies(&self, task: TaskIdx) -> u32 {
        self.routes.copies(task)
    }
}

struct Worker {
    task: TaskIdx,
    sink: Option<Box<dyn DeliverySink>>,
    /// Batches delivered whose last results have not come back.
    in_hand: u32,
    /// Task messages delivered and not answered or taken back: the work
    /// it has ahead of it, by which a burst is shared out.
    backlog: usize,
    /// For workers that can be lost (remote sessions): the messages they
    /// hold and have not answered.
    held: Option<Held>,
    /// Task messages it returned results for.
    handled: u64,
    /// For in-process workers: the batches delivered and not complete,
    /// oldest first, through which unclaimed messages can be taken back
    /// (unless pinned to this worker: `true`).
    shared: VecDeque<(Arc<SharedBatch>, bool)>,
    /// Per batch in hand, oldest first: whether it came from the queue of
    /// messages pinned to this worker.
    pinned_in_hand: VecDeque<bool>,
    /// Since when it has been working on its oldest batch.
    busy_since: Option<Instant>,
    /// Whether it was asked to give back its unstarted messages since it
    /// last had nothing in hand.
    asked_back: bool,
    /// In process: its unclaimed messages when last looked at, and since
    /// when that count has not changed.
    progress: Option<(usize, Instant)>,
    /// Task messages answered in its current batch so far.
    batch_items: u64,
    /// Batches it has finished.
    completed: u64,
    /// A worker of a task with pinned inputs that joined while others had
    /// batches in hand: per such worker, how many batches it must have
    /// finished before this one gets its pinned messages. A key that moved
    /// to it is then handled here only after its old owner is done with
    /// (and, with durable state, has checkpointed) the key's earlier
    /// messages.
    waits_for: Vec<(WorkerId, u64)>,
}

impl Worker {
    fn is_idle(&self) -> bool {
        self.sink.is_some() && self.in_hand == 0
    }
}

/// Everything the pipeline knows at the end of a run.
#[derive(Debug)]
pub(crate) struct Final {
    pub stats: Stats,
    pub reports: Option<HashMap<MsgId, Vec<MsgReport>>>,
    pub unfinished: Vec<Unfinished>,
}

/// A source message still in flight when a shutdown ended: left unacked
/// for the source to redeliver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unfinished {
    /// The source message's id.
    pub id: MsgId,
    /// Its attempt, from 1.
    pub attempt: u32,
    /// Whether it was waiting for a retry (then `tasks` is empty).
    pub waiting_for_retry: bool,
    /// Each task that has a task message of it outstanding, with the
    /// workers that held it (none: it was queued, not taken).
    pub tasks: Vec<(String, Vec<WorkerId>)>,
}

impl std::fmt::Display for Unfinished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "message {} (attempt {})", self.id, self.attempt)?;
        if self.waiting_for_retry {
            return f.write_str(" was waiting for a retry");
        }
        for (i, (task, workers)) in self.tasks.iter().enumerate() {
            f.write_str(if i == 0 { " was " } else { "; " })?;
            match workers.as_slice() {
                [] => write!(f, "queued for task {task}, not taken by any worker")?,
                [w] => write!(f, "held by worker {w} of task {task}")?,
                ws => {
                    let ws: Vec<String> = ws.iter().map(|w| w.to_string()).collect();
                    write!(f, "held by one of workers {} of task {task}", ws.join(", "))?
                }
            }
        }
        Ok(())
    }
}

pub(crate) struct PipelineActor {
    tracker: Tracker,
    task_names: Vec<String>,
    /// Per task: its shuffled messages, for any of its workers.
    ready: Vec<ReadyQueue>,
    /// The workers of each task by slot, and the messages pinned to each.
    routes: Routes,
    /// Per task: nanoseconds per task message, from its workers' finished
    /// batches (`None` until one finishes).
    pace: Vec<Option<u64>>,
    waiting: Vec<VecDeque<(WorkerId, usize)>>,
    workers: Vec<Worker>,
    source: Recipient<Settle>,
    topology: Recipient<Stop>,
    fin: Vec<Finished>,
    pending: Settle,
    stats: Stats,
    reports: Option<HashMap<MsgId, Vec<MsgReport>>>,
    /// Whether the source declares that an id names one entry.
    unique_ids: bool,
    /// For such a source, while it redelivers: the ids in flight, each with
    /// the further deliveries that arrived while it was in flight.
    inflight_ids: Option<FxHashMap<MsgId, u32>>,
    /// While the index above is kept: the ids acked since by a settle the
    /// source may not have acted on yet, with that settle's number, oldest
    /// first. A redelivery of one polled before its ack reached the source
    /// is settled by that ack instead of running again.
    settling: FxHashMap<MsgId, u64>,
    settling_order: VecDeque<(u64, MsgId)>,
    /// Settles sent to the source so far.
    settles_sent: u64,
    /// The last redelivery seen; the index goes after `DEDUP_INDEX_IDLE`
    /// without one.
    last_redelivery: Instant,
    ops: Reports,
    until: Option<StopCondition>,
    drains: Vec<oneshot::Sender<()>>,
    drain_deadline: Option<Instant>,
    /// Set once a drain ends: the source is being shut down, so nothing
    /// more may complete (it could not be acked).
    closed: bool,
    /// What was left in flight when the drain ended.
    unfinished: Vec<Unfinished>,
    pool: Vec<Vec<TaskMsg>>,
    metrics: Metrics,
    /// End-to-end latency of acked source messages, recorded locally.
    latency: Histogram,
    flushed: Stats,
    sweep_every: Duration,
    metrics_every: Duration,
    next_sweep: Instant,
    next_metrics: Instant,
    next_give_back_check: Instant,
}

pub(crate) struct PipelineSetup {
    pub tracker: Tracker,
    pub source: Recipient<Settle>,
    pub topology: Recipient<Stop>,
    pub metrics: Metrics,
    pub record_outcomes: bool,
    pub until: Option<StopCondition>,
    pub sweep_every: Duration,
    pub metrics_every: Duration,
    pub root_queue_capacity: usize,
    /// The source declares that an id names exactly one entry.
    pub unique_ids: bool,
}

impl PipelineActor {
    pub fn new(setup: PipelineSetup) -> Self {
        let n = setup.tracker.dag().len();
        let root = setup.tracker.dag().root() as usize;
        let task_names = setup.tracker.dag().names().to_vec();
        let routes = Routes::new(setup.tracker.shared_dag());
        PipelineActor {
            tracker: setup.tracker,
            task_names,
            routes,
            // Every new message queues for the root first: reserve its
            // queue up front (reserved, untouched memory is not resident).
            ready: (0..n)
                .map(|t| {
                    if t == root {
                        ReadyQueue::with_capacity(setup.root_queue_capacity)
                    } else {
                        ReadyQueue::default()
                    }
                })
                .collect(),
            pace: vec![None; n],
            waiting: (0..n).map(|_| VecDeque::new()).collect(),
            workers: Vec::new(),
            source: setup.source,
            topology: setup.topology,
            fin: Vec::new(),
            pending: Settle::default(),
            stats: Stats::default(),
            reports: setup.record_outcomes.then(HashMap::new),
            unique_ids: setup.unique_ids,
            inflight_ids: None,
            settling: FxHashMap::default(),
            settling_order: VecDeque::new(),
            settles_sent: 0,
            last_redelivery: Instant::now(),
            ops: Reports::new(n, Instant::now()),
            until: setup.until,
            drains: Vec::new(),
            drain_deadline: None,
            closed: false,
            unfinished: Vec::new(),
            pool: Vec::new(),
            latency: setup.metrics.histogram(names::MSGS_LATENCY_US),
            metrics: setup.metrics,
            flushed: Stats::default(),
            sweep_every: setup.sweep_every,
            metrics_every: setup.metrics_every,
            next_sweep: Instant::now(),
            next_metrics: Instant::now() + setup.metrics_every,
            next_give_back_check: Instant::now(),
        }
    }

    /// Adds a worker for `task`; returns its id. A worker that can be lost
    /// (`may_be_lost`) has what it holds tracked, so that losing it hands
    /// its messages to the failure policy at once.
    pub fn add_worker(
        &mut self,
        task: TaskIdx,
        sink: Box<dyn DeliverySink>,
        may_be_lost: bool,
    ) -> WorkerId {
        self.workers.push(Worker {
            task,
            sink: Some(sink),
            in_hand: 0,
            backlog: 0,
            held: may_be_lost.then(Held::default),
            handled: 0,
            shared: VecDeque::new(),
            pinned_in_hand: VecDeque::new(),
            busy_since: None,
            asked_back: false,
            progress: None,
            batch_items: 0,
            completed: 0,
            waits_for: Vec::new(),
        });
        let id = (self.workers.len() - 1) as WorkerId;
        let (slot, moved) = self.routes.join(task, id, &mut self.pool);
        if self.tracker.dag().has_pinned_input(task) {
            let waits_for: Vec<(WorkerId, u64)> = self
                .workers
                .iter()
                .enumerate()
                .filter(|(o, w)| {
                    *o != id as usize && w.task == task && w.sink.is_some() && w.in_hand > 0
                })
                .map(|(o, w)| (o as WorkerId, w.completed + u64::from(w.in_hand)))
                .collect();
            self.workers[id as usize].waits_for = waits_for;
            log::info!(
                "Worker {id} of task {} joined as slot {slot}: it owns about 1/{} of the keys; {} queued message(s) moved to it.",
                self.task_names[task as usize],
                moved.workers,
                moved.msgs
            );
        }
        id
    }

    /// How many live workers each task has.
    pub fn workers_per_task(&self) -> Vec<usize> {
        let mut counts = vec![0; self.ready.len()];
        for w in &self.workers {
            if w.sink.is_some() {
                counts[w.task as usize] += 1;
            }
        }
        counts
    }

    /// A worker is gone: what it held goes back to its task's queue
    /// (`BestEffort`) or fails as `WorkerLost` (other policies), at once.
    fn lose_worker(&mut self, worker: WorkerId, now: Instant) {
        let Some(w) = self.workers.get_mut(worker as usize) else {
            return;
        };
        w.sink = None;
        w.in_hand = 0;
        w.backlog = 0;
        w.busy_since = None;
        w.shared.clear();
        w.pinned_in_hand.clear();
        let t = w.task as usize;
        let held = w.held.take().unwrap_or_default();
        self.waiting[t].retain(|&(id, _)| id != worker);
        let moved = self.routes.leave(t as TaskIdx, worker, &mut self.pool);
        if self.tracker.dag().has_pinned_input(t as TaskIdx) {
            log::info!(
                "Worker {worker} of task {} left: its keys go to the {} other worker(s); {} queued message(s) moved.",
                self.task_names[t],
                moved.workers,
                moved.msgs
            );
        }
        let mut lost = 0usize;
        let mut requeued = self.pool.pop().unwrap_or_default();
        for m in held.into_msgs() {
            if !self.tracker.is_live(m.ticket) {
                continue;
            }
            lost += 1;
            if self.tracker.policy() == crate::FailurePolicy::BestEffort {
                // The worker may have handled it before it was lost.
                let mut m = m;
                m.ctx.meta = std::mem::take(&mut m.ctx.meta).with_seen();
                requeued.push(m);
            } else {
                let reason = FailReason::WorkerLost {
                    task: self.task_names[t].clone(),
                };
                let window = &mut self.ops.failures[t];
                window.errors += 1;
                window.note(|| reason.to_string(), self.tracker.id_of(m.ticket));
                self.fail_ticket(m.ticket, reason, now);
            }
        }
        // First in line, in the order they were delivered.
        self.requeue(t, requeued);
        if lost > 0 {
            log::warn!(
                "Worker {worker} of task {} was lost holding {lost} message(s); they go to the failure policy.",
                self.task_names[t]
            );
        } else {
            log::info!("Worker {worker} of task {} left.", self.task_names[t]);
        }
        self.settle(now);
    }

    fn current_stats(&self) -> Stats {
        Stats {
            workers: self
                .task_names
                .iter()
                .cloned()
                .zip(self.workers_per_task())
                .collect(),
            per_worker: self
                .workers
                .iter()
                .enumerate()
                .map(|(id, w)| WorkerStats {
                    task: self.task_names[w.task as usize].clone(),
                    worker: id as WorkerId,
                    handled: w.handled,
                    connected: w.sink.is_some(),
                })
                .collect(),
            inflight: self.tracker.len(),
            max_inflight: self.tracker.high_water(),
            retried: self.tracker.retried(),
            ..self.stats.clone()
        }
    }

    /// The in-flight table, where it dispatches to, and where it puts
    /// finished messages: borrowed apart, for one call of the table.
    fn table(&mut self) -> (&mut Tracker, Ready<'_>, &mut Vec<Finished>) {
        let ready = Ready {
            queues: &mut self.ready,
            routes: &mut self.routes,
            pool: &mut self.pool,
            ended_early: self.tracker.ended_early(),
        };
        (&mut self.tracker, ready, &mut self.fin)
    }

    /// Hands a failed task message to the inflight table (and so to the
    /// failure policy); false for a stale ticket.
    fn fail_ticket(&mut self, ticket: Ticket, reason: FailReason, now: Instant) -> bool {
        let (tracker, mut ready, fin) = self.table();
        tracker.on_error(ticket, reason, now, &mut ready, fin)
    }

    /// The sweeper and the metrics flush, when due. Called from every
    /// handler (through `settle`) and from a timer, so neither starves
    /// when the mailbox never runs dry.
    fn periodic(&mut self, now: Instant) {
        if now >= self.next_sweep && !self.closed {
            self.next_sweep = now + self.sweep_every;
            let (tracker, mut ready, fin) = self.table();
            tracker.sweep(now, &mut ready, fin);
        }
        if now >= self.next_metrics {
            self.next_metrics = now + self.metrics_every;
            self.flush_metrics();
        }
        if now >= self.next_give_back_check {
            self.next_give_back_check = now + GIVE_BACK_CHECK_EVERY;
            self.ask_for_give_backs(now);
        }
        if now >= self.ops.next_check {
            self.ops.next_check = now + REPORT_CHECK_EVERY;
            // Dropped only when no duplicate waits to be settled by it.
            if self.inflight_ids.as_ref().is_some_and(|ids| {
                now.saturating_duration_since(self.last_redelivery) >= DEDUP_INDEX_IDLE
                    && ids.values().all(|&extra| extra == 0)
            }) {
                self.inflight_ids = None;
                self.settling.clear();
                self.settling_order.clear();
            }
            self.report_failures(now, false);
            self.report_idle_tasks(now);
            if now >= self.ops.next_progress {
                self.ops.next_progress = now + PROGRESS_EVERY;
                self.report_progress(now);
            }
        }
    }

    /// Takes back the unstarted messages of busy workers where another
    /// worker of their task is idle with nothing queued: at once from an
    /// in-process worker's batches, by asking a remote worker (it answers
    /// with `Returned`).
    fn ask_for_give_backs(&mut self, now: Instant) {
        for t in 0..self.ready.len() {
            let idle_waiting = self.waiting[t]
                .iter()
                .any(|&(w, _)| self.workers[w as usize].is_idle());
            if !self.ready[t].is_empty() || !idle_waiting {
                continue;
            }
            let mut taken: Vec<TaskMsg> = Vec::new();
            for (id, w) in self.workers.iter_mut().enumerate() {
                if w.task as usize != t || w.in_hand == 0 || w.sink.is_none() {
                    continue;
                }
                if w.held.is_none() {
                    // In process: stuck means no claim for a while, so a
                    // worker moving through its batch keeps it.
                    let unclaimed: usize = w
                        .shared
                        .iter()
                        .filter(|(_, pinned)| !pinned)
                        .map(|(b, _)| b.unclaimed())
                        .sum();
                    match w.progress {
                        Some((seen, since)) if seen == unclaimed => {
                            if unclaimed > 0
                                && now.saturating_duration_since(since) >= GIVE_BACK_AFTER
                            {
                                let before = taken.len();
                                for (batch, pinned) in &w.shared {
                                    if !pinned {
                                        taken.extend(batch.take_rest());
                                    }
                                }
                                w.backlog = w.backlog.saturating_sub(taken.len() - before);
                                w.progress = None;
                            }
                        }
                        _ => w.progress = Some((unclaimed, now)),
                    }
                    continue;
                }
                // Pinned batches are the worker's own: only ask a worker
                // that holds a shuffled one.
                let stuck = !w.asked_back
                    && w.pinned_in_hand.iter().any(|pinned| !pinned)
                    && w.busy_since.is_some_and(|since| {
                        now.saturating_duration_since(since) >= GIVE_BACK_AFTER
                    });
                if let (true, Some(sink)) = (stuck, w.sink.as_mut()) {
                    w.asked_back = true;
                    log::debug!(
                        "Worker {id} of task {} is busy while another is idle; asking it to give back what it has not started.",
                        self.task_names[t]
                    );
                    sink.give_back();
                }
            }
            if !taken.is_empty() {
                log::debug!(
                    "Took back {} unstarted message(s) of task {} from busy workers for idle ones.",
                    taken.len(),
                    self.task_names[t]
                );
                self.stats.returned += taken.len() as u64;
                self.requeue(t, taken);
                self.pump(t);
            }
        }
    }

    /// Logs a WARN summary of the failures and timeouts per task since the
    /// last one: at once for the first after a quiet spell, then at most
    /// every `FAILURE_WARN_EVERY` (`force`: now, at the end of a run).
    fn report_failures(&mut self, now: Instant, force: bool) {
        for (t, (count, first)) in self.tracker.take_timeouts().into_iter().enumerate() {
            let window = &mut self.ops.failures[t];
            window.timeouts += count;
            if let Some(id) = first {
                window.note(|| "timed out".to_string(), Some(&id));
            }
        }
        if !self
            .ops
            .failures
            .iter()
            .any(|w| w.errors > 0 || w.timeouts > 0)
        {
            self.ops.window_start = now;
            return;
        }
        let due = force
            || self
                .ops
                .last_failure_warn
                .is_none_or(|last| now.saturating_duration_since(last) >= FAILURE_WARN_EVERY);
        if !due {
            return;
        }
        let secs = now
            .saturating_duration_since(self.ops.window_start)
            .as_secs_f64()
            .max(1.0);
        for (t, w) in self.ops.failures.iter_mut().enumerate() {
            if w.errors == 0 && w.timeouts == 0 {
                continue;
            }
            let (reason, id) = w.first.take().unwrap_or_default();
            let id = id.map_or_else(String::new, |id| format!(" (message {id})"));
            let what = match (w.errors, w.timeouts) {
                (e, 0) => format!("{e} message(s) failed"),
                (0, t) => format!("{t} message(s) timed out"),
                (e, t) => format!("{e} message(s) failed and {t} timed out"),
            };
            log::warn!(
                "Task {}: {what} in the last {secs:.0} s; the first: {reason}{id}. The failure policy is {:?}.",
                self.task_names[t],
                self.tracker.policy()
            );
            *w = FailWindow::default();
        }
        self.ops.last_failure_warn = Some(now);
        self.ops.window_start = now;
    }

    /// Logs tasks that have messages waiting and no worker connected.
    fn report_idle_tasks(&mut self, now: Instant) {
        let workers = self.workers_per_task();
        for (t, &count) in workers.iter().enumerate() {
            let waiting = self.ready[t].len() + self.routes.queued(t as TaskIdx);
            if count > 0 {
                self.worker_is_back(t);
                continue;
            }
            if waiting == 0 {
                self.ops.no_worker_since[t] = None;
                self.ops.no_worker_warned[t] = None;
                continue;
            }
            let since = *self.ops.no_worker_since[t].get_or_insert(now);
            let due = match self.ops.no_worker_warned[t] {
                None => now.saturating_duration_since(since) >= NO_WORKER_WARN_AFTER,
                Some(last) => now.saturating_duration_since(last) >= NO_WORKER_WARN_EVERY,
            };
            if due {
                self.ops.no_worker_warned[t] = Some(now);
                log::warn!(
                    "Task {} has {waiting} message(s) waiting and no worker connected, for {:.0} s now; start one with `<package> task {}`.",
                    self.task_names[t],
                    now.saturating_duration_since(since).as_secs_f64(),
                    self.task_names[t]
                );
            }
        }
    }

    /// Task `t` has a worker: ends its no-worker warnings, saying so if
    /// one was logged.
    fn worker_is_back(&mut self, t: usize) {
        self.ops.no_worker_since[t] = None;
        if self.ops.no_worker_warned[t].take().is_some() {
            log::info!(
                "Task {} has a worker again; its waiting messages are moving.",
                self.task_names[t]
            );
        }
    }

    /// Logs a progress line at INFO when anything moved since the last.
    fn report_progress(&mut self, now: Instant) {
        let s = &self.stats;
        let inflight = self.tracker.len();
        let now_counts = (s.read, s.acked, s.failed);
        let moved = self.ops.last_progress != Some(now_counts);
        if !moved && inflight == 0 {
            return;
        }
        let (then, acked_then) = self.ops.progress_at;
        let rate = (s.acked - acked_then) as f64
            / now.saturating_duration_since(then).as_secs_f64().max(1e-3);
        log::info!(
            "Progress: {} read, {} acked, {} failed, {} timed out, {inflight} in flight; {rate:.0} acked/s over the last {:.0} s.",
            s.read,
            s.acked,
            s.failed,
            s.timed_out,
            now.saturating_duration_since(then).as_secs_f64()
        );
        self.ops.progress_at = (now, s.acked);
        self.ops.last_progress = Some(now_counts);
    }

    /// A redelivery of `id` polled after it completed but before its ack
    /// reached the source: that ack settles it (its credit returns now),
    /// so it does not run again.
    fn settled_by_ack_on_its_way(&mut self, id: &MsgId) {
        self.stats.duplicates += 1;
        if self.stats.duplicates == 1 {
            log::warn!(
                "Message {id} was delivered again after it completed, before its ack reached the source; it is not run twice (the source's redelivery timeout may be shorter than processing). Further duplicates are counted in {}.",
                names::MSGS_DUPLICATES
            );
        }
        if let Some(reports) = &mut self.reports {
            reports.entry(id.clone()).or_default().push(MsgReport {
                outcome: Outcome::Acked,
                attempts: 0,
                errors: 0,
                timeouts: 0,
                reason: None,
                latency: Duration::ZERO,
                duplicate: true,
            });
        }
        self.pending.released += 1;
    }

    /// Accounts for finished messages, tells the source, feeds waiting
    /// workers, and checks the stop condition and any drain.
    fn settle(&mut self, now: Instant) {
        self.periodic(now);
        for f in self.fin.drain(..) {
            if f.tick {
                // A tick's output: nothing to ack, no source credit.
                if f.outcome != Outcome::Acked {
                    self.stats.tick_outputs_failed += 1;
                    log::warn!(
                        "Tick output {} was given up on ({}).",
                        f.id,
                        f.reason
                            .as_ref()
                            .map_or_else(|| "timed out".to_string(), ToString::to_string)
                    );
                }
                if let Some(reports) = &mut self.reports {
                    reports.entry(f.id.clone()).or_default().push(MsgReport {
                        outcome: f.outcome,
                        attempts: f.attempts,
                        errors: f.errors,
                        timeouts: f.timeouts,
                        reason: f.reason,
                        latency: f.latency,
                        duplicate: false,
                    });
                }
                continue;
            }
            match f.outcome {
                Outcome::Acked => self.stats.acked += 1,
                Outcome::Failed => self.stats.failed += 1,
                Outcome::TimedOut => self.stats.timed_out += 1,
            }
            if f.outcome == Outcome::Acked
                && (f.errors > 0 || f.timeouts > 0)
                && self.tracker.policy() == crate::FailurePolicy::BestEffort
            {
                self.stats.acked_after_failure += 1;
            }
            // Deliveries of the same id that arrived while it was in flight
            // settle with it: one ack (or one failure) covers them all.
            let extra = self
                .inflight_ids
                .as_mut()
                .and_then(|ids| ids.remove(&f.id))
                .unwrap_or(0);
            if let Some(reports) = &mut self.reports {
                let report = MsgReport {
                    outcome: f.outcome,
                    attempts: f.attempts,
                    errors: f.errors,
                    timeouts: f.timeouts,
                    reason: f.reason.clone(),
                    latency: f.latency,
                    duplicate: false,
                };
                let all = reports.entry(f.id.clone()).or_default();
                for _ in 0..extra {
                    all.push(MsgReport {
                        attempts: 0,
                        duplicate: true,
                        ..report.clone()
                    });
                }
                all.push(report);
            }
            if f.outcome == Outcome::Acked {
                self.latency.record_duration(f.latency);
                if self.inflight_ids.is_some() {
                    // Until the source has this ack, a redelivery may still
                    // be polled; it goes with the next settle.
                    let seq = self.settles_sent + 1;
                    self.settling.insert(f.id.clone(), seq);
                    self.settling_order.push_back((seq, f.id.clone()));
                }
                self.pending.acks.push(f.id);
                self.pending.ack_extra += extra as usize;
            } else {
                self.pending.failed.push(FailedMsg {
                    id: f.id,
                    reason: f.reason.unwrap_or(FailReason::Timeout),
                    attempts: f.attempts,
                });
                self.pending.released += 1 + extra as usize;
            }
        }
        for t in 0..self.ready.len() {
            if !self.waiting[t].is_empty()
                && (!self.ready[t].is_empty()
                    || self.waiting[t]
                        .iter()
                        .any(|&(w, _)| self.routes.own_len(w) > 0))
            {
                self.pump(t);
            }
        }
        if !self.pending.is_empty() {
            self.settles_sent += 1;
            // The next one starts with room for as many acks as this one.
            let next = Settle {
                acks: Vec::with_capacity(self.pending.acks.len()),
                ..Settle::default()
            };
            let mut settle = std::mem::replace(&mut self.pending, next);
            settle.seq = self.settles_sent;
            self.source.do_send(settle);
        }
        if let Some(until) = &mut self.until {
            let stats = Stats {
                inflight: self.tracker.len(),
                max_inflight: self.tracker.high_water(),
                retried: self.tracker.retried(),
                ..self.stats.clone()
            };
            if until(&stats) {
                self.until = None;
                self.topology.do_send(Stop(StopReason::Condition));
            }
        }
        if !self.drains.is_empty()
            && (self.tracker.len() == 0
                || self.drain_deadline.is_some_and(|d| now >= d)
                || (self.drain_deadline.is_some() && self.nothing_can_finish(now)))
        {
            if self.tracker.len() > 0 {
                if self.drain_deadline.is_some_and(|d| now >= d) {
                    log::warn!(
                        "Graceful shutdown time is up with {} message(s) in flight; they are left unacked for the source to redeliver.",
                        self.tracker.len()
                    );
                } else {
                    log::warn!(
                        "Stopping without waiting: none of the {} message(s) in flight can finish (they wait for tasks no worker is connected for); they are left unacked for the source to redeliver.",
                        self.tracker.len()
                    );
                }
                self.unfinished = self.list_unfinished(now);
                const SHOWN: usize = 20;
                for u in self.unfinished.iter().take(SHOWN) {
                    log::warn!("Left unacked: {u}.");
                }
                if self.unfinished.len() > SHOWN {
                    log::warn!(
                        "Left unacked: {} more message(s) not listed.",
                        self.unfinished.len() - SHOWN
                    );
                }
            }
            self.closed = true;
            for tx in self.drains.drain(..) {
                let _ = tx.send(());
            }
        }
    }

    /// Whether nothing in flight can still finish, so a shutdown need not
    /// wait: no worker holds a batch, and every message waits only for
    /// tasks that no worker is connected for (a retry waits for the root).
    fn nothing_can_finish(&self, now: Instant) -> bool {
        if self
            .workers
            .iter()
            .any(|w| w.sink.is_some() && w.in_hand > 0)
        {
            return false;
        }
        let workers = self.workers_per_task();
        if (0..self.ready.len()).any(|t| {
            workers[t] > 0 && (!self.ready[t].is_empty() || self.routes.queued(t as TaskIdx) > 0)
        }) {
            return false;
        }
        let root = self.tracker.dag().root() as usize;
        self.tracker.entries(now).iter().all(|e| {
            if e.waiting_for_retry {
                workers[root] == 0
            } else {
                e.pending
                    .iter()
                    .all(|&(t, outstanding)| outstanding == 0 || workers[t as usize] == 0)
            }
        })
    }

    /// The messages in flight, each with the tasks it waits for and the
    /// workers that hold it. A remote worker's batches are known exactly;
    /// an in-process worker's are not, so a message not queued for a task
    /// is put down to that task's busy in-process workers.
    fn list_unfinished(&self, now: Instant) -> Vec<Unfinished> {
        let mut held: HashMap<(MsgId, TaskIdx), Vec<WorkerId>> = HashMap::new();
        let mut busy: Vec<Vec<WorkerId>> = vec![Vec::new(); self.ready.len()];
        for (id, w) in self.workers.iter().enumerate() {
            match &w.held {
                Some(msgs) => {
                    for m in msgs.iter() {
                        if let Some(msg) = self.tracker.id_of(m.ticket) {
                            let workers = held.entry((msg.clone(), m.ticket.task)).or_default();
                            if !workers.contains(&(id as WorkerId)) {
                                workers.push(id as WorkerId);
                            }
                        }
                    }
                }
                None if w.in_hand > 0 => busy[w.task as usize].push(id as WorkerId),
                None => {}
            }
        }
        let mut queued = std::collections::HashSet::new();
        for q in &self.ready {
            for m in q.iter() {
                if let Some(msg) = self.tracker.id_of(m.ticket) {
                    queued.insert((msg.clone(), m.ticket.task));
                }
            }
        }
        self.tracker
            .entries(now)
            .into_iter()
            .map(|e| {
                let tasks = e
                    .pending
                    .iter()
                    .filter(|&&(_, outstanding)| outstanding > 0)
                    .map(|&(t, _)| {
                        let key = (e.id.clone(), t);
                        let mut workers = held.remove(&key).unwrap_or_default();
                        if workers.is_empty() && !queued.contains(&key) {
                            workers = busy[t as usize].clone();
                        }
                        (self.task_names[t as usize].clone(), workers)
                    })
                    .collect();
                Unfinished {
                    id: e.id,
                    attempt: e.attempt,
                    waiting_for_retry: e.waiting_for_retry,
                    tasks,
                }
            })
            .collect()
    }

    /// Hands ready messages of task `t` to its waiting workers: first what
    /// is pinned to each, then the shared queue.
    fn pump(&mut self, t: usize) {
        self.pump_pinned(t);
        while !self.ready[t].is_empty() {
            // Idle workers first.
            let idle = self.waiting[t]
                .iter()
                .position(|&(w, _)| self.workers[w as usize].in_hand == 0);
            // Where the queue is worth more than `SHARE_ABOVE` of work (or
            // the task's pace is not known yet), a busy worker (perhaps
            // stuck on a slow message) gets more only while no worker of
            // the task is idle (an idle one whose fetch is on its way gets
            // them when it arrives), and a worker takes no more than its
            // share of the queue while others are idle, so a burst spreads.
            // A fast task's batches take under that: they go whole.
            let (first_max, queued) = (
                self.waiting[t].front().map_or(0, |&(_, m)| m),
                self.ready[t].len(),
            );
            let worth_sharing = self.pace[t].is_none_or(|ns| {
                ns.saturating_mul(queued.min(first_max) as u64) >= SHARE_ABOVE.as_nanos() as u64
            });
            let idle_workers = if worth_sharing {
                self.workers
                    .iter()
                    .filter(|w| w.task as usize == t && w.is_idle())
                    .count()
            } else {
                0
            };
            if idle.is_none() && idle_workers > 0 {
                break;
            }
            let Some((worker, max)) = self.waiting[t].remove(idle.unwrap_or(0)) else {
                break;
            };
            let idle_peers =
                idle_workers.saturating_sub(usize::from(self.workers[worker as usize].is_idle()));
            let max = if idle_peers > 0 {
                max.min(queued.div_ceil(idle_peers + 1))
            } else {
                max
            };
            let max = if worth_sharing {
                max.min(self.fair_share(t, worker, queued))
            } else {
                max
            };
            // Remote workers take at most a frame's worth of bytes.
            let budget = self.workers[worker as usize]
                .sink
                .as_ref()
                .and_then(|s| s.max_batch_bytes());
            let batch = self.take_queued(Queue::Shared(t), t, max, budget);
            if batch.is_empty() {
                self.waiting[t].push_front((worker, max));
                self.pool.push(batch);
                break;
            }
            self.hand_over(t, worker, batch, false);
        }
    }

    /// How much of `queued` messages of task `t` `worker` may take so that
    /// every live worker of the task ends up with about as much work ahead
    /// of it, counting what each already holds: a worker that comes back
    /// while its peers are busy takes its share, not the whole burst (at
    /// least one message, so a waiting worker is never left out).
    fn fair_share(&self, t: usize, worker: WorkerId, queued: usize) -> usize {
        let (live, held) = self
            .workers
            .iter()
            .filter(|w| w.task as usize == t && w.sink.is_some())
            .fold((0usize, 0usize), |(n, held), w| (n + 1, held + w.backlog));
        let own = self.workers[worker as usize].backlog;
        (queued + held)
            .div_ceil(live.max(1))
            .saturating_sub(own)
            .max(1)
    }

    /// Hands the waiting workers of task `t` the messages pinned to them.
    fn pump_pinned(&mut self, t: usize) {
        let mut i = 0;
        while i < self.waiting[t].len() {
            let (worker, max) = self.waiting[t][i];
            if self.routes.own_len(worker) == 0 || self.waits_for_others(worker) {
                i += 1;
                continue;
            }
            self.waiting[t].remove(i);
            let budget = self.workers[worker as usize]
                .sink
                .as_ref()
                .and_then(|s| s.max_batch_bytes());
            let batch = self.take_queued(Queue::Own(worker), t, max, budget);
            if batch.is_empty() {
                self.pool.push(batch);
                self.waiting[t].insert(i, (worker, max));
                i += 1;
                continue;
            }
            self.hand_over(t, worker, batch, true);
        }
    }

    /// Whether `worker` still waits for workers of its task to finish the
    /// batches they had when it joined (dropping those that did, or left).
    fn waits_for_others(&mut self, worker: WorkerId) -> bool {
        let mut waits = std::mem::take(&mut self.workers[worker as usize].waits_for);
        if waits.is_empty() {
            return false;
        }
        waits.retain(|&(o, target)| {
            let o = &self.workers[o as usize];
            o.sink.is_some() && o.completed < target
        });
        let waiting = !waits.is_empty();
        self.workers[worker as usize].waits_for = waits;
        waiting
    }

    /// Delivers `batch` of task `t` to `worker` (`pinned`: from its own
    /// queue, so never taken back for another worker), or puts it back.
    fn hand_over(&mut self, t: usize, worker: WorkerId, mut batch: Vec<TaskMsg>, pinned: bool) {
        let w = &mut self.workers[worker as usize];
        let Some(sink) = &mut w.sink else {
            self.requeue(t, batch);
            return;
        };
        let n = batch.len();
        // A worker that can be lost gets every message stamped with
        // a copy number of its own, and the pipeline keeps the batch
        // (shared with the session that sends it).
        let delivered = match &w.held {
            Some(held) => {
                held.stamp(&mut batch);
                let kept = Arc::new(batch);
                sink.deliver_shared(Arc::clone(&kept))
                    .map(|()| (None, Some(kept)))
            }
            None => sink.deliver(batch).map(|shared| (shared, None)),
        };
        match delivered {
            Ok((shared, kept)) => {
                if w.in_hand == 0 {
                    w.busy_since = Some(Instant::now());
                }
                w.in_hand += 1;
                w.backlog += n;
                w.pinned_in_hand.push_back(pinned);
                // A batch delivered after a give-back may be stuck too.
                w.asked_back = false;
                if let Some(shared) = shared {
                    w.shared.push_back((shared, pinned));
                }
                if let (Some(held), Some(kept)) = (&mut w.held, kept) {
                    held.add(kept);
                }
            }
            Err(Undelivered::Busy(batch)) => self.requeue(t, batch),
            Err(Undelivered::Gone(batch)) => {
                log::warn!(
                    "Worker {worker} of task {} is gone; its batch goes back to the queue.",
                    self.task_names[t]
                );
                w.sink = None;
                self.requeue(t, batch);
            }
        }
    }

    /// A remote worker gave back messages it had not started: they are no
    /// longer its to lose, and first in line for the idle workers.
    fn take_returned(&mut self, worker: WorkerId, returned: &mut Vec<TaskMsg>) {
        let Some(w) = self.workers.get_mut(worker as usize) else {
            return;
        };
        let t = w.task as usize;
        let Some(held) = &mut w.held else {
            return;
        };
        // Only what the worker really held goes back to the queue, as the
        // pipeline's own copy: a peer cannot inject or duplicate.
        let mut taken = Vec::with_capacity(returned.len());
        let mut unknown = 0usize;
        for m in returned.drain(..) {
            match held.take_back(&m) {
                Some(own) => taken.push(own),
                None => unknown += 1,
            }
        }
        if unknown > 0 {
            log::warn!(
                "Worker {worker} of task {} returned {unknown} message(s) it did not hold; ignored.",
                self.task_names[t]
            );
        }
        w.backlog = w.backlog.saturating_sub(taken.len());
        self.stats.returned += taken.len() as u64;
        // `pump` skips any no longer live.
        self.requeue(t, taken);
    }

    /// Takes a batch of up to `max` messages (and `budget` bytes as the
    /// wire counts them, for a remote worker) from the front of task `t`'s
    /// queue; stale ones (their attempt failed since) are dropped, and one
    /// too big for any frame fails. A remote worker's batch comes from the
    /// first chunk only (its byte budget is counted per chunk); a local
    /// worker's may span chunks, so its share of a burst is not cut where a
    /// chunk ends (as a rule a chunk still goes whole: chunks are as long
    /// as the workers' fetches).
    fn take_queued(
        &mut self,
        from: Queue,
        t: usize,
        max: usize,
        budget: Option<usize>,
    ) -> Vec<TaskMsg> {
        loop {
            let take = match budget {
                Some(budget) => match self.fits(from, max, budget) {
                    Some(n) => n,
                    None => {
                        // Too big for any frame: it fails, and the rest is
                        // looked at again.
                        if let Some(m) = self.queue(from).pop_front() {
                            let reason = FailReason::TaskError {
                                task: self.task_names[t].clone(),
                                message: format!(
                                    "a message of {} bytes cannot be sent to a remote worker (max_frame allows {budget})",
                                    m.payload.len()
                                ),
                            };
                            self.fail_ticket(m.ticket, reason, Instant::now());
                        }
                        continue;
                    }
                },
                None => self.queue(from).front_len(max),
            };
            let mut batch = self.take_live(from, take);
            if budget.is_none() {
                // A batch may span chunks: a worker's share of a burst is
                // not cut short where a chunk happens to end.
                while batch.len() < max && !self.queue(from).is_empty() {
                    let n = self.queue(from).front_len(max - batch.len());
                    let mut more = self.take_live(from, n);
                    batch.append(&mut more);
                    self.pool.push(more);
                }
            }
            if !batch.is_empty() || self.queue(from).is_empty() {
                return batch;
            }
            // All stale: the next chunk.
            self.pool.push(batch);
        }
    }

    /// Takes `n` messages off the front chunk of `from`, dropping those
    /// whose source message has ended since they were queued.
    fn take_live(&mut self, from: Queue, n: usize) -> Vec<TaskMsg> {
        let pool = &mut self.pool;
        let queue = match from {
            Queue::Shared(t) => &mut self.ready[t],
            Queue::Own(w) => self.routes.own(w),
        };
        let (mut batch, ended_early) = queue.take_front(n, pool);
        if ended_early != self.tracker.ended_early() {
            let tracker = &self.tracker;
            batch.retain(|m| tracker.is_live(m.ticket));
        }
        batch
    }

    /// The queue `from` names.
    fn queue(&mut self, from: Queue) -> &mut ReadyQueue {
        match from {
            Queue::Shared(t) => &mut self.ready[t],
            Queue::Own(w) => self.routes.own(w),
        }
    }

    /// How many of the first messages of queue `from`'s first chunk fit in
    /// a batch of `max` messages and `budget` bytes; `None` if the first
    /// does not fit in `budget` alone.
    fn fits(&mut self, from: Queue, max: usize, budget: usize) -> Option<usize> {
        let mut bytes = 0usize;
        let mut fits = 0usize;
        let q = self.queue(from);
        for m in q.iter().take(q.front_len(max)) {
            let size = crate::wire::task_msg_len(m);
            if size > budget && fits == 0 {
                return None;
            }
            if bytes + size > budget {
                break;
            }
            bytes += size;
            fits += 1;
        }
        Some(fits)
    }

    /// Puts messages of task `t` back at the front of their queues, in
    /// order: pinned ones to the worker they are for now.
    fn requeue(&mut self, t: usize, mut batch: Vec<TaskMsg>) {
        let mut pinned = Vec::new();
        for m in &mut batch {
            // A queued message is no delivery's: a remote worker's copy
            // number is stamped anew when it is delivered again.
            m.ticket.copy = 0;
        }
        if self.tracker.dag().has_pinned_input(t as TaskIdx) {
            let (p, shared): (Vec<TaskMsg>, Vec<TaskMsg>) = batch
                .into_iter()
                .partition(|m| self.routes.grouping_of(t as TaskIdx, m).is_pinned());
            pinned = p;
            batch = shared;
        }
        if !pinned.is_empty() {
            self.routes.put_back(t as TaskIdx, pinned);
        }
        self.ready[t].push_front_all(batch);
    }

    fn flush_metrics(&mut self) {
        let now = self.current_stats();
        let old = std::mem::replace(&mut self.flushed, now.clone());
        self.latency.flush();
        let m = &self.metrics;
        m.incr(names::SOURCE_READ, now.read - old.read);
        m.incr(names::MSGS_ACKED, now.acked - old.acked);
        m.incr(names::MSGS_FAILED, now.failed - old.failed);
        m.incr(names::MSGS_TIMED_OUT, now.timed_out - old.timed_out);
        m.incr(names::MSGS_RETRIED, now.retried - old.retried);
        m.incr(names::STALE_RESULTS, now.stale_results - old.stale_results);
        m.incr(names::MSGS_DUPLICATES, now.duplicates - old.duplicates);
        m.gauge(names::MSGS_INFLIGHT, now.inflight as i64);
        m.gauge(names::MSGS_INFLIGHT_MAX, now.max_inflight as i64);
        let workers = self.workers_per_task();
        for (t, q) in self.ready.iter().enumerate() {
            let task = m.with_label("task", self.task_names[t].clone());
            let depth = q.len() + self.routes.queued(t as TaskIdx);
            task.gauge(names::TASK_QUEUE_DEPTH, depth as i64);
            task.gauge(names::TASK_WORKERS, workers[t] as i64);
        }
    }
}

impl Actor for PipelineActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Timers only fire when the mailbox runs dry; under constant load
        // `settle` runs the same periodic work (see `periodic`).
        ctx.run_interval(self.sweep_every, |act, _ctx| act.settle(Instant::now()));
    }
}

impl Handler<SourceBatch> for PipelineActor {
    type Result = ();

    fn handle(&mut self, batch: SourceBatch, _ctx: &mut Context<Self>) {
        if self.closed {
            // Polled after the drain ended: never started, so never acked.
            return;
        }
        let now = Instant::now();
        self.pending.batches_taken += 1;
        self.stats.read += batch.msgs.len() as u64;
        // Acks the source had acted on when it polled this batch cannot be
        // redelivered by it any more.
        while let Some((seq, _)) = self.settling_order.front() {
            if *seq > batch.acked_through {
                break;
            }
            if let Some((seq, id)) = self.settling_order.pop_front() {
                if self.settling.get(&id) == Some(&seq) {
                    self.settling.remove(&id);
                }
            }
        }
        let mut msgs = batch.msgs;
        for msg in &mut msgs {
            if msg.delivered > 1 && self.unique_ids {
                // A redelivery may be of an id in flight: from the first one
                // on (until they stop for a while) the ids in flight are
                // indexed, so first deliveries cost nothing.
                self.last_redelivery = now;
                if self.inflight_ids.is_none() {
                    self.inflight_ids =
                        Some(self.tracker.live_ids().map(|id| (id.clone(), 0)).collect());
                }
            }
            if self.inflight_ids.is_some() && self.settling.contains_key(&msg.id) {
                self.settled_by_ack_on_its_way(&msg.id);
                continue;
            }
            if let Some(ids) = &mut self.inflight_ids {
                match ids.entry(msg.id.clone()) {
                    Entry::Occupied(mut e) => {
                        // The source delivered it again while it runs (a
                        // visibility timeout shorter than the work): it
                        // settles with the delivery in flight.
                        *e.get_mut() += 1;
                        self.stats.duplicates += 1;
                        if self.stats.duplicates == 1 {
                            log::warn!(
                                "Message {} was delivered again while in flight; it is not run twice (the source's redelivery timeout may be shorter than processing). Further duplicates are counted in {}.",
                                msg.id,
                                names::MSGS_DUPLICATES
                            );
                        }
                        continue;
                    }
                    Entry::Vacant(e) => {
                        e.insert(0);
                    }
                }
            }
            let (tracker, mut ready, _) = self.table();
            tracker.insert(msg, now, &mut ready);
        }
        self.settle(now);
    }
}

impl Handler<Fetch> for PipelineActor {
    type Result = ();

    fn handle(&mut self, fetch: Fetch, _ctx: &mut Context<Self>) {
        let Some(w) = self.workers.get(fetch.worker as usize) else {
            log::error!(
                "A fetch came from unknown worker {}; ignored.",
                fetch.worker
            );
            return;
        };
        let t = w.task as usize;
        if fetch.max == 0 {
            // The worker is leaving: its outstanding fetches are withdrawn,
            // so nothing more is sent to it.
            self.waiting[t].retain(|&(id, _)| id != fetch.worker);
            return;
        }
        self.waiting[t].push_back((fetch.worker, fetch.max));
        self.ready[t].set_chunk(fetch.max);
        self.routes.own(fetch.worker).set_chunk(fetch.max);
        self.pump(t);
    }
}

impl Handler<Ticks> for PipelineActor {
    type Result = ();

    fn handle(&mut self, ticks: Ticks, _ctx: &mut Context<Self>) {
        let Some(w) = self.workers.get(ticks.worker as usize) else {
            log::error!("Ticks came from unknown worker {}; ignored.", ticks.worker);
            return;
        };
        if w.sink.is_none() || self.closed {
            return;
        }
        let task = w.task;
        let now = Instant::now();
        if let Some((i, child)) = self.tracker.dag().keyless_output(task, &ticks.outputs) {
            self.stats.task_errors += 1;
            let dag = self.tracker.dag();
            log::warn!(
                "A tick of task {} emitted output {i} without a key, and the edge \"{}\" -> \"{}\" groups by {}; the tick's outputs are dropped.",
                dag.name(task),
                dag.name(task),
                dag.name(child),
                dag.grouping(task, child)
            );
            return;
        }
        self.stats.tick_outputs += ticks.outputs.len() as u64;
        for out in ticks.outputs {
            let (tracker, mut ready, _) = self.table();
            tracker.insert_tick(task, out, now, &mut ready);
        }
        self.settle(now);
    }
}

impl Handler<Results> for PipelineActor {
    type Result = ();

    fn handle(&mut self, mut results: Results, _ctx: &mut Context<Self>) {
        let now = Instant::now();
        let Some(w) = self.workers.get_mut(results.worker as usize) else {
            log::error!(
                "Results came from unknown worker {}; ignored.",
                results.worker
            );
            return;
        };
        if w.sink.is_none() {
            // Results from a worker already given up on: its messages went
            // to the failure policy; counting them again could complete
            // something twice.
            self.stats.stale_results += results.items.len() as u64;
            return;
        }
        w.handled += results.items.len() as u64;
        w.backlog = w.backlog.saturating_sub(results.items.len());
        w.batch_items += results.items.len() as u64;
        if results.complete {
            w.in_hand = w.in_hand.saturating_sub(1);
            w.completed += 1;
            w.pinned_in_hand.pop_front();
            if let Some((done, _)) = w.shared.pop_front() {
                let spent = SharedBatch::into_spent(done);
                if spent.capacity() > 0 && results.spent.capacity() == 0 {
                    results.spent = spent;
                }
            }
            // The task's pace, from the batches its workers finish: the
            // time the worker measured, else the time since it started.
            let n = std::mem::take(&mut w.batch_items).max(1);
            let took = match (results.busy_ns, w.busy_since) {
                (0, Some(since)) => Some(now.saturating_duration_since(since).as_nanos() as u64),
                (0, None) => None,
                (ns, _) => Some(ns),
            };
            if let Some(took) = took {
                let per_msg = took / n;
                let est = &mut self.pace[w.task as usize];
                *est = Some(est.map_or(per_msg, |e| (e * 7 + per_msg) / 8));
            }
            w.progress = None;
            if w.in_hand == 0 {
                w.busy_since = None;
                w.asked_back = false;
                w.backlog = 0;
            } else {
                w.busy_since = Some(now);
            }
        }
        let task = w.task;
        if self.closed {
            if let Some(held) = &mut w.held {
                for (ticket, _) in &results.items {
                    held.answer(*ticket);
                }
            }
            self.stats.stale_results += results.items.len() as u64;
            return;
        }
        let worker = results.worker as usize;
        let mut offset = 0usize;
        for (ticket, verdict) in results.items.drain(..) {
            // A remote worker's answer counts only for a message it holds,
            // named exactly (siblings differ by copy), so no message is
            // answered twice. A skipped answer's outputs are passed over,
            // so the next answer's line up.
            let held = self.workers[worker]
                .held
                .as_mut()
                .is_none_or(|h| h.answer(ticket));
            if ticket.task != task || !held {
                if let Verdict::Done(k) = verdict {
                    offset = offset.saturating_add(k as usize);
                }
                self.stats.stale_results += 1;
                continue;
            }
            if verdict == Verdict::TimedOut {
                // An async task's call passed the deadline and was
                // cancelled: a timeout of the attempt, unless the sweeper
                // timed it out first (then the ticket is stale).
                let (tracker, mut ready, fin) = self.table();
                if !tracker.on_timeout(ticket, now, &mut ready, fin) {
                    self.stats.stale_results += 1;
                }
                continue;
            }
            let task_name = || self.task_names[task as usize].clone();
            let outcome: Result<&mut [Emitted], FailReason> = match verdict {
                Verdict::Done(k) => {
                    let end = offset.saturating_add(k as usize);
                    let left = results.outputs.len().saturating_sub(offset);
                    match results.outputs.get_mut(offset..end) {
                        Some(outputs) => {
                            offset = end;
                            let dag = self.tracker.dag();
                            match dag.keyless_output(task, outputs) {
                                None => Ok(outputs),
                                Some((i, child)) => {
                                    self.stats.task_errors += 1;
                                    Err(FailReason::TaskError {
                                    task: task_name(),
                                    message: format!(
                                        "output {i} has no key, and the edge \"{}\" -> \"{}\" groups by {}",
                                        dag.name(task),
                                        dag.name(child),
                                        dag.grouping(task, child)
                                    ),
                                    })
                                }
                            }
                        }
                        None => Err(FailReason::TaskError {
                            task: task_name(),
                            message: format!("malformed result: {k} outputs claimed, {left} left"),
                        }),
                    }
                }
                Verdict::Filtered => {
                    self.stats.filtered += 1;
                    Ok(&mut [])
                }
                Verdict::Error(message) => {
                    self.stats.task_errors += 1;
                    Err(FailReason::TaskError {
                        task: task_name(),
                        message,
                    })
                }
                Verdict::Panicked(message) => {
                    self.stats.task_panics += 1;
                    Err(FailReason::TaskPanic {
                        task: task_name(),
                        message,
                    })
                }
                Verdict::TimedOut => Err(FailReason::Timeout),
            };
            if let Err(reason) = &outcome {
                let window = &mut self.ops.failures[task as usize];
                window.errors += 1;
                window.note(|| reason.to_string(), self.tracker.id_of(ticket));
            }
            let accepted = match outcome {
                Ok(outputs) => {
                    let (tracker, mut ready, fin) = self.table();
                    tracker.on_done(ticket, outputs, now, &mut ready, fin)
                }
                Err(reason) => self.fail_ticket(ticket, reason, now),
            };
            if !accepted {
                self.stats.stale_results += 1;
            }
        }
        if !results.returned.is_empty() {
            self.take_returned(results.worker, &mut results.returned);
        }
        results.spent.clear();
        if self.pool.len() < 64 && results.spent.capacity() > 0 {
            self.pool.push(results.spent);
        }
        self.settle(now);
    }
}

/// Resolves once nothing is in flight, or at the deadline.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Drain {
    pub deadline: Option<Instant>,
}

impl Handler<Drain> for PipelineActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, drain: Drain, _ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.drains.push(tx);
        if let Some(d) = drain.deadline {
            self.drain_deadline = Some(self.drain_deadline.map_or(d, |old| old.min(d)));
        }
        self.settle(Instant::now());
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

/// Ends the run: drops the workers' queues (so they stop) and returns the
/// final counters.
#[derive(Debug, Message)]
#[rtype(result = "Final")]
pub(crate) struct Finish;

impl Handler<Finish> for PipelineActor {
    type Result = MessageResult<Finish>;

    fn handle(&mut self, _: Finish, ctx: &mut Context<Self>) -> Self::Result {
        self.flush_metrics();
        self.report_failures(Instant::now(), true);
        // The counters as they stand, workers included, before they close.
        let stats = self.current_stats();
        for w in &mut self.workers {
            // What an in-process worker has not claimed is left unacked: it
            // must not run after the run ends (it will be redelivered).
            for (b, _) in &w.shared {
                drop(b.take_rest());
            }
            if let Some(sink) = &mut w.sink {
                sink.close();
            }
        }
        self.workers.clear();
        ctx.stop();
        MessageResult(Final {
            stats,
            reports: self.reports.take(),
            unfinished: std::mem::take(&mut self.unfinished),
        })
    }
}

/// Sends the current counters.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct GetStats(pub std::sync::mpsc::Sender<Stats>);

impl Handler<GetStats> for PipelineActor {
    type Result = ();

    fn handle(&mut self, GetStats(tx): GetStats, _ctx: &mut Context<Self>) {
        let _ = tx.send(self.current_stats());
    }
}

/// Sends a copy of the inflight table.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Inspect(pub std::sync::mpsc::Sender<Vec<InflightEntry>>);

impl Handler<Inspect> for PipelineActor {
    type Result = ();

    fn handle(&mut self, Inspect(tx): Inspect, _ctx: &mut Context<Self>) {
        let _ = tx.send(self.tracker.entries(Instant::now()));
    }
}

/// Adds a worker (a remote session) and returns its id.
pub(crate) struct RegisterWorker {
    pub task: TaskIdx,
    pub sink: Box<dyn DeliverySink>,
}

impl Message for RegisterWorker {
    type Result = WorkerId;
}

impl std::fmt::Debug for RegisterWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterWorker")
            .field("task", &self.task)
            .finish_non_exhaustive()
    }
}

impl Handler<RegisterWorker> for PipelineActor {
    type Result = MessageResult<RegisterWorker>;

    fn handle(&mut self, msg: RegisterWorker, _ctx: &mut Context<Self>) -> Self::Result {
        let id = self.add_worker(msg.task, msg.sink, true);
        self.worker_is_back(msg.task as usize);
        log::info!(
            "Worker {id} joined task {} ({} worker(s) now).",
            self.task_names[msg.task as usize],
            self.workers_per_task()[msg.task as usize]
        );
        MessageResult(id)
    }
}

/// A worker's session ended.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct WorkerLost(pub WorkerId);

impl Handler<WorkerLost> for PipelineActor {
    type Result = ();

    fn handle(&mut self, WorkerLost(worker): WorkerLost, _ctx: &mut Context<Self>) {
        self.lose_worker(worker, Instant::now());
    }
}
