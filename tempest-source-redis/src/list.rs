//! The reliable-list source: `LMOVE`/`BLMOVE` to a per-consumer processing
//! list, ack by `LREM`.

use std::time::Duration;

use bytes::Bytes;
use redis::{Connection, Value};
use serde::{Deserialize, Serialize};
use tempest_source::metrics::names;
use tempest_source::{
    now_millis, AckPolicy, Metrics, MsgId, Source, SourceContext, SourceError, SourceMsg,
    SourceSettings,
};

use crate::default_consumer;
use crate::reply::{self, invoke};

/// The list source's configuration (`[source.config]`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RedisListConfig {
    /// The server, e.g. `redis://127.0.0.1:6379`.
    pub uri: String,
    /// The list producers push to (`LPUSH`); messages are taken from its
    /// right end, oldest first.
    pub key: String,
    /// This consumer's name; by default stable per host and program.
    #[serde(default)]
    pub consumer: Option<String>,
    /// Messages per poll.
    #[serde(default = "default_count")]
    pub count: usize,
    /// How long a poll waits for a message when the list is empty, in
    /// milliseconds.
    #[serde(default = "default_block_ms")]
    pub block_ms: u64,
    /// How completed messages are acked.
    #[serde(default = "default_ack_policy")]
    pub ack_policy: AckPolicy,
    /// The longest a partial ack batch waits, in milliseconds.
    #[serde(default = "default_ack_interval_ms")]
    pub ack_interval_ms: u64,
    /// Dead-letter a message delivered more than this many times.
    #[serde(default = "default_max_deliveries")]
    pub max_deliveries: u32,
    /// The dead-letter list; by default `<key>:dead`.
    #[serde(default)]
    pub dead_letter_key: Option<String>,
    /// The wait after an empty poll, in milliseconds.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// The longest wait between polls while empty or failing, in
    /// milliseconds.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

fn default_count() -> usize {
    100
}
fn default_block_ms() -> u64 {
    100
}
fn default_ack_policy() -> AckPolicy {
    AckPolicy::Batch(100)
}
fn default_ack_interval_ms() -> u64 {
    10
}
fn default_max_deliveries() -> u32 {
    5
}
fn default_poll_interval_ms() -> u64 {
    1
}
fn default_max_backoff_ms() -> u64 {
    1000
}

impl RedisListConfig {
    /// A config with defaults for everything but the server and the key.
    pub fn new(uri: impl Into<String>, key: impl Into<String>) -> Self {
        RedisListConfig {
            uri: uri.into(),
            key: key.into(),
            consumer: None,
            count: default_count(),
            block_ms: default_block_ms(),
            ack_policy: default_ack_policy(),
            ack_interval_ms: default_ack_interval_ms(),
            max_deliveries: default_max_deliveries(),
            dead_letter_key: None,
            poll_interval_ms: default_poll_interval_ms(),
            max_backoff_ms: default_max_backoff_ms(),
        }
    }

    /// Sets `consumer`.
    pub fn consumer(mut self, name: impl Into<String>) -> Self {
        self.consumer = Some(name.into());
        self
    }

    /// Sets `dead_letter_key`.
    pub fn dead_letter(mut self, key: impl Into<String>) -> Self {
        self.dead_letter_key = Some(key.into());
        self
    }

    crate::setters! {
        /// Sets `count`: messages per poll.
        count: usize,
        /// Sets `block_ms`.
        block_ms: u64,
        /// Sets `ack_policy`.
        ack_policy: AckPolicy,
        /// Sets `ack_interval_ms`.
        ack_interval_ms: u64,
        /// Sets `max_deliveries`.
        max_deliveries: u32,
        /// Sets `poll_interval_ms`.
        poll_interval_ms: u64,
        /// Sets `max_backoff_ms`.
        max_backoff_ms: u64,
    }

    /// The dead-letter list's key.
    pub fn dead_letter_key(&self) -> String {
        self.dead_letter_key
            .clone()
            .unwrap_or_else(|| format!("{}:dead", self.key))
    }

    fn validate(&self) -> Result<(), SourceError> {
        let mut problems = Vec::new();
        crate::check_uri(&self.uri, &mut problems);
        if self.key.is_empty() {
            problems.push("key must not be empty".to_string());
        }
        if self.count == 0 {
            problems.push("count must be at least 1".to_string());
        }
        if self.max_deliveries == 0 {
            problems.push("max_deliveries must be at least 1".to_string());
        }
        if let AckPolicy::Batch(0) = self.ack_policy {
            problems.push("ack_policy batch size must be at least 1".to_string());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SourceError::config(format!(
                "redis list source: {}",
                problems.join("; ")
            )))
        }
    }
}

/// Moves up to ARGV[1] messages to the processing list, counting each
/// delivery; returns [message, deliveries, …].
const TAKE: &str = r"
local out = {}
for i = 1, tonumber(ARGV[1]) do
  local v = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not v then break end
  out[#out + 1] = v
  out[#out + 1] = redis.call('HINCRBY', KEYS[3], v, 1)
end
return out
";

/// Counts one more delivery of each message left in the processing list.
const RECOVER: &str = r"
local out = {}
local items = redis.call('LRANGE', KEYS[1], ARGV[1], ARGV[2])
for _, v in ipairs(items) do
  out[#out + 1] = v
  out[#out + 1] = redis.call('HINCRBY', KEYS[2], v, 1)
end
return out
";

/// Acks: removes each message from the processing list.
const ACK: &str = r"
for _, v in ipairs(ARGV) do
  if redis.call('LREM', KEYS[1], 1, v) == 1 and redis.call('LPOS', KEYS[1], v) == false then
    redis.call('HDEL', KEYS[2], v)
  end
end
return #ARGV
";

/// Dead-letters a message still in the processing list, exactly once.
const DEAD_LETTER: &str = r"
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[1])
if redis.call('LPOS', KEYS[1], ARGV[1]) == false then redis.call('HDEL', KEYS[3], ARGV[1]) end
return 1
";

/// A Redis list as a reliable queue. See the [crate docs](crate).
///
/// Lists have no message ids: a message is identified by its bytes, so
/// identical messages in flight at once share one delivery count.
pub struct RedisListSource {
    config: RedisListConfig,
    processing: String,
    deliveries: String,
    conn: Option<Connection>,
    /// Next index of the processing list to redeliver after a (re)start.
    recovering: Option<isize>,
    take: redis::Script,
    recover: redis::Script,
    ack_script: redis::Script,
    dead: redis::Script,
    metrics: Option<Metrics>,
    dead_lettered: u64,
}

impl std::fmt::Debug for RedisListSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisListSource")
            .field("key", &self.config.key)
            .field("processing", &self.processing)
            .field("connected", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}

impl RedisListSource {
    /// The processing list holding this consumer's unacked messages.
    pub fn processing_key(&self) -> &str {
        &self.processing
    }

    fn conn(&mut self) -> Result<&mut Connection, SourceError> {
        self.conn
            .as_mut()
            .ok_or_else(|| reply::not_connected("redis list source"))
    }

    fn deliver(&mut self, pairs: &Value, out: &mut Vec<SourceMsg>) -> Result<(), SourceError> {
        let items = reply::items(pairs);
        let now = now_millis();
        for pair in items.chunks(2) {
            let (Some(payload), Some(count)) = (
                pair.first().and_then(reply::bytes),
                pair.get(1).and_then(reply::int),
            ) else {
                continue;
            };
            let delivered = count.max(1) as u32;
            if delivered > self.config.max_deliveries {
                let dead = self.config.dead_letter_key();
                let (processing, deliveries) = (self.processing.clone(), self.deliveries.clone());
                let mut inv = self.dead.key(&processing);
                inv.key(&dead).key(&deliveries).arg(payload);
                let moved: i64 = invoke(&mut self.conn, "dead-lettering a message", inv)?;
                if moved == 1 {
                    self.dead_lettered += 1;
                    log::warn!(
                        "A message of list {} was delivered {delivered} times; moved to {dead}.",
                        self.config.key
                    );
                }
                continue;
            }
            let payload = Bytes::copy_from_slice(payload);
            out.push(SourceMsg {
                id: MsgId::Bytes(payload.clone()),
                payload,
                timestamp: now,
                delivered,
                key: None,
                headers: Default::default(),
            });
        }
        Ok(())
    }
}

impl Source for RedisListSource {
    type Config = RedisListConfig;

    fn name(&self) -> &str {
        "redis-list"
    }

    fn from_config(config: RedisListConfig) -> Result<Self, SourceError> {
        config.validate()?;
        let consumer = config.consumer.clone().unwrap_or_else(default_consumer);
        let processing = format!("{}:processing:{consumer}", config.key);
        Ok(RedisListSource {
            deliveries: format!("{processing}:deliveries"),
            processing,
            config,
            conn: None,
            recovering: Some(0),
            take: redis::Script::new(TAKE),
            recover: redis::Script::new(RECOVER),
            ack_script: redis::Script::new(ACK),
            dead: redis::Script::new(DEAD_LETTER),
            metrics: None,
            dead_lettered: 0,
        })
    }

    fn setup(&mut self, ctx: &SourceContext) -> Result<(), SourceError> {
        self.metrics = Some(ctx.metrics.clone());
        Ok(())
    }

    fn settings(&self) -> SourceSettings {
        let c = &self.config;
        SourceSettings {
            poll_count: c.count,
            poll_interval: Duration::from_millis(c.poll_interval_ms),
            max_backoff: Duration::from_millis(c.max_backoff_ms.max(c.poll_interval_ms)),
            ack_policy: c.ack_policy,
            ack_interval: Duration::from_millis(c.ack_interval_ms.max(1)),
            ..SourceSettings::default()
        }
    }

    fn connect(&mut self) -> Result<(), SourceError> {
        self.conn = Some(reply::connect(&self.config.uri, self.config.block_ms)?);
        self.recovering = Some(0);
        Ok(())
    }

    fn healthy(&self) -> bool {
        self.conn.is_some()
    }

    fn poll(&mut self, max: usize, out: &mut Vec<SourceMsg>) -> Result<(), SourceError> {
        let n = max.min(self.config.count);
        if let Some(from) = self.recovering {
            let (processing, deliveries) = (self.processing.clone(), self.deliveries.clone());
            let mut inv = self.recover.key(&processing);
            inv.key(&deliveries).arg(from).arg(from + n as isize - 1);
            let v: Value = invoke(&mut self.conn, "redelivering the processing list", inv)?;
            let found = reply::items(&v).len() / 2;
            self.recovering = (found == n).then_some(from + n as isize);
            if found > 0 {
                log::info!(
                    "Redelivering {found} message(s) left in {}.",
                    self.processing
                );
            }
            return self.deliver(&v, out);
        }
        let (key, processing, deliveries) = (
            self.config.key.clone(),
            self.processing.clone(),
            self.deliveries.clone(),
        );
        let mut inv = self.take.key(&key);
        inv.key(&processing).key(&deliveries).arg(n);
        let v: Value = invoke(&mut self.conn, "taking messages", inv)?;
        if !reply::items(&v).is_empty() {
            return self.deliver(&v, out);
        }
        // Nothing there: wait for one message.
        let block = redis::cmd("BLMOVE")
            .arg(&key)
            .arg(&processing)
            .arg("RIGHT")
            .arg("LEFT")
            .arg(self.config.block_ms as f64 / 1000.0)
            .clone();
        let got = block.query::<Value>(self.conn()?).map_err(|e| {
            if reply::is_connection_error(&e) {
                self.conn = None;
            }
            reply::source_error("waiting for a message", e)
        })?;
        let Some(payload) = reply::bytes(&got).map(<[u8]>::to_vec) else {
            return Ok(());
        };
        let count = redis::cmd("HINCRBY")
            .arg(&deliveries)
            .arg(&payload)
            .arg(1)
            .clone();
        let c = count
            .query::<i64>(self.conn()?)
            .map_err(|e| reply::source_error("counting a delivery", e))?;
        self.deliver(
            &Value::Array(vec![Value::BulkString(payload), Value::Int(c)]),
            out,
        )
    }

    fn ack(&mut self, id: &MsgId) -> Result<(), SourceError> {
        self.batch_ack(std::slice::from_ref(id))
    }

    fn batch_ack(&mut self, ids: &[MsgId]) -> Result<(), SourceError> {
        if ids.is_empty() {
            return Ok(());
        }
        let (processing, deliveries) = (self.processing.clone(), self.deliveries.clone());
        let mut inv = self.ack_script.key(&processing);
        inv.key(&deliveries);
        for id in ids {
            match id {
                MsgId::Bytes(b) => inv.arg(b.as_ref()),
                MsgId::Int(n) => inv.arg(n.to_string()),
            };
        }
        invoke::<i64>(&mut self.conn, "acking messages", inv).map(drop)
    }

    fn monitor(&mut self) -> Result<(), SourceError> {
        // Messages the runtime gave up on stay in the processing list; they
        // are delivered again after the next (re)connect.
        Ok(())
    }

    fn flush_metrics(&mut self) {
        let Some(m) = self.metrics.clone() else {
            return;
        };
        m.incr(
            names::SOURCE_DEAD_LETTERED,
            std::mem::take(&mut self.dead_lettered),
        );
        if let Some(conn) = self.conn.as_mut() {
            match redis::cmd("LLEN").arg(&self.config.key).query::<i64>(conn) {
                Ok(waiting) => m.gauge(names::SOURCE_LAG, waiting),
                Err(e) => log::debug!("LLEN {} for the lag gauge failed: {e}.", self.config.key),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_urls_are_refused_at_validation_naming_key_and_value() {
        let text = RedisListConfig::new("rediss://h:6380", "jobs")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("uri \"rediss://h:6380\"") && text.contains("TLS"),
            "{text}"
        );
        RedisListConfig::new("redis://h", "jobs")
            .validate()
            .unwrap();
    }
}
