//! Where metrics go: statsd, a JSON-lines file, the log, the console.
//!
//! Configured by `[metric]` in `Topology.toml` or
//! [`TopologyBuilder::metrics`](crate::TopologyBuilder::metrics):
//!
//! ```toml
//! [metric]
//! flush_interval = 5000          # ms
//! target = [
//!     { type = "statsd", host = "127.0.0.1", port = 8125, prefix = "tempest" },
//!     { type = "file", path = "metrics.jsonl", clobber = true },
//!     { type = "log" },
//!     { type = "console" },
//! ]
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use tempest_source::metrics::{Key, Snapshot, Value};

/// `[metric]`: how often to flush, and where.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Milliseconds between flushes (default 5000).
    #[serde(default = "default_flush_interval")]
    pub flush_interval: u64,
    /// The backends.
    #[serde(default)]
    pub target: Vec<Target>,
}

fn default_flush_interval() -> u64 {
    5000
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            flush_interval: default_flush_interval(),
            target: Vec::new(),
        }
    }
}

impl MetricsConfig {
    /// The flush interval as a duration (at least 10 ms).
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.flush_interval.max(10))
    }
}

/// One backend.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Target {
    /// Statsd over UDP: counters as `|c` deltas, gauges as `|g`. Labels are
    /// appended to the name: `prefix.tempest.task.msgs_in.<topology>.<task>`.
    Statsd {
        /// The statsd host.
        host: String,
        /// The statsd port (default 8125).
        #[serde(default = "default_statsd_port")]
        port: u16,
        /// Prepended to every name (default `tempest`... as given).
        #[serde(default)]
        prefix: String,
    },
    /// One JSON object per flush, one per line.
    File {
        /// The file.
        path: PathBuf,
        /// Truncate it at start (default) or append.
        #[serde(default = "default_true")]
        clobber: bool,
    },
    /// One log line per flush (target `tempest::metrics`, level info).
    Log,
    /// A table on stdout per flush.
    Console,
}

fn default_statsd_port() -> u16 {
    8125
}

fn default_true() -> bool {
    true
}

/// What a backend receives at each flush.
pub(crate) struct Flush<'a> {
    pub at: SystemTime,
    pub snapshot: &'a Snapshot,
    /// Counters' increase since the previous flush.
    pub deltas: &'a [(Key, u64)],
}

pub(crate) trait Backend: Send {
    fn flush(&mut self, f: &Flush<'_>) -> io::Result<()>;
}

/// Opens the backends `targets` describe.
pub(crate) fn open(targets: &[Target]) -> io::Result<Vec<Box<dyn Backend>>> {
    targets
        .iter()
        .map(|t| -> io::Result<Box<dyn Backend>> {
            Ok(match t {
                Target::Statsd { host, port, prefix } => {
                    let client = statsd::Client::new((host.as_str(), *port), prefix)
                        .map_err(|e| io::Error::other(format!("statsd at {host}:{port}: {e}")))?;
                    Box::new(Statsd { client })
                }
                Target::File { path, clobber } => {
                    let file = OpenOptions::new()
                        .create(true)
                        .write(true)
                        .append(!clobber)
                        .truncate(*clobber)
                        .open(path)
                        .map_err(|e| {
                            io::Error::new(e.kind(), format!("{}: {e}", path.display()))
                        })?;
                    Box::new(JsonLines { file })
                }
                Target::Log => Box::new(Log),
                Target::Console => Box::new(Console),
            })
        })
        .collect()
}

/// `name.label1.label2`, with anything but letters, digits, `_`, `-` in
/// label values replaced by `_`.
fn flat_name(key: &Key) -> String {
    let mut name = key.name().to_string();
    for (_, v) in key.labels() {
        name.push('.');
        name.extend(v.chars().map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        }));
    }
    name
}

struct Statsd {
    client: statsd::Client,
}

impl Backend for Statsd {
    fn flush(&mut self, f: &Flush<'_>) -> io::Result<()> {
        let mut pipe = self.client.pipeline();
        for (key, delta) in f.deltas {
            if *delta > 0 {
                pipe.count(&flat_name(key), *delta as f64);
            }
        }
        for (key, value) in f.snapshot.iter() {
            if let Value::Gauge(g) = value {
                pipe.gauge(&flat_name(key), *g as f64);
            }
        }
        pipe.send(&self.client);
        Ok(())
    }
}

fn millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn json(f: &Flush<'_>) -> serde_json::Value {
    let metrics: Vec<serde_json::Value> = f
        .snapshot
        .iter()
        .map(|(key, value)| {
            let labels: serde_json::Map<String, serde_json::Value> = key
                .labels()
                .map(|(k, v)| (k.to_string(), serde_json::Value::from(v)))
                .collect();
            let (kind, value) = match value {
                Value::Counter(c) => ("counter", serde_json::Value::from(*c)),
                Value::Gauge(g) => ("gauge", serde_json::Value::from(*g)),
            };
            serde_json::json!({ "name": key.name(), "labels": labels, "type": kind, "value": value })
        })
        .collect();
    serde_json::json!({ "ts": millis(f.at), "metrics": metrics })
}

struct JsonLines {
    file: File,
}

impl Backend for JsonLines {
    fn flush(&mut self, f: &Flush<'_>) -> io::Result<()> {
        let mut line = serde_json::to_vec(&json(f))?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.file.flush()
    }
}

fn lines(f: &Flush<'_>) -> Vec<String> {
    f.snapshot
        .iter()
        .filter(|(_, v)| !matches!(v, Value::Counter(0)))
        .map(|(key, value)| {
            let v = match value {
                Value::Counter(c) => c.to_string(),
                Value::Gauge(g) => g.to_string(),
            };
            format!("{key:?} = {v}")
        })
        .collect()
}

struct Log;

impl Backend for Log {
    fn flush(&mut self, f: &Flush<'_>) -> io::Result<()> {
        log::info!(target: "tempest::metrics", "Metrics: {}.", lines(f).join(", "));
        Ok(())
    }
}

struct Console;

impl Backend for Console {
    fn flush(&mut self, f: &Flush<'_>) -> io::Result<()> {
        let mut out = io::stdout().lock();
        writeln!(out, "--- metrics at {} ms ---", millis(f.at))?;
        for line in lines(f) {
            writeln!(out, "  {line}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempest_source::Metrics;

    #[test]
    fn targets_read_from_toml() {
        let c: MetricsConfig = toml::from_str(
            r#"
flush_interval = 100
target = [
    { type = "statsd", host = "127.0.0.1", port = 9125, prefix = "p" },
    { type = "file", path = "/tmp/m.jsonl" },
    { type = "log" },
    { type = "console" },
]
"#,
        )
        .unwrap();
        assert_eq!(c.target.len(), 4);
        assert_eq!(
            c.target[1],
            Target::File {
                path: "/tmp/m.jsonl".into(),
                clobber: true
            }
        );
        let e = toml::from_str::<MetricsConfig>("target = [{ type = \"carrier-pigeon\" }]")
            .unwrap_err();
        assert!(e.to_string().contains("carrier-pigeon"), "{e}");
    }

    #[test]
    fn names_flatten_labels() {
        let m = Metrics::new_registry()
            .with_label("topology", "wc")
            .with_label("task", "a b");
        m.incr("tempest.task.msgs_in", 1);
        let snap = m.snapshot();
        let (key, _) = snap.iter().next().unwrap();
        assert_eq!(flat_name(key), "tempest.task.msgs_in.wc.a_b");
    }
}
