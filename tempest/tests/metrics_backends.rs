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
    let mut latencies = 0.0;
    let mut gauges = 0;
    let mut p99s = Vec::new();
    let mut buf = [0u8; 65536];
    while let Ok(n) = socket.recv(&mut buf) {
        for line in String::from_utf8_lossy(&buf[..n]).lines() {
            if let Some(rest) = line.strip_prefix("myapp.tempest.msgs.acked.stats:") {
                acked += rest.trim_end_matches("|c").parse::<f64>().unwrap();
            }
            if let Some(rest) = line.strip_prefix("myapp.tempest.msgs.latency_us.stats.count:") {
                latencies += rest.trim_end_matches("|c").parse::<f64>().unwrap();
            }
            if let Some(rest) = line.strip_prefix("myapp.tempest.task.batch_us.stats.a.p99:") {
                p99s.push(rest.trim_end_matches("|g").parse::<f64>().unwrap());
            }
            if line.ends_with("|g") {
                gauges += 1;
            }
        }
    }
    assert_eq!(acked, 1000.0, "the counter's deltas add up to the total");
    assert!(gauges > 0, "gauges are sent too");
    // Histograms: one count per interval (adding up to every observation)
    // and quantiles as gauges.
    assert_eq!(latencies, 1000.0, "one latency per acked message");
    assert!(!p99s.is_empty(), "per-task batch-time quantiles are sent");
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
    // A histogram: the whole run in "value", the last interval beside it.
    let batches = metrics
        .iter()
        .find(|m| m["name"] == names::TASK_BATCH_SIZE && m["labels"]["task"] == "b")
        .unwrap();
    assert_eq!(batches["type"], "histogram");
    assert_eq!(batches["value"]["sum"], 300, "every message in some batch");
    let count = batches["value"]["count"].as_u64().unwrap();
    assert!(count >= 1);
    for q in ["min", "p50", "p90", "p99", "p999", "max"] {
        let v = batches["value"][q].as_u64().unwrap();
        assert!((1..=300).contains(&v), "{q} = {v}");
    }
    assert!(batches["interval"]["count"].as_u64().unwrap() <= count);
    // Over all lines, the intervals add up to the whole run.
    let intervals: u64 = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|snap| {
            snap["metrics"].as_array().unwrap().iter().find_map(|m| {
                (m["name"] == names::MSGS_LATENCY_US)
                    .then(|| m["interval"]["count"].as_u64().unwrap())
            })
        })
        .sum();
    assert_eq!(intervals, 300);
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
    // Histograms agree with the counters: one latency per acked message,
    // every message read in some poll and taken in some batch.
    let latency = m.histogram(names::MSGS_LATENCY_US, &[]);
    assert_eq!(latency.count() as usize, report.count(Outcome::Acked));
    assert!(latency.quantile(0.5) <= latency.max());
    assert_eq!(m.histogram(names::SOURCE_POLL_SIZE, &[]).sum(), 6);
    assert!(m.histogram(names::SOURCE_POLL_US, &[]).count() >= 1);
    let batches = m.histogram(names::TASK_BATCH_SIZE, &[("task", "work")]);
    assert_eq!(
        batches.sum(),
        m.counter(names::TASK_MSGS_IN, &[("task", "work")])
    );
    assert_eq!(batches.max(), 1, "task_batch(1)");
    assert_eq!(
        m.histogram(names::TASK_BATCH_US, &[("task", "work")])
            .count(),
        batches.count()
    );
}

#[test]
fn the_prometheus_endpoint_serves_valid_exposition_text() {
    common::logs();
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
    let scrape = || {
        // Refused until the run has opened its backends.
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return String::new();
        };
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    };
    // Scrape until the components have flushed their histograms into the
    // registry and the aggregator has flushed an interval with acks in it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let response = loop {
        let response = scrape();
        let ready = response.contains("tempest_task_batch_us_count{")
            && response.contains("tempest_msgs_latency_us_count{")
            && !response
                .contains("tempest_msgs_latency_us{topology=\"prom\",quantile=\"0.99\"} NaN")
            && handle.stats().map_or(0, |s| s.acked) >= 10_000;
        if ready || std::time::Instant::now() > deadline {
            break response;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    handle.shutdown();
    run.join().unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let mut types = std::collections::BTreeMap::new();
    let mut family = String::new();
    let mut acked = None;
    let mut latency_count = None;
    let mut latency_p99 = None;
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            let (name, kind) = (words.next().unwrap(), words.next().unwrap());
            assert!(["counter", "gauge", "summary"].contains(&kind), "{line}");
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "family declared twice: {line}"
            );
            family = name.to_string();
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
        // Every sample belongs to the family declared last: its own name,
        // or for a summary also `_sum` and `_count`.
        let summary = types.get(&family).is_some_and(|k| k == "summary");
        assert!(
            name == family
                || (summary
                    && (name == format!("{family}_sum") || name == format!("{family}_count"))),
            "{line} is not in family {family}"
        );
        if summary && name == family {
            assert!(series.contains(",quantile=\""), "{line}");
        }
        match series {
            "tempest_msgs_acked_total{topology=\"prom\"}" => acked = Some(value),
            "tempest_msgs_latency_us_count{topology=\"prom\"}" => latency_count = Some(value),
            "tempest_msgs_latency_us{topology=\"prom\",quantile=\"0.99\"}" => {
                latency_p99 = Some(value)
            }
            _ => {}
        }
    }
    assert!(types.len() > 5, "{body}");
    assert!(acked.unwrap_or(0.0) > 0.0, "{body}");
    // End-to-end latency is a summary: a count, and a p99 from the last
    // flush interval (NaN only if that interval acked nothing).
    assert_eq!(types["tempest_msgs_latency_us"], "summary");
    assert!(latency_count.unwrap_or(0.0) > 0.0, "{body}");
    assert!(
        latency_p99.is_some_and(|p| p.is_finite() && p > 0.0),
        "{body}"
    );
    assert_eq!(types["tempest_task_batch_us"], "summary");
}

/// A stand-in push gateway: records every request's method, path and body.
struct Gateway {
    addr: std::net::SocketAddr,
    pushes: std::sync::mpsc::Receiver<(String, String, String)>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Gateway {
    fn start() -> Gateway {
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let addr = server.server_addr().to_ip().unwrap();
        let (tx, pushes) = std::sync::mpsc::channel();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                let Ok(Some(mut request)) = server.recv_timeout(Duration::from_millis(20)) else {
                    continue;
                };
                let mut body = String::new();
                std::io::Read::read_to_string(request.as_reader(), &mut body).unwrap();
                let _ = tx.send((
                    request.method().to_string(),
                    request.url().to_string(),
                    body,
                ));
                let _ = request.respond(tiny_http::Response::empty(200));
            }
        });
        Gateway {
            addr,
            pushes,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the gateway; every push it received, all of them `PUT`s.
    fn pushes_split(mut self) -> Pushes {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        let pushes: Vec<_> = self.pushes.try_iter().collect();
        assert!(pushes.iter().all(|(m, _, _)| m == "PUT"), "{pushes:?}");
        Pushes(pushes)
    }
}

struct Pushes(Vec<(String, String, String)>);

impl Pushes {
    /// How many pushes went to `path`, and the body of the last.
    fn last(&self, path: &str) -> (usize, String) {
        let mine: Vec<_> = self.0.iter().filter(|(_, p, _)| p == path).collect();
        (
            mine.len(),
            mine.last().map(|p| p.2.clone()).unwrap_or_default(),
        )
    }
}

fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn workers_push_their_metrics_to_a_push_gateway_and_the_last_push_is_complete() {
    use tempest::standalone::{self, WorkerOptions};
    let gateway = Gateway::start();
    let url = format!("http://{}", gateway.addr);
    // The worker's config also names the topology's scrape port: a worker
    // serves no scrape endpoint, so the two do not clash.
    let scrape = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = |instance: &str| MetricsConfig {
        flush_interval: 50,
        target: vec![
            Target::PrometheusPush {
                url: url.clone(),
                job: "tests".into(),
                instance: Some(instance.into()),
                timeout: 2000,
            },
            Target::Prometheus {
                host: "127.0.0.1".into(),
                port: scrape,
            },
        ],
    };
    let (source, mock) = generated(2000);
    let (top, addr) = common::serve_on_loopback(
        builder("push", source)
            .pipeline(Pipeline::new().task(pass("a")))
            .metrics(config("topo"))
            .build()
            .unwrap(),
    );
    let worker_metrics = config("worker-1");
    let worker = std::thread::spawn(move || {
        let t = builder("push", generated(0).0)
            .pipeline(Pipeline::new().task(pass("a")))
            .metrics(worker_metrics)
            .build()
            .unwrap();
        let opts = WorkerOptions {
            topology: addr.to_string(),
            secret: None,
            workers: 1,
            fetch_max: 64,
            backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
            exit_with_topology: true,
            ..WorkerOptions::default()
        };
        standalone::run_worker(&t, "a", opts, None).unwrap()
    });
    let report = top.join().unwrap();
    worker.join().unwrap();
    assert_eq!(report.stats.acked, 2000);
    assert_eq!(mock.acked(), 2000);

    let pushes = gateway.pushes_split();
    let (n, topo) = pushes.last("/metrics/job/tests/instance/topo");
    assert!(n >= 1);
    assert_eq!(
        sample(&topo, "tempest_msgs_acked_total{topology=\"push\"}"),
        Some(2000.0),
        "the topology's last push has the final count:\n{topo}"
    );
    let (n, worker) = pushes.last("/metrics/job/tests/instance/worker-1");
    assert!(n >= 1);
    assert_eq!(
        sample(
            &worker,
            "tempest_task_msgs_in_total{topology=\"push\",task=\"a\"}"
        ),
        Some(2000.0),
        "the worker's last push, at exit, has every message it handled:\n{worker}"
    );
    assert!(
        sample(
            &worker,
            "tempest_task_batch_us_count{topology=\"push\",task=\"a\"}"
        )
        .is_some_and(|c| c >= 1.0),
        "{worker}"
    );
}

#[test]
fn bad_metrics_settings_fail_the_build_naming_the_target() {
    let (source, _mock) = generated(1);
    let e = builder("bad", source)
        .pipeline(Pipeline::new().task(pass("a")))
        .metrics(MetricsConfig {
            flush_interval: 100,
            target: vec![Target::PrometheusPush {
                url: "https://gw:9091".into(),
                job: "j".into(),
                instance: None,
                timeout: 1000,
            }],
        })
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("metrics: target 1 (prometheus_push)") && e.contains("https is not supported"),
        "{e}"
    );
}
