//! Metrics backends against real endpoints: statsd lines on a UDP socket,
//! the JSON-lines file parsed back, and counters that match the per-message
//! outcomes exactly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::{builder, generated, pass, primed, FnTask, Gate};
use tempest::metrics::{names, MetricsConfig, Target};
use tempest::testing::TestRun;
use tempest::{FailurePolicy, Outcome, Output, Pipeline, TaskError};

#[test]
fn statsd_receives_counters_and_gauges() {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let port = socket.local_addr().unwrap().port();
    let (source, _mock) = generated(1000);
    let report = TestRun::new(
        builder("stats", source)
            .pipeline(Pipeline::new().task(pass("a")))
            .metrics(MetricsConfig {
                flush_interval: 50,
                target: vec![Target::Statsd {
                    host: "127.0.0.1".into(),
                    port,
                    prefix: "myapp".into(),
                }],
            }),
    )
    .run()
    .unwrap();
    assert_eq!(report.stats.acked, 1000);
    let mut acked = 0.0;
    let mut gauges = 0;
    let mut buf = [0u8; 65536];
    while let Ok(n) = socket.recv(&mut buf) {
        for line in String::from_utf8_lossy(&buf[..n]).lines() {
            if let Some(rest) = line.strip_prefix("myapp.tempest.msgs.acked.stats:") {
                acked += rest.trim_end_matches("|c").parse::<f64>().unwrap();
            }
            if line.ends_with("|g") {
                gauges += 1;
            }
        }
    }
    assert_eq!(acked, 1000.0, "the counter's deltas add up to the total");
    assert!(gauges > 0, "gauges are sent too");
}

#[test]
fn the_file_backend_writes_json_lines() {
    let path = std::env::temp_dir().join(format!("tempest-metrics-{}.jsonl", std::process::id()));
    let (source, _mock) = generated(300);
    TestRun::new(
        builder("file", source)
            .pipeline(
                Pipeline::new()
                    .task(pass("a"))
                    .task(pass("b"))
                    .edge("a", "b"),
            )
            .metrics(MetricsConfig {
                flush_interval: 50,
                target: vec![Target::File {
                    path: path.clone(),
                    clobber: true,
                }],
            }),
    )
    .run()
    .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert!(last["ts"].as_u64().unwrap() > 0);
    let metrics = last["metrics"].as_array().unwrap();
    let find = |name: &str, task: Option<&str>| {
        metrics
            .iter()
            .find(|m| m["name"] == name && task.is_none_or(|t| m["labels"]["task"] == t))
            .map(|m| m["value"].as_u64().unwrap())
    };
    assert_eq!(find(names::MSGS_ACKED, None), Some(300));
    assert_eq!(find(names::TASK_MSGS_IN, Some("b")), Some(300));
    assert_eq!(
        metrics
            .iter()
            .find(|m| m["name"] == names::MSGS_ACKED)
            .unwrap()["type"],
        "counter"
    );
    assert!(text.lines().count() >= 1);
}

#[test]
fn counters_match_the_outcomes_of_every_message() {
    let (source, mock) = primed(&["ok", "ok", "bad", "ok", "hang", "bad"]);
    let _ = mock;
    let gate = Gate::default();
    let g = gate.clone();
    let report = TestRun::new(
        builder("outcomes", source)
            .failure_policy(FailurePolicy::None)
            .msg_timeout(Duration::from_millis(100))
            .workers("work", 2)
            .task_batch(1)
            .pipeline(
                Pipeline::new().task(FnTask::new("work", move |m| match &m[..] {
                    b"bad" => Err(TaskError::msg("bad")),
                    b"hang" => {
                        g.wait();
                        Ok(Output::None)
                    }
                    _ => Ok(Output::None),
                })),
            ),
    )
    .until(move |s| {
        let done = s.acked + s.failed + s.timed_out >= 6;
        if done {
            gate.open();
        }
        done
    })
    .run()
    .unwrap();
    let m = &report.metrics;
    assert_eq!(
        m.counter(names::MSGS_ACKED, &[]) as usize,
        report.count(Outcome::Acked)
    );
    assert_eq!(
        m.counter(names::MSGS_FAILED, &[]) as usize,
        report.count(Outcome::Failed)
    );
    assert_eq!(
        m.counter(names::MSGS_TIMED_OUT, &[]) as usize,
        report.count(Outcome::TimedOut)
    );
    // A "bad" prefetched behind the hung message may time out instead of
    // failing; either way every message has exactly one outcome.
    assert_eq!(report.count(Outcome::Acked), 3);
    assert_eq!(
        report.count(Outcome::Failed) + report.count(Outcome::TimedOut),
        3
    );
    assert!(report.count(Outcome::TimedOut) >= 1);
    assert!(
        m.counter(names::TASK_ERRORS, &[("task", "work")]) >= report.count(Outcome::Failed) as u64
    );
    assert_eq!(m.counter(names::SOURCE_READ, &[]), 6);
}

#[test]
fn the_prometheus_endpoint_serves_valid_exposition_text() {
    use std::io::{Read, Write};
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    use tempest_source::Source;
    let source = tempest_source_mock::MockSource::from_config(tempest_source_mock::MockConfig {
        open: true,
        ..tempest_source_mock::MockConfig::generator(1_000_000_000, 8)
    })
    .unwrap();
    let handle = tempest::standalone::RuntimeHandle::new();
    let h = handle.clone();
    let run = std::thread::spawn(move || {
        TestRun::new(
            builder("prom", source)
                .pipeline(Pipeline::new().task(pass("a")))
                .metrics(MetricsConfig {
                    flush_interval: 50,
                    target: vec![Target::Prometheus {
                        host: "127.0.0.1".into(),
                        port,
                    }],
                }),
        )
        .handle(h)
        .run()
        .unwrap()
    });
    while handle.stats().map_or(0, |s| s.acked) < 10_000 {
        std::thread::sleep(Duration::from_millis(5));
    }
    // Give the pipeline's periodic flush into the registry a moment.
    std::thread::sleep(Duration::from_millis(200));
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    handle.shutdown();
    run.join().unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let mut types = 0;
    let mut acked = None;
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let kind = rest.split_whitespace().nth(1).unwrap();
            assert!(kind == "counter" || kind == "gauge", "{line}");
            types += 1;
            continue;
        }
        // name{labels} value
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        if series == "tempest_msgs_acked_total{topology=\"prom\"}" {
            acked = Some(value);
        }
    }
    assert!(types > 5, "{body}");
    assert!(acked.unwrap_or(0.0) > 0.0, "{body}");
}
