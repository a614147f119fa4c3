//! `Topology.toml`: the file a topology package reads its settings from.
//!
//! Two stages: [`FileConfig`] is the file as written (typed, unknown keys
//! rejected, parse errors with file, line and column); [`FileConfig::check`]
//! validates it against the package's pipeline (a `[[task]]` must name a
//! real task) and reports every problem at once, each with its line.
//!
//! Precedence, lowest first: the builder's compiled defaults, this file,
//! `TEMPEST_*` environment variables, command-line flags.
//!
//! ```toml
//! name = "wordcount"
//! host = "127.0.0.1"
//! port = 9311
//! graceful_shutdown = 30000   # ms
//! source_connect_timeout = 60000  # ms the source may be unreachable at start; 0: forever
//! failure_policy = { retry = 3 }   # or "none", "best_effort"
//! msg_timeout = 30000         # ms; 0 for none
//! max_pending = 16384
//! secret = "change me"
//! max_handshakes = 64         # connections allowed in the handshake at once
//!
//! [source.config]             # the source's own typed configuration
//! count = 1000
//!
//! [[task]]
//! name = "words"
//! workers = 2                 # standalone: threads; task: connections
//! poll_count = 1024           # most messages per fetch
//! poll_interval = 100         # ms: first reconnect wait of a task worker
//! max_backoff = 5000          # ms: longest reconnect wait
//! exit_with_topology = false  # task workers stop when the topology stops
//! ```

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use toml::Spanned;

use crate::error::Error;
use crate::pipeline::Dag;
use crate::topology::FailurePolicy;

/// `Topology.toml` as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The topology's name.
    pub name: Option<String>,
    /// The address the topology process listens on.
    pub host: Option<String>,
    /// The port the topology process listens on.
    pub port: Option<u16>,
    /// Milliseconds in-flight messages may take to finish on shutdown.
    pub graceful_shutdown: Option<u64>,
    /// Milliseconds the source may stay unreachable at start; 0 for no limit.
    pub source_connect_timeout: Option<u64>,
    /// `"none"`, `"best_effort"` or `{ retry = N }`.
    pub failure_policy: Option<FailurePolicy>,
    /// Milliseconds one attempt may take; 0 for no limit.
    pub msg_timeout: Option<u64>,
    /// The most source messages in flight.
    pub max_pending: Option<usize>,
    /// The secret task workers must prove they know.
    pub secret: Option<String>,
    /// The largest frame, in bytes, after the handshake.
    pub max_frame: Option<usize>,
    /// Milliseconds between heartbeats on idle connections.
    pub heartbeat: Option<u64>,
    /// Milliseconds a connecting worker has to complete the handshake.
    pub handshake_timeout: Option<u64>,
    /// The most connections in the handshake at once; more are closed at once.
    pub max_handshakes: Option<usize>,
    /// Milliseconds before the first retry (`Retry` policy).
    pub retry_backoff: Option<u64>,
    /// The longest wait before a retry, in milliseconds.
    pub max_retry_backoff: Option<u64>,
    /// `[source]`: `[source.config]` holds the source's own settings.
    pub source: Option<SourceSection>,
    /// `[[task]]`: per-task settings.
    #[serde(default)]
    pub task: Vec<TaskSection>,
    /// `[metric]`: the metrics backends.
    pub metric: Option<crate::metrics::MetricsConfig>,
}

/// `[source]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    /// `[source.config]`, parsed into the source's typed configuration when
    /// the topology starts.
    pub config: Option<toml::Table>,
}

/// One `[[task]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSection {
    /// The task's name; must be a task of the package.
    pub name: Spanned<String>,
    /// Standalone: worker threads. `task` mode: connections (default 1).
    pub workers: Option<usize>,
    /// The most task messages one fetch takes.
    pub poll_count: Option<usize>,
    /// Milliseconds: a task worker's first wait before reconnecting.
    pub poll_interval: Option<u64>,
    /// Milliseconds: a task worker's longest wait before reconnecting.
    pub max_backoff: Option<u64>,
    /// Task workers stop when the topology stops, instead of reconnecting.
    pub exit_with_topology: Option<bool>,
}

/// A loaded `Topology.toml`: where it came from, its text, its contents.
#[derive(Clone, Debug)]
pub struct ConfigFile {
    /// The file's path.
    pub path: PathBuf,
    /// The file's text (the source's typed config is parsed from it, so
    /// its errors carry lines too).
    pub text: String,
    /// The parsed file.
    pub config: FileConfig,
}

impl ConfigFile {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            file: path.to_path_buf(),
            message: format!("cannot read it: {e}"),
        })?;
        Self::parse(path, text)
    }

    /// Parses `text`, read from `path`.
    pub fn parse(path: &Path, text: String) -> Result<Self, Error> {
        let config = toml::from_str(&text).map_err(|e| Error::Config {
            file: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(ConfigFile {
            path: path.to_path_buf(),
            text,
            config,
        })
    }

    /// Checks the file against the package's pipeline; reports every
    /// problem, each with its line.
    pub fn check(&self, dag: &Dag) -> Result<(), Error> {
        let mut problems = Vec::new();
        let c = &self.config;
        let mut seen: Vec<&str> = Vec::new();
        for t in &c.task {
            let line = self.line_of(t.name.span());
            let name = t.name.get_ref().as_str();
            if dag.index_of(name).is_none() {
                problems.push(format!(
                    "line {line}: [[task]] name = \"{name}\" is not a task of this topology; its tasks are: {}",
                    dag.names().join(", ")
                ));
            }
            if seen.contains(&name) {
                problems.push(format!("line {line}: [[task]] \"{name}\" is given twice"));
            }
            seen.push(name);
            if t.workers == Some(0) {
                problems.push(format!(
                    "line {line}: [[task]] \"{name}\": workers must be at least 1"
                ));
            }
            if t.poll_count == Some(0) {
                problems.push(format!(
                    "line {line}: [[task]] \"{name}\": poll_count must be at least 1"
                ));
            }
        }
        if c.max_pending == Some(0) {
            problems.push("max_pending must be at least 1".to_string());
        }
        if c.max_frame.is_some_and(|m| m < crate::wire::HANDSHAKE_MAX) {
            problems.push(format!(
                "max_frame must be at least {} bytes",
                crate::wire::HANDSHAKE_MAX
            ));
        }
        if c.max_handshakes == Some(0) {
            problems.push("max_handshakes must be at least 1".to_string());
        }
        if c.heartbeat == Some(0) {
            problems.push("heartbeat must be at least 1 ms".to_string());
        }
        if c.secret.as_deref() == Some("") {
            problems.push("secret must not be empty (leave it out for none)".to_string());
        }
        if let Some(metric) = &c.metric {
            let at = match self.text.lines().position(|l| l.trim() == "[metric]") {
                Some(i) => format!("line {}: [metric]", i + 1),
                None => "[metric]".to_string(),
            };
            for p in metric.problems() {
                problems.push(format!("{at} {p}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Config {
                file: self.path.clone(),
                message: problems.join("\n  "),
            })
        }
    }

    /// The `[[task]]` section for `task`, if any.
    pub fn task(&self, task: &str) -> Option<&TaskSection> {
        self.config.task.iter().find(|t| t.name.get_ref() == task)
    }

    fn line_of(&self, span: Range<usize>) -> usize {
        self.text[..span.start.min(self.text.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
            + 1
    }

    /// Parses `[source.config]` into the source's typed configuration,
    /// `None` if the file has none. Errors name the file, line and key.
    pub fn source_config<C: DeserializeOwned>(&self) -> Result<Option<C>, Error> {
        #[derive(Deserialize)]
        struct Doc<C> {
            source: Option<Section<C>>,
        }
        #[derive(Deserialize)]
        struct Section<C> {
            config: Option<C>,
        }
        if self
            .config
            .source
            .as_ref()
            .and_then(|s| s.config.as_ref())
            .is_none()
        {
            return Ok(None);
        }
        let doc: Doc<C> = toml::from_str(&self.text).map_err(|e| Error::Config {
            file: self.path.clone(),
            message: format!("[source.config]: {e}"),
        })?;
        Ok(doc.source.and_then(|s| s.config))
    }

    /// Whether the file has a `[source.config]` table.
    pub fn has_source_config(&self) -> bool {
        self.config
            .source
            .as_ref()
            .is_some_and(|s| s.config.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Pipeline;

    use crate::task::PassOn as T;

    fn dag() -> Dag {
        Pipeline::new()
            .task(T("split"))
            .task(T("count"))
            .edge("split", "count")
            .build()
            .unwrap()
    }

    fn parse(text: &str) -> Result<ConfigFile, Error> {
        ConfigFile::parse(Path::new("Topology.toml"), text.to_string())
    }

    #[test]
    fn a_full_file_parses() {
        let f = parse(
            r#"
name = "wc"
host = "0.0.0.0"
port = 9000
graceful_shutdown = 1000
failure_policy = { retry = 2 }
msg_timeout = 0
max_pending = 10
secret = "s"

[source.config]
count = 5

[[task]]
name = "split"
workers = 2
poll_count = 10

[metric]
flush_interval = 5
"#,
        )
        .unwrap();
        f.check(&dag()).unwrap();
        assert_eq!(f.config.failure_policy, Some(FailurePolicy::Retry(2)));
        assert_eq!(f.task("split").unwrap().workers, Some(2));
        #[derive(Deserialize, Debug, PartialEq)]
        #[serde(deny_unknown_fields)]
        struct C {
            count: u32,
        }
        assert_eq!(f.source_config::<C>().unwrap(), Some(C { count: 5 }));
        let p = parse("failure_policy = \"best_effort\"").unwrap();
        assert_eq!(p.config.failure_policy, Some(FailurePolicy::BestEffort));
    }

    #[test]
    fn unknown_keys_name_the_file_the_key_and_the_line() {
        let e = parse("name = \"x\"\nmax_pendng = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("Topology.toml"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        assert!(e.contains("max_pendng"), "{e}");
        let e = parse("[[task]]\nname = \"split\"\nworker = 2\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3") && e.contains("worker"), "{e}");
    }

    #[test]
    fn metric_targets_are_checked_with_the_file_and_line() {
        let f = parse(
            "name = \"x\"\n\n[metric]\ntarget = [{ type = \"prometheus_push\", url = \"gw:9091\" }]\n",
        )
        .unwrap();
        let e = f.check(&dag()).unwrap_err().to_string();
        assert!(e.contains("Topology.toml"), "{e}");
        assert!(
            e.contains("line 3: [metric] target 1 (prometheus_push)")
                && e.contains("\"gw:9091\" is not an http:// URL"),
            "{e}"
        );
    }

    #[test]
    fn typed_source_config_errors_have_lines() {
        #[derive(Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct C {
            count: u32,
        }
        let f = parse("name = \"x\"\n\n[source.config]\ncont = 3\n").unwrap();
        let e = f.source_config::<C>().unwrap_err().to_string();
        assert!(
            e.contains("[source.config]") && e.contains("line 4") && e.contains("cont"),
            "{e}"
        );
        assert!(parse("name = \"x\"")
            .unwrap()
            .source_config::<C>()
            .unwrap()
            .is_none());
    }

    #[test]
    fn tasks_must_be_real_and_every_problem_is_reported() {
        let f = parse(
            "max_pending = 0\n\n[[task]]\nname = \"splitt\"\n\n[[task]]\nname = \"count\"\nworkers = 0\n",
        )
        .unwrap();
        let e = f.check(&dag()).unwrap_err().to_string();
        assert!(
            e.contains("line 4: [[task]] name = \"splitt\" is not a task of this topology; its tasks are: split, count"),
            "{e}"
        );
        assert!(
            e.contains("line 7: [[task]] \"count\": workers must be at least 1"),
            "{e}"
        );
        assert!(e.contains("max_pending must be at least 1"), "{e}");
    }

    #[test]
    fn bad_policies_are_rejected() {
        let e = parse("failure_policy = \"sometimes\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("failure_policy") || e.contains("sometimes"),
            "{e}"
        );
    }
}
