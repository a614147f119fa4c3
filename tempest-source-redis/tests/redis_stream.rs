//! The Redis Streams source end to end through the runtime, against a real
//! redis-server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{pending, unique_key, xadd, xlen, Server};
use tempest::testing::TestRun;
use tempest::{
    FailurePolicy, Msg, MsgCtx, Output, Pipeline, Task, TaskError, TaskResult, TopologyBuilder,
};
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
    fn handle(&mut self, msg: Msg, _: &MsgCtx) -> TaskResult {
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
        monitor_interval_ms: 10,
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
        claim_min_idle_ms: 200,
        monitor_interval_ms: 10,
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
    fn handle(&mut self, msg: Msg, _: &MsgCtx) -> TaskResult {
        (self.0)(msg)
    }
}

// ---------------------------------------------------------------------------
// Regression tests for the guarantee leaks of issue 10, driving the source
// by hand (as the runtime does: poll, ack, monitor on one thread).

use std::time::Instant;

use tempest_source::metrics::names;
use tempest_source::{MsgId, SourceContext, SourceMsg};

/// Polls `condition` every 5 ms until it holds; panics after `limit`.
fn await_condition(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A config whose monitor tick and lease are short enough for a test.
fn fast(server: &Server, key: &str, consumer: &str) -> RedisStreamConfig {
    RedisStreamConfig {
        monitor_interval_ms: 10,
        lease_ttl_ms: 300,
        claim_min_idle_ms: 300,
        count: 100,
        ..config(server, key)
    }
    .consumer(consumer)
}

/// Every entry of the group's pending list: (id, consumer, delivery count).
fn pending_entries(
    conn: &mut redis::Connection,
    key: &str,
    group: &str,
) -> Vec<(String, String, i64)> {
    let v: Vec<(String, String, i64, i64)> = redis::cmd("XPENDING")
        .arg(key)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(100_000)
        .query(conn)
        .unwrap();
    v.into_iter().map(|(id, c, _, n)| (id, c, n)).collect()
}

/// Polls until two polls in a row come back empty (at most `polls`
/// non-empty polls).
fn drain(source: &mut RedisStreamSource, max: usize, polls: usize) -> Vec<SourceMsg> {
    let mut all = Vec::new();
    let (mut full, mut empty) = (0, 0);
    while full < polls && empty < 2 {
        let mut batch = Vec::new();
        source.poll(max, &mut batch).unwrap();
        if batch.is_empty() {
            empty += 1;
        } else {
            (full, empty) = (full + 1, 0);
            all.extend(batch);
        }
    }
    all
}

/// "Duplicate storm after a restart": the restarted consumer re-read its
/// pending entries from id 0 on every poll until a read came back empty,
/// delivering entries in flight again and again and raising their counts.
#[test]
fn a_restart_re_reads_each_pending_entry_once_raising_its_count_by_one() {
    let server = Server::shared();
    let key = unique_key("own-pending-walk");
    let mut conn = server.conn();
    xadd(&mut conn, &key, "m", 300);

    let mut first = RedisStreamSource::from_config(fast(&server, &key, "walker")).unwrap();
    first.connect().unwrap();
    let delivered = drain(&mut first, 100, 3);
    assert_eq!(delivered.len(), 300);
    assert!(delivered.iter().all(|m| m.delivered == 1));
    // The process dies: no ack, no shutdown.
    drop(first);
    let lease = format!("{key}:lease:g:walker");
    await_condition(Duration::from_secs(5), "the dead lease expired", || {
        redis::cmd("EXISTS")
            .arg(&lease)
            .query::<i64>(&mut conn)
            .unwrap()
            == 0
    });

    let mut second = RedisStreamSource::from_config(fast(&server, &key, "walker")).unwrap();
    second.connect().unwrap();
    assert_eq!(second.consumer(), "walker", "the name is free again");
    let again = drain(&mut second, 50, 20);
    let ids: Vec<&MsgId> = again.iter().map(|m| &m.id).collect();
    let distinct: HashSet<&MsgId> = ids.iter().copied().collect();
    assert_eq!(ids.len(), 300, "each pending entry redelivered once");
    assert_eq!(distinct.len(), 300);
    assert!(
        again.iter().all(|m| m.delivered == 2),
        "the reported count is the real one"
    );
    let counts = pending_entries(&mut conn, &key, "g");
    assert_eq!(counts.len(), 300);
    assert!(
        counts.iter().all(|(_, c, n)| c == "walker" && *n == 2),
        "one redelivery raised each count by one: {:?}",
        &counts[..3]
    );
    // More polls and monitor ticks deliver nothing again.
    second.monitor().unwrap();
    assert!(drain(&mut second, 50, 3).is_empty());
    let ids: Vec<MsgId> = again.into_iter().map(|m| m.id).collect();
    second.batch_ack(&ids).unwrap();
    second.shutdown().unwrap();
    assert_eq!(pending(&mut conn, &key, "g"), 0);
}

/// "Reclaiming its own in-flight entries": XAUTOCLAIM took entries idle
/// longer than claim_min_idle_ms from the consumer still processing them.
/// Two live consumers, a task slower than claim_min_idle_ms, no fault.
#[test]
fn entries_in_flight_longer_than_claim_min_idle_run_once() {
    let server = Server::shared();
    let key = unique_key("no-self-reclaim");
    let mut conn = server.conn();
    let n = 40;
    xadd(&mut conn, &key, "m", n);
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let run = |consumer: &'static str| {
        let seen = Arc::clone(&seen);
        let done = Arc::clone(&seen);
        let probe = server.url.clone();
        let k = key.clone();
        // Ticks every 20 ms, far inside claim_min_idle_ms even on a busy
        // machine; the entries wait in flight up to 40 × 60 ms.
        let source = RedisStreamSource::from_config(RedisStreamConfig {
            claim_min_idle_ms: 1000,
            monitor_interval_ms: 20,
            max_deliveries: 1,
            ..fast(&server, &key, consumer)
        })
        .unwrap();
        std::thread::spawn(move || {
            TestRun::new(
                TopologyBuilder::new("redis-slow")
                    .source(source)
                    .failure_policy(FailurePolicy::None)
                    .pipeline(Pipeline::new().task(FnTask(move |m: Msg| {
                        // Every entry waits in flight far longer than
                        // claim_min_idle_ms.
                        std::thread::sleep(Duration::from_millis(60));
                        seen.lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&m).into_owned());
                        Ok(Output::None)
                    }))),
            )
            .until(move |_| {
                let distinct: HashSet<String> = done.lock().unwrap().iter().cloned().collect();
                distinct.len() >= n && {
                    let mut c = redis::Client::open(probe.as_str())
                        .unwrap()
                        .get_connection()
                        .unwrap();
                    pending(&mut c, &k, "g") == 0
                }
            })
            .deadline(Duration::from_secs(40))
            .run()
            .unwrap()
        })
    };
    let a = run("slow-a");
    let b = run("slow-b");
    a.join().unwrap();
    b.join().unwrap();
    let seen = seen.lock().unwrap();
    let distinct: HashSet<&String> = seen.iter().collect();
    assert_eq!(distinct.len(), n);
    assert_eq!(seen.len(), n, "no entry ran twice: {seen:?}");
    assert_eq!(
        xlen(&mut conn, &format!("{key}:dead")),
        0,
        "no healthy entry was dead-lettered"
    );
}

/// Entries trimmed while in flight here and then processed are not lost;
/// a trimmed entry pending at a dead consumer is.
#[test]
fn entries_trimmed_while_in_flight_are_not_counted_lost() {
    let server = Server::shared();
    let key = unique_key("trimmed-in-flight");
    let mut conn = server.conn();
    xadd(&mut conn, &key, "m", 10);
    let ctx = SourceContext::for_tests("trimmed");
    let mut source = RedisStreamSource::from_config(fast(&server, &key, "trim")).unwrap();
    source.setup(&ctx).unwrap();
    source.connect().unwrap();
    let batch = drain(&mut source, 100, 1);
    assert_eq!(batch.len(), 10);
    // A consumer of another program reads one more entry and vanishes.
    xadd(&mut conn, &key, "x", 1);
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("gone")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(&key)
        .arg(">")
        .query(&mut conn)
        .unwrap();
    // Trim everything: 10 entries in flight here, 1 pending at `gone`.
    let _: i64 = redis::cmd("XTRIM")
        .arg(&key)
        .arg("MAXLEN")
        .arg(0)
        .query(&mut conn)
        .unwrap();
    // A reconnect reclaims at once, and so does a monitor tick.
    source.connect().unwrap();
    source.monitor().unwrap();
    let ids: Vec<MsgId> = batch.into_iter().map(|m| m.id).collect();
    source.batch_ack(&ids).unwrap();
    source.flush_metrics();
    let lost = ctx.metrics.snapshot().counter(names::SOURCE_LOST, &[]);
    assert_eq!(
        lost, 1,
        "only the entry pending at the vanished consumer is lost"
    );
}

/// "Consumer identity": two live sources asking for one name got it both.
#[test]
fn two_live_sources_never_share_a_consumer_name() {
    let server = Server::shared();
    let key = unique_key("consumer-lease");
    let mut conn = server.conn();
    xadd(&mut conn, &key, "m", 10);
    let mut a = RedisStreamSource::from_config(fast(&server, &key, "twin")).unwrap();
    let mut b = RedisStreamSource::from_config(fast(&server, &key, "twin")).unwrap();
    a.connect().unwrap();
    b.connect().unwrap();
    assert_eq!(a.consumer(), "twin");
    assert_eq!(b.consumer(), "twin-2");
    // Leases are renewed by monitor ticks, so the names stay apart.
    let until = Instant::now() + Duration::from_millis(700);
    while Instant::now() < until {
        a.monitor().unwrap();
        b.monitor().unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!((a.consumer(), b.consumer()), ("twin", "twin-2"));
    // `a` holds entries; at shutdown it keeps its name in the group for
    // them. `b` holds none: it leaves the group.
    let held = drain(&mut a, 100, 1);
    assert_eq!(held.len(), 10);
    a.shutdown().unwrap();
    b.shutdown().unwrap();
    let names: Vec<Vec<redis::Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(&key)
        .arg("g")
        .query(&mut conn)
        .unwrap();
    let text = format!("{names:?}");
    assert!(text.contains("twin") && !text.contains("twin-2"), "{text}");
    // Its lease is gone with the shutdown: a new source takes the name at
    // once and re-reads the entries.
    let mut c = RedisStreamSource::from_config(fast(&server, &key, "twin")).unwrap();
    c.connect().unwrap();
    assert_eq!(c.consumer(), "twin");
    assert_eq!(drain(&mut c, 100, 3).len(), 10);
}

/// A restarted process that finds its old name still leased takes another
/// one, and adopts the dead name's entries once that lease expires, within
/// seconds rather than after claim_min_idle_ms.
#[test]
fn a_dead_names_entries_are_adopted_once_its_lease_expires() {
    let server = Server::shared();
    let key = unique_key("adopt-dead-name");
    let mut conn = server.conn();
    xadd(&mut conn, &key, "m", 50);
    let slow = |consumer: &str| {
        RedisStreamSource::from_config(RedisStreamConfig {
            claim_min_idle_ms: 60_000,
            ..fast(&server, &key, consumer)
        })
        .unwrap()
    };
    let mut dead = slow("adopt");
    dead.connect().unwrap();
    let held = drain(&mut dead, 100, 1);
    assert_eq!(held.len(), 50);
    drop(dead);
    // One of the dead process's entries is trimmed away: that one is lost.
    let _: i64 = redis::cmd("XDEL")
        .arg(&key)
        .arg(held[7].id.to_string())
        .query(&mut conn)
        .unwrap();
    let ctx = SourceContext::for_tests("adopt");
    let mut heir = slow("adopt");
    heir.setup(&ctx).unwrap();
    heir.connect().unwrap();
    assert_eq!(heir.consumer(), "adopt-2", "the dead lease is still there");
    let mut got = Vec::new();
    await_condition(
        Duration::from_secs(5),
        "the dead name's entries come back",
        || {
            heir.monitor().unwrap();
            let mut batch = Vec::new();
            heir.poll(100, &mut batch).unwrap();
            got.extend(batch);
            got.len() >= 49
        },
    );
    assert!(got.iter().all(|m| m.delivered == 2));
    let ids: HashSet<&MsgId> = got.iter().map(|m| &m.id).collect();
    assert_eq!((got.len(), ids.len()), (49, 49));
    assert!(!ids.contains(&held[7].id));
    heir.flush_metrics();
    assert_eq!(ctx.metrics.snapshot().counter(names::SOURCE_LOST, &[]), 1);
    let text = format!(
        "{:?}",
        redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&key)
            .arg("g")
            .query::<redis::Value>(&mut conn)
            .unwrap()
    );
    assert!(
        !text.contains("\"adopt\""),
        "the emptied dead name left the group: {text}"
    );
}

/// A payload with its key and `tenant` header.
type Keyed = (String, Option<String>, Option<String>);

/// Records each message's key and `tenant` header.
#[derive(Clone, Default)]
struct KeyLog(Arc<Mutex<Vec<Keyed>>>);

impl Task for KeyLog {
    fn name(&self) -> &str {
        "keys"
    }
    fn handle(&mut self, msg: Msg, ctx: &MsgCtx) -> TaskResult {
        self.0.lock().unwrap().push((
            String::from_utf8_lossy(&msg).into_owned(),
            ctx.key_str().map(str::to_string),
            ctx.headers().get_str("tenant").map(str::to_string),
        ));
        Ok(Output::None)
    }
}

#[test]
fn key_field_and_header_fields_set_each_messages_key_and_headers() {
    let server = Server::shared();
    let key = unique_key("keyed");
    let mut conn = server.conn();
    let _: String = redis::cmd("XADD")
        .arg(&key)
        .arg("*")
        .arg("payload")
        .arg("hello")
        .arg("user")
        .arg("alice")
        .arg("tenant")
        .arg("acme")
        .query(&mut conn)
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg(&key)
        .arg("*")
        .arg("payload")
        .arg("bare")
        .query(&mut conn)
        .unwrap();
    let task = KeyLog::default();
    let log = Arc::clone(&task.0);
    let source = RedisStreamSource::from_config(RedisStreamConfig {
        key_field: Some("user".into()),
        header_fields: vec!["tenant".into()],
        ..config(&server, &key)
    })
    .unwrap();
    TestRun::new(
        TopologyBuilder::new("redis-keyed")
            .source(source)
            .pipeline(Pipeline::new().task(task)),
    )
    .until(|s| s.acked >= 2)
    .deadline(Duration::from_secs(30))
    .run()
    .unwrap();
    let mut got = log.lock().unwrap().clone();
    got.sort();
    assert_eq!(
        got,
        [
            ("bare".to_string(), None, None),
            (
                "hello".to_string(),
                Some("alice".to_string()),
                Some("acme".to_string())
            ),
        ]
    );
    assert!(
        RedisStreamSource::from_config(RedisStreamConfig {
            key_field: Some(String::new()),
            ..config(&server, &key)
        })
        .is_err(),
        "an empty key_field is refused"
    );
}
