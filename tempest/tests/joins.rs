//! Joins ([`JoinTask`]): a fan-in task that gets everything its parents
//! emitted for a source message in one call, end to end through the
//! standalone runtime and over loopback with remote workers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{builder, primed, FnTask};
use proptest::prelude::*;
use tempest::standalone::{self, WorkerOptions};
use tempest::testing::TestRun;
use tempest::{
    FailurePolicy, JoinTask, Joined, Msg, MsgCtx, Out, Outcome, Output, Pipeline, Task,
    TaskContext, TaskError, TaskResult, TopologyBuilder,
};
use tempest_source_mock::MockSource;

/// What one call of the join saw.
#[derive(Clone, Debug)]
struct Call {
    /// The source message (its payload, a number).
    msg: u64,
    /// The worker that ran it.
    worker: usize,
    attempt: u32,
    key: Option<String>,
    headers: BTreeMap<String, String>,
    /// Per parent, in the order `Joined::parents` gives them, the payloads.
    parents: Vec<(String, Vec<String>)>,
    /// Every part's parent, in the order `Joined::parts` gives them.
    order: Vec<String>,
}

/// A join that records every call in a log its workers share.
#[derive(Clone)]
struct Recorder {
    log: Arc<Mutex<Vec<Call>>>,
    worker: usize,
}

impl Recorder {
    fn new() -> Self {
        Recorder {
            log: Arc::default(),
            worker: usize::MAX,
        }
    }
    fn calls(&self) -> Vec<Call> {
        self.log.lock().unwrap().clone()
    }
}

impl JoinTask for Recorder {
    fn name(&self) -> &str {
        "join"
    }
    fn started(&mut self, ctx: &TaskContext) {
        self.worker = ctx.worker;
    }
    fn handle(&mut self, joined: Joined, ctx: &MsgCtx) -> TaskResult {
        let text = |b: &Bytes| String::from_utf8_lossy(b).into_owned();
        let msg = joined
            .parts()
            .first()
            .and_then(|p| text(p.payload()).split('/').next()?.parse().ok())
            .ok_or_else(|| TaskError::msg("a part without a message number"))?;
        let call = Call {
            msg,
            worker: self.worker,
            attempt: ctx.attempt(),
            key: ctx.key_str().map(str::to_string),
            headers: ctx
                .headers()
                .iter()
                .map(|(n, v)| (n.to_string(), text(v)))
                .collect(),
            parents: joined
                .parents()
                .map(|(p, parts)| {
                    assert_eq!(parts, joined.from(p));
                    assert!(parts.iter().all(|part| part.parent() == p));
                    (
                        p.to_string(),
                        parts.iter().map(|x| text(x.payload())).collect(),
                    )
                })
                .collect(),
            order: joined.iter().map(|p| p.parent().to_string()).collect(),
        };
        self.log.lock().unwrap().push(call);
        Ok(Output::one(joined.len().to_string()))
    }
}

/// A diamond: `root` emits `copies[m]` outputs for source message `m`
/// (payload "m/c", key "m", header msg=m); middle task `i` emits
/// `fanout[i][m]` outputs per input ("m/c/i/j", header from=i, inherited
/// key and msg); all middles meet in the join.
#[derive(Clone, Debug)]
struct Diamond {
    copies: Vec<usize>,
    fanout: Vec<Vec<usize>>,
    workers: usize,
    batch: usize,
}

fn number(m: &Msg) -> Result<usize, TaskError> {
    std::str::from_utf8(m)
        .ok()
        .and_then(|s| s.split('/').next()?.parse().ok())
        .ok_or_else(|| TaskError::msg("not a numbered payload"))
}

impl Diamond {
    fn middle(i: usize) -> String {
        format!("mid{i}")
    }

    fn pipeline(&self, join: &Recorder) -> Pipeline {
        let copies = self.copies.clone();
        let root = FnTask::new("root", move |m| {
            let n = number(&m)?;
            let outs = (0..copies[n])
                .map(|c| {
                    Out::new(format!("{n}/{c}"))
                        .key(n.to_string())
                        .header("msg", n.to_string())
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(outs.into())
        });
        let mut p = Pipeline::new().task(root).join(join.clone());
        for (i, fanout) in self.fanout.iter().enumerate() {
            let fanout = fanout.clone();
            let mid = FnTask::new(&Self::middle(i), move |m| {
                let n = number(&m)?;
                let base = String::from_utf8_lossy(&m).into_owned();
                let outs = (0..fanout[n])
                    .map(|j| Out::new(format!("{base}/{i}/{j}")).header("from", i.to_string()))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(outs.into())
            });
            p = p
                .task(mid)
                .edge("root", Self::middle(i))
                .edge(Self::middle(i), "join");
        }
        p
    }

    fn topology(&self, source: MockSource, join: &Recorder) -> TopologyBuilder {
        let mut b = builder("joins", source)
            .pipeline(self.pipeline(join))
            .task_batch(self.batch)
            .workers("root", self.workers)
            .workers("join", self.workers);
        for i in 0..self.fanout.len() {
            b = b.workers(Self::middle(i), self.workers);
        }
        b
    }

    /// Checks that the join ran exactly once for each source message for
    /// which a middle task emitted something, never for the others, and
    /// saw exactly each parent's outputs, grouped by parent.
    fn check(&self, calls: &[Call]) -> Result<(), TestCaseError> {
        let mut by_msg: HashMap<u64, &Call> = HashMap::new();
        for c in calls {
            prop_assert!(
                by_msg.insert(c.msg, c).is_none(),
                "the join ran twice for message {}",
                c.msg
            );
        }
        let parents: Vec<String> = (0..self.fanout.len()).map(Self::middle).collect();
        for (m, &copies) in self.copies.iter().enumerate() {
            let expected: Vec<Vec<String>> = self
                .fanout
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let mut v: Vec<String> = (0..copies)
                        .flat_map(|c| (0..f[m]).map(move |j| format!("{m}/{c}/{i}/{j}")))
                        .collect();
                    v.sort();
                    v
                })
                .collect();
            let total: usize = expected.iter().map(Vec::len).sum();
            let Some(call) = by_msg.get(&(m as u64)) else {
                prop_assert_eq!(total, 0, "the join never ran for message {}", m);
                continue;
            };
            prop_assert!(total > 0, "the join ran for message {} with nothing", m);
            prop_assert!(call.worker < self.workers);
            let names: Vec<&String> = call.parents.iter().map(|(p, _)| p).collect();
            prop_assert_eq!(names, parents.iter().collect::<Vec<_>>());
            let mut order = Vec::new();
            for ((parent, got), want) in call.parents.iter().zip(&expected) {
                // Each input's outputs in the order emitted.
                for c in 0..copies {
                    let prefix = format!("{m}/{c}/");
                    let js: Vec<&String> = got.iter().filter(|p| p.starts_with(&prefix)).collect();
                    let mut sorted = js.clone();
                    sorted.sort_by_key(|p| {
                        p.rsplit('/').next().and_then(|j| j.parse::<usize>().ok())
                    });
                    prop_assert_eq!(js, sorted, "{} out of order", parent);
                }
                let mut got = got.clone();
                got.sort();
                prop_assert_eq!(&got, want, "message {} from {}", m, parent);
                order.extend(std::iter::repeat_n(parent.clone(), got.len()));
            }
            prop_assert_eq!(&call.order, &order, "parts grouped by parent");
            prop_assert_eq!(call.key.as_ref(), Some(&m.to_string()));
            prop_assert_eq!(call.headers.get("msg"), Some(&m.to_string()));
            let emitting: Vec<usize> = expected
                .iter()
                .enumerate()
                .filter(|(_, v)| !v.is_empty())
                .map(|(i, _)| i)
                .collect();
            let from = match emitting.as_slice() {
                [only] => Some(only.to_string()),
                _ => None,
            };
            prop_assert_eq!(call.headers.get("from"), from.as_ref(), "message {}", m);
        }
        Ok(())
    }
}

fn numbered(count: usize) -> (MockSource, tempest_source_mock::MockHandle) {
    let (source, mock) = primed(&[]);
    mock.push_all((0..count).map(|i| i.to_string()));
    (source, mock)
}

fn arb_diamond() -> impl Strategy<Value = Diamond> {
    (2usize..5, 1usize..40).prop_flat_map(|(k, n)| {
        (
            proptest::collection::vec(0usize..3, n),
            proptest::collection::vec(proptest::collection::vec(0usize..4, n), k),
            1usize..4,
            1usize..8,
        )
            .prop_map(|(copies, fanout, workers, batch)| Diamond {
                copies,
                fanout,
                workers,
                batch,
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn a_join_receives_exactly_the_union_once_on_one_worker(d in arb_diamond()) {
        let (source, mock) = numbered(d.copies.len());
        let join = Recorder::new();
        let report = TestRun::new(d.topology(source, &join))
            .deadline(Duration::from_secs(30))
            .run()
            .unwrap();
        prop_assert_eq!(report.count(Outcome::Acked), d.copies.len(), "{:?}", report.stats);
        prop_assert_eq!(mock.acked_twice(), 0);
        d.check(&join.calls())?;
    }
}

#[test]
fn a_join_over_remote_workers_receives_exactly_the_union_once() {
    common::logs();
    let n = 300;
    let d = Diamond {
        copies: (0..n).map(|m| m % 3).collect(),
        fanout: vec![
            (0..n).map(|m| m % 4).collect(),
            (0..n).map(|m| (m / 3) % 3).collect(),
            (0..n).map(|m| (m * 7) % 5 % 3).collect(),
        ],
        workers: 2,
        batch: 16,
    };
    let join = Recorder::new();
    let (source, mock) = numbered(n);
    let (top, addr) = common::serve_on_loopback(d.topology(source, &join).build().unwrap());
    let mut tasks = vec!["root".to_string(), "join".to_string()];
    tasks.extend((0..d.fanout.len()).map(Diamond::middle));
    let workers: Vec<_> = tasks
        .into_iter()
        .map(|task| {
            let topology = d.topology(numbered(0).0, &join).build().unwrap();
            let opts = WorkerOptions {
                topology: addr.to_string(),
                workers: d.workers,
                backoff: Duration::from_millis(20),
                max_backoff: Duration::from_millis(200),
                exit_with_topology: true,
                ..WorkerOptions::default()
            };
            std::thread::spawn(move || {
                standalone::run_worker(&topology, &task, opts, None).unwrap()
            })
        })
        .collect();
    let report = top.join().unwrap();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(report.stats.acked, n as u64, "{:?}", report.stats);
    assert_eq!(mock.acked_twice(), 0);
    let calls = join.calls();
    d.check(&calls).unwrap();
    let workers: HashSet<usize> = calls.iter().map(|c| c.worker).collect();
    assert!(!calls.is_empty());
    assert!(workers.iter().all(|&w| w < d.workers), "{workers:?}");
}

#[test]
fn a_join_after_a_retry_sees_only_the_second_attempts_parts() {
    let n = 12;
    let (source, mock) = numbered(n);
    // slow fails every odd message on its first attempt, once fast has
    // handled it (so fast's first-attempt parts are held by then).
    let fast_done: Arc<Mutex<HashSet<usize>>> = Arc::default();
    let fast_log = Arc::clone(&fast_done);
    let fast = FnTask::new("fast", move |m| {
        let n = number(&m)?;
        fast_log.lock().unwrap().insert(n);
        Ok(Output::One(m))
    });
    let first_failures = Arc::new(AtomicUsize::new(0));
    let failures = Arc::clone(&first_failures);
    #[derive(Clone)]
    struct Slow {
        fast_done: Arc<Mutex<HashSet<usize>>>,
        failures: Arc<AtomicUsize>,
    }
    impl Task for Slow {
        fn name(&self) -> &str {
            "slow"
        }
        fn handle(&mut self, m: Msg, ctx: &MsgCtx) -> TaskResult {
            let n = number(&m)?;
            if ctx.attempt() == 1 && n % 2 == 1 {
                let until = std::time::Instant::now() + Duration::from_secs(5);
                while !self.fast_done.lock().unwrap().contains(&n)
                    && std::time::Instant::now() < until
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                // Let fast's result reach the pipeline first.
                std::thread::sleep(Duration::from_millis(20));
                self.failures.fetch_add(1, Ordering::SeqCst);
                return Err(TaskError::msg("first attempt"));
            }
            Ok(Output::One(m))
        }
    }
    let root = FnTask::new("root", |m| Ok(Output::One(m)));
    /// Tags every payload with the attempt, so the join can tell them apart.
    #[derive(Clone)]
    struct Tag;
    impl Task for Tag {
        fn name(&self) -> &str {
            "tag"
        }
        fn handle(&mut self, m: Msg, ctx: &MsgCtx) -> TaskResult {
            let n = number(&m)?;
            Ok(Output::one(format!("{n}/a{}", ctx.attempt())))
        }
    }
    let join = Recorder::new();
    let report = TestRun::new(
        builder("join-retry", source)
            .failure_policy(FailurePolicy::Retry(2))
            .pipeline(
                Pipeline::new()
                    .task(root)
                    .task(Tag)
                    .task(fast)
                    .task(Slow {
                        fast_done,
                        failures,
                    })
                    .join(join.clone())
                    .edge("root", "tag")
                    .edge("tag", "fast")
                    .edge("tag", "slow")
                    .edge("fast", "join")
                    .edge("slow", "join"),
            )
            .workers("slow", 4),
    )
    .deadline(Duration::from_secs(30))
    .run()
    .unwrap();
    assert_eq!(report.count(Outcome::Acked), n, "{:?}", report.stats);
    assert_eq!(first_failures.load(Ordering::SeqCst), n / 2);
    assert_eq!(mock.acked_twice(), 0);
    let calls = join.calls();
    assert_eq!(calls.len(), n, "{calls:?}");
    let by_msg: HashMap<u64, &Call> = calls.iter().map(|c| (c.msg, c)).collect();
    assert_eq!(by_msg.len(), n, "once per message");
    for m in 0..n as u64 {
        let call = by_msg[&m];
        let attempt = if m % 2 == 1 { 2 } else { 1 };
        assert_eq!(call.attempt, attempt, "{call:?}");
        let want = format!("{m}/a{attempt}");
        assert_eq!(
            call.parents,
            [
                ("fast".to_string(), vec![want.clone()]),
                ("slow".to_string(), vec![want])
            ],
            "message {m}: only the last attempt's parts"
        );
    }
}

#[test]
fn a_join_with_one_parent_does_not_build() {
    let err = builder("one-parent", primed(&[]).0)
        .pipeline(
            Pipeline::new()
                .task(common::pass("a"))
                .join(Recorder::new())
                .edge("a", "join"),
        )
        .build()
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("join task \"join\" has 1 parent; a join needs at least two"),
        "{err}"
    );
}
