//! Distributed mode inside one test process: a topology serving on
//! loopback and workers connecting over TCP from threads.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{generated, pass, FnTask};
use tempest::standalone::{self, RunOptions, RuntimeHandle, ServeOptions, WorkerOptions};
use tempest::{FailurePolicy, Output, Pipeline, StopReason, TopologyBuilder};
use tempest_source_mock::MockSource;

fn topology(source: MockSource) -> TopologyBuilder {
    TopologyBuilder::new("remote")
        .source(source)
        .failure_policy(FailurePolicy::Retry(3))
        .retry_backoff(Duration::from_millis(5), Duration::from_millis(50))
        .pipeline(
            Pipeline::new()
                .task(pass("a"))
                .task(FnTask::new("b", |m| Ok(Output::Many(vec![m.clone(), m]))))
                .task(pass("c"))
                .edge("a", "b")
                .edge("b", "c"),
        )
}

fn worker_options(addr: std::net::SocketAddr, secret: Option<&str>) -> WorkerOptions {
    WorkerOptions {
        topology: addr.to_string(),
        secret: secret.map(|s| s.as_bytes().to_vec()),
        workers: 1,
        fetch_max: 256,
        backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        // These tests join the workers once the topology has stopped.
        exit_with_topology: true,
        ..WorkerOptions::default()
    }
}

fn wait_for_listener(handle: &RuntimeHandle) -> std::net::SocketAddr {
    for _ in 0..1000 {
        if let Some(a) = handle.listening() {
            return a;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("the topology never listened");
}

#[test]
fn remote_workers_process_everything_exactly_once() {
    common::logs();
    let (source, mock) = generated(20_000);
    let handle = RuntimeHandle::new();
    let h = handle.clone();
    let top = std::thread::spawn(move || {
        standalone::run(
            topology(source).build().unwrap(),
            RunOptions {
                handle: Some(h),
                local_workers: false,
                serve: Some(ServeOptions {
                    secret: Some(b"s3cret".to_vec()),
                    ..ServeOptions::loopback()
                }),
                ..RunOptions::default()
            },
        )
        .unwrap()
    });
    let addr = wait_for_listener(&handle);
    let workers: Vec<_> = [("a", 1), ("b", 2), ("c", 1)]
        .into_iter()
        .map(|(task, n)| {
            let opts = WorkerOptions {
                workers: n,
                ..worker_options(addr, Some("s3cret"))
            };
            std::thread::spawn(move || {
                let t = topology(generated(0).0).build().unwrap();
                standalone::run_worker(&t, task, opts, None).unwrap()
            })
        })
        .collect();
    let report = top.join().unwrap();
    for w in workers {
        let r = w.join().unwrap();
        assert!(r.sessions >= 1);
    }
    assert_eq!(report.stop, StopReason::SourceExhausted);
    assert_eq!(report.stats.acked, 20_000);
    assert_eq!(mock.acked(), 20_000);
    assert_eq!(mock.acked_twice(), 0);
}

#[test]
fn a_wrong_secret_is_refused_for_good() {
    let (source, _mock) = generated(10);
    let handle = RuntimeHandle::new();
    let h = handle.clone();
    let top = std::thread::spawn(move || {
        standalone::run(
            topology(source)
                .graceful_shutdown(Duration::from_millis(100))
                .build()
                .unwrap(),
            RunOptions {
                handle: Some(h),
                local_workers: false,
                serve: Some(ServeOptions {
                    secret: Some(b"right".to_vec()),
                    ..ServeOptions::loopback()
                }),
                deadline: Some(Duration::from_secs(20)),
                ..RunOptions::default()
            },
        )
    });
    let addr = wait_for_listener(&handle);
    let t = topology(generated(0).0).build().unwrap();
    let err =
        standalone::run_worker(&t, "a", worker_options(addr, Some("wrong")), None).unwrap_err();
    assert!(err.to_string().contains("wrong secret"), "{err}");
    let err =
        standalone::run_worker(&t, "nope", worker_options(addr, Some("right")), None).unwrap_err();
    assert!(err.to_string().contains("no task \"nope\""), "{err}");
    handle.shutdown();
    top.join().unwrap().unwrap();
}

#[test]
fn batches_fit_the_frame_limit_and_oversized_messages_fail_cleanly() {
    let (source, mock) = common::primed(&[]);
    let small: Vec<_> = (0..50).map(|_| mock.push(vec![b's'; 200])).collect();
    let huge = mock.push(vec![b'h'; 5000]);
    let handle = RuntimeHandle::new();
    let h = handle.clone();
    let top = std::thread::spawn(move || {
        tempest::testing::TestRun::new(
            TopologyBuilder::new("frames")
                .source(source)
                .failure_policy(FailurePolicy::None)
                .pipeline(Pipeline::new().task(pass("a"))),
        )
        .handle(h)
        .deadline(Duration::from_secs(30))
        .run_serving(ServeOptions {
            max_frame: 2048,
            ..ServeOptions::loopback()
        })
        .unwrap()
    });
    let addr = wait_for_listener(&handle);
    let worker = std::thread::spawn(move || {
        let t = TopologyBuilder::new("frames")
            .source(generated(0).0)
            .pipeline(Pipeline::new().task(pass("a")))
            .build()
            .unwrap();
        standalone::run_worker(&t, "a", worker_options(addr, None), None).unwrap()
    });
    let report = top.join().unwrap();
    worker.join().unwrap();
    for id in &small {
        assert_eq!(report.outcome(id), Some(tempest::Outcome::Acked));
    }
    assert_eq!(report.outcome(&huge), Some(tempest::Outcome::Failed));
    let reason = report
        .report(&huge)
        .unwrap()
        .reason
        .clone()
        .unwrap()
        .to_string();
    assert!(
        reason.contains("cannot be sent to a remote worker"),
        "{reason}"
    );
}

/// A remote worker stuck on a slow message gives back what it has not
/// started (GiveBack / Returned frames) for an idle worker to take.
#[test]
fn a_busy_remote_worker_gives_back_what_it_has_not_started() {
    let (source, run) = common::SlowAndFast::new(50);
    let make = |source: MockSource| {
        TopologyBuilder::new("give-back")
            .source(source)
            .pipeline(Pipeline::new().task(run.task()))
    };
    let (top, addr) = common::serve_on_loopback(make(source).build().unwrap());
    let worker_topology = make(generated(0).0).build().unwrap();
    let opts = WorkerOptions {
        workers: 2,
        ..worker_options(addr, None)
    };
    let w = std::thread::spawn(move || standalone::run_worker(&worker_topology, "t", opts, None));
    let report = top.join().unwrap();
    w.join().unwrap().unwrap();
    run.check(&report.stats);
}

/// Worker options for the give-back edge cases: one connection, quick
/// reconnects, a short drain, exit with the topology.
fn quick_worker(addr: std::net::SocketAddr) -> WorkerOptions {
    WorkerOptions {
        graceful_shutdown: Duration::from_millis(100),
        ..worker_options(addr, None)
    }
}

/// Regression (review of issue 10): tickets name a (message, task) pair, so
/// the siblings of a fan-out share one. A give-back marked every held copy
/// with a returned ticket as no longer held, the one still running
/// included; when the worker was then lost, that message was neither
/// retried nor failed, and hung until its timeout.
#[test]
fn a_worker_lost_after_a_give_back_still_hands_over_what_it_was_running() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let calls = Arc::new(AtomicUsize::new(0));
    let make = |source: MockSource| {
        let c = Arc::clone(&calls);
        TopologyBuilder::new("lost-after-give-back")
            .source(source)
            .failure_policy(FailurePolicy::Retry(3))
            .retry_backoff(Duration::from_millis(5), Duration::from_millis(50))
            // Longer than the run may last: only losing the worker can
            // bring the message back.
            .msg_timeout(Duration::from_secs(600))
            .pipeline(
                Pipeline::new()
                    .task(FnTask::new("split", |m| {
                        Ok(Output::Many(vec![m.clone(), m.clone(), m]))
                    }))
                    .task(FnTask::new("count", move |_m| {
                        if c.fetch_add(1, Ordering::SeqCst) == 0 {
                            std::thread::sleep(Duration::from_secs(4));
                        }
                        Ok(Output::None)
                    }))
                    .edge("split", "count"),
            )
    };
    let (source, _mock) = common::primed(&["x"]);
    let (top, addr) = common::serve_on_loopback(make(source).build().unwrap());
    let spawn = |task: &'static str, handle: Option<RuntimeHandle>| {
        let (t, o) = (make(generated(0).0).build().unwrap(), quick_worker(addr));
        std::thread::spawn(move || standalone::run_worker(&t, task, o, handle))
    };
    let _split = spawn("split", None);
    let first = RuntimeHandle::new();
    let _w1 = spawn("count", Some(first.clone()));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while calls.load(Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "count never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    // A second worker joins: the first gives back the two siblings it has
    // not started, then leaves (its drain runs out) while still running one.
    let _w2 = spawn("count", None);
    while calls.load(Ordering::SeqCst) < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing was given back"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    first.shutdown();
    let report = top.join().unwrap();
    assert!(report.stats.returned >= 2, "{:?}", report.stats);
    assert_eq!(
        report.stop,
        StopReason::SourceExhausted,
        "{:?}",
        report.stats
    );
    assert_eq!(report.stats.acked, 1, "{:?}", report.stats);
    assert!(report.stats.retried >= 1, "{:?}", report.stats);
}

/// Regression (review of issue 10): a remote worker was asked to give back
/// only once while it stayed busy, so a batch it was handed later waited
/// behind its stuck message and timed out.
#[test]
fn a_stuck_remote_worker_is_asked_again_for_batches_it_got_later() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let calls = Arc::new(AtomicUsize::new(0));
    let make = |source: MockSource| {
        let c = Arc::clone(&calls);
        TopologyBuilder::new("ask-again")
            .source(source)
            .failure_policy(FailurePolicy::None)
            .msg_timeout(Duration::from_secs(2))
            .pipeline(
                Pipeline::new()
                    .task(FnTask::new("gen", |m| {
                        std::thread::sleep(Duration::from_millis(20));
                        Ok(Output::One(m))
                    }))
                    .task(FnTask::new("count", move |_m| {
                        let first = c.fetch_add(1, Ordering::SeqCst) == 0;
                        std::thread::sleep(Duration::from_millis(if first { 6000 } else { 25 }));
                        Ok(Output::None)
                    }))
                    .edge("gen", "count"),
            )
    };
    let (source, _mock) = generated(60);
    let (top, addr) = common::serve_on_loopback(make(source).build().unwrap());
    for task in ["count", "count", "gen"] {
        let (t, o) = (make(generated(0).0).build().unwrap(), quick_worker(addr));
        std::thread::spawn(move || standalone::run_worker(&t, task, o, None));
        std::thread::sleep(Duration::from_millis(100));
    }
    let report = top.join().unwrap();
    assert_eq!(
        report.stats.acked + report.stats.timed_out,
        60,
        "{:?}",
        report.stats
    );
    assert_eq!(
        report.stats.timed_out, 1,
        "only the stuck message itself times out: {:?}",
        report.stats
    );
}

/// Regression (review of issue 10): a remote worker whose drain ran out
/// disconnected holding messages it had never started, and they failed as
/// `WorkerLost`; it now gives them back first.
#[test]
fn a_worker_whose_drain_runs_out_gives_back_what_it_never_started() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let calls = Arc::new(AtomicUsize::new(0));
    let make = |source: MockSource| {
        let c = Arc::clone(&calls);
        TopologyBuilder::new("drain-gives-back")
            .source(source)
            .failure_policy(FailurePolicy::None)
            .pipeline(Pipeline::new().task(FnTask::new("t", move |m| {
                if c.fetch_add(1, Ordering::SeqCst) == 0 {
                    std::thread::sleep(Duration::from_secs(3));
                }
                Ok(Output::One(m))
            })))
    };
    let (source, _mock) = generated(20);
    let (top, addr) = common::serve_on_loopback(make(source).build().unwrap());
    let spawn = |handle: Option<RuntimeHandle>| {
        let (t, o) = (make(generated(0).0).build().unwrap(), quick_worker(addr));
        std::thread::spawn(move || standalone::run_worker(&t, "t", o, handle))
    };
    let first = RuntimeHandle::new();
    let w1 = spawn(Some(first.clone()));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while calls.load(Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "t never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Stuck on its first message with the rest of its batch unstarted, the
    // worker is told to stop; its 100 ms drain runs out and it leaves. Only
    // then does another worker join.
    first.shutdown();
    w1.join().unwrap().unwrap();
    let _w2 = spawn(None);
    let report = top.join().unwrap();
    assert!(report.stats.returned > 0, "{:?}", report.stats);
    assert_eq!(
        (report.stats.failed, report.stats.acked),
        (1, 19),
        "only the message in the stuck call is lost: {:?}",
        report.stats
    );
}

/// A raw client's frames, written and read by hand.
fn raw_send(s: &mut std::net::TcpStream, f: &tempest::wire::Frame) {
    use std::io::Write;
    s.write_all(&f.to_wire()).unwrap();
}

fn raw_recv(s: &mut std::net::TcpStream) -> tempest::wire::Frame {
    use std::io::Read;
    use tempest::wire::Frame;
    loop {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut body).unwrap();
        match Frame::decode_body(body.into()).unwrap() {
            Frame::Heartbeat => continue,
            f => return f,
        }
    }
}

/// A raw client for task `task`: connected, handshaken, and handed one
/// batch for a fetch of `max`.
fn raw_worker(
    addr: std::net::SocketAddr,
    task: &str,
    max: u32,
) -> (std::net::TcpStream, Vec<tempest::TaskMsg>) {
    use tempest::wire::{self, Frame};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    raw_send(
        &mut s,
        &Frame::Hello {
            version: wire::VERSION,
            task: task.into(),
        },
    );
    let Frame::Challenge { nonce } = raw_recv(&mut s) else {
        panic!("no challenge")
    };
    raw_send(
        &mut s,
        &Frame::Auth {
            mac: wire::sign(b"", &nonce, task),
        },
    );
    assert!(matches!(raw_recv(&mut s), Frame::Welcome { .. }));
    raw_send(&mut s, &Frame::Fetch { max });
    let Frame::Batch(batch) = raw_recv(&mut s) else {
        panic!("no batch")
    };
    (s, std::sync::Arc::unwrap_or_clone(batch))
}

/// A peer's `Returned` frame is checked against what the worker holds:
/// a message it never held, or one returned twice, is ignored, so a buggy
/// or hostile worker cannot make a message run twice.
#[test]
fn returned_messages_the_worker_did_not_hold_are_ignored() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tempest::wire::Frame;

    let calls = Arc::new(AtomicUsize::new(0));
    let make = |source: MockSource| {
        let c = Arc::clone(&calls);
        TopologyBuilder::new("forged-returns")
            .source(source)
            .pipeline(Pipeline::new().task(FnTask::new("t", move |m| {
                c.fetch_add(1, Ordering::SeqCst);
                Ok(Output::One(m))
            })))
    };
    let (source, _mock) = generated(10);
    let (top, addr) = common::serve_on_loopback(make(source).build().unwrap());

    // A raw client: handshake, one fetch, then a forged give-back.
    let (mut s, batch) = raw_worker(addr, "t", 10);
    assert_eq!(batch.len(), 10);
    // The first message twice, and one with a ticket it never held.
    let mut forged = vec![batch[0].clone(), batch[0].clone()];
    let mut stranger = batch[1].clone();
    stranger.ticket.slot += 1000;
    forged.push(stranger);
    raw_send(&mut s, &Frame::Returned(forged));
    raw_send(&mut s, &Frame::Goodbye);
    drop(s);

    // A real worker does the rest.
    let (t, o) = (
        make(generated(0).0).build().unwrap(),
        worker_options(addr, None),
    );
    let _w = std::thread::spawn(move || standalone::run_worker(&t, "t", o, None));
    let report = top.join().unwrap();
    assert_eq!(report.stats.acked, 10, "{:?}", report.stats);
    assert_eq!(report.stats.returned, 1, "{:?}", report.stats);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        10,
        "each message ran once: {:?}",
        report.stats
    );
}

/// A peer's answers count only for messages it holds, named exactly:
/// siblings of a fan-out share slot, generation and task, and answering
/// one sibling twice must not stand in for the other (which would then
/// never run).
#[test]
fn an_answer_for_a_sibling_already_answered_is_stale() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tempest::wire::Frame;
    use tempest::Verdict;

    let calls = Arc::new(AtomicUsize::new(0));
    let make = |source: MockSource| {
        let c = Arc::clone(&calls);
        TopologyBuilder::new("forged-answers")
            .source(source)
            .failure_policy(FailurePolicy::BestEffort)
            .pipeline(
                Pipeline::new()
                    .task(FnTask::new("split", |m| {
                        Ok(Output::Many(vec![m.clone(), m]))
                    }))
                    .task(FnTask::new("t", move |m| {
                        c.fetch_add(1, Ordering::SeqCst);
                        Ok(Output::One(m))
                    }))
                    .edge("split", "t"),
            )
    };
    let (source, mock) = generated(1);
    let (top, addr) = common::serve_on_loopback(make(source).build().unwrap());
    let split = {
        let (t, o) = (
            make(generated(0).0).build().unwrap(),
            worker_options(addr, None),
        );
        std::thread::spawn(move || standalone::run_worker(&t, "split", o, None))
    };

    // A raw client takes both siblings and answers the first one twice.
    let (mut s, batch) = raw_worker(addr, "t", 10);
    assert_eq!(batch.len(), 2);
    let (a, b) = (batch[0].ticket, batch[1].ticket);
    assert_eq!((a.slot, a.gen, a.task), (b.slot, b.gen, b.task));
    assert_ne!(a.copy, b.copy, "siblings are told apart");
    raw_send(
        &mut s,
        &Frame::Results {
            complete: false,
            items: vec![(a, Verdict::Done(0)), (a, Verdict::Done(0))],
            outputs: Vec::new(),
        },
    );
    // Leaving holding the second: it goes back to the queue.
    raw_send(&mut s, &Frame::Goodbye);
    drop(s);

    let (t, o) = (
        make(generated(0).0).build().unwrap(),
        worker_options(addr, None),
    );
    let w = std::thread::spawn(move || standalone::run_worker(&t, "t", o, None));
    let report = top.join().unwrap();
    // Checked before joining the workers: had the record completed
    // without the second sibling, the real worker could have missed the
    // topology and be reconnecting still.
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the unanswered sibling ran on the real worker: {:?}",
        report.stats
    );
    assert_eq!(report.stats.acked, 1, "{:?}", report.stats);
    assert_eq!(report.stats.stale_results, 1, "{:?}", report.stats);
    assert_eq!(mock.acked_twice(), 0);
    w.join().unwrap().unwrap();
    split.join().unwrap().unwrap();
}
