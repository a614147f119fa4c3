//! Ticks (`Task::tick`, Storm's tick tuple): periodic calls on a worker's
//! own loop whose outputs are new roots, tracked through the rest of the
//! DAG; in process and over TCP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::builder;
use tempest::standalone::{self, RunOptions, RuntimeHandle, ServeOptions, WorkerOptions};
use tempest::testing::TestRun;
use tempest::{
    Msg, MsgCtx, Out, Outcome, Output, Pipeline, StopReason, Task, TaskResult, TopologyBuilder,
};
use tempest_source::{MsgId, Source};
use tempest_source_mock::{MockConfig, MockSource};

const EVERY: Duration = Duration::from_millis(20);

/// What the sink saw of one message: payload, parent, delivered, id.
type Seen = Arc<Mutex<Vec<(String, Option<&'static str>, u32, MsgId)>>>;

/// Sums the lengths of its messages; every tick emits the tick's number
/// and the sum so far.
#[derive(Clone, Default)]
struct Sum {
    total: u64,
    ticks: u64,
    ticked_at: Arc<Mutex<Vec<Instant>>>,
}

impl Task for Sum {
    fn name(&self) -> &str {
        "sum"
    }
    fn handle(&mut self, m: Msg, _: &MsgCtx) -> TaskResult {
        self.total += m.len() as u64;
        Ok(Output::None)
    }
    fn tick(&mut self) -> TaskResult {
        self.ticks += 1;
        self.ticked_at.lock().unwrap().push(Instant::now());
        Ok(Output::Outs(vec![Out::new(format!(
            "{} {}",
            self.ticks, self.total
        ))
        .key("sum")]))
    }
}

#[derive(Clone)]
struct Sink(Seen);

impl Task for Sink {
    fn name(&self) -> &str {
        "sink"
    }
    fn handle(&mut self, m: Msg, ctx: &MsgCtx) -> TaskResult {
        assert_eq!(ctx.key_str(), Some("sum"));
        self.0.lock().unwrap().push((
            String::from_utf8_lossy(&m).into_owned(),
            ctx.parent(),
            ctx.delivered(),
            ctx.id().clone(),
        ));
        Ok(Output::None)
    }
}

fn pipeline(sum: &Sum, seen: &Seen) -> Pipeline {
    Pipeline::new()
        .task(sum.clone())
        .task(Sink(Arc::clone(seen)))
        .edge("sum", "sink")
        .tick_interval("sum", EVERY)
}

/// A mock source primed with `lines` messages; an open one waits for more
/// when they are done, a closed one is exhausted.
fn source_of(lines: usize, open: bool) -> MockSource {
    let source = MockSource::from_config(MockConfig {
        open,
        ack_interval_ms: 1,
        ..MockConfig::default()
    })
    .unwrap();
    source
        .handle()
        .push_all((0..lines).map(|i| Bytes::from(format!("line {i}"))));
    source
}

fn open_source(lines: usize) -> MockSource {
    source_of(lines, true)
}

/// Checks what the sink saw against the ticks `sum` ran.
fn check(seen: &Seen, ticked_at: &[Instant], started: Instant, tick_outputs: u64) {
    let seen = seen.lock().unwrap();
    assert!(tick_outputs >= 3, "{tick_outputs}");
    assert_eq!(
        seen.len() as u64,
        tick_outputs,
        "every tick output ran once"
    );
    for (payload, parent, delivered, id) in seen.iter() {
        assert_eq!(*parent, Some("sum"), "{payload}");
        assert_eq!(*delivered, 0, "a tick output is no delivery: {payload}");
        let MsgId::Bytes(b) = id else {
            panic!("{id:?}")
        };
        assert!(b.starts_with(b"tick:sum:"), "{id}");
    }
    // Ticks are never early: no more than one per interval.
    let elapsed = ticked_at.last().unwrap().duration_since(started);
    let most = (elapsed.as_nanos() / EVERY.as_nanos()) as usize + 1;
    assert!(
        ticked_at.len() <= most,
        "{} ticks in {elapsed:?}",
        ticked_at.len()
    );
    for pair in ticked_at.windows(2) {
        assert!(pair[1] - pair[0] >= EVERY, "{:?}", pair[1] - pair[0]);
    }
}

#[test]
fn ticks_emit_new_roots_that_run_downstream_and_are_not_acked() {
    common::logs();
    let sum = Sum::default();
    let seen = Seen::default();
    let started = Instant::now();
    let report = TestRun::new(builder("ticks", open_source(100)).pipeline(pipeline(&sum, &seen)))
        .until(|s| s.acked == 100 && s.tick_outputs >= 5)
        .deadline(Duration::from_secs(60))
        .run()
        .unwrap();
    assert_eq!(report.stop, StopReason::Condition);
    assert_eq!(report.stats.acked, 100, "{:?}", report.stats);
    assert_eq!(report.stats.read, 100);
    assert_eq!(report.stats.tick_outputs_failed, 0);
    let ticked_at = sum.ticked_at.lock().unwrap().clone();
    check(&seen, &ticked_at, started, report.stats.tick_outputs);
    // Each tick output has its outcome, under its own id.
    let first = MsgId::Bytes(Bytes::from_static(b"tick:sum:1"));
    assert_eq!(report.outcome(&first), Some(Outcome::Acked));
    // The ticks saw the messages handled between them, in order.
    let numbers: Vec<u64> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(p, ..)| p.split(' ').next().unwrap().parse().unwrap())
        .collect();
    let mut sorted = numbers.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=numbers.len() as u64).collect::<Vec<_>>());
}

#[derive(Clone)]
struct Fetch;

impl tempest::AsyncTask for Fetch {
    fn name(&self) -> &str {
        "fetch"
    }
    async fn handle(&self, m: Msg, _: MsgCtx) -> TaskResult {
        Ok(Output::One(m))
    }
}

#[test]
fn a_tick_interval_for_an_unknown_or_async_task_is_a_pipeline_error() {
    let err = Pipeline::new()
        .task(Sum::default())
        .async_task(Fetch)
        .edge("sum", "fetch")
        .tick_interval("nope", EVERY)
        .tick_interval("fetch", EVERY)
        .tick_interval("sum", Duration::ZERO)
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tick interval for task \"nope\": it is not a task of the pipeline"),
        "{err}"
    );
    assert!(
        err.contains("tick interval for task \"fetch\": it is an async task; only sync tasks tick"),
        "{err}"
    );
    assert!(
        err.contains("tick interval for task \"sum\": it must be more than 0"),
        "{err}"
    );
}

fn remote_topology(sum: &Sum, seen: &Seen) -> TopologyBuilder {
    TopologyBuilder::new("remote-ticks")
        .source(open_source(0))
        .pipeline(pipeline(sum, seen))
}

#[test]
fn ticks_of_a_remote_worker_cross_the_wire() {
    common::logs();
    let sum = Sum::default();
    let seen = Seen::default();
    let handle = RuntimeHandle::new();
    let h = handle.clone();
    let (s, v) = (sum.clone(), Arc::clone(&seen));
    let started = Instant::now();
    let top = std::thread::spawn(move || {
        let t = remote_topology(&s, &v)
            .source(open_source(50))
            .build()
            .unwrap();
        standalone::run(
            t,
            RunOptions {
                handle: Some(h),
                local_workers: false,
                serve: Some(ServeOptions::loopback()),
                until: Some(Box::new(|s: &tempest::Stats| {
                    s.acked == 50 && s.tick_outputs >= 5
                })),
                deadline: Some(Duration::from_secs(60)),
                record_outcomes: false,
            },
        )
        .unwrap()
    });
    let addr = common::listening(&handle);
    let workers: Vec<_> = ["sum", "sink"]
        .into_iter()
        .map(|task| {
            let opts = WorkerOptions {
                topology: addr.to_string(),
                backoff: Duration::from_millis(20),
                max_backoff: Duration::from_millis(200),
                exit_with_topology: true,
                ..WorkerOptions::default()
            };
            let (s, v) = (sum.clone(), Arc::clone(&seen));
            std::thread::spawn(move || {
                let t = remote_topology(&s, &v).build().unwrap();
                standalone::run_worker(&t, task, opts, None).unwrap()
            })
        })
        .collect();
    let report = top.join().unwrap();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(report.stop, StopReason::Condition, "{:?}", report.stats);
    assert_eq!(report.stats.acked, 50);
    let ticked_at = sum.ticked_at.lock().unwrap().clone();
    // Ticks after the topology stopped reach nobody.
    let seen_n = seen.lock().unwrap().len() as u64;
    assert_eq!(seen_n, report.stats.tick_outputs);
    check(&seen, &ticked_at, started, report.stats.tick_outputs);
}

/// Panics in `flush_metrics` (after every batch).
#[derive(Clone)]
struct FlushPanics;

impl Task for FlushPanics {
    fn name(&self) -> &str {
        "flaky"
    }
    fn handle(&mut self, m: Msg, _: &MsgCtx) -> TaskResult {
        Ok(Output::One(m))
    }
    fn flush_metrics(&mut self) {
        panic!("flush_metrics broke");
    }
}

/// Regression: a panic in `flush_metrics` killed the worker's thread; in a
/// `task` process its connection then reconnected in a loop forever
/// ("the task thread stopped; reconnecting"), and in process its messages
/// waited for the timeout. It is logged now, and the worker goes on.
fn flaky_topology(messages: usize) -> TopologyBuilder {
    builder("flaky", source_of(messages, false)).pipeline(Pipeline::new().task(FlushPanics))
}

#[test]
fn a_panic_in_flush_metrics_does_not_stop_the_worker() {
    common::logs();
    let report = TestRun::new(flaky_topology(200))
        .deadline(Duration::from_secs(30))
        .run()
        .unwrap();
    assert_eq!(
        report.stop,
        StopReason::SourceExhausted,
        "{:?}",
        report.stats
    );
    assert_eq!(report.stats.acked, 200);
    // Over TCP: the worker process goes on too, and stops with the
    // topology.
    let handle = RuntimeHandle::new();
    let h = handle.clone();
    let top = std::thread::spawn(move || {
        TestRun::new(flaky_topology(200))
            .handle(h)
            .deadline(Duration::from_secs(30))
            .run_serving(ServeOptions::loopback())
            .unwrap()
    });
    let addr = common::listening(&handle);
    let opts = WorkerOptions {
        topology: addr.to_string(),
        fetch_max: 16,
        exit_with_topology: true,
        ..WorkerOptions::default()
    };
    let worker = standalone::run_worker(&flaky_topology(0).build().unwrap(), "flaky", opts, None);
    let report = top.join().unwrap();
    assert_eq!(
        report.stop,
        StopReason::SourceExhausted,
        "{:?}",
        report.stats
    );
    assert_eq!(report.stats.acked, 200);
    assert_eq!(worker.unwrap().sessions, 1);
}

/// What the typed tally ticks out.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
struct Tally {
    tick: u64,
    lines: u64,
}

/// A typed task counting its lines; each tick emits a `Tally` (postcard
/// on the wire to the sink).
#[derive(Clone, Default)]
struct TypedTally {
    ticks: u64,
    lines: u64,
}

impl tempest::TypedTask for TypedTally {
    type In = String;
    type Out = Tally;
    fn name(&self) -> &str {
        "tally"
    }
    fn handle(&mut self, _line: String, _: &MsgCtx) -> tempest::TypedResult<Tally> {
        self.lines += 1;
        Ok(tempest::Typed::None)
    }
    fn tick(&mut self) -> tempest::TypedResult<Tally> {
        self.ticks += 1;
        Ok(Tally {
            tick: self.ticks,
            lines: self.lines,
        }
        .into())
    }
}

/// Decodes the tallies it gets.
#[derive(Clone, Default)]
struct TallySink(Arc<Mutex<Vec<Tally>>>);

impl tempest::TypedTask for TallySink {
    type In = Tally;
    type Out = ();
    fn name(&self) -> &str {
        "sink"
    }
    fn handle(&mut self, t: Tally, ctx: &MsgCtx) -> tempest::TypedResult<()> {
        assert!(ctx.from_tick(), "{ctx:?}");
        self.0.lock().unwrap().push(t);
        Ok(tempest::Typed::None)
    }
}

/// A typed task ticks like any task: its tick's values are encoded with
/// its output codec and decoded by its children.
#[test]
fn a_typed_task_ticks_and_its_values_reach_its_children() {
    let sink = TallySink::default();
    let pipeline = Pipeline::new()
        .typed(TypedTally::default())
        .typed(sink.clone())
        .edge("tally", "sink")
        .output_codec("tally", tempest::Codec::Postcard)
        .tick_interval("tally", EVERY);
    // JSON lines: the tally's input is a JSON string.
    let source = MockSource::from_config(MockConfig {
        open: true,
        ack_interval_ms: 1,
        ..MockConfig::default()
    })
    .unwrap();
    source
        .handle()
        .push_all((0..50).map(|i| Bytes::from(format!("\"line {i}\""))));
    let report = TestRun::new(builder("typed-ticks", source).pipeline(pipeline))
        .until(|s| s.acked == 50 && s.tick_outputs >= 3)
        .deadline(Duration::from_secs(60))
        .run()
        .unwrap();
    assert_eq!(report.stop, StopReason::Condition, "{:?}", report.stats);
    assert_eq!(report.stats.task_errors, 0, "{:?}", report.stats);
    let got = sink.0.lock().unwrap().clone();
    assert!(got.len() >= 3, "{got:?}");
    let mut ticks: Vec<u64> = got.iter().map(|t| t.tick).collect();
    ticks.sort_unstable();
    assert_eq!(ticks, (1..=got.len() as u64).collect::<Vec<_>>());
    assert!(got.iter().all(|t| t.lines <= 50), "{got:?}");
}

/// A join task counting the parts it joined; each tick emits the count.
#[derive(Clone, Default)]
struct JoinCount(u64);

impl tempest::JoinTask for JoinCount {
    fn name(&self) -> &str {
        "both"
    }
    fn handle(&mut self, joined: tempest::Joined, _: &MsgCtx) -> TaskResult {
        self.0 += joined.len() as u64;
        Ok(Output::None)
    }
    fn tick(&mut self) -> TaskResult {
        Ok(Output::Outs(vec![Out::new(self.0.to_string()).key("sum")]))
    }
}

/// A join task ticks too.
#[test]
fn a_join_task_ticks() {
    let seen = Seen::default();
    let pass = common::pass;
    let pipeline = Pipeline::new()
        .task(pass("root"))
        .task(pass("left"))
        .task(pass("right"))
        .join(JoinCount::default())
        .task(Sink(Arc::clone(&seen)))
        .edge("root", "left")
        .edge("root", "right")
        .edge("left", "both")
        .edge("right", "both")
        .edge("both", "sink")
        .tick_interval("both", EVERY);
    let report = TestRun::new(builder("join-ticks", open_source(20)).pipeline(pipeline))
        .until(|s| s.acked == 20 && s.tick_outputs >= 3)
        .deadline(Duration::from_secs(60))
        .run()
        .unwrap();
    assert_eq!(report.stop, StopReason::Condition, "{:?}", report.stats);
    let seen = seen.lock().unwrap();
    assert!(seen.len() >= 3, "{seen:?}");
    assert!(seen.iter().all(|(_, parent, ..)| *parent == Some("both")));
    // Each join of the 20 messages had two parts.
    let last: u64 = seen
        .iter()
        .map(|(p, ..)| p.parse::<u64>().unwrap())
        .max()
        .unwrap();
    assert!(last <= 40, "{last}");
}
