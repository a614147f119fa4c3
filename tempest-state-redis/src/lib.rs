//! A Redis [`StateBackend`] for Tempest: each keyed store of a task is a
//! Redis hash, `<prefix>:<topology>:<task>/<store>`, one field per key.
//!
//! A checkpoint is one `MULTI`/`EXEC` transaction (`HSET` of the changed
//! keys, `HDEL` of the removed ones), so after a crash either all of a
//! checkpoint is in Redis or none of it; a load is one `HMGET`. Values are
//! the runtime's encoding of the task's values (postcard).
//!
//! It records applied updates, for
//! [at-most-once updates](tempest::TopologyBuilder::at_most_once_updates),
//! in one sorted set, `<prefix>:<topology>:applied`: the checkpoint adds
//! its updates' records (`ZADD`) in the same transaction, a load asks for
//! the batch's updates in the same round trip (`ZMSCORE`, Redis 6.2 or
//! later), and the topology drops an acked source message's records with
//! one `ZREMRANGEBYLEX` each, pipelined per ack batch.
//!
//! ```no_run
//! # fn main() -> Result<(), tempest::StateError> {
//! use tempest_state_redis::RedisState;
//! let backend = RedisState::open("redis://127.0.0.1:6379/", "wordcount")?;
//! let builder = tempest::TopologyBuilder::new("wordcount").state_backend(backend);
//! # Ok(()) }
//! ```

use std::time::Duration;

use bytes::Bytes;
use tempest::source::MsgId;
use tempest::{Changes, Loaded, StateBackend, StateError, UpdateId};

/// Keyed state in Redis hashes. See the [crate docs](crate).
pub struct RedisState {
    prefix: String,
    /// Connections, opened on first use (one per thread using it at once,
    /// up to [`POOL_SIZE`]), dropped when broken.
    pool: r2d2::Pool<redis::Client>,
}

/// The most connections one backend opens.
const POOL_SIZE: u32 = 16;

impl std::fmt::Debug for RedisState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: only the prefix is shown.
        f.debug_struct("RedisState")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisState {
    /// A backend on the Redis at `url`, its hashes named
    /// `tempest-state:<topology>:<task>/<store>`. Connects on first use.
    pub fn open(url: &str, topology: &str) -> Result<Self, StateError> {
        Self::with_prefix(url, &format!("tempest-state:{topology}"))
    }

    /// A backend whose hashes are named `<prefix>:<task>/<store>`.
    pub fn with_prefix(url: &str, prefix: &str) -> Result<Self, StateError> {
        let client = redis::Client::open(url).map_err(|e| {
            StateError::new(
                prefix,
                format!("bad Redis URL: {}", redacted(&e.to_string())),
            )
        })?;
        let pool = r2d2::Pool::builder()
            .max_size(POOL_SIZE)
            .min_idle(Some(0))
            // A round trip less per call: a broken connection shows as an
            // error, and is dropped then.
            .test_on_check_out(false)
            .connection_timeout(Duration::from_secs(5))
            .build_unchecked(client);
        Ok(RedisState {
            prefix: prefix.to_string(),
            pool,
        })
    }

    /// The Redis key of store `store`.
    pub fn key_of(&self, store: &str) -> String {
        format!("{}:{store}", self.prefix)
    }

    /// The Redis key of the records of applied updates (at-most-once
    /// updates): a sorted set, every score 0, one member per update and
    /// store ([`UpdateId::record`]), so that a source message's records
    /// are one range of members.
    pub fn applied_key(&self) -> String {
        format!("{}:applied", self.prefix)
    }

    /// Runs `f` on a connection of the pool (opening one if need be).
    fn with_conn<T>(
        &self,
        store: &str,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StateError> {
        let mut conn = self.pool.get().map_err(|e| {
            StateError::new(
                store,
                format!("cannot connect to Redis: {}", redacted(&e.to_string())),
            )
        })?;
        // A connection an I/O error closed is dropped by the pool when
        // it comes back (`has_broken`); one that got a Redis error is fine.
        f(&mut conn).map_err(|e| StateError::new(store, format!("Redis: {e}")))
    }
}

/// `e` with any `user:password@` of a URL in it cut out.
fn redacted(e: &str) -> String {
    match (e.find("://"), e.rfind('@')) {
        (Some(a), Some(b)) if a < b => format!("{}://***{}", &e[..a], &e[b..]),
        _ => e.to_string(),
    }
}

impl StateBackend for RedisState {
    fn load(
        &self,
        store: &str,
        keys: &[Bytes],
        updates: &[UpdateId],
    ) -> Result<Loaded, StateError> {
        if keys.is_empty() && updates.is_empty() {
            return Ok(Loaded::default());
        }
        let key = self.key_of(store);
        let applied_key = self.applied_key();
        let (values, scores): (Vec<Option<Vec<u8>>>, Vec<Option<f64>>) =
            self.with_conn(store, |c| {
                let mut pipe = redis::pipe();
                // One transaction: the values and the records are read as
                // of one moment (no other process's commit between them).
                pipe.atomic();
                if !keys.is_empty() {
                    let cmd = pipe.cmd("HMGET").arg(&key);
                    for k in keys {
                        cmd.arg(&k[..]);
                    }
                }
                if !updates.is_empty() {
                    let cmd = pipe.cmd("ZMSCORE").arg(&applied_key);
                    for u in updates {
                        cmd.arg(u.record(store));
                    }
                }
                let mut answers: Vec<redis::Value> = pipe.query(c)?;
                let take = |v: Option<redis::Value>| -> redis::RedisResult<redis::Value> {
                    Ok(v.unwrap_or(redis::Value::Array(Vec::new())))
                };
                let scores = if updates.is_empty() {
                    Vec::new()
                } else {
                    redis::from_redis_value(take(answers.pop())?)?
                };
                let values = if keys.is_empty() {
                    Vec::new()
                } else {
                    redis::from_redis_value(take(answers.pop())?)?
                };
                Ok((values, scores))
            })?;
        if values.len() != keys.len() || scores.len() != updates.len() {
            return Err(StateError::new(
                store,
                format!(
                    "Redis answered {} values and {} update records for {} keys and {} updates",
                    values.len(),
                    scores.len(),
                    keys.len(),
                    updates.len()
                ),
            ));
        }
        Ok(Loaded {
            values: values.into_iter().map(|v| v.map(Bytes::from)).collect(),
            applied: scores.into_iter().map(|s| s.is_some()).collect(),
        })
    }

    fn commit(&self, store: &str, changes: &Changes<'_>) -> Result<(), StateError> {
        if changes.is_empty() {
            return Ok(());
        }
        let key = self.key_of(store);
        let applied_key = self.applied_key();
        self.with_conn(store, |c| {
            let mut pipe = redis::pipe();
            pipe.atomic();
            if !changes.puts.is_empty() {
                let cmd = pipe.cmd("HSET").arg(&key);
                for (k, v) in changes.puts {
                    cmd.arg(&k[..]).arg(&v[..]);
                }
                cmd.ignore();
            }
            if !changes.removes.is_empty() {
                let cmd = pipe.cmd("HDEL").arg(&key);
                for k in changes.removes {
                    cmd.arg(&k[..]);
                }
                cmd.ignore();
            }
            if !changes.applied.is_empty() {
                let cmd = pipe.cmd("ZADD").arg(&applied_key);
                for u in changes.applied {
                    cmd.arg(0).arg(u.record(store));
                }
                cmd.ignore();
            }
            pipe.query::<()>(c)
        })
    }

    fn records_updates(&self) -> bool {
        true
    }

    fn forget(&self, sources: &[MsgId]) -> Result<(), StateError> {
        if sources.is_empty() {
            return Ok(());
        }
        let applied_key = self.applied_key();
        self.with_conn("applied updates", |c| {
            let mut pipe = redis::pipe();
            for id in sources {
                let prefix = UpdateId::source_prefix(id);
                // Every record of the message starts with its prefix and
                // goes on with a store's name, UTF-8, which never holds
                // 0xff: the records sort between `prefix` and `prefix ff`.
                let mut from = Vec::with_capacity(prefix.len() + 1);
                from.push(b'[');
                from.extend_from_slice(&prefix);
                let mut to = Vec::with_capacity(prefix.len() + 2);
                to.push(b'(');
                to.extend_from_slice(&prefix);
                to.push(0xff);
                pipe.cmd("ZREMRANGEBYLEX")
                    .arg(&applied_key)
                    .arg(from)
                    .arg(to)
                    .ignore();
            }
            pipe.query::<()>(c)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_cut_out_of_errors() {
        assert_eq!(
            redacted("bad url redis://user:secret@host:6379/"),
            "bad url redis://***@host:6379/"
        );
        assert_eq!(redacted("no url here"), "no url here");
    }
}
