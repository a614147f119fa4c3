//! Routing through the standalone runtime: linear, fan-out, fan-in and
//! dead ends, with every message acked exactly once at the source.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{builder, generated, pass, primed, FnTask, Log};
use tempest::metrics::names;
use tempest::testing::TestRun;
use tempest::{Msg, MsgCtx, Outcome, Output, Pipeline, StopReason, Task, TaskResult};
use tempest_source::Source;

#[test]
fn linear_pipeline_acks_every_message_once() {
    let (source, mock) = generated(2_000);
    let report = TestRun::new(
        builder("linear", source).pipeline(
            Pipeline::new()
                .task(pass("a"))
                .task(pass("b"))
                .task(pass("c"))
                .edge("a", "b")
                .edge("b", "c"),
        ),
    )
    .run()
    .unwrap();
    assert_eq!(report.stop, StopReason::SourceExhausted);
    assert_eq!(report.stats.acked, 2_000);
    assert_eq!(report.count(Outcome::Acked), 2_000);
    assert_eq!(mock.acked(), 2_000);
    assert_eq!(mock.acked_twice(), 0);
    assert!(mock.unacked().is_empty());
    assert!(mock.was_shut_down());
    for task in ["a", "b", "c"] {
        assert_eq!(
            report
                .metrics
                .counter(names::TASK_MSGS_IN, &[("task", task)]),
            2_000,
            "task {task}"
        );
    }
    assert_eq!(report.metrics.counter(names::MSGS_ACKED, &[]), 2_000);
    assert_eq!(report.metrics.counter(names::SOURCE_READ, &[]), 2_000);
}

#[test]
fn fan_out_sends_every_output_to_every_child() {
    let (source, mock) = primed(&["x", "y"]);
    let (left, right) = (Log::default(), Log::default());
    let (l, r) = (left.clone(), right.clone());
    let report = TestRun::new(
        builder("fan-out", source).pipeline(
            Pipeline::new()
                .task(FnTask::new("root", |m| {
                    Ok(Output::Many(vec![m.clone(), m]))
                }))
                .task(FnTask::new("left", move |m| {
                    l.push(&m);
                    Ok(Output::None)
                }))
                .task(FnTask::new("right", move |m| {
                    r.push(&m);
                    Ok(Output::None)
                }))
                .edge("root", "left")
                .edge("root", "right"),
        ),
    )
    .run()
    .unwrap();
    let expected: Vec<Bytes> = ["x", "x", "y", "y"].map(Bytes::from).to_vec();
    assert_eq!(left.all(), expected);
    assert_eq!(right.all(), expected);
    assert_eq!(report.stats.acked, 2);
    assert_eq!(mock.acked(), 2);
}

#[test]
fn fan_in_runs_once_all_parents_are_done_on_the_union() {
    let (source, mock) = primed(&["1", "2", "3"]);
    let (left, right, join) = (Log::default(), Log::default(), Log::default());
    let (l, r, j) = (left.clone(), right.clone(), join.clone());
    let (l2, r2) = (left.clone(), right.clone());
    let report = TestRun::new(
        builder("diamond", source).pipeline(
            Pipeline::new()
                .task(pass("root"))
                .task(FnTask::new("left", move |m| {
                    l.push(&m);
                    Ok(Output::one(format!("l{}", String::from_utf8_lossy(&m))))
                }))
                .task(FnTask::new("right", move |m| {
                    // Wait for left to have handled this message, so that a
                    // join without a barrier would see left's output first.
                    while !l2.all().contains(&m) {
                        std::thread::yield_now();
                    }
                    r.push(&m);
                    let out = format!("r{}", String::from_utf8_lossy(&m));
                    Ok(Output::Many(vec![Msg::from(out.clone()), Msg::from(out)]))
                }))
                .task(FnTask::new("join", move |m| {
                    let source_msg = Bytes::copy_from_slice(&m[1..]);
                    assert!(
                        r2.all().contains(&source_msg),
                        "join ran before right was done"
                    );
                    j.push(&m);
                    Ok(Output::None)
                }))
                .edge("root", "left")
                .edge("root", "right")
                .edge("left", "join")
                .edge("right", "join"),
        ),
    )
    .run()
    .unwrap();
    assert_eq!(report.stats.task_panics, 0, "the barrier held");
    let expected: Vec<Bytes> = ["l1", "l2", "l3", "r1", "r1", "r2", "r2", "r3", "r3"]
        .map(Bytes::from)
        .to_vec();
    assert_eq!(join.all(), expected);
    assert_eq!(left.len(), 3);
    assert_eq!(right.len(), 3);
    assert_eq!(mock.acked(), 3);
}

#[test]
fn dead_ends_complete_descendants_without_another_live_parent() {
    // root -> a -> c and root -> b -> c; a drops odd numbers, b drops all.
    let (source, mock) = primed(&["1", "2", "3", "4"]);
    let c_log = Log::default();
    let c = c_log.clone();
    let leaf_log = Log::default();
    let leaf = leaf_log.clone();
    let report = TestRun::new(
        builder("dead-ends", source).pipeline(
            Pipeline::new()
                .task(pass("root"))
                .task(FnTask::new("a", |m| {
                    let n: u32 = std::str::from_utf8(&m)?.parse()?;
                    Ok(if n.is_multiple_of(2) {
                        Output::One(m)
                    } else {
                        Output::None
                    })
                }))
                .task(FnTask::new("b", |_| Ok(Output::None)))
                .task(FnTask::new("c", move |m| {
                    c.push(&m);
                    Ok(Output::One(m))
                }))
                .task(FnTask::new("leaf", move |m| {
                    leaf.push(&m);
                    Ok(Output::None)
                }))
                .edge("root", "a")
                .edge("root", "b")
                .edge("a", "c")
                .edge("b", "c")
                .edge("c", "leaf"),
        ),
    )
    .run()
    .unwrap();
    let evens: Vec<Bytes> = ["2", "4"].map(Bytes::from).to_vec();
    assert_eq!(c_log.all(), evens);
    assert_eq!(leaf_log.all(), evens);
    assert_eq!(report.count(Outcome::Acked), 4);
    assert_eq!(mock.acked(), 4);
}

#[test]
fn a_root_that_emits_nothing_completes_the_message() {
    let (source, mock) = primed(&["a", "b"]);
    let never = Log::default();
    let n = never.clone();
    let report = TestRun::new(
        builder("empty-root", source).pipeline(
            Pipeline::new()
                .task(FnTask::new("root", |_| Ok(Output::None)))
                .task(FnTask::new("next", move |m| {
                    n.push(&m);
                    Ok(Output::None)
                }))
                .edge("root", "next"),
        ),
    )
    .run()
    .unwrap();
    assert_eq!(never.len(), 0);
    assert_eq!(report.stats.acked, 2);
    assert_eq!(mock.acked(), 2);
}

#[derive(Clone)]
struct EvenOnly;

impl Task for EvenOnly {
    fn name(&self) -> &str {
        "even-only"
    }
    fn filter(&mut self, msg: &Msg, _: &MsgCtx) -> bool {
        msg.last().is_some_and(|b| (b - b'0').is_multiple_of(2))
    }
    fn handle(&mut self, msg: Msg, _: &MsgCtx) -> TaskResult {
        Ok(Output::One(msg))
    }
}

#[test]
fn filtered_messages_count_as_handled_without_output() {
    let (source, mock) = primed(&["1", "2", "3"]);
    let seen = Log::default();
    let s = seen.clone();
    let report = TestRun::new(
        builder("filter", source).pipeline(
            Pipeline::new()
                .task(EvenOnly)
                .task(FnTask::new("after", move |m| {
                    s.push(&m);
                    Ok(Output::None)
                }))
                .edge("even-only", "after"),
        ),
    )
    .run()
    .unwrap();
    assert_eq!(seen.all(), vec![Bytes::from_static(b"2")]);
    assert_eq!(report.stats.filtered, 2);
    assert_eq!(
        report
            .metrics
            .counter(names::TASK_FILTERED, &[("task", "even-only")]),
        2
    );
    assert_eq!(mock.acked(), 3);
}

#[test]
fn several_workers_per_task_share_the_work() {
    let (source, mock) = generated(5_000);
    let report = TestRun::new(
        builder("workers", source)
            .pipeline(
                Pipeline::new()
                    .task(pass("a"))
                    .task(FnTask::new("slow", |m| {
                        std::thread::sleep(Duration::from_micros(20));
                        Ok(Output::One(m))
                    }))
                    .edge("a", "slow"),
            )
            .workers("slow", 3)
            .task_batch(16),
    )
    .run()
    .unwrap();
    assert_eq!(report.stats.acked, 5_000);
    assert_eq!(mock.acked(), 5_000);
    assert_eq!(mock.acked_twice(), 0);
    assert_eq!(
        report
            .metrics
            .counter(names::TASK_MSGS_IN, &[("task", "slow")]),
        5_000
    );
}

#[test]
fn until_stops_the_run_when_the_condition_holds() {
    let source = tempest_source_mock::MockSource::from_config(tempest_source_mock::MockConfig {
        open: true,
        ..tempest_source_mock::MockConfig::generator(1_000_000, 8)
    })
    .unwrap();
    let mock = source.handle();
    let report = TestRun::new(builder("until", source).pipeline(Pipeline::new().task(pass("a"))))
        .until(|s| s.acked >= 100)
        .run()
        .unwrap();
    assert_eq!(report.stop, StopReason::Condition);
    assert!(report.stats.acked >= 100);
    assert_eq!(
        report.stats.inflight, 0,
        "the drain finished what was in flight"
    );
    assert_eq!(mock.acked(), report.stats.acked);
    assert!(mock.unacked().is_empty());
}
