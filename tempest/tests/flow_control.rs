//! Flow control: the `max_pending` bound, the sweeper, inspection of the
//! inflight table, and graceful shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{builder, generated, pass, primed_open, FnTask, Gate};
use tempest::standalone::RuntimeHandle;
use tempest::testing::TestRun;
use tempest::{FailurePolicy, Outcome, Output, Pipeline, StopReason};
use tempest_source::{FailReason, Source};
use tempest_source_mock::{MockConfig, MockSource};

#[test]
fn max_pending_bounds_messages_in_flight() {
    let (source, mock) = generated(20_000);
    let report = TestRun::new(
        builder("bounded", source)
            .max_pending(64)
            .pipeline(
                Pipeline::new()
                    .task(pass("a"))
                    .task(FnTask::new("slow", |m| {
                        std::hint::black_box((0..200).sum::<u64>());
                        Ok(Output::One(m))
                    }))
                    .edge("a", "slow"),
            )
            .workers("slow", 2),
    )
    .run()
    .unwrap();
    assert_eq!(report.stats.acked, 20_000);
    assert_eq!(mock.acked(), 20_000);
    assert!(
        report.stats.max_inflight <= 64,
        "high-water mark {} over max_pending 64",
        report.stats.max_inflight
    );
    assert!(
        report.stats.max_inflight > 1,
        "the bound was reached: {}",
        report.stats.max_inflight
    );
}

#[test]
fn a_full_pipeline_pauses_polling_without_dropping() {
    // max_pending 1: strictly one message at a time, none lost.
    let (source, mock) = generated(300);
    let report = TestRun::new(
        builder("one-at-a-time", source).max_pending(1).pipeline(
            Pipeline::new()
                .task(pass("a"))
                .task(pass("b"))
                .edge("a", "b"),
        ),
    )
    .run()
    .unwrap();
    assert_eq!(report.stats.max_inflight, 1);
    assert_eq!(report.stats.acked, 300);
    assert_eq!(mock.acked(), 300);
    assert_eq!(mock.deliveries(), 300);
}

#[test]
fn the_sweeper_fails_a_message_whose_task_never_answers() {
    let (source, mock) = primed_open(&["hang"]);
    let gate = Gate::default();
    let g = gate.clone();
    let handle = RuntimeHandle::new();
    let h = handle.clone();
    let inspected = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&inspected);
    let report = TestRun::new(
        builder("sweeper", source)
            .failure_policy(FailurePolicy::None)
            .msg_timeout(Duration::from_millis(150))
            .pipeline(
                Pipeline::new()
                    .task(pass("root"))
                    .task(FnTask::new("stuck", move |_| {
                        // While the task is stuck, the inflight table shows
                        // the message waiting on it.
                        let entries = h.inflight().expect("the topology is running");
                        assert_eq!(entries.len(), 1);
                        assert_eq!(entries[0].pending, vec![(1, 1)]);
                        assert_eq!(entries[0].attempt, 1);
                        seen.store(true, Ordering::SeqCst);
                        g.wait();
                        Ok(Output::None)
                    }))
                    .edge("root", "stuck"),
            ),
    )
    .handle(handle)
    .until(move |s| {
        if s.timed_out == 1 {
            gate.open();
        }
        s.timed_out == 1
    })
    .run()
    .unwrap();
    assert!(inspected.load(Ordering::SeqCst));
    assert_eq!(report.stop, StopReason::Condition);
    assert_eq!(report.count(Outcome::TimedOut), 1);
    let r = report.outcomes().values().next().unwrap().last().unwrap();
    assert!(r.latency >= Duration::from_millis(150), "{:?}", r.latency);
    assert_eq!(mock.acked(), 0);
    assert_eq!(mock.failed()[0].reason, FailReason::Timeout);
}

#[test]
fn shutdown_drains_in_flight_messages_and_acks_them() {
    let source = MockSource::from_config(MockConfig {
        open: true,
        ack_interval_ms: 1,
        ..MockConfig::generator(u64::MAX / 2, 16)
    })
    .unwrap();
    let mock = source.handle();
    let handle = RuntimeHandle::new();
    let h = handle.clone();
    let report = TestRun::new(
        builder("drain", source).max_pending(500).pipeline(
            Pipeline::new()
                .task(pass("a"))
                .task(FnTask::new("b", |m| {
                    std::thread::sleep(Duration::from_micros(50));
                    Ok(Output::One(m))
                }))
                .edge("a", "b"),
        ),
    )
    .handle(handle)
    .until(move |s| {
        if s.acked >= 1_000 {
            h.shutdown();
        }
        false
    })
    .run()
    .unwrap();
    assert_eq!(report.stop, StopReason::Shutdown);
    assert_eq!(report.stats.inflight, 0);
    assert_eq!(
        report.stats.read, report.stats.acked,
        "every message polled was finished"
    );
    assert_eq!(mock.acked(), report.stats.acked);
    assert!(
        mock.unacked().is_empty(),
        "nothing delivered was left unacked"
    );
    assert!(mock.was_shut_down());
}

#[test]
fn shutdown_leaves_what_misses_the_grace_period_to_the_source() {
    let (source, mock) = primed_open(&["fast", "stuck"]);
    let gate = Gate::default();
    let g = gate.clone();
    let handle = RuntimeHandle::new();
    let h = handle.clone();
    // Opens the gate once the source has been shut down, i.e. after the
    // grace period ran out, so the stuck worker can finish and be joined.
    let m = mock.clone();
    let opener = std::thread::spawn(move || {
        while !m.was_shut_down() {
            std::thread::sleep(Duration::from_millis(5));
        }
        gate.open();
    });
    let report = TestRun::new(
        builder("grace", source)
            .graceful_shutdown(Duration::from_millis(100))
            .no_msg_timeout()
            .pipeline(Pipeline::new().task(FnTask::new("work", move |msg| {
                if &msg[..] == b"stuck" {
                    g.wait();
                }
                Ok(Output::None)
            })))
            .task_batch(1)
            .workers("work", 2),
    )
    .handle(handle)
    .until(move |s| {
        if s.acked == 1 {
            h.shutdown();
        }
        false
    })
    .run()
    .unwrap();
    opener.join().unwrap();
    assert_eq!(report.stop, StopReason::Shutdown);
    assert_eq!(report.stats.acked, 1);
    assert_eq!(report.stats.inflight, 1, "the stuck message was abandoned");
    assert_eq!(mock.acked(), 1);
    assert_eq!(mock.unacked().len(), 1);
    assert!(
        mock.failed().is_empty(),
        "abandoned, not failed: the source redelivers it"
    );
}

/// The sweeper runs while other messages keep the pipeline busy. (actix
/// runs interval timers only when an actor's mailbox runs dry; the sweeper
/// now also runs from the handlers. The metrics-flush starvation that
/// revealed this is reproduced by the Prometheus test in
/// `metrics_backends.rs`; this load pattern lets the mailbox drain now and
/// then, so it guards the sweeper without reproducing the starvation.)
#[test]
fn the_sweeper_runs_under_constant_load() {
    let source = MockSource::from_config(MockConfig {
        open: true,
        ack_interval_ms: 1,
        ..MockConfig::generator(u64::MAX / 2, 8)
    })
    .unwrap();
    let gate = Gate::default();
    let g = gate.clone();
    let hung = Arc::new(AtomicBool::new(false));
    let h = Arc::clone(&hung);
    let report = TestRun::new(
        builder("busy-sweeper", source)
            .failure_policy(FailurePolicy::None)
            .msg_timeout(Duration::from_millis(200))
            .pipeline(
                Pipeline::new()
                    .task(pass("a"))
                    .task(pass("fast"))
                    .task(FnTask::new("hang", move |m| {
                        if !h.swap(true, Ordering::SeqCst) {
                            g.wait();
                        }
                        Ok(Output::One(m))
                    }))
                    .edge("a", "fast")
                    .edge("a", "hang"),
            ),
    )
    .until(move |s| {
        if s.timed_out >= 1 {
            gate.open();
            true
        } else {
            false
        }
    })
    .deadline(Duration::from_secs(20))
    .run()
    .unwrap();
    assert_eq!(report.stop, StopReason::Condition, "{:?}", report.stats);
}
