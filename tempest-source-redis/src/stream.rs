//! The Redis Streams consumer-group source.
//!
//! What the source keeps besides the connection:
//!
//! - **In flight:** the ids it delivered and the runtime has neither acked
//!   nor failed (at most the runtime's `max_pending`, plus reclaimed entries
//!   waiting for a poll). Every monitor tick resets their idle time with
//!   `XCLAIM … 0 <ids> JUSTID` (which does not raise their delivery count),
//!   so no consumer, this one included, reclaims an entry that is still
//!   being processed.
//! - **Its name:** a lease `<key>:lease:<group>:<consumer>` (see
//!   `lease.rs`), renewed every monitor tick, so two live processes never
//!   share a consumer; the pending entries of a dead name of the same
//!   family are taken over once its lease has expired.
//! - **A cursor over its own pending entries:** after (re)connecting it
//!   walks its own pending-entries list once, past the last id listed each
//!   time, then reads new entries (`>`).

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::streams::StreamInfoGroupsReply;
use redis::{Commands as _, Connection, Value};
use serde::{Deserialize, Serialize};
use tempest_source::metrics::names;
use tempest_source::{
    now_millis, AckPolicy, FailedMsg, Headers, Metrics, MsgId, Source, SourceContext, SourceError,
    SourceMsg, SourceSettings,
};

use crate::inflight::InFlight;
use crate::lease::{Lease, Released};
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

/// Claims for `ARGV[3]` those of the entries `ARGV[4..]` of group `ARGV[1]`
/// on stream `KEYS[1]` that consumer `ARGV[2]` still holds (so an entry
/// another consumer took meanwhile stays with it), raising each delivery
/// count by one. Returns `{entries, {id, delivery count, …}}`; an id counted
/// but not among the entries was trimmed away (the claim dropped it).
const CLAIM_FROM: &str = r"
local claim, counts = {}, {}
for i = 4, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #p == 1 then
    claim[#claim + 1] = ARGV[i]
    counts[#counts + 1] = ARGV[i]
    counts[#counts + 1] = p[1][4] + 1
  end
end
local entries = {}
for first = 1, #claim, 500 do
  local got = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0,
    unpack(claim, first, math.min(first + 499, #claim)))
  for _, e in ipairs(got) do entries[#entries + 1] = e end
end
return {entries, counts}
";

/// Ids per `XCLAIM … JUSTID` when refreshing the entries in flight.
const REFRESH_CHUNK: usize = 1000;

/// Where a walk over a pending-entries list starts.
const PEL_START: &str = "-";

/// A Redis Streams consumer group as a Tempest source. See the
/// [crate docs](crate).
pub struct RedisStreamSource {
    config: RedisStreamConfig,
    /// The consumer name and this process's lease on it.
    lease: Lease,
    conn: Option<Connection>,
    /// While walking this consumer's own pending entries after
    /// (re)connecting: where the next `XPENDING` starts (`-`, then
    /// `(<last id listed>`). `None` once the walk is over: read `>`.
    own_cursor: Option<String>,
    /// Ids delivered and neither acked nor failed yet.
    inflight: InFlight,
    /// Whether to track `inflight` (not with `ack_policy = "none"`: nothing
    /// is ever acked).
    track: bool,
    reclaimed: VecDeque<SourceMsg>,
    next_reclaim: Instant,
    dead_letter_script: redis::Script,
    claim_script: redis::Script,
    metrics: Option<Metrics>,
    counts: Counts,
}

#[derive(Default)]
struct Counts {
    read: u64,
    acked: u64,
    reclaimed: u64,
    redelivered: u64,
    dead_lettered: u64,
    lost: u64,
}

impl std::fmt::Debug for RedisStreamSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamSource")
            .field("key", &self.config.key)
            .field("group", &self.config.group)
            .field("consumer", &self.lease.name())
            .field("connected", &self.conn.is_some())
            .field("inflight", &self.inflight.len())
            .finish_non_exhaustive()
    }
}

impl RedisStreamSource {
    /// This consumer's name in the group: the configured (or default) name,
    /// or `<name>-N` when another live process holds that name.
    pub fn consumer(&self) -> &str {
        self.lease.name()
    }

    /// The key of the lease on consumer name `name`:
    /// `<key>:lease:<group>:<name>`.
    pub fn lease_key(&self, name: &str) -> String {
        self.lease.key(name)
    }

    /// How many delivered entries are neither acked nor failed yet.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    fn conn(&mut self) -> Result<&mut Connection, SourceError> {
        self.conn
            .as_mut()
            .ok_or_else(|| reply::not_connected("redis stream source"))
    }

    /// Drops the connection after a connection error, so the runtime
    /// reconnects.
    fn redis_error(&mut self, what: &str, e: redis::RedisError) -> SourceError {
        if reply::is_connection_error(&e) {
            self.conn = None;
        }
        reply::source_error(self.what(what), e)
    }

    /// Runs `cmd`; a connection error drops the connection so the runtime
    /// reconnects.
    fn query(&mut self, what: &str, cmd: &redis::Cmd) -> Result<Value, SourceError> {
        let result = cmd.query::<Value>(self.conn()?);
        result.map_err(|e| self.redis_error(what, e))
    }

    /// Runs a pipeline in one round trip.
    fn query_pipe(
        &mut self,
        what: &str,
        pipe: &redis::Pipeline,
    ) -> Result<Vec<Value>, SourceError> {
        let result = pipe.query::<Vec<Value>>(self.conn()?);
        result.map_err(|e| self.redis_error(what, e))
    }

    /// `what`, naming the stream and the server, for an error.
    fn what(&self, what: &str) -> String {
        format!("{what} (stream {} at {})", self.config.key, self.config.uri)
    }

    /// Hands `e` to the runtime (in `out`) as delivered `delivered` times,
    /// tracking it as in flight; an entry whose data was trimmed away is
    /// lost, one without the payload field dead-lettered.
    fn push_msg(
        &mut self,
        e: &Entry,
        delivered: u32,
        out: &mut Vec<SourceMsg>,
    ) -> Result<(), SourceError> {
        if e.fields.is_none() {
            self.lost(&[e.id.as_str()])?;
            return Ok(());
        }
        match e.field(&self.config.field) {
            Some(payload) => {
                if self.track && !self.inflight.insert(e.id.as_bytes()) {
                    log::warn!(
                        "Entry id {} of stream {} is not a stream id; it is not kept fresh while in flight.",
                        e.id,
                        self.config.key
                    );
                }
                let key = self
                    .config
                    .key_field
                    .as_deref()
                    .and_then(|f| e.field(f))
                    .map(Bytes::copy_from_slice);
                let mut headers = Headers::new();
                for name in &self.config.header_fields {
                    if let Some(value) = e.field(name) {
                        if let Err(err) =
                            headers.insert(name.as_str(), Bytes::copy_from_slice(value))
                        {
                            log::warn!(
                                "Entry {} of stream {}: {err}; header left out.",
                                e.id,
                                self.config.key
                            );
                        }
                    }
                }
                out.push(SourceMsg {
                    id: MsgId::Bytes(Bytes::copy_from_slice(e.id.as_bytes())),
                    payload: Bytes::copy_from_slice(payload),
                    timestamp: e
                        .id
                        .split('-')
                        .next()
                        .and_then(|ms| ms.parse().ok())
                        .unwrap_or_else(now_millis),
                    delivered,
                    key,
                    headers,
                });
            }
            None => {
                let reason = format!("the entry has no field \"{}\"", self.config.field);
                self.dead_letter(&e.id, delivered, &reason, b"")?;
            }
        }
        Ok(())
    }

    /// Delivers a pending entry again, or dead-letters it once it has been
    /// delivered more than `max_deliveries` times; true if delivered.
    fn redeliver(
        &mut self,
        e: &Entry,
        delivered: u32,
        out: &mut Vec<SourceMsg>,
    ) -> Result<bool, SourceError> {
        if delivered > self.config.max_deliveries {
            let payload = e.field(&self.config.field).unwrap_or_default().to_vec();
            let reason = format!(
                "delivered {delivered} times, more than max_deliveries = {}",
                self.config.max_deliveries
            );
            self.dead_letter(&e.id, delivered, &reason, &payload)?;
            return Ok(false);
        }
        self.push_msg(e, delivered, out)?;
        Ok(true)
    }

    /// Entries whose data was trimmed away before they were processed:
    /// counted, logged, acked (one round trip).
    fn lost(&mut self, ids: &[&str]) -> Result<(), SourceError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.counts.lost += ids.len() as u64;
        for id in ids {
            log::error!(
                "Entry {id} of stream {} was trimmed before it was processed; it is lost.",
                self.config.key
            );
        }
        let mut cmd = redis::cmd("XACK");
        cmd.arg(&self.config.key).arg(&self.config.group).arg(ids);
        self.query("acking trimmed entries", &cmd).map(drop)
    }

    fn dead_letter(
        &mut self,
        id: &str,
        deliveries: u32,
        reason: &str,
        payload: &[u8],
    ) -> Result<(), SourceError> {
        let dead = self.config.dead_letter_key();
        let mut inv = self.dead_letter_script.key(&self.config.key);
        inv.key(&dead)
            .arg(&self.config.group)
            .arg(id)
            .arg(deliveries)
            .arg(reason)
            .arg(payload);
        let what = self.what("dead-lettering an entry");
        match reply::invoke::<i64>(&mut self.conn, &what, inv)? {
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

    /// Delivery counts of the pending entries `ids`, one `XPENDING` each,
    /// in one round trip.
    fn delivery_counts(&mut self, ids: &[&str]) -> Result<HashMap<String, u32>, SourceError> {
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("XPENDING")
                .arg(&self.config.key)
                .arg(&self.config.group)
                .arg(*id)
                .arg(*id)
                .arg(1);
        }
        let replies = self.query_pipe("reading delivery counts", &pipe)?;
        Ok(replies
            .iter()
            .filter_map(|r| reply::items(r).first().and_then(reply::pending_entry))
            .collect())
    }

    /// Resets the idle time of every entry in flight here (`XCLAIM … 0
    /// <ids> JUSTID`, which does not raise the delivery count), in chunks,
    /// in one round trip.
    fn refresh_inflight(&mut self) -> Result<(), SourceError> {
        if self.inflight.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        let mut in_chunk = 0;
        for id in self.inflight.iter() {
            if in_chunk == 0 {
                pipe.cmd("XCLAIM")
                    .arg(&self.config.key)
                    .arg(&self.config.group)
                    .arg(self.lease.name())
                    .arg(0);
            }
            // An id is at most 41 bytes: formatted on the stack.
            let mut buf = [0u8; 48];
            let mut rest = &mut buf[..];
            if write!(rest, "{id}").is_ok() {
                let len = 48 - rest.len();
                pipe.arg(&buf[..len]);
            }
            in_chunk += 1;
            if in_chunk == REFRESH_CHUNK {
                pipe.arg("JUSTID").ignore();
                in_chunk = 0;
            }
        }
        if in_chunk > 0 {
            pipe.arg("JUSTID").ignore();
        }
        self.query_pipe("resetting the idle time of entries in flight", &pipe)
            .map(drop)
    }

    /// Lists up to `n` pending entries of consumer `owner` after `cursor`,
    /// claims those not in flight here and still `owner`'s for this consumer
    /// ([`CLAIM_FROM`]: `XCLAIM`, which raises each delivery count by one:
    /// this is their redelivery) and hands them out with their real
    /// delivery count, dead-lettering those delivered more than
    /// `max_deliveries` times. Returns where the next
    /// walk starts, `None` when `owner` has no more pending entries.
    fn take_pending(
        &mut self,
        owner: &str,
        cursor: &str,
        n: usize,
        out: &mut Vec<SourceMsg>,
    ) -> Result<Option<String>, SourceError> {
        let cmd = redis::cmd("XPENDING")
            .arg(&self.config.key)
            .arg(&self.config.group)
            .arg(cursor)
            .arg("+")
            .arg(n.max(1))
            .arg(owner)
            .clone();
        let v = self.query("listing pending entries", &cmd)?;
        // The delivery counts listed here may be stale by the claim: the
        // claim reads them again, atomically with it.
        let listed: Vec<String> = reply::items(&v)
            .iter()
            .filter_map(|p| reply::pending_entry(p).map(|(id, _)| id))
            .collect();
        let Some(last) = listed.last() else {
            return Ok(None);
        };
        let next = format!("({last}");
        let wanted: Vec<String> = listed
            .into_iter()
            .filter(|id| !self.inflight.contains(id.as_bytes()))
            .collect();
        if wanted.is_empty() {
            return Ok(Some(next));
        }
        let what = self.what("claiming pending entries");
        let mut inv = self.claim_script.key(&self.config.key);
        inv.arg(&self.config.group)
            .arg(owner)
            .arg(self.lease.name());
        for id in &wanted {
            inv.arg(id);
        }
        let v = reply::invoke::<Value>(&mut self.conn, &what, inv)?;
        let parts = reply::items(&v);
        let mut entries: HashMap<String, Entry> = parts
            .first()
            .map(reply::entries)
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.id.clone(), e))
            .collect();
        let counts: HashMap<String, u32> = parts
            .get(1)
            .map(reply::items)
            .unwrap_or(&[])
            .chunks(2)
            .filter_map(|p| {
                let id = reply::text(p.first()?)?;
                let n = u32::try_from(reply::int(p.get(1)?)?).ok()?;
                Some((id, n))
            })
            .collect();
        for id in &wanted {
            // Not counted: no longer `owner`'s (acked, or taken by another
            // consumer meanwhile); nothing to do.
            let Some(&delivered) = counts.get(id) else {
                continue;
            };
            let Some(e) = entries.remove(id) else {
                self.counts.lost += 1;
                log::error!(
                    "Pending entry {id} of stream {} was trimmed before it was processed; it is lost.",
                    self.config.key
                );
                continue;
            };
            if self.redeliver(&e, delivered, out)? {
                self.counts.redelivered += 1;
            }
        }
        Ok(Some(next))
    }

    /// Takes over the pending entries of consumers of this name family
    /// (`base`, `base-N`) that hold no lease: their process is gone, so they
    /// run again now rather than after `claim_min_idle_ms`. The dead name's
    /// lease is taken first, so one live process takes them, and only
    /// while nobody holds the name; a name left without pending entries is
    /// removed from the group.
    fn adopt_dead_names(&mut self) -> Result<(), SourceError> {
        let cmd = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&self.config.key)
            .arg(&self.config.group)
            .clone();
        let v = self.query("listing the group's consumers", &cmd)?;
        let dead: Vec<(String, i64)> = reply::items(&v)
            .iter()
            .filter_map(|c| {
                let name = reply::text(reply::field(c, "name")?)?;
                let pending = reply::int(reply::field(c, "pending")?)?;
                Some((name, pending))
            })
            .filter(|(name, pending)| {
                *pending > 0 && name != self.lease.name() && self.lease.is_family(name)
            })
            .collect();
        let limit = self.config.count.saturating_mul(10);
        let mut taken = 0;
        for (name, pending) in dead {
            if taken >= limit {
                break;
            }
            if !self.lease.try_take(&mut self.conn, &name)? {
                continue;
            }
            log::info!(
                "Consumer {name} of group {} on stream {} holds no lease, so its process is gone; consumer {} takes over its {pending} pending entries now.",
                self.config.group,
                self.config.key,
                self.lease.name()
            );
            let mut out = Vec::new();
            let mut cursor = Some(PEL_START.to_string());
            let mut result = Ok(());
            while let Some(at) = cursor.take() {
                if taken >= limit {
                    break;
                }
                match self.take_pending(&name, &at, self.config.count, &mut out) {
                    Ok(next) => cursor = next,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
                taken += out.len();
                self.reclaimed.extend(out.drain(..));
            }
            result?;
            if self.lease.release(&mut self.conn, &name)? == Released::Removed {
                log::info!(
                    "Removed consumer {name}, now without pending entries, from group {} on stream {}.",
                    self.config.group,
                    self.config.key
                );
            }
        }
        Ok(())
    }

    /// Reclaims entries idle longer than `claim_min_idle_ms` (from any
    /// consumer; never those in flight here, whose idle time
    /// [`refresh_inflight`](Self::refresh_inflight) keeps fresh) per
    /// `on_pending`.
    fn reclaim(&mut self) -> Result<(), SourceError> {
        let mut cursor = "0-0".to_string();
        let limit = self.config.count * 10;
        let mut seen = 0;
        loop {
            let cmd = redis::cmd("XAUTOCLAIM")
                .arg(&self.config.key)
                .arg(&self.config.group)
                .arg(self.lease.name())
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
                let Some(id) = reply::text(id) else { continue };
                if self.inflight.contains(id.as_bytes()) {
                    // Trimmed while it is being processed here: it is not
                    // lost, and its ack will find nothing to do.
                    log::debug!(
                        "Entry {id} of stream {} was trimmed while in flight.",
                        self.config.key
                    );
                    continue;
                }
                self.counts.lost += 1;
                log::error!(
                    "Pending entry {id} of stream {} was trimmed before it was processed; it is lost.",
                    self.config.key
                );
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
        // An entry still in flight here (its refresh came too late) is not
        // handed out a second time.
        let claimed: Vec<Entry> = claimed
            .into_iter()
            .filter(|e| !self.inflight.contains(e.id.as_bytes()))
            .collect();
        if claimed.is_empty() {
            return Ok(());
        }
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
                let counts = self.delivery_counts(&ids)?;
                let mut out = Vec::new();
                for e in &claimed {
                    // XAUTOCLAIM raised the count; it is at least 2.
                    let delivered = counts.get(&e.id).copied().unwrap_or(2);
                    self.redeliver(e, delivered, &mut out)?;
                }
                self.counts.reclaimed += out.len() as u64;
                self.reclaimed.extend(out);
                Ok(())
            }
        }
    }

    /// Walks this consumer's own pending entries, past the last id listed
    /// each time, until one batch is handed out or the walk is over.
    fn read_own_pending(
        &mut self,
        room: usize,
        out: &mut Vec<SourceMsg>,
    ) -> Result<(), SourceError> {
        while let Some(cursor) = self.own_cursor.take() {
            let before = out.len();
            let me = self.lease.name().to_string();
            match self.take_pending(&me, &cursor, room.min(self.config.count), out) {
                Ok(next) => self.own_cursor = next,
                Err(e) => {
                    self.own_cursor = Some(cursor);
                    return Err(e);
                }
            }
            if self.own_cursor.is_none() {
                log::info!(
                    "Consumer {} re-read its pending entries of stream {}; reading new entries now.",
                    self.lease.name(),
                    self.config.key
                );
            }
            if out.len() > before {
                break;
            }
        }
        Ok(())
    }

    /// How often idle entries are reclaimed: half of `claim_min_idle_ms`,
    /// from 100 ms to 10 s.
    fn reclaim_interval(&self) -> Duration {
        Duration::from_millis((self.config.claim_min_idle_ms / 2).clamp(100, 10_000))
    }

    fn untrack(&mut self, id: &MsgId) {
        match id {
            MsgId::Bytes(b) => self.inflight.remove(b),
            // Stream ids are never numbers: nothing was tracked.
            MsgId::Int(_) => {}
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
        let base = config.consumer.clone().unwrap_or_else(default_consumer);
        Ok(RedisStreamSource {
            lease: Lease::new(
                &config.key,
                &config.group,
                base,
                config.lease_ttl_ms,
                &config.uri,
            ),
            conn: None,
            own_cursor: Some(PEL_START.to_string()),
            inflight: InFlight::default(),
            track: config.ack_policy != AckPolicy::None,
            reclaimed: VecDeque::new(),
            next_reclaim: Instant::now(),
            dead_letter_script: redis::Script::new(DEAD_LETTER),
            claim_script: redis::Script::new(CLAIM_FROM),
            metrics: None,
            counts: Counts::default(),
            config,
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
            monitor_interval: Duration::from_millis(c.monitor_interval_ms),
            // A stream id names exactly one entry.
            unique_ids: true,
            // First reads come with 1; an entry read again (claimed, or
            // re-read from the consumer's pending list) with its pending
            // count, or 2 where it is unknown.
            counts_deliveries: true,
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
                    format!(
                        "creating the consumer group {} on stream {} ({})",
                        self.config.group, self.config.key, self.config.uri
                    ),
                    e,
                ));
            }
        }
        self.lease.acquire(&mut self.conn)?;
        log::info!(
            "Reading stream {} as consumer {} of group {}.",
            self.config.key,
            self.lease.name(),
            self.config.group
        );
        // Entries still in flight from before a reconnect: keep them (and
        // move them to this name, should it have changed).
        self.refresh_inflight()?;
        self.own_cursor = Some(PEL_START.to_string());
        self.adopt_dead_names()?;
        self.reclaim()?;
        self.next_reclaim = Instant::now() + self.reclaim_interval();
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
        if self.own_cursor.is_some() && out.len() - start < max {
            let room = max - (out.len() - start);
            self.read_own_pending(room, out)?;
        }
        let room = max - (out.len() - start);
        if room == 0 || self.own_cursor.is_some() {
            self.counts.read += (out.len() - start) as u64;
            return Ok(());
        }
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.config.group)
            .arg(self.lease.name())
            .arg("COUNT")
            .arg(room.min(self.config.count));
        if out.len() == start {
            cmd.arg("BLOCK").arg(self.config.block_ms);
        }
        cmd.arg("STREAMS").arg(&self.config.key).arg(">");
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
        for e in &reply::read_group(&v) {
            self.push_msg(e, 1, out)?;
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
            // No longer in flight, acked or not: should this XACK fail, the
            // entry ages and is reclaimed after claim_min_idle_ms.
            self.untrack(id);
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
        // They stay pending and age: reclaimed after claim_min_idle_ms,
        // dead-lettered after max_deliveries.
        for m in msgs {
            self.untrack(&m.id);
        }
        log::debug!("{} entr(y/ies) left pending for redelivery.", msgs.len());
        Ok(())
    }

    fn monitor(&mut self) -> Result<(), SourceError> {
        if self.conn.is_none() {
            return Ok(());
        }
        // First keep what is in flight here from being reclaimed, then the
        // name; only then reclaim what is idle.
        self.refresh_inflight()?;
        // Renews the lease; should another process hold the name now, takes
        // a new one (and warns).
        let old = self.lease.name().to_string();
        self.lease.acquire(&mut self.conn)?;
        if self.lease.name() != old {
            self.refresh_inflight()?;
            self.own_cursor = Some(PEL_START.to_string());
        }
        self.adopt_dead_names()?;
        let now = Instant::now();
        if now >= self.next_reclaim {
            self.next_reclaim = now + self.reclaim_interval();
            self.reclaim()?;
        }
        Ok(())
    }

    fn shutdown(&mut self) -> Result<(), SourceError> {
        if self.conn.is_none() || !self.lease.held() {
            return Ok(());
        }
        let name = self.lease.name().to_string();
        match self.lease.release(&mut self.conn, &name)? {
            Released::Removed => log::info!(
                "Consumer {name} left group {} on stream {} with nothing pending.",
                self.config.group,
                self.config.key
            ),
            Released::Kept => log::info!(
                "Consumer {name} of group {} on stream {} keeps its pending entries for the next process to take its name.",
                self.config.group,
                self.config.key
            ),
            Released::NotOurs => log::warn!(
                "Consumer {name} of group {} on stream {} was held by another process at shutdown; it was left alone.",
                self.config.group,
                self.config.key
            ),
        }
        Ok(())
    }

    fn flush_metrics(&mut self) {
        if let Some(m) = &self.metrics {
            let c = std::mem::take(&mut self.counts);
            m.incr("tempest.redis.read", c.read);
            m.incr("tempest.redis.acked", c.acked);
            m.incr("tempest.redis.reclaimed", c.reclaimed);
            m.incr("tempest.redis.redelivered", c.redelivered);
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
