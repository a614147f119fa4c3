//! Keyed state checkpointed to a real Redis: exact word counts with several
//! counters, in process and over TCP with a counter joining mid-run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use tempest::standalone::{self, RunOptions, RuntimeHandle, ServeOptions, WorkerOptions};
use tempest::testing::TestRun;
use tempest::{
    Grouping, KeyedState, Msg, MsgCtx, Out, Output, Pipeline, StopReason, Task, TaskContext,
    TaskError, TaskResult, TopologyBuilder,
};
use tempest_source::Source;
use tempest_source_mock::{MockConfig, MockSource};
use tempest_source_redis::test_server::{unique_key, TestServer};
use tempest_state_redis::RedisState;

/// `lines` lines of `words` words over `vocab` words, and each word's count.
fn corpus(lines: usize, words: usize, vocab: usize) -> (Vec<String>, HashMap<String, u64>) {
    let mut exact = HashMap::new();
    let mut out = Vec::new();
    let mut x: u64 = 11;
    for _ in 0..lines {
        let mut line = Vec::new();
        for _ in 0..words {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let w = format!("w{}", (x >> 33) as usize % vocab);
            *exact.entry(w.clone()).or_insert(0u64) += 1;
            line.push(w);
        }
        out.push(line.join(" "));
    }
    (out, exact)
}

#[derive(Clone)]
struct Split;

impl Task for Split {
    fn name(&self) -> &str {
        "split"
    }
    fn handle(&mut self, m: Msg, _: &MsgCtx) -> TaskResult {
        Ok(Output::Outs(
            m.split(|b| *b == b' ')
                .filter(|w| !w.is_empty())
                .map(|w| {
                    let w = m.slice_ref(w);
                    Out::new(w.clone()).key(w)
                })
                .collect(),
        ))
    }
}

/// Counts each word in keyed state.
#[derive(Clone, Default)]
struct Count {
    counts: Option<KeyedState<u64>>,
}

impl Task for Count {
    fn name(&self) -> &str {
        "count"
    }
    fn started(&mut self, ctx: &TaskContext) {
        self.counts = Some(ctx.state("words").unwrap());
    }
    fn handle(&mut self, word: Msg, _: &MsgCtx) -> TaskResult {
        let counts = self
            .counts
            .as_ref()
            .ok_or_else(|| TaskError::msg("not started"))?;
        counts
            .update(&word, |c| Some(c.unwrap_or(0) + 1))
            .map_err(|e| TaskError::msg(e.to_string()))?;
        Ok(Output::None)
    }
}

fn source_of(lines: &[String]) -> MockSource {
    let source = MockSource::from_config(MockConfig {
        ack_interval_ms: 1,
        ..MockConfig::default()
    })
    .unwrap();
    source
        .handle()
        .push_all(lines.iter().map(|l| Bytes::from(l.clone())));
    source
}

fn topology(url: &str, prefix: &str, source: MockSource) -> TopologyBuilder {
    topology_on(RedisState::with_prefix(url, prefix).unwrap(), source)
}

/// A backend that aborts the process right after its `n`-th commit has
/// been written: a worker that dies between its checkpoint and its
/// answers, deterministically.
#[derive(Debug)]
struct DieAfterCommit {
    inner: RedisState,
    left: std::sync::atomic::AtomicUsize,
}

impl tempest::StateBackend for DieAfterCommit {
    fn load(
        &self,
        store: &str,
        keys: &[Bytes],
        updates: &[tempest::UpdateId],
    ) -> Result<tempest::Loaded, tempest::StateError> {
        self.inner.load(store, keys, updates)
    }
    fn commit(
        &self,
        store: &str,
        changes: &tempest::Changes<'_>,
    ) -> Result<(), tempest::StateError> {
        self.inner.commit(store, changes)?;
        if self.left.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            std::process::abort();
        }
        Ok(())
    }
    fn records_updates(&self) -> bool {
        self.inner.records_updates()
    }
}

fn topology_on(
    backend: impl tempest::StateBackend + 'static,
    source: MockSource,
) -> TopologyBuilder {
    let builder = TopologyBuilder::new("state");
    // The child counter of the kill -9 tests is told through the
    // environment.
    let builder = if std::env::var("TEMPEST_STATE_AT_MOST_ONCE").is_ok() {
        builder.at_most_once_updates()
    } else {
        builder
    };
    builder
        .source(source)
        .pipeline(Pipeline::new().task(Split).task(Count::default()).edge_by(
            "split",
            "count",
            Grouping::Key,
        ))
        .state_backend(backend)
        .checkpoint_interval(Duration::from_millis(20))
}

/// Asserts the stored counts are exactly `exact`, naming the words that
/// differ.
fn assert_exact(got: &HashMap<String, u64>, exact: &HashMap<String, u64>) {
    let mut wrong: Vec<_> = exact
        .iter()
        .filter(|(w, c)| got.get(*w) != Some(c))
        .map(|(w, c)| format!("{w}: {:?} for {c}", got.get(w)))
        .collect();
    wrong.sort();
    assert!(
        wrong.is_empty() && got.len() == exact.len(),
        "{} of {} words wrong: {wrong:?}",
        wrong.len(),
        exact.len()
    );
}

/// Runs `t` until its source is drained and checks that every one of
/// `lines` source messages was acked.
fn run_all(t: TopologyBuilder, lines: usize) -> tempest::testing::TestReport {
    let report = TestRun::new(t)
        .deadline(Duration::from_secs(60))
        .run()
        .unwrap();
    assert_eq!(report.stats.acked, lines as u64, "{:?}", report.stats);
    report
}

/// Every word's count as checkpointed in Redis.
fn stored(server: &TestServer, prefix: &str) -> HashMap<String, u64> {
    let mut conn = server.connection().unwrap();
    let raw: HashMap<Vec<u8>, Vec<u8>> = redis::cmd("HGETALL")
        .arg(format!("{prefix}:count/words"))
        .query(&mut conn)
        .unwrap();
    raw.into_iter()
        .map(|(k, v)| {
            (
                String::from_utf8(k).unwrap(),
                postcard::from_bytes::<u64>(&v).unwrap(),
            )
        })
        .collect()
}

#[test]
fn word_counts_in_redis_are_exact_with_three_counters() {
    let _ = env_logger::builder().is_test(true).try_init();
    let server = TestServer::shared().unwrap();
    let prefix = unique_key("state-three");
    let (lines, exact) = corpus(2_000, 8, 300);
    let report =
        TestRun::new(topology(&server.url, &prefix, source_of(&lines)).workers("count", 3))
            .deadline(Duration::from_secs(60))
            .run()
            .unwrap();
    assert_eq!(
        report.stop,
        StopReason::SourceExhausted,
        "{:?}",
        report.stats
    );
    assert_eq!(report.stats.acked, lines.len() as u64);
    assert_eq!(report.stats.task_errors, 0);
    assert_exact(&stored(&server, &prefix), &exact);
}

/// A second run over the same state adds to what the first checkpointed:
/// a restarted topology loads its keys from Redis.
#[test]
fn a_new_run_loads_the_state_the_last_one_checkpointed() {
    let server = TestServer::shared().unwrap();
    let prefix = unique_key("state-restart");
    let (lines, exact) = corpus(300, 5, 50);
    for _ in 0..2 {
        let report = TestRun::new(topology(&server.url, &prefix, source_of(&lines)))
            .deadline(Duration::from_secs(60))
            .run()
            .unwrap();
        assert_eq!(report.stats.acked, lines.len() as u64);
    }
    let twice: HashMap<String, u64> = exact.into_iter().map(|(w, c)| (w, 2 * c)).collect();
    assert_exact(&stored(&server, &prefix), &twice);
}

/// Runs the word count over `lines` as a topology process (no local
/// workers) on a thread; returns it, its handle and the address workers
/// connect to.
fn serve(
    url: &str,
    prefix: &str,
    lines: Vec<String>,
    at_most_once: bool,
) -> (
    std::thread::JoinHandle<standalone::RunReport>,
    RuntimeHandle,
    String,
) {
    serve_with(url, prefix, lines, at_most_once, |t| t)
}

/// [`serve`], with `adjust` applied to the topology.
fn serve_with(
    url: &str,
    prefix: &str,
    lines: Vec<String>,
    at_most_once: bool,
    adjust: impl FnOnce(TopologyBuilder) -> TopologyBuilder + Send + 'static,
) -> (
    std::thread::JoinHandle<standalone::RunReport>,
    RuntimeHandle,
    String,
) {
    let handle = RuntimeHandle::new();
    let h = handle.clone();
    let (url, p) = (url.to_string(), prefix.to_string());
    let top = std::thread::spawn(move || {
        let t = adjust(topology(&url, &p, source_of(&lines)).max_pending(256));
        let t = if at_most_once {
            t.at_most_once_updates()
        } else {
            t
        };
        let t = t.build().unwrap();
        standalone::run(
            t,
            RunOptions {
                handle: Some(h),
                local_workers: false,
                serve: Some(ServeOptions::loopback()),
                deadline: Some(Duration::from_secs(120)),
                ..RunOptions::default()
            },
        )
        .unwrap()
    });
    let addr = loop {
        if let Some(a) = handle.listening() {
            break a;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    (top, handle, addr.to_string())
}

/// The options of a test's worker of the topology at `addr`.
fn worker_options(addr: &str) -> WorkerOptions {
    WorkerOptions {
        topology: addr.to_string(),
        fetch_max: 64,
        backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        exit_with_topology: true,
        ..WorkerOptions::default()
    }
}

/// A worker of `task` on a thread, with a state registry of its own, as a
/// process would have.
fn start_worker(
    addr: &str,
    url: &str,
    prefix: &str,
    task: &'static str,
    at_most_once: bool,
) -> std::thread::JoinHandle<standalone::WorkerReport> {
    let (opts, url, p) = (worker_options(addr), url.to_string(), prefix.to_string());
    std::thread::spawn(move || {
        let t = topology(&url, &p, source_of(&[]));
        let t = if at_most_once {
            t.at_most_once_updates()
        } else {
            t
        };
        standalone::run_worker(&t.build().unwrap(), task, opts, None).unwrap()
    })
}

/// Waits until the run behind `handle` has acked `n` messages.
fn wait_acked(
    handle: &RuntimeHandle,
    top: &std::thread::JoinHandle<standalone::RunReport>,
    n: u64,
) {
    loop {
        let acked = handle.stats().map_or(0, |s| s.acked);
        assert!(!top.is_finished(), "the run ended early");
        if acked >= n {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A counter joining mid-run takes over its share of the keys: the new
/// owner of a key starts on it only once its old owner has finished (and
/// checkpointed) the key's earlier messages, so no update is lost.
#[test]
fn a_counter_joining_mid_run_keeps_the_counts_exact() {
    let _ = env_logger::builder().is_test(true).try_init();
    let server = TestServer::shared().unwrap();
    let prefix = unique_key("state-join");
    let (lines, exact) = corpus(6_000, 8, 400);
    let total = lines.len() as u64;
    let (top, handle, addr) = serve(&server.url, &prefix, lines, false);
    let start = |task| start_worker(&addr, &server.url, &prefix, task, false);
    let mut workers = vec![start("split"), start("count"), start("count")];
    // A third counter joins once a third of the lines are done.
    wait_acked(&handle, &top, total / 3);
    workers.push(start("count"));
    let report = top.join().unwrap();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(
        report.stop,
        StopReason::SourceExhausted,
        "{:?}",
        report.stats
    );
    assert_eq!(report.stats.acked, total);
    assert_eq!(report.stats.failed + report.stats.timed_out, 0);
    let counters: Vec<_> = report
        .stats
        .per_worker
        .iter()
        .filter(|w| w.task == "count")
        .collect();
    assert_eq!(counters.len(), 3, "{counters:?}");
    assert!(counters.iter().all(|w| w.handled > 0), "{counters:?}");
    assert_exact(&stored(&server, &prefix), &exact);
}

/// The counter process of the `kill -9` tests: this test binary, run
/// again with `TEMPEST_STATE_CHILD=addr|url|prefix` and `--ignored
/// --exact` (and `TEMPEST_STATE_AT_MOST_ONCE` set for at-most-once
/// updates).
#[test]
#[ignore = "run as a child process by the kill -9 tests"]
fn counter_process() {
    let spec = std::env::var("TEMPEST_STATE_CHILD").expect("TEMPEST_STATE_CHILD is set");
    let parts: Vec<&str> = spec.split('|').collect();
    let [addr, url, prefix] = parts[..] else {
        panic!("TEMPEST_STATE_CHILD={spec}")
    };
    let t = match std::env::var("TEMPEST_STATE_DIE_AFTER_COMMITS") {
        Ok(n) => topology_on(
            DieAfterCommit {
                inner: RedisState::with_prefix(url, prefix).unwrap(),
                left: std::sync::atomic::AtomicUsize::new(n.parse().unwrap()),
            },
            source_of(&[]),
        ),
        Err(_) => topology(url, prefix, source_of(&[])),
    };
    standalone::run_worker(&t.build().unwrap(), "count", worker_options(addr), None).unwrap();
}

fn counter_child(addr: &str, url: &str, prefix: &str, at_most_once: bool) -> std::process::Child {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["counter_process", "--exact", "--ignored", "--nocapture"])
        .env("TEMPEST_STATE_CHILD", format!("{addr}|{url}|{prefix}"))
        .stdout(std::process::Stdio::null());
    if at_most_once {
        cmd.env("TEMPEST_STATE_AT_MOST_ONCE", "1");
    }
    cmd.spawn().unwrap()
}

/// Runs the word count with its counter in a process of its own, kills
/// that process with SIGKILL twice mid-run and starts it again each time;
/// returns the counts in Redis, the exact ones, and the number of
/// applied-update records left in Redis.
fn kill_a_counter(
    prefix: &str,
    at_most_once: bool,
) -> (HashMap<String, u64>, HashMap<String, u64>, usize) {
    let _ = env_logger::builder().is_test(true).try_init();
    let server = TestServer::shared().unwrap();
    // 7 words a line, so a counter's batches (64 words) end inside lines:
    // a line some of whose words were counted and checkpointed when the
    // counter was killed runs again whole.
    let (lines, exact) = corpus(6_000, 7, 400);
    let total = lines.len() as u64;
    let (top, handle, addr) = serve(&server.url, prefix, lines, at_most_once);
    let split = start_worker(&addr, &server.url, prefix, "split", at_most_once);
    let mut child = counter_child(&addr, &server.url, prefix, at_most_once);
    for part in 1..=2 {
        wait_acked(&handle, &top, total * part / 3);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        child = counter_child(&addr, &server.url, prefix, at_most_once);
    }
    let report = top.join().unwrap();
    split.join().unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(
        report.stop,
        StopReason::SourceExhausted,
        "{:?}",
        report.stats
    );
    assert_eq!(report.stats.acked, total);
    let mut conn = server.connection().unwrap();
    let records: usize = redis::cmd("ZCARD")
        .arg(format!("{prefix}:applied"))
        .query(&mut conn)
        .unwrap();
    (stored(&server, prefix), exact, records)
}

/// A counter process killed with SIGKILL mid-run and started again: every
/// update of an acked message was checkpointed before its ack, so no count
/// ends below the exact one (a message whose updates were written but not
/// yet acked runs again: at least once, so some may end above).
#[test]
fn a_counter_killed_with_sigkill_loses_no_acked_update() {
    let (got, exact, records) = kill_a_counter(&unique_key("state-kill-9"), false);
    let short: Vec<_> = exact
        .iter()
        .filter(|(w, c)| got.get(*w).copied().unwrap_or(0) < **c)
        .collect();
    assert!(short.is_empty(), "counts below the exact ones: {short:?}");
    assert_eq!(records, 0, "no records without at-most-once updates");
    let extra: u64 = got.values().sum::<u64>() - exact.values().sum::<u64>();
    eprintln!("kill -9: {extra} update(s) applied twice");
}

/// The same with at-most-once updates: the messages the killed counter had
/// checkpointed but not answered run again and change nothing, so every
/// count is exact; and once every message is acked, no record of an
/// applied update is left in Redis.
#[test]
fn a_counter_killed_with_sigkill_applies_each_update_once_with_at_most_once_updates() {
    let (got, exact, records) = kill_a_counter(&unique_key("state-kill-9-once"), true);
    assert_exact(&got, &exact);
    assert_eq!(records, 0, "the records of acked messages are dropped");
}

/// At-most-once updates without a backend that records them is a build
/// error that says what is missing.
#[test]
fn at_most_once_updates_need_a_durable_backend() {
    let err = TopologyBuilder::new("state")
        .source(source_of(&[]))
        .pipeline(Pipeline::new().task(Count::default()))
        .at_most_once_updates()
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("at_most_once_updates needs a durable state backend"),
        "{err}"
    );
}

/// A worker that does not apply updates at most once, of a topology that
/// does, would give its outputs no paths: it is refused at the handshake,
/// with an error saying what to set.
#[test]
fn a_worker_configured_unlike_its_topology_is_refused() {
    let _ = env_logger::builder().is_test(true).try_init();
    let server = TestServer::shared().unwrap();
    let prefix = unique_key("state-mismatch");
    // A line that waits for a worker, so the topology stays up.
    let (_top, handle, addr) = serve(&server.url, &prefix, vec!["a b".to_string()], true);
    let t = topology(&server.url, &prefix, source_of(&[]))
        .build()
        .unwrap();
    let err = standalone::run_worker(&t, "split", worker_options(&addr), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the topology applies state updates at most once and this worker does not"),
        "{err}"
    );
    // The topology's thread ends with its graceful shutdown; the test
    // does not wait for it.
    handle.shutdown();
}

/// Runs the word count in process with answers that often come after the
/// message's timeout (they wait for a checkpoint every 150 ms; a message
/// may take 120 ms), so many lines are retried after their words were
/// counted; returns the run's stats, the stored counts and the exact ones.
fn retry_after_counting(
    prefix: &str,
    at_most_once: bool,
) -> (tempest::Stats, HashMap<String, u64>, HashMap<String, u64>) {
    let server = TestServer::shared().unwrap();
    let (lines, exact) = corpus(300, 5, 60);
    let t = topology(&server.url, prefix, source_of(&lines))
        .checkpoint_interval(Duration::from_millis(150))
        .msg_timeout(Duration::from_millis(120))
        .failure_policy(tempest::FailurePolicy::Retry(50))
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(5));
    let t = if at_most_once {
        t.at_most_once_updates()
    } else {
        t
    };
    let report = run_all(t, lines.len());
    let skipped = report
        .metrics
        .counter("tempest.state.updates_skipped", &[("task", "count")]);
    // Every retried line's words were counted by its first attempt.
    if at_most_once {
        assert!(skipped > 0, "{:?}", report.stats);
    } else {
        assert_eq!(skipped, 0);
    }
    (report.stats, stored(&server, prefix), exact)
}

/// The control: at least once, a line retried after its words were counted
/// counts them again.
#[test]
fn a_retry_after_counting_counts_again_at_least_once() {
    let (stats, got, exact) = retry_after_counting(&unique_key("state-retry"), false);
    assert!(stats.retried > 0, "{stats:?}");
    let extra = got.values().sum::<u64>() - exact.values().sum::<u64>();
    assert!(extra > 0, "{stats:?}");
    eprintln!("{} retries: {extra} updates applied again", stats.retried);
}

/// With at-most-once updates the retried lines' words change nothing: the
/// counts are exact however many attempts each line took.
#[test]
fn a_retry_after_counting_changes_nothing_with_at_most_once_updates() {
    let prefix = unique_key("state-retry-once");
    let (stats, got, exact) = retry_after_counting(&prefix, true);
    assert!(stats.retried > 0, "{stats:?}");
    assert_exact(&got, &exact);
    let server = TestServer::shared().unwrap();
    let mut conn = server.connection().unwrap();
    let records: usize = redis::cmd("ZCARD")
        .arg(format!("{prefix}:applied"))
        .query(&mut conn)
        .unwrap();
    assert_eq!(records, 0, "the records of acked messages are dropped");
}

/// The backend outlives a Redis restart: the pooled connection the
/// restart broke fails one call at most (with an error naming the store),
/// is dropped, and the next call works on a fresh one.
#[test]
fn the_backend_reconnects_after_redis_restarts() {
    use tempest::StateBackend;
    let mut server = TestServer::own(true).unwrap();
    let backend = RedisState::with_prefix(&server.url, &unique_key("state-restart-redis")).unwrap();
    let put = |v: &'static [u8]| {
        backend.commit(
            "t/s",
            &tempest::Changes {
                puts: &[(Bytes::from_static(b"k"), Bytes::from_static(v))],
                ..tempest::Changes::default()
            },
        )
    };
    put(b"1").unwrap();
    server.restart().unwrap();
    if let Err(e) = put(b"2") {
        assert!(e.to_string().starts_with("state \"t/s\""), "{e}");
        put(b"2").unwrap();
    }
    let got = backend
        .load("t/s", &[Bytes::from_static(b"k")], &[])
        .unwrap();
    assert_eq!(got.values, vec![Some(Bytes::from_static(b"2"))]);
}

/// Runs the word count with a counter process that dies right after its
/// third checkpoint is written, before it answers the messages that
/// checkpoint holds, and a second counter that takes over; returns the
/// stored counts and the exact ones. The lost messages go back to the
/// queue (`BestEffort`) or their lines are retried (`Retry`).
fn die_after_checkpoint(
    prefix: &str,
    at_most_once: bool,
    policy: tempest::FailurePolicy,
) -> (HashMap<String, u64>, HashMap<String, u64>) {
    let _ = env_logger::builder().is_test(true).try_init();
    let server = TestServer::shared().unwrap();
    let (lines, exact) = corpus(3_000, 7, 300);
    let total = lines.len() as u64;
    let (top, _handle, addr) = serve_with(&server.url, prefix, lines, at_most_once, move |t| {
        t.failure_policy(policy)
    });
    let split = start_worker(&addr, &server.url, prefix, "split", at_most_once);
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["counter_process", "--exact", "--ignored", "--nocapture"])
        .env(
            "TEMPEST_STATE_CHILD",
            format!("{addr}|{}|{prefix}", server.url),
        )
        .env("TEMPEST_STATE_DIE_AFTER_COMMITS", "3")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if at_most_once {
        cmd.env("TEMPEST_STATE_AT_MOST_ONCE", "1");
    }
    let died = cmd.spawn().unwrap().wait().unwrap();
    assert!(!died.success(), "the first counter aborts");
    let mut again = counter_child(&addr, &server.url, prefix, at_most_once);
    let report = top.join().unwrap();
    split.join().unwrap();
    assert!(again.wait().unwrap().success());
    assert_eq!(report.stats.acked, total, "{:?}", report.stats);
    (stored(&server, prefix), exact)
}

/// The control: a counter dying between its checkpoint and its answers
/// has its last checkpoint's updates applied again, at least once.
#[test]
fn a_counter_dying_after_its_checkpoint_counts_again_at_least_once() {
    for policy in [
        tempest::FailurePolicy::BestEffort,
        tempest::FailurePolicy::Retry(3),
    ] {
        let (got, exact) = die_after_checkpoint(&unique_key("state-die"), false, policy);
        let extra = got.values().sum::<u64>() - exact.values().sum::<u64>();
        assert!(extra > 0, "{policy:?}: no update applied twice");
        eprintln!("{policy:?}: {extra} update(s) applied twice");
    }
}

/// With at-most-once updates the messages the dead counter had
/// checkpointed change nothing when they run again, whether they come back
/// to the queue as they were (`BestEffort`: marked as maybe handled before)
/// or as a new attempt (`Retry`).
#[test]
fn a_counter_dying_after_its_checkpoint_applies_each_update_once_with_at_most_once_updates() {
    for policy in [
        tempest::FailurePolicy::BestEffort,
        tempest::FailurePolicy::Retry(3),
    ] {
        let (got, exact) = die_after_checkpoint(&unique_key("state-die-once"), true, policy);
        assert_exact(&got, &exact);
    }
}

/// Counts each word in keyed state from an async task, awaiting a little
/// per word (many calls in flight at once).
#[derive(Clone, Default)]
struct AsyncCount {
    counts: Option<KeyedState<u64>>,
}

impl tempest::AsyncTask for AsyncCount {
    fn name(&self) -> &str {
        "count"
    }
    fn started(&mut self, ctx: &TaskContext) {
        self.counts = Some(ctx.state("words").unwrap());
    }
    async fn handle(&self, word: Msg, _: MsgCtx) -> TaskResult {
        tokio::time::sleep(Duration::from_micros(200)).await;
        self.counts
            .as_ref()
            .ok_or_else(|| TaskError::msg("not started"))?
            .update(&word, |c| Some(c.unwrap_or(0) + 1))
            .map_err(|e| TaskError::msg(e.to_string()))?;
        Ok(Output::None)
    }
}

/// Regression: an async task's changes to durable state were never
/// checkpointed (only the sync loop did), and its answers did not wait for
/// a checkpoint. Now the async loop holds them like the sync one: the run
/// ends with every count in Redis, exact.
#[test]
fn an_async_task_checkpoints_its_state_before_it_answers() {
    let server = TestServer::shared().unwrap();
    let prefix = unique_key("state-async");
    let (lines, exact) = corpus(500, 6, 80);
    let t = TopologyBuilder::new("state")
        .source(source_of(&lines))
        .pipeline(
            Pipeline::new()
                .task(Split)
                .async_task(AsyncCount::default())
                .edge_by("split", "count", Grouping::Key),
        )
        .state_backend(RedisState::with_prefix(&server.url, &prefix).unwrap())
        .checkpoint_interval(Duration::from_millis(50))
        .concurrency("count", 32);
    run_all(t.workers("count", 2), lines.len());
    assert_exact(&stored(&server, &prefix), &exact);
}

/// Regression: the copies an `all` edge made of a message shared its path,
/// so with at-most-once updates the second copy's changes were taken for
/// the first's and left undone. Each copy is its own update now: two
/// counters behind an `all` edge count every word twice.
#[test]
fn each_copy_of_an_all_edge_is_an_update_of_its_own() {
    let server = TestServer::shared().unwrap();
    let prefix = unique_key("state-all");
    let (lines, exact) = corpus(300, 5, 40);
    let t = TopologyBuilder::new("state")
        .source(source_of(&lines))
        .pipeline(Pipeline::new().task(Split).task(Count::default()).edge_by(
            "split",
            "count",
            Grouping::All,
        ))
        .state_backend(RedisState::with_prefix(&server.url, &prefix).unwrap())
        .checkpoint_interval(Duration::from_millis(20))
        .at_most_once_updates()
        .workers("count", 2);
    run_all(t, lines.len());
    let twice: HashMap<String, u64> = exact.into_iter().map(|(w, c)| (w, 2 * c)).collect();
    assert_exact(&stored(&server, &prefix), &twice);
}

/// Regression: an async worker never dropped the clean entries it had
/// cached, so a value changed elsewhere (by another process that owned the
/// key meanwhile) was overwritten with one computed from its stale copy.
/// It reads clean entries afresh before each run now, as a sync worker does.
#[test]
fn an_async_worker_reads_a_value_changed_elsewhere() {
    let server = TestServer::shared().unwrap();
    let prefix = unique_key("state-async-fresh");
    let source = MockSource::from_config(MockConfig {
        open: true,
        ack_interval_ms: 1,
        ..MockConfig::default()
    })
    .unwrap();
    let mock = source.handle();
    mock.push("a");
    let t = TopologyBuilder::new("state")
        .source(source)
        .pipeline(
            Pipeline::new()
                .task(Split)
                .async_task(AsyncCount::default())
                .edge_by("split", "count", Grouping::Key),
        )
        .state_backend(RedisState::with_prefix(&server.url, &prefix).unwrap())
        .checkpoint_interval(Duration::from_millis(10));
    let url = server.url.clone();
    let key = format!("{prefix}:count/words");
    let mut changed = false;
    let report = TestRun::new(t)
        .until(move |s| {
            if s.acked >= 1 && !changed {
                // "a" = 1 is checkpointed (the message is acked): another
                // owner makes it 100, then "a" comes again.
                let mut conn = redis::Client::open(url.as_str())
                    .unwrap()
                    .get_connection()
                    .unwrap();
                redis::cmd("HSET")
                    .arg(&key)
                    .arg("a")
                    .arg(postcard::to_allocvec(&100u64).unwrap())
                    .query::<()>(&mut conn)
                    .unwrap();
                changed = true;
                mock.push("a");
            }
            s.acked >= 2
        })
        .deadline(Duration::from_secs(30))
        .run()
        .unwrap();
    assert_eq!(report.stop, StopReason::Condition, "{:?}", report.stats);
    assert_eq!(stored(&server, &prefix).get("a"), Some(&101));
}
