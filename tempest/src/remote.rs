//! The task worker process: connects to the topology, handshakes, pulls
//! batches, runs the shared task loop on them, returns results.
//!
//! Each worker is two threads: an I/O thread running the connection
//! (handshake, fetches, heartbeats, reconnects with exponential backoff and
//! jitter) and a task thread running the same task loop as standalone mode.
//! The task instance lives across reconnects, so `started` and `shutdown`
//! run once. Batches are tagged with the connection they came on: a batch
//! from a connection that has since dropped is skipped (the topology has
//! already handed those messages to the failure policy).
//!
//! When the topology stops (it says it is shutting down, or it is gone) a
//! worker reconnects with backoff until a topology is back at the address:
//! a rolling restart of the topology keeps its workers. With
//! `exit_with_topology` it stops instead when the topology says it stops.
//! Asked to stop itself, a worker finishes what it holds for up to
//! `graceful_shutdown`, then leaves; a task thread still in a task call by
//! then is left behind so that the process can exit.

use std::net::ToSocketAddrs;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::LocalBoxFuture;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_util::codec::Framed;

use crate::error::Error;
use crate::msg::{Emitted, Results, Verdict, WorkerId};

use crate::async_worker::{run_async_loop, AsyncTransport};
use crate::pipeline::Dag;
use crate::task::{TaskBody, TaskContext, DEFAULT_CONCURRENCY};
use crate::wire::{self, ErrorCode, Frame, WireCodec, WireError};
use crate::worker::{
    join_within, run_task_loop, Next, SharedBatch, Transport, PREFETCH, THREAD_STOP_WAIT,
};

/// How a worker process connects and works.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// The topology process, as `host:port`.
    pub topology: String,
    /// The shared secret, if the topology requires one.
    pub secret: Option<Vec<u8>>,
    /// Workers (connections and task threads) in this process.
    pub workers: usize,
    /// The most task messages one fetch asks for.
    pub fetch_max: usize,
    /// The first wait before reconnecting; doubled per failure (with
    /// jitter) up to `max_backoff`.
    pub backoff: Duration,
    /// The longest wait before reconnecting.
    pub max_backoff: Duration,
    /// Stop when the topology says it is shutting down, instead of
    /// reconnecting until one is back.
    pub exit_with_topology: bool,
    /// Asked to stop, how long a worker may take to finish what it holds.
    pub graceful_shutdown: Duration,
    /// For an async task: messages each worker keeps in flight (`None`:
    /// the topology's setting for the task). A fetch takes no more.
    pub concurrency: Option<usize>,
}

impl Default for WorkerOptions {
    /// One worker for a topology on `127.0.0.1:9311`, 1,024 messages per
    /// fetch, reconnecting after 100 ms doubling up to 5 s, staying when
    /// the topology stops, 30 s to finish on shutdown.
    fn default() -> Self {
        WorkerOptions {
            topology: format!("127.0.0.1:{}", crate::rt::DEFAULT_PORT),
            secret: None,
            workers: 1,
            fetch_max: 1024,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            exit_with_topology: false,
            graceful_shutdown: Duration::from_secs(30),
            concurrency: None,
        }
    }
}

/// What a worker process did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerReport {
    /// Connections that completed the handshake.
    pub sessions: u64,
}

enum ToIo {
    /// The task thread took a batch of this connection.
    Took(u64),
    /// Results of a batch of this connection.
    Results(u64, Results),
    /// A tick's outputs (for whichever connection is up).
    Ticks(Vec<Emitted>),
}

/// Why a connection ended.
enum End {
    /// Lost: reconnect.
    Lost(String),
    /// The topology is shutting down.
    TopologyStopped,
    /// We were asked to stop and drained.
    Drained,
    /// The task thread is gone (it panicked outside a task call): there is
    /// nothing to reconnect for.
    TaskThreadGone,
}

/// The task thread's end of the connection.
struct Remote {
    rx: mpsc::Receiver<(u64, Arc<SharedBatch>)>,
    tx: mpsc::Sender<ToIo>,
    epoch: Arc<AtomicU64>,
    current: u64,
    /// Drives the timeout of a ticking task's waits.
    timer: Option<tokio::runtime::Runtime>,
}

impl AsyncTransport for Remote {
    fn recv(&mut self) -> LocalBoxFuture<'_, Option<(u64, Arc<SharedBatch>)>> {
        Box::pin(self.rx.recv())
    }

    fn take(
        &mut self,
        tag: u64,
        batch: Arc<SharedBatch>,
    ) -> LocalBoxFuture<'_, Option<Arc<SharedBatch>>> {
        Box::pin(async move {
            let _ = self.tx.send(ToIo::Took(tag)).await;
            if tag == self.epoch.load(Ordering::SeqCst) {
                Some(batch)
            } else {
                log::debug!("Skipping a batch from a dropped connection.");
                None
            }
        })
    }

    fn send_results(&mut self, tag: u64, results: Results) -> LocalBoxFuture<'_, ()> {
        Box::pin(async move {
            // Results of a batch from a dropped connection are dropped by
            // the I/O thread (their messages went to the failure policy).
            let _ = self.tx.send(ToIo::Results(tag, results)).await;
        })
    }
}

impl Remote {
    /// The next batch from the I/O thread, waiting until `until` at most.
    fn recv(&mut self, until: Option<Instant>) -> Result<(u64, Arc<SharedBatch>), Next> {
        let Some(until) = until else {
            return self.rx.blocking_recv().ok_or(Next::Closed);
        };
        if self.timer.is_none() {
            // A ticking task's thread waits with a timeout: a small
            // runtime of its own drives the timer.
            match tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
            {
                Ok(rt) => self.timer = Some(rt),
                Err(e) => {
                    log::error!("Cannot start the timer of a ticking task ({e}); it ticks only between batches.");
                    return self.rx.blocking_recv().ok_or(Next::Closed);
                }
            }
        }
        let Some(rt) = &self.timer else {
            return Err(Next::Closed);
        };
        let wait = until.saturating_duration_since(Instant::now());
        let rx = &mut self.rx;
        match rt.block_on(async { tokio::time::timeout(wait, rx.recv()).await }) {
            Ok(Some(got)) => Ok(got),
            Ok(None) => Err(Next::Closed),
            Err(_) => Err(Next::Due),
        }
    }
}

impl Transport for Remote {
    fn next_batch(&mut self, until: Option<Instant>) -> Next {
        loop {
            let (epoch, batch) = match self.recv(until) {
                Ok(got) => got,
                Err(next) => return next,
            };
            let _ = self.tx.blocking_send(ToIo::Took(epoch));
            if epoch == self.epoch.load(Ordering::SeqCst) {
                self.current = epoch;
                return Next::Batch(batch);
            }
            log::debug!("Skipping a batch from a dropped connection.");
        }
    }

    fn send_results(&mut self, results: Results) {
        let _ = self.tx.blocking_send(ToIo::Results(self.current, results));
    }

    fn send_ticks(&mut self, outputs: Vec<Emitted>) {
        let _ = self.tx.blocking_send(ToIo::Ticks(outputs));
    }
}

/// Runs `workers` workers of task `task` until the topology stops or `stop`
/// turns true (then each finishes what it holds and disconnects cleanly).
pub(crate) fn run(
    dag: Arc<Dag>,
    topology: &str,
    task: &str,
    options: WorkerOptions,
    metrics: tempest_source::Metrics,
    stop: watch::Receiver<bool>,
    (states, checkpoint_interval): (crate::state::StateRegistry, Duration),
) -> Result<WorkerReport, Error> {
    let Some(task_idx) = dag.index_of(task) else {
        return Err(Error::Topology {
            topology: topology.to_string(),
            problems: vec![format!(
                "no task \"{task}\"; the tasks are: {}",
                dag.names().join(", ")
            )],
        });
    };
    let mut threads = Vec::new();
    for w in 0..options.workers.max(1) {
        let (batch_tx, batch_rx) = mpsc::channel(PREFETCH * 2);
        let (io_tx, io_rx) = mpsc::channel(PREFETCH * 4);
        let epoch = Arc::new(AtomicU64::new(0));
        let ctx = TaskContext {
            topology: topology.to_string(),
            task: task.to_string(),
            worker: w,
            metrics: metrics.with_label("task", task.to_string()),
            codecs: dag.task_codecs(task_idx),
            one_per_key: dag.has_keyed_input(task_idx),
            tick_interval: dag.tick_interval(task_idx),
            states: crate::state::WorkerStates::new(states.clone()),
            checkpoint_interval,
        };
        let mut transport = Remote {
            rx: batch_rx,
            tx: io_tx,
            epoch: Arc::clone(&epoch),
            current: 0,
            timer: None,
        };
        let mut options = options.clone();
        let body: Box<dyn FnOnce() + Send> = match dag.make_task(task_idx) {
            TaskBody::Sync(instance) => {
                Box::new(move || run_task_loop(instance, ctx, w as WorkerId, &mut transport))
            }
            TaskBody::Async(instance) => {
                let limit = options
                    .concurrency
                    .or(dag.concurrency(task_idx))
                    .unwrap_or(DEFAULT_CONCURRENCY)
                    .max(1);
                // A fetch takes no more than the worker can start.
                options.fetch_max = options.fetch_max.min(limit);
                Box::new(move || {
                    run_async_loop(instance, ctx, w as WorkerId, limit, &mut transport)
                })
            }
        };
        let task_thread = std::thread::Builder::new()
            .name(format!("tempest-{task}-{w}"))
            .spawn(body)
            .map_err(|e| Error::Io {
                what: format!("starting worker thread {w} of task {task}"),
                source: e,
            })?;
        let io = Io {
            dag: Arc::clone(&dag),
            options,
            task: task.to_string(),
            batch_tx,
            io_rx,
            epoch,
            stop: stop.clone(),
            worker: w,
            at_most_once: states.is_at_most_once(),
        };
        let io_thread = std::thread::Builder::new()
            .name(format!("tempest-{task}-{w}-io"))
            .spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| Error::Io {
                        what: "starting the worker's I/O runtime".into(),
                        source: e,
                    })
                    .and_then(|rt| rt.block_on(io.run()))
            })
            .map_err(|e| Error::Io {
                what: format!("starting I/O thread {w} of task {task}"),
                source: e,
            })?;
        threads.push((task_thread, io_thread));
    }
    let mut report = WorkerReport::default();
    let mut first_error = None;
    let mut task_threads = Vec::new();
    for (w, (task_thread, io_thread)) in threads.into_iter().enumerate() {
        match io_thread.join() {
            Ok(Ok(sessions)) => report.sessions += sessions,
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(_) => {
                first_error.get_or_insert(Error::Runtime("a worker I/O thread panicked".into()));
            }
        }
        task_threads.push((task_thread, w));
    }
    // With its connection gone a task thread stops after its current call;
    // one stuck in a call is left behind, or the process could not exit.
    let (stuck, panicked) = join_within(task_threads, THREAD_STOP_WAIT);
    for (_, w) in stuck {
        log::warn!(
            "Worker {w} of task {task} is still in a task call; its thread is left behind and the process exits without it."
        );
    }
    if panicked > 0 {
        first_error.get_or_insert(Error::Runtime("a worker task thread panicked".into()));
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

struct Io {
    dag: Arc<Dag>,
    options: WorkerOptions,
    task: String,
    batch_tx: mpsc::Sender<(u64, Arc<SharedBatch>)>,
    io_rx: mpsc::Receiver<ToIo>,
    epoch: Arc<AtomicU64>,
    stop: watch::Receiver<bool>,
    worker: usize,
    /// Whether this worker applies state updates at most once (its
    /// topology must too).
    at_most_once: bool,
}

/// A handshake that failed.
enum Refused {
    /// For good: wrong secret, unknown task, other version.
    Fatal(String),
    /// Try again later.
    Retry(String),
}

impl Io {
    /// Connects, works and reconnects until told to stop or the topology
    /// stops; returns how many sessions completed the handshake.
    async fn run(mut self) -> Result<u64, Error> {
        let mut backoff = self.options.backoff;
        let mut sessions = 0u64;
        let mut failures = 0u32;
        loop {
            if *self.stop.borrow() {
                return Ok(sessions);
            }
            match self.connect().await {
                Ok((framed, heartbeat, max_frame)) => {
                    sessions += 1;
                    failures = 0;
                    backoff = self.options.backoff;
                    match self.session(framed, heartbeat, max_frame).await {
                        End::Lost(why) => log::warn!(
                            "Worker {} of task {} lost its connection ({why}); reconnecting.",
                            self.worker,
                            self.task
                        ),
                        End::TopologyStopped if self.options.exit_with_topology => {
                            log::info!(
                                "The topology is shutting down; worker {} of task {} stops with it.",
                                self.worker,
                                self.task
                            );
                            return Ok(sessions);
                        }
                        End::TopologyStopped => {
                            log::info!(
                                "The topology is shutting down; worker {} of task {} reconnects when a topology is back at {} (exit_with_topology stops it instead).",
                                self.worker,
                                self.task,
                                self.options.topology
                            );
                            let mut stop = self.stop.clone();
                            tokio::select! {
                                _ = tokio::time::sleep(jitter(backoff)) => {}
                                _ = stop.wait_for(|s| *s) => return Ok(sessions),
                            }
                        }
                        End::Drained => return Ok(sessions),
                        End::TaskThreadGone => {
                            return Err(Error::Runtime(format!(
                                "worker {} of task {}: its task thread stopped (it panicked outside a task call; see the log above)",
                                self.worker, self.task
                            )))
                        }
                    }
                }
                Err(Refused::Fatal(why)) => {
                    return Err(Error::Topology {
                        topology: self.options.topology.clone(),
                        problems: vec![format!(
                            "the topology refused worker for task \"{}\": {why}",
                            self.task
                        )],
                    });
                }
                Err(Refused::Retry(why)) => {
                    failures += 1;
                    let wait = jitter(backoff);
                    if failures == 1 || failures.is_multiple_of(20) {
                        log::warn!(
                            "Worker {} of task {} cannot reach the topology at {} ({why}); retrying in {wait:?}.",
                            self.worker,
                            self.task,
                            self.options.topology
                        );
                    }
                    let mut stop = self.stop.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.wait_for(|s| *s) => return Ok(sessions),
                    }
                    backoff = (backoff * 2).min(self.options.max_backoff);
                }
            }
        }
    }

    async fn connect(
        &mut self,
    ) -> Result<(Framed<TcpStream, WireCodec>, Duration, usize), Refused> {
        let addrs: Vec<_> = self
            .options
            .topology
            .to_socket_addrs()
            .map_err(|e| Refused::Retry(format!("resolving {}: {e}", self.options.topology)))?
            .collect();
        let mut last = String::from("no address");
        let mut stream = None;
        for addr in addrs {
            match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    stream = Some(s);
                    break;
                }
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "connect timed out".into(),
            }
        }
        let stream = stream.ok_or(Refused::Retry(last))?;
        let _ = stream.set_nodelay(true);
        let mut framed = Framed::new(stream, WireCodec::handshake());
        let step = Duration::from_secs(5);
        let send = |e: WireError| Refused::Retry(e.to_string());
        framed
            .send(Frame::Hello {
                version: wire::VERSION,
                task: self.task.clone(),
            })
            .await
            .map_err(send)?;
        let nonce = match recv(&mut framed, step).await? {
            Frame::Challenge { nonce } => nonce,
            other => return Err(refused(other)),
        };
        let secret = self.options.secret.clone().unwrap_or_default();
        framed
            .send(Frame::Auth {
                mac: wire::sign(&secret, &nonce, &self.task),
            })
            .await
            .map_err(send)?;
        match recv(&mut framed, step).await? {
            Frame::Welcome { at_most_once, .. } if at_most_once != self.at_most_once => {
                let (yes, no) = if at_most_once {
                    ("the topology", "this worker")
                } else {
                    ("this worker", "the topology")
                };
                Err(Refused::Fatal(format!(
                    "{yes} applies state updates at most once and {no} does not: set at_most_once_updates alike for both (Topology.toml or TopologyBuilder::at_most_once_updates)"
                )))
            }
            Frame::Welcome {
                worker,
                heartbeat_ms,
                max_frame,
                ..
            } => {
                framed.codec_mut().set_max(max_frame as usize);
                log::info!(
                    "Worker {} of task {} joined the topology at {} as worker {worker}.",
                    self.worker,
                    self.task,
                    self.options.topology
                );
                Ok((
                    framed,
                    Duration::from_millis(u64::from(heartbeat_ms.max(10))),
                    max_frame as usize,
                ))
            }
            other => Err(refused(other)),
        }
    }

    async fn session(
        &mut self,
        mut framed: Framed<TcpStream, WireCodec>,
        heartbeat: Duration,
        max_frame: usize,
    ) -> End {
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        let mut fetches = 0usize; // outstanding at the topology
        let mut queued = 0usize; // handed to the task thread, not yet taken
        let mut in_task = 0usize; // taken, results not yet complete
        let mut draining = *self.stop.borrow();
        let mut drain_until = Instant::now() + self.options.graceful_shutdown;
        let mut stop = self.stop.clone();
        let mut last_heard = Instant::now();
        let mut last_sent = Instant::now();
        let mut tick = tokio::time::interval(heartbeat);
        // The batches handed to the task thread and not complete, oldest
        // first: what a give-back takes from.
        let mut handed: std::collections::VecDeque<Arc<SharedBatch>> =
            std::collections::VecDeque::new();
        loop {
            if draining && (queued > 0 || in_task > 0) && Instant::now() >= drain_until {
                log::warn!(
                    "Worker {} of task {} still holds {} unfinished batch(es) after the graceful shutdown ({:?}); it gives back what it has not started, leaves the message in its task call to the topology's failure policy, and disconnects.",
                    self.worker,
                    self.task,
                    queued + in_task,
                    self.options.graceful_shutdown
                );
                // What the task thread has not claimed goes back, so the
                // topology hands it to another worker instead of failing it.
                let _ = give_back(&handed, &mut framed).await;
                let _ = SinkExt::<Frame>::close(&mut framed).await;
                return End::Drained;
            }
            if draining && queued == 0 && in_task == 0 {
                let _ = framed.send(Frame::Goodbye).await;
                let _ = SinkExt::<Frame>::close(&mut framed).await;
                return End::Drained;
            }
            while !draining && fetches + queued < PREFETCH {
                if let Err(e) = framed
                    .send(Frame::Fetch {
                        max: self.options.fetch_max as u32,
                    })
                    .await
                {
                    return End::Lost(e.to_string());
                }
                fetches += 1;
                last_sent = Instant::now();
            }
            tokio::select! {
                frame = framed.next() => {
                    last_heard = Instant::now();
                    match frame {
                        Some(Ok(Frame::Batch(batch))) => {
                            // Decoded here: nobody else holds it.
                            let mut batch = Arc::unwrap_or_clone(batch);
                            self.dag.name_parents(&mut batch);
                            fetches = fetches.saturating_sub(1);
                            queued += 1;
                            let shared = SharedBatch::new(batch);
                            handed.push_back(Arc::clone(&shared));
                            if self.batch_tx.send((epoch, shared)).await.is_err() {
                                return End::TaskThreadGone;
                            }
                        }
                        Some(Ok(Frame::Heartbeat)) => {}
                        Some(Ok(Frame::GiveBack)) => {
                            if let Err(e) = give_back(&handed, &mut framed).await {
                                return End::Lost(e.to_string());
                            }
                            last_sent = Instant::now();
                        }
                        Some(Ok(Frame::Error { code: ErrorCode::ShuttingDown, .. })) => return End::TopologyStopped,
                        Some(Ok(Frame::Error { code, message })) => return End::Lost(format!("{code:?}: {message}")),
                        Some(Ok(other)) => return End::Lost(format!("unexpected frame {other:?}")),
                        Some(Err(e)) => return End::Lost(e.to_string()),
                        None => return End::Lost("the topology closed the connection".into()),
                    }
                }
                msg = self.io_rx.recv() => {
                    match msg {
                        Some(ToIo::Took(e)) if e == epoch => {
                            queued = queued.saturating_sub(1);
                            in_task += 1;
                        }
                        Some(ToIo::Results(e, r)) if e == epoch => {
                            if r.complete {
                                in_task = in_task.saturating_sub(1);
                                handed.pop_front();
                            }
                            let max = max_frame;
                            for frame in split_results(r, max) {
                                if let Err(err) = framed.send(frame).await {
                                    return End::Lost(err.to_string());
                                }
                            }
                            last_sent = Instant::now();
                        }
                        Some(ToIo::Ticks(outputs)) => {
                            if let Err(err) = framed.send(Frame::Ticks(outputs)).await {
                                return End::Lost(err.to_string());
                            }
                            last_sent = Instant::now();
                        }
                        Some(_) => {}
                        None => return End::TaskThreadGone,
                    }
                }
                _ = tick.tick() => {
                    if last_heard.elapsed() > heartbeat * 3 {
                        return End::Lost(format!("the topology has been silent for {:?}", last_heard.elapsed()));
                    }
                    if last_sent.elapsed() >= heartbeat {
                        if let Err(e) = framed.send(Frame::Heartbeat).await {
                            return End::Lost(e.to_string());
                        }
                        last_sent = Instant::now();
                    }
                }
                _ = stop.wait_for(|s| *s), if !draining => {
                    log::info!("Worker {} of task {} is finishing what it holds, then disconnecting.", self.worker, self.task);
                    draining = true;
                    drain_until = Instant::now() + self.options.graceful_shutdown;
                    // Withdraw the fetches still outstanding, so the topology
                    // sends nothing more to a worker that is leaving.
                    if fetches > 0 {
                        if let Err(e) = framed.send(Frame::Fetch { max: 0 }).await {
                            return End::Lost(e.to_string());
                        }
                        fetches = 0;
                    }
                }
                _ = tokio::time::sleep_until(drain_until.into()), if draining => {}
            }
        }
    }
}

/// Sends back what the task thread has not claimed of each batch it was
/// handed: one `Returned` frame per batch (each came in one frame, so each
/// fits one).
async fn give_back(
    handed: &std::collections::VecDeque<Arc<SharedBatch>>,
    framed: &mut Framed<TcpStream, WireCodec>,
) -> Result<(), WireError> {
    for batch in handed {
        let rest = batch.take_rest();
        if !rest.is_empty() {
            framed.send(Frame::Returned(rest)).await?;
        }
    }
    Ok(())
}

async fn recv(framed: &mut Framed<TcpStream, WireCodec>, wait: Duration) -> Result<Frame, Refused> {
    match tokio::time::timeout(wait, framed.next()).await {
        Err(_) => Err(Refused::Retry("the handshake timed out".into())),
        Ok(None) => Err(Refused::Retry("the topology closed the connection".into())),
        Ok(Some(Err(e))) => Err(Refused::Retry(e.to_string())),
        Ok(Some(Ok(f))) => Ok(f),
    }
}

fn refused(frame: Frame) -> Refused {
    match frame {
        Frame::Error { code, message } if code.is_retryable() => Refused::Retry(message),
        Frame::Error { message, .. } => Refused::Fatal(message),
        other => Refused::Retry(format!("unexpected frame {other:?} in the handshake")),
    }
}

/// `d` ± up to 25%, so that many workers do not reconnect in lockstep.
fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = if getrandom::getrandom(&mut b).is_ok() {
        u16::from_le_bytes(b) as f64 / u16::MAX as f64
    } else {
        0.5
    };
    d.mul_f64(0.75 + r * 0.5)
}

/// Splits one batch's results into frames of at most `max_frame` bytes
/// (only the last marked complete). A message whose outputs alone exceed
/// the limit is reported as failed instead of being sent.
fn split_results(results: Results, max_frame: usize) -> Vec<Frame> {
    let size = wire::RESULTS_HEAD
        + results
            .items
            .iter()
            .map(|(_, v)| wire::result_item_len(v))
            .sum::<usize>()
        + results.outputs.iter().map(wire::output_len).sum::<usize>();
    if size <= max_frame {
        // As usual: all in one frame, as they are.
        return vec![Frame::Results {
            complete: results.complete,
            items: results.items,
            outputs: results.outputs,
        }];
    }
    let mut frames = Vec::new();
    let mut items = Vec::new();
    let mut outputs = Vec::new();
    let mut size = wire::RESULTS_HEAD;
    let mut rest = results.outputs.into_iter();
    for (ticket, verdict) in results.items {
        // This message's outputs are the next `k` of the batch's.
        let k = match verdict {
            Verdict::Done(k) => (k as usize).min(rest.len()),
            _ => 0,
        };
        let bytes: usize = rest.as_slice()[..k].iter().map(wire::output_len).sum();
        let own = wire::result_item_len(&verdict) + bytes;
        let (verdict, k, own) = if wire::RESULTS_HEAD + own > max_frame {
            rest.by_ref().take(k).for_each(drop);
            let verdict = Verdict::Error(format!(
                "the outputs ({bytes} bytes) exceed the frame limit of {max_frame} bytes"
            ));
            let own = wire::result_item_len(&verdict);
            (verdict, 0, own)
        } else {
            (verdict, k, own)
        };
        if size + own > max_frame && !items.is_empty() {
            frames.push(Frame::Results {
                complete: false,
                items: std::mem::take(&mut items),
                outputs: std::mem::take(&mut outputs),
            });
            size = wire::RESULTS_HEAD;
        }
        size += own;
        items.push((ticket, verdict));
        outputs.extend(rest.by_ref().take(k));
    }
    frames.push(Frame::Results {
        complete: results.complete,
        items,
        outputs,
    });
    frames
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{Emitted, Ticket};
    use bytes::Bytes;

    fn t(slot: u32) -> Ticket {
        Ticket {
            slot,
            gen: 0,
            task: 0,
            copy: 0,
        }
    }

    #[test]
    fn results_are_split_to_fit_frames() {
        let big = Bytes::from(vec![0u8; 400]);
        let r = Results {
            worker: 0,
            items: vec![
                (t(0), Verdict::Done(1)),
                (t(1), Verdict::Done(1)),
                (t(2), Verdict::Filtered),
            ],
            outputs: vec![Emitted::plain(big.clone()), Emitted::plain(big.clone())],
            spent: Vec::new(),
            complete: true,
            returned: Vec::new(),
            busy_ns: 0,
        };
        let frames = split_results(r, 600);
        assert_eq!(frames.len(), 2);
        for (i, f) in frames.iter().enumerate() {
            assert!(f.to_wire().len() - 4 <= 600, "frame {i} too big");
            match f {
                Frame::Results { complete, .. } => assert_eq!(*complete, i == 1),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn outputs_larger_than_a_frame_fail_their_message() {
        let r = Results {
            worker: 0,
            items: vec![(t(0), Verdict::Done(1)), (t(1), Verdict::Done(0))],
            outputs: vec![Emitted::plain(Bytes::from(vec![0u8; 5000]))],
            spent: Vec::new(),
            complete: true,
            returned: Vec::new(),
            busy_ns: 0,
        };
        let frames = split_results(r, 1024);
        assert_eq!(frames.len(), 1);
        match &frames[0] {
            Frame::Results {
                items,
                outputs,
                complete,
            } => {
                assert!(*complete);
                assert!(outputs.is_empty());
                assert!(
                    matches!(&items[0].1, Verdict::Error(m) if m.contains("exceed the frame limit"))
                );
                assert_eq!(items[1].1, Verdict::Done(0));
            }
            other => panic!("{other:?}"),
        }
    }
}
