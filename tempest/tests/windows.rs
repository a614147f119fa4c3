//! Windows: results equal a reference computed here, for count windows
//! through a running topology, event-time windows (with late messages) on
//! a controlled clock, and processing-time windows that close on ticks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::builder;
use tempest::testing::TestRun;
use tempest::{
    Clock, Grouping, Msg, MsgCtx, Output, Pipeline, Span, StopReason, Task, TaskContext, TaskError,
    TaskResult, Window, WindowTask,
};
use tempest_source::{Headers, Source};
use tempest_source_mock::{MockConfig, MockSource};

/// What the windows emitted: (key, span) -> sum, and the late messages.
type Emitted = Arc<Mutex<(BTreeMap<(String, Span), u64>, Vec<u64>)>>;

/// Sums the numbers its messages carry, per window.
#[derive(Clone)]
struct Sum(Emitted);

impl WindowTask for Sum {
    type Acc = u64;
    fn name(&self) -> &str {
        "sum"
    }
    fn add(&mut self, acc: &mut u64, msg: &Msg, _: &MsgCtx) -> Result<(), TaskError> {
        *acc += std::str::from_utf8(msg)?
            .parse::<u64>()
            .map_err(|e| TaskError::msg(e.to_string()))?;
        Ok(())
    }
    fn emit(&mut self, key: &Bytes, span: Span, acc: u64) -> TaskResult {
        let k = String::from_utf8_lossy(key).into_owned();
        let previous = self.0.lock().unwrap().0.insert((k, span), acc);
        assert_eq!(previous, None, "a window emitted twice");
        Ok(Output::One(Msg::from(acc.to_string())))
    }
    fn late(&mut self, msg: Msg, _: &MsgCtx) -> TaskResult {
        let n = std::str::from_utf8(&msg)?.parse::<u64>().unwrap();
        self.0.lock().unwrap().1.push(n);
        Ok(Output::None)
    }
}

/// Counts what reaches it.
#[derive(Clone)]
struct Sink(Arc<AtomicU64>);

impl Task for Sink {
    fn name(&self) -> &str {
        "sink"
    }
    fn handle(&mut self, m: Msg, ctx: &MsgCtx) -> TaskResult {
        assert!(ctx.key().is_some(), "a window's output has its key");
        self.0.fetch_add(
            std::str::from_utf8(&m)?.parse::<u64>().unwrap(),
            Ordering::SeqCst,
        );
        Ok(Output::None)
    }
}

/// Passes messages on (they keep the source's key).
#[derive(Clone)]
struct Pass;

impl Task for Pass {
    fn name(&self) -> &str {
        "pass"
    }
    fn handle(&mut self, m: Msg, _: &MsgCtx) -> TaskResult {
        Ok(Output::One(m))
    }
}

fn source(open: bool) -> (MockSource, tempest_source_mock::MockHandle) {
    let s = MockSource::from_config(MockConfig {
        open,
        ack_interval_ms: 1,
        ..MockConfig::default()
    })
    .unwrap();
    let h = s.handle();
    (s, h)
}

fn pipeline(sum: &Sum, window: Window, clock: Clock, sunk: &Arc<AtomicU64>) -> Pipeline {
    Pipeline::new()
        .task(Pass)
        .window(sum.clone(), window, clock)
        .task(Sink(Arc::clone(sunk)))
        .edge_by("pass", "sum", Grouping::Key)
        .edge("sum", "sink")
}

#[test]
fn sliding_count_windows_equal_the_reference() {
    common::logs();
    let (src, mock) = source(false);
    let mut values: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for i in 0..200u64 {
        let key = if i % 3 == 0 { "a" } else { "b" };
        let v = i * 7 % 13;
        values.entry(key.into()).or_default().push(v);
        mock.push_with(v.to_string(), Some(Bytes::from(key)), Headers::new());
    }
    let emitted = Emitted::default();
    let sunk = Arc::new(AtomicU64::new(0));
    let sum = Sum(Arc::clone(&emitted));
    let report = TestRun::new(builder("count-windows", src).pipeline(pipeline(
        &sum,
        Window::sliding_count(4, 2),
        Clock::Processing,
        &sunk,
    )))
    .deadline(Duration::from_secs(30))
    .run()
    .unwrap();
    assert_eq!(report.stop, StopReason::SourceExhausted);
    assert_eq!(report.stats.acked, 200);
    // The reference: per key, windows of 4 of its messages, one every 2;
    // each emits when its 4th message comes.
    let mut reference = BTreeMap::new();
    for (key, vs) in &values {
        let mut start = 0;
        while start + 4 <= vs.len() {
            let span = Span {
                start: start as u64,
                end: start as u64 + 4,
            };
            reference.insert(
                (key.clone(), span),
                vs[start..start + 4].iter().sum::<u64>(),
            );
            start += 2;
        }
    }
    let got = emitted.lock().unwrap().0.clone();
    assert_eq!(got, reference);
    assert_eq!(sunk.load(Ordering::SeqCst), reference.values().sum::<u64>());
}

#[test]
fn event_time_windows_with_late_messages_equal_the_reference() {
    // On a controlled clock: the window task is called directly, each
    // message with its own timestamp, out of order.
    let emitted = Emitted::default();
    let mut task = tempest::window::Windowed::new(
        Sum(Arc::clone(&emitted)),
        Window::sliding(Duration::from_millis(20), Duration::from_millis(10)),
        Clock::Event {
            allowed_lateness: Duration::from_millis(15),
        },
    );
    task.started(&TaskContext::new(
        "t",
        "sum",
        0,
        tempest_source::Metrics::new_registry(),
    ));
    let mut x: u64 = 3;
    let mut events = Vec::new();
    for i in 0..500u64 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        // Time moves on by 1 ms a message, each up to 40 ms out of order.
        let ts = 1_000 + i + (x >> 33) % 40;
        let key = if (x >> 20).is_multiple_of(2) {
            "a"
        } else {
            "b"
        };
        events.push((ts, key, i % 17));
    }
    for (i, (ts, key, v)) in events.iter().enumerate() {
        let ctx = MsgCtx::new(i as u64).with_key(*key).with_timestamp(*ts);
        task.handle(Msg::from(v.to_string()), &ctx).unwrap();
        task.tick().unwrap();
    }
    // The reference, the same rules written out: the watermark is the
    // latest timestamp before the message minus the lateness; a message
    // counts in each window [s, s + 20) (s a multiple of 10) around it
    // whose end is after the watermark, and is late if there is none; a
    // window is emitted once the watermark reaches its end.
    let mut sums: BTreeMap<(String, Span), u64> = BTreeMap::new();
    let mut late = Vec::new();
    let mut latest = 0u64;
    for (ts, key, v) in &events {
        let wm = latest.saturating_sub(15);
        let mut counted = false;
        let mut s = (ts + 1).saturating_sub(20).div_ceil(10) * 10;
        while s <= *ts {
            if s + 20 > wm {
                *sums
                    .entry((
                        key.to_string(),
                        Span {
                            start: s,
                            end: s + 20,
                        },
                    ))
                    .or_default() += v;
                counted = true;
            }
            s += 10;
        }
        if !counted {
            late.push(*v);
        }
        latest = latest.max(*ts);
    }
    let wm = latest - 15;
    sums.retain(|(_, span), _| span.end <= wm);
    let (got, got_late) = emitted.lock().unwrap().clone();
    assert!(!late.is_empty(), "the sequence has late messages");
    assert_eq!(got_late, late);
    assert_eq!(got, sums);
}

#[test]
fn processing_time_windows_close_on_ticks_and_count_every_message_once() {
    common::logs();
    let (src, mock) = source(true);
    for i in 0..300u64 {
        let key = ["x", "y", "z"][(i % 3) as usize];
        mock.push_with("1", Some(Bytes::from(key)), Headers::new());
    }
    let emitted = Emitted::default();
    let sunk = Arc::new(AtomicU64::new(0));
    let seen = Arc::clone(&sunk);
    let report = TestRun::new(builder("time-windows", src).pipeline(pipeline(
        &Sum(Arc::clone(&emitted)),
        Window::tumbling(Duration::from_millis(40)),
        Clock::Processing,
        &sunk,
    )))
    // Until every message has come out of a closed window.
    .until(move |s| s.acked == 300 && seen.load(Ordering::SeqCst) == 300)
    .deadline(Duration::from_secs(30))
    .run()
    .unwrap();
    assert_eq!(report.stop, StopReason::Condition, "{:?}", report.stats);
    let got = emitted.lock().unwrap().0.clone();
    assert_eq!(got.values().sum::<u64>(), 300);
    for (key, span) in got.keys() {
        assert!(["x", "y", "z"].contains(&key.as_str()));
        assert_eq!(span.end - span.start, 40);
        assert_eq!(span.start % 40, 0);
    }
    assert!(report.stats.tick_outputs >= 3, "{:?}", report.stats);
}

#[test]
fn a_window_that_cannot_be_cut_is_a_pipeline_error() {
    let emitted = Emitted::default();
    let err = Pipeline::new()
        .window(Sum(emitted), Window::sliding_count(2, 5), Clock::Processing)
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("window of task \"sum\": the slide must not be longer than the size"),
        "{err}"
    );
}
