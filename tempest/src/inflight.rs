//! The inflight table: every source message between poll and ack.
//!
//! Records live in slab slots addressed by `(slot, generation)`. A task
//! message carries a [`Ticket`] naming its record, attempt generation and
//! task; a result whose ticket is stale (its message was retried, failed or
//! timed out since) is ignored, so nothing completes twice.
//!
//! Per record and task the table keeps the parent edges still open and the
//! task messages still outstanding, in one flat array indexed by
//! `slot * tasks + task`; outputs headed for a fan-in task wait in a flat
//! array of buffers until its last parent completes. Each result costs
//! O(outputs + children); nothing scans the table.
//!
//! Deadlines form an intrusive list through the slots, ordered by deadline
//! because every attempt gets the same timeout: the sweeper pops expired
//! records from its head, completion unlinks in O(1).

use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tempest_source::{FailReason, Headers, MsgId, SourceMsg};

use crate::envelope;
use crate::grouping::Grouping;
use crate::msg::{Emitted, Meta, MsgCtx, Origin, TaskIdx, TaskMsg, Ticket, NO_TASK};
use crate::pipeline::Dag;
use crate::policy::FailurePolicy;

const NIL: u32 = u32::MAX;

/// Where the table sends task messages that are ready to run.
pub(crate) trait Dispatch {
    /// Queues `msg` for `task`, come over an edge that groups by
    /// `grouping`; for [`Grouping::All`], as [`copies`](Self::copies) copies.
    fn dispatch(&mut self, task: TaskIdx, grouping: Grouping, msg: TaskMsg);

    /// How many copies of a message for `task` an `all` edge makes (each
    /// counts toward completion).
    fn copies(&self, _task: TaskIdx) -> u32 {
        1
    }
}

impl Dispatch for Vec<TaskMsg> {
    fn dispatch(&mut self, _task: TaskIdx, _grouping: Grouping, msg: TaskMsg) {
        self.push(msg);
    }
}

/// How many task messages one message for `task` over `grouping` is.
fn copies_of(d: &impl Dispatch, task: TaskIdx, grouping: Grouping) -> u32 {
    if grouping == Grouping::All {
        d.copies(task).max(1)
    } else {
        1
    }
}

/// The final outcome of a source message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Every task handled it (or the policy is `BestEffort`); acked at the
    /// source.
    Acked,
    /// A task failed it and the policy gave up; not acked.
    Failed,
    /// It did not complete within `msg_timeout` and the policy gave up; not
    /// acked.
    TimedOut,
}

/// A source message leaving the table.
#[derive(Debug)]
pub(crate) struct Finished {
    pub id: MsgId,
    /// A tick's output (no source message: nothing to ack).
    pub tick: bool,
    pub outcome: Outcome,
    pub attempts: u32,
    pub errors: u32,
    pub timeouts: u32,
    pub reason: Option<FailReason>,
    pub latency: Duration,
}

/// Timeouts, the failure policy and retry backoff.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackerConfig {
    /// What happens to a failed or timed-out message.
    pub policy: FailurePolicy,
    /// How long an attempt may take; `None` for no limit.
    pub msg_timeout: Option<Duration>,
    /// The wait before the first retry; doubled for each further one.
    pub retry_backoff: Duration,
    /// The longest wait before a retry.
    pub max_retry_backoff: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Free,
    Running,
    Backoff,
}

#[derive(Debug)]
struct Record {
    /// The source message's id (`Int(0)` while the slot is free: an
    /// `Option` would take 8 bytes more).
    id: MsgId,
    /// The source message's payload, kept for a retry (under another
    /// policy the root's task message takes it).
    payload: Bytes,
    /// The attempt, the source message's timestamp and delivery count,
    /// and the attempt's deadline as contexts carry it.
    origin: Origin,
    /// The source message's key and headers, which the root's task
    /// message starts with.
    meta: Meta,
    gen: u32,
    errors: u32,
    timeouts: u32,
    tasks_left: u16,
    phase: Phase,
    prev: u32,
    next: u32,
    /// Nanoseconds since the table's epoch.
    born: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct TaskState {
    parents_left: u16,
    done: bool,
    outstanding: u32,
}

/// What one entry of the table looks like from outside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InflightEntry {
    /// The source message's id.
    pub id: MsgId,
    /// The current attempt, from 1.
    pub attempt: u32,
    /// Time since the message entered the table.
    pub age: Duration,
    /// Whether it is waiting to be retried.
    pub waiting_for_retry: bool,
    /// The tasks that have not completed it yet, with the task messages each
    /// still has outstanding.
    pub pending: Vec<(TaskIdx, u32)>,
}

/// The inflight table. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct Tracker {
    dag: Arc<Dag>,
    config: TrackerConfig,
    epoch: Instant,
    /// The last instant [`nanos`](Self::nanos) converted, and its result.
    last_now: Cell<(Instant, u64)>,
    /// Nanoseconds from the contexts' epoch (`msg::epoch`) to `epoch`
    /// (negative if `epoch` is earlier).
    epoch_offset: i64,
    records: Vec<Record>,
    /// Per slot, `gen * 2 + 1` while the record's attempt runs, else 0: a
    /// copy of what [`is_live`](Self::is_live) reads from the records,
    /// dense so that checking a batch of tickets stays in cache (a
    /// record is a few cache lines away from the next).
    running: Vec<u64>,
    states: Vec<TaskState>,
    /// Per record and fan-in task: the outputs its parents emitted so
    /// far, each with the parent.
    held: Vec<Vec<(TaskIdx, Emitted)>>,
    free: Vec<u32>,
    head: u32,
    tail: u32,
    retries: BinaryHeap<Reverse<(u64, u32, u32)>>,
    live: usize,
    high_water: usize,
    retried: u64,
    /// Attempts that ended while task messages of theirs may have been
    /// queued or running (failed, timed out, retried), so far.
    ended_early: u64,
    stack: Vec<TaskIdx>,
    /// Per slot, the task whose tick emitted the record ([`NO_TASK`]: a
    /// source message, which starts at the root) (dense and
    /// apart from the records, which it would grow past two cache lines).
    start: Vec<TaskIdx>,
    /// Tick outputs taken in so far (they are named by this number).
    ticks: u64,
    /// Per task, whether each other task is downstream of it (row-major
    /// `n * n`), for starting a tick's output part-way down the DAG.
    downstream: Vec<bool>,
    /// Attempts timed out since the last [`take_timeouts`](Self::take_timeouts),
    /// per task they were waiting for (the first with messages
    /// outstanding), with the id of the first.
    timed_out: Vec<(u64, Option<MsgId>)>,
    /// With at-most-once updates: which source messages are marked as
    /// maybe handled before (`Some(true)`: all, from a source that does not
    /// count deliveries; `Some(false)`: those delivered more than once).
    mark_seen: Option<bool>,
}

impl Tracker {
    /// A table for up to `capacity` messages in flight (it grows past
    /// that if need be). Reserving up front spares the copies of growing:
    /// untouched reserved memory costs no resident memory.
    pub fn new(dag: Arc<Dag>, config: TrackerConfig, epoch: Instant, capacity: usize) -> Self {
        let capacity = capacity.min(1 << 22);
        Tracker {
            timed_out: vec![(0, None); dag.len()],
            downstream: downstream_of(&dag),
            records: Vec::with_capacity(capacity),
            running: Vec::with_capacity(capacity),
            states: Vec::with_capacity(capacity * dag.len()),
            held: Vec::with_capacity(capacity * dag.fanin_count()),
            dag,
            config,
            epoch,
            last_now: Cell::new((epoch, 0)),
            epoch_offset: {
                let base = crate::msg::epoch();
                if epoch >= base {
                    (epoch - base).as_nanos() as i64
                } else {
                    -((base - epoch).as_nanos() as i64)
                }
            },
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            retries: BinaryHeap::new(),
            live: 0,
            high_water: 0,
            retried: 0,
            ended_early: 0,
            stack: Vec::new(),
            start: Vec::with_capacity(capacity),
            ticks: 0,
            mark_seen: None,
        }
    }

    /// With at-most-once updates: marks source messages that may have
    /// been handled before (delivered more than once; every one, if the
    /// source does not count deliveries), so that workers look up only
    /// their updates.
    pub fn mark_redeliveries(&mut self, source_counts_deliveries: bool) {
        self.mark_seen = Some(!source_counts_deliveries);
    }

    /// Messages in the table (running or waiting for a retry).
    pub fn len(&self) -> usize {
        self.live
    }

    /// The most messages that were ever in the table at once.
    pub fn high_water(&self) -> usize {
        self.high_water
    }

    /// How many retries have started.
    pub fn retried(&self) -> u64 {
        self.retried
    }

    /// How many attempts have ended early: failed, timed out or retried,
    /// perhaps with task messages of theirs queued or running. A task
    /// message dispatched when the count was `n` is live (see
    /// [`is_live`](Self::is_live)) while the count is still `n`.
    pub fn ended_early(&self) -> u64 {
        self.ended_early
    }

    /// The failure policy.
    pub fn policy(&self) -> FailurePolicy {
        self.config.policy
    }

    /// The DAG the table tracks, shared.
    pub fn shared_dag(&self) -> Arc<Dag> {
        Arc::clone(&self.dag)
    }

    /// The DAG the table tracks.
    pub fn dag(&self) -> &Dag {
        &self.dag
    }

    /// `t` in nanoseconds since the table's epoch. The callers pass the
    /// same `now` for a whole batch, so the last conversion is kept:
    /// converting an `Instant` costs a hundred instructions.
    fn nanos(&self, t: Instant) -> u64 {
        let (last, ns) = self.last_now.get();
        if last == t {
            return ns;
        }
        let ns = t.saturating_duration_since(self.epoch).as_nanos() as u64;
        self.last_now.set((t, ns));
        ns
    }

    /// Per task, the attempts that timed out waiting for it since the last
    /// call, with the id of the first.
    pub fn take_timeouts(&mut self) -> Vec<(u64, Option<MsgId>)> {
        let fresh = vec![(0, None); self.timed_out.len()];
        std::mem::replace(&mut self.timed_out, fresh)
    }

    /// Whether a result for `ticket` would be accepted. Like every method
    /// of the table, it reads the ticket's slot, generation and task, never
    /// its `copy` (which only tells a remote worker's deliveries apart).
    pub fn is_live(&self, ticket: Ticket) -> bool {
        (ticket.task as usize) < self.dag.len()
            && self.running.get(ticket.slot as usize).copied()
                == Some(u64::from(ticket.gen) * 2 + 1)
    }

    /// Whether `ticket` is live and its task still has messages of it
    /// outstanding (a verdict for it would count).
    fn awaits(&self, ticket: Ticket) -> bool {
        self.is_live(ticket)
            && self.states[ticket.slot as usize * self.dag.len() + ticket.task as usize].outstanding
                > 0
    }

    /// The ids of the source messages in the table.
    pub fn live_ids(&self) -> impl Iterator<Item = &MsgId> + '_ {
        self.records
            .iter()
            .filter(|r| r.phase != Phase::Free)
            .map(|r| &r.id)
    }

    /// The id of the source message `ticket` belongs to, if the ticket is
    /// live.
    pub fn id_of(&self, ticket: Ticket) -> Option<&MsgId> {
        if !self.is_live(ticket) {
            return None;
        }
        self.records.get(ticket.slot as usize).map(|r| &r.id)
    }

    /// Adds a source message and dispatches it to the root task.
    ///
    /// The message's fields are taken, leaving an empty shell: reading
    /// them where the source's batch holds them spares copying a whole
    /// message through the stack.
    pub fn insert(&mut self, msg: &mut SourceMsg, now: Instant, d: &mut impl Dispatch) {
        let slot = self.alloc(NO_TASK, now);
        let r = &mut self.records[slot as usize];
        r.meta = Meta::new(msg.key.take(), std::mem::take(&mut msg.headers));
        if self.mark_seen.is_some_and(|all| all || msg.delivered > 1) {
            r.meta = std::mem::take(&mut r.meta).with_seen();
        }
        r.id = std::mem::replace(&mut msg.id, MsgId::Int(0));
        r.payload = std::mem::take(&mut msg.payload);
        // 0 stands for a tick's output.
        r.origin.delivered = msg.delivered.max(1);
        r.origin.timestamp = msg.timestamp;
        self.start_attempt(slot, now, d);
    }

    /// Adds one output of a tick of task `from`: a new root, tracked
    /// through `from`'s descendants as a source message is through the
    /// whole DAG (timeouts, the failure policy, retries), with nothing to
    /// ack at its end. Named `tick:<task>:<n>`; its context has attempt
    /// 1, delivered 0 and the time of the tick.
    pub fn insert_tick(
        &mut self,
        from: TaskIdx,
        out: Emitted,
        now: Instant,
        d: &mut impl Dispatch,
    ) {
        if from as usize >= self.dag.len() || self.dag.children(from).is_empty() {
            return;
        }
        self.ticks += 1;
        let id = MsgId::Bytes(Bytes::from(format!(
            "tick:{}:{}",
            self.dag.name(from),
            self.ticks
        )));
        let slot = self.alloc(from, now);
        let r = &mut self.records[slot as usize];
        r.id = id;
        r.payload = out.payload;
        r.meta = out.meta;
        r.origin.delivered = 0;
        r.origin.timestamp = tempest_source::now_millis();
        self.start_attempt(slot, now, d);
    }

    /// A free slot (a new one if none is), counted live, for a record
    /// from a tick of task `start` ([`NO_TASK`]: from the source).
    fn alloc(&mut self, start: TaskIdx, now: Instant) -> u32 {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                let s = self.records.len() as u32;
                self.records.push(Record {
                    id: MsgId::Int(0),
                    payload: Bytes::new(),
                    origin: Origin {
                        attempt: 0,
                        delivered: 0,
                        timestamp: 0,
                        deadline: 0,
                    },
                    meta: Meta::default(),
                    gen: 0,
                    errors: 0,
                    timeouts: 0,
                    tasks_left: 0,
                    phase: Phase::Free,
                    prev: NIL,
                    next: NIL,
                    born: 0,
                });
                self.running.push(0);
                self.start.push(0);
                self.states
                    .resize(self.states.len() + self.dag.len(), TaskState::default());
                self.held
                    .resize_with(self.held.len() + self.dag.fanin_count(), Vec::new);
                s
            }
        };
        let born = self.nanos(now);
        self.start[slot as usize] = start;
        let r = &mut self.records[slot as usize];
        r.origin.attempt = 1;
        r.origin.deadline = 0;
        r.errors = 0;
        r.timeouts = 0;
        r.born = born;
        self.live += 1;
        self.high_water = self.high_water.max(self.live);
        slot
    }

    fn start_attempt(&mut self, slot: u32, now: Instant, d: &mut impl Dispatch) {
        let n = self.dag.len();
        let base = slot as usize * n;
        for t in 0..n {
            self.states[base + t] = TaskState {
                parents_left: self.dag.parents(t as TaskIdx).len() as u16,
                done: false,
                outstanding: 0,
            };
        }
        let fc = self.dag.fanin_count();
        for h in &mut self.held[slot as usize * fc..(slot as usize + 1) * fc] {
            h.clear();
        }
        let root = self.dag.root();
        let start = self.start[slot as usize];
        let deadline = match self.config.msg_timeout {
            Some(t) => self
                .nanos(now)
                .saturating_add(t.as_nanos().min(u128::from(u64::MAX)) as u64),
            None => u64::MAX,
        };
        let ctx_deadline = self.ctx_deadline(deadline);
        let r = &mut self.records[slot as usize];
        r.phase = Phase::Running;
        self.running[slot as usize] = u64::from(r.gen) * 2 + 1;
        r.tasks_left = n as u16;
        // The sweeper reads the deadline as the context carries it.
        r.origin.deadline = ctx_deadline;
        let gen = r.gen;
        if self.config.msg_timeout.is_some() {
            self.link_tail(slot);
        }
        if start != NO_TASK {
            self.start_tick_attempt(slot, start, now, d);
            return;
        }
        self.states[base + root as usize].outstanding = 1;
        let r = &mut self.records[slot as usize];
        let ctx = ctx_of(r, &self.dag, NO_TASK, r.meta.clone());
        // Only a retry needs the payload again; otherwise the root takes it.
        let payload = match self.config.policy {
            FailurePolicy::Retry(_) => r.payload.clone(),
            _ => std::mem::take(&mut r.payload),
        };
        d.dispatch(
            root,
            Grouping::Shuffle,
            TaskMsg {
                ticket: Ticket::new(slot, gen, root),
                payload,
                ctx,
            },
        );
    }

    /// Starts an attempt of a tick's output from task `from`: every task
    /// that is not downstream of `from` counts as done (without running),
    /// then `from` completes with the output, as if it had just emitted it.
    fn start_tick_attempt(
        &mut self,
        slot: u32,
        from: TaskIdx,
        now: Instant,
        d: &mut impl Dispatch,
    ) {
        let n = self.dag.len();
        let base = slot as usize * n;
        let row = &self.downstream[from as usize * n..(from as usize + 1) * n];
        let r = &mut self.records[slot as usize];
        for (t, &below) in row.iter().enumerate() {
            if t == from as usize || below {
                continue;
            }
            // Not downstream: done. A downstream child keeps a parent that
            // is (or is `from`), so it cannot become ready here.
            self.states[base + t].done = true;
            r.tasks_left -= 1;
            for &c in self.dag.children(t as TaskIdx) {
                self.states[base + c as usize].parents_left -= 1;
            }
        }
        let st = &mut self.states[base + from as usize];
        st.parents_left = 0;
        st.outstanding = 1;
        let mut out = [Emitted::with_meta(
            match self.config.policy {
                FailurePolicy::Retry(_) => r.payload.clone(),
                _ => std::mem::take(&mut r.payload),
            },
            r.meta.clone(),
        )];
        let ticket = Ticket::new(slot, r.gen, from);
        // Finished records go nowhere: a tick's output never completes
        // inside this call (`from` has children, each still to run).
        let mut fin = Vec::new();
        self.on_done(ticket, &mut out, now, d, &mut fin);
        debug_assert!(fin.is_empty());
    }

    /// A record's deadline (nanoseconds after the table's epoch, `u64::MAX`
    /// for none) as a context carries it.
    fn ctx_deadline(&self, deadline: u64) -> u64 {
        if deadline == u64::MAX {
            0
        } else {
            (i128::from(self.epoch_offset) + i128::from(deadline))
                .clamp(0, i128::from(u64::MAX - 1)) as u64
                + 1
        }
    }

    /// A task handled a message and emitted `outputs`. Returns false for a
    /// stale ticket (ignored).
    ///
    /// The outputs are taken: the last child they go to gets them moved,
    /// the others get clones, so a linear pipeline hands each payload on
    /// without touching its reference count (a shared count is a cache
    /// line every thread that holds the payload writes to).
    pub fn on_done(
        &mut self,
        ticket: Ticket,
        outputs: &mut [Emitted],
        now: Instant,
        d: &mut impl Dispatch,
        fin: &mut Vec<Finished>,
    ) -> bool {
        if !self.is_live(ticket) {
            return false;
        }
        let Ticket {
            slot, gen, task, ..
        } = ticket;
        let n = self.dag.len();
        let base = slot as usize * n;
        if self.states[base + task as usize].outstanding == 0 {
            // More results than messages for this task: a duplicate.
            return false;
        }
        if !outputs.is_empty() {
            let Tracker {
                dag,
                records,
                states,
                held,
                ..
            } = self;
            let fc = dag.fanin_count();
            let children = dag.children(task);
            let groupings = dag.child_groupings(task);
            // Every output's context but its key and headers.
            let template = ctx_of(&records[slot as usize], dag, task, Meta::default());
            for (i, &c) in children.iter().enumerate() {
                let grouping = groupings.get(i).copied().unwrap_or_default();
                let last = i + 1 == children.len();
                let take = |o: &mut Emitted| {
                    if last {
                        std::mem::take(o)
                    } else {
                        o.clone()
                    }
                };
                match dag.fanin_slot(c) {
                    Some(f) => held[slot as usize * fc + f as usize]
                        .extend(outputs.iter_mut().map(|o| (task, take(o)))),
                    None => {
                        states[base + c as usize].outstanding +=
                            outputs.len() as u32 * copies_of(d, c, grouping);
                        for o in outputs.iter_mut() {
                            let Emitted { payload, meta } = take(o);
                            d.dispatch(
                                c,
                                grouping,
                                TaskMsg {
                                    ticket: Ticket::new(slot, gen, c),
                                    payload,
                                    ctx: MsgCtx {
                                        meta,
                                        ..template.clone()
                                    },
                                },
                            );
                        }
                    }
                }
            }
        }
        let st = &mut self.states[base + task as usize];
        st.outstanding -= 1;
        if st.outstanding == 0 && st.parents_left == 0 {
            self.complete_task(slot, task, now, d, fin);
        }
        true
    }

    /// A task failed a message (an error, a panic, a lost worker). Returns
    /// false for a stale ticket (ignored).
    pub fn on_error(
        &mut self,
        ticket: Ticket,
        reason: FailReason,
        now: Instant,
        d: &mut impl Dispatch,
        fin: &mut Vec<Finished>,
    ) -> bool {
        if !self.awaits(ticket) {
            return false;
        }
        self.records[ticket.slot as usize].errors += 1;
        if self.config.policy == FailurePolicy::BestEffort {
            return self.on_done(ticket, &mut [], now, d, fin);
        }
        self.fail_attempt(ticket.slot, reason, Outcome::Failed, now, fin);
        true
    }

    /// An async task's call for `ticket` passed the message's deadline and
    /// was cancelled: the attempt times out as the sweeper would time it
    /// out, counted as a timeout of that task (`BestEffort` moves on
    /// without the task's outputs, as for an error). Returns false for a
    /// stale ticket (the sweeper timed the attempt out first, say).
    pub fn on_timeout(
        &mut self,
        ticket: Ticket,
        now: Instant,
        d: &mut impl Dispatch,
        fin: &mut Vec<Finished>,
    ) -> bool {
        if !self.awaits(ticket) {
            return false;
        }
        let slot = ticket.slot;
        let (count, first) = &mut self.timed_out[ticket.task as usize];
        *count += 1;
        if first.is_none() {
            *first = Some(self.records[slot as usize].id.clone());
        }
        self.records[slot as usize].timeouts += 1;
        if self.config.policy == FailurePolicy::BestEffort {
            return self.on_done(ticket, &mut [], now, d, fin);
        }
        self.fail_attempt(slot, FailReason::Timeout, Outcome::TimedOut, now, fin);
        true
    }

    fn complete_task(
        &mut self,
        slot: u32,
        task: TaskIdx,
        now: Instant,
        d: &mut impl Dispatch,
        fin: &mut Vec<Finished>,
    ) {
        // The fields one by one: borrowing the DAG apart from the rest
        // spares cloning its `Arc` per result (an atomic increment and
        // decrement on a cache line every worker thread reads).
        let Tracker {
            dag,
            records,
            states,
            held,
            stack,
            ..
        } = self;
        let n = dag.len();
        let base = slot as usize * n;
        let fc = dag.fanin_count();
        let r = &mut records[slot as usize];
        let gen = r.gen;
        stack.push(task);
        while let Some(t) = stack.pop() {
            states[base + t as usize].done = true;
            r.tasks_left -= 1;
            for &c in dag.children(t) {
                let st = &mut states[base + c as usize];
                st.parents_left -= 1;
                if st.parents_left > 0 {
                    continue;
                }
                if let Some(f) = dag.fanin_slot(c) {
                    let held = &mut held[slot as usize * fc + f as usize];
                    if dag.is_join(c) {
                        if !held.is_empty() {
                            let msg = join_msg(dag, r, slot, c, held);
                            let grouping = dag.grouping_into(NO_TASK, c);
                            states[base + c as usize].outstanding = copies_of(d, c, grouping);
                            d.dispatch(c, grouping, msg);
                        }
                        held.clear();
                    } else {
                        // The buffer stays for the slot's next message.
                        for (parent, out) in held.drain(..) {
                            let grouping = dag.grouping(parent, c);
                            states[base + c as usize].outstanding += copies_of(d, c, grouping);
                            d.dispatch(
                                c,
                                grouping,
                                TaskMsg {
                                    ticket: Ticket::new(slot, gen, c),
                                    payload: out.payload,
                                    ctx: ctx_of(r, dag, parent, out.meta),
                                },
                            );
                        }
                    }
                }
                if states[base + c as usize].outstanding == 0 {
                    stack.push(c);
                }
            }
        }
        if r.tasks_left == 0 {
            self.finish(slot, Outcome::Acked, None, now, fin);
        }
    }

    fn fail_attempt(
        &mut self,
        slot: u32,
        reason: FailReason,
        outcome: Outcome,
        now: Instant,
        fin: &mut Vec<Finished>,
    ) {
        self.ended_early += 1;
        self.unlink(slot);
        let epoch = self.epoch;
        let r = &mut self.records[slot as usize];
        if let FailurePolicy::Retry(max) = self.config.policy {
            if r.origin.attempt <= max {
                r.gen = r.gen.wrapping_add(1);
                r.phase = Phase::Backoff;
                self.running[slot as usize] = 0;
                let shift = (r.origin.attempt - 1).min(20);
                let wait = self
                    .config
                    .retry_backoff
                    .saturating_mul(1 << shift)
                    .min(self.config.max_retry_backoff);
                let due = (now + wait).saturating_duration_since(epoch).as_nanos() as u64;
                self.retries.push(Reverse((due, slot, r.gen)));
                return;
            }
        }
        self.finish(slot, outcome, Some(reason), now, fin);
    }

    fn finish(
        &mut self,
        slot: u32,
        outcome: Outcome,
        reason: Option<FailReason>,
        now: Instant,
        fin: &mut Vec<Finished>,
    ) {
        self.unlink(slot);
        let now_ns = self.nanos(now);
        let r = &mut self.records[slot as usize];
        if r.phase == Phase::Free {
            return;
        }
        let id = std::mem::replace(&mut r.id, MsgId::Int(0));
        r.payload = Bytes::new();
        fin.push(Finished {
            id,
            tick: self.start[slot as usize] != NO_TASK,
            outcome,
            attempts: r.origin.attempt,
            errors: r.errors,
            timeouts: r.timeouts,
            reason,
            latency: Duration::from_nanos(now_ns.saturating_sub(r.born)),
        });
        r.gen = r.gen.wrapping_add(1);
        r.phase = Phase::Free;
        self.running[slot as usize] = 0;
        self.free.push(slot);
        self.live -= 1;
    }

    /// Times out expired attempts and starts retries that are due.
    pub fn sweep(&mut self, now: Instant, d: &mut impl Dispatch, fin: &mut Vec<Finished>) {
        let now_ns = self.nanos(now);
        // Deadlines as contexts carry them (and as records keep them).
        let now_ctx = self.ctx_deadline(now_ns);
        while self.head != NIL && self.records[self.head as usize].origin.deadline <= now_ctx {
            let slot = self.head;
            let n = self.dag.len();
            let base = slot as usize * n;
            let waiting = (0..n)
                .find(|&t| self.states[base + t].outstanding > 0)
                .or_else(|| (0..n).find(|&t| !self.states[base + t].done))
                .unwrap_or(0);
            let (count, first) = &mut self.timed_out[waiting];
            *count += 1;
            if first.is_none() {
                *first = Some(self.records[slot as usize].id.clone());
            }
            let r = &mut self.records[slot as usize];
            r.timeouts += 1;
            if self.config.policy == FailurePolicy::BestEffort {
                self.ended_early += 1;
                self.finish(slot, Outcome::Acked, Some(FailReason::Timeout), now, fin);
            } else {
                self.fail_attempt(slot, FailReason::Timeout, Outcome::TimedOut, now, fin);
            }
        }
        while let Some(&Reverse((due, slot, gen))) = self.retries.peek() {
            if due > now_ns {
                break;
            }
            self.retries.pop();
            let r = &mut self.records[slot as usize];
            if r.gen != gen || r.phase != Phase::Backoff {
                continue;
            }
            r.origin.attempt += 1;
            self.retried += 1;
            self.start_attempt(slot, now, d);
        }
    }

    /// A copy of every entry, for inspection.
    pub fn entries(&self, now: Instant) -> Vec<InflightEntry> {
        let n = self.dag.len();
        let now_ns = self.nanos(now);
        self.records
            .iter()
            .enumerate()
            .filter_map(|(slot, r)| {
                if r.phase == Phase::Free {
                    return None;
                }
                let id = &r.id;
                let base = slot * n;
                let pending = (0..n)
                    .filter(|&t| r.phase == Phase::Running && !self.states[base + t].done)
                    .map(|t| (t as TaskIdx, self.states[base + t].outstanding))
                    .collect();
                Some(InflightEntry {
                    id: id.clone(),
                    attempt: r.origin.attempt,
                    age: Duration::from_nanos(now_ns.saturating_sub(r.born)),
                    waiting_for_retry: r.phase == Phase::Backoff,
                    pending,
                })
            })
            .collect()
    }

    fn link_tail(&mut self, slot: u32) {
        let r = &mut self.records[slot as usize];
        r.prev = self.tail;
        r.next = NIL;
        if self.tail == NIL {
            self.head = slot;
        } else {
            self.records[self.tail as usize].next = slot;
        }
        self.tail = slot;
    }

    fn unlink(&mut self, slot: u32) {
        let (prev, next) = {
            let r = &self.records[slot as usize];
            (r.prev, r.next)
        };
        let linked = prev != NIL || next != NIL || self.head == slot;
        if !linked {
            return;
        }
        if prev == NIL {
            self.head = next;
        } else {
            self.records[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.records[next as usize].prev = prev;
        }
        let r = &mut self.records[slot as usize];
        r.prev = NIL;
        r.next = NIL;
    }
}

/// The one message of join task `join` for the attempt in `slot`: an
/// envelope of every part its parents emitted (`held`, not empty),
/// grouped by parent in the DAG's parent order, each parent's in the
/// order they arrived. Its context has no parent; its key is the
/// parts' key if they all share one, its headers those every part
/// carries with the same value.
fn join_msg(
    dag: &Dag,
    r: &Record,
    slot: u32,
    join: TaskIdx,
    held: &mut [(TaskIdx, Emitted)],
) -> TaskMsg {
    let parents = dag.parents(join);
    let position = |p: TaskIdx| parents.iter().position(|&q| q == p).unwrap_or(0) as u16;
    // Stable: each parent's parts keep their order.
    held.sort_by_key(|(p, _)| position(*p));
    let payload = envelope::encode(
        held.iter()
            .map(|(p, o)| (position(*p), &o.payload, o.key(), o.headers())),
    );
    let common = common_meta(held.iter().map(|(_, o)| o));
    // Its parts' paths all lead to it; one join message per source message
    // needs none of them to be told apart.
    let path = if held.iter().any(|(_, o)| o.path() != 0) {
        crate::msg::output_path(
            0,
            crate::msg::path_seed(dag.name(join)),
            crate::msg::JOIN_INDEX,
        )
    } else {
        0
    };
    TaskMsg {
        ticket: Ticket::new(slot, r.gen, join),
        payload,
        ctx: ctx_of(
            r,
            dag,
            NO_TASK,
            common
                .meta
                .with_path_seen(path, held.iter().any(|(_, o)| o.seen())),
        ),
    }
}

/// The context of a message `parent` emitted for the attempt of record `r`
/// (`NO_TASK`: a join of several parents), with `meta` as its key and
/// headers.
/// Per task `f` (row) and task `t` (column): whether `t` is downstream of
/// `f` (reachable from it, `f` itself excluded).
fn downstream_of(dag: &Dag) -> Vec<bool> {
    let n = dag.len();
    let mut m = vec![false; n * n];
    for f in 0..n {
        let mut stack: Vec<TaskIdx> = dag.children(f as TaskIdx).to_vec();
        while let Some(t) = stack.pop() {
            if !std::mem::replace(&mut m[f * n + t as usize], true) {
                stack.extend_from_slice(dag.children(t));
            }
        }
    }
    m
}

fn ctx_of(r: &Record, dag: &Dag, parent: TaskIdx, meta: Meta) -> MsgCtx {
    MsgCtx {
        id: r.id.clone(),
        origin: r.origin,
        parent: dag.parent(parent),
        meta,
    }
}

/// The key and headers several outputs have in common (with an empty
/// payload): the key if every one carries the same, and the headers every
/// one carries with the same value, in the order of the first.
fn common_meta<'a>(mut outputs: impl Iterator<Item = &'a Emitted> + Clone) -> Emitted {
    let Some(first) = outputs.next() else {
        return Emitted::default();
    };
    let key = first
        .key()
        .cloned()
        .filter(|k| outputs.clone().all(|o| o.key() == Some(k)));
    let headers = if outputs.clone().all(|o| o.headers() == first.headers()) {
        first.headers().clone()
    } else {
        let mut h = Headers::new();
        for (name, value) in first.headers().iter() {
            if outputs
                .clone()
                .all(|o| o.headers().get(name) == Some(value))
            {
                // The names and values came from valid headers.
                let _ = h.insert(name, value.clone());
            }
        }
        h
    };
    Emitted::new(Bytes::new(), key, headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Pipeline;
    use crate::task::{Msg, Output, Task, TaskResult};
    use proptest::prelude::*;

    #[derive(Clone)]
    struct T(String);
    impl Task for T {
        fn name(&self) -> &str {
            &self.0
        }
        fn handle(&mut self, msg: Msg, _: &MsgCtx) -> TaskResult {
            Ok(Output::One(msg))
        }
    }

    fn dag(n: usize, edges: &[(usize, usize)]) -> Arc<Dag> {
        let mut p = Pipeline::new();
        for i in 0..n {
            p = p.task(T(format!("t{i}")));
        }
        for (a, b) in edges {
            p = p.edge(format!("t{a}"), format!("t{b}"));
        }
        Arc::new(p.build().unwrap())
    }

    fn config(policy: FailurePolicy) -> TrackerConfig {
        TrackerConfig {
            policy,
            msg_timeout: Some(Duration::from_secs(10)),
            retry_backoff: Duration::from_millis(100),
            max_retry_backoff: Duration::from_secs(1),
        }
    }

    fn msg(id: u64) -> SourceMsg {
        SourceMsg::new(id, "payload")
    }

    struct Harness {
        t: Tracker,
        queue: Vec<TaskMsg>,
        fin: Vec<Finished>,
        now: Instant,
    }

    impl Harness {
        fn new(dag: Arc<Dag>, policy: FailurePolicy) -> Self {
            let now = Instant::now();
            Harness {
                t: Tracker::new(dag, config(policy), now, 16),
                queue: Vec::new(),
                fin: Vec::new(),
                now,
            }
        }
        fn insert(&mut self, id: u64) {
            self.t.insert(&mut msg(id), self.now, &mut self.queue);
        }
        fn take(&mut self, task: TaskIdx) -> TaskMsg {
            let i = self
                .queue
                .iter()
                .position(|m| m.ticket.task == task)
                .unwrap();
            self.queue.remove(i)
        }
        fn done(&mut self, task: TaskIdx, outputs: usize) -> bool {
            let m = self.take(task);
            let mut outs = vec![Emitted::plain(m.payload.clone()); outputs];
            self.t.on_done(
                m.ticket,
                &mut outs,
                self.now,
                &mut self.queue,
                &mut self.fin,
            )
        }
        fn error(&mut self, task: TaskIdx) -> bool {
            let m = self.take(task);
            let reason = FailReason::TaskError {
                task: format!("t{task}"),
                message: "boom".into(),
            };
            self.t
                .on_error(m.ticket, reason, self.now, &mut self.queue, &mut self.fin)
        }
        fn advance(&mut self, by: Duration) {
            self.now += by;
            self.t.sweep(self.now, &mut self.queue, &mut self.fin);
        }
    }

    #[derive(Clone)]
    struct J;
    impl crate::join::JoinTask for J {
        fn name(&self) -> &str {
            "join"
        }
        fn handle(&mut self, _: crate::join::Joined, _: &MsgCtx) -> TaskResult {
            Ok(Output::None)
        }
    }

    /// t0 -> t1, t2 -> join (index 3).
    fn join_dag() -> Arc<Dag> {
        let p = Pipeline::new()
            .task(T("t0".into()))
            .task(T("t1".into()))
            .task(T("t2".into()))
            .join(J)
            .edge("t0", "t1")
            .edge("t0", "t2")
            .edge("t1", "join")
            .edge("t2", "join");
        Arc::new(p.build().unwrap())
    }

    fn out(payload: &'static str, key: Option<&'static str>, headers: &[(&str, &str)]) -> Emitted {
        let mut h = Headers::new();
        for (n, v) in headers {
            h.insert(*n, Bytes::copy_from_slice(v.as_bytes())).unwrap();
        }
        Emitted::new(
            Bytes::from_static(payload.as_bytes()),
            key.map(|k| Bytes::from_static(k.as_bytes())),
            h,
        )
    }

    impl Harness {
        fn done_with(&mut self, task: TaskIdx, outputs: &[Emitted]) -> bool {
            let m = self.take(task);
            self.t.on_done(
                m.ticket,
                &mut outputs.to_vec(),
                self.now,
                &mut self.queue,
                &mut self.fin,
            )
        }
        /// The parts of the one join message queued, as (parent position, payload).
        fn join_parts(&mut self) -> (MsgCtx, Vec<(u16, Bytes)>) {
            assert_eq!(self.queue.iter().filter(|m| m.ticket.task == 3).count(), 1);
            let m = self.queue.iter().find(|m| m.ticket.task == 3).unwrap();
            let parts = envelope::decode(m.payload.clone())
                .unwrap()
                .into_iter()
                .map(|p| (p.parent, p.payload))
                .collect();
            (m.ctx.clone(), parts)
        }
    }

    #[test]
    fn a_join_gets_one_message_with_every_part_grouped_by_parent() {
        let mut h = Harness::new(join_dag(), FailurePolicy::None);
        h.insert(1);
        h.done(0, 1);
        // t2 finishes first; the parts still come grouped in parent order.
        h.done_with(
            2,
            &[
                out("c", Some("k"), &[("a", "1"), ("b", "2")]),
                out("d", Some("k"), &[("b", "2")]),
            ],
        );
        assert!(!h.queue.iter().any(|m| m.ticket.task == 3));
        h.done_with(1, &[out("a", Some("k"), &[("b", "2"), ("a", "0")])]);
        let (ctx, parts) = h.join_parts();
        assert_eq!(
            parts,
            [
                (0, Bytes::from("a")),
                (1, Bytes::from("c")),
                (1, Bytes::from("d"))
            ]
        );
        assert_eq!(ctx.parent(), None);
        assert_eq!(ctx.parent.task, NO_TASK);
        assert_eq!(ctx.key_str(), Some("k"), "the common key");
        let headers: Vec<(&str, &Bytes)> = ctx.headers().iter().collect();
        assert_eq!(headers, [("b", &Bytes::from("2"))], "the common headers");
        assert!(h.fin.is_empty());
        assert!(h.done(3, 0));
        assert_eq!(h.fin.len(), 1);
        assert_eq!(h.fin[0].outcome, Outcome::Acked);
    }

    #[test]
    fn a_join_whose_parents_emitted_nothing_does_not_run() {
        let mut h = Harness::new(join_dag(), FailurePolicy::None);
        h.insert(1);
        h.done(0, 1);
        h.done(1, 0);
        h.done(2, 0);
        assert!(h.queue.is_empty(), "{:?}", h.queue);
        assert_eq!(h.fin.len(), 1);
        assert_eq!(h.fin[0].outcome, Outcome::Acked);

        // Parts with different keys: the join's message has none.
        h.insert(2);
        h.done(0, 1);
        h.done_with(1, &[out("a", Some("x"), &[])]);
        h.done_with(2, &[out("b", None, &[])]);
        let (ctx, parts) = h.join_parts();
        assert_eq!(parts.len(), 2);
        assert_eq!(ctx.key(), None);
        assert!(ctx.headers().is_empty());
    }

    #[test]
    fn a_join_after_a_retry_sees_only_the_new_attempts_parts() {
        let mut h = Harness::new(join_dag(), FailurePolicy::Retry(1));
        h.insert(1);
        h.done(0, 1);
        h.done_with(2, &[out("old", None, &[])]);
        h.error(1);
        h.advance(Duration::from_millis(100));
        assert_eq!(h.queue.len(), 1, "the retry's root message");
        h.done(0, 1);
        h.done_with(1, &[out("new1", None, &[])]);
        h.done_with(2, &[out("new2", None, &[])]);
        let (ctx, parts) = h.join_parts();
        assert_eq!(ctx.attempt(), 2);
        assert_eq!(parts, [(0, Bytes::from("new1")), (1, Bytes::from("new2"))]);
        h.done(3, 0);
        assert_eq!(h.fin.len(), 1);
        assert_eq!(h.fin[0].attempts, 2);
    }

    #[test]
    fn linear_completes_after_the_last_task() {
        let mut h = Harness::new(dag(3, &[(0, 1), (1, 2)]), FailurePolicy::None);
        h.insert(1);
        assert!(h.done(0, 1));
        assert!(h.done(1, 1));
        assert!(h.fin.is_empty());
        assert!(h.done(2, 1));
        assert_eq!(h.fin.len(), 1);
        assert_eq!(h.fin[0].outcome, Outcome::Acked);
        assert_eq!(h.t.len(), 0);
    }

    #[test]
    fn fan_out_sends_every_output_to_every_child() {
        let mut h = Harness::new(dag(3, &[(0, 1), (0, 2)]), FailurePolicy::None);
        h.insert(1);
        h.done(0, 2);
        assert_eq!(h.queue.iter().filter(|m| m.ticket.task == 1).count(), 2);
        assert_eq!(h.queue.iter().filter(|m| m.ticket.task == 2).count(), 2);
        for _ in 0..2 {
            h.done(1, 0);
        }
        h.done(2, 0);
        assert!(h.fin.is_empty());
        h.done(2, 0);
        assert_eq!(h.fin.len(), 1);
    }

    #[test]
    fn fan_in_waits_for_every_parent_and_gets_the_union() {
        let mut h = Harness::new(
            dag(4, &[(0, 1), (0, 2), (1, 3), (2, 3)]),
            FailurePolicy::None,
        );
        h.insert(1);
        h.done(0, 1);
        h.done(1, 2);
        assert!(
            !h.queue.iter().any(|m| m.ticket.task == 3),
            "the fan-in task waits for its other parent"
        );
        h.done(2, 3);
        assert_eq!(h.queue.iter().filter(|m| m.ticket.task == 3).count(), 5);
        for _ in 0..4 {
            h.done(3, 0);
        }
        assert!(h.fin.is_empty());
        h.done(3, 0);
        assert_eq!(h.fin.len(), 1);
    }

    #[test]
    fn a_tick_output_runs_only_downstream_of_its_task_and_is_not_acked() {
        // 0 -> 1 -> 3 and 0 -> 2 -> 3: a tick of 1 runs 3 alone; 3 is a
        // fan-in whose other parent (2) is not downstream of 1.
        let mut h = Harness::new(
            dag(4, &[(0, 1), (0, 2), (1, 3), (2, 3)]),
            FailurePolicy::Retry(1),
        );
        h.t.insert_tick(
            1,
            Emitted::plain(Bytes::from_static(b"flush")),
            h.now,
            &mut h.queue,
        );
        assert_eq!(h.queue.len(), 1);
        assert_eq!(h.queue[0].ticket.task, 3);
        assert_eq!(&h.queue[0].payload[..], b"flush");
        assert_eq!(h.queue[0].ctx.parent(), Some("t1"));
        assert_eq!(h.queue[0].ctx.delivered(), 0);
        assert_eq!(h.t.len(), 1);
        // A failure retries it from the tick's task, with its output.
        let m = h.take(3);
        assert!(h.t.on_error(
            m.ticket,
            FailReason::Timeout,
            h.now,
            &mut h.queue,
            &mut h.fin
        ));
        h.t.sweep(h.now + Duration::from_secs(2), &mut h.queue, &mut h.fin);
        assert_eq!(h.queue.len(), 1);
        assert_eq!(h.queue[0].ctx.attempt(), 2);
        assert!(h.done(3, 0));
        assert_eq!(h.fin.len(), 1);
        assert!(h.fin[0].tick);
        assert_eq!(h.fin[0].outcome, Outcome::Acked);
        assert_eq!(h.fin[0].id, MsgId::Bytes(Bytes::from_static(b"tick:t1:1")));
        assert_eq!(h.t.len(), 0);
        // A source message in the same slot is not a tick.
        h.insert(7);
        h.done(0, 1);
        h.done(1, 1);
        h.done(2, 1);
        h.done(3, 0);
        h.done(3, 0);
        assert!(!h.fin[1].tick);
        // A tick of a task without children is dropped.
        h.t.insert_tick(3, Emitted::default(), h.now, &mut h.queue);
        assert_eq!(h.t.len(), 0);
    }

    #[test]
    fn a_tick_of_the_root_runs_its_descendants() {
        let mut h = Harness::new(dag(2, &[(0, 1)]), FailurePolicy::None);
        h.t.insert_tick(0, Emitted::default(), h.now, &mut h.queue);
        assert_eq!(h.queue.len(), 1);
        assert!(h.done(1, 0));
        assert!(h.fin[0].tick);
    }

    #[test]
    fn a_dead_end_completes_descendants_without_another_live_parent() {
        // 0 -> 1 -> 2 and 0 -> 3 -> 2: when 1 emits nothing, 2 still waits for 3.
        let mut h = Harness::new(
            dag(4, &[(0, 1), (1, 2), (0, 3), (3, 2)]),
            FailurePolicy::None,
        );
        h.insert(1);
        h.done(0, 1);
        h.done(1, 0);
        assert!(h.fin.is_empty());
        h.done(3, 1);
        assert_eq!(h.queue.len(), 1, "2 runs with 3's output");
        h.done(2, 0);
        assert_eq!(h.fin.len(), 1);

        // A line where the root emits nothing completes at once.
        let mut h = Harness::new(dag(3, &[(0, 1), (1, 2)]), FailurePolicy::None);
        h.insert(2);
        h.done(0, 0);
        assert_eq!(h.fin.len(), 1);
        assert!(h.queue.is_empty());
    }

    #[test]
    fn errors_follow_the_policy() {
        let d = dag(2, &[(0, 1)]);
        let mut h = Harness::new(Arc::clone(&d), FailurePolicy::None);
        h.insert(1);
        h.done(0, 1);
        h.error(1);
        assert_eq!(h.fin[0].outcome, Outcome::Failed);
        assert_eq!(h.t.len(), 0);

        let mut h = Harness::new(Arc::clone(&d), FailurePolicy::BestEffort);
        h.insert(1);
        h.error(0);
        assert_eq!(h.fin[0].outcome, Outcome::Acked);
        assert_eq!(h.fin[0].errors, 1);

        let mut h = Harness::new(d, FailurePolicy::Retry(2));
        h.insert(1);
        h.error(0);
        assert!(h.queue.is_empty(), "the retry waits for its backoff");
        h.advance(Duration::from_millis(99));
        assert!(h.queue.is_empty());
        h.advance(Duration::from_millis(1));
        assert_eq!(h.queue.len(), 1);
        h.error(0);
        h.advance(Duration::from_millis(200));
        h.error(0);
        assert_eq!(h.fin.len(), 1);
        assert_eq!(h.fin[0].outcome, Outcome::Failed);
        assert_eq!(h.fin[0].attempts, 3);
    }

    #[test]
    fn stale_results_are_ignored_after_a_retry() {
        let mut h = Harness::new(dag(2, &[(0, 1)]), FailurePolicy::Retry(1));
        h.insert(1);
        h.done(0, 3);
        let stale = h.take(1);
        h.error(1);
        h.advance(Duration::from_millis(100));
        assert!(!h.t.is_live(stale.ticket));
        assert!(!h
            .t
            .on_done(stale.ticket, &mut [], h.now, &mut h.queue, &mut h.fin));
        // The queued sibling of the failed attempt is stale too.
        let sibling = h.queue.iter().find(|m| m.ticket.task == 1).unwrap().ticket;
        assert!(!h.t.is_live(sibling));
        h.queue.retain(|m| m.ticket.task == 0);
        h.done(0, 1);
        h.done(1, 0);
        assert_eq!(h.fin.len(), 1);
        assert_eq!(h.fin[0].outcome, Outcome::Acked);
        assert_eq!(h.fin[0].attempts, 2);
    }

    #[test]
    fn the_sweeper_times_out_messages_nobody_answers() {
        let mut h = Harness::new(dag(1, &[]), FailurePolicy::None);
        h.insert(1);
        h.advance(Duration::from_secs(5));
        h.insert(2);
        h.advance(Duration::from_secs(5));
        assert_eq!(h.fin.len(), 1);
        assert_eq!(h.fin[0].outcome, Outcome::TimedOut);
        assert_eq!(h.fin[0].id, MsgId::Int(1));
        assert_eq!(h.t.len(), 1);
        h.advance(Duration::from_secs(5));
        assert_eq!(h.fin.len(), 2);
        assert_eq!(h.t.head, NIL);
    }

    #[test]
    fn timeouts_under_best_effort_ack_and_under_retry_rerun() {
        let mut h = Harness::new(dag(1, &[]), FailurePolicy::BestEffort);
        h.insert(1);
        h.advance(Duration::from_secs(10));
        assert_eq!(h.fin[0].outcome, Outcome::Acked);
        assert_eq!(h.fin[0].timeouts, 1);

        let mut h = Harness::new(dag(1, &[]), FailurePolicy::Retry(1));
        h.insert(1);
        h.advance(Duration::from_secs(10));
        assert!(h.fin.is_empty());
        h.advance(Duration::from_millis(100));
        assert_eq!(h.queue.len(), 2, "the stale first attempt and the retry");
        h.advance(Duration::from_secs(10));
        assert_eq!(h.fin[0].outcome, Outcome::TimedOut);
        assert_eq!(h.fin[0].attempts, 2);
    }

    #[test]
    fn slots_are_reused_and_entries_inspectable() {
        let mut h = Harness::new(dag(2, &[(0, 1)]), FailurePolicy::None);
        h.insert(1);
        h.done(0, 1);
        let entries = h.t.entries(h.now);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].pending, vec![(1, 1)]);
        h.done(1, 0);
        h.insert(2);
        assert_eq!(h.t.records.len(), 1, "the freed slot is reused");
        assert_eq!(h.t.high_water(), 1);
    }

    #[test]
    fn record_size_stays_small() {
        // The per-message cost beyond the payload: the record plus one task
        // state per task (and a buffer per fan-in task).
        // The record is two cache lines.
        assert!(
            std::mem::size_of::<Record>() <= 128,
            "{}",
            std::mem::size_of::<Record>()
        );
        assert_eq!(std::mem::size_of::<TaskState>(), 8);
        // A task message moves through queues and channels by value: at
        // 128 bytes or less a move is inlined, above it a call to memcpy
        // (a 176-byte one cost the linear pipeline a fifth of its rate).
        assert!(
            std::mem::size_of::<TaskMsg>() <= 128,
            "{}",
            std::mem::size_of::<TaskMsg>()
        );
    }

    /// A random DAG over `n` tasks rooted at 0: forward edges only (so no
    /// cycle), and every task has a parent before it (so all are reachable).
    fn arb_dag() -> impl Strategy<Value = (usize, Vec<(usize, usize)>)> {
        (1usize..8).prop_flat_map(|n| {
            let pairs: Vec<(usize, usize)> = (0..n)
                .flat_map(|a| (a + 1..n).map(move |b| (a, b)))
                .collect();
            let len = pairs.len();
            (
                Just(n),
                Just(pairs),
                proptest::collection::vec(any::<bool>(), len),
                proptest::collection::vec(any::<prop::sample::Index>(), n),
            )
                .prop_map(|(n, pairs, keep, first)| {
                    let mut edges: Vec<(usize, usize)> = pairs
                        .iter()
                        .zip(keep)
                        .filter(|(_, k)| *k)
                        .map(|(e, _)| *e)
                        .collect();
                    for (b, pick) in first.iter().enumerate().skip(1) {
                        if !edges.iter().any(|&(_, to)| to == b) {
                            edges.push((pick.index(b), b));
                        }
                    }
                    (n, edges)
                })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Random DAGs, random output counts and random completion orders:
        /// each source message completes exactly once, never while one of
        /// its task messages is outstanding, after every task received one
        /// copy of each output of each of its parents; a fan-in task never
        /// runs before its ancestors are done.
        #[test]
        fn random_dags_complete_exactly_once_and_never_early(
            (n, edges) in arb_dag(),
            messages in 1u64..5,
            choices in proptest::collection::vec((any::<prop::sample::Index>(), 0usize..3), 1..400),
        ) {
            let d = dag(n, &edges);
            let mut h = Harness::new(Arc::clone(&d), FailurePolicy::None);
            let mut runs = vec![vec![0usize; n]; messages as usize];
            let mut emitted = vec![vec![0usize; n]; messages as usize];
            let mut slot_of = std::collections::HashMap::new();
            for id in 0..messages {
                h.insert(id);
                slot_of.insert(h.queue.last().unwrap().ticket.slot, id as usize);
            }
            let ancestors = |t: usize| {
                let mut seen = vec![false; n];
                let mut stack = vec![t];
                while let Some(x) = stack.pop() {
                    for &p in d.parents(x as TaskIdx) {
                        if !seen[p as usize] { seen[p as usize] = true; stack.push(p as usize); }
                    }
                }
                seen
            };
            let mut step = 0;
            while !h.queue.is_empty() {
                let (pick, outs) = choices[step % choices.len()];
                step += 1;
                let m = h.queue.remove(pick.index(h.queue.len()));
                let id = slot_of[&m.ticket.slot];
                let t = m.ticket.task as usize;
                if d.parents(t as TaskIdx).len() > 1 {
                    let anc = ancestors(t);
                    prop_assert!(!h.queue.iter().any(|q| q.ticket.slot == m.ticket.slot && anc[q.ticket.task as usize]),
                        "fan-in task {} ran before its ancestors were done", t);
                }
                runs[id][t] += 1;
                emitted[id][t] += outs;
                let before = h.fin.len();
                let mut outputs = vec![Emitted::plain(m.payload.clone()); outs];
                prop_assert!(h.t.on_done(m.ticket, &mut outputs, h.now, &mut h.queue, &mut h.fin));
                if h.fin.len() > before {
                    prop_assert_eq!(h.fin.len(), before + 1);
                    prop_assert!(!h.queue.iter().any(|q| q.ticket.slot == m.ticket.slot),
                        "completed with task messages outstanding");
                    prop_assert_eq!(runs[id][0], 1);
                    for (c, &ran) in runs[id].iter().enumerate().skip(1) {
                        let expected: usize = d.parents(c as TaskIdx).iter().map(|&p| emitted[id][p as usize]).sum();
                        prop_assert_eq!(ran, expected, "task {} of message {}", c, id);
                    }
                }
            }
            prop_assert_eq!(h.fin.len(), messages as usize);
            let mut ids: Vec<_> = h.fin.iter().map(|f| f.id.clone()).collect();
            ids.sort();
            ids.dedup();
            prop_assert_eq!(ids.len(), messages as usize);
            prop_assert!(h.fin.iter().all(|f| f.outcome == Outcome::Acked));
            prop_assert_eq!(h.t.len(), 0);
        }
    }
}
