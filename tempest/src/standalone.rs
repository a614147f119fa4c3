//! The standalone runtime: a whole topology in one multi-threaded process.
//!
//! The source runs on an arbiter (thread) of its own, the pipeline and
//! topology actors on the calling thread's actix system, and each task
//! worker on a thread of its own, fed through bounded in-memory channels.
//! No TCP is involved.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::future::LocalBoxFuture;
use tempest_source::metrics::Snapshot;
use tempest_source::{Metrics, MsgId, SourceContext};
use tokio::sync::{oneshot, watch};

pub use crate::server::ServeOptions;

use crate::actors::pipeline::{
    Finish, GetStats, Inspect, MsgReport, PipelineActor, PipelineSetup, Stats,
};
pub use crate::actors::pipeline::{StopCondition, Unfinished};
use crate::actors::source::SourceActor;
use crate::actors::topology::TopologyActor;
use crate::actors::{DeliverySink, Fetch, Stop, StopReason, Ticks, Undelivered, WorkerId};
use crate::async_worker::{run_async_loop, AsyncTransport};
use crate::error::Error;
use crate::inflight::{InflightEntry, Tracker, TrackerConfig};
use crate::msg::{Emitted, Results, TaskMsg};
use crate::pipeline::TaskIdx;
use crate::task::{TaskBody, TaskContext};
use crate::topology::Topology;
use crate::worker::{
    join_within, run_task_loop, Next, SharedBatch, Transport, PREFETCH, THREAD_STOP_WAIT,
};

/// A handle onto a running topology (or worker process), usable from any
/// thread but the runtime's own: shut it down, look at its counters and
/// its inflight table.
#[derive(Clone, Debug)]
pub struct RuntimeHandle {
    stop: Arc<watch::Sender<bool>>,
    pipeline: Arc<Mutex<Option<Addr<PipelineActor>>>>,
    listening: Arc<Mutex<Option<SocketAddr>>>,
}

impl Default for RuntimeHandle {
    fn default() -> Self {
        RuntimeHandle {
            stop: Arc::new(watch::channel(false).0),
            pipeline: Arc::default(),
            listening: Arc::default(),
        }
    }
}

impl RuntimeHandle {
    /// A new handle; pass it in [`RunOptions::handle`].
    pub fn new() -> Self {
        RuntimeHandle::default()
    }

    /// Stops polling, lets in-flight messages finish (up to
    /// `graceful_shutdown`), acks them, and stops. Works before the run
    /// starts too. For a worker process: finish what it holds, disconnect.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }

    pub(crate) fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    fn pipeline(&self) -> Option<Addr<PipelineActor>> {
        self.pipeline
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Where the topology listens for task workers, once it does.
    pub fn listening(&self) -> Option<SocketAddr> {
        *self
            .listening
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The pipeline's counters now; `None` when the topology is not running.
    /// Blocks until the pipeline answers.
    pub fn stats(&self) -> Option<Stats> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.pipeline()?.do_send(GetStats(tx));
        rx.recv_timeout(Duration::from_secs(10)).ok()
    }

    /// A copy of the inflight table now; `None` when the topology is not
    /// running. Blocks until the pipeline answers.
    pub fn inflight(&self) -> Option<Vec<InflightEntry>> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.pipeline()?.do_send(Inspect(tx));
        rx.recv_timeout(Duration::from_secs(10)).ok()
    }
}

/// How a run ends, what it records, where its workers are.
pub struct RunOptions {
    /// Stop (gracefully) once this returns true; checked after every batch.
    pub until: Option<StopCondition>,
    /// Stop (gracefully) after this long.
    pub deadline: Option<Duration>,
    /// Record each source message's outcome (for tests).
    pub record_outcomes: bool,
    /// A handle to stop and inspect the run.
    pub handle: Option<RuntimeHandle>,
    /// Run the task workers in this process (standalone). Without them the
    /// topology waits for remote workers (set `serve`).
    pub local_workers: bool,
    /// Listen for task worker processes.
    pub serve: Option<ServeOptions>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            until: None,
            deadline: None,
            record_outcomes: false,
            handle: None,
            local_workers: true,
            serve: None,
        }
    }
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("until", &self.until.is_some())
            .field("deadline", &self.deadline)
            .field("record_outcomes", &self.record_outcomes)
            .field("handle", &self.handle.is_some())
            .field("local_workers", &self.local_workers)
            .field("serve", &self.serve)
            .finish()
    }
}

/// What a run did.
#[derive(Debug)]
pub struct RunReport {
    /// The topology's name.
    pub name: String,
    /// Why it stopped.
    pub stop: StopReason,
    /// The pipeline's counters.
    pub stats: Stats,
    /// From start to stop.
    pub elapsed: Duration,
    /// Every metric recorded by the runtime, the tasks and the source.
    pub metrics: Snapshot,
    /// What happened to each delivery of each source message, in the
    /// order they finished, if recorded.
    pub outcomes: Option<HashMap<MsgId, Vec<MsgReport>>>,
    /// The messages still in flight when the run stopped (the graceful
    /// shutdown ran out, or they waited for tasks without workers): left
    /// unacked, for the source to redeliver.
    pub unfinished: Vec<Unfinished>,
}

impl RunReport {
    /// Acked messages per second over the whole run.
    pub fn acked_per_sec(&self) -> f64 {
        self.stats.acked as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn sweep_interval(topology: &Topology) -> Duration {
    let o = &topology.options;
    let finest = match (o.msg_timeout, topology.options.failure_policy) {
        (Some(t), crate::FailurePolicy::Retry(_)) => t.min(o.retry_backoff),
        (Some(t), _) => t,
        (None, crate::FailurePolicy::Retry(_)) => o.retry_backoff,
        (None, _) => Duration::from_millis(100),
    };
    (finest / 10).clamp(Duration::from_millis(1), Duration::from_millis(20))
}

/// Runs `topology` in this process until its source is exhausted, the
/// options say stop, or it is shut down; returns what it did.
///
/// With `serve`, the listener is bound first, before the source is even
/// built: a busy port fails the run at once, naming the address.
///
/// A shutdown lasts `graceful_shutdown` at most. A task thread still in a
/// task call after that (and a short wait) is not joined but left behind,
/// so the run returns; its messages are in [`RunReport::unfinished`].
pub fn run(topology: Topology, options: RunOptions) -> Result<RunReport, Error> {
    let sweep_every = sweep_interval(&topology);
    let Topology {
        name,
        source_name: _,
        source,
        dag,
        options: topts,
        workers,
        batches,
        concurrency,
        file,
        state,
    } = topology;
    let states =
        crate::state::StateRegistry::new(state.clone()).at_most_once(topts.at_most_once_updates);
    let listener = match &options.serve {
        Some(serve) => Some(crate::server::bind(serve)?),
        None => None,
    };
    let metrics = Metrics::new_registry().with_label("topology", name.clone());
    let mut src = source(file.as_ref())?;
    let source_metrics = metrics.with_label("source", src.name().to_string());
    let unique_ids = src.settings().unique_ids;
    let counts_deliveries = src.settings().counts_deliveries;
    if topts.at_most_once_updates && !unique_ids {
        log::warn!(
            "at_most_once_updates with source {}, whose ids may repeat: entries sharing an id count as one message, and only the first one's updates apply while it is in flight.",
            src.name()
        );
    }
    src.setup(&SourceContext {
        topology: name.clone(),
        metrics: source_metrics.clone(),
    })
    .map_err(|e| Error::Source {
        name: src.name().to_string(),
        source: e,
    })?;

    let options_handle = options.handle.clone();
    let flusher = crate::metrics::aggregator::Flusher::open(
        &topts.metrics,
        &metrics,
        crate::metrics::backends::Role::Topology,
    )?;
    let metrics_every = topts.metrics.interval();
    let started = Instant::now();
    let system = actix_rt::System::new();
    let outcome = system.block_on(async {
        // The pipeline's mailbox, made here so every part can hold its
        // address before the actor starts on its own arbiter below.
        let (pipe_tx, pipe_mailbox) = actix::dev::channel::channel::<PipelineActor>(16);
        let pipe = Addr::new(pipe_tx);
        // The handle can reach the pipeline before any message runs (what
        // it sends waits in the mailbox until the actor starts).
        if let Some(handle) = &options.handle {
            *handle
                .pipeline
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(pipe.clone());
        }
        let topo_ctx: Context<TopologyActor> = Context::new();
        let topo = topo_ctx.address();

        let arbiter = Arbiter::new();
        let (pipe_rx, topo_rx) = (pipe.clone().recipient(), topo.clone().recipient());
        let max_pending = topts.max_pending;
        let forget = state.clone().filter(|_| topts.at_most_once_updates);
        let source_addr = SourceActor::start_in_arbiter(&arbiter.handle(), move |_| {
            let actor = SourceActor::new(
                src,
                max_pending,
                pipe_rx,
                topo_rx,
                source_metrics,
                topts.source_connect_timeout,
            );
            match forget {
                Some(backend) => actor.forgetting_in(backend),
                None => actor,
            }
        });

        let mut tracker = Tracker::new(
            Arc::clone(&dag),
            TrackerConfig {
                policy: topts.failure_policy,
                msg_timeout: topts.msg_timeout,
                retry_backoff: topts.retry_backoff,
                max_retry_backoff: topts.max_retry_backoff,
            },
            Instant::now(),
            topts.max_pending,
        );
        if topts.at_most_once_updates {
            tracker.mark_redeliveries(counts_deliveries);
        }
        let mut pipeline = PipelineActor::new(PipelineSetup {
            tracker,
            source: source_addr.clone().recipient(),
            topology: topo.clone().recipient(),
            metrics: metrics.clone(),
            record_outcomes: options.record_outcomes,
            until: options.until,
            sweep_every,
            metrics_every: metrics_every.min(Duration::from_secs(1)),
            root_queue_capacity: topts.max_pending.min(1 << 22),
            unique_ids,
        });

        let mut threads: Vec<(JoinHandle<()>, (WorkerId, String))> = Vec::new();
        let mut spawn_error: Option<Error> = None;
        let local_workers = if options.local_workers {
            workers.clone()
        } else {
            Vec::new()
        };
        'spawn: for (t, &count) in local_workers.iter().enumerate() {
            for w in 0..count {
                let task_name = dag.name(t as TaskIdx).to_string();
                let ctx = TaskContext {
                    topology: name.clone(),
                    task: task_name.clone(),
                    worker: w,
                    metrics: metrics.with_label("task", task_name.clone()),
                    codecs: dag.task_codecs(t as TaskIdx),
                    one_per_key: dag.has_keyed_input(t as TaskIdx),
                    tick_interval: dag.tick_interval(t as TaskIdx),
                    states: crate::state::WorkerStates::new(states.clone()),
                    checkpoint_interval: topts.checkpoint_interval,
                };
                let (id, run): (WorkerId, Box<dyn FnOnce() + Send>) = match dag
                    .make_task(t as TaskIdx)
                {
                    TaskBody::Sync(task) => {
                        let (tx, rx) = sync_channel(PREFETCH);
                        let id = pipeline.add_worker(
                            t as TaskIdx,
                            Box::new(InProcSink::Sync(tx)),
                            false,
                        );
                        let mut transport = InProc {
                            worker: id,
                            max: batches[t],
                            pipeline: pipe.clone(),
                            rx,
                            outstanding: 0,
                        };
                        (
                            id,
                            Box::new(move || run_task_loop(task, ctx, id, &mut transport)),
                        )
                    }
                    TaskBody::Async(task) => {
                        let (tx, rx) = tokio::sync::mpsc::channel(PREFETCH);
                        let id = pipeline.add_worker(
                            t as TaskIdx,
                            Box::new(InProcSink::Async(tx)),
                            false,
                        );
                        let limit = concurrency[t].max(1);
                        // A fetch takes no more than the worker can start.
                        let mut transport = InProcAsync {
                            worker: id,
                            max: batches[t].min(limit),
                            pipeline: pipe.clone(),
                            rx,
                            outstanding: 0,
                        };
                        (
                            id,
                            Box::new(move || run_async_loop(task, ctx, id, limit, &mut transport)),
                        )
                    }
                };
                match std::thread::Builder::new()
                    .name(format!("tempest-{task_name}-{w}"))
                    .spawn(run)
                {
                    Ok(h) => threads.push((h, (id, task_name))),
                    Err(e) => {
                        spawn_error = Some(Error::Io {
                            what: format!("starting a worker thread for task {task_name}"),
                            source: e,
                        });
                        break 'spawn;
                    }
                }
            }
        }
        // The pipeline gets a thread of its own: under constant load its
        // mailbox never runs dry, and actix handles a mailbox until it does,
        // which would starve every other actor and timer on its thread (the
        // topology actor and its stop signals, the metrics aggregator).
        let pipe_arbiter = Arbiter::new();
        if !pipe_arbiter.spawn_fn(move || {
            Context::with_receiver(pipe_mailbox).run(pipeline);
        }) {
            spawn_error = Some(Error::Runtime(
                "the pipeline's arbiter stopped before it started".into(),
            ));
        }
        let (done_tx, done_rx) = oneshot::channel();
        topo_ctx.run(TopologyActor::new(
            pipe.clone(),
            source_addr,
            topts.graceful_shutdown,
            done_tx,
        ));
        if let Some(e) = &spawn_error {
            topo.do_send(Stop(StopReason::SourceFailed(e.to_string())));
        }
        if let Some(deadline) = options.deadline {
            let topo = topo.clone();
            actix_rt::spawn(async move {
                actix_rt::time::sleep(deadline).await;
                topo.do_send(Stop(StopReason::Deadline));
            });
        }
        if let Some(handle) = &options.handle {
            let topo = topo.clone();
            let mut stop = handle.stop_signal();
            actix_rt::spawn(async move {
                if stop.wait_for(|s| *s).await.is_ok() {
                    topo.do_send(Stop(StopReason::Shutdown));
                }
            });
        }
        let mut io_arbiter = None;
        if let (Some(serve), Some(listener), None) = (options.serve.clone(), listener, &spawn_error)
        {
            let arbiter = Arbiter::new();
            let (tx, rx) = oneshot::channel();
            let (dag, pipe) = (Arc::clone(&dag), pipe.clone());
            arbiter.spawn(async move {
                let _ = tx.send(
                    crate::server::listen(listener, serve, dag, pipe, topts.at_most_once_updates)
                        .await,
                );
            });
            io_arbiter = Some(arbiter);
            let failed = match rx.await {
                Ok(Ok(addr)) => {
                    if let Some(handle) = &options.handle {
                        *handle
                            .listening
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner) = Some(addr);
                    }
                    None
                }
                Ok(Err(e)) => Some(Error::Io {
                    what: "listening for task workers".into(),
                    source: e,
                }),
                Err(_) => Some(Error::Runtime("the listener's arbiter stopped".into())),
            };
            if let Some(e) = failed {
                topo.do_send(Stop(StopReason::SourceFailed(e.to_string())));
                spawn_error = Some(e);
            }
        }
        if let Some(f) = &flusher {
            crate::metrics::aggregator::Aggregator::new(Arc::clone(f), metrics_every).start();
        }
        let reason = done_rx.await;
        let fin = pipe.send(Finish).await;
        if io_arbiter.is_some() {
            // Let the sessions tell their workers the topology is stopping.
            actix_rt::time::sleep(Duration::from_millis(50)).await;
        }
        (
            reason,
            fin,
            threads,
            [arbiter, pipe_arbiter],
            spawn_error,
            io_arbiter,
        )
    });
    let (reason, fin, threads, arbiters, spawn_error, io_arbiter) = outcome;
    if let Some(io) = io_arbiter {
        io.stop();
        let _ = io.join();
    }
    if let Some(handle) = &options_handle {
        *handle
            .pipeline
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }
    for arbiter in arbiters {
        arbiter.stop();
        let _ = arbiter.join();
    }
    // The threads stop once their queues are gone; one still in a task
    // call is left behind, or the run would last as long as the call.
    let (stuck, panicked) = join_within(threads, THREAD_STOP_WAIT);
    if panicked > 0 {
        log::error!("{panicked} task worker thread(s) panicked outside a task call.");
    }
    for (t, (worker, task)) in stuck {
        log::warn!(
            "Worker {worker} of task {task} is still in a task call after the shutdown; its thread ({}) is left behind and the run ends without it.",
            t.thread().name().unwrap_or("unnamed")
        );
    }
    if let Some(f) = &flusher {
        // The last flush, once every worker has recorded its last counts.
        f.lock().unwrap_or_else(PoisonError::into_inner).flush();
    }
    if let Some(e) = spawn_error {
        return Err(e);
    }
    let stop =
        reason.map_err(|_| Error::Runtime("the topology actor stopped without a reason".into()))?;
    let fin =
        fin.map_err(|_| Error::Runtime("the pipeline actor stopped before the end".into()))?;
    Ok(RunReport {
        name,
        stop,
        stats: fin.stats,
        elapsed: started.elapsed(),
        metrics: metrics.snapshot(),
        outcomes: fin.reports,
        unfinished: fin.unfinished,
    })
}

pub use crate::remote::{WorkerOptions, WorkerReport};

/// Runs `options.workers` workers of task `task` of `topology` in this
/// process, connected to the topology process at `options.topology`, until
/// the topology stops or `handle` is shut down (then each worker finishes
/// what it holds and disconnects cleanly).
pub fn run_worker(
    topology: &Topology,
    task: &str,
    options: WorkerOptions,
    handle: Option<RuntimeHandle>,
) -> Result<WorkerReport, Error> {
    let metrics = Metrics::new_registry().with_label("topology", topology.name.clone());
    let handle = handle.unwrap_or_default();
    // This process's metrics go to the backends from here.
    let flusher = crate::metrics::aggregator::Flusher::open(
        &topology.options.metrics,
        &metrics,
        crate::metrics::backends::Role::Worker,
    )?;
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let ticker = flusher.clone().map(|f| {
        let every = topology.options.metrics.interval();
        std::thread::spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop_rx.recv_timeout(every)
            {
                f.lock().unwrap_or_else(PoisonError::into_inner).flush();
            }
        })
    });
    let mut options = options;
    if let Some(t) = topology.dag.index_of(task) {
        let set = topology.concurrency.get(t as usize).copied().unwrap_or(0);
        if options.concurrency.is_none() && set > 0 {
            options.concurrency = Some(set);
        }
    }
    let result = crate::remote::run(
        Arc::clone(&topology.dag),
        &topology.name,
        task,
        options,
        metrics,
        handle.stop_signal(),
        (
            crate::state::StateRegistry::new(topology.state.clone())
                .at_most_once(topology.options.at_most_once_updates),
            topology.options.checkpoint_interval,
        ),
    );
    drop(stop_tx);
    if let Some(t) = ticker {
        let _ = t.join();
    }
    if let Some(f) = &flusher {
        f.lock().unwrap_or_else(PoisonError::into_inner).flush();
    }
    result
}

/// The in-process transport: fetches go to the pipeline actor as actor
/// messages, batches come back over a bounded channel.
pub(crate) struct InProc {
    pub worker: WorkerId,
    pub max: usize,
    pub pipeline: Addr<PipelineActor>,
    pub rx: Receiver<Arc<SharedBatch>>,
    pub outstanding: usize,
}

impl Transport for InProc {
    fn next_batch(&mut self, until: Option<Instant>) -> Next {
        while self.outstanding < PREFETCH {
            self.pipeline.do_send(Fetch {
                worker: self.worker,
                max: self.max,
            });
            self.outstanding += 1;
        }
        let batch = match until {
            None => match self.rx.recv() {
                Ok(b) => b,
                Err(_) => return Next::Closed,
            },
            Some(t) => match self
                .rx
                .recv_timeout(t.saturating_duration_since(Instant::now()))
            {
                Ok(b) => b,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return Next::Due,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Next::Closed,
            },
        };
        self.outstanding -= 1;
        // Ask for the next batch before handling this one.
        self.pipeline.do_send(Fetch {
            worker: self.worker,
            max: self.max,
        });
        self.outstanding += 1;
        Next::Batch(batch)
    }

    fn send_results(&mut self, results: Results) {
        self.pipeline.do_send(results);
    }

    fn send_ticks(&mut self, outputs: Vec<Emitted>) {
        self.pipeline.do_send(Ticks {
            worker: self.worker,
            outputs,
        });
    }
}

/// The in-process transport of an async worker: like [`InProc`], over a
/// tokio channel its loop can await. It asks for a batch only when the loop
/// wants one (it has free slots).
pub(crate) struct InProcAsync {
    pub worker: WorkerId,
    pub max: usize,
    pub pipeline: Addr<PipelineActor>,
    pub rx: tokio::sync::mpsc::Receiver<Arc<SharedBatch>>,
    pub outstanding: usize,
}

impl AsyncTransport for InProcAsync {
    fn recv(&mut self) -> LocalBoxFuture<'_, Option<(u64, Arc<SharedBatch>)>> {
        Box::pin(async move {
            while self.outstanding < PREFETCH {
                self.pipeline.do_send(Fetch {
                    worker: self.worker,
                    max: self.max,
                });
                self.outstanding += 1;
            }
            let batch = self.rx.recv().await?;
            self.outstanding -= 1;
            Some((0, batch))
        })
    }

    fn take(
        &mut self,
        _tag: u64,
        batch: Arc<SharedBatch>,
    ) -> LocalBoxFuture<'_, Option<Arc<SharedBatch>>> {
        Box::pin(std::future::ready(Some(batch)))
    }

    fn send_results(&mut self, _tag: u64, results: Results) -> LocalBoxFuture<'_, ()> {
        self.pipeline.do_send(results);
        Box::pin(std::future::ready(()))
    }
}

/// The pipeline's end of an in-process worker: a sync worker's channel,
/// or an async worker's.
pub(crate) enum InProcSink {
    Sync(SyncSender<Arc<SharedBatch>>),
    Async(tokio::sync::mpsc::Sender<Arc<SharedBatch>>),
}

impl DeliverySink for InProcSink {
    fn deliver(&mut self, batch: Vec<TaskMsg>) -> Result<Option<Arc<SharedBatch>>, Undelivered> {
        use tokio::sync::mpsc::error::TrySendError as AsyncTrySendError;
        let shared = SharedBatch::new(batch);
        match self {
            InProcSink::Sync(tx) => match tx.try_send(Arc::clone(&shared)) {
                Ok(()) => Ok(Some(shared)),
                Err(TrySendError::Full(b)) => Err(Undelivered::Busy(unshare(b, shared))),
                Err(TrySendError::Disconnected(b)) => Err(Undelivered::Gone(unshare(b, shared))),
            },
            InProcSink::Async(tx) => match tx.try_send(Arc::clone(&shared)) {
                Ok(()) => Ok(Some(shared)),
                Err(AsyncTrySendError::Full(b)) => Err(Undelivered::Busy(unshare(b, shared))),
                Err(AsyncTrySendError::Closed(b)) => Err(Undelivered::Gone(unshare(b, shared))),
            },
        }
    }

    fn give_back(&mut self) {
        // In process the pipeline takes back unclaimed messages itself.
    }
}
/// The messages of a batch that was never handed over.
fn unshare(sent: Arc<SharedBatch>, kept: Arc<SharedBatch>) -> Vec<TaskMsg> {
    drop(kept);
    sent.take_rest()
}
