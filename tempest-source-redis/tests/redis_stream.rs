//! The Redis Streams source end to end through the runtime, against a real
//! redis-server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{pending, unique_key, xadd, xlen, Server};
use tempest::testing::TestRun;
use tempest::{FailurePolicy, Msg, Output, Pipeline, Task, TaskError, TaskResult, TopologyBuilder};
use tempest_source::Source;
use tempest_source_redis::{RedisStreamConfig, RedisStreamSource};

#[derive(Clone)]
struct Record {
    seen: Arc<Mutex<Vec<String>>>,
    /// Payloads that fail the first `fails` times they are seen.
    flaky: Option<(String, usize)>,
    /// A payload that always fails.
    poison: Option<String>,
}

impl Task for Record {
    fn name(&self) -> &str {
        "record"
    }
    fn handle(&mut self, msg: Msg) -> TaskResult {
        let text = String::from_utf8_lossy(&msg).into_owned();
        if self.poison.as_deref() == Some(text.as_str()) {
            return Err(TaskError::msg("poison"));
        }
        let mut seen = self.seen.lock().unwrap();
        let times = seen.iter().filter(|s| **s == text).count();
        seen.push(text.clone());
        if let Some((p, fails)) = &self.flaky {
            if *p == text && times < *fails {
                return Err(TaskError::msg("flaky"));
            }
        }
        Ok(Output::None)
    }
}

fn config(server: &Server, key: &str) -> RedisStreamConfig {
    RedisStreamConfig {
        group_start_id: "0".into(),
        block_ms: 50,
        ack_interval_ms: 5,
        ..RedisStreamConfig::new(server.url.clone(), key, "g")
    }
}

fn record() -> Record {
    Record {
        seen: Arc::default(),
        flaky: None,
        poison: None,
    }
}

#[test]
fn every_entry_is_processed_and_acked() {
    let server = Server::shared();
    let key = unique_key("all-acked");
    let mut conn = server.conn();
    xadd(&mut conn, &key, "m", 5000);
    let task = record();
    let seen = Arc::clone(&task.seen);
    let source = RedisStreamSource::from_config(config(&server, &key)).unwrap();
    let report = TestRun::new(
        TopologyBuilder::new("redis-all")
            .source(source)
            .pipeline(Pipeline::new().task(task)),
    )
    .until(|s| s.acked >= 5000)
    .deadline(Duration::from_secs(60))
    .run()
    .unwrap();
    assert_eq!(report.stats.acked, 5000);
    assert_eq!(pending(&mut conn, &key, "g"), 0);
    let distinct: HashSet<_> = seen.lock().unwrap().iter().cloned().collect();
    assert_eq!(distinct.len(), 5000);
}

#[test]
fn failed_entries_stay_pending_and_are_reclaimed_later() {
    let server = Server::shared();
    let key = unique_key("reclaim");
    let mut conn = server.conn();
    xadd(&mut conn, &key, "m", 20);
    let task = Record {
        flaky: Some(("m7".into(), 2)),
        ..record()
    };
    let seen = Arc::clone(&task.seen);
    let source = RedisStreamSource::from_config(RedisStreamConfig {
        claim_min_idle_ms: 200,
        ..config(&server, &key)
    })
    .unwrap();
    let report = TestRun::new(
        TopologyBuilder::new("redis-reclaim")
            .source(source)
            .failure_policy(FailurePolicy::None)
            .pipeline(Pipeline::new().task(task)),
    )
    .until(|s| s.acked >= 20)
    .deadline(Duration::from_secs(60))
    .run()
    .unwrap();
    assert_eq!(report.stats.acked, 20);
    assert_eq!(
        report.stats.failed, 2,
        "m7 failed twice before it succeeded"
    );
    assert_eq!(pending(&mut conn, &key, "g"), 0);
    let times = seen.lock().unwrap().iter().filter(|s| *s == "m7").count();
    assert_eq!(times, 3);
}

#[test]
fn a_poison_entry_is_dead_lettered_exactly_once() {
    let server = Server::shared();
    let key = unique_key("poison");
    let mut conn = server.conn();
    xadd(&mut conn, &key, "m", 10);
    let task = Record {
        poison: Some("m3".into()),
        ..record()
    };
    let source = RedisStreamSource::from_config(RedisStreamConfig {
        claim_min_idle_ms: 100,
        max_deliveries: 3,
        ..config(&server, &key)
    })
    .unwrap();
    let dead = format!("{key}:dead");
    let probe = server.url.clone();
    let dead_key = dead.clone();
    let report = TestRun::new(
        TopologyBuilder::new("redis-poison")
            .source(source)
            .failure_policy(FailurePolicy::None)
            .pipeline(Pipeline::new().task(task)),
    )
    .until(move |s| {
        s.acked >= 9 && {
            let mut c = redis::Client::open(probe.as_str())
                .unwrap()
                .get_connection()
                .unwrap();
            xlen(&mut c, &dead_key) >= 1
        }
    })
    .deadline(Duration::from_secs(60))
    .run()
    .unwrap();
    assert_eq!(report.stats.acked, 9);
    assert_eq!(xlen(&mut conn, &dead), 1, "dead-lettered once");
    assert_eq!(pending(&mut conn, &key, "g"), 0, "and acked");
    let entry: redis::Value = redis::cmd("XRANGE")
        .arg(&dead)
        .arg("-")
        .arg("+")
        .query(&mut conn)
        .unwrap();
    let text = format!("{entry:?}");
    assert!(text.contains("m3") && text.contains("deliveries"), "{text}");
}

#[test]
fn the_topology_reconnects_when_redis_restarts() {
    let _ = env_logger::builder().is_test(true).try_init();
    let mut server = Server::own(true);
    let key = unique_key("restart");
    let mut conn = server.conn();
    xadd(&mut conn, &key, "m", 3000);
    let task = record();
    let seen = Arc::clone(&task.seen);
    let source = RedisStreamSource::from_config(RedisStreamConfig {
        max_backoff_ms: 100,
        ..config(&server, &key)
    })
    .unwrap();
    let slow = Arc::clone(&seen);
    let report = common::run_through_restart(
        &mut server,
        TopologyBuilder::new("redis-restart")
            .source(source)
            .pipeline(Pipeline::new().task(FnTask(move |m: Msg| {
                std::thread::sleep(Duration::from_micros(200));
                slow.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&m).into_owned());
                Ok(Output::None)
            }))),
        3000,
    );
    let mut conn = server.conn();
    assert!(report.stats.acked >= 3000, "{:?}", report.stats);
    assert_eq!(pending(&mut conn, &key, "g"), 0);
    let distinct: HashSet<_> = seen.lock().unwrap().iter().cloned().collect();
    assert_eq!(distinct.len(), 3000, "no entry lost");
}

#[derive(Clone)]
struct FnTask<F>(F);

impl<F: Fn(Msg) -> TaskResult + Clone + Send + 'static> Task for FnTask<F> {
    fn name(&self) -> &str {
        "work"
    }
    fn handle(&mut self, msg: Msg) -> TaskResult {
        (self.0)(msg)
    }
}
