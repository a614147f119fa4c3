//! The source actor: polls the source on a thread of its own and acks.
//!
//! It polls only while it has credit: `max_pending` minus the deliveries
//! the runtime holds — in flight, or completed with their ack not yet sent
//! to the source. Credit for a completed message returns only once its ack
//! has been sent, so the source never has more than `max_pending`
//! delivered, unacked messages out (messages given up on are handed back
//! through `fail` and return their credit at once). When the credit runs
//! out polling pauses until a [`Settle`] or an ack flush returns some; a
//! pause longer than [`PAUSE_WARN_AFTER`] is logged. After an empty poll it waits `poll_interval`, doubling up to
//! `max_backoff`; after a retryable error likewise, reconnecting first.
//! Until the source has connected once, `connect` is retried only until
//! `source_connect_timeout` has passed; then the topology stops with the
//! source's error (an unreachable source at start is more often a wrong
//! address than an outage).
//! It also runs at most [`BATCHES_AHEAD`] batches ahead of the pipeline, so
//! polled messages never pile up in the pipeline's mailbox.

use std::time::{Duration, Instant};

use actix::prelude::*;
use tempest_source::metrics::Histogram;
use tempest_source::{AckPolicy, Metrics, MsgId, SourceMsg, SourceSettings};

use super::{Settle, SourceBatch, Stop, StopReason};
use crate::metrics::names;
use crate::topology::DynSource;

/// The most polled batches the pipeline may not have taken in yet.
pub(crate) const BATCHES_AHEAD: usize = 4;

/// Polling paused on `max_pending` this long is logged (and again every
/// [`PAUSE_WARN_EVERY`] while it lasts).
pub(crate) const PAUSE_WARN_AFTER: Duration = Duration::from_secs(5);
const PAUSE_WARN_EVERY: Duration = Duration::from_secs(30);

pub(crate) struct SourceActor {
    source: Box<dyn DynSource>,
    settings: SourceSettings,
    pipeline: Recipient<SourceBatch>,
    topology: Recipient<Stop>,
    max_pending: usize,
    credit: usize,
    /// Credit that returns once every id now in `acks` is sent (deliveries
    /// settled by those acks beyond one per id).
    ack_extra: usize,
    /// Send a partial ack batch once it holds this many ids, so unsent
    /// acks never hold more than a quarter of `max_pending`'s credit.
    ack_threshold: usize,
    /// Since when polling has waited for credit, and when that was last
    /// logged.
    paused_since: Option<Instant>,
    pause_warned: Option<Instant>,
    batches_ahead: usize,
    polling: bool,
    poll_scheduled: bool,
    connected: bool,
    /// Until the first connection: when to give up connecting.
    give_up_at: Option<Instant>,
    started: Instant,
    backoff: Duration,
    overflow: Vec<SourceMsg>,
    acks: Vec<MsgId>,
    /// The number of the last settle taken in, and of the last whose acks
    /// had all been handed to the source (see `SourceBatch::acked_through`).
    last_settle: u64,
    acked_through: u64,
    metrics: Metrics,
    poll_us: Histogram,
    poll_size: Histogram,
    finished: bool,
    empty_polls: u64,
    polls: u64,
    ack_failures: u64,
    next_ack_flush: Instant,
    next_monitor: Instant,
    next_metrics: Instant,
    /// With at-most-once state updates: the backend whose records of a
    /// source message are dropped once the source has acked it.
    forget: Option<std::sync::Arc<dyn crate::state::StateBackend>>,
    forget_failures: u64,
}

impl SourceActor {
    pub fn new(
        source: Box<dyn DynSource>,
        max_pending: usize,
        pipeline: Recipient<SourceBatch>,
        topology: Recipient<Stop>,
        metrics: Metrics,
        connect_timeout: Option<Duration>,
    ) -> Self {
        let mut settings = source.settings();
        settings.poll_count = settings.poll_count.max(1);
        settings.max_backoff = settings.max_backoff.max(settings.poll_interval);
        if let AckPolicy::Batch(0) = settings.ack_policy {
            settings.ack_policy = AckPolicy::Batch(1);
        }
        let settings_monitor = settings.monitor_interval;
        let ack_threshold = match settings.ack_policy {
            AckPolicy::Batch(n) => n.min((max_pending / 4).max(1)),
            _ => 1,
        };
        SourceActor {
            backoff: settings.poll_interval,
            source,
            settings,
            pipeline,
            topology,
            max_pending,
            credit: max_pending,
            ack_extra: 0,
            ack_threshold,
            paused_since: None,
            pause_warned: None,
            batches_ahead: 0,
            polling: true,
            poll_scheduled: false,
            connected: false,
            give_up_at: connect_timeout.map(|t| Instant::now() + t),
            started: Instant::now(),
            overflow: Vec::new(),
            acks: Vec::new(),
            last_settle: 0,
            acked_through: 0,
            poll_us: metrics.histogram(names::SOURCE_POLL_US),
            poll_size: metrics.histogram(names::SOURCE_POLL_SIZE),
            metrics,
            finished: false,
            empty_polls: 0,
            polls: 0,
            ack_failures: 0,
            next_ack_flush: Instant::now(),
            next_monitor: Instant::now() + settings_monitor,
            next_metrics: Instant::now() + Duration::from_secs(1),
            forget: None,
            forget_failures: 0,
        }
    }

    /// Drops the applied-update records of each source message in
    /// `backend` once the source has acked it.
    pub fn forgetting_in(
        mut self,
        backend: std::sync::Arc<dyn crate::state::StateBackend>,
    ) -> Self {
        self.forget = Some(backend);
        self
    }

    /// The source has acked `ids` (or needs no ack for them): they never
    /// come back, so their applied-update records go. A failure leaves the
    /// records behind (they take room; a later entry with the same id, from
    /// a source whose ids repeat, would find them).
    fn forget(&mut self, ids: &[MsgId]) {
        let Some(backend) = &self.forget else { return };
        if ids.is_empty() {
            return;
        }
        match backend.forget(ids) {
            Ok(()) => self.forget_failures = 0,
            Err(e) => {
                self.forget_failures += 1;
                if self.forget_failures == 1 || self.forget_failures.is_multiple_of(100) {
                    log::warn!(
                        "Dropping the applied-update records of {} acked message(s) failed ({e}); they stay in the state backend.",
                        ids.len()
                    );
                }
            }
        }
    }

    fn schedule(&mut self, ctx: &mut Context<Self>, delay: Duration) {
        if self.poll_scheduled || !self.polling {
            return;
        }
        self.poll_scheduled = true;
        if delay.is_zero() {
            ctx.notify(PollNow);
        } else {
            ctx.notify_later(PollNow, delay);
        }
    }

    fn back_off(&mut self, ctx: &mut Context<Self>) {
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(self.settings.max_backoff);
        self.schedule(ctx, wait);
    }

    fn fatal(&mut self, ctx: &mut Context<Self>, what: String) {
        log::error!("{what}; the topology stops.");
        self.polling = false;
        self.topology.do_send(Stop(StopReason::SourceFailed(what)));
        let _ = ctx;
    }

    fn poll_once(&mut self, ctx: &mut Context<Self>) {
        if !self.polling {
            return;
        }
        if self.credit == 0 {
            // Resumed by the next Settle or ack flush that returns credit.
            self.paused_since.get_or_insert_with(Instant::now);
            return;
        }
        if let Some(since) = self.paused_since.take() {
            if self.pause_warned.take().is_some() {
                log::info!(
                    "Polling source {} resumed after a pause of {:.1} s on max_pending.",
                    self.source.name(),
                    since.elapsed().as_secs_f64()
                );
            }
        }
        if self.batches_ahead >= BATCHES_AHEAD {
            // Resumed by the next Settle that takes a batch.
            return;
        }
        if !self.connected {
            match self.source.connect() {
                Ok(()) => {
                    self.connected = true;
                    self.give_up_at = None;
                    log::info!("Source {} connected.", self.source.name());
                }
                Err(e)
                    if e.is_retryable() && self.give_up_at.is_some_and(|t| Instant::now() >= t) =>
                {
                    let what = format!(
                        "source {} could not connect within {:.1} s (source_connect_timeout): {e}",
                        self.source.name(),
                        self.started.elapsed().as_secs_f64()
                    );
                    self.fatal(ctx, what);
                    return;
                }
                Err(e) if e.is_retryable() => {
                    // The last try comes at the time limit, not after it.
                    if let Some(t) = self.give_up_at {
                        self.backoff = self
                            .backoff
                            .min(t.saturating_duration_since(Instant::now()));
                    }
                    log::warn!(
                        "Source {} cannot connect ({e}); retrying in {:?}.",
                        self.source.name(),
                        self.backoff
                    );
                    self.back_off(ctx);
                    return;
                }
                Err(e) => {
                    let what = format!("source {} cannot connect: {e}", self.source.name());
                    self.fatal(ctx, what);
                    return;
                }
            }
        }
        let max = self.credit.min(self.settings.poll_count);
        let mut batch = Vec::with_capacity(max);
        if !self.overflow.is_empty() {
            let take = max.min(self.overflow.len());
            batch.extend(self.overflow.drain(..take));
        } else {
            self.polls += 1;
            let started = Instant::now();
            let polled = self.source.poll(max, &mut batch);
            self.poll_us.record_duration(started.elapsed());
            if !batch.is_empty() {
                self.poll_size.record(batch.len() as u64);
            }
            if let Err(e) = polled {
                if e.is_retryable() {
                    log::warn!(
                        "Polling source {} failed ({e}); retrying in {:?}.",
                        self.source.name(),
                        self.backoff
                    );
                    self.connected = self.source.healthy();
                    self.back_off(ctx);
                } else {
                    let what = format!("polling source {} failed: {e}", self.source.name());
                    self.fatal(ctx, what);
                }
                return;
            }
            if batch.len() > max {
                log::warn!(
                    "Source {} returned {} messages when asked for at most {max}; the rest wait.",
                    self.source.name(),
                    batch.len()
                );
                self.overflow.extend(batch.drain(max..));
            }
        }
        if batch.is_empty() {
            self.empty_polls += 1;
            if self.source.exhausted() {
                if !self.finished {
                    self.finished = true;
                    self.polling = false;
                    log::info!("Source {} is exhausted.", self.source.name());
                    self.topology.do_send(Stop(StopReason::SourceExhausted));
                }
                return;
            }
            self.back_off(ctx);
            return;
        }
        self.credit -= batch.len();
        self.batches_ahead += 1;
        self.backoff = self.settings.poll_interval;
        self.pipeline.do_send(SourceBatch {
            msgs: batch,
            acked_through: self.acked_through,
        });
        self.schedule(ctx, Duration::ZERO);
    }

    fn ack(&mut self, ids: Vec<MsgId>, extra: usize) {
        match self.settings.ack_policy {
            AckPolicy::None => {
                self.forget(&ids);
                self.credit += ids.len() + extra;
            }
            AckPolicy::Individual => {
                let mut acked = Vec::new();
                for id in &ids {
                    match self.source.ack(id) {
                        Ok(()) => acked.push(id.clone()),
                        Err(e) => {
                            log::warn!("Acking {id} at source {} failed: {e}.", self.source.name())
                        }
                    }
                }
                self.forget(&acked);
                self.metrics.incr(names::SOURCE_ACK_CALLS, ids.len() as u64);
                self.credit += ids.len() + extra;
            }
            AckPolicy::Batch(n) => {
                self.ack_extra += extra;
                if self.acks.is_empty() {
                    self.acks = ids;
                } else {
                    self.acks.extend(ids);
                }
                // Take the full batches out first: a failed batch_ack puts
                // its ids back for the next flush, not into this loop.
                let mut full = Vec::new();
                while self.acks.len() >= n {
                    let rest = self.acks.split_off(n);
                    full.push(std::mem::replace(&mut self.acks, rest));
                }
                if self.acks.len() >= self.ack_threshold {
                    full.push(std::mem::take(&mut self.acks));
                }
                let n = full.len();
                for (i, batch) in full.into_iter().enumerate() {
                    self.batch_ack(batch, i + 1 == n);
                }
            }
        }
    }

    fn flush_acks(&mut self) {
        if !self.acks.is_empty() {
            let ids = std::mem::take(&mut self.acks);
            self.batch_ack(ids, true);
        }
        self.note_acked();
    }

    /// Once no ack waits to be sent (none buffered, none put back after a
    /// failure), every settle taken in so far is acked through.
    fn note_acked(&mut self) {
        if self.acks.is_empty() {
            self.acked_through = self.last_settle;
        }
    }

    /// Sends one ack batch; its credit returns unless a retryable failure
    /// puts the ids back for the next flush. The credit of duplicate
    /// deliveries (`ack_extra`) returns once no id waits to be sent: only
    /// with the `last` of the batches taken out at once, and only when
    /// nothing is left over.
    fn batch_ack(&mut self, ids: Vec<MsgId>, last: bool) {
        self.metrics.incr(names::SOURCE_ACK_CALLS, 1);
        let result = self.source.batch_ack(&ids);
        let retry = matches!(&result, Err(e) if e.is_retryable())
            && self.acks.len() < self.settings.poll_count * 64;
        if !retry {
            self.credit += ids.len();
            if last && self.acks.is_empty() {
                self.credit += std::mem::take(&mut self.ack_extra);
            }
        }
        if result.is_ok() {
            self.forget(&ids);
        }
        if result.is_ok() && self.ack_failures > 0 {
            log::info!("Acking at source {} works again.", self.source.name());
            self.ack_failures = 0;
        }
        if let Err(e) = result {
            if retry {
                self.ack_failures += 1;
                if self.ack_failures == 1 || self.ack_failures.is_multiple_of(100) {
                    log::warn!(
                        "Acking {} message(s) at source {} failed ({e}); retrying ({} failure(s) so far).",
                        ids.len(),
                        self.source.name(),
                        self.ack_failures
                    );
                }
                self.connected = self.source.healthy();
                self.acks.extend(ids);
            } else {
                log::error!(
                    "Acking {} message(s) at source {} failed ({e}); the source will redeliver them.",
                    ids.len(),
                    self.source.name()
                );
            }
        }
    }

    /// Flushes partial ack batches, runs the monitor hook and records
    /// metrics, each when due.
    fn periodic(&mut self, ctx: &mut Context<Self>, now: Instant) {
        if now >= self.next_ack_flush {
            self.next_ack_flush = now + self.settings.ack_interval.max(Duration::from_millis(1));
            if let AckPolicy::Batch(_) = self.settings.ack_policy {
                self.flush_acks();
                // Credit may have come back with the acks.
                if self.credit > 0 && self.batches_ahead < BATCHES_AHEAD {
                    self.schedule(ctx, Duration::ZERO);
                }
            }
        }
        if now >= self.next_monitor {
            self.next_monitor = now
                + self
                    .settings
                    .monitor_interval
                    .max(Duration::from_millis(10));
            if self.connected {
                if let Err(e) = self.source.monitor() {
                    log::warn!("Monitoring source {} failed: {e}.", self.source.name());
                }
            }
        }
        if now >= self.next_metrics {
            self.next_metrics = now + Duration::from_secs(1);
            self.flush_metrics();
        }
        if let Some(since) = self.paused_since {
            let due = match self.pause_warned {
                None => now.saturating_duration_since(since) >= PAUSE_WARN_AFTER,
                Some(last) => now.saturating_duration_since(last) >= PAUSE_WARN_EVERY,
            };
            if due && self.polling {
                self.pause_warned = Some(now);
                log::warn!(
                    "Polling source {} has been paused for {:.0} s: the runtime holds max_pending = {} message(s) (in flight or waiting for their ack). A slow or stuck task, or a task with no worker connected, holds them.",
                    self.source.name(),
                    now.saturating_duration_since(since).as_secs_f64(),
                    self.max_pending
                );
            }
        }
    }

    fn flush_metrics(&mut self) {
        self.source.flush_metrics();
        self.poll_us.flush();
        self.poll_size.flush();
        self.metrics
            .incr(names::SOURCE_POLLS, std::mem::take(&mut self.polls));
        self.metrics.incr(
            names::SOURCE_EMPTY_POLLS,
            std::mem::take(&mut self.empty_polls),
        );
        self.metrics
            .gauge(names::SOURCE_HEALTHY, i64::from(self.source.healthy()));
    }
}

impl Actor for SourceActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.schedule(ctx, Duration::ZERO);
        // Timers fire only when the mailbox runs dry; the handlers run the
        // same periodic work (see `periodic`) so it never starves.
        let tick = self
            .settings
            .ack_interval
            .clamp(Duration::from_millis(1), Duration::from_millis(100));
        ctx.run_interval(tick, |act, ctx| act.periodic(ctx, Instant::now()));
    }
}

#[derive(Debug, Message)]
#[rtype(result = "()")]
struct PollNow;

impl Handler<PollNow> for SourceActor {
    type Result = ();

    fn handle(&mut self, _: PollNow, ctx: &mut Context<Self>) {
        self.poll_scheduled = false;
        self.poll_once(ctx);
        self.periodic(ctx, Instant::now());
    }
}

impl Handler<Settle> for SourceActor {
    type Result = ();

    fn handle(&mut self, settle: Settle, ctx: &mut Context<Self>) {
        let could_poll = self.credit > 0 && self.batches_ahead < BATCHES_AHEAD;
        self.credit += settle.released;
        self.batches_ahead = self.batches_ahead.saturating_sub(settle.batches_taken);
        self.last_settle = settle.seq;
        if !settle.acks.is_empty() || settle.ack_extra > 0 {
            self.ack(settle.acks, settle.ack_extra);
        }
        self.note_acked();
        if !settle.failed.is_empty() {
            if let Err(e) = self.source.fail(&settle.failed) {
                log::warn!(
                    "Source {} could not take {} failed message(s): {e}.",
                    self.source.name(),
                    settle.failed.len()
                );
            }
        }
        if !could_poll && self.credit > 0 && self.batches_ahead < BATCHES_AHEAD {
            self.schedule(ctx, Duration::ZERO);
        }
        self.periodic(ctx, Instant::now());
    }
}

/// Stops polling; acks keep flowing.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct StopPolling;

impl Handler<StopPolling> for SourceActor {
    type Result = ();

    fn handle(&mut self, _: StopPolling, _ctx: &mut Context<Self>) {
        self.polling = false;
    }
}

/// Flushes the last acks, shuts the source down and stops the actor.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct ShutdownSource;

impl Handler<ShutdownSource> for SourceActor {
    type Result = ();

    fn handle(&mut self, _: ShutdownSource, ctx: &mut Context<Self>) {
        self.polling = false;
        self.flush_acks();
        self.flush_metrics();
        if let Err(e) = self.source.shutdown() {
            log::warn!("Shutting source {} down failed: {e}.", self.source.name());
        }
        ctx.stop();
    }
}
