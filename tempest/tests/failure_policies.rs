//! Failure policies (`None`, `BestEffort`, `Retry`) for task errors,
//! panics and timeouts, end to end through the standalone runtime.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{builder, primed, FnTask, Gate};
use tempest::testing::{TestReport, TestRun};
use tempest::{FailurePolicy, Outcome, Output, Pipeline, TaskError};
use tempest_source::{FailReason, MsgId, Source};
use tempest_source_mock::{MockConfig, MockHandle, MockSource};

#[derive(Clone, Copy, Debug)]
enum Mode {
    Error,
    Panic,
    Timeout,
}

struct Run {
    report: TestReport,
    mock: MockHandle,
    ok: [MsgId; 2],
    bad: MsgId,
}

/// Runs ok1, bad, ok2 through root -> work -> after, where `work` fails
/// "bad" in `mode` for its first `fail_times` attempts.
fn run(policy: FailurePolicy, mode: Mode, fail_times: u32) -> Run {
    let (source, mock) = primed(&[]);
    let ok1 = mock.push("ok1");
    let bad = mock.push("bad");
    let ok2 = mock.push("ok2");
    let gate = Gate::default();
    let attempts = Arc::new(AtomicU32::new(0));
    let (g, a) = (gate.clone(), Arc::clone(&attempts));
    let work = FnTask::new("work", move |m| {
        if &m[..] == b"bad" && a.fetch_add(1, Ordering::SeqCst) < fail_times {
            match mode {
                Mode::Error => return Err(TaskError::msg("bad input")),
                Mode::Panic => panic!("bad input"),
                Mode::Timeout => g.wait(),
            }
        }
        Ok(Output::One(m))
    });
    let report = TestRun::new(
        builder("policies", source)
            .failure_policy(policy)
            // Short enough for the timeout cases, long enough that a
            // panic's backtrace printing never makes a message time out.
            .msg_timeout(match mode {
                Mode::Timeout => Duration::from_millis(100),
                _ => Duration::from_secs(10),
            })
            .pipeline(
                Pipeline::new()
                    .task(common::pass("root"))
                    .task(work)
                    .task(common::pass("after"))
                    .edge("root", "work")
                    .edge("work", "after"),
            )
            // Hung attempts each hold a worker; the rest keep flowing
            // through the others, one message at a time.
            .workers("work", 4)
            .task_batch(1),
    )
    .until(move |s| {
        let done = s.acked + s.failed + s.timed_out >= 3;
        if done {
            gate.open();
        }
        done
    })
    .deadline(Duration::from_secs(20))
    .run()
    .unwrap();
    Run {
        report,
        mock,
        ok: [ok1, ok2],
        bad,
    }
}

impl Run {
    fn assert_ok_acked(&self) {
        for id in &self.ok {
            assert_eq!(self.report.outcome(id), Some(Outcome::Acked), "{id:?}");
            assert_eq!(self.mock.ack_count(id), 1, "{id:?}");
        }
    }
    fn bad_report(&self) -> &tempest::MsgReport {
        self.report
            .report(&self.bad)
            .expect("the bad message finished")
    }
}

#[test]
fn none_error_leaves_the_message_to_the_source() {
    let r = run(FailurePolicy::None, Mode::Error, u32::MAX);
    r.assert_ok_acked();
    let bad = r.bad_report();
    assert_eq!(bad.outcome, Outcome::Failed);
    assert_eq!(bad.attempts, 1);
    assert_eq!(r.mock.ack_count(&r.bad), 0);
    let failed = r.mock.failed();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].id, r.bad);
    assert_eq!(
        failed[0].reason,
        FailReason::TaskError {
            task: "work".into(),
            message: "bad input".into()
        }
    );
    assert_eq!(r.report.stats.task_errors, 1);
}

#[test]
fn none_panic_fails_the_message_not_the_process() {
    let r = run(FailurePolicy::None, Mode::Panic, u32::MAX);
    r.assert_ok_acked();
    assert_eq!(r.bad_report().outcome, Outcome::Failed);
    assert!(matches!(
        &r.bad_report().reason,
        Some(FailReason::TaskPanic { task, message }) if task == "work" && message == "bad input"
    ));
    assert_eq!(r.mock.ack_count(&r.bad), 0);
    assert_eq!(r.report.stats.task_panics, 1);
}

#[test]
fn none_timeout_leaves_the_message_to_the_source() {
    let r = run(FailurePolicy::None, Mode::Timeout, u32::MAX);
    r.assert_ok_acked();
    assert_eq!(r.bad_report().outcome, Outcome::TimedOut);
    assert_eq!(r.bad_report().reason, Some(FailReason::Timeout));
    assert_eq!(r.mock.ack_count(&r.bad), 0);
    assert_eq!(r.mock.failed()[0].reason, FailReason::Timeout);
}

#[test]
fn best_effort_error_acks_and_the_rest_of_the_dag_runs() {
    let r = run(FailurePolicy::BestEffort, Mode::Error, u32::MAX);
    r.assert_ok_acked();
    assert_eq!(r.bad_report().outcome, Outcome::Acked);
    assert_eq!(r.bad_report().errors, 1);
    assert_eq!(r.mock.ack_count(&r.bad), 1);
    assert!(r.mock.failed().is_empty());
}

#[test]
fn best_effort_panic_acks() {
    let r = run(FailurePolicy::BestEffort, Mode::Panic, u32::MAX);
    r.assert_ok_acked();
    assert_eq!(r.bad_report().outcome, Outcome::Acked);
    assert_eq!(r.mock.ack_count(&r.bad), 1);
}

#[test]
fn best_effort_timeout_acks_at_the_deadline() {
    let r = run(FailurePolicy::BestEffort, Mode::Timeout, u32::MAX);
    r.assert_ok_acked();
    assert_eq!(r.bad_report().outcome, Outcome::Acked);
    assert_eq!(r.bad_report().timeouts, 1);
    assert_eq!(r.mock.ack_count(&r.bad), 1);
}

#[test]
fn retry_error_reruns_until_success() {
    let r = run(FailurePolicy::Retry(2), Mode::Error, 1);
    r.assert_ok_acked();
    assert_eq!(r.bad_report().outcome, Outcome::Acked);
    assert_eq!(r.bad_report().attempts, 2);
    assert_eq!(r.mock.ack_count(&r.bad), 1);
    assert_eq!(r.report.stats.retried, 1);
}

#[test]
fn retry_error_gives_up_after_n_retries() {
    let r = run(FailurePolicy::Retry(2), Mode::Error, u32::MAX);
    r.assert_ok_acked();
    assert_eq!(r.bad_report().outcome, Outcome::Failed);
    assert_eq!(r.bad_report().attempts, 3);
    assert_eq!(r.report.stats.retried, 2);
    assert_eq!(r.report.stats.task_errors, 3);
    assert_eq!(r.mock.ack_count(&r.bad), 0);
    assert_eq!(r.mock.failed()[0].attempts, 3);
}

#[test]
fn retry_panic_reruns_until_success() {
    let r = run(FailurePolicy::Retry(3), Mode::Panic, 2);
    r.assert_ok_acked();
    assert_eq!(r.bad_report().outcome, Outcome::Acked);
    assert_eq!(r.bad_report().attempts, 3);
    assert_eq!(r.report.stats.task_panics, 2);
}

#[test]
fn retry_timeout_reruns_then_gives_up() {
    let r = run(FailurePolicy::Retry(1), Mode::Timeout, u32::MAX);
    r.assert_ok_acked();
    assert_eq!(r.bad_report().outcome, Outcome::TimedOut);
    assert_eq!(r.bad_report().attempts, 2);
    assert_eq!(r.bad_report().timeouts, 2);
    assert_eq!(r.mock.ack_count(&r.bad), 0);
}

#[test]
fn retry_timeout_then_success() {
    let r = run(FailurePolicy::Retry(2), Mode::Timeout, 1);
    r.assert_ok_acked();
    assert_eq!(r.bad_report().outcome, Outcome::Acked);
    assert_eq!(r.bad_report().attempts, 2);
    assert_eq!(r.mock.ack_count(&r.bad), 1);
}

#[test]
fn none_with_a_redelivering_source_eventually_acks() {
    // Policy None gives the message back; the source's visibility timeout
    // delivers it again, and the second delivery succeeds.
    let source = MockSource::from_config(MockConfig {
        redeliver_after_ms: Some(20),
        ack_interval_ms: 1,
        ..MockConfig::default()
    })
    .unwrap();
    let mock = source.handle();
    let id = mock.push("flaky");
    let seen = Arc::new(AtomicU32::new(0));
    let s = Arc::clone(&seen);
    let report = TestRun::new(
        builder("redeliver", source)
            .failure_policy(FailurePolicy::None)
            .pipeline(Pipeline::new().task(FnTask::new("once-bad", move |m| {
                if s.fetch_add(1, Ordering::SeqCst) == 0 {
                    Err(TaskError::msg("first delivery fails"))
                } else {
                    Ok(Output::One(m))
                }
            }))),
    )
    .deadline(Duration::from_secs(20))
    .run()
    .unwrap();
    assert_eq!(report.stop, tempest::StopReason::SourceExhausted);
    assert_eq!(mock.delivery_count(&id), 2);
    assert_eq!(mock.ack_count(&id), 1);
    assert_eq!(report.stats.failed, 1);
    assert_eq!(report.stats.acked, 1);
}
