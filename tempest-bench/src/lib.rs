//! Tempest's benchmark harness.
//!
//! # How this crate is laid out
//!
//! - [`BenchSource`]: a generating source that can pace itself to a rate and
//!   records every message's latency from poll to ack in an HDR histogram.
//! - [`Params`] and [`run_scenario`]: one measured run of a topology shape
//!   (linear, diamond, fan-out) with its payload size, workers, rate and
//!   bound on messages in flight; [`Measured`] is what it reports.
//! - [`channel_baseline`]: the machine's ceiling for this shape: three
//!   threads joined by bounded channels passing the same payloads in batches.
//! - [`memory_probe`]: resident memory with `max_pending` messages held in
//!   flight, to compute the runtime's bytes per in-flight message.
//! - [`SpreadParams`] and [`run_spread`]: one burst through a task that
//!   waits per message (I/O-like), with 1 or more workers: how the burst
//!   spreads over them and how much sooner it is all acked.
//!
//! - [`wordcount_bench`]: word count with keyed state, by key or shuffled,
//!   in memory or checkpointed to Redis.
//!
//! The `tempest-bench` binary runs each measurement in a child process of
//! its own (so peak RSS is per scenario), interleaves repeated rounds with
//! the baseline, and writes `BENCHMARKS.md`.

pub mod redis_bench;
pub mod wordcount_bench;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tempest::standalone::{self, RunOptions, RuntimeHandle};
use tempest::{FailurePolicy, Msg, MsgCtx, Output, Pipeline, Task, TaskResult, TopologyBuilder};
use tempest_source::{AckPolicy, MsgId, Source, SourceError, SourceMsg, SourceSettings};

/// The shape of a benchmark topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// source → a → b → c
    Linear,
    /// source → root → (left, right) → join
    Diamond,
    /// source → root → 8 leaves
    FanOut,
}

impl Shape {
    /// Task messages per source message.
    pub fn hops(self) -> u64 {
        match self {
            Shape::Linear => 3,
            Shape::Diamond => 4,
            Shape::FanOut => 9,
        }
    }
}

/// One measured run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Params {
    /// The topology's shape.
    pub shape: Shape,
    /// Source messages to run; with `rate`, the run lasts messages / rate.
    pub messages: u64,
    /// Payload size in bytes.
    pub payload: usize,
    /// Copy each payload from a template (a fresh allocation per message,
    /// as a real source makes) instead of sharing one `Bytes`.
    pub copy_payloads: bool,
    /// Workers per task.
    pub workers: usize,
    /// Pace the source to this many messages per second.
    pub rate: Option<f64>,
    /// The bound on messages in flight.
    pub max_pending: usize,
    /// RSS samples to take (seconds from the start), for the soak run.
    pub rss_at_secs: Vec<f64>,
    /// Stop after this many seconds (for endless runs).
    pub duration_s: Option<f64>,
    /// Measure latency and check every ack (see [`BenchSourceConfig::track`]).
    pub track: bool,
    /// See [`BenchSourceConfig::warmup_s`].
    pub warmup_s: f64,
}

impl Params {
    /// Linear, 100-byte shared payloads, one worker per task, as fast as it goes.
    pub fn new(shape: Shape, messages: u64) -> Self {
        Params {
            shape,
            messages,
            payload: 100,
            copy_payloads: false,
            workers: 1,
            rate: None,
            max_pending: 16_384,
            rss_at_secs: Vec::new(),
            duration_s: None,
            track: true,
            warmup_s: 0.5,
        }
    }
}

/// What one run measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    /// Source messages acked.
    pub acked: u64,
    /// Whether every message was acked exactly as many times as it was sent.
    pub all_acked: bool,
    /// Wall-clock seconds of the run.
    pub elapsed_s: f64,
    /// Acked messages per second.
    pub rate: f64,
    /// End-to-end latency (poll → ack) percentiles, in microseconds.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Maximum.
    pub max_us: f64,
    /// Peak resident memory of the process, in KiB.
    pub peak_rss_kib: u64,
    /// (seconds, resident KiB) samples.
    pub rss_samples: Vec<(f64, u64)>,
}

/// Shared state between a [`BenchSource`] and its reader.
#[derive(Debug)]
pub struct Recorder {
    acked: AtomicU64,
    duplicate_or_unknown: AtomicU64,
    latency: Mutex<Histogram<u64>>,
}

impl Recorder {
    fn new() -> Result<Self, SourceError> {
        let latency = Histogram::new_with_bounds(1, 600_000_000_000, 3)
            .map_err(|e| SourceError::config(format!("latency histogram: {e}")))?;
        Ok(Recorder {
            acked: AtomicU64::new(0),
            duplicate_or_unknown: AtomicU64::new(0),
            latency: Mutex::new(latency),
        })
    }
}

/// A generating source that paces itself and measures poll → ack latency.
#[derive(Debug)]
pub struct BenchSource {
    template: Bytes,
    copy: bool,
    next: u64,
    total: u64,
    rate: Option<f64>,
    /// Set at the first poll, so the pacing does not count start-up time
    /// as time messages were due.
    start: Option<Instant>,
    poll_nanos: Vec<u64>,
    acked: Vec<bool>,
    warmup_nanos: u64,
    report: bool,
    /// (time of the first ack, acks before it) and the time of the last.
    first_ack: Option<(u64, u64)>,
    last_ack: u64,
    recorder: Arc<Recorder>,
}

/// The [`BenchSource`]'s configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchSourceConfig {
    /// Messages to generate.
    pub messages: u64,
    /// Payload size.
    pub payload: usize,
    /// Copy each payload (a fresh allocation per message).
    pub copy: bool,
    /// Messages per second, or as fast as polled.
    pub rate: Option<f64>,
    /// Record each message's latency and check acks per message (8 bytes
    /// and 1 byte per message); without it only acks are counted.
    pub track: bool,
    /// Leave messages polled in the first this-many seconds out of the
    /// latency histogram (start-up: threads starting, first page faults).
    pub warmup_s: f64,
    /// At shutdown, print what was measured as one JSON line on stdout
    /// (for runs in a separate topology process).
    #[serde(default)]
    pub report: bool,
}

impl BenchSource {
    /// The recorder to read acks and latencies from.
    pub fn recorder(&self) -> Arc<Recorder> {
        Arc::clone(&self.recorder)
    }
}

/// The benchmark sources' settings: polls of `poll_count`, 1 ms waits,
/// acks in batches of 1,024 or every millisecond.
fn bench_settings(poll_count: usize) -> SourceSettings {
    SourceSettings {
        poll_count,
        poll_interval: Duration::from_millis(1),
        max_backoff: Duration::from_millis(1),
        ack_policy: AckPolicy::Batch(1024),
        ack_interval: Duration::from_millis(1),
        // Nothing is delivered twice.
        counts_deliveries: true,
        ..SourceSettings::default()
    }
}

impl Source for BenchSource {
    type Config = BenchSourceConfig;

    fn name(&self) -> &str {
        "bench"
    }

    fn from_config(config: BenchSourceConfig) -> Result<Self, SourceError> {
        if config.rate.is_some_and(|r| r <= 0.0) {
            return Err(SourceError::config("rate must be positive"));
        }
        let n = if config.track {
            usize::try_from(config.messages)
                .map_err(|_| SourceError::config("messages does not fit in memory"))?
        } else {
            0
        };
        Ok(BenchSource {
            template: Bytes::from(vec![b'x'; config.payload]),
            copy: config.copy,
            next: 0,
            total: config.messages,
            rate: config.rate,
            start: None,
            poll_nanos: vec![0; n],
            acked: vec![false; n],
            warmup_nanos: (config.warmup_s.max(0.0) * 1e9) as u64,
            report: config.report,
            first_ack: None,
            last_ack: 0,
            recorder: Arc::new(Recorder::new()?),
        })
    }

    fn settings(&self) -> SourceSettings {
        bench_settings(1024)
    }

    fn poll(&mut self, max: usize, out: &mut Vec<SourceMsg>) -> Result<(), SourceError> {
        let now = self.start.get_or_insert_with(Instant::now).elapsed();
        let mut n = (max as u64).min(self.total - self.next);
        if let Some(rate) = self.rate {
            let due = (now.as_secs_f64() * rate) as u64;
            n = n.min(due.saturating_sub(self.next));
        }
        let now_ns = now.as_nanos() as u64;
        for _ in 0..n {
            let id = self.next;
            self.next += 1;
            if let Some(t) = self.poll_nanos.get_mut(id as usize) {
                *t = now_ns;
            }
            let payload = if self.copy {
                Bytes::copy_from_slice(&self.template)
            } else {
                self.template.clone()
            };
            out.push(SourceMsg {
                id: MsgId::Int(id),
                payload,
                timestamp: 0,
                delivered: 1,
                key: None,
                headers: Default::default(),
            });
        }
        Ok(())
    }

    fn ack(&mut self, id: &MsgId) -> Result<(), SourceError> {
        self.batch_ack(std::slice::from_ref(id))
    }

    fn batch_ack(&mut self, ids: &[MsgId]) -> Result<(), SourceError> {
        let now_ns = self.start.map_or(0, |s| s.elapsed().as_nanos() as u64);
        if self.first_ack.is_none() {
            self.first_ack = Some((now_ns, ids.len() as u64));
        }
        self.last_ack = now_ns;
        let mut hist = self
            .recorder
            .latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.acked.is_empty() {
            self.recorder
                .acked
                .fetch_add(ids.len() as u64, Ordering::Relaxed);
            return Ok(());
        }
        let mut good = 0;
        for id in ids {
            match id.as_int().map(|i| i as usize) {
                Some(i) if i < self.acked.len() && !self.acked[i] => {
                    self.acked[i] = true;
                    good += 1;
                    if self.poll_nanos[i] >= self.warmup_nanos {
                        hist.saturating_record(now_ns.saturating_sub(self.poll_nanos[i]).max(1));
                    }
                }
                _ => {
                    self.recorder
                        .duplicate_or_unknown
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.recorder.acked.fetch_add(good, Ordering::Relaxed);
        Ok(())
    }

    fn exhausted(&self) -> bool {
        self.next == self.total
    }

    fn shutdown(&mut self) -> Result<(), SourceError> {
        if self.report {
            let m = self.measured();
            match serde_json::to_string(&m) {
                Ok(line) => println!("{line}"),
                Err(e) => return Err(SourceError::failed_with("encoding the report", e)),
            }
        }
        Ok(())
    }
}

impl BenchSource {
    /// What this source measured: acks, the rate between the first and the
    /// last ack, latency, and this process's peak RSS.
    pub fn measured(&self) -> Measured {
        let acked = self.recorder.acked.load(Ordering::Relaxed);
        let hist = self
            .recorder
            .latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let us = |q: f64| hist.value_at_quantile(q) as f64 / 1_000.0;
        let (first, before) = self.first_ack.unwrap_or((0, 0));
        let window = (self.last_ack.saturating_sub(first)) as f64 / 1e9;
        Measured {
            acked,
            all_acked: acked == self.total
                && self.recorder.duplicate_or_unknown.load(Ordering::Relaxed) == 0,
            elapsed_s: self.last_ack as f64 / 1e9,
            rate: (acked.saturating_sub(before)) as f64 / window.max(1e-9),
            p50_us: us(0.5),
            p99_us: us(0.99),
            p999_us: us(0.999),
            max_us: hist.max() as f64 / 1_000.0,
            peak_rss_kib: rss_kib().1,
            rss_samples: Vec::new(),
        }
    }
}

/// The benchmark topology as a package: `tempest-bench pkg ...` runs it
/// with `tempest::rt`, configured by `[source.config]` (a
/// [`BenchSourceConfig`]).
pub fn package() -> TopologyBuilder {
    TopologyBuilder::new("bench-distributed")
        .source_config::<BenchSource>(BenchSourceConfig {
            messages: 1_000_000,
            payload: 100,
            copy: false,
            rate: None,
            track: true,
            warmup_s: 0.5,
            report: true,
        })
        .pipeline(pipeline(Shape::Linear))
        .failure_policy(FailurePolicy::None)
        .msg_timeout(Duration::from_secs(600))
}

/// Passes every message on unchanged.
#[derive(Clone, Debug)]
pub struct Pass {
    name: String,
    emits: bool,
}

impl Pass {
    fn new(name: impl Into<String>, emits: bool) -> Self {
        Pass {
            name: name.into(),
            emits,
        }
    }
}

impl Task for Pass {
    fn name(&self) -> &str {
        &self.name
    }
    fn handle(&mut self, msg: Msg, _: &MsgCtx) -> TaskResult {
        Ok(if self.emits {
            Output::One(msg)
        } else {
            Output::None
        })
    }
}

/// The pipeline of `shape`.
pub fn pipeline(shape: Shape) -> Pipeline {
    match shape {
        Shape::Linear => Pipeline::new()
            .task(Pass::new("a", true))
            .task(Pass::new("b", true))
            .task(Pass::new("c", false))
            .edge("a", "b")
            .edge("b", "c"),
        Shape::Diamond => Pipeline::new()
            .task(Pass::new("root", true))
            .task(Pass::new("left", true))
            .task(Pass::new("right", true))
            .task(Pass::new("join", false))
            .edge("root", "left")
            .edge("root", "right")
            .edge("left", "join")
            .edge("right", "join"),
        Shape::FanOut => {
            let mut p = Pipeline::new().task(Pass::new("root", true));
            for i in 0..8 {
                let leaf = format!("leaf{i}");
                p = p.task(Pass::new(leaf.clone(), false)).edge("root", leaf);
            }
            p
        }
    }
}

fn builder(params: &Params, source: BenchSource) -> TopologyBuilder {
    let mut b = TopologyBuilder::new(format!("bench-{:?}", params.shape).to_lowercase())
        .source(source)
        .pipeline(pipeline(params.shape))
        .failure_policy(FailurePolicy::None)
        .max_pending(params.max_pending)
        .msg_timeout(Duration::from_secs(600));
    if params.workers > 1 {
        for name in pipeline(params.shape).task_names() {
            b = b.workers(name.to_string(), params.workers);
        }
    }
    b
}

/// The process's resident and peak resident memory, in KiB (Linux).
pub fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Runs one scenario in this process and measures it.
pub fn run_scenario(params: &Params) -> Result<Measured, tempest::Error> {
    let source = BenchSource::from_config(BenchSourceConfig {
        messages: params.messages,
        payload: params.payload,
        copy: params.copy_payloads,
        rate: params.rate,
        track: params.track,
        warmup_s: params.warmup_s,
        report: false,
    })
    .map_err(|e| tempest::Error::Source {
        name: "bench".into(),
        source: e,
    })?;
    let recorder = source.recorder();
    let topology = builder(params, source).build()?;
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampler = if params.rss_at_secs.is_empty() {
        None
    } else {
        let at = params.rss_at_secs.clone();
        let samples = Arc::clone(&samples);
        Some(std::thread::spawn(move || {
            let start = Instant::now();
            for t in at {
                let wait = Duration::from_secs_f64(t).saturating_sub(start.elapsed());
                std::thread::sleep(wait);
                let (rss, _) = rss_kib();
                samples
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((t, rss));
            }
        }))
    };
    let report = standalone::run(
        topology,
        RunOptions {
            deadline: params.duration_s.map(Duration::from_secs_f64),
            ..RunOptions::default()
        },
    )?;
    if let Some(s) = sampler {
        let _ = s.join();
    }
    let hist = recorder
        .latency
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let acked = recorder.acked.load(Ordering::Relaxed);
    let rss_samples = samples
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1_000.0;
    Ok(Measured {
        acked,
        all_acked: recorder.duplicate_or_unknown.load(Ordering::Relaxed) == 0
            && report.stats.acked == acked
            && report.stats.acked == report.stats.read
            && (params.duration_s.is_some() || acked == params.messages),
        elapsed_s: report.elapsed.as_secs_f64(),
        rate: acked as f64 / report.elapsed.as_secs_f64().max(1e-9),
        p50_us: us(0.5),
        p99_us: us(0.99),
        p999_us: us(0.999),
        max_us: hist.max() as f64 / 1_000.0,
        peak_rss_kib: rss_kib().1,
        rss_samples,
    })
}

/// The baseline: three threads joined by bounded channels, passing batches
/// of 1,024 clones of one 100-byte `Bytes`; returns messages per second.
pub fn channel_baseline(messages: u64, payload: usize) -> f64 {
    const BATCH: usize = 1024;
    let template = Bytes::from(vec![b'x'; payload]);
    let (tx1, rx1) = sync_channel::<Vec<Bytes>>(4);
    let (tx2, rx2) = sync_channel::<Vec<Bytes>>(4);
    let (back_tx, back_rx) = sync_channel::<Vec<Bytes>>(8);
    let start = Instant::now();
    let producer = std::thread::spawn(move || {
        let mut left = messages;
        while left > 0 {
            let n = (left as usize).min(BATCH);
            let mut batch = back_rx
                .try_recv()
                .unwrap_or_else(|_| Vec::with_capacity(BATCH));
            batch.extend((0..n).map(|_| template.clone()));
            left -= n as u64;
            if tx1.send(batch).is_err() {
                break;
            }
        }
    });
    let middle = std::thread::spawn(move || {
        for batch in rx1 {
            if tx2.send(batch).is_err() {
                break;
            }
        }
    });
    let mut seen = 0u64;
    for mut batch in rx2 {
        seen += batch.len() as u64;
        batch.clear();
        let _ = back_tx.try_send(batch);
    }
    let _ = producer.join();
    let _ = middle.join();
    seen as f64 / start.elapsed().as_secs_f64().max(1e-9)
}

/// Holds `max_pending` messages in flight (the first task is stuck until
/// they all are) and returns the resident memory at that point, in KiB.
pub fn memory_probe(max_pending: usize) -> Result<u64, tempest::Error> {
    let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let g = Arc::clone(&gate);
    let stuck = Pipeline::new()
        .task_with("hold", move || Hold(Arc::clone(&g)))
        .task(Pass::new("b", true))
        .task(Pass::new("c", false))
        .edge("hold", "b")
        .edge("b", "c");
    let source = BenchSource::from_config(BenchSourceConfig {
        messages: max_pending as u64,
        payload: 100,
        copy: false,
        rate: None,
        track: false,
        warmup_s: 0.0,
        report: false,
    })
    .map_err(|e| tempest::Error::Source {
        name: "bench".into(),
        source: e,
    })?;
    let topology = TopologyBuilder::new("memory")
        .source(source)
        .pipeline(stuck)
        .max_pending(max_pending)
        .msg_timeout(Duration::from_secs(600))
        .build()?;
    let handle = RuntimeHandle::new();
    let h = handle.clone();
    let measured = Arc::new(AtomicU64::new(0));
    let m = Arc::clone(&measured);
    let watcher = std::thread::spawn(move || {
        let start = Instant::now();
        loop {
            let inflight = h.stats().map(|s| s.inflight).unwrap_or(0);
            if inflight >= max_pending || start.elapsed() > Duration::from_secs(120) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        m.store(rss_kib().0, Ordering::SeqCst);
        let (lock, cvar) = &*gate;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        cvar.notify_all();
    });
    standalone::run(
        topology,
        RunOptions {
            handle: Some(handle),
            ..RunOptions::default()
        },
    )?;
    let _ = watcher.join();
    Ok(measured.load(Ordering::SeqCst))
}

/// Blocks on its first message until the gate opens, then passes all on.
struct Hold(Arc<(Mutex<bool>, std::sync::Condvar)>);

impl Task for Hold {
    fn name(&self) -> &str {
        "hold"
    }
    fn handle(&mut self, msg: Msg, _: &MsgCtx) -> TaskResult {
        let (lock, cvar) = &*self.0;
        let mut open = lock.lock().unwrap_or_else(PoisonError::into_inner);
        while !*open {
            open = cvar.wait(open).unwrap_or_else(PoisonError::into_inner);
        }
        Ok(Output::One(msg))
    }
}

/// The task of the spread scenario: waits `sleep` per message (as a task
/// waiting on I/O would), then drops it.
#[derive(Clone, Debug)]
pub struct Sleep {
    sleep: Duration,
}

/// The spread scenario's one task.
pub const SPREAD_TASK: &str = "io";

impl Task for Sleep {
    fn name(&self) -> &str {
        SPREAD_TASK
    }
    fn handle(&mut self, _msg: Msg, _: &MsgCtx) -> TaskResult {
        std::thread::sleep(self.sleep);
        Ok(Output::None)
    }
}

/// One burst through one waiting task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpreadParams {
    /// Messages in the burst, all polled at once (one poll).
    pub messages: u64,
    /// How long the task waits per message, in microseconds.
    pub sleep_us: u64,
    /// Workers of the task.
    pub workers: usize,
}

/// What one burst measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SpreadMeasured {
    /// Workers of the task.
    pub workers: usize,
    /// Messages acked.
    pub acked: u64,
    /// Whether every message was acked exactly once.
    pub all_acked: bool,
    /// Seconds from the burst's poll to its last ack.
    pub wall_s: f64,
    /// Acked messages per second over `wall_s`.
    pub rate: f64,
    /// Task messages each worker handled, in the order they joined
    /// (`RunReport.stats.per_worker`).
    pub per_worker: Vec<u64>,
    /// The largest share of the burst one worker handled, 0 to 1.
    pub max_share: f64,
}

/// What the burst source saw.
#[derive(Debug, Default)]
struct BurstLog {
    polled: Option<Instant>,
    last_ack: Option<Instant>,
    acked: Vec<bool>,
    good: u64,
    bad: u64,
}

/// A source that hands out all its messages in its first poll.
#[derive(Debug)]
struct BurstSource {
    total: u64,
    next: u64,
    payload: Bytes,
    log: Arc<Mutex<BurstLog>>,
}

impl BurstSource {
    fn new(total: u64) -> Result<Self, SourceError> {
        let n = usize::try_from(total)
            .map_err(|_| SourceError::config("messages does not fit in memory"))?;
        Ok(BurstSource {
            total,
            next: 0,
            payload: Bytes::from_static(b"burst"),
            log: Arc::new(Mutex::new(BurstLog {
                acked: vec![false; n],
                ..BurstLog::default()
            })),
        })
    }
}

impl Source for BurstSource {
    type Config = u64;

    fn name(&self) -> &str {
        "burst"
    }

    fn from_config(total: u64) -> Result<Self, SourceError> {
        BurstSource::new(total)
    }

    fn settings(&self) -> SourceSettings {
        bench_settings(usize::try_from(self.total).unwrap_or(usize::MAX).max(1))
    }

    fn poll(&mut self, max: usize, out: &mut Vec<SourceMsg>) -> Result<(), SourceError> {
        let n = (max as u64).min(self.total - self.next);
        if n > 0 {
            self.log
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .polled
                .get_or_insert_with(Instant::now);
        }
        for _ in 0..n {
            out.push(SourceMsg {
                id: MsgId::Int(self.next),
                payload: self.payload.clone(),
                timestamp: 0,
                delivered: 1,
                key: None,
                headers: Default::default(),
            });
            self.next += 1;
        }
        Ok(())
    }

    fn ack(&mut self, id: &MsgId) -> Result<(), SourceError> {
        self.batch_ack(std::slice::from_ref(id))
    }

    fn batch_ack(&mut self, ids: &[MsgId]) -> Result<(), SourceError> {
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        log.last_ack = Some(Instant::now());
        for id in ids {
            match id.as_int().and_then(|i| usize::try_from(i).ok()) {
                Some(i) if log.acked.get(i) == Some(&false) => {
                    log.acked[i] = true;
                    log.good += 1;
                }
                _ => log.bad += 1,
            }
        }
        Ok(())
    }

    fn exhausted(&self) -> bool {
        self.next == self.total
    }
}

/// Runs one burst of `p.messages` through one task that sleeps
/// `p.sleep_us` per message, with `p.workers` workers, in this process.
pub fn run_spread(p: &SpreadParams) -> Result<SpreadMeasured, tempest::Error> {
    let source = BurstSource::new(p.messages).map_err(|e| tempest::Error::Source {
        name: "burst".into(),
        source: e,
    })?;
    let log = Arc::clone(&source.log);
    let mut b = TopologyBuilder::new("bench-spread")
        .source(source)
        .pipeline(Pipeline::new().task(Sleep {
            sleep: Duration::from_micros(p.sleep_us),
        }))
        .failure_policy(FailurePolicy::None)
        // Room for the whole burst in flight, so it is one poll.
        .max_pending(
            usize::try_from(p.messages)
                .unwrap_or(usize::MAX)
                .max(16_384),
        )
        .msg_timeout(Duration::from_secs(600));
    if p.workers > 1 {
        b = b.workers(SPREAD_TASK, p.workers);
    }
    let report = standalone::run(b.build()?, RunOptions::default())?;
    let per_worker: Vec<u64> = report
        .stats
        .per_worker
        .iter()
        .filter(|w| w.task == SPREAD_TASK)
        .map(|w| w.handled)
        .collect();
    let log = log.lock().unwrap_or_else(PoisonError::into_inner);
    let wall_s = match (log.polled, log.last_ack) {
        (Some(polled), Some(last)) => last.saturating_duration_since(polled).as_secs_f64(),
        _ => 0.0,
    };
    let handled: u64 = per_worker.iter().sum();
    Ok(SpreadMeasured {
        workers: p.workers,
        acked: log.good,
        all_acked: log.good == p.messages && log.bad == 0 && report.stats.acked == p.messages,
        wall_s,
        rate: log.good as f64 / wall_s.max(1e-9),
        max_share: per_worker.iter().copied().max().unwrap_or(0) as f64 / handled.max(1) as f64,
        per_worker,
    })
}

/// An async task that waits per message without holding its thread.
#[derive(Clone, Debug)]
struct AsyncSleep {
    sleep: Duration,
}

/// The async scenario's task.
pub const ASYNC_TASK: &str = "await";

impl tempest::AsyncTask for AsyncSleep {
    fn name(&self) -> &str {
        ASYNC_TASK
    }

    async fn handle(&self, _msg: Msg, _ctx: MsgCtx) -> TaskResult {
        tokio::time::sleep(self.sleep).await;
        Ok(Output::None)
    }
}

/// One burst through one async task that awaits per message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AsyncParams {
    /// Messages in the burst, all polled at once (one poll).
    pub messages: u64,
    /// How long each call awaits, in microseconds.
    pub sleep_us: u64,
    /// Messages the one worker keeps in flight.
    pub concurrency: usize,
}

/// What one async burst measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AsyncMeasured {
    /// Messages acked.
    pub acked: u64,
    /// Whether every message was acked exactly once.
    pub all_acked: bool,
    /// Seconds from the burst's poll to its last ack.
    pub wall_s: f64,
    /// Acked messages per second over `wall_s`.
    pub rate: f64,
    /// The most one worker can do: concurrency / await time.
    pub ceiling: f64,
    /// The most messages in progress at once (the worker's own gauge).
    pub high_water: i64,
}

/// Runs one burst of `p.messages` through one async task whose calls each
/// await `p.sleep_us`, with one worker keeping `p.concurrency` in flight.
pub fn run_async(p: &AsyncParams) -> Result<AsyncMeasured, tempest::Error> {
    let source = BurstSource::new(p.messages).map_err(|e| tempest::Error::Source {
        name: "burst".into(),
        source: e,
    })?;
    let log = Arc::clone(&source.log);
    let b = TopologyBuilder::new("bench-async")
        .source(source)
        .pipeline(
            Pipeline::new()
                .async_task(AsyncSleep {
                    sleep: Duration::from_micros(p.sleep_us),
                })
                .concurrency(ASYNC_TASK, p.concurrency),
        )
        .failure_policy(FailurePolicy::None)
        // Room for the whole burst in flight, so it is one poll.
        .max_pending(
            usize::try_from(p.messages)
                .unwrap_or(usize::MAX)
                .max(16_384),
        )
        .msg_timeout(Duration::from_secs(600));
    let report = standalone::run(b.build()?, RunOptions::default())?;
    let log = log.lock().unwrap_or_else(PoisonError::into_inner);
    let wall_s = match (log.polled, log.last_ack) {
        (Some(polled), Some(last)) => last.saturating_duration_since(polled).as_secs_f64(),
        _ => 0.0,
    };
    Ok(AsyncMeasured {
        acked: log.good,
        all_acked: log.good == p.messages && log.bad == 0 && report.stats.acked == p.messages,
        wall_s,
        rate: log.good as f64 / wall_s.max(1e-9),
        ceiling: p.concurrency as f64 * 1e6 / p.sleep_us.max(1) as f64,
        high_water: report
            .metrics
            .gauge(
                tempest::metrics::names::TASK_IN_PROGRESS_MAX,
                &[("task", ASYNC_TASK)],
            )
            .unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[source.config]` merges over the compiled config, so it must write
    /// itself as TOML and read back the same.
    #[test]
    fn the_source_config_round_trips_through_the_merge() {
        let file = tempest::config::ConfigFile::parse(
            std::path::Path::new("Topology.toml"),
            "[source.config]\nmessages = 5\n".into(),
        )
        .unwrap();
        for rate in [None, Some(1_000.5)] {
            let compiled = BenchSourceConfig {
                messages: 10,
                payload: 100,
                copy: true,
                rate,
                track: false,
                warmup_s: 0.5,
                report: true,
            };
            let merged = file.source_config_over(compiled.clone()).unwrap();
            let want = BenchSourceConfig {
                messages: 5,
                ..compiled
            };
            assert_eq!(format!("{merged:?}"), format!("{want:?}"));
        }
    }

    #[test]
    fn every_shape_acks_everything() {
        for shape in [Shape::Linear, Shape::Diamond, Shape::FanOut] {
            let m = run_scenario(&Params {
                warmup_s: 0.0,
                ..Params::new(shape, 5_000)
            })
            .unwrap();
            assert!(m.all_acked, "{shape:?}: {m:?}");
            assert!(m.p50_us > 0.0);
        }
    }

    #[test]
    fn the_source_paces_itself() {
        let m = run_scenario(&Params {
            rate: Some(20_000.0),
            ..Params::new(Shape::Linear, 4_000)
        })
        .unwrap();
        assert!(m.all_acked);
        assert!(m.elapsed_s >= 0.18, "{}", m.elapsed_s);
    }

    #[test]
    fn the_baseline_passes_everything() {
        assert!(channel_baseline(100_000, 100) > 0.0);
    }

    #[test]
    fn a_burst_spreads_over_the_workers_of_a_waiting_task() {
        let m = run_spread(&SpreadParams {
            messages: 300,
            sleep_us: 1_000,
            workers: 2,
        })
        .unwrap();
        assert!(m.all_acked, "{m:?}");
        assert_eq!(m.per_worker.len(), 2, "{m:?}");
        assert_eq!(m.per_worker.iter().sum::<u64>(), 300, "{m:?}");
        assert!(m.max_share < 1.0, "one worker took the whole burst: {m:?}");
        assert!(m.wall_s > 0.0, "{m:?}");
    }

    #[test]
    fn an_async_burst_keeps_the_concurrency_in_flight() {
        let m = run_async(&AsyncParams {
            messages: 1_000,
            sleep_us: 10_000,
            concurrency: 100,
        })
        .unwrap();
        assert!(m.all_acked, "{m:?}");
        assert!(m.high_water > 50, "{m:?}");
        assert!(m.rate <= m.ceiling * 1.05, "{m:?}");
    }

    #[test]
    fn the_memory_probe_holds_messages_in_flight() {
        assert!(memory_probe(2_000).unwrap() > 0);
    }
}
