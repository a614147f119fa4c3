//! Where metrics go: statsd, Prometheus (scrape endpoint and push
//! gateway), a JSON-lines file, the log, the console.
//!
//! Configured by `[metric]` in `Topology.toml` or
//! [`TopologyBuilder::metrics`](crate::TopologyBuilder::metrics):
//!
//! ```toml
//! [metric]
//! flush_interval = 5000          # ms
//! target = [
//!     { type = "statsd", host = "127.0.0.1", port = 8125, prefix = "tempest" },
//!     { type = "prometheus", host = "0.0.0.0", port = 9312 },
//!     { type = "prometheus_push", url = "http://127.0.0.1:9091", job = "tempest" },
//!     { type = "file", path = "metrics.jsonl", clobber = true },
//!     { type = "log" },
//!     { type = "console" },
//! ]
//! ```
//!
//! Counters and gauges go out as they are. A histogram goes out as its
//! count, sum and quantiles (p50, p90, p99, p99.9) and max: cumulative
//! count and sum, and quantiles over the last flush interval (the file
//! backend also writes the quantiles over the whole run).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use tempest_source::metrics::{Distribution, Key, Snapshot, Value};
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

    /// Every problem with these settings, each naming its key; empty if
    /// there is none. Checked when the topology is built.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.flush_interval == 0 {
            problems.push("flush_interval must be at least 1 ms".to_string());
        }
        for (i, t) in self.target.iter().enumerate() {
            let at = format!("target {} ({})", i + 1, t.kind());
            match t {
                Target::Statsd { host, .. } | Target::Prometheus { host, .. }
                    if host.trim().is_empty() =>
                {
                    problems.push(format!("{at}: host is empty"));
                }
                Target::File { path, .. } if path.as_os_str().is_empty() => {
                    problems.push(format!("{at}: path is empty"));
                }
                Target::PrometheusPush {
                    url,
                    job,
                    instance,
                    timeout,
                } => {
                    if let Err(e) = push_url(url, job, instance.as_deref().unwrap_or("default")) {
                        problems.push(format!("{at}: {e}"));
                    }
                    if *timeout == 0 {
                        problems.push(format!("{at}: timeout must be at least 1 ms"));
                    }
                }
                _ => {}
            }
        }
        problems
    }
}

impl Target {
    /// The `type` of this target, as written in `Topology.toml`.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Statsd { .. } => "statsd",
            Target::File { .. } => "file",
            Target::Prometheus { .. } => "prometheus",
            Target::PrometheusPush { .. } => "prometheus_push",
            Target::Log => "log",
            Target::Console => "console",
        }
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
    /// Pushes the registry to a Prometheus push gateway at every flush
    /// (and once more at exit), for processes too short-lived to be
    /// scraped, such as task workers. Each process pushes to its own group
    /// `/metrics/job/<job>/instance/<instance>`, replacing its last push.
    PrometheusPush {
        /// The push gateway's base URL, e.g. `http://127.0.0.1:9091`.
        url: String,
        /// The `job` grouping label (default `tempest`).
        #[serde(default = "default_push_job")]
        job: String,
        /// The `instance` grouping label (default `<host>-<pid>`).
        #[serde(default)]
        instance: Option<String>,
        /// Milliseconds to wait for the push gateway (default 5000).
        #[serde(default = "default_push_timeout")]
        timeout: u64,
    },
    /// One log line per flush (target `tempest::metrics`, level info).
    Log,
    /// A table on stdout per flush.
    Console,
}

fn default_push_job() -> String {
    "tempest".to_string()
}

fn default_push_timeout() -> u64 {
    5000
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
    /// Histograms' observations since the previous flush.
    pub intervals: &'a BTreeMap<Key, Distribution>,
}

pub(crate) trait Backend: Send {
    fn flush(&mut self, f: &Flush<'_>) -> io::Result<()>;
}

/// Which process opens the backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// The topology (or standalone) process: every backend.
    Topology,
    /// A task worker process: it serves no scrape endpoint (many workers
    /// share a host, and the endpoint belongs to the topology process).
    Worker,
}

/// Opens the backends `targets` describe, over the registry `root`.
pub(crate) fn open(
    targets: &[Target],
    root: &Metrics,
    role: Role,
) -> io::Result<Vec<Box<dyn Backend>>> {
    targets
        .iter()
        .filter(|t| {
            let skip = role == Role::Worker && matches!(t, Target::Prometheus { .. });
            if skip {
                log::info!(
                    "Task workers serve no Prometheus scrape endpoint (the topology process \
                     does); use a prometheus_push target for worker metrics."
                );
            }
            !skip
        })
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
                Target::PrometheusPush {
                    url,
                    job,
                    instance,
                    timeout,
                } => {
                    let instance = instance.clone().unwrap_or_else(|| {
                        format!(
                            "{}-{}",
                            tempest_source::metrics::host_name(),
                            std::process::id()
                        )
                    });
                    Box::new(Push::start(
                        push_url(url, job, &instance)?,
                        Duration::from_millis(*timeout),
                    )?)
                }
                Target::Log => Box::new(Log),
                Target::Console => Box::new(Console),
            })
        })
        .collect()
}

/// The quantiles every backend reports for a histogram: (q, short name,
/// Prometheus label value).
const QUANTILES: [(f64, &str, &str); 4] = [
    (0.5, "p50", "0.5"),
    (0.9, "p90", "0.9"),
    (0.99, "p99", "0.99"),
    (0.999, "p999", "0.999"),
];

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
        for (key, d) in f.intervals {
            if d.is_empty() {
                continue;
            }
            let name = flat_name(key);
            pipe.count(&format!("{name}.count"), d.count() as f64);
            for (q, suffix, _) in QUANTILES {
                pipe.gauge(&format!("{name}.{suffix}"), d.quantile(q) as f64);
            }
            pipe.gauge(&format!("{name}.max"), d.max() as f64);
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
            match value {
                Value::Counter(c) => serde_json::json!({
                    "name": key.name(), "labels": labels, "type": "counter", "value": c,
                }),
                Value::Gauge(g) => serde_json::json!({
                    "name": key.name(), "labels": labels, "type": "gauge", "value": g,
                }),
                Value::Histogram(d) => {
                    let interval = f.intervals.get(key).map(json_distribution);
                    serde_json::json!({
                        "name": key.name(), "labels": labels, "type": "histogram",
                        "value": json_distribution(d), "interval": interval,
                    })
                }
            }
        })
        .collect();
    serde_json::json!({ "ts": millis(f.at), "metrics": metrics })
}

fn json_distribution(d: &Distribution) -> serde_json::Value {
    let mut o = serde_json::Map::new();
    o.insert("count".into(), d.count().into());
    o.insert("sum".into(), d.sum().into());
    o.insert("min".into(), d.min().into());
    for (q, suffix, _) in QUANTILES {
        o.insert(suffix.into(), d.quantile(q).into());
    }
    o.insert("max".into(), d.max().into());
    o.insert("mean".into(), d.mean().into());
    serde_json::Value::Object(o)
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

/// One line per series: counters and gauges as they are, histograms over
/// the last interval (skipped when it saw nothing, like zero counters).
fn lines(f: &Flush<'_>) -> Vec<String> {
    f.snapshot
        .iter()
        .filter_map(|(key, value)| {
            let v = match value {
                Value::Counter(0) => return None,
                Value::Counter(c) => c.to_string(),
                Value::Gauge(g) => g.to_string(),
                Value::Histogram(_) => {
                    let d = f.intervals.get(key).filter(|d| !d.is_empty())?;
                    let mut v = format!("n={}", d.count());
                    for (q, suffix, _) in QUANTILES {
                        let _ = write!(v, " {suffix}={}", d.quantile(q));
                    }
                    let _ = write!(v, " max={}", d.max());
                    v
                }
            };
            Some(format!("{key:?} = {v}"))
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
/// Histograms are summaries with quantiles over every observation.
pub fn prometheus_text(snapshot: &Snapshot) -> String {
    render_prometheus(snapshot, None)
}

/// The exposition text, with histogram quantiles taken from `recent`
/// (the last flush interval; `NaN` for a series with no observation in
/// it) when given, else from every observation.
fn render_prometheus(snapshot: &Snapshot, recent: Option<&BTreeMap<Key, Distribution>>) -> String {
    let mut out = String::new();
    let mut last_family = String::new();
    for (key, value) in snapshot.iter() {
        let (family, kind) = match value {
            Value::Counter(_) => (format!("{}_total", prometheus_name(key.name())), "counter"),
            Value::Gauge(_) => (prometheus_name(key.name()), "gauge"),
            Value::Histogram(_) => (prometheus_name(key.name()), "summary"),
        };
        if family != last_family {
            let _ = writeln!(out, "# TYPE {family} {kind}");
            last_family.clone_from(&family);
        }
        let labels: Vec<String> = key
            .labels()
            .map(|(k, v)| format!("{}=\"{}\"", prometheus_name(k), escape_label(v)))
            .collect();
        let labels = labels.join(",");
        let series = |suffix: &str, extra: &str| -> String {
            match (labels.is_empty(), extra.is_empty()) {
                (true, true) => format!("{family}{suffix}"),
                (true, false) => format!("{family}{suffix}{{{extra}}}"),
                (false, true) => format!("{family}{suffix}{{{labels}}}"),
                (false, false) => format!("{family}{suffix}{{{labels},{extra}}}"),
            }
        };
        match value {
            Value::Counter(c) => {
                let _ = writeln!(out, "{} {c}", series("", ""));
            }
            Value::Gauge(g) => {
                let _ = writeln!(out, "{} {g}", series("", ""));
            }
            Value::Histogram(d) => {
                let window = match recent {
                    Some(r) => r.get(key),
                    None => Some(d),
                };
                for (q, _, label) in QUANTILES {
                    let quantile = format!("quantile=\"{label}\"");
                    match window.filter(|w| !w.is_empty()) {
                        Some(w) => {
                            let _ = writeln!(out, "{} {}", series("", &quantile), w.quantile(q));
                        }
                        None => {
                            let _ = writeln!(out, "{} NaN", series("", &quantile));
                        }
                    }
                }
                let _ = writeln!(out, "{} {}", series("_sum", ""), d.sum());
                let _ = writeln!(out, "{} {}", series("_count", ""), d.count());
            }
        }
    }
    out
}

/// The last flush interval's histograms, shared with the scrape thread.
type Recent = Arc<Mutex<Option<BTreeMap<Key, Distribution>>>>;

struct Prometheus {
    recent: Recent,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prometheus {
    fn start(host: &str, port: u16, root: Metrics) -> io::Result<Self> {
        let server = tiny_http::Server::http((host, port))
            .map_err(|e| io::Error::other(format!("Prometheus endpoint on {host}:{port}: {e}")))?;
        if let Some(addr) = server.server_addr().to_ip() {
            log::info!("Serving Prometheus metrics on http://{addr}/metrics.");
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let recent: Recent = Arc::default();
        let windows = Arc::clone(&recent);
        let thread = std::thread::Builder::new()
            .name("tempest-prometheus".into())
            .spawn(move || {
                while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                    let Ok(Some(request)) = server.recv_timeout(Duration::from_millis(100)) else {
                        continue;
                    };
                    let response = if request.url() == "/metrics" {
                        let snapshot = root.snapshot();
                        let windows = windows.lock().unwrap_or_else(PoisonError::into_inner);
                        let body = render_prometheus(&snapshot, windows.as_ref());
                        drop(windows);
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
            recent,
            stop,
            thread: Some(thread),
        })
    }
}

impl Backend for Prometheus {
    fn flush(&mut self, f: &Flush<'_>) -> io::Result<()> {
        // Scrapes read the registry as it is, and the quantiles of the
        // last interval from here.
        *self.recent.lock().unwrap_or_else(PoisonError::into_inner) = Some(f.intervals.clone());
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

/// `<url>/metrics/job/<job>/instance/<instance>`, checking the URL and
/// making the labels path-safe.
fn push_url(url: &str, job: &str, instance: &str) -> io::Result<String> {
    let base = url.trim_end_matches('/');
    if base.starts_with("https://") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "prometheus_push url {url:?}: https is not supported in this version \
                 (push over http, e.g. to a local TLS-terminating proxy)"
            ),
        ));
    }
    if !base.starts_with("http://") || base.len() <= "http://".len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("prometheus_push url {url:?} is not an http:// URL"),
        ));
    }
    let safe = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "_.:-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    if job.is_empty() || instance.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "prometheus_push job and instance must not be empty",
        ));
    }
    Ok(format!(
        "{base}/metrics/job/{}/instance/{}",
        safe(job),
        safe(instance)
    ))
}

/// The next body to push, and whether the backend is closing.
#[derive(Default)]
struct PushSlot {
    body: Option<String>,
    closing: bool,
}

/// Pushes from a thread of its own, so a slow gateway never holds up a
/// flush: each flush replaces the body waiting to go (the latest wins),
/// and dropping the backend pushes what is waiting, then stops.
struct Push {
    slot: Arc<(Mutex<PushSlot>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Push {
    fn start(url: String, timeout: Duration) -> io::Result<Self> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .build()
            .into();
        let slot: Arc<(Mutex<PushSlot>, Condvar)> = Arc::default();
        let shared = Arc::clone(&slot);
        log::info!("Pushing metrics to {url}.");
        let thread = std::thread::Builder::new()
            .name("tempest-push".into())
            .spawn(move || {
                let (lock, ready) = &*shared;
                loop {
                    let body = {
                        let mut s = lock.lock().unwrap_or_else(PoisonError::into_inner);
                        while s.body.is_none() && !s.closing {
                            s = ready.wait(s).unwrap_or_else(PoisonError::into_inner);
                        }
                        match s.body.take() {
                            Some(b) => b,
                            None => return,
                        }
                    };
                    let sent = agent
                        .put(&url)
                        .header("Content-Type", "text/plain; version=0.0.4")
                        .send(body.as_str());
                    if let Err(e) = sent {
                        log::warn!("Pushing metrics to {url} failed: {e}.");
                    }
                }
            })?;
        Ok(Push {
            slot,
            thread: Some(thread),
        })
    }
}

impl Backend for Push {
    fn flush(&mut self, f: &Flush<'_>) -> io::Result<()> {
        let body = render_prometheus(f.snapshot, Some(f.intervals));
        let (lock, ready) = &*self.slot;
        lock.lock().unwrap_or_else(PoisonError::into_inner).body = Some(body);
        ready.notify_one();
        Ok(())
    }
}

impl Drop for Push {
    fn drop(&mut self) {
        let (lock, ready) = &*self.slot;
        lock.lock().unwrap_or_else(PoisonError::into_inner).closing = true;
        ready.notify_one();
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
    fn histograms_are_prometheus_summaries() {
        let m = Metrics::new_registry().with_label("topology", "t");
        for v in 1..=100 {
            m.record("tempest.msgs.latency_us", v);
        }
        let snap = m.snapshot();
        let text = prometheus_text(&snap);
        assert!(
            text.contains("# TYPE tempest_msgs_latency_us summary\n"),
            "{text}"
        );
        assert!(
            text.contains("tempest_msgs_latency_us{topology=\"t\",quantile=\"0.5\"} 50\n"),
            "{text}"
        );
        assert!(
            text.contains("tempest_msgs_latency_us{topology=\"t\",quantile=\"0.99\"} 99\n"),
            "{text}"
        );
        assert!(
            text.contains("tempest_msgs_latency_us_sum{topology=\"t\"} 5050\n"),
            "{text}"
        );
        assert!(
            text.contains("tempest_msgs_latency_us_count{topology=\"t\"} 100\n"),
            "{text}"
        );
        // With a window that saw nothing, quantiles are NaN; sum and count
        // stay cumulative.
        let (key, _) = snap.iter().next().unwrap();
        let empty = BTreeMap::from([(key.clone(), Distribution::new())]);
        let text = render_prometheus(&snap, Some(&empty));
        assert!(
            text.contains("tempest_msgs_latency_us{topology=\"t\",quantile=\"0.9\"} NaN\n"),
            "{text}"
        );
        assert!(
            text.contains("tempest_msgs_latency_us_count{topology=\"t\"} 100\n"),
            "{text}"
        );
    }

    #[test]
    fn log_lines_show_a_histograms_last_interval() {
        let m = Metrics::new_registry();
        m.record("lat_us", 10);
        m.incr("zero", 0);
        let snap = m.snapshot();
        let (key, value) = snap.iter().next().unwrap();
        let Value::Histogram(d) = value else {
            panic!("{value:?}")
        };
        let intervals = BTreeMap::from([(key.clone(), d.clone())]);
        let flush = Flush {
            at: SystemTime::now(),
            snapshot: &snap,
            deltas: &[],
            intervals: &intervals,
        };
        assert_eq!(
            lines(&flush),
            ["lat_us = n=1 p50=10 p90=10 p99=10 p999=10 max=10"]
        );
        let quiet = BTreeMap::from([(key.clone(), Distribution::new())]);
        let flush = Flush {
            intervals: &quiet,
            ..flush
        };
        assert!(lines(&flush).is_empty(), "a quiet interval is skipped");
    }

    #[test]
    fn problems_name_the_target_and_key() {
        let c: MetricsConfig = toml::from_str(
            r#"
flush_interval = 0
target = [
    { type = "log" },
    { type = "statsd", host = " " },
    { type = "prometheus_push", url = "https://gw", timeout = 0 },
    { type = "file", path = "" },
]
"#,
        )
        .unwrap();
        let p = c.problems();
        assert_eq!(p.len(), 5, "{p:#?}");
        assert_eq!(p[0], "flush_interval must be at least 1 ms");
        assert_eq!(p[1], "target 2 (statsd): host is empty");
        assert!(p[2].starts_with("target 3 (prometheus_push): prometheus_push url \"https://gw\": https is not supported"), "{}", p[2]);
        assert_eq!(
            p[3],
            "target 3 (prometheus_push): timeout must be at least 1 ms"
        );
        assert_eq!(p[4], "target 4 (file): path is empty");
        assert!(MetricsConfig::default().problems().is_empty());
    }

    #[test]
    fn push_urls_are_checked_and_path_safe() {
        assert_eq!(
            push_url("http://gw:9091/", "wc", "host a/1").unwrap(),
            "http://gw:9091/metrics/job/wc/instance/host_a_1"
        );
        assert!(push_url("gw:9091", "wc", "i").is_err());
        assert!(push_url("http://", "wc", "i").is_err());
        let e = push_url("https://gw:9091", "wc", "i").unwrap_err();
        assert!(e.to_string().contains("https is not supported"), "{e}");
        assert!(push_url("http://gw", "", "i").is_err());
        let c: MetricsConfig =
            toml::from_str("target = [{ type = \"prometheus_push\", url = \"http://gw:9091\" }]")
                .unwrap();
        assert_eq!(
            c.target[0],
            Target::PrometheusPush {
                url: "http://gw:9091".into(),
                job: "tempest".into(),
                instance: None,
                timeout: 5000
            }
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
