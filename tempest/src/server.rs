//! The topology process's side of distributed mode: a TCP listener and one
//! session actor per worker connection.
//!
//! A connection first goes through the handshake (see [`crate::wire`]) with
//! a tiny frame limit and a deadline; a client that sends garbage, too much
//! or nothing at all is dropped without touching the pipeline. At most
//! `max_handshakes` connections may be in the handshake at once: the
//! listener closes any more at once, so idle or hostile sockets cannot use
//! up the process's file descriptors or keep real workers out for long.
//! Refused connections are logged in full a few times per period, then
//! counted and summed up once per period. A session
//! that completes it registers with the pipeline as a worker of its task and
//! then relays fetches and results one way and batches the other. When a
//! session ends (disconnect, heartbeat loss, protocol error) the pipeline
//! is told at once, and hands what the worker held to the failure policy.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::io::{FramedWrite, WriteHandler};
use actix::prelude::*;
use futures_util::{SinkExt, StreamExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::{Framed, FramedRead};

use crate::actors::pipeline::{PipelineActor, RegisterWorker, WorkerLost};
use crate::actors::{unshared, DeliverySink, Fetch, Results, Ticks, Undelivered, WorkerId};
use crate::error::Error;
use crate::msg::TaskMsg;
use crate::pipeline::{Dag, TaskIdx};
use crate::wire::{self, ErrorCode, Frame, WireCodec, WireError};
use crate::worker::SharedBatch;

/// How the topology process serves workers.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Where to listen.
    pub bind: SocketAddr,
    /// The shared secret workers must prove they know; `None` accepts any
    /// worker (then bind to loopback only).
    pub secret: Option<Vec<u8>>,
    /// The frame limit after the handshake.
    pub max_frame: usize,
    /// How often each side sends a heartbeat when idle; a peer silent for
    /// three intervals is dropped.
    pub heartbeat: Duration,
    /// How long a client may take to complete the handshake.
    pub handshake_timeout: Duration,
    /// The most connections in the handshake at once; the listener closes
    /// any more at once.
    pub max_handshakes: usize,
}

/// The default of [`ServeOptions::max_handshakes`].
pub const DEFAULT_MAX_HANDSHAKES: usize = 64;

impl ServeOptions {
    /// Loopback, an ephemeral port, no secret, defaults otherwise.
    pub fn loopback() -> Self {
        ServeOptions {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            secret: None,
            max_frame: wire::DEFAULT_MAX_FRAME,
            heartbeat: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(5),
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
        }
    }
}

/// Binds the listener, before anything else of the topology starts, so a
/// busy or forbidden address fails the start at once and names itself.
pub(crate) fn bind(options: &ServeOptions) -> Result<std::net::TcpListener, Error> {
    let what = || format!("listening for task workers on {}", options.bind);
    let listener = std::net::TcpListener::bind(options.bind).map_err(|e| Error::Io {
        what: what(),
        source: e,
    })?;
    listener.set_nonblocking(true).map_err(|e| Error::Io {
        what: what(),
        source: e,
    })?;
    Ok(listener)
}

/// How many refused connections per period are logged in full.
const REFUSALS_LOGGED: u32 = 5;
/// The period after which further refusals are summed up in one line.
const REFUSALS_PERIOD: Duration = Duration::from_secs(10);

/// Rate-limits the warnings about refused connections.
#[derive(Default)]
struct Refusals {
    logged: u32,
    unlogged: u64,
}

impl Refusals {
    fn refused(&mut self, peer: SocketAddr, why: &str) {
        if self.logged < REFUSALS_LOGGED {
            self.logged += 1;
            log::warn!("Connection from {peer} refused: {why}.");
            if self.logged == REFUSALS_LOGGED {
                log::warn!(
                    "Further refused connections are counted and summed up every {} s.",
                    REFUSALS_PERIOD.as_secs()
                );
            }
        } else {
            self.unlogged += 1;
        }
    }

    /// The period is over: sums up what was not logged.
    fn period(&mut self) {
        if self.unlogged > 0 {
            log::warn!(
                "{} more connection(s) were refused in the last {} s (too many in the handshake, or the handshake failed).",
                self.unlogged,
                REFUSALS_PERIOD.as_secs()
            );
        }
        *self = Refusals::default();
    }
}

/// Starts serving on `listener` (from [`bind`]); returns its address. Runs
/// on the current actix arbiter until the system stops.
pub(crate) async fn listen(
    listener: std::net::TcpListener,
    options: ServeOptions,
    dag: Arc<Dag>,
    pipeline: Addr<PipelineActor>,
    at_most_once: bool,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::from_std(listener)?;
    let local = listener.local_addr()?;
    match (&options.secret, local.ip().is_loopback()) {
        (None, true) => log::info!(
            "Listening for task workers on {local} (loopback only: no secret is configured)."
        ),
        (None, false) => log::warn!(
            "Listening for task workers on {local} WITHOUT a secret: anyone who can reach this address can join. Set a secret."
        ),
        (Some(_), _) => log::info!("Listening for task workers on {local}; workers must prove the secret."),
    }
    let handshakes = Arc::new(Semaphore::new(options.max_handshakes.max(1)));
    let options = Arc::new(options);
    actix_rt::spawn(async move {
        let refusals = Rc::new(RefCell::new(Refusals::default()));
        let mut period = tokio::time::interval(REFUSALS_PERIOD);
        period.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        period.tick().await;
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = period.tick() => {
                    refusals.borrow_mut().period();
                    continue;
                }
            };
            match accepted {
                Ok((stream, peer)) => {
                    let Ok(permit) = Arc::clone(&handshakes).try_acquire_owned() else {
                        // Closed at once: the client sees the connection end.
                        drop(stream);
                        let why = format!(
                            "{} connections are already in the handshake (max_handshakes)",
                            options.max_handshakes
                        );
                        refusals.borrow_mut().refused(peer, &why);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let (options, dag, pipeline) =
                        (Arc::clone(&options), Arc::clone(&dag), pipeline.clone());
                    let refusals = Rc::clone(&refusals);
                    actix_rt::spawn(async move {
                        if let Err(why) =
                            accept(stream, peer, options, dag, pipeline, at_most_once, permit).await
                        {
                            refusals.borrow_mut().refused(peer, &why);
                        }
                    });
                }
                Err(e) => {
                    log::warn!("Accepting a connection failed: {e}.");
                    actix_rt::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    Ok(local)
}

async fn refuse(
    framed: &mut Framed<TcpStream, WireCodec>,
    code: ErrorCode,
    message: String,
) -> String {
    let _ = framed
        .send(Frame::Error {
            code,
            message: message.clone(),
        })
        .await;
    message
}

async fn next_frame(
    framed: &mut Framed<TcpStream, WireCodec>,
    deadline: Instant,
) -> Result<Frame, String> {
    let wait = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(wait, framed.next()).await {
        Err(_) => Err("the handshake timed out".into()),
        Ok(None) => Err("the client closed the connection".into()),
        Ok(Some(Err(WireError::Decode(e)))) => Err(refuse(
            framed,
            ErrorCode::NotTempest,
            format!("not a Tempest worker ({e})"),
        )
        .await),
        Ok(Some(Err(e))) => Err(format!("the client's frames are unusable ({e})")),
        Ok(Some(Ok(frame))) => Ok(frame),
    }
}

async fn accept(
    stream: TcpStream,
    peer: SocketAddr,
    options: Arc<ServeOptions>,
    dag: Arc<Dag>,
    pipeline: Addr<PipelineActor>,
    // Whether the topology applies state updates at most once (the worker
    // must give outputs paths).
    at_most_once: bool,
    // Held until the handshake is over, either way.
    _handshake: OwnedSemaphorePermit,
) -> Result<(), String> {
    let deadline = Instant::now() + options.handshake_timeout;
    let mut framed = Framed::new(stream, WireCodec::handshake());
    let (version, task) = match next_frame(&mut framed, deadline).await? {
        Frame::Hello { version, task } => (version, task),
        other => {
            let msg = format!("expected Hello, got {}", frame_name(&other));
            return Err(refuse(&mut framed, ErrorCode::NotTempest, msg).await);
        }
    };
    if version != wire::VERSION {
        let msg = format!(
            "protocol version {version} is not supported; this topology speaks version {}",
            wire::VERSION
        );
        return Err(refuse(&mut framed, ErrorCode::Version, msg).await);
    }
    let Some(task_idx) = dag.index_of(&task) else {
        let msg = format!(
            "this topology has no task \"{task}\"; its tasks are: {}",
            dag.names().join(", ")
        );
        return Err(refuse(&mut framed, ErrorCode::UnknownTask, msg).await);
    };
    let nonce = wire::nonce().map_err(|e| format!("no randomness for a nonce: {e}"))?;
    framed
        .send(Frame::Challenge { nonce })
        .await
        .map_err(|e| e.to_string())?;
    let mac = match next_frame(&mut framed, deadline).await? {
        Frame::Auth { mac } => mac,
        other => {
            let msg = format!("expected Auth, got {}", frame_name(&other));
            return Err(refuse(&mut framed, ErrorCode::Protocol, msg).await);
        }
    };
    if let Some(secret) = &options.secret {
        if !wire::verify(secret, &nonce, &task, &mac) {
            let msg = "wrong secret".to_string();
            return Err(refuse(&mut framed, ErrorCode::Auth, msg).await);
        }
    }

    let mut ctx: Context<Session> = Context::new();
    let worker = pipeline
        .send(RegisterWorker {
            task: task_idx,
            sink: Box::new(SessionSink {
                deliver: ctx.address().recipient(),
                close: ctx.address().recipient(),
                give_back: ctx.address().recipient(),
                max_frame: options.max_frame,
            }),
        })
        .await;
    let Ok(worker) = worker else {
        let msg = "the topology is shutting down".to_string();
        return Err(refuse(&mut framed, ErrorCode::ShuttingDown, msg).await);
    };
    framed
        .send(Frame::Welcome {
            worker,
            heartbeat_ms: options.heartbeat.as_millis() as u32,
            max_frame: options.max_frame as u32,
            at_most_once,
        })
        .await
        .map_err(|e| e.to_string())?;
    log::info!("Worker {worker} for task {task} connected from {peer}.");

    let parts = framed.into_parts();
    let (read, write) = parts.io.into_split();
    let mut reader = FramedRead::new(read, WireCodec::with_max(options.max_frame));
    reader.read_buffer_mut().extend_from_slice(&parts.read_buf);
    ctx.add_stream(reader);
    let writer = FramedWrite::new(write, WireCodec::with_max(options.max_frame), &mut ctx);
    ctx.run(Session {
        worker,
        task: task_idx,
        peer,
        pipeline,
        writer,
        heartbeat: options.heartbeat,
        dag: Arc::clone(&dag),
        last_heard: Instant::now(),
        last_sent: Instant::now(),
        closing: false,
    });
    Ok(())
}

fn frame_name(frame: &Frame) -> &'static str {
    match frame {
        Frame::Hello { .. } => "Hello",
        Frame::Challenge { .. } => "Challenge",
        Frame::Auth { .. } => "Auth",
        Frame::Welcome { .. } => "Welcome",
        Frame::Fetch { .. } => "Fetch",
        Frame::Batch(_) => "Batch",
        Frame::Results { .. } => "Results",
        Frame::Ticks(_) => "Ticks",
        Frame::Heartbeat => "Heartbeat",
        Frame::Goodbye => "Goodbye",
        Frame::GiveBack => "GiveBack",
        Frame::Returned(_) => "Returned",
        Frame::Error { .. } => "Error",
    }
}

/// One worker connection after its handshake.
struct Session {
    worker: WorkerId,
    task: TaskIdx,
    dag: Arc<Dag>,
    peer: SocketAddr,
    pipeline: Addr<PipelineActor>,
    writer: FramedWrite<Frame, OwnedWriteHalf, WireCodec>,
    heartbeat: Duration,
    last_heard: Instant,
    last_sent: Instant,
    closing: bool,
}

impl Session {
    fn protocol_error(&mut self, ctx: &mut Context<Self>, message: String) {
        log::warn!(
            "Worker {} ({}): {message}; disconnecting.",
            self.worker,
            self.peer
        );
        self.writer.write(Frame::Error {
            code: ErrorCode::Protocol,
            message,
        });
        self.close(ctx);
    }

    /// Stops reading; the session stops once what was written is flushed
    /// (`WriteHandler::finished`), or after a second at the latest.
    fn close(&mut self, ctx: &mut Context<Self>) {
        self.closing = true;
        self.writer.close();
        ctx.run_later(Duration::from_secs(1), |_, ctx| ctx.stop());
    }
}

impl Actor for Session {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.heartbeat, |act, ctx| {
            if act.last_heard.elapsed() > act.heartbeat * 3 {
                log::warn!(
                    "Worker {} ({}) has been silent for {:?}; disconnecting.",
                    act.worker,
                    act.peer,
                    act.last_heard.elapsed()
                );
                ctx.stop();
                return;
            }
            if act.last_sent.elapsed() >= act.heartbeat {
                act.writer.write(Frame::Heartbeat);
                act.last_sent = Instant::now();
            }
        });
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        self.pipeline.do_send(WorkerLost(self.worker));
    }
}

impl WriteHandler<WireError> for Session {
    fn error(&mut self, err: WireError, _ctx: &mut Context<Self>) -> Running {
        log::warn!(
            "Writing to worker {} ({}) failed: {err}.",
            self.worker,
            self.peer
        );
        Running::Stop
    }
}

impl StreamHandler<Result<Frame, WireError>> for Session {
    fn handle(&mut self, frame: Result<Frame, WireError>, ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        self.last_heard = Instant::now();
        match frame {
            Ok(Frame::Fetch { max }) => self.pipeline.do_send(Fetch {
                worker: self.worker,
                max: max as usize,
            }),
            Ok(Frame::Results {
                complete,
                items,
                outputs,
            }) => {
                if items.iter().any(|(t, _)| t.task != self.task) {
                    return self.protocol_error(ctx, "results for another task".into());
                }
                self.pipeline.do_send(Results {
                    worker: self.worker,
                    items,
                    outputs,
                    spent: Vec::new(),
                    complete,
                    returned: Vec::new(),
                    busy_ns: 0,
                });
            }
            Ok(Frame::Returned(mut msgs)) => {
                if msgs.iter().any(|m| m.ticket.task != self.task) {
                    return self.protocol_error(ctx, "returned messages of another task".into());
                }
                self.dag.name_parents(&mut msgs);
                self.pipeline.do_send(Results {
                    worker: self.worker,
                    items: Vec::new(),
                    outputs: Vec::new(),
                    spent: Vec::new(),
                    complete: false,
                    returned: msgs,
                    busy_ns: 0,
                });
            }
            Ok(Frame::Ticks(outputs)) => self.pipeline.do_send(Ticks {
                worker: self.worker,
                outputs,
            }),
            Ok(Frame::Heartbeat) => {}
            Ok(Frame::Goodbye) => {
                log::info!("Worker {} ({}) said goodbye.", self.worker, self.peer);
                ctx.stop();
            }
            Ok(other) => {
                let msg = format!("unexpected {} frame", frame_name(&other));
                self.protocol_error(ctx, msg);
            }
            Err(e) => {
                let msg = format!("unreadable frame: {e}");
                self.protocol_error(ctx, msg);
            }
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        log::debug!(
            "Worker {} ({}) closed its connection.",
            self.worker,
            self.peer
        );
        ctx.stop();
    }
}

/// Task messages for the session's worker.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct Deliver(Arc<Vec<TaskMsg>>);

impl Handler<Deliver> for Session {
    type Result = ();

    fn handle(&mut self, Deliver(batch): Deliver, _ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        self.writer.write(Frame::Batch(batch));
        self.last_sent = Instant::now();
    }
}

/// Asks the worker for the messages it has not started.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct GiveBack;

impl Handler<GiveBack> for Session {
    type Result = ();

    fn handle(&mut self, _: GiveBack, _ctx: &mut Context<Self>) {
        if !self.closing {
            self.writer.write(Frame::GiveBack);
            self.last_sent = Instant::now();
        }
    }
}

/// Ends the session: the topology is shutting down.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct CloseSession;

impl Handler<CloseSession> for Session {
    type Result = ();

    fn handle(&mut self, _: CloseSession, ctx: &mut Context<Self>) {
        self.writer.write(Frame::Error {
            code: ErrorCode::ShuttingDown,
            message: "the topology is shutting down".into(),
        });
        self.close(ctx);
    }
}

struct SessionSink {
    deliver: Recipient<Deliver>,
    close: Recipient<CloseSession>,
    give_back: Recipient<GiveBack>,
    max_frame: usize,
}

impl DeliverySink for SessionSink {
    fn deliver(&mut self, batch: Vec<TaskMsg>) -> Result<Option<Arc<SharedBatch>>, Undelivered> {
        self.deliver_shared(Arc::new(batch)).map(|()| None)
    }

    fn deliver_shared(&mut self, batch: Arc<Vec<TaskMsg>>) -> Result<(), Undelivered> {
        if !self.deliver.connected() {
            return Err(Undelivered::Gone(unshared(batch)));
        }
        self.deliver.do_send(Deliver(batch));
        Ok(())
    }

    fn close(&mut self) {
        self.close.do_send(CloseSession);
    }

    fn max_batch_bytes(&self) -> Option<usize> {
        Some(self.max_frame.saturating_sub(wire::BATCH_HEAD))
    }

    fn give_back(&mut self) {
        self.give_back.do_send(GiveBack);
    }
}
