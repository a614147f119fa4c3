//! The lease on a stream consumer's name, so two live processes never share
//! one consumer.
//!
//! A name is held by the process whose token is stored at
//! `<key>:lease:<group>:<name>` (`SET … NX PX <lease_ttl_ms>`); the holder
//! renews it every monitor tick with [`RENEW_LEASE`], which renews only its
//! own token. A process asking for a held name takes the first free one of
//! `<name>-2`, `<name>-3`, …. The stream source itself decides what a name
//! means for the group (its pending entries); this module knows only keys,
//! tokens and the one script that removes a consumer from its group.

use redis::{Connection, Value};
use tempest_source::SourceError;

use crate::reply;

/// Renews the lease `KEYS[1]` for `ARGV[2]` ms if it still holds this
/// process's token `ARGV[1]`, or takes it again if it expired and nobody
/// took it meanwhile. 1: the name is ours; 0: another process holds it.
const RENEW_LEASE: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
elseif not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

/// Gives up the consumer name `ARGV[2]` of group `ARGV[1]` on stream
/// `KEYS[1]` if its lease `KEYS[2]` holds token `ARGV[3]`: removes the
/// consumer from the group only if it has no pending entries (`XGROUP
/// DELCONSUMER` would discard them), then deletes the lease. 1: removed;
/// 0: kept for its pending entries; -1: the lease was not ours.
const RELEASE_NAME: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[3] then return -1 end
local removed = 0
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
  removed = 1
end
redis.call('DEL', KEYS[2])
return removed
";

/// The most numbered names (`<name>-2` …) tried for a free consumer name.
const MAX_NAME_SUFFIX: u32 = 1000;

/// What became of a name given up with [`Lease::release`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Released {
    /// The consumer had no pending entries and left the group.
    Removed,
    /// The consumer keeps its pending entries in the group.
    Kept,
    /// Another process holds the name: nothing was touched.
    NotOurs,
}

/// This process's lease on a consumer name of one group on one stream.
pub(crate) struct Lease {
    /// The stream's key.
    stream: String,
    group: String,
    /// The name asked for: `consumer` from the config, else the default.
    base: String,
    /// The name held (or to be taken): `base` or `base-N`.
    name: String,
    /// This process's token, unique per source instance.
    token: String,
    held: bool,
    ttl_ms: u64,
    /// "(stream <key> at <uri>)", for errors.
    context: String,
    renew: redis::Script,
    release: redis::Script,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("name", &self.name)
            .field("held", &self.held)
            .finish_non_exhaustive()
    }
}

/// A token no other source instance has: host, process, time and a
/// per-process counter.
fn new_token() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{}:{}:{nanos}:{}",
        tempest_source::metrics::host_name(),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

impl Lease {
    /// A lease, not yet taken, on `base` (or a numbered name after it).
    pub fn new(stream: &str, group: &str, base: String, ttl_ms: u64, uri: &str) -> Lease {
        Lease {
            stream: stream.to_string(),
            group: group.to_string(),
            name: base.clone(),
            base,
            token: new_token(),
            held: false,
            ttl_ms,
            context: format!("(stream {stream} at {uri})"),
            renew: redis::Script::new(RENEW_LEASE),
            release: redis::Script::new(RELEASE_NAME),
        }
    }

    /// The name held (or, before the first [`acquire`](Self::acquire), asked
    /// for).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this process holds the lease on [`name`](Self::name).
    pub fn held(&self) -> bool {
        self.held
    }

    /// The key of the lease on consumer name `name`.
    pub fn key(&self, name: &str) -> String {
        format!("{}:lease:{}:{name}", self.stream, self.group)
    }

    /// Whether `name` is the base name or a numbered `base-N`: the names
    /// processes asking for the base name take.
    pub fn is_family(&self, name: &str) -> bool {
        name == self.base
            || name
                .strip_prefix(self.base.as_str())
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    }

    /// Renews the lease on the name held, or takes a name: the base name if
    /// no live process holds it, else the first free `base-N`. Logs a
    /// warning when the name is not the one asked for, or when another
    /// process took the one held.
    pub fn acquire(&mut self, conn: &mut Option<Connection>) -> Result<(), SourceError> {
        if self.held {
            if self.renew(conn)? {
                return Ok(());
            }
            log::warn!(
                "Another process took the consumer name {} of group {} on stream {} after this one failed to renew its lease in time; this one takes a new name, and entries it had in flight may run twice.",
                self.name,
                self.group,
                self.stream
            );
            self.held = false;
        }
        for n in 1..=MAX_NAME_SUFFIX {
            let name = if n == 1 {
                self.base.clone()
            } else {
                format!("{}-{n}", self.base)
            };
            if self.try_take(conn, &name)? {
                if n > 1 {
                    log::warn!(
                        "The consumer name {} of group {} on stream {} is held by another live process; this one is consumer {name}.",
                        self.base,
                        self.group,
                        self.stream
                    );
                }
                self.name = name;
                self.held = true;
                return Ok(());
            }
        }
        Err(SourceError::failed(format!(
            "no free consumer name in group {} {}: {} and {}-2 to {}-{MAX_NAME_SUFFIX} are all held by live processes (leases {})",
            self.group,
            self.context,
            self.base,
            self.base,
            self.base,
            self.key("<name>")
        )))
    }

    /// `SET <lease> <token> NX PX <ttl>`: whether the name `name` is now
    /// this process's. Also takes a dead consumer's name for a moment, so
    /// that one live process takes over its entries.
    pub fn try_take(&self, conn: &mut Option<Connection>, name: &str) -> Result<bool, SourceError> {
        let cmd = redis::cmd("SET")
            .arg(self.key(name))
            .arg(&self.token)
            .arg("NX")
            .arg("PX")
            .arg(self.ttl_ms)
            .clone();
        let what = format!("taking the lease on consumer name {name} {}", self.context);
        let v = reply::query(conn, &what, &cmd)?;
        Ok(!matches!(v, Value::Nil))
    }

    /// Renews the lease on the name held; `false` if another process holds
    /// it now.
    fn renew(&self, conn: &mut Option<Connection>) -> Result<bool, SourceError> {
        let what = format!(
            "renewing the lease on consumer name {} {}",
            self.name, self.context
        );
        let mut inv = self.renew.key(self.key(&self.name));
        inv.arg(&self.token).arg(self.ttl_ms);
        Ok(reply::invoke::<i64>(conn, &what, inv)? == 1)
    }

    /// Gives up the name `name` (see [`RELEASE_NAME`]), if this process
    /// holds its lease; the name held is then no longer held.
    pub fn release(
        &mut self,
        conn: &mut Option<Connection>,
        name: &str,
    ) -> Result<Released, SourceError> {
        let what = format!("giving up consumer name {name} {}", self.context);
        let mut inv = self.release.key(&self.stream);
        inv.key(self.key(name))
            .arg(&self.group)
            .arg(name)
            .arg(&self.token);
        let released = match reply::invoke::<i64>(conn, &what, inv)? {
            1 => Released::Removed,
            0 => Released::Kept,
            _ => Released::NotOurs,
        };
        if name == self.name {
            self.held = false;
        }
        Ok(released)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_family_is_the_base_name_and_its_numbered_names() {
        let lease = Lease::new("s", "g", "host-app".into(), 5000, "redis://h");
        for yes in ["host-app", "host-app-2", "host-app-17"] {
            assert!(lease.is_family(yes), "{yes}");
        }
        for no in [
            "host-app-",
            "host-app-x",
            "host-app2",
            "host",
            "other-app-2",
            "host-app-2-3",
        ] {
            assert!(!lease.is_family(no), "{no}");
        }
        assert_eq!(lease.key("host-app-2"), "s:lease:g:host-app-2");
        assert_ne!(lease.token, Lease::new("s", "g", "x".into(), 1, "u").token);
    }
}
