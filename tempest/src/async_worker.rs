//! The async task loop: one worker of an [`AsyncTask`](crate::AsyncTask)
//! keeps up to its *concurrency* of messages in flight, polling their
//! futures together on a single-threaded tokio runtime of its own.
//!
//! It takes batches like the sync loop ([`run_task_loop`](crate::worker)),
//! but claims from a [`SharedBatch`] only as many messages as it has free
//! slots, so what it has not started stays available to give-back. Results
//! go back as each call ends, those that ended in one wake-up together, so
//! the pipeline sees them out of the batch's order. A batch ends
//! (`complete`) once every message of it is answered or was taken back,
//! and batches end in the order they came: the transports and the pipeline
//! pop their oldest batch on `complete`.
//!
//! A call whose message passes its deadline is cancelled (its future is
//! dropped) and answered [`Verdict::TimedOut`].
//!
//! A task whose messages come by key runs at most one call per key at a
//! time: a message whose key has a call in flight waits behind it, and
//! starts when that call ends, so one key's messages run in the order they
//! came.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use rustc_hash::FxHashMap;

use crate::metrics::names;
use crate::msg::{Emitted, MsgCtx, Results, TaskMsg, Ticket, Verdict, WorkerId};
use crate::task::{AsyncRunner, TaskContext, TaskResult};
use crate::worker::{panic_message, Counts, SharedBatch};

/// Moves batches between the async loop and the pipeline. Each batch comes
/// with a tag (a remote worker's connection); results are returned under
/// the tag of the batches they belong to.
pub(crate) trait AsyncTransport {
    /// The next batch and its tag; `None` once the pipeline is gone.
    /// Cancel-safe: the loop drops it when a call ends first.
    fn recv(&mut self) -> LocalBoxFuture<'_, Option<(u64, Arc<SharedBatch>)>>;
    /// Takes a received batch: the batch to work on, or `None` to skip it
    /// (it came on a connection that has since dropped).
    fn take(
        &mut self,
        tag: u64,
        batch: Arc<SharedBatch>,
    ) -> LocalBoxFuture<'_, Option<Arc<SharedBatch>>>;
    /// Returns results of batches with this tag.
    fn send_results(&mut self, tag: u64, results: Results) -> LocalBoxFuture<'_, ()>;
}

/// How often the loop records its counters and gauges while busy.
const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// A batch the loop holds: taken, not yet complete.
struct Held {
    tag: u64,
    shared: Arc<SharedBatch>,
    /// Messages claimed from it so far.
    claimed: usize,
    /// Claimed messages whose call has ended.
    answered: usize,
    /// When the loop took it.
    taken: Instant,
}

/// How one call ended.
enum Ended {
    Returned(TaskResult),
    Panicked(String),
    TimedOut,
}

/// What a call's future yields: the batch it belongs to (its sequence
/// number), the message's ticket and context (its outputs inherit key and
/// headers), and how it ended.
type Answer = (u64, Ticket, MsgCtx, Ended);

/// Runs one worker of an async task until its transport closes.
pub(crate) fn run_async_loop(
    mut task: Box<dyn AsyncRunner>,
    ctx: TaskContext,
    worker: WorkerId,
    concurrency: usize,
    transport: &mut dyn AsyncTransport,
) {
    let name = ctx.task.clone();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log::error!(
                "Worker {} of task {name} cannot start its async runtime ({e}); it stops.",
                ctx.worker
            );
            return;
        }
    };
    if let Err(p) = std::panic::catch_unwind(AssertUnwindSafe(|| task.started(&ctx))) {
        log::error!(
            "Task {name} (worker {}) panicked in started(): {}; it runs on regardless.",
            ctx.worker,
            panic_message(&*p)
        );
    }
    runtime.block_on(drive(&*task, &ctx, worker, concurrency.max(1), transport));
    // Calls still in flight were dropped with the loop's future.
    drop(runtime);
    if let Err(p) = std::panic::catch_unwind(AssertUnwindSafe(|| task.shutdown())) {
        log::error!(
            "Task {name} panicked in shutdown(): {}.",
            panic_message(&*p)
        );
    }
    // What `shutdown` changed: the last checkpoint.
    if ctx.states.is_durable() && ctx.states.is_dirty() {
        crate::worker::checkpoint_logged(&ctx.states, &name, &mut 0);
    }
}

/// Holds an async worker's results back while its durable state has
/// changes no checkpoint holds, and checkpoints every
/// `checkpoint_interval` (or once the results held answer
/// [`CHECKPOINT_AFTER`](crate::worker::CHECKPOINT_AFTER) messages): a
/// message is answered only once what its call changed is written, as in
/// the sync loop. The checkpoint's round trip runs on the worker's
/// runtime, pausing its calls for that long.
type Gate = crate::worker::Gate<(u64, Results), tokio::time::Instant>;

impl Gate {
    async fn send(&mut self, tag: u64, r: Results, transport: &mut dyn AsyncTransport) {
        if !self.held.is_empty() || (self.states.is_durable() && self.states.is_dirty()) {
            let every = self.every;
            self.due
                .get_or_insert_with(|| tokio::time::Instant::now() + every);
            self.held_msgs += r.items.len();
            self.held.push((tag, r));
            if self.held_msgs >= crate::worker::CHECKPOINT_AFTER {
                self.due = Some(tokio::time::Instant::now());
            }
            return;
        }
        transport.send_results(tag, r).await;
    }

    /// Checkpoints and sends what was held, if due (or `now`).
    async fn checkpoint_if_due(&mut self, now: bool, transport: &mut dyn AsyncTransport) {
        let Some(due) = self.due else { return };
        if !now && tokio::time::Instant::now() < due {
            return;
        }
        if crate::worker::checkpoint_logged(&self.states, &self.name, &mut self.failures) {
            self.due = None;
            self.held_msgs = 0;
            for (tag, r) in std::mem::take(&mut self.held) {
                transport.send_results(tag, r).await;
            }
        } else {
            self.due = Some(tokio::time::Instant::now() + self.every);
        }
    }
}

/// One call of `task`, cancelled at the message's deadline.
fn call(task: &dyn AsyncRunner, seq: u64, m: TaskMsg) -> impl Future<Output = Answer> + '_ {
    let TaskMsg {
        ticket,
        payload,
        ctx,
    } = m;
    let deadline = ctx.deadline();
    let kept = ctx.clone();
    async move {
        if deadline.is_some_and(|d| d <= Instant::now()) {
            // Past its deadline before it started: not run at all.
            return (seq, ticket, kept, Ended::TimedOut);
        }
        // The call is made inside the guarded future, so a panic while
        // making it fails the message too.
        let run = AssertUnwindSafe(async move { task.handle(payload, ctx).await }).catch_unwind();
        let result = match deadline {
            // On time-out the future is dropped here, before the answer.
            Some(d) => tokio::time::timeout_at(d.into(), run).await.ok(),
            None => Some(run.await),
        };
        let ended = match result {
            None => Ended::TimedOut,
            Some(Ok(r)) => Ended::Returned(r),
            Some(Err(p)) => Ended::Panicked(panic_message(&*p)),
        };
        (seq, ticket, kept, ended)
    }
}

/// The results gathered since the last send, per tag (nearly always one).
#[derive(Default)]
struct Gathered(Vec<(u64, Results)>);

impl Gathered {
    fn of(&mut self, tag: u64, worker: WorkerId) -> &mut Results {
        let at = match self.0.iter().position(|(t, _)| *t == tag) {
            Some(at) => at,
            None => {
                self.0.push((tag, empty_results(worker)));
                self.0.len() - 1
            }
        };
        &mut self.0[at].1
    }
}

fn empty_results(worker: WorkerId) -> Results {
    Results {
        worker,
        items: Vec::new(),
        outputs: Vec::new(),
        spent: Vec::new(),
        complete: false,
        returned: Vec::new(),
        busy_ns: 0,
    }
}

async fn drive(
    task: &dyn AsyncRunner,
    ctx: &TaskContext,
    worker: WorkerId,
    concurrency: usize,
    transport: &mut dyn AsyncTransport,
) {
    let name = ctx.task.as_str();
    // With at-most-once updates downstream, outputs get paths.
    let seed = ctx
        .states
        .at_most_once()
        .then(|| crate::msg::path_seed(name));
    let metrics = ctx.metrics.with_label("worker", ctx.worker.to_string());
    let mut counts = Counts::default();
    let mut batch_us = ctx.metrics.histogram(names::TASK_BATCH_US);
    let mut batch_size = ctx.metrics.histogram(names::TASK_BATCH_SIZE);
    let mut held: VecDeque<Held> = VecDeque::new();
    // The sequence number of `held`'s front: a call names its batch by
    // sequence number, as batches leave from the front.
    let mut base: u64 = 0;
    let mut running = FuturesUnordered::new();
    let mut gathered = Gathered::default();
    let mut claimed: Vec<TaskMsg> = Vec::new();
    // Per key with a call in flight: the messages waiting behind it, with
    // their batch's sequence number (by-key tasks only).
    let mut by_key: FxHashMap<Bytes, VecDeque<(u64, TaskMsg)>> = FxHashMap::default();
    let mut waiting = 0usize;
    let mut open = true;
    let mut high_water = 0usize;
    let mut next_flush = tokio::time::Instant::now() + FLUSH_EVERY;
    let mut gate = Gate::new(ctx);
    loop {
        gate.checkpoint_if_due(false, transport).await;
        // Fill the free slots, from the oldest batch on.
        let mut free = concurrency.saturating_sub(running.len() + waiting);
        for (i, b) in held.iter_mut().enumerate() {
            if free == 0 {
                break;
            }
            b.shared.claim(free, &mut claimed);
            b.claimed += claimed.len();
            free -= claimed.len();
            if !claimed.is_empty() {
                // As the sync loop does before a run: clean cached state is
                // read afresh (a key may have been changed elsewhere since).
                gate.refresh(&claimed);
            }
            for m in claimed.drain(..) {
                let seq = base + i as u64;
                match m.ctx.key().filter(|_| ctx.one_per_key) {
                    Some(key) => match by_key.get_mut(key) {
                        Some(behind) => {
                            behind.push_back((seq, m));
                            waiting += 1;
                        }
                        None => {
                            by_key.insert(key.clone(), VecDeque::new());
                            running.push(call(task, seq, m));
                        }
                    },
                    None => running.push(call(task, seq, m)),
                }
            }
        }
        high_water = high_water.max(running.len());
        // End the batches that are done, oldest first.
        while let Some(b) = held.front() {
            if b.answered < b.claimed || b.shared.unclaimed() > 0 {
                break;
            }
            let Some(b) = held.pop_front() else { break };
            base += 1;
            counts.batches += 1;
            batch_size.record(b.claimed as u64);
            let took = b.taken.elapsed();
            counts.handle_nanos += took.as_nanos() as u64;
            batch_us.record_duration(took);
            // The first batch to end with this wake-up's results ends
            // with them; any more end with results of their own.
            let spent = SharedBatch::into_spent(b.shared);
            let r = gathered.of(b.tag, worker);
            if r.complete {
                let mut r = empty_results(worker);
                r.complete = true;
                r.spent = spent;
                gate.send(b.tag, r, transport).await;
            } else {
                r.complete = true;
                r.spent = spent;
            }
        }
        for (tag, r) in gathered.0.drain(..) {
            counts.msgs_out += r.outputs.len() as u64;
            gate.send(tag, r, transport).await;
        }
        if tokio::time::Instant::now() >= next_flush {
            flush(&mut counts, ctx, &metrics, running.len(), high_water);
            batch_us.flush();
            batch_size.flush();
            next_flush = tokio::time::Instant::now() + FLUSH_EVERY;
        }
        if !open {
            break;
        }
        let want = free > 0;
        tokio::select! {
            biased;
            Some(answer) = running.next(), if !running.is_empty() => {
                let mut answer = Some(answer);
                // Everything that has ended by now goes back together.
                while let Some((seq, ticket, mctx, ended)) = answer.take() {
                    if ctx.one_per_key {
                        // The next message of the key starts now.
                        if let Some(key) = mctx.key() {
                            let next = by_key.get_mut(key).and_then(VecDeque::pop_front);
                            match next {
                                Some((s, m)) => {
                                    waiting -= 1;
                                    running.push(call(task, s, m));
                                }
                                None => {
                                    by_key.remove(key);
                                }
                            }
                        }
                    }
                    let Some(b) = seq.checked_sub(base).and_then(|i| held.get_mut(i as usize)) else {
                        log::error!("Task {name}: a call ended for a batch the worker no longer holds; its result is dropped.");
                        continue;
                    };
                    b.answered += 1;
                    let r = gathered.of(b.tag, worker);
                    let verdict = verdict(name, ended, &mctx, seed, &mut r.outputs, &mut counts);
                    r.items.push((ticket, verdict));
                    counts.msgs_in += 1;
                    answer = running.next().now_or_never().flatten();
                }
            }
            got = transport.recv(), if want => match got {
                Some((tag, batch)) => {
                    if let Some(shared) = transport.take(tag, batch).await {
                        held.push_back(Held {
                            tag,
                            shared,
                            claimed: 0,
                            answered: 0,
                            taken: Instant::now(),
                        });
                    }
                }
                None => open = false,
            },
            _ = tokio::time::sleep_until(gate.due.map_or(next_flush, |d| d.min(next_flush))) => {}
        }
    }
    // The answers held for a checkpoint: written and sent, if the
    // pipeline still takes them.
    if gate.states.is_durable() && gate.states.is_dirty() && gate.due.is_none() {
        gate.due = Some(tokio::time::Instant::now());
    }
    gate.checkpoint_if_due(true, transport).await;
    if !running.is_empty() {
        log::debug!(
            "Task {name}: the pipeline is gone; {} call(s) in flight are cancelled.",
            running.len()
        );
    }
    drop(running);
    flush(&mut counts, ctx, &metrics, 0, high_water);
    batch_us.flush();
    batch_size.flush();
}

/// The verdict on one call; a `Done` call's outputs are appended to `out`
/// (given paths from `seed`, the task's, if set).
fn verdict(
    name: &str,
    ended: Ended,
    ctx: &MsgCtx,
    seed: Option<u64>,
    out: &mut Vec<Emitted>,
    counts: &mut Counts,
) -> Verdict {
    match ended {
        Ended::Returned(Ok(output)) => {
            let before = out.len();
            match output.drain_into(ctx, out) {
                Ok(()) => {
                    if let Some(seed) = seed {
                        crate::worker::set_paths(ctx, seed, &mut out[before..]);
                    }
                    Verdict::Done((out.len() - before) as u32)
                }
                Err(e) => {
                    counts.errors += 1;
                    Verdict::Error(e.message().to_string())
                }
            }
        }
        Ended::Returned(Err(e)) => {
            counts.errors += 1;
            log::debug!("Task {name} failed a message: {e}.");
            Verdict::Error(e.message().to_string())
        }
        Ended::Panicked(message) => {
            counts.panics += 1;
            log::error!("Task {name} panicked handling a message: {message}.");
            Verdict::Panicked(message)
        }
        Ended::TimedOut => {
            counts.timed_out += 1;
            log::debug!(
                "Task {name}: a call passed its message's deadline and was cancelled (message {}).",
                ctx.id()
            );
            Verdict::TimedOut
        }
    }
}

fn flush(
    counts: &mut Counts,
    ctx: &TaskContext,
    metrics: &tempest_source::Metrics,
    in_progress: usize,
    high_water: usize,
) {
    counts.flush(&ctx.metrics);
    metrics.gauge(names::TASK_IN_PROGRESS, in_progress as i64);
    metrics.gauge(names::TASK_IN_PROGRESS_MAX, high_water as i64);
}
