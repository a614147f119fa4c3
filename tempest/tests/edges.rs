//! Guarantees at the edges: what the source sees unacked, ids delivered
//! twice while in flight, and the counters a run ends with.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{builder, pass, FnTask};
use tempest::testing::TestRun;
use tempest::{Outcome, Output, Pipeline};
use tempest_source::{AckPolicy, Source};
use tempest_source_mock::{MockConfig, MockSource};

/// Regression: credit returned when a message completed, but its ack was
/// batched, so the source saw ~1,100 delivered-and-unacked messages with
/// `max_pending = 100`.
#[test]
fn the_source_never_holds_more_than_max_pending_unacked() {
    let source = MockSource::from_config(MockConfig {
        ack_policy: AckPolicy::Batch(1024),
        ack_interval_ms: 50,
        ..MockConfig::generator(5_000, 16)
    })
    .unwrap();
    let mock = source.handle();
    let report = TestRun::new(
        builder("unacked-bound", source)
            .max_pending(100)
            .pipeline(Pipeline::new().task(pass("a"))),
    )
    .run()
    .unwrap();
    assert_eq!(report.stats.acked, 5_000);
    assert_eq!(mock.acked(), 5_000);
    assert_eq!(mock.held(), 0);
    assert!(
        mock.max_held() <= 100,
        "the source had {} delivered, unacked messages out with max_pending = 100",
        mock.max_held()
    );
}

/// A source with a visibility timeout shorter than the work: the mock
/// redelivers message 0 every 20 ms while its task takes 300 ms.
fn redelivering(unique_ids: bool) -> (MockSource, tempest_source_mock::MockHandle) {
    let source = MockSource::from_config(MockConfig {
        redeliver_after_ms: Some(20),
        ack_interval_ms: 1,
        unique_ids,
        ..MockConfig::default()
    })
    .unwrap();
    let mock = source.handle();
    mock.push("slow");
    (source, mock)
}

fn slow_task(runs: Arc<AtomicU64>) -> FnTask {
    FnTask::new("slow", move |m| {
        runs.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
        Ok(Output::One(m))
    })
}

/// Regression: the same id delivered twice while in flight ran twice
/// concurrently and was acked twice.
#[test]
fn an_id_delivered_again_while_in_flight_runs_once_and_is_acked_once() {
    let (source, mock) = redelivering(true);
    let runs = Arc::new(AtomicU64::new(0));
    let report = TestRun::new(
        builder("dedup", source)
            .pipeline(Pipeline::new().task(slow_task(Arc::clone(&runs))))
            .workers("slow", 2),
    )
    .run()
    .unwrap();
    let id = tempest_source::MsgId::Int(0);
    assert!(mock.delivery_count(&id) >= 2, "the mock redelivered it");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "it ran once");
    assert_eq!(mock.ack_count(&id), 1, "one ack settles every delivery");
    assert_eq!(mock.held(), 0);
    let deliveries = report.deliveries(&id);
    assert_eq!(deliveries.len() as u32, mock.delivery_count(&id));
    assert_eq!(deliveries.iter().filter(|d| !d.duplicate).count(), 1);
    assert!(deliveries.iter().all(|d| d.outcome == Outcome::Acked));
    assert_eq!(
        report.stats.duplicates + 1,
        u64::from(mock.delivery_count(&id))
    );
    assert_eq!(report.stats.read, u64::from(mock.delivery_count(&id)));
}

/// Regression: a redelivery polled after its id completed, but before the
/// batched ack reached the source, ran again (the dedup index had already
/// forgotten the id). Here the ack waits up to 400 ms in the source's ack
/// batch while the mock redelivers every 20 ms.
#[test]
fn a_redelivery_polled_while_the_ack_is_on_its_way_does_not_run_again() {
    let source = MockSource::from_config(MockConfig {
        redeliver_after_ms: Some(20),
        ack_policy: AckPolicy::Batch(1024),
        ack_interval_ms: 400,
        unique_ids: true,
        ..MockConfig::default()
    })
    .unwrap();
    let mock = source.handle();
    mock.push("slow");
    let runs = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&runs);
    let task = FnTask::new("slow", move |m| {
        counted.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(100));
        Ok(Output::One(m))
    });
    let report = TestRun::new(
        builder("ack-window", source)
            .pipeline(Pipeline::new().task(task))
            .workers("slow", 2),
    )
    .run()
    .unwrap();
    let id = tempest_source::MsgId::Int(0);
    let delivered = mock.delivery_count(&id);
    assert!(
        delivered >= 8,
        "the mock redelivered it while the ack waited ({delivered} deliveries)"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "it ran once");
    assert_eq!(mock.ack_count(&id), 1);
    assert_eq!(mock.held(), 0);
    assert_eq!(report.stats.read, u64::from(delivered));
    assert_eq!(report.stats.duplicates + 1, u64::from(delivered));
    let deliveries = report.deliveries(&id);
    assert_eq!(deliveries.len() as u32, delivered);
    assert_eq!(deliveries.iter().filter(|d| !d.duplicate).count(), 1);
    assert!(deliveries.iter().all(|d| d.outcome == Outcome::Acked));
}

/// Where ids may name several entries, every delivery runs (and the report
/// keeps each one, where the later used to overwrite the earlier).
#[test]
fn without_unique_ids_every_delivery_runs_and_is_reported() {
    let (source, mock) = redelivering(false);
    let runs = Arc::new(AtomicU64::new(0));
    let report = TestRun::new(
        builder("no-dedup", source)
            .pipeline(Pipeline::new().task(slow_task(Arc::clone(&runs))))
            .workers("slow", 4),
    )
    .run()
    .unwrap();
    let id = tempest_source::MsgId::Int(0);
    let delivered = mock.delivery_count(&id);
    assert!(delivered >= 2, "the mock redelivered it");
    assert_eq!(runs.load(Ordering::SeqCst), u64::from(delivered));
    assert_eq!(report.deliveries(&id).len() as u32, delivered);
    assert_eq!(report.stats.duplicates, 0);
}

/// Regression: the final counters listed 0 workers for every task.
#[test]
fn the_final_counters_show_the_workers_that_ran() {
    let (source, _mock) = common::generated(3_000);
    let report = TestRun::new(
        builder("workers", source)
            .pipeline(
                Pipeline::new()
                    .task(pass("a"))
                    .task(pass("b"))
                    .edge("a", "b"),
            )
            .workers("b", 3),
    )
    .run()
    .unwrap();
    assert_eq!(
        report.stats.workers,
        vec![("a".to_string(), 1), ("b".to_string(), 3)]
    );
    let b: Vec<_> = report
        .stats
        .per_worker
        .iter()
        .filter(|w| w.task == "b")
        .collect();
    assert_eq!(b.len(), 3);
    assert_eq!(b.iter().map(|w| w.handled).sum::<u64>(), 3_000);
}

/// Runs a burst of `messages` through one task of `workers` workers that
/// sleeps `sleep` per message, and returns what each worker handled.
fn burst_per_worker(name: &str, messages: usize, sleep: Duration, workers: usize) -> Vec<u64> {
    let source = MockSource::from_config(MockConfig {
        ack_interval_ms: 1,
        ..MockConfig::default()
    })
    .unwrap();
    let mock = source.handle();
    mock.push_all((0..messages).map(|i| format!("m{i}")));
    let report = TestRun::new(
        builder(name, source)
            .pipeline(Pipeline::new().task(FnTask::new("io", move |m| {
                std::thread::sleep(sleep);
                Ok(Output::One(m))
            })))
            .max_pending(4096)
            .workers("io", workers),
    )
    .run()
    .unwrap();
    assert_eq!(report.stats.acked, messages as u64);
    let handled: Vec<u64> = report.stats.per_worker.iter().map(|w| w.handled).collect();
    assert_eq!(handled.iter().sum::<u64>(), messages as u64, "{handled:?}");
    assert_eq!(handled.len(), workers);
    handled
}

/// Regression: with 4 workers on a task and a 400-message burst, one worker
/// took all 400 (the default batch is 1,024) and the others sat idle.
#[test]
fn a_burst_spreads_over_every_worker_of_a_task() {
    let handled = burst_per_worker("spread", 400, Duration::from_millis(1), 4);
    assert!(
        handled.iter().all(|&n| n <= 160),
        "no worker takes more than 40% of the burst: {handled:?}"
    );
}

/// Regression: a worker's share of a burst larger than one queue chunk
/// was cut where the chunk ended, so the first worker took a chunk, came
/// back for the next while its peer had taken only the remainder, and one
/// of two workers handled 99% of the burst.
#[test]
fn a_burst_longer_than_a_chunk_spreads_evenly() {
    let handled = burst_per_worker("spread-chunks", 3000, Duration::from_micros(200), 2);
    assert!(
        handled.iter().all(|&n| n <= 1950),
        "no worker takes more than 65% of the burst: {handled:?}"
    );
}

/// Regression: one slow message held every message behind it in its batch
/// (until they timed out) while another worker of the task sat idle.
#[test]
fn a_busy_worker_gives_back_what_it_has_not_started() {
    let (source, run) = common::SlowAndFast::new(50);
    let report = TestRun::new(
        builder("give-back", source)
            .pipeline(Pipeline::new().task(run.task()))
            .workers("t", 2),
    )
    .run()
    .unwrap();
    run.check(&report.stats);
}
