//! Async tasks: concurrency per worker, cancellation at the deadline,
//! results out of order, and what a lost async worker held; in process and
//! with remote workers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{generated, FnTask};
use tempest::metrics::names;
use tempest::source::{FailReason, MsgId};
use tempest::standalone::{self, RuntimeHandle, WorkerOptions};
use tempest::testing::TestRun;
use tempest::{
    AsyncTask, FailurePolicy, Msg, MsgCtx, Outcome, Output, Pipeline, TaskResult, TopologyBuilder,
};
use tempest_source_mock::MockSource;

/// Sleeps `wait(call number)` in each call, counting calls per message.
#[derive(Clone)]
struct Sleepy {
    name: &'static str,
    calls: Arc<AtomicUsize>,
    per_id: Arc<Mutex<HashMap<MsgId, u32>>>,
    wait: fn(usize) -> Duration,
}

impl Sleepy {
    fn new(name: &'static str, wait: fn(usize) -> Duration) -> Self {
        Sleepy {
            name,
            calls: Arc::default(),
            per_id: Arc::default(),
            wait,
        }
    }

    fn calls_per_id(&self) -> HashMap<MsgId, u32> {
        self.per_id.lock().unwrap().clone()
    }
}

impl AsyncTask for Sleepy {
    fn name(&self) -> &str {
        self.name
    }

    async fn handle(&self, msg: Msg, ctx: MsgCtx) -> TaskResult {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        *self
            .per_id
            .lock()
            .unwrap()
            .entry(ctx.id().clone())
            .or_default() += 1;
        tokio::time::sleep((self.wait)(n)).await;
        Ok(Output::One(msg))
    }
}

/// Counts its drops unless disarmed: a future dropped before it finished.
struct DropGuard {
    dropped: Arc<AtomicUsize>,
    armed: bool,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        if self.armed {
            self.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Every call hangs (far longer than any test) unless cancelled; records,
/// as each call starts, how many earlier calls had been cancelled by then.
#[derive(Clone, Default)]
struct Hang {
    dropped: Arc<AtomicUsize>,
    finished: Arc<AtomicUsize>,
    cancelled_at_start: Arc<Mutex<Vec<usize>>>,
}

impl AsyncTask for Hang {
    fn name(&self) -> &str {
        "hang"
    }

    async fn handle(&self, _msg: Msg, _ctx: MsgCtx) -> TaskResult {
        self.cancelled_at_start
            .lock()
            .unwrap()
            .push(self.dropped.load(Ordering::SeqCst));
        let mut guard = DropGuard {
            dropped: Arc::clone(&self.dropped),
            armed: true,
        };
        tokio::time::sleep(Duration::from_secs(600)).await;
        guard.armed = false;
        self.finished.fetch_add(1, Ordering::SeqCst);
        Ok(Output::None)
    }
}

#[test]
fn one_async_worker_keeps_its_concurrency_in_flight() {
    common::logs();
    let task = Sleepy::new("wait", |_| Duration::from_millis(10));
    let (source, mock) = generated(3000);
    let report = TestRun::new(
        TopologyBuilder::new("concurrency")
            .source(source)
            .max_pending(2048)
            .pipeline(
                Pipeline::new()
                    .async_task(task.clone())
                    .concurrency("wait", 256),
            ),
    )
    .run()
    .unwrap();
    assert_eq!(report.stats.acked, 3000, "{:?}", report.stats);
    assert_eq!(mock.acked(), 3000);
    let high = report
        .metrics
        .gauge(names::TASK_IN_PROGRESS_MAX, &[("task", "wait")])
        .expect("the async loop records its high-water mark");
    assert!(
        (200..=256).contains(&high),
        "one worker with concurrency 256 had at most {high} messages in progress"
    );
    assert_eq!(
        report
            .metrics
            .gauge(names::TASK_IN_PROGRESS, &[("task", "wait")]),
        Some(0),
        "nothing is in progress at the end"
    );
}

fn hang_topology(source: MockSource, task: Hang) -> TopologyBuilder {
    TopologyBuilder::new("cancel")
        .source(source)
        .failure_policy(FailurePolicy::Retry(1))
        .retry_backoff(Duration::from_millis(50), Duration::from_millis(50))
        .msg_timeout(Duration::from_millis(300))
        .pipeline(Pipeline::new().async_task(task))
}

/// Both attempts of the one message time out; the first attempt's future
/// must have been dropped before the retry started (it would hang for ten
/// minutes otherwise).
fn check_cancelled(
    report_stats: &tempest::Stats,
    mock: &tempest_source_mock::MockHandle,
    task: &Hang,
) {
    assert_eq!(report_stats.timed_out, 1, "{report_stats:?}");
    assert_eq!(report_stats.retried, 1, "{report_stats:?}");
    let failed = mock.failed();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].reason, FailReason::Timeout);
    assert_eq!(failed[0].attempts, 2);
    assert_eq!(mock.acked(), 0);
    assert_eq!(
        *task.cancelled_at_start.lock().unwrap(),
        vec![0, 1],
        "the first call was cancelled before the retry started"
    );
    assert_eq!(task.finished.load(Ordering::SeqCst), 0);
    assert_eq!(task.dropped.load(Ordering::SeqCst), 2);
}

#[test]
fn a_timed_out_async_call_is_cancelled_and_goes_to_the_failure_policy() {
    common::logs();
    let task = Hang::default();
    let (source, mock) = common::primed(&["x"]);
    let report = TestRun::new(hang_topology(source, task.clone()))
        .run()
        .unwrap();
    check_cancelled(&report.stats, &mock, &task);
    let id = &mock.failed()[0].id;
    let r = report.report(id).expect("a report of the message");
    assert_eq!(
        (r.outcome, r.attempts, r.timeouts),
        (Outcome::TimedOut, 2, 2)
    );
    assert!(
        report
            .metrics
            .counter(names::TASK_CANCELLED, &[("task", "hang")])
            >= 1,
        "the worker counts the calls it cancelled"
    );
}

fn worker_options(addr: std::net::SocketAddr) -> WorkerOptions {
    WorkerOptions {
        topology: addr.to_string(),
        fetch_max: 1024,
        backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        exit_with_topology: true,
        graceful_shutdown: Duration::from_millis(100),
        ..WorkerOptions::default()
    }
}

#[test]
fn a_timed_out_remote_async_call_is_cancelled_and_goes_to_the_failure_policy() {
    common::logs();
    let task = Hang::default();
    let (source, mock) = common::primed(&["x"]);
    let (top, addr) =
        common::serve_on_loopback(hang_topology(source, task.clone()).build().unwrap());
    let worker_topology = hang_topology(generated(0).0, task.clone()).build().unwrap();
    let w = std::thread::spawn(move || {
        standalone::run_worker(&worker_topology, "hang", worker_options(addr), None)
    });
    let report = top.join().unwrap();
    w.join().unwrap().unwrap();
    check_cancelled(&report.stats, &mock, &task);
}

/// Later messages finish first: each call waits less than the one before.
fn reversed(n: usize) -> Duration {
    Duration::from_millis(40 - (n % 40) as u64)
}

fn out_of_order_topology(source: MockSource, task: Sleepy) -> TopologyBuilder {
    TopologyBuilder::new("out-of-order")
        .source(source)
        .failure_policy(FailurePolicy::None)
        .msg_timeout(Duration::from_secs(30))
        .pipeline(
            Pipeline::new()
                .task(FnTask::new("split", |m| {
                    Ok(Output::Many(vec![m.clone(), m]))
                }))
                .async_task(task)
                .concurrency("sleepy", 32)
                .edge("split", "sleepy"),
        )
}

fn check_once(stats: &tempest::Stats, task: &Sleepy, count: usize) {
    assert_eq!(stats.acked, count as u64, "{stats:?}");
    assert_eq!(stats.given_up(), 0, "{stats:?}");
    assert_eq!(stats.stale_results, 0, "{stats:?}");
    let calls = task.calls_per_id();
    assert_eq!(calls.len(), count);
    // Each message is split in two: two calls per id, each exactly once.
    assert!(calls.values().all(|&c| c == 2), "{calls:?}");
}

#[test]
fn async_results_out_of_order_complete_everything_exactly_once() {
    common::logs();
    let task = Sleepy::new("sleepy", reversed);
    let (source, mock) = generated(400);
    let report = TestRun::new(out_of_order_topology(source, task.clone()))
        .run()
        .unwrap();
    check_once(&report.stats, &task, 400);
    assert_eq!(mock.acked_twice(), 0);
}

#[test]
fn remote_async_results_out_of_order_complete_everything_exactly_once() {
    common::logs();
    let task = Sleepy::new("sleepy", reversed);
    let (source, mock) = generated(400);
    let (top, addr) =
        common::serve_on_loopback(out_of_order_topology(source, task.clone()).build().unwrap());
    let workers: Vec<_> = ["split", "sleepy", "sleepy"]
        .into_iter()
        .map(|name| {
            let t = out_of_order_topology(generated(0).0, task.clone())
                .build()
                .unwrap();
            std::thread::spawn(move || standalone::run_worker(&t, name, worker_options(addr), None))
        })
        .collect();
    let report = top.join().unwrap();
    for w in workers {
        w.join().unwrap().unwrap();
    }
    check_once(&report.stats, &task, 400);
    assert_eq!(mock.acked_twice(), 0);
}

/// Every other call answers at once; the others hang until cancelled.
#[derive(Clone, Default)]
struct HalfHang {
    calls: Arc<AtomicUsize>,
    answered: Arc<Mutex<HashSet<MsgId>>>,
}

impl AsyncTask for HalfHang {
    fn name(&self) -> &str {
        "half"
    }

    async fn handle(&self, _msg: Msg, ctx: MsgCtx) -> TaskResult {
        if self.calls.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
            tokio::time::sleep(Duration::from_secs(600)).await;
        }
        self.answered.lock().unwrap().insert(ctx.id().clone());
        Ok(Output::None)
    }
}

/// A remote async worker answers half of what it holds, out of order, and
/// is lost: exactly the unanswered messages fail, as `WorkerLost`.
#[test]
fn losing_a_remote_async_worker_fails_exactly_what_it_had_not_answered() {
    common::logs();
    const COUNT: u64 = 40;
    let task = HalfHang::default();
    let make = |source: MockSource| {
        TopologyBuilder::new("lost")
            .source(source)
            .failure_policy(FailurePolicy::None)
            .msg_timeout(Duration::from_secs(600))
            .pipeline(Pipeline::new().async_task(task.clone()))
    };
    let (source, mock) = generated(COUNT);
    let (top, addr) = common::serve_on_loopback(make(source).build().unwrap());
    let handle = RuntimeHandle::new();
    let (t, h) = (make(generated(0).0).build().unwrap(), handle.clone());
    let w = std::thread::spawn(move || {
        standalone::run_worker(&t, "half", worker_options(addr), Some(h))
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while mock.acked() < COUNT / 2 {
        assert!(Instant::now() < deadline, "only {} acked", mock.acked());
        std::thread::sleep(Duration::from_millis(5));
    }
    // The worker leaves: its drain runs out with half its messages in
    // calls, and its connection closes.
    handle.shutdown();
    let report = top.join().unwrap();
    w.join().unwrap().unwrap();
    assert_eq!(report.stats.acked, COUNT / 2, "{:?}", report.stats);
    assert_eq!(report.stats.failed, COUNT / 2, "{:?}", report.stats);
    assert_eq!(report.stats.stale_results, 0, "{:?}", report.stats);
    let answered = task.answered.lock().unwrap().clone();
    let failed: HashSet<MsgId> = mock.failed().into_iter().map(|f| f.id).collect();
    assert_eq!(failed.len() as u64, COUNT / 2);
    assert!(failed.is_disjoint(&answered), "an answered message failed");
    for f in mock.failed() {
        assert!(
            matches!(f.reason, FailReason::WorkerLost { .. }),
            "{:?}",
            f.reason
        );
    }
}

/// Concurrency from the code, the file and the flags (applied last, as
/// `rt` does), each over the one before; bad values name their task.
#[test]
fn concurrency_resolves_by_precedence_and_only_for_async_tasks() {
    let pipeline = || {
        Pipeline::new()
            .task(common::pass("split"))
            .async_task(Sleepy::new("fetch", |_| Duration::ZERO))
            .edge("split", "fetch")
    };
    let build = |b: TopologyBuilder| b.source(generated(0).0).build();
    let fetch =
        |t: &tempest::Topology| t.concurrency()[t.dag().index_of("fetch").unwrap() as usize];
    let t = build(TopologyBuilder::new("c").pipeline(pipeline())).unwrap();
    assert_eq!(fetch(&t), tempest::DEFAULT_CONCURRENCY);
    assert_eq!(
        t.concurrency()[t.dag().index_of("split").unwrap() as usize],
        0
    );
    let code = || TopologyBuilder::new("c").pipeline(pipeline().concurrency("fetch", 8));
    assert_eq!(fetch(&build(code()).unwrap()), 8);
    let file = tempest::config::ConfigFile::parse(
        std::path::Path::new("Topology.toml"),
        "[[task]]\nname = \"fetch\"\nconcurrency = 16\n".into(),
    )
    .unwrap();
    assert_eq!(fetch(&build(code().config_file(file.clone())).unwrap()), 16);
    assert_eq!(
        fetch(&build(code().config_file(file).concurrency("fetch", 32)).unwrap()),
        32
    );
    let e = build(
        TopologyBuilder::new("c")
            .pipeline(pipeline())
            .concurrency("split", 4),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("\"split\", a sync task"), "{e}");
    let e = build(
        TopologyBuilder::new("c")
            .pipeline(pipeline())
            .concurrency("fetch", 0),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("concurrency must be at least 1"), "{e}");
    let e = pipeline()
        .concurrency("split", 2)
        .concurrency("nope", 2)
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("concurrency for task \"split\": it is a sync task"),
        "{e}"
    );
    assert!(
        e.contains("concurrency for task \"nope\": it is not a task"),
        "{e}"
    );
}

/// Siblings of a fan-out per source message: `split` emits them all.
const SIBLINGS: usize = 4;

/// While `hang` is set, sibling 0 hangs (until cancelled) and the later
/// siblings answer in reverse order (each sleeps less than the one
/// before); once it is cleared, every call answers at once.
#[derive(Clone, Default)]
struct SiblingsOutOfOrder {
    hang: Arc<std::sync::atomic::AtomicBool>,
    answered: Arc<AtomicUsize>,
}

impl AsyncTask for SiblingsOutOfOrder {
    fn name(&self) -> &str {
        "siblings"
    }

    async fn handle(&self, msg: Msg, _ctx: MsgCtx) -> TaskResult {
        if self.hang.load(Ordering::SeqCst) {
            let sibling = msg.last().map_or(0, |b| usize::from(b - b'0'));
            if sibling == 0 {
                tokio::time::sleep(Duration::from_secs(600)).await;
            } else {
                let wait = (SIBLINGS - sibling) as u64 * 15;
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
        }
        self.answered.fetch_add(1, Ordering::SeqCst);
        Ok(Output::One(msg))
    }
}

/// Regression: siblings of a fan-out share one ticket but are different
/// messages. A remote async worker answers some of them out of order and
/// is lost; under `BestEffort` exactly the unanswered siblings go back to
/// the queue, so the next worker runs each of those once and never an
/// answered one again: downstream sees every sibling of every source
/// message exactly once.
#[test]
fn losing_a_remote_async_worker_requeues_exactly_its_unanswered_siblings() {
    common::logs();
    const COUNT: u64 = 20;
    let task = SiblingsOutOfOrder::default();
    task.hang.store(true, Ordering::SeqCst);
    let seen = common::Log::default();
    let make = |source: MockSource| {
        let seen = seen.clone();
        TopologyBuilder::new("lost-siblings")
            .source(source)
            .failure_policy(FailurePolicy::BestEffort)
            .msg_timeout(Duration::from_secs(600))
            .pipeline(
                Pipeline::new()
                    .task(FnTask::new("split", |m| {
                        Ok(Output::Many(
                            (0..SIBLINGS)
                                .map(|i| {
                                    let mut s = m.to_vec();
                                    s.extend_from_slice(format!("#{i}").as_bytes());
                                    s.into()
                                })
                                .collect(),
                        ))
                    }))
                    .async_task(task.clone())
                    .concurrency("siblings", 256)
                    .task(FnTask::new("collect", move |m| {
                        seen.push(&m);
                        Ok(Output::None)
                    }))
                    .edge("split", "siblings")
                    .edge("siblings", "collect"),
            )
    };
    // Distinct payloads, so that every sibling payload is distinct.
    let source =
        <MockSource as tempest::source::Source>::from_config(tempest_source_mock::MockConfig {
            ack_interval_ms: 1,
            ..tempest_source_mock::MockConfig::default()
        })
        .unwrap();
    let mock = source.handle();
    mock.push_all((0..COUNT).map(|i| format!("m{i}")));
    let (top, addr) = common::serve_on_loopback(make(source).build().unwrap());
    let others: Vec<_> = ["split", "collect"]
        .into_iter()
        .map(|name| {
            let t = make(generated(0).0).build().unwrap();
            std::thread::spawn(move || standalone::run_worker(&t, name, worker_options(addr), None))
        })
        .collect();
    // The first worker answers every sibling but the first, out of order.
    let handle = RuntimeHandle::new();
    let (t, h) = (make(generated(0).0).build().unwrap(), handle.clone());
    let first = std::thread::spawn(move || {
        standalone::run_worker(&t, "siblings", worker_options(addr), Some(h))
    });
    let answered = COUNT as usize * (SIBLINGS - 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < answered {
        assert!(Instant::now() < deadline, "only {} seen", seen.len());
        std::thread::sleep(Duration::from_millis(5));
    }
    // It is lost holding the first sibling of each source message.
    handle.shutdown();
    first.join().unwrap().unwrap();
    assert_eq!(task.answered.load(Ordering::SeqCst), answered);
    // Another worker takes what went back to the queue.
    task.hang.store(false, Ordering::SeqCst);
    let t = make(generated(0).0).build().unwrap();
    let second = std::thread::spawn(move || {
        standalone::run_worker(&t, "siblings", worker_options(addr), None)
    });
    let report = top.join().unwrap();
    second.join().unwrap().unwrap();
    for w in others {
        w.join().unwrap().unwrap();
    }
    assert_eq!(report.stats.acked, COUNT, "{:?}", report.stats);
    assert_eq!(report.stats.given_up(), 0, "{:?}", report.stats);
    assert_eq!(mock.acked_twice(), 0);
    let mut counts: HashMap<Vec<u8>, usize> = HashMap::new();
    for m in seen.all() {
        *counts.entry(m.to_vec()).or_default() += 1;
    }
    let twice: Vec<String> = counts
        .iter()
        .filter(|&(_, &n)| n > 1)
        .map(|(m, n)| format!("{} ({n} times)", String::from_utf8_lossy(m)))
        .collect();
    assert!(twice.is_empty(), "answered siblings ran again: {twice:?}");
    assert_eq!(
        counts.len(),
        COUNT as usize * SIBLINGS,
        "siblings lost: {} of {} seen",
        counts.len(),
        COUNT as usize * SIBLINGS
    );
    assert_eq!(
        task.answered.load(Ordering::SeqCst),
        COUNT as usize * SIBLINGS,
        "each sibling answered once"
    );
}
