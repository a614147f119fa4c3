//! Groupings: which worker of a task gets a message, per edge; in process
//! and over TCP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{builder, FnTask};
use tempest::standalone::{self, RunOptions, RuntimeHandle, ServeOptions, WorkerOptions};
use tempest::testing::TestRun;
use tempest::{
    AsyncTask, FailurePolicy, Grouping, Msg, MsgCtx, Out, Output, Pipeline, StopReason, Task,
    TaskContext, TaskResult, TopologyBuilder,
};
use tempest_source::{FailReason, Source};
use tempest_source_mock::{MockConfig, MockSource};

/// Lines of words, `lines` of them, `words` each, over a vocabulary of
/// `vocab` words; and the exact count of every word.
fn corpus(lines: usize, words: usize, vocab: usize) -> (Vec<String>, HashMap<String, u64>) {
    let mut exact = HashMap::new();
    let mut out = Vec::new();
    let mut x: u64 = 7;
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

fn source_of(lines: &[String]) -> (MockSource, tempest_source_mock::MockHandle) {
    let source = MockSource::from_config(MockConfig {
        ack_interval_ms: 1,
        ..MockConfig::default()
    })
    .unwrap();
    let mock = source.handle();
    mock.push_all(lines.iter().map(|l| Bytes::from(l.clone())));
    (source, mock)
}

/// Splits a line into words, each keyed by itself.
fn split() -> FnTask {
    FnTask::new("split", |m| {
        let text = String::from_utf8_lossy(&m).to_string();
        Ok(Output::Outs(
            text.split_whitespace()
                .map(|w| Out::new(Bytes::from(w.to_string())).key(w.to_string()))
                .collect(),
        ))
    })
}

/// Counts per worker: `(worker, word) -> count`.
type Counts = Arc<Mutex<HashMap<(usize, String), u64>>>;

/// A counter that records which of its workers counted each word.
#[derive(Clone)]
struct Count {
    counts: Counts,
    worker: usize,
}

impl Task for Count {
    fn name(&self) -> &str {
        "count"
    }
    fn started(&mut self, ctx: &TaskContext) {
        self.worker = ctx.worker;
    }
    fn handle(&mut self, m: Msg, _: &MsgCtx) -> TaskResult {
        let w = String::from_utf8_lossy(&m).to_string();
        *self
            .counts
            .lock()
            .unwrap()
            .entry((self.worker, w))
            .or_insert(0) += 1;
        Ok(Output::None)
    }
}

/// split -> count over `grouping`.
fn counting(counts: &Counts, grouping: Grouping) -> Pipeline {
    Pipeline::new()
        .task(split())
        .task(Count {
            counts: Arc::clone(counts),
            worker: 0,
        })
        .edge_by("split", "count", grouping)
}

fn word_count(grouping: Grouping, counters: usize, lines: &[String], counts: &Counts) -> u64 {
    let (source, mock) = source_of(lines);
    let report = TestRun::new(
        builder("wc", source)
            .pipeline(counting(counts, grouping))
            .workers("count", counters),
    )
    .run()
    .unwrap();
    assert_eq!(report.stats.acked, lines.len() as u64);
    assert_eq!(mock.acked(), lines.len() as u64);
    report.stats.acked
}

/// Per word: the workers that counted it and the total.
fn by_word(counts: &Counts) -> HashMap<String, (HashSet<usize>, u64)> {
    let mut out: HashMap<String, (HashSet<usize>, u64)> = HashMap::new();
    for ((worker, word), n) in counts.lock().unwrap().iter() {
        let e = out.entry(word.clone()).or_default();
        e.0.insert(*worker);
        e.1 += n;
    }
    out
}

#[test]
fn a_key_grouped_word_count_is_exact_with_any_number_of_counters() {
    let (lines, exact) = corpus(2_000, 8, 300);
    for counters in [1, 3] {
        let counts = Counts::default();
        word_count(Grouping::Key, counters, &lines, &counts);
        let got = by_word(&counts);
        assert_eq!(got.len(), exact.len());
        let mut used: HashSet<usize> = HashSet::new();
        for (word, (workers, n)) in &got {
            assert_eq!(workers.len(), 1, "{word} was counted by {workers:?}");
            assert_eq!(Some(n), exact.get(word), "{word}");
            used.extend(workers);
        }
        assert_eq!(used.len(), counters, "every counter got keys");
    }
}

#[test]
fn shuffle_splits_keys_across_counters() {
    let (lines, exact) = corpus(2_000, 8, 50);
    let counts = Counts::default();
    word_count(Grouping::Shuffle, 3, &lines, &counts);
    let got = by_word(&counts);
    let total: u64 = got.values().map(|(_, n)| n).sum();
    assert_eq!(total, exact.values().sum::<u64>());
}

#[test]
fn all_copies_to_every_worker_and_global_to_one() {
    let (lines, exact) = corpus(300, 4, 20);
    let words: u64 = exact.values().sum();
    let counts = Counts::default();
    word_count(Grouping::All, 3, &lines, &counts);
    let per_worker: HashMap<usize, u64> =
        counts
            .lock()
            .unwrap()
            .iter()
            .fold(HashMap::new(), |mut m, ((w, _), n)| {
                *m.entry(*w).or_default() += n;
                m
            });
    assert_eq!(per_worker.len(), 3);
    assert!(per_worker.values().all(|&n| n == words), "{per_worker:?}");

    let counts = Counts::default();
    word_count(Grouping::Global, 3, &lines, &counts);
    let workers: HashSet<usize> = counts.lock().unwrap().keys().map(|(w, _)| *w).collect();
    assert_eq!(workers.len(), 1, "one worker took every message");
    let total: u64 = counts.lock().unwrap().values().sum();
    assert_eq!(total, words);
}

#[test]
fn partial_key_puts_a_key_on_at_most_two_workers() {
    let (lines, exact) = corpus(2_000, 8, 40);
    let counts = Counts::default();
    word_count(Grouping::PartialKey, 4, &lines, &counts);
    let got = by_word(&counts);
    for (word, (workers, n)) in &got {
        assert!(workers.len() <= 2, "{word} on {workers:?}");
        assert_eq!(Some(n), exact.get(word));
    }
}

#[test]
fn an_output_without_a_key_on_a_key_edge_fails_naming_the_edge() {
    let (source, mock) = source_of(&["a b".to_string(), "c d".to_string()]);
    let counts = Counts::default();
    let report = TestRun::new(
        builder("keyless", source)
            .failure_policy(FailurePolicy::None)
            .pipeline(
                Pipeline::new()
                    .task(FnTask::new("split", |m| Ok(Output::One(m))))
                    .task(Count {
                        counts: Arc::clone(&counts),
                        worker: 0,
                    })
                    .edge_by("split", "count", Grouping::Key),
            ),
    )
    .run()
    .unwrap();
    assert_eq!(report.stats.failed, 2);
    assert_eq!(report.stats.task_errors, 2);
    assert!(
        counts.lock().unwrap().is_empty(),
        "nothing reached the counter"
    );
    let failed = mock.failed();
    assert_eq!(failed.len(), 2);
    let FailReason::TaskError { task, message } = &failed[0].reason else {
        panic!("{:?}", failed[0].reason)
    };
    assert_eq!(task, "split");
    assert_eq!(
        message,
        "output 0 has no key, and the edge \"split\" -> \"count\" groups by key"
    );
}

/// An async counter that checks it never runs two calls of one key at
/// once, and that a key's messages come in the order they were emitted.
#[derive(Clone)]
struct AsyncCount {
    in_progress: Arc<Mutex<HashSet<String>>>,
    overlaps: Arc<AtomicUsize>,
    last: Arc<Mutex<HashMap<String, u64>>>,
    disorders: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
}

impl AsyncTask for AsyncCount {
    fn name(&self) -> &str {
        "count"
    }
    async fn handle(&self, m: Msg, ctx: MsgCtx) -> TaskResult {
        let key = ctx.key_str().unwrap_or_default().to_string();
        let seq: u64 = String::from_utf8_lossy(&m).parse().unwrap();
        {
            let mut running = self.in_progress.lock().unwrap();
            if !running.insert(key.clone()) {
                self.overlaps.fetch_add(1, Ordering::SeqCst);
            }
            self.most.fetch_max(running.len(), Ordering::SeqCst);
            let mut last = self.last.lock().unwrap();
            if last.insert(key.clone(), seq).is_some_and(|prev| prev > seq) {
                self.disorders.fetch_add(1, Ordering::SeqCst);
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        self.in_progress.lock().unwrap().remove(&key);
        Ok(Output::None)
    }
}

#[test]
fn an_async_worker_runs_one_message_per_key_at_a_time_in_order() {
    let (source, _mock) = source_of(&["go".to_string()]);
    let task = AsyncCount {
        in_progress: Arc::default(),
        overlaps: Arc::default(),
        last: Arc::default(),
        disorders: Arc::default(),
        most: Arc::default(),
    };
    let (overlaps, disorders, most) = (
        Arc::clone(&task.overlaps),
        Arc::clone(&task.disorders),
        Arc::clone(&task.most),
    );
    // One message fans out to 400: 8 keys, sequence numbers in order.
    let fan = FnTask::new("fan", |_| {
        Ok(Output::Outs(
            (0..400u64)
                .map(|i| Out::new(Bytes::from(i.to_string())).key(format!("k{}", i % 8)))
                .collect(),
        ))
    });
    let report = TestRun::new(
        builder("one-per-key", source)
            .pipeline(
                Pipeline::new()
                    .task(fan)
                    .async_task(task)
                    .edge_by("fan", "count", Grouping::Key)
                    .concurrency("count", 64),
            )
            .workers("count", 2),
    )
    .run()
    .unwrap();
    assert_eq!(report.stats.acked, 1);
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "two calls of one key at once"
    );
    assert_eq!(
        disorders.load(Ordering::SeqCst),
        0,
        "a key's messages out of order"
    );
    assert!(
        most.load(Ordering::SeqCst) > 1,
        "keys still ran side by side"
    );
}

fn remote_topology(counts: &Counts) -> TopologyBuilder {
    TopologyBuilder::new("remote-keys")
        .source(source_of(&[]).0)
        .pipeline(counting(counts, Grouping::Key))
}

#[test]
fn key_grouping_over_remote_workers_keeps_each_key_on_one_worker() {
    common::logs();
    let (lines, exact) = corpus(1_000, 8, 200);
    let (source, mock) = source_of(&lines);
    let counts = Counts::default();
    let handle = RuntimeHandle::new();
    let h = handle.clone();
    let c = Arc::clone(&counts);
    let top = std::thread::spawn(move || {
        let t = remote_topology(&c).source(source).build().unwrap();
        standalone::run(
            t,
            RunOptions {
                handle: Some(h),
                local_workers: false,
                serve: Some(ServeOptions::loopback()),
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
    let workers: Vec<_> = [("split", 1), ("count", 3)]
        .into_iter()
        .map(|(task, n)| {
            let opts = WorkerOptions {
                topology: addr.to_string(),
                workers: n,
                fetch_max: 128,
                backoff: Duration::from_millis(20),
                max_backoff: Duration::from_millis(200),
                exit_with_topology: true,
                ..WorkerOptions::default()
            };
            let c = Arc::clone(&counts);
            std::thread::spawn(move || {
                let t = remote_topology(&c).build().unwrap();
                standalone::run_worker(&t, task, opts, None).unwrap()
            })
        })
        .collect();
    let report = top.join().unwrap();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(report.stop, StopReason::SourceExhausted);
    assert_eq!(mock.acked(), lines.len() as u64);
    let got = by_word(&counts);
    assert_eq!(got.len(), exact.len());
    for (word, (workers, n)) in &got {
        assert_eq!(workers.len(), 1, "{word} was counted by {workers:?}");
        assert_eq!(Some(n), exact.get(word));
    }
}
