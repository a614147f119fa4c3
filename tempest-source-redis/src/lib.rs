//! Redis sources for Tempest.
//!
//! This crate depends on `tempest-source` and the `redis` crate only, never
//! on the runtime.
//!
//! - [`RedisStreamSource`]: a Redis Streams consumer group. Reads with
//!   `XREADGROUP … BLOCK`, acks with one `XACK` per batch, dead-letters
//!   entries delivered more than `max_deliveries` times to `<key>:dead`,
//!   atomically. Its guarantees:
//!   - **After a crash** the restarted process walks its own pending entries
//!     once (a cursor past the last id listed), then reads new ones: an
//!     entry runs at most once more than it had when the process died, so
//!     the duplicates of a crash are at most the entries pending at the
//!     crash (`XPENDING` right after it), and a redelivery raises an entry's
//!     delivery count by exactly one (the count reported is the real one,
//!     read with `XPENDING`).
//!   - **In flight is never reclaimed:** every monitor tick
//!     (`monitor_interval_ms`) resets the idle time of the entries it holds
//!     in flight (`XCLAIM … JUSTID`, which leaves their delivery count
//!     alone), so `XAUTOCLAIM` (after `claim_min_idle_ms`, which must be at
//!     least 3 × (`monitor_interval_ms` + `block_ms`)) takes only entries of
//!     dead consumers and entries the runtime gave up on.
//!   - **One name, one process:** the consumer name is leased in Redis
//!     (`<key>:lease:<group>:<consumer>`, `lease_ttl_ms`, renewed every
//!     monitor tick). A second live process asking for a held name takes
//!     `<name>-2`, `<name>-3`, …; once a dead process's lease expires, a live
//!     process of the same name family takes over its pending entries (or a
//!     restarted one its name), seconds after the crash. A consumer leaves
//!     the group only without pending entries (clean shutdown).
//! - [`RedisListSource`]: the reliable-queue pattern on a list: `BLMOVE`
//!   to a per-consumer processing list, ack by `LREM`, redelivery of what
//!   was left in the processing list at start, the same dead-letter rule.
//!
//! Inside: `stream` is the stream source, `lease` its consumer-name lease,
//! `inflight` the ids it holds in flight; `list` is the list source;
//! `reply` reads Redis replies without panicking; [`test_server`] starts a
//! redis-server for tests.
//!
//! Both reconnect with backoff when the server goes away (they report the
//! error as retryable and `healthy()` turns false until they are back).
//! `rediss://` (TLS) addresses are refused by `validate()`: the `redis`
//! crate is built without a TLS backend.
//!
//! ```
//! use tempest_source_redis::RedisStreamConfig;
//!
//! let config: RedisStreamConfig = toml::from_str(r#"
//!     uri = "redis://127.0.0.1:6379"
//!     key = "events"
//!     group = "tempest"
//! "#).unwrap();
//! config.validate().unwrap();
//! assert_eq!(config.count, 1000);
//! assert_eq!(config.monitor_interval_ms, 1000);
//!
//! let tls = RedisStreamConfig { uri: "rediss://cache:6380".into(), ..config.clone() };
//! assert!(tls.validate().unwrap_err().to_string().contains("rediss://cache:6380"));
//! let eager = config.claim_min_idle_ms(1000u64);
//! assert!(eager.validate().unwrap_err().to_string().contains("claim_min_idle_ms = 1000"));
//! ```

/// Chainable setters for config fields: `config.count(10).block_ms(5)`.
macro_rules! setters {
    ($($(#[$doc:meta])* $field:ident: $ty:ty),* $(,)?) => {
        $(
            $(#[$doc])*
            pub fn $field(mut self, value: impl Into<$ty>) -> Self {
                self.$field = value.into();
                self
            }
        )*
    };
}
pub(crate) use setters;

mod inflight;
mod lease;
mod list;
mod reply;
mod stream;
pub mod test_server;

pub use list::{RedisListConfig, RedisListSource};
pub use stream::{PendingAction, RedisStreamSource};

use serde::{Deserialize, Serialize};
use tempest_source::{AckPolicy, SourceError};

/// The Redis Streams source's configuration (`[source.config]`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RedisStreamConfig {
    /// The server, e.g. `redis://127.0.0.1:6379`.
    pub uri: String,
    /// The stream's key.
    pub key: String,
    /// The consumer group.
    pub group: String,
    /// This consumer's name in the group; by default host and program name.
    /// The source takes a lease on the name in Redis; when a live process
    /// already holds it (two processes of one package on one host, or one
    /// configured name used twice), it takes the first free name of
    /// `<name>-2`, `<name>-3`, … instead and logs a warning.
    #[serde(default)]
    pub consumer: Option<String>,
    /// Entries per `XREADGROUP`.
    #[serde(default = "default_count")]
    pub count: usize,
    /// How long one `XREADGROUP` blocks, in milliseconds.
    #[serde(default = "default_block_ms")]
    pub block_ms: u64,
    /// Where a new group starts: `$` (new entries only) or `0` (everything).
    #[serde(default = "default_group_start_id")]
    pub group_start_id: String,
    /// How completed entries are acked.
    #[serde(default = "default_ack_policy")]
    pub ack_policy: AckPolicy,
    /// The longest a partial ack batch waits, in milliseconds.
    #[serde(default = "default_ack_interval_ms")]
    pub ack_interval_ms: u64,
    /// Reclaim entries idle longer than this from dead consumers, in
    /// milliseconds. Must be at least 3 × (`monitor_interval_ms` +
    /// `block_ms`), so the entries a live consumer holds in flight (whose
    /// idle time it resets every monitor tick) are never reclaimed.
    #[serde(default = "default_claim_min_idle_ms")]
    pub claim_min_idle_ms: u64,
    /// How often the source resets the idle time of the entries it holds
    /// in flight and renews its lease on its consumer name, in milliseconds.
    #[serde(default = "default_monitor_interval_ms")]
    pub monitor_interval_ms: u64,
    /// How long the lease on the consumer name lasts without renewal, in
    /// milliseconds: after a crash, a restarted process takes the name (and
    /// re-reads its pending entries) this long after the crash at the
    /// latest. Must be at least 3 × (`monitor_interval_ms` + `block_ms`).
    #[serde(default = "default_lease_ttl_ms")]
    pub lease_ttl_ms: u64,
    /// Dead-letter an entry delivered more than this many times.
    #[serde(default = "default_max_deliveries")]
    pub max_deliveries: u32,
    /// The dead-letter stream; by default `<key>:dead`.
    #[serde(default)]
    pub dead_letter_key: Option<String>,
    /// The wait after an empty read, in milliseconds.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// The longest wait between reads while empty or failing, in
    /// milliseconds.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// The entry field that holds the message (default `payload`). An
    /// entry without it is dead-lettered.
    #[serde(default = "default_field")]
    pub field: String,
    /// The entry field whose value becomes the message's key (which every
    /// task message derived from it inherits); none by default. An entry
    /// without the field has no key.
    #[serde(default)]
    pub key_field: Option<String>,
    /// Entry fields copied into the message's headers, under their own
    /// names (at most 32); fields an entry lacks are skipped.
    #[serde(default)]
    pub header_fields: Vec<String>,
    /// What to do with entries idle longer than `claim_min_idle_ms`:
    /// `claim` them and run them again (default), `ack` them (drop), or
    /// `delete` them (ack and XDEL).
    #[serde(default)]
    pub on_pending: PendingAction,
}

fn default_field() -> String {
    "payload".to_string()
}
fn default_count() -> usize {
    1000
}
fn default_block_ms() -> u64 {
    100
}
fn default_group_start_id() -> String {
    "$".to_string()
}
fn default_ack_policy() -> AckPolicy {
    AckPolicy::Batch(1000)
}
fn default_ack_interval_ms() -> u64 {
    10
}
fn default_claim_min_idle_ms() -> u64 {
    60_000
}
fn default_monitor_interval_ms() -> u64 {
    1_000
}
fn default_lease_ttl_ms() -> u64 {
    5_000
}
fn default_max_deliveries() -> u32 {
    5
}
fn default_poll_interval_ms() -> u64 {
    1
}
fn default_max_backoff_ms() -> u64 {
    1_000
}

impl RedisStreamConfig {
    /// A config with defaults for everything but the server, key and group.
    pub fn new(uri: impl Into<String>, key: impl Into<String>, group: impl Into<String>) -> Self {
        RedisStreamConfig {
            uri: uri.into(),
            key: key.into(),
            group: group.into(),
            consumer: None,
            count: default_count(),
            block_ms: default_block_ms(),
            group_start_id: default_group_start_id(),
            ack_policy: default_ack_policy(),
            ack_interval_ms: default_ack_interval_ms(),
            claim_min_idle_ms: default_claim_min_idle_ms(),
            monitor_interval_ms: default_monitor_interval_ms(),
            lease_ttl_ms: default_lease_ttl_ms(),
            max_deliveries: default_max_deliveries(),
            dead_letter_key: None,
            poll_interval_ms: default_poll_interval_ms(),
            max_backoff_ms: default_max_backoff_ms(),
            field: default_field(),
            key_field: None,
            header_fields: Vec::new(),
            on_pending: PendingAction::default(),
        }
    }

    /// Sets `key_field`.
    pub fn key_field(mut self, field: impl Into<String>) -> Self {
        self.key_field = Some(field.into());
        self
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

    setters! {
        /// Sets `count`: entries per read.
        count: usize,
        /// Sets `block_ms`.
        block_ms: u64,
        /// Sets `group_start_id`.
        group_start_id: String,
        /// Sets `ack_policy`.
        ack_policy: AckPolicy,
        /// Sets `ack_interval_ms`.
        ack_interval_ms: u64,
        /// Sets `claim_min_idle_ms`.
        claim_min_idle_ms: u64,
        /// Sets `monitor_interval_ms`.
        monitor_interval_ms: u64,
        /// Sets `lease_ttl_ms`.
        lease_ttl_ms: u64,
        /// Sets `max_deliveries`.
        max_deliveries: u32,
        /// Sets `poll_interval_ms`.
        poll_interval_ms: u64,
        /// Sets `max_backoff_ms`.
        max_backoff_ms: u64,
        /// Sets `field`.
        field: String,
        /// Sets `on_pending`.
        on_pending: PendingAction,
    }

    /// The dead-letter stream's key.
    pub fn dead_letter_key(&self) -> String {
        self.dead_letter_key
            .clone()
            .unwrap_or_else(|| format!("{}:dead", self.key))
    }

    /// Checks every field and reports every problem at once.
    pub fn validate(&self) -> Result<(), SourceError> {
        let mut problems = Vec::new();
        check_uri(&self.uri, &mut problems);
        for (name, value) in [("key", &self.key), ("group", &self.group)] {
            if value.is_empty() {
                problems.push(format!("{name} must not be empty"));
            }
        }
        if self.consumer.as_deref() == Some("") {
            problems.push("consumer must not be empty".to_string());
        }
        if self.count == 0 {
            problems.push("count must be at least 1".to_string());
        }
        if !is_stream_start(&self.group_start_id) {
            problems.push(format!(
                "group_start_id \"{}\" must be $, 0, or a stream id like 1700000000000-0",
                self.group_start_id
            ));
        }
        if let AckPolicy::Batch(0) = self.ack_policy {
            problems.push("ack_policy batch size must be at least 1".to_string());
        }
        if self.max_deliveries == 0 {
            problems.push("max_deliveries must be at least 1".to_string());
        }
        if self.field.is_empty() {
            problems.push("field must not be empty".to_string());
        }
        if self.key_field.as_deref() == Some("") {
            problems.push("key_field must not be empty".to_string());
        }
        if self.header_fields.len() > tempest_source::headers::MAX_HEADERS {
            problems.push(format!(
                "header_fields names {} fields; a message carries at most {}",
                self.header_fields.len(),
                tempest_source::headers::MAX_HEADERS
            ));
        }
        for f in &self.header_fields {
            if f.is_empty() || f.len() > tempest_source::headers::MAX_HEADER_NAME {
                problems.push(format!(
                    "header_fields: {f:?} must be 1 to {} bytes long",
                    tempest_source::headers::MAX_HEADER_NAME
                ));
            }
        }
        if self.dead_letter_key() == self.key {
            problems.push("dead_letter_key must differ from key".to_string());
        }
        if self.monitor_interval_ms < MIN_MONITOR_INTERVAL_MS {
            problems.push(format!(
                "monitor_interval_ms = {} must be at least {MIN_MONITOR_INTERVAL_MS}",
                self.monitor_interval_ms
            ));
        }
        let gap = self.refresh_gap_ms();
        for (name, value) in [
            ("claim_min_idle_ms", self.claim_min_idle_ms),
            ("lease_ttl_ms", self.lease_ttl_ms),
        ] {
            if value < REFRESH_MARGIN.saturating_mul(gap) {
                problems.push(format!(
                    "{name} = {value} must be at least {REFRESH_MARGIN} × (monitor_interval_ms + block_ms) = {REFRESH_MARGIN} × ({} + {}) = {}, or a live consumer's in-flight entries or name could be taken from it",
                    self.monitor_interval_ms,
                    self.block_ms,
                    REFRESH_MARGIN.saturating_mul(gap)
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SourceError::config(format!(
                "redis stream source: {}",
                problems.join("; ")
            )))
        }
    }
}

/// How many times the longest gap between two monitor ticks
/// (`monitor_interval_ms + block_ms`) `claim_min_idle_ms` and `lease_ttl_ms`
/// must be at least.
pub const REFRESH_MARGIN: u64 = 3;

/// The shortest `monitor_interval_ms`: the runtime runs the monitor hook at
/// most every 10 ms.
pub const MIN_MONITOR_INTERVAL_MS: u64 = 10;

impl RedisStreamConfig {
    /// The longest time between two monitor ticks, in milliseconds: the
    /// monitor interval plus one blocking read that may delay it.
    pub fn refresh_gap_ms(&self) -> u64 {
        self.monitor_interval_ms.saturating_add(self.block_ms)
    }
}

/// Checks a server address: a scheme this build can connect with. TLS
/// (`rediss://`) is refused here rather than failing at run time: the
/// `redis` crate is built without a TLS backend.
pub(crate) fn check_uri(uri: &str, problems: &mut Vec<String>) {
    if uri.starts_with("rediss://") {
        problems.push(format!(
            "uri \"{uri}\" asks for TLS (rediss://), which this build of tempest-source-redis does not support: use redis://, or reach the server through a TLS tunnel"
        ));
    } else if !(uri.starts_with("redis://")
        || uri.starts_with("redis+unix://")
        || uri.starts_with("unix://"))
    {
        problems.push(format!(
            "uri \"{uri}\" must start with redis://, redis+unix:// or unix://"
        ));
    }
}

/// The default consumer name: host and program name, so a restarted
/// topology takes the name again (once the dead process's lease has
/// expired) and re-reads its own pending entries. A second live process of
/// the same program on the same host takes `<name>-2` (see
/// [`RedisStreamConfig::consumer`]).
pub fn default_consumer() -> String {
    let host = tempest_source::metrics::host_name();
    let program = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "tempest".to_string());
    format!("{host}-{program}")
}

/// Whether `id` is `$`, or a stream id `MS` or `MS-SEQ`.
fn is_stream_start(id: &str) -> bool {
    if id == "$" {
        return true;
    }
    let mut parts = id.splitn(2, '-');
    let ms_ok = parts
        .next()
        .is_some_and(|p| !p.is_empty() && p.parse::<u64>().is_ok());
    let seq_ok = parts.next().is_none_or(|p| p.parse::<u64>().is_ok());
    ms_ok && seq_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RedisStreamConfig, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn defaults_fill_what_is_left_out() {
        let c = parse("uri = \"redis://h\"\nkey = \"k\"\ngroup = \"g\"").unwrap();
        assert_eq!(c, RedisStreamConfig::new("redis://h", "k", "g"));
        let built = RedisStreamConfig::new("redis://h", "k", "g")
            .count(7usize)
            .consumer("c")
            .dead_letter("d");
        assert_eq!(
            (
                built.count,
                built.consumer.as_deref(),
                built.dead_letter_key()
            ),
            (7, Some("c"), "d".to_string())
        );
        assert_eq!(c.block_ms, 100);
        assert_eq!(c.group_start_id, "$");
        assert_eq!(c.ack_policy, AckPolicy::Batch(1000));
        assert_eq!(c.dead_letter_key(), "k:dead");
        assert_eq!((c.monitor_interval_ms, c.lease_ttl_ms), (1_000, 5_000));
        c.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_line() {
        let err = parse("uri = \"redis://h\"\nkey = \"k\"\ngroup = \"g\"\ncont = 5").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("unknown field `cont`"), "{text}");
        assert!(text.contains("line 4"), "{text}");
    }

    #[test]
    fn every_problem_is_reported() {
        let c = parse(
            "uri = \"http://h\"\nkey = \"\"\ngroup = \"g\"\ncount = 0\ngroup_start_id = \"soon\"\nmax_deliveries = 0",
        )
        .unwrap();
        let text = c.validate().unwrap_err().to_string();
        for needle in [
            "uri \"http://h\"",
            "key must not be empty",
            "count must be at least 1",
            "group_start_id \"soon\"",
            "max_deliveries",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in {text}");
        }
    }

    #[test]
    fn tls_urls_are_refused_at_validation_naming_key_and_value() {
        let c = RedisStreamConfig::new("rediss://h:6380", "k", "g");
        let text = c.validate().unwrap_err().to_string();
        assert!(
            text.contains("uri \"rediss://h:6380\"") && text.contains("TLS"),
            "{text}"
        );
        for ok in [
            "redis://h",
            "redis+unix:///tmp/r.sock",
            "unix:///tmp/r.sock",
        ] {
            RedisStreamConfig::new(ok, "k", "g").validate().unwrap();
        }
    }

    #[test]
    fn claim_min_idle_and_lease_ttl_must_outlast_three_monitor_gaps() {
        let ok = RedisStreamConfig::new("redis://h", "k", "g")
            .monitor_interval_ms(100u64)
            .block_ms(100u64)
            .claim_min_idle_ms(600u64)
            .lease_ttl_ms(600u64);
        ok.validate().unwrap();
        let text = ok
            .clone()
            .claim_min_idle_ms(599u64)
            .lease_ttl_ms(500u64)
            .validate()
            .unwrap_err()
            .to_string();
        for needle in [
            "claim_min_idle_ms = 599 must be at least 3 × (monitor_interval_ms + block_ms) = 3 × (100 + 100) = 600",
            "lease_ttl_ms = 500 must be at least 3",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in {text}");
        }
        let text = ok
            .monitor_interval_ms(5u64)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("monitor_interval_ms = 5 must be at least 10"),
            "{text}"
        );
    }

    #[test]
    fn stream_starts() {
        for ok in ["$", "0", "1700000000000", "1700000000000-3"] {
            assert!(is_stream_start(ok), "{ok}");
        }
        for bad in ["", "-", "x", "1-x", "1-"] {
            assert!(!is_stream_start(bad), "{bad}");
        }
    }
}
