//! A Redis [`StateBackend`] for Tempest: each keyed store of a task is a
//! Redis hash, `<prefix>:<topology>:<task>/<store>`, one field per key.
//!
//! A checkpoint is one `MULTI`/`EXEC` transaction (`HSET` of the changed
//! keys, `HDEL` of the removed ones), so after a crash either all of a
//! checkpoint is in Redis or none of it; a load is one `HMGET`. Values are
//! the runtime's encoding of the task's values (postcard).
//!
//! ```no_run
//! # fn main() -> Result<(), tempest::StateError> {
//! use tempest_state_redis::RedisState;
//! let backend = RedisState::open("redis://127.0.0.1:6379/", "wordcount")?;
//! let builder = tempest::TopologyBuilder::new("wordcount").state_backend(backend);
//! # Ok(()) }
//! ```

use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use tempest::{StateBackend, StateError};

/// Keyed state in Redis hashes. See the [crate docs](crate).
pub struct RedisState {
    client: redis::Client,
    prefix: String,
    /// One connection, opened on first use and again after an error.
    conn: Mutex<Option<redis::Connection>>,
}

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
        Ok(RedisState {
            client,
            prefix: prefix.to_string(),
            conn: Mutex::new(None),
        })
    }

    /// The Redis key of store `store`.
    pub fn key_of(&self, store: &str) -> String {
        format!("{}:{store}", self.prefix)
    }

    /// Runs `f` on the connection (opening one if need be); a failure
    /// drops the connection, so the next call opens a fresh one.
    fn with_conn<T>(
        &self,
        store: &str,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StateError> {
        let mut guard = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if guard.is_none() {
            let conn = self
                .client
                .get_connection_with_timeout(std::time::Duration::from_secs(5))
                .map_err(|e| StateError::new(store, format!("cannot connect to Redis: {e}")))?;
            *guard = Some(conn);
        }
        let Some(conn) = guard.as_mut() else {
            return Err(StateError::new(store, "no Redis connection"));
        };
        match f(conn) {
            Ok(v) => Ok(v),
            Err(e) => {
                *guard = None;
                Err(StateError::new(store, format!("Redis: {e}")))
            }
        }
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
    fn load(&self, store: &str, keys: &[Bytes]) -> Result<Vec<Option<Bytes>>, StateError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let key = self.key_of(store);
        let values: Vec<Option<Vec<u8>>> = self.with_conn(store, |c| {
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(&key);
            for k in keys {
                cmd.arg(&k[..]);
            }
            cmd.query(c)
        })?;
        if values.len() != keys.len() {
            return Err(StateError::new(
                store,
                format!(
                    "HMGET answered {} values for {} keys",
                    values.len(),
                    keys.len()
                ),
            ));
        }
        Ok(values.into_iter().map(|v| v.map(Bytes::from)).collect())
    }

    fn commit(
        &self,
        store: &str,
        puts: &[(Bytes, Bytes)],
        removes: &[Bytes],
    ) -> Result<(), StateError> {
        if puts.is_empty() && removes.is_empty() {
            return Ok(());
        }
        let key = self.key_of(store);
        self.with_conn(store, |c| {
            let mut pipe = redis::pipe();
            pipe.atomic();
            if !puts.is_empty() {
                let cmd = pipe.cmd("HSET").arg(&key);
                for (k, v) in puts {
                    cmd.arg(&k[..]).arg(&v[..]);
                }
                cmd.ignore();
            }
            if !removes.is_empty() {
                let cmd = pipe.cmd("HDEL").arg(&key);
                for k in removes {
                    cmd.arg(&k[..]);
                }
                cmd.ignore();
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
