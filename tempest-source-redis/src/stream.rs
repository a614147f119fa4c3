//! The Redis Streams consumer-group source.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use redis::streams::StreamInfoGroupsReply;
use redis::{Commands as _, Connection, Value};
use serde::{Deserialize, Serialize};
use tempest_source::metrics::names;
use tempest_source::{
    now_millis, FailedMsg, Metrics, MsgId, Source, SourceContext, SourceError, SourceMsg,
    SourceSettings,
};

use crate::reply::{self, Entry};
use crate::{default_consumer, RedisStreamConfig};

/// What to do with entries idle longer than `claim_min_idle_ms`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PendingAction {
    /// Claim them and run them again (dead-lettering those delivered more
    /// than `max_deliveries` times).
    #[default]
    Claim,
    /// Ack them: drop them.
    Ack,
    /// Ack and `XDEL` them.
    Delete,
}

/// Moves an entry to the dead-letter stream and acks it, only if it is
/// still pending, so it is never both lost and never dead-lettered twice.
const DEAD_LETTER: &str = r"
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #pending == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', 'id', ARGV[2], 'deliveries', ARGV[3], 'reason', ARGV[4], 'payload', ARGV[5])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
";

/// A Redis Streams consumer group as a Tempest source. See the
/// [crate docs](crate).
pub struct RedisStreamSource {
    config: RedisStreamConfig,
    consumer: String,
    conn: Option<Connection>,
    /// After (re)connecting, first re-read this consumer's own pending
    /// entries (id `0`), then new ones (`>`).
    own_pending: bool,
    reclaimed: VecDeque<SourceMsg>,
    script: redis::Script,
    metrics: Option<Metrics>,
    counts: Counts,
}

#[derive(Default)]
struct Counts {
    read: u64,
    acked: u64,
    reclaimed: u64,
    dead_lettered: u64,
    lost: u64,
}

impl std::fmt::Debug for RedisStreamSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamSource")
            .field("key", &self.config.key)
            .field("group", &self.config.group)
            .field("consumer", &self.consumer)
            .field("connected", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}

impl RedisStreamSource {
    /// This consumer's name in the group.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    fn conn(&mut self) -> Result<&mut Connection, SourceError> {
        self.conn
            .as_mut()
            .ok_or_else(|| reply::not_connected("redis stream source"))
    }

    /// Runs `cmd`; a connection error drops the connection so the runtime
    /// reconnects.
    fn query(&mut self, what: &str, cmd: &redis::Cmd) -> Result<Value, SourceError> {
        let result = cmd.query::<Value>(self.conn()?);
        result.map_err(|e| {
            if reply::is_connection_error(&e) {
                self.conn = None;
            }
            reply::source_error(format!("{what} ({})", self.config.uri), e)
        })
    }

    fn push_msg(
        &mut self,
        e: &Entry,
        delivered: u32,
        out: &mut Vec<SourceMsg>,
    ) -> Result<(), SourceError> {
        if e.fields.is_none() {
            self.lost(&e.id)?;
            return Ok(());
        }
        match e.field(&self.config.field) {
            Some(payload) => out.push(SourceMsg {
                id: MsgId::Bytes(Bytes::copy_from_slice(e.id.as_bytes())),
                payload: Bytes::copy_from_slice(payload),
                timestamp: e
                    .id
                    .split('-')
                    .next()
                    .and_then(|ms| ms.parse().ok())
                    .unwrap_or_else(now_millis),
                delivered,
            }),
            None => {
                let reason = format!("the entry has no field \"{}\"", self.config.field);
                self.dead_letter(&e.id, delivered, &reason, b"")?;
            }
        }
        Ok(())
    }

    /// An entry whose data was trimmed away: counted, logged, acked.
    fn lost(&mut self, id: &str) -> Result<(), SourceError> {
        self.counts.lost += 1;
        log::error!(
            "Entry {id} of stream {} was trimmed before it was processed; it is lost.",
            self.config.key
        );
        let cmd = redis::cmd("XACK")
            .arg(&self.config.key)
            .arg(&self.config.group)
            .arg(id)
            .clone();
        self.query("acking a trimmed entry", &cmd).map(drop)
    }

    fn dead_letter(
        &mut self,
        id: &str,
        deliveries: u32,
        reason: &str,
        payload: &[u8],
    ) -> Result<(), SourceError> {
        let dead = self.config.dead_letter_key();
        let mut inv = self.script.key(&self.config.key);
        inv.key(&dead)
            .arg(&self.config.group)
            .arg(id)
            .arg(deliveries)
            .arg(reason)
            .arg(payload);
        match reply::invoke::<i64>(&mut self.conn, "dead-lettering an entry", inv)? {
            1 => {
                self.counts.dead_lettered += 1;
                log::warn!(
                    "Entry {id} of stream {} went to {dead}: {reason}.",
                    self.config.key
                );
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Delivery counts of this consumer's pending entries between `first`
    /// and `last`.
    fn delivery_counts(
        &mut self,
        first: &str,
        last: &str,
        n: usize,
    ) -> Result<Vec<(String, u32)>, SourceError> {
        let cmd = redis::cmd("XPENDING")
            .arg(&self.config.key)
            .arg(&self.config.group)
            .arg(first)
            .arg(last)
            .arg(n)
            .arg(&self.consumer)
            .clone();
        let v = self.query("reading pending entries", &cmd)?;
        Ok(reply::items(&v)
            .iter()
            .filter_map(|p| {
                let p = reply::items(p);
                Some((reply::text(p.first()?)?, reply::int(p.get(3)?)? as u32))
            })
            .collect())
    }

    /// Reclaims entries idle longer than `claim_min_idle_ms` (from any
    /// consumer, this one included) per `on_pending`.
    fn reclaim(&mut self) -> Result<(), SourceError> {
        let mut cursor = "0-0".to_string();
        let limit = self.config.count * 10;
        let mut seen = 0;
        loop {
            let cmd = redis::cmd("XAUTOCLAIM")
                .arg(&self.config.key)
                .arg(&self.config.group)
                .arg(&self.consumer)
                .arg(self.config.claim_min_idle_ms)
                .arg(&cursor)
                .arg("COUNT")
                .arg(self.config.count)
                .clone();
            let v = self.query("reclaiming idle entries", &cmd)?;
            let parts = reply::items(&v);
            let next = parts
                .first()
                .and_then(reply::text)
                .unwrap_or_else(|| "0-0".into());
            let claimed = parts.get(1).map(reply::entries).unwrap_or_default();
            for id in parts.get(2).map(reply::items).unwrap_or(&[]) {
                if let Some(id) = reply::text(id) {
                    self.counts.lost += 1;
                    log::error!(
                        "Pending entry {id} of stream {} was trimmed before it was processed; it is lost.",
                        self.config.key
                    );
                }
            }
            seen += claimed.len();
            if !claimed.is_empty() {
                self.handle_claimed(claimed)?;
            }
            if next == "0-0" || seen >= limit {
                return Ok(());
            }
            cursor = next;
        }
    }

    fn handle_claimed(&mut self, claimed: Vec<Entry>) -> Result<(), SourceError> {
        let ids: Vec<&str> = claimed.iter().map(|e| e.id.as_str()).collect();
        match self.config.on_pending {
            PendingAction::Ack | PendingAction::Delete => {
                let mut ack = redis::cmd("XACK");
                ack.arg(&self.config.key).arg(&self.config.group).arg(&ids);
                self.query("acking idle entries", &ack)?;
                if self.config.on_pending == PendingAction::Delete {
                    let mut del = redis::cmd("XDEL");
                    del.arg(&self.config.key).arg(&ids);
                    self.query("deleting idle entries", &del)?;
                }
                log::warn!(
                    "{} idle entr(y/ies) of stream {} dropped (on_pending = {:?}).",
                    ids.len(),
                    self.config.key,
                    self.config.on_pending
                );
                Ok(())
            }
            PendingAction::Claim => {
                let (first, last) = (ids[0].to_string(), ids[ids.len() - 1].to_string());
                let counts = self.delivery_counts(&first, &last, claimed.len() * 2)?;
                let mut out = Vec::new();
                for e in &claimed {
                    let delivered = counts
                        .iter()
                        .find(|(id, _)| *id == e.id)
                        .map(|(_, n)| *n)
                        .unwrap_or(2);
                    if delivered > self.config.max_deliveries {
                        let payload = e.field(&self.config.field).unwrap_or_default().to_vec();
                        let reason = format!(
                            "delivered {delivered} times, more than max_deliveries = {}",
                            self.config.max_deliveries
                        );
                        self.dead_letter(&e.id, delivered, &reason, &payload)?;
                    } else {
                        self.push_msg(e, delivered, &mut out)?;
                    }
                }
                self.counts.reclaimed += out.len() as u64;
                self.reclaimed.extend(out);
                Ok(())
            }
        }
    }
}

impl Source for RedisStreamSource {
    type Config = RedisStreamConfig;

    fn name(&self) -> &str {
        "redis-stream"
    }

    fn from_config(config: RedisStreamConfig) -> Result<Self, SourceError> {
        config.validate()?;
        let consumer = config.consumer.clone().unwrap_or_else(default_consumer);
        Ok(RedisStreamSource {
            config,
            consumer,
            conn: None,
            own_pending: true,
            reclaimed: VecDeque::new(),
            script: redis::Script::new(DEAD_LETTER),
            metrics: None,
            counts: Counts::default(),
        })
    }

    fn settings(&self) -> SourceSettings {
        let c = &self.config;
        SourceSettings {
            poll_count: c.count,
            poll_interval: Duration::from_millis(c.poll_interval_ms),
            max_backoff: Duration::from_millis(c.max_backoff_ms.max(c.poll_interval_ms)),
            ack_policy: c.ack_policy,
            ack_interval: Duration::from_millis(c.ack_interval_ms.max(1)),
            monitor_interval: Duration::from_millis((c.claim_min_idle_ms / 2).clamp(100, 10_000)),
            // A stream id names exactly one entry.
            unique_ids: true,
        }
    }

    fn setup(&mut self, ctx: &SourceContext) -> Result<(), SourceError> {
        self.metrics = Some(ctx.metrics.clone());
        Ok(())
    }

    fn connect(&mut self) -> Result<(), SourceError> {
        self.conn = Some(reply::connect(&self.config.uri, self.config.block_ms)?);
        let create = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.config.key)
            .arg(&self.config.group)
            .arg(&self.config.group_start_id)
            .arg("MKSTREAM")
            .clone();
        match create.query::<Value>(self.conn()?) {
            Ok(_) => log::info!(
                "Created consumer group {} on stream {} from {}.",
                self.config.group,
                self.config.key,
                self.config.group_start_id
            ),
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => {
                self.conn = None;
                return Err(reply::source_error(
                    format!("creating the consumer group ({})", self.config.uri),
                    e,
                ));
            }
        }
        self.own_pending = true;
        self.reclaim()?;
        Ok(())
    }

    fn healthy(&self) -> bool {
        self.conn.is_some()
    }

    fn poll(&mut self, max: usize, out: &mut Vec<SourceMsg>) -> Result<(), SourceError> {
        let start = out.len();
        while out.len() - start < max {
            let Some(m) = self.reclaimed.pop_front() else {
                break;
            };
            out.push(m);
        }
        let room = max - (out.len() - start);
        if room == 0 {
            return Ok(());
        }
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.config.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(room.min(self.config.count));
        if !self.own_pending && out.len() == start {
            cmd.arg("BLOCK").arg(self.config.block_ms);
        }
        cmd.arg("STREAMS")
            .arg(&self.config.key)
            .arg(if self.own_pending { "0" } else { ">" });
        let v = match self.query("reading the stream", &cmd) {
            Ok(v) => v,
            Err(e) => {
                if let SourceError::Failed { what, .. } = &e {
                    if what.contains("NOGROUP") {
                        // The stream or group was deleted: recreate both.
                        self.conn = None;
                        return Err(SourceError::unavailable(
                            what.clone(),
                            std::io::Error::other("NOGROUP"),
                        ));
                    }
                }
                return Err(e);
            }
        };
        let entries = reply::read_group(&v);
        if self.own_pending && entries.is_empty() {
            self.own_pending = false;
        }
        let delivered = if self.own_pending { 2 } else { 1 };
        for e in &entries {
            self.push_msg(e, delivered, out)?;
        }
        self.counts.read += (out.len() - start) as u64;
        Ok(())
    }

    fn ack(&mut self, id: &MsgId) -> Result<(), SourceError> {
        self.batch_ack(std::slice::from_ref(id))
    }

    fn batch_ack(&mut self, ids: &[MsgId]) -> Result<(), SourceError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("XACK");
        cmd.arg(&self.config.key).arg(&self.config.group);
        for id in ids {
            match id {
                MsgId::Bytes(b) => cmd.arg(b.as_ref()),
                MsgId::Int(n) => cmd.arg(n.to_string()),
            };
        }
        self.query("acking entries", &cmd)?;
        self.counts.acked += ids.len() as u64;
        Ok(())
    }

    fn fail(&mut self, msgs: &[FailedMsg]) -> Result<(), SourceError> {
        // They stay pending: reclaimed after claim_min_idle_ms, dead-lettered
        // after max_deliveries.
        log::debug!("{} entr(y/ies) left pending for redelivery.", msgs.len());
        Ok(())
    }

    fn monitor(&mut self) -> Result<(), SourceError> {
        if self.conn.is_some() {
            self.reclaim()?;
        }
        Ok(())
    }

    fn flush_metrics(&mut self) {
        if let Some(m) = &self.metrics {
            let c = std::mem::take(&mut self.counts);
            m.incr("tempest.redis.read", c.read);
            m.incr("tempest.redis.acked", c.acked);
            m.incr("tempest.redis.reclaimed", c.reclaimed);
            m.incr(names::SOURCE_DEAD_LETTERED, c.dead_lettered);
            m.incr(names::SOURCE_LOST, c.lost);
            if let Some(conn) = self.conn.as_mut() {
                let key = &self.config.key;
                match conn.xinfo_groups::<_, StreamInfoGroupsReply>(key) {
                    Ok(reply) => {
                        // `lag` is known from Redis 7 on, and unknown after
                        // some deletions: then there is no gauge.
                        let lag = reply
                            .groups
                            .iter()
                            .find(|g| g.name == self.config.group)
                            .and_then(|g| g.lag);
                        if let Some(lag) = lag {
                            m.gauge(names::SOURCE_LAG, lag as i64);
                        }
                    }
                    Err(e) => log::debug!("XINFO GROUPS {key} for the lag gauge failed: {e}."),
                }
            }
        }
    }
}
