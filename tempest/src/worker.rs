//! The task-side loop, shared by every transport: take a batch, run
//! `filter`/`handle` on each message, return the results in one batch.
//!
//! A [`Transport`] moves batches between this loop and the pipeline: in
//! standalone mode bounded in-memory channels ([`InProc`]), in distributed
//! mode a TCP session. The loop itself knows neither.
//!
//! A batch is a [`SharedBatch`]: the loop claims its messages in runs of
//! about [`CLAIM_SPAN`] of work, and whatever it has not claimed can be
//! taken back while it is busy (another worker of the task is idle),
//! without running twice.

use std::any::Any;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tempest_source::Metrics;

use crate::metrics::names;
use crate::msg::{Emitted, MsgCtx, Results, TaskMsg, Verdict, WorkerId};
use crate::task::{Task, TaskContext};

/// Moves batches between the task loop and the pipeline.
pub(crate) trait Transport {
    /// The next batch to handle, waiting for it until `until` at most
    /// (`None`: for as long as it takes).
    fn next_batch(&mut self, until: Option<Instant>) -> Next;
    /// Returns one batch's results.
    fn send_results(&mut self, results: Results);
    /// Hands over a tick's outputs.
    fn send_ticks(&mut self, outputs: Vec<Emitted>);
}

/// What [`Transport::next_batch`] got.
pub(crate) enum Next {
    /// A batch to handle.
    Batch(Arc<SharedBatch>),
    /// Nothing came in time.
    Due,
    /// The pipeline is gone.
    Closed,
}

/// When a worker's task ticks next.
struct TickClock {
    every: Duration,
    next: Instant,
}

impl TickClock {
    fn new(every: Option<Duration>) -> Option<Self> {
        every.map(|every| TickClock {
            every,
            next: Instant::now() + every,
        })
    }
}

/// Ticks the task if its tick is due (a tick that came late is not made
/// up for: the next is one interval after this one).
fn tick_if_due(
    clock: &mut Option<TickClock>,
    task: &mut dyn Task,
    name: &str,
    counts: &mut Counts,
    gate: &mut Gate<Answer>,
    transport: &mut impl Transport,
) {
    let Some(c) = clock else { return };
    let now = Instant::now();
    if now < c.next {
        return;
    }
    c.next = now + c.every;
    counts.ticks += 1;
    // A tick has no input: its outputs inherit nothing, and its changes
    // to state always apply.
    let ctx = MsgCtx::new(0u64);
    gate.states.begin(None);
    let mut outputs = Vec::new();
    let res = catch_unwind(AssertUnwindSafe(|| task.tick()));
    match res {
        Ok(Ok(out)) => match out.drain_into(&ctx, &mut outputs) {
            Ok(()) => {}
            Err(e) => {
                counts.errors += 1;
                log::warn!("Task {name} failed a tick: {e}.");
                return;
            }
        },
        Ok(Err(e)) => {
            counts.errors += 1;
            log::warn!("Task {name} failed a tick: {e}.");
            return;
        }
        Err(p) => {
            counts.panics += 1;
            log::error!("Task {name} panicked in tick(): {}.", panic_message(&*p));
            return;
        }
    }
    if !outputs.is_empty() {
        counts.msgs_out += outputs.len() as u64;
        gate.send(Answer::Ticks(outputs), transport);
    }
}

/// A worker whose answers wait for a checkpoint checkpoints early once
/// they answer this many messages.
pub(crate) const CHECKPOINT_AFTER: usize = 4096;

/// What a worker sends the pipeline.
enum Answer {
    Results(Results),
    Ticks(Vec<Emitted>),
}

/// Holds a worker's answers back while its durable state has changes no
/// checkpoint holds, and checkpoints every `checkpoint_interval`: a
/// message is answered (and so can complete and be acked at the source)
/// only once what its handling changed is written. With state in memory
/// only, answers pass straight through. `A` is what is held: the sync
/// loop's answers here, the async loop's results per tag there (it adds
/// its own `send` and `checkpoint_if_due`).
pub(crate) struct Gate<A, I = Instant> {
    pub(crate) states: crate::state::WorkerStates,
    pub(crate) every: Duration,
    pub(crate) held: Vec<A>,
    /// When the held answers' checkpoint is due.
    pub(crate) due: Option<I>,
    /// Messages answered in the held answers.
    pub(crate) held_msgs: usize,
    pub(crate) failures: u64,
    pub(crate) name: String,
}

impl<A, I> Gate<A, I> {
    /// Before a run of messages: drops clean cached state and loads the
    /// run's keys in one round trip.
    pub(crate) fn refresh(&mut self, run: &[TaskMsg]) {
        if !self.states.is_durable() {
            return;
        }
        let keys: Vec<bytes::Bytes> = run.iter().filter_map(|m| m.ctx.key().cloned()).collect();
        // Only a message that may have been handled before can have its
        // update applied already.
        let updates: Vec<crate::state::UpdateId> = if self.states.at_most_once() {
            run.iter()
                .filter(|m| m.ctx.maybe_handled_before())
                .filter_map(|m| update_of(&m.ctx))
                .collect()
        } else {
            Vec::new()
        };
        if let Err(e) = self.states.refresh(&keys, &updates) {
            log::warn!(
                "Task {} cannot load its state ({e}); its calls load each key as they need it.",
                self.name
            );
        }
    }

    pub(crate) fn new(ctx: &TaskContext) -> Self {
        Gate {
            states: ctx.states.clone(),
            every: ctx.checkpoint_interval,
            held: Vec::new(),
            due: None,
            held_msgs: 0,
            failures: 0,
            name: ctx.task.clone(),
        }
    }
}

impl Gate<Answer> {
    fn send(&mut self, answer: Answer, transport: &mut impl Transport) {
        if !self.held.is_empty() || (self.states.is_durable() && self.states.is_dirty()) {
            self.due.get_or_insert_with(|| Instant::now() + self.every);
            if let Answer::Results(r) = &answer {
                self.held_msgs += r.items.len();
            }
            self.held.push(answer);
            if self.held_msgs >= CHECKPOINT_AFTER {
                // Held answers hold source messages in flight: bound them,
                // or `max_pending` caps the rate at what fits in one
                // interval.
                self.due = Some(Instant::now());
            }
            return;
        }
        match answer {
            Answer::Results(r) => transport.send_results(r),
            Answer::Ticks(t) => transport.send_ticks(t),
        }
    }

    /// Checkpoints and sends what was held, if due (or `now`).
    fn checkpoint_if_due(&mut self, now: bool, transport: &mut impl Transport) {
        let Some(due) = self.due else { return };
        if !now && Instant::now() < due {
            return;
        }
        if checkpoint_logged(&self.states, &self.name, &mut self.failures) {
            self.due = None;
            self.held_msgs = 0;
            for a in self.held.drain(..) {
                match a {
                    Answer::Results(r) => transport.send_results(r),
                    Answer::Ticks(t) => transport.send_ticks(t),
                }
            }
        } else {
            self.due = Some(Instant::now() + self.every);
        }
    }
}

/// Checkpoints a worker's state; whether it worked. A failure is logged
/// (the first, then every 60th) and counted in `failures`; the first
/// success after failures is logged and resets it.
pub(crate) fn checkpoint_logged(
    states: &crate::state::WorkerStates,
    name: &str,
    failures: &mut u64,
) -> bool {
    match states.checkpoint() {
        Ok(_) => {
            if *failures > 0 {
                log::info!(
                    "Task {name}'s state is checkpointed again, after {failures} failed attempt(s)."
                );
                *failures = 0;
            }
            true
        }
        Err(e) => {
            *failures += 1;
            if *failures == 1 || failures.is_multiple_of(60) {
                log::warn!(
                    "Task {name} cannot checkpoint its state ({e}); its answers wait (attempt {failures}), and its messages time out and are retried if it stays down."
                );
            }
            false
        }
    }
}

/// The update a message's state changes are, with at-most-once updates:
/// `None` for a tick's output (never acked at a source, its changes are
/// recomputed from checkpointed state after a failure).
pub(crate) fn update_of(ctx: &MsgCtx) -> Option<crate::state::UpdateId> {
    (!ctx.from_tick()).then(|| crate::state::UpdateId {
        source: ctx.id().clone(),
        path: ctx.path(),
    })
}

/// Gives the outputs a task emitted for the message of `ctx` their paths
/// (output `i`'s from the input's path, the task's seed and `i`).
/// Outputs of a message that may have been handled before may have been
/// too.
pub(crate) fn set_paths(ctx: &MsgCtx, seed: u64, outputs: &mut [Emitted]) {
    let seen = ctx.meta.seen();
    for (i, o) in outputs.iter_mut().enumerate() {
        o.set_path(crate::msg::output_path(ctx.path(), seed, i as u32), seen);
    }
}

/// A delivered batch, shared between the worker that works through it and
/// whoever may take back what the worker has not claimed yet: the pipeline
/// (in process) or the worker process's I/O thread (for a remote worker).
///
/// The worker claims runs sized to take about [`CLAIM_SPAN`] at the pace
/// seen so far (its first run is one message), so a fast task claims its
/// whole batch at once, taking the buffer without moving a message. A
/// claimed message is the worker's; an unclaimed one can be taken back at
/// any time. The lock decides which, so a message never runs twice without
/// a fault, and it is taken once per run, not per message.
#[derive(Debug, Default)]
pub(crate) struct SharedBatch(Mutex<VecDeque<TaskMsg>>);

impl SharedBatch {
    pub fn new(msgs: Vec<TaskMsg>) -> Arc<Self> {
        Arc::new(SharedBatch(Mutex::new(VecDeque::from(msgs))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<TaskMsg>> {
        // Every critical section leaves the queue consistent.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Claims up to `n` messages from the front into `into` (empty): the
    /// whole rest by taking the buffer, without moving a message (the queue
    /// was made from a `Vec`, so it converts back for free unless a claim
    /// already took messages from its front).
    pub(crate) fn claim(&self, n: usize, into: &mut Vec<TaskMsg>) {
        let mut q = self.lock();
        if n >= q.len() {
            *into = Vec::from(std::mem::take(&mut *q));
        } else {
            into.extend(q.drain(..n));
        }
    }

    /// Takes every message not claimed yet.
    pub fn take_rest(&self) -> Vec<TaskMsg> {
        self.lock().drain(..).collect()
    }

    /// How many messages are not claimed yet.
    pub fn unclaimed(&self) -> usize {
        self.lock().len()
    }

    /// The batch's emptied vector, for reuse, if this is the last handle.
    pub fn into_spent(this: Arc<Self>) -> Vec<TaskMsg> {
        match Arc::try_unwrap(this) {
            Ok(b) => {
                let mut v = Vec::from(b.0.into_inner().unwrap_or_else(PoisonError::into_inner));
                v.clear();
                v
            }
            Err(_) => Vec::new(),
        }
    }
}

/// A run of claimed messages is sized to take about this long at the pace
/// seen so far, so that a message the worker has claimed but not started
/// waits about this long at most, unless a slow message turns up.
pub(crate) const CLAIM_SPAN: Duration = Duration::from_millis(1);

/// The most messages one run claims.
const MAX_CLAIM: usize = 1 << 20;

/// Per-batch counters of one worker, flushed into its metrics handle.
#[derive(Default)]
pub(crate) struct Counts {
    pub msgs_in: u64,
    pub msgs_out: u64,
    pub errors: u64,
    pub panics: u64,
    pub filtered: u64,
    pub batches: u64,
    pub handle_nanos: u64,
    /// Async calls cancelled at their message's deadline.
    pub timed_out: u64,
    /// Ticks run.
    pub ticks: u64,
}

impl Counts {
    pub(crate) fn flush(&mut self, metrics: &Metrics) {
        let c = std::mem::take(self);
        metrics.incr(names::TASK_MSGS_IN, c.msgs_in);
        metrics.incr(names::TASK_MSGS_OUT, c.msgs_out);
        metrics.incr(names::TASK_ERRORS, c.errors);
        metrics.incr(names::TASK_PANICS, c.panics);
        metrics.incr(names::TASK_FILTERED, c.filtered);
        metrics.incr(names::TASK_BATCHES, c.batches);
        metrics.incr(names::TASK_HANDLE_NANOS, c.handle_nanos);
        metrics.incr(names::TASK_CANCELLED, c.timed_out);
        metrics.incr(names::TASK_TICKS, c.ticks);
    }
}

pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-text payload".to_string()
    }
}

/// Runs one worker of a task until its transport closes.
pub(crate) fn run_task_loop(
    mut task: Box<dyn Task>,
    ctx: TaskContext,
    worker: WorkerId,
    transport: &mut impl Transport,
) {
    let name = ctx.task.clone();
    if let Err(p) = catch_unwind(AssertUnwindSafe(|| task.started(&ctx))) {
        log::error!(
            "Task {name} (worker {}) panicked in started(): {}; it runs on regardless.",
            ctx.worker,
            panic_message(&*p)
        );
    }
    let mut counts = Counts::default();
    let mut batch_us = ctx.metrics.histogram(names::TASK_BATCH_US);
    let mut batch_size = ctx.metrics.histogram(names::TASK_BATCH_SIZE);
    let mut last_flush = Instant::now();
    let mut run: Vec<TaskMsg> = Vec::new();
    // Nanoseconds per message, averaged over the runs so far (`None`
    // before the first), so one slow message does not shrink every claim.
    let mut pace: Option<u64> = None;
    let mut ticks = TickClock::new(ctx.tick_interval);
    let mut gate = Gate::<Answer>::new(&ctx);
    let at_most_once = gate.states.at_most_once();
    let seed = crate::msg::path_seed(&name);
    loop {
        tick_if_due(
            &mut ticks,
            &mut *task,
            &name,
            &mut counts,
            &mut gate,
            transport,
        );
        gate.checkpoint_if_due(false, transport);
        let until = match (ticks.as_ref().map(|c| c.next), gate.due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let shared = match transport.next_batch(until) {
            Next::Batch(b) => b,
            Next::Due => continue,
            Next::Closed => break,
        };
        let started = Instant::now();
        let mut clock = PartialClock::new(started);
        let mut items = Vec::new();
        let mut outputs: Vec<Emitted> = Vec::new();
        let mut claim = pace.map_or(1, claim_for);
        let mut handled = 0usize;
        let mut spent_vec = Vec::new();
        loop {
            shared.claim(claim, &mut run);
            if run.is_empty() {
                break;
            }
            let run_len = run.len();
            gate.refresh(&run);
            if items.capacity() == 0 {
                let expected = run_len + shared.unclaimed();
                items.reserve(expected);
                outputs.reserve(expected);
            }
            let run_started = Instant::now();
            for m in run.drain(..) {
                if !items.is_empty() && clock.due() {
                    counts.msgs_out += outputs.len() as u64;
                    let partial = Results {
                        worker,
                        items: std::mem::take(&mut items),
                        outputs: std::mem::take(&mut outputs),
                        spent: Vec::new(),
                        complete: false,
                        returned: Vec::new(),
                        busy_ns: 0,
                    };
                    gate.send(Answer::Results(partial), transport);
                    clock.sent();
                }
                let TaskMsg {
                    ticket,
                    payload,
                    ctx,
                } = m;
                let before = outputs.len();
                if at_most_once {
                    gate.states.begin(update_of(&ctx).is_some().then_some(&ctx));
                }
                let verdict = match catch_unwind(AssertUnwindSafe(|| {
                    if task.filter(&payload, &ctx) {
                        Some(task.handle(payload, &ctx))
                    } else {
                        None
                    }
                })) {
                    Ok(None) => {
                        counts.filtered += 1;
                        Verdict::Filtered
                    }
                    Ok(Some(Ok(out))) => match out.drain_into(&ctx, &mut outputs) {
                        Ok(()) => {
                            if at_most_once {
                                set_paths(&ctx, seed, &mut outputs[before..]);
                            }
                            Verdict::Done((outputs.len() - before) as u32)
                        }
                        Err(e) => {
                            counts.errors += 1;
                            Verdict::Error(e.message().to_string())
                        }
                    },
                    Ok(Some(Err(e))) => {
                        counts.errors += 1;
                        log::debug!("Task {name} failed a message: {e}.");
                        Verdict::Error(e.message().to_string())
                    }
                    Err(p) => {
                        counts.panics += 1;
                        let message = panic_message(&*p);
                        log::error!("Task {name} panicked handling a message: {message}.");
                        Verdict::Panicked(message)
                    }
                };
                if at_most_once {
                    // A handling's changes stand only if it succeeded.
                    gate.states
                        .end(matches!(verdict, Verdict::Done(_) | Verdict::Filtered));
                }
                items.push((ticket, verdict));
            }
            handled += run_len;
            tick_if_due(
                &mut ticks,
                &mut *task,
                &name,
                &mut counts,
                &mut gate,
                transport,
            );
            let per_msg = run_started.elapsed().as_nanos() as u64 / run_len as u64;
            let p = pace.map_or(per_msg, |p| (p * 3 + per_msg) / 4);
            pace = Some(p);
            claim = claim_for(p);
            if run.capacity() > 16 {
                // The batch's own buffer (claimed whole): it goes back to
                // the pipeline for reuse.
                spent_vec = std::mem::take(&mut run);
            }
        }
        counts.batches += 1;
        counts.msgs_in += handled as u64;
        counts.msgs_out += outputs.len() as u64;
        batch_size.record(handled as u64);
        let spent = started.elapsed();
        counts.handle_nanos += spent.as_nanos() as u64;
        batch_us.record_duration(spent);
        // The last handle goes first, so the pipeline's end can reuse the
        // batch's vector if the worker did not take it.
        let left = SharedBatch::into_spent(shared);
        if spent_vec.capacity() == 0 {
            spent_vec = left;
        }
        let results = Results {
            worker,
            items,
            outputs,
            spent: spent_vec,
            complete: true,
            returned: Vec::new(),
            busy_ns: spent.as_nanos() as u64,
        };
        gate.send(Answer::Results(results), transport);
        gate.checkpoint_if_due(false, transport);
        if last_flush.elapsed().as_millis() >= 200 {
            flush_task_metrics(&mut *task, &name);
            counts.flush(&ctx.metrics);
            flush_skipped(&ctx.metrics, &gate.states);
            batch_us.flush();
            batch_size.flush();
            last_flush = Instant::now();
        }
    }
    flush_task_metrics(&mut *task, &name);
    counts.flush(&ctx.metrics);
    flush_skipped(&ctx.metrics, &gate.states);
    batch_us.flush();
    batch_size.flush();
    gate.states.begin(None);
    if let Err(p) = catch_unwind(AssertUnwindSafe(|| task.shutdown())) {
        log::error!(
            "Task {name} panicked in shutdown(): {}.",
            panic_message(&*p)
        );
    }
    // What `shutdown` changed too: the last checkpoint.
    if gate.states.is_dirty() {
        gate.due.get_or_insert_with(Instant::now);
    }
    gate.checkpoint_if_due(true, transport);
}

/// Counts the state changes left undone since the last flush (only with
/// at-most-once updates, and only when there were any).
fn flush_skipped(metrics: &Metrics, states: &crate::state::WorkerStates) {
    let n = states.take_skipped();
    if n > 0 {
        metrics.incr(names::STATE_UPDATES_SKIPPED, n);
    }
}

/// Calls the task's `flush_metrics`; a panic there is logged, and the
/// worker goes on (it must not take the worker's thread down).
fn flush_task_metrics(task: &mut dyn Task, name: &str) {
    if let Err(p) = catch_unwind(AssertUnwindSafe(|| task.flush_metrics())) {
        log::error!(
            "Task {name} panicked in flush_metrics(): {}.",
            panic_message(&*p)
        );
    }
}

/// The size of a run: what fits in [`CLAIM_SPAN`] at `pace` nanoseconds a
/// message.
fn claim_for(pace: u64) -> usize {
    let fits = (CLAIM_SPAN.as_nanos() as u64)
        .checked_div(pace)
        .unwrap_or(MAX_CLAIM as u64);
    fits.clamp(1, MAX_CLAIM as u64) as usize
}

/// How long task threads may take to stop once their transport has closed;
/// a thread still in a task call after that is left behind (see
/// [`join_within`]).
pub(crate) const THREAD_STOP_WAIT: Duration = Duration::from_secs(1);

/// Joins the task threads that end within `wait`, and returns those that
/// do not (each still in a task call: they are left behind, so that a
/// stuck call cannot hold the process) and how many panicked outside a
/// task call.
pub(crate) fn join_within<T>(
    threads: Vec<(std::thread::JoinHandle<()>, T)>,
    wait: Duration,
) -> (Vec<(std::thread::JoinHandle<()>, T)>, usize) {
    let give_up = Instant::now() + wait;
    while threads.iter().any(|(t, _)| !t.is_finished()) && Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(5));
    }
    let (done, stuck): (Vec<_>, Vec<_>) = threads.into_iter().partition(|(t, _)| t.is_finished());
    let panicked = done
        .into_iter()
        .map(|(t, _)| t.join())
        .filter(Result::is_err)
        .count();
    (stuck, panicked)
}

/// A batch that takes longer than this sends its results so far early.
const PARTIAL_RESULTS_AFTER: Duration = Duration::from_millis(5);

/// Decides when a batch has run long enough to send partial results,
/// reading the clock rarely for fast tasks (a clock read per message would
/// cost more than a fast task) and before every message for slow ones.
struct PartialClock {
    since: Instant,
    handled: u32,
    next_check: u32,
}

impl PartialClock {
    fn new(now: Instant) -> Self {
        PartialClock {
            since: now,
            handled: 0,
            next_check: 1,
        }
    }

    /// Called before each message after the first: whether to send now.
    fn due(&mut self) -> bool {
        self.handled += 1;
        if self.handled < self.next_check {
            return false;
        }
        let elapsed = self.since.elapsed();
        if elapsed >= PARTIAL_RESULTS_AFTER {
            return true;
        }
        // Check again after about a quarter of the time left, at the
        // pace seen so far.
        let per_msg = elapsed.as_nanos() as u64 / u64::from(self.handled);
        let left = (PARTIAL_RESULTS_AFTER - elapsed).as_nanos() as u64;
        let step = (left / 4).checked_div(per_msg).unwrap_or(256).clamp(1, 256);
        self.next_check = self.handled + step as u32;
        false
    }

    /// Partial results went out.
    fn sent(&mut self) {
        *self = PartialClock::new(Instant::now());
    }
}

/// How many fetch requests a worker keeps outstanding: one being handled
/// while the next is filled.
pub(crate) const PREFETCH: usize = 2;
