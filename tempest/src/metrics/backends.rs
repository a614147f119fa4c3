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
use tempest_source::Metrics;

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
    /// A Prometheus scrape endpoint: `GET /metrics` answers with the
    /// current registry in the text exposition format.
    Prometheus {
        /// The address to listen on (default 127.0.0.1).
        #[serde(default = "default_prometheus_host")]
        host: String,
        /// The port (default 9312; 0 picks a free one, logged).
        #[serde(default = "default_prometheus_port")]
        port: u16,
    },
    /// One log line per flush (target `tempest::metrics`, level info).
    Log,
    /// A table on stdout per flush.
    Console,
}

fn default_statsd_port() -> u16 {
    8125
}

fn default_prometheus_host() -> String {
    "127.0.0.1".to_string()
}

fn default_prometheus_port() -> u16 {
    9312
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

/// Opens the backends `targets` describe, over the registry `root`.
pub(crate) fn open(targets: &[Target], root: &Metrics) -> io::Result<Vec<Box<dyn Backend>>> {
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
                Target::Prometheus { host, port } => {
                    Box::new(Prometheus::start(host, *port, root.clone())?)
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

/// `tempest.msgs.acked` → `tempest_msgs_acked` (and `_total` for counters).
fn prometheus_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The registry in the Prometheus text exposition format (0.0.4).
pub fn prometheus_text(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    let mut last_family = String::new();
    for (key, value) in snapshot.iter() {
        let (family, kind, v) = match value {
            Value::Counter(c) => (
                format!("{}_total", prometheus_name(key.name())),
                "counter",
                c.to_string(),
            ),
            Value::Gauge(g) => (prometheus_name(key.name()), "gauge", g.to_string()),
        };
        if family != last_family {
            out.push_str(&format!("# TYPE {family} {kind}\n"));
            last_family = family.clone();
        }
        let labels: Vec<String> = key
            .labels()
            .map(|(k, v)| format!("{}=\"{}\"", prometheus_name(k), escape_label(v)))
            .collect();
        if labels.is_empty() {
            out.push_str(&format!("{family} {v}\n"));
        } else {
            out.push_str(&format!("{family}{{{}}} {v}\n", labels.join(",")));
        }
    }
    out
}

struct Prometheus {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prometheus {
    fn start(host: &str, port: u16, root: Metrics) -> io::Result<Self> {
        let server = tiny_http::Server::http((host, port))
            .map_err(|e| io::Error::other(format!("Prometheus endpoint on {host}:{port}: {e}")))?;
        if let Some(addr) = server.server_addr().to_ip() {
            log::info!("Serving Prometheus metrics on http://{addr}/metrics.");
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("tempest-prometheus".into())
            .spawn(move || {
                while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                    let Ok(Some(request)) = server.recv_timeout(Duration::from_millis(100)) else {
                        continue;
                    };
                    let response = if request.url() == "/metrics" {
                        let body = prometheus_text(&root.snapshot());
                        let header = tiny_http::Header::from_bytes(
                            &b"Content-Type"[..],
                            &b"text/plain; version=0.0.4"[..],
                        );
                        let r = tiny_http::Response::from_string(body);
                        match header {
                            Ok(h) => r.with_header(h),
                            Err(()) => r,
                        }
                    } else {
                        tiny_http::Response::from_string("try /metrics\n").with_status_code(404)
                    };
                    let _ = request.respond(response);
                }
            })?;
        Ok(Prometheus {
            stop,
            thread: Some(thread),
        })
    }
}

impl Backend for Prometheus {
    fn flush(&mut self, _f: &Flush<'_>) -> io::Result<()> {
        // Scrapes read the registry as it is; nothing to push.
        Ok(())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
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
    fn prometheus_text_is_valid_exposition() {
        let m = Metrics::new_registry().with_label("topology", "w\"c");
        m.incr("tempest.msgs.acked", 3);
        m.with_label("task", "a")
            .gauge("tempest.task.queue_depth", 2);
        let text = prometheus_text(&m.snapshot());
        assert!(
            text.contains("# TYPE tempest_msgs_acked_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("tempest_msgs_acked_total{topology=\"w\\\"c\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("tempest_task_queue_depth{topology=\"w\\\"c\",task=\"a\"} 2\n"),
            "{text}"
        );
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
