//! The reliable-list source end to end through the runtime, against a real
//! redis-server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{unique_key, Server};
use tempest::testing::TestRun;
use tempest::{
    FailurePolicy, Msg, MsgCtx, Output, Pipeline, Task, TaskError, TaskResult, TopologyBuilder,
};
use tempest_source::Source;
use tempest_source_redis::{RedisListConfig, RedisListSource};

#[derive(Clone)]
struct Work {
    seen: Arc<Mutex<Vec<String>>>,
    poison: Option<&'static str>,
}

impl Task for Work {
    fn name(&self) -> &str {
        "work"
    }
    fn handle(&mut self, msg: Msg, _: &MsgCtx) -> TaskResult {
        let text = String::from_utf8_lossy(&msg).into_owned();
        self.seen.lock().unwrap().push(text.clone());
        if Some(text.as_str()) == self.poison {
            return Err(TaskError::msg("poison"));
        }
        Ok(Output::One(msg))
    }
}

fn push(conn: &mut redis::Connection, key: &str, items: impl IntoIterator<Item = String>) {
    let items: Vec<String> = items.into_iter().collect();
    redis::cmd("LPUSH")
        .arg(key)
        .arg(&items)
        .query::<i64>(conn)
        .unwrap();
}

fn llen(conn: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("LLEN").arg(key).query(conn).unwrap()
}

fn config(server: &Server, key: &str) -> RedisListConfig {
    RedisListConfig {
        consumer: Some("c1".into()),
        block_ms: 50,
        ack_interval_ms: 5,
        ..RedisListConfig::new(server.url.clone(), key)
    }
}

#[test]
fn every_message_is_processed_and_acked() {
    let server = Server::shared();
    let key = unique_key("list-all");
    let mut conn = server.conn();
    push(&mut conn, &key, (0..2000).map(|i| format!("m{i}")));
    let work = Work {
        seen: Arc::default(),
        poison: None,
    };
    let seen = Arc::clone(&work.seen);
    let source = RedisListSource::from_config(config(&server, &key)).unwrap();
    let processing = source.processing_key().to_string();
    let report = TestRun::new(
        TopologyBuilder::new("list")
            .source(source)
            .pipeline(Pipeline::new().task(work)),
    )
    .until(|s| s.acked >= 2000)
    .deadline(Duration::from_secs(60))
    .run()
    .unwrap();
    assert_eq!(report.stats.acked, 2000);
    assert_eq!(llen(&mut conn, &key), 0);
    assert_eq!(llen(&mut conn, &processing), 0, "everything acked");
    let distinct: HashSet<_> = seen.lock().unwrap().iter().cloned().collect();
    assert_eq!(distinct.len(), 2000);
}

#[test]
fn messages_left_in_processing_are_redelivered_at_start_and_poison_is_dead_lettered_once() {
    let server = Server::shared();
    let key = unique_key("list-recover");
    let mut conn = server.conn();
    // A previous run of consumer c1 left two messages in its processing list.
    let probe = RedisListSource::from_config(config(&server, &key)).unwrap();
    let processing = probe.processing_key().to_string();
    push(
        &mut conn,
        &processing,
        ["left-1".to_string(), "poison".to_string()],
    );
    push(&mut conn, &key, ["new-1".to_string()]);
    let work = Work {
        seen: Arc::default(),
        poison: Some("poison"),
    };
    let seen = Arc::clone(&work.seen);
    let dead = format!("{key}:dead");
    // Runs until the poison message has gone to the dead list: each run
    // fails it once (policy None) and it stays in processing; the next
    // start redelivers it, until max_deliveries.
    for _ in 0..3 {
        let source = RedisListSource::from_config(RedisListConfig {
            max_deliveries: 2,
            ..config(&server, &key)
        })
        .unwrap();
        let report = TestRun::new(
            TopologyBuilder::new("list-recover")
                .source(source)
                .failure_policy(FailurePolicy::None)
                .pipeline(Pipeline::new().task(work.clone())),
        )
        .until(|s| s.acked + s.failed >= 1)
        .deadline(Duration::from_secs(2))
        .run()
        .unwrap();
        assert_eq!(report.stats.inflight, 0);
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.iter().filter(|s| *s == "left-1").count(),
        1,
        "{seen:?}"
    );
    assert_eq!(seen.iter().filter(|s| *s == "new-1").count(), 1, "{seen:?}");
    assert_eq!(
        seen.iter().filter(|s| *s == "poison").count(),
        2,
        "{seen:?}"
    );
    let dead_items: Vec<String> = redis::cmd("LRANGE")
        .arg(&dead)
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .unwrap();
    assert_eq!(
        dead_items,
        vec!["poison".to_string()],
        "dead-lettered exactly once"
    );
    assert_eq!(llen(&mut conn, &processing), 0);
}

#[test]
fn the_list_source_reconnects_when_redis_restarts() {
    let mut server = Server::own(true);
    let key = unique_key("list-restart");
    let mut conn = server.conn();
    push(&mut conn, &key, (0..3000).map(|i| format!("m{i}")));
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s = Arc::clone(&seen);
    let source = RedisListSource::from_config(RedisListConfig {
        max_backoff_ms: 100,
        ..config(&server, &key)
    })
    .unwrap();
    let processing = source.processing_key().to_string();
    let report = common::run_through_restart(
        &mut server,
        TopologyBuilder::new("list-restart")
            .source(source)
            .pipeline(
                Pipeline::new()
                    .task(Work {
                        seen: s,
                        poison: None,
                    })
                    .task(Slow)
                    .edge("work", "slow"),
            ),
        3000,
    );
    let mut conn = server.conn();
    assert!(report.stats.acked >= 3000, "{:?}", report.stats);
    assert_eq!(llen(&mut conn, &key), 0);
    assert_eq!(
        llen(&mut conn, &processing),
        0,
        "everything acked after the restart"
    );
    let distinct: HashSet<_> = seen.lock().unwrap().iter().cloned().collect();
    assert_eq!(distinct.len(), 3000, "no message lost");
}

/// Slows the pipeline so the restart lands mid-stream.
#[derive(Clone)]
struct Slow;

impl Task for Slow {
    fn name(&self) -> &str {
        "slow"
    }
    fn handle(&mut self, _msg: Msg, _: &MsgCtx) -> TaskResult {
        std::thread::sleep(Duration::from_micros(200));
        Ok(Output::None)
    }
}
