//! Shutdown is bounded: a task stuck in a call does not hold the run past
//! `graceful_shutdown`, and a run with nothing that can finish stops at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{pass, FnTask, Gate};
use tempest::standalone::{RuntimeHandle, ServeOptions};
use tempest::testing::TestRun;
use tempest::{FailurePolicy, Output, Pipeline, StopReason, TopologyBuilder};

/// Regression: a task stuck in `handle` for 8 s held `run()` for 8 s against
/// a 1 s deadline and a 300 ms `graceful_shutdown`.
#[test]
fn a_task_stuck_past_the_graceful_shutdown_does_not_hold_the_run() {
    common::logs();
    let (source, mock) = common::primed_open(&["stuck"]);
    let gate = Gate::default();
    let held = gate.clone();
    let started = Instant::now();
    let report = TestRun::new(
        TopologyBuilder::new("stuck")
            .source(source)
            .failure_policy(FailurePolicy::None)
            .no_msg_timeout()
            .graceful_shutdown(Duration::from_millis(300))
            .pipeline(
                Pipeline::new()
                    .task(FnTask::new("slow", move |m| {
                        if &m[..] == b"stuck" {
                            // Far longer than deadline + grace: up to a minute.
                            held.wait();
                        }
                        Ok(Output::One(m))
                    }))
                    .task(pass("after"))
                    .edge("slow", "after"),
            ),
    )
    .deadline(Duration::from_secs(1))
    .run()
    .unwrap();
    let elapsed = started.elapsed();
    gate.open();
    assert_eq!(report.stop, StopReason::Deadline);
    // Deadline 1 s + grace 0.3 s + 1 s for the threads; the call takes 60 s.
    assert!(elapsed < Duration::from_secs(15), "took {elapsed:?}");
    let stuck = mock.unacked();
    assert_eq!(stuck.len(), 1, "only the stuck message is unacked");
    let unfinished = report.unfinished();
    assert_eq!(unfinished.len(), 1, "{unfinished:?}");
    let u = &unfinished[0];
    assert_eq!(u.id, stuck[0]);
    assert_eq!(u.tasks.len(), 1, "{u}");
    assert_eq!(u.tasks[0].0, "slow", "{u}");
    assert_eq!(u.tasks[0].1, vec![0], "held by slow's only worker: {u}");
    assert!(
        u.to_string().contains("held by worker 0 of task slow"),
        "{u}"
    );
}

/// With no worker connected for the queued messages, nothing can finish:
/// the shutdown does not wait out its grace period.
#[test]
fn nothing_that_can_finish_means_no_waiting_on_shutdown() {
    let (source, mock) = common::generated(50);
    let handle = RuntimeHandle::new();
    let h = handle.clone();
    let run = std::thread::spawn(move || {
        TestRun::new(
            TopologyBuilder::new("no-workers")
                .source(source)
                .graceful_shutdown(Duration::from_secs(600))
                .pipeline(Pipeline::new().task(pass("a"))),
        )
        .handle(h)
        .deadline(Duration::from_secs(600))
        .run_serving(ServeOptions::loopback())
        .unwrap()
    });
    // Wait until the source's messages are in flight, then stop.
    let polled = Instant::now() + Duration::from_secs(60);
    while handle.stats().is_none_or(|s| s.inflight < 50) {
        assert!(Instant::now() < polled, "the source never got polled");
        std::thread::yield_now();
    }
    let stopped = Instant::now();
    handle.shutdown();
    let report = run.join().unwrap();
    assert!(
        stopped.elapsed() < Duration::from_secs(30),
        "a 600 s grace period was waited out: {:?}",
        stopped.elapsed()
    );
    // The source ran dry first; the shutdown cut the endless drain short.
    assert_eq!(report.stop, StopReason::SourceExhausted);
    assert_eq!(mock.unacked().len(), 50);
    assert_eq!(report.unfinished().len(), 50);
    assert!(report
        .unfinished()
        .iter()
        .all(|u| u.tasks == vec![("a".to_string(), vec![])]));
}

/// Regression (review of issue 10): a worker thread left behind at shutdown
/// went on claiming the messages queued for it, though they were left
/// unacked for the source to redeliver, so they would have run twice.
#[test]
fn a_worker_left_behind_does_not_run_what_was_left_unacked() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let (source, _mock) = common::generated(50);
    let calls = Arc::new(AtomicUsize::new(0));
    let stuck_done = Arc::new(AtomicBool::new(false));
    let (c, done) = (Arc::clone(&calls), Arc::clone(&stuck_done));
    let report = TestRun::new(
        common::builder("left-behind", source)
            .graceful_shutdown(Duration::from_millis(100))
            .pipeline(Pipeline::new().task(FnTask::new("slow", move |_m| {
                if c.fetch_add(1, Ordering::SeqCst) == 0 {
                    std::thread::sleep(Duration::from_millis(1500));
                    done.store(true, Ordering::SeqCst);
                }
                Ok(Output::None)
            }))),
    )
    .deadline(Duration::from_millis(300))
    .run()
    .unwrap();
    assert!(
        !report.unfinished().is_empty(),
        "messages were left unacked"
    );
    let at_return = calls.load(Ordering::SeqCst);
    // Once the stuck call returns, the thread left behind must find nothing
    // more to run.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stuck_done.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the stuck call never returned");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        at_return,
        "a message left unacked ran after the run ended"
    );
}
