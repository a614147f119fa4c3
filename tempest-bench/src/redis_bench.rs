//! The Redis scenario: a stream pre-filled with 100-byte entries consumed
//! by the linear topology (batched acks), beside a raw `XREADGROUP COUNT
//! 1000` + `XACK` loop against the same server.

use std::time::{Duration, Instant};

use anyhow::bail;
use tempest::standalone::{self, RunOptions};
use tempest::{FailurePolicy, TopologyBuilder};
use tempest_source::{AckPolicy, Source};
use tempest_source_redis::{RedisStreamConfig, RedisStreamSource};

use crate::{pipeline, Shape};

/// The server the scenario runs against.
pub type RedisServer = tempest_source_redis::test_server::TestServer;

fn conn(server: &RedisServer) -> anyhow::Result<redis::Connection> {
    Ok(server.connection()?)
}

/// Appends `n` entries with 100-byte payloads to a fresh stream; returns its key.
pub fn prefill(server: &RedisServer, n: u64, tag: &str) -> anyhow::Result<String> {
    let key = format!(
        "tempest-bench:{tag}:{}:{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    );
    let mut conn = conn(server)?;
    let payload = "x".repeat(100);
    let mut sent = 0;
    while sent < n {
        let k = 1000.min(n - sent);
        let mut pipe = redis::pipe();
        for _ in 0..k {
            pipe.cmd("XADD")
                .arg(&key)
                .arg("*")
                .arg("payload")
                .arg(&payload)
                .ignore();
        }
        pipe.query::<()>(&mut conn)?;
        sent += k;
    }
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&key)
        .arg("g")
        .arg("0")
        .query::<()>(&mut conn)?;
    Ok(key)
}

fn pending(server: &RedisServer, key: &str) -> anyhow::Result<i64> {
    let v: redis::Value = redis::cmd("XPENDING")
        .arg(key)
        .arg("g")
        .query(&mut conn(server)?)?;
    Ok(match v {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => 0,
        },
        _ => 0,
    })
}

/// The raw loop: `XREADGROUP COUNT 1000` then one `XACK` for the batch,
/// until `n` entries are acked. Returns entries per second.
pub fn raw_loop(server: &RedisServer, key: &str, n: u64) -> anyhow::Result<f64> {
    let mut conn = conn(server)?;
    let started = Instant::now();
    let mut acked = 0u64;
    while acked < n {
        let v: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("raw")
            .arg("COUNT")
            .arg(1000)
            .arg("STREAMS")
            .arg(key)
            .arg(">")
            .query(&mut conn)?;
        let ids = entry_ids(&v);
        if ids.is_empty() {
            bail!("the stream ran dry after {acked} of {n} entries");
        }
        let k: u64 = redis::cmd("XACK")
            .arg(key)
            .arg("g")
            .arg(&ids)
            .query(&mut conn)?;
        acked += k;
    }
    if pending(server, key)? != 0 {
        bail!("the raw loop left entries pending");
    }
    Ok(acked as f64 / started.elapsed().as_secs_f64().max(1e-9))
}

fn entry_ids(v: &redis::Value) -> Vec<Vec<u8>> {
    use redis::Value;
    let streams = match v {
        Value::Array(a) => a,
        _ => return Vec::new(),
    };
    let Some(Value::Array(stream)) = streams.first() else {
        return Vec::new();
    };
    let Some(Value::Array(entries)) = stream.get(1) else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|e| match e {
            Value::Array(parts) => match parts.first() {
                Some(Value::BulkString(id)) => Some(id.clone()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// The linear topology, standalone, on the stream, until `n` entries are
/// acked at the source (XPENDING 0). Returns entries per second.
pub fn topology(server: &RedisServer, key: &str, n: u64) -> anyhow::Result<f64> {
    let source = RedisStreamSource::from_config(RedisStreamConfig {
        consumer: Some("tempest".into()),
        count: 1000,
        block_ms: 10,
        ack_policy: AckPolicy::Batch(1000),
        ack_interval_ms: 1,
        ..RedisStreamConfig::new(server.url.clone(), key, "g")
    })?;
    let topology = TopologyBuilder::new("bench-redis")
        .source(source)
        .pipeline(pipeline(Shape::Linear))
        .failure_policy(FailurePolicy::None)
        .msg_timeout(Duration::from_secs(600))
        .build()?;
    let started = Instant::now();
    let report = standalone::run(
        topology,
        RunOptions {
            until: Some(Box::new(move |s| s.acked >= n)),
            deadline: Some(Duration::from_secs(600)),
            ..RunOptions::default()
        },
    )?;
    let elapsed = started.elapsed();
    if report.stats.acked < n {
        bail!("only {} of {n} entries acked", report.stats.acked);
    }
    let left = pending(server, key)?;
    if left != 0 {
        bail!("{left} entries left pending");
    }
    Ok(report.stats.acked as f64 / elapsed.as_secs_f64().max(1e-9))
}

/// Deletes a benchmark stream.
pub fn drop_stream(server: &RedisServer, key: &str) -> anyhow::Result<()> {
    redis::cmd("DEL")
        .arg(key)
        .query::<i64>(&mut conn(server)?)?;
    Ok(())
}

/// `rounds` interleaved runs of the raw loop and the topology, each on a
/// fresh stream of `n` entries; returns their rates.
pub fn compare(n: u64, rounds: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let server = RedisServer::shared()?;
    let (mut raw, mut top) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        eprintln!("round {}/{rounds}: redis raw loop", round + 1);
        let key = prefill(&server, n, "raw")?;
        raw.push(raw_loop(&server, &key, n)?);
        drop_stream(&server, &key)?;
        eprintln!("round {}/{rounds}: redis topology", round + 1);
        let key = prefill(&server, n, "topology")?;
        top.push(topology(&server, &key, n)?);
        drop_stream(&server, &key)?;
    }
    Ok((raw, top))
}
