//! The message context (`MsgCtx`) on every hop: source id, attempt,
//! deliveries, timestamp, parent, key, headers and deadline, in standalone
//! mode and across the wire.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tempest::standalone::{self, RuntimeHandle, ServeOptions, WorkerOptions};
use tempest::testing::{TestReport, TestRun};
use tempest::{
    FailurePolicy, Msg, MsgCtx, Out, Outcome, Output, Pipeline, Task, TaskError, TaskResult,
    TopologyBuilder,
};
use tempest_source::{Headers, MsgId, Source};
use tempest_source_mock::{MockConfig, MockHandle, MockSource};

/// What one task saw of one message.
#[derive(Clone, Debug)]
struct Seen {
    task: &'static str,
    payload: Bytes,
    id: MsgId,
    attempt: u32,
    delivered: u32,
    timestamp: u64,
    parent: Option<&'static str>,
    key: Option<Bytes>,
    headers: Vec<(String, Bytes)>,
    deadline_ahead: bool,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// Records its context, then: `split` emits each word keyed by itself
/// (the word `same` keeps the inherited key) with a header; `mid` fails
/// attempt 1 of a message whose word is `retry`; `last` passes on.
#[derive(Clone)]
struct Recorder {
    task: &'static str,
    log: Log,
}

impl Task for Recorder {
    fn name(&self) -> &str {
        self.task
    }

    fn handle(&mut self, msg: Msg, ctx: &MsgCtx) -> TaskResult {
        self.log.lock().unwrap().push(Seen {
            task: self.task,
            payload: msg.clone(),
            id: ctx.id().clone(),
            attempt: ctx.attempt(),
            delivered: ctx.delivered(),
            timestamp: ctx.timestamp(),
            parent: ctx.parent(),
            key: ctx.key().cloned(),
            headers: ctx
                .headers()
                .iter()
                .map(|(n, v)| (n.to_string(), v.clone()))
                .collect(),
            deadline_ahead: ctx.deadline().is_some_and(|d| d > Instant::now()),
        });
        match self.task {
            "split" => {
                let text = std::str::from_utf8(&msg).map_err(TaskError::from)?;
                let mut outs = Vec::new();
                for word in text.split(' ') {
                    let out =
                        Out::new(Bytes::copy_from_slice(word.as_bytes())).header("split", "yes")?;
                    outs.push(if word == "same" {
                        out
                    } else {
                        out.key(word.to_string())
                    });
                }
                Ok(outs.into())
            }
            "mid" if &msg[..] == b"retry" && ctx.attempt() == 1 => {
                Err(TaskError::msg("the first attempt fails"))
            }
            _ => Ok(Output::One(msg)),
        }
    }
}

fn pipeline(log: &Log) -> Pipeline {
    let r = |task| Recorder {
        task,
        log: Arc::clone(log),
    };
    Pipeline::new()
        .task(r("split"))
        .task(r("mid"))
        .task(r("last"))
        .edge("split", "mid")
        .edge("mid", "last")
}

fn topology(source: MockSource, log: &Log) -> TopologyBuilder {
    common::builder("context", source)
        .failure_policy(FailurePolicy::Retry(2))
        .msg_timeout(Duration::from_secs(30))
        .pipeline(pipeline(log))
}

/// The source: one message with a key and headers, one with neither that
/// fails once in `mid`.
fn source() -> (MockSource, MockHandle, MsgId, MsgId) {
    let source = MockSource::from_config(MockConfig {
        ack_interval_ms: 1,
        ..MockConfig::default()
    })
    .unwrap();
    let mock = source.handle();
    let mut headers = Headers::new();
    headers.insert("tenant", "acme").unwrap();
    let keyed = mock.push_with("alice same", Some(Bytes::from("user-7")), headers);
    let retried = mock.push("retry");
    (source, mock, keyed, retried)
}

fn check(report: &TestReport, log: &Log, keyed: &MsgId, retried: &MsgId) {
    assert_eq!(report.outcome(keyed), Some(Outcome::Acked));
    assert_eq!(report.outcome(retried), Some(Outcome::Acked));
    let seen = log.lock().unwrap().clone();
    let of = |id: &MsgId, task: &str| -> Vec<Seen> {
        seen.iter()
            .filter(|s| &s.id == id && s.task == task)
            .cloned()
            .collect()
    };
    let h = |pairs: &[(&str, &str)]| -> Vec<(String, Bytes)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), Bytes::copy_from_slice(v.as_bytes())))
            .collect()
    };

    // The keyed message: the root sees the source's key and headers.
    let root = of(keyed, "split");
    assert_eq!(root.len(), 1, "{root:?}");
    let r = &root[0];
    assert_eq!((r.attempt, r.delivered, r.parent), (1, 1, None));
    assert_eq!(r.key.as_deref(), Some(&b"user-7"[..]));
    assert_eq!(r.headers, h(&[("tenant", "acme")]));
    assert!(r.timestamp > 1_600_000_000_000, "a real timestamp");
    assert!(r.deadline_ahead, "a deadline ahead of the task");
    for task in ["mid", "last"] {
        let mut got = of(keyed, task);
        got.sort_by(|a, b| a.payload.cmp(&b.payload));
        assert_eq!(got.len(), 2, "{task}: {got:?}");
        let parent = if task == "mid" { "split" } else { "mid" };
        for s in &got {
            assert_eq!(s.parent, Some(parent), "{task}");
            assert_eq!((s.attempt, s.delivered), (1, 1));
            assert_eq!(
                s.timestamp, r.timestamp,
                "the source's timestamp on every hop"
            );
            assert!(s.deadline_ahead);
            // Headers set by split are added to those inherited.
            assert_eq!(s.headers, h(&[("tenant", "acme"), ("split", "yes")]));
        }
        // "alice" is keyed by itself; "same" kept the source's key.
        assert_eq!(got[0].payload, "alice");
        assert_eq!(got[0].key.as_deref(), Some(&b"alice"[..]));
        assert_eq!(got[1].payload, "same");
        assert_eq!(got[1].key.as_deref(), Some(&b"user-7"[..]));
    }

    // The retried message: attempt 1 reaches mid, attempt 2 every task.
    let attempts = |task| {
        let mut a: Vec<u32> = of(retried, task).iter().map(|s| s.attempt).collect();
        a.sort_unstable();
        a
    };
    assert_eq!(attempts("split"), [1, 2]);
    assert_eq!(attempts("mid"), [1, 2]);
    assert_eq!(attempts("last"), [2]);
    for s in of(retried, "last") {
        assert_eq!(s.key.as_deref(), Some(&b"retry"[..]));
        assert_eq!(s.headers, h(&[("split", "yes")]));
        assert_eq!(s.delivered, 1, "a retry is not a redelivery");
    }
}

#[test]
fn the_context_is_right_on_every_hop_and_after_a_retry() {
    common::logs();
    let log = Log::default();
    let (source, mock, keyed, retried) = source();
    let report = TestRun::new(topology(source, &log))
        .until(|s| s.acked >= 2)
        .deadline(Duration::from_secs(20))
        .run()
        .unwrap();
    check(&report, &log, &keyed, &retried);
    assert_eq!(mock.acked(), 2);
}

#[test]
fn key_headers_and_context_cross_the_wire() {
    common::logs();
    let log = Log::default();
    let (source, mock, keyed, retried) = source();
    let handle = RuntimeHandle::new();
    let run = {
        let (log, handle) = (Arc::clone(&log), handle.clone());
        std::thread::spawn(move || {
            TestRun::new(topology(source, &log))
                .until(|s| s.acked >= 2)
                .deadline(Duration::from_secs(30))
                .handle(handle)
                .run_serving(ServeOptions::loopback())
                .unwrap()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let addr = loop {
        if let Some(a) = handle.listening() {
            break a;
        }
        assert!(Instant::now() < deadline, "the topology never listened");
        std::thread::sleep(Duration::from_millis(5));
    };
    let workers: Vec<_> = ["split", "mid", "last"]
        .into_iter()
        .map(|task| {
            let t = topology(common::generated(0).0, &log).build().unwrap();
            let opts = WorkerOptions {
                topology: addr.to_string(),
                backoff: Duration::from_millis(20),
                max_backoff: Duration::from_millis(200),
                exit_with_topology: true,
                ..WorkerOptions::default()
            };
            std::thread::spawn(move || standalone::run_worker(&t, task, opts, None))
        })
        .collect();
    let report = run.join().unwrap();
    for w in workers {
        w.join().unwrap().unwrap();
    }
    check(&report, &log, &keyed, &retried);
    assert_eq!(mock.acked(), 2);
}
