//! `Topology.toml`: the file a topology package reads its settings from.
//!
//! Two stages: [`FileConfig`] is the file as written (typed, unknown keys
//! rejected); [`ConfigFile::check`] validates it against the package's
//! pipeline (a `[[task]]` must name a real task). A file that is not TOML at
//! all is one error, with its line and column. Otherwise every problem is
//! collected, not just the first: each unknown key at any level (with the
//! closest known key, when one is close), each value of the wrong type or
//! out of range, each failed check, and, when the topology is built, each
//! problem of `[source.config]` against the source's typed configuration.
//! They are reported together, each once, in the order of the file, one a
//! line:
//!
//! ```text
//! 3 problems in Topology.toml:
//!   Topology.toml:2: max_pendng: unknown key; did you mean max_pending?
//!   Topology.toml:3: failure_policy: "retry" needs a count, as a table: write failure_policy = { retry = 3 }; the other policies are "none" and "best_effort"
//!   Topology.toml:7: source.config.cont: unknown key; did you mean count?
//! ```
//!
//! Precedence, lowest first: the builder's compiled defaults, this file,
//! `TEMPEST_*` environment variables, command-line flags. `[source.config]`
//! merges over the configuration compiled into the package
//! ([`TopologyBuilder::source_config`](crate::TopologyBuilder::source_config)):
//! the keys the file sets win, the others keep their compiled values;
//! tables merge key by key, arrays and plain values replace.
//!
//! ```toml
//! name = "wordcount"
//! host = "127.0.0.1"
//! port = 9311
//! graceful_shutdown = 30000   # ms
//! checkpoint_interval = 1000  # ms: keyed state's checkpoints (durable backends)
//! at_most_once_updates = false  # apply each state update at most once (needs a backend that records them)
//! source_connect_timeout = 60000  # ms the source may be unreachable at start; 0: forever
//! failure_policy = { retry = 3 }   # or "none", "best_effort"
//! msg_timeout = 30000         # ms; 0 for none
//! max_pending = 16384
//! secret = "change me"
//! max_handshakes = 64         # connections allowed in the handshake at once
//!
//! [source.config]             # merged over the source's compiled config
//! count = 1000
//!
//! [[task]]
//! name = "words"
//! workers = 2                 # standalone: threads; task: connections
//! poll_count = 1024           # most messages per fetch
//! poll_interval = 100         # ms: first reconnect wait of a task worker
//! max_backoff = 5000          # ms: longest reconnect wait
//! exit_with_topology = false  # task workers stop when the topology stops
//! tick_interval = 1000        # ms: sync tasks only: call Task::tick this often
//!
//! [[task]]
//! name = "fetch"              # an async task
//! concurrency = 256           # messages each worker keeps in flight (default 64)
//!
//! [[edge]]                    # an edge of the package's pipeline
//! from = "words"
//! to = "count"
//! grouping = "key"            # shuffle, key, all, global or partial_key
//! ```
//!
//! How every problem is found: serde stops at the first error, so the file
//! is deserialized again after each one with the offending entry blanked
//! out (replaced by spaces, so every other byte keeps its offset and line),
//! until it deserializes. Each error's span is located in the parsed
//! document ([`toml_edit`]) to name its key and line.

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use toml::Spanned;
use toml_edit::{ImDocument, Item, TableLike, Value};

use crate::error::Error;
use crate::grouping::Grouping;
use crate::pipeline::Dag;
use crate::policy::FailurePolicy;

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
    /// Milliseconds between checkpoints of keyed state (durable backends).
    pub checkpoint_interval: Option<u64>,
    /// Whether each update of keyed state is applied at most once.
    pub at_most_once_updates: Option<bool>,
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
    /// `[[edge]]`: per-edge settings (the edges themselves are the
    /// package's).
    #[serde(default)]
    pub edge: Vec<EdgeSection>,
    /// `[metric]`: the metrics backends.
    pub metric: Option<crate::metrics::MetricsConfig>,
}

/// `[source]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    /// `[source.config]`, merged over the source's compiled configuration
    /// and parsed into its typed configuration when the topology is built.
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
    /// Async tasks only: messages each worker keeps in flight.
    pub concurrency: Option<usize>,
    /// Milliseconds: sync tasks only: how often each worker ticks.
    pub tick_interval: Option<u64>,
}

/// One `[[edge]]`: how an edge of the package's pipeline spreads messages
/// over its child's workers.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeSection {
    /// The producing task.
    pub from: Spanned<String>,
    /// The consuming task.
    pub to: String,
    /// `"shuffle"`, `"key"`, `"all"`, `"global"` or `"partial_key"`.
    pub grouping: Option<Grouping>,
}

pub use crate::error::ConfigProblem;

/// The edges of `dag`, as `"a" -> "b"`.
fn dag_edges(dag: &Dag) -> Vec<String> {
    (0..dag.len() as crate::msg::TaskIdx)
        .flat_map(|a| {
            dag.children(a)
                .iter()
                .map(move |&b| format!("\"{}\" -> \"{}\"", dag.name(a), dag.name(b)))
        })
        .collect()
}

/// Sorts problems by line (those without one last) and drops repeats.
pub(crate) fn in_file_order(mut problems: Vec<ConfigProblem>) -> Vec<ConfigProblem> {
    problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
    let mut out: Vec<ConfigProblem> = Vec::with_capacity(problems.len());
    for p in problems {
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// A loaded `Topology.toml`: where it came from, its text, its contents.
#[derive(Clone, Debug)]
pub struct ConfigFile {
    /// The file's path.
    pub path: PathBuf,
    /// The file's text (the source's typed config is parsed from it, so
    /// its errors carry lines too).
    pub text: String,
    /// The parsed file, without the entries listed in `problems`.
    pub config: FileConfig,
    /// What is wrong with the file on its own (unknown keys, wrong types,
    /// bad values); [`ConfigFile::check`] and
    /// [`TopologyBuilder::build`](crate::TopologyBuilder::build) report
    /// these with the rest. Empty after [`ConfigFile::load`] and
    /// [`ConfigFile::parse`], which fail instead.
    pub problems: Vec<ConfigProblem>,
}

impl ConfigFile {
    /// Reads and parses `path`; fails with every problem of the file if it
    /// has any.
    pub fn load(path: &Path) -> Result<Self, Error> {
        Self::load_lenient(path)?.strict()
    }

    /// Parses `text`, read from `path`; fails with every problem of the
    /// file if it has any.
    pub fn parse(path: &Path, text: String) -> Result<Self, Error> {
        Self::parse_lenient(path, text)?.strict()
    }

    /// Reads and parses `path`, keeping what it can: fails only if the file
    /// cannot be read or is not TOML; other problems are kept in
    /// [`ConfigFile::problems`] so they are reported with the checks.
    pub fn load_lenient(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::config(path, format!("cannot read it: {e}")))?;
        Self::parse_lenient(path, text)
    }

    /// [`ConfigFile::load_lenient`] for `text`, read from `path`.
    pub fn parse_lenient(path: &Path, text: String) -> Result<Self, Error> {
        let nodes = match nodes(&text) {
            Ok(nodes) => nodes,
            Err(e) => {
                let at = e.span().map(|s| position(&text, s.start));
                let message = e.message().trim().replace('\n', "; ");
                return Err(Error::Config {
                    file: path.to_path_buf(),
                    problems: vec![ConfigProblem {
                        line: at.map(|(line, _)| line),
                        column: at.map(|(_, column)| column),
                        key: None,
                        message: format!("not valid TOML: {message}"),
                    }],
                });
            }
        };
        let (config, found) = collect::<FileConfig>(&text, &nodes);
        let problems = found
            .into_iter()
            .map(|f| {
                ConfigProblem::new(
                    f.at.map(|at| line_at(&text, at)),
                    key_of(&f.path),
                    f.message,
                )
            })
            .collect();
        Ok(ConfigFile {
            path: path.to_path_buf(),
            text,
            config: config.unwrap_or_default(),
            problems,
        })
    }

    fn strict(self) -> Result<Self, Error> {
        if self.problems.is_empty() {
            Ok(self)
        } else {
            Err(self.error(self.problems.clone()))
        }
    }

    pub(crate) fn error(&self, problems: Vec<ConfigProblem>) -> Error {
        Error::Config {
            file: self.path.clone(),
            problems: in_file_order(problems),
        }
    }

    /// Checks the file against the package's pipeline; reports every
    /// problem (those found while parsing too), each with its line.
    pub fn check(&self, dag: &Dag) -> Result<(), Error> {
        let problems = self.problems_with(dag);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(self.error(problems))
        }
    }

    /// The parsing problems and those of the checks against `dag`.
    pub(crate) fn problems_with(&self, dag: &Dag) -> Vec<ConfigProblem> {
        let mut problems = self.problems.clone();
        let nodes = nodes(&self.text).unwrap_or_default();
        let line_of = |path: &[Seg]| line_of_path(&self.text, &nodes, path);
        let top = |key: &str, message: String| {
            let path = [Seg::Key(key.to_string())];
            ConfigProblem::new(line_of(&path), Some(key.to_string()), message)
        };
        let c = &self.config;
        let mut seen: Vec<&str> = Vec::new();
        for t in &c.task {
            let name = t.name.get_ref().as_str();
            // The [[task]] element holding this name (elements with
            // problems may have been left out of `c.task`).
            let at = t.name.span();
            let element = nodes.iter().find(|n| {
                n.path.len() == 2
                    && n.path[0] == Seg::key("task")
                    && n.span
                        .as_ref()
                        .is_some_and(|s| s.start <= at.start && at.end <= s.end)
            });
            let task_key = |key: &str| {
                let line = element
                    .and_then(|e| {
                        let mut path = e.path.clone();
                        path.push(Seg::key(key));
                        line_of(&path)
                    })
                    .unwrap_or_else(|| line_at(&self.text, at.start));
                (Some(line), Some(format!("task.{key}")))
            };
            let (line, key) = task_key("name");
            if dag.index_of(name).is_none() {
                problems.push(ConfigProblem::new(
                    line,
                    key.clone(),
                    format!(
                        "\"{name}\" is not a task of this topology; its tasks are: {}",
                        dag.names().join(", ")
                    ),
                ));
            }
            if seen.contains(&name) {
                problems.push(ConfigProblem::new(
                    line,
                    key,
                    format!("\"{name}\" is given twice; merge its [[task]] sections"),
                ));
            }
            seen.push(name);
            if t.workers == Some(0) {
                let (line, key) = task_key("workers");
                problems.push(ConfigProblem::new(
                    line,
                    key,
                    format!("must be at least 1 (task \"{name}\")"),
                ));
            }
            if let (Some(n), Some(i)) = (t.concurrency, dag.index_of(name)) {
                let problem = if !dag.is_async(i) {
                    Some(format!(
                        "task \"{name}\" is a sync task; only async tasks take a concurrency"
                    ))
                } else if n == 0 {
                    Some(format!("must be at least 1 (task \"{name}\")"))
                } else {
                    None
                };
                if let Some(problem) = problem {
                    let (line, key) = task_key("concurrency");
                    problems.push(ConfigProblem::new(line, key, problem));
                }
            }
            if let (Some(ms), Some(i)) = (t.tick_interval, dag.index_of(name)) {
                let problem = if dag.is_async(i) {
                    Some(format!(
                        "task \"{name}\" is an async task; only sync tasks tick"
                    ))
                } else if ms == 0 {
                    Some(format!("must be at least 1 ms (task \"{name}\")"))
                } else {
                    None
                };
                if let Some(problem) = problem {
                    let (line, key) = task_key("tick_interval");
                    problems.push(ConfigProblem::new(line, key, problem));
                }
            }
            if t.poll_count == Some(0) {
                let (line, key) = task_key("poll_count");
                problems.push(ConfigProblem::new(
                    line,
                    key,
                    format!("must be at least 1 (task \"{name}\")"),
                ));
            }
        }
        let mut edges_seen: Vec<(&str, &str)> = Vec::new();
        for e in &c.edge {
            let (from, to) = (e.from.get_ref().as_str(), e.to.as_str());
            let at = e.from.span();
            let element = nodes.iter().find(|n| {
                n.path.len() == 2
                    && n.path[0] == Seg::key("edge")
                    && n.span
                        .as_ref()
                        .is_some_and(|s| s.start <= at.start && at.end <= s.end)
            });
            let edge_key = |key: &str| {
                let line = element
                    .and_then(|el| {
                        let mut path = el.path.clone();
                        path.push(Seg::key(key));
                        line_of(&path)
                    })
                    .unwrap_or_else(|| line_at(&self.text, at.start));
                (Some(line), Some(format!("edge.{key}")))
            };
            let known = match (dag.index_of(from), dag.index_of(to)) {
                (Some(a), Some(b)) => dag.children(a).contains(&b),
                _ => false,
            };
            if !known {
                let (line, key) = edge_key("from");
                problems.push(ConfigProblem::new(
                    line,
                    key,
                    format!(
                        "\"{from}\" -> \"{to}\" is not an edge of this topology; its edges are: {}",
                        dag_edges(dag).join(", ")
                    ),
                ));
            } else if edges_seen.contains(&(from, to)) {
                let (line, key) = edge_key("from");
                problems.push(ConfigProblem::new(
                    line,
                    key,
                    format!("\"{from}\" -> \"{to}\" is given twice; merge its [[edge]] sections"),
                ));
            }
            edges_seen.push((from, to));
            if let (true, Some(b)) = (known, dag.index_of(to)) {
                if dag.is_join(b) {
                    let groupings: Vec<Grouping> =
                        dag.parents(b).iter().map(|&p| dag.grouping(p, b)).collect();
                    if groupings.windows(2).any(|w| w[0] != w[1]) {
                        let (line, key) = edge_key("grouping");
                        let each: Vec<String> = dag
                            .parents(b)
                            .iter()
                            .zip(&groupings)
                            .map(|(&p, g)| format!("\"{}\" -> \"{to}\" is {g}", dag.name(p)))
                            .collect();
                        problems.push(ConfigProblem::new(
                            line,
                            key,
                            format!(
                                "the edges into join task \"{to}\" must group alike: {}",
                                each.join(", ")
                            ),
                        ));
                    }
                }
            }
        }
        if c.checkpoint_interval == Some(0) {
            problems.push(top(
                "checkpoint_interval",
                "must be at least 1 ms".to_string(),
            ));
        }
        if c.max_pending == Some(0) {
            problems.push(top("max_pending", "must be at least 1".to_string()));
        }
        if c.max_frame.is_some_and(|m| m < crate::msg::MIN_FRAME_LIMIT) {
            problems.push(top(
                "max_frame",
                format!("must be at least {} bytes", crate::msg::MIN_FRAME_LIMIT),
            ));
        }
        if c.max_handshakes == Some(0) {
            problems.push(top("max_handshakes", "must be at least 1".to_string()));
        }
        if c.heartbeat == Some(0) {
            problems.push(top("heartbeat", "must be at least 1 ms".to_string()));
        }
        if c.secret.as_deref() == Some("") {
            problems.push(top(
                "secret",
                "must not be empty (leave it out for none)".to_string(),
            ));
        }
        if let Some(metric) = &c.metric {
            let metric_line = line_of(&[Seg::key("metric")]);
            for p in metric.problems() {
                // "target 2 (statsd): host is empty" or "flush_interval ...".
                let target = p
                    .strip_prefix("target ")
                    .and_then(|rest| rest.split_once(' '))
                    .and_then(|(n, _)| n.parse::<usize>().ok())
                    .filter(|n| *n > 0);
                let (path, key) = match target {
                    Some(n) => (
                        vec![Seg::key("metric"), Seg::key("target"), Seg::Index(n - 1)],
                        "metric.target".to_string(),
                    ),
                    None => (vec![Seg::key("metric")], "metric".to_string()),
                };
                // "flush_interval must be .." names a key of [metric].
                let (path, key, message) = match p.split_once(' ') {
                    Some((first, rest)) if target.is_none() => {
                        let mut at = path.clone();
                        at.push(Seg::key(first));
                        if nodes.iter().any(|n| n.path == at) {
                            (at, format!("{key}.{first}"), rest.to_string())
                        } else {
                            (path, key, p.clone())
                        }
                    }
                    _ => (path, key, p.clone()),
                };
                problems.push(ConfigProblem::new(
                    line_of(&path).or(metric_line),
                    Some(key),
                    message,
                ));
            }
        }
        problems
    }

    /// The `[[task]]` section for `task`, if any.
    pub fn task(&self, task: &str) -> Option<&TaskSection> {
        self.config.task.iter().find(|t| t.name.get_ref() == task)
    }

    /// The groupings the file sets, as `(from, to, grouping)`.
    pub fn groupings(&self) -> impl Iterator<Item = (&str, &str, Grouping)> {
        self.config
            .edge
            .iter()
            .filter_map(|e| Some((e.from.get_ref().as_str(), e.to.as_str(), e.grouping?)))
    }

    /// Parses `[source.config]` on its own into the source's typed
    /// configuration, `None` if the file has none. Fails with every
    /// problem, each with its line and key.
    pub fn source_config<C: DeserializeOwned>(&self) -> Result<Option<C>, Error> {
        self.typed_source_config(toml::Table::new())
            .map_err(|p| self.error(p))
    }

    /// `[source.config]` merged over `compiled`, the configuration compiled
    /// into the package: keys the file sets win, the others keep their
    /// compiled values (tables merge key by key, arrays and plain values
    /// replace). `compiled` as it is if the file has no `[source.config]`.
    /// Fails with every problem, each with its line and key.
    pub fn source_config_over<C: Serialize + DeserializeOwned>(
        &self,
        compiled: C,
    ) -> Result<C, Error> {
        self.merged_source_config(compiled)
            .map_err(|p| self.error(p))
    }

    pub(crate) fn merged_source_config<C: Serialize + DeserializeOwned>(
        &self,
        compiled: C,
    ) -> Result<C, Vec<ConfigProblem>> {
        if !self.has_source_config() {
            return Ok(compiled);
        }
        let base = toml::Table::try_from(&compiled).map_err(|e| {
            vec![self.source_problem(format!(
                "cannot merge it: the configuration compiled into the package has no TOML form ({e})"
            ))]
        })?;
        Ok(self.typed_source_config(base)?.unwrap_or(compiled))
    }

    /// A problem with `[source.config]` as a whole.
    pub(crate) fn source_problem(&self, message: String) -> ConfigProblem {
        let nodes = nodes(&self.text).unwrap_or_default();
        let path = [Seg::key("source"), Seg::key("config")];
        ConfigProblem::new(
            line_of_path(&self.text, &nodes, &path),
            Some("source.config".to_string()),
            message,
        )
    }

    fn typed_source_config<C: DeserializeOwned>(
        &self,
        mut merged: toml::Table,
    ) -> Result<Option<C>, Vec<ConfigProblem>> {
        let Some(table) = self.config.source.as_ref().and_then(|s| s.config.as_ref()) else {
            return Ok(None);
        };
        merge(&mut merged, table.clone());
        let text = toml::to_string(&merged)
            .map_err(|e| vec![self.source_problem(format!("cannot merge it: {e}"))])?;
        let merged_nodes =
            nodes(&text).map_err(|e| vec![self.source_problem(format!("cannot merge it: {e}"))])?;
        let (config, found) = collect::<C>(&text, &merged_nodes);
        if found.is_empty() {
            return config
                .map(Some)
                .ok_or_else(|| vec![self.source_problem("cannot be read".to_string())]);
        }
        // The merged table's paths are the file's under [source.config]
        // (an array comes whole from one side, so its indices match too).
        let file_nodes = nodes(&self.text).unwrap_or_default();
        Err(found
            .into_iter()
            .map(|f| {
                let mut path = vec![Seg::key("source"), Seg::key("config")];
                path.extend(f.path);
                let in_file = file_nodes.iter().any(|n| n.path == path);
                let mut message = f.message;
                if !in_file && !message.starts_with(MISSING) {
                    message.push_str(" (in the configuration compiled into the package)");
                }
                ConfigProblem::new(
                    line_of_path(&self.text, &file_nodes, &path),
                    key_of(&path),
                    message,
                )
            })
            .collect())
    }

    /// Whether the file has a `[source.config]` table.
    pub fn has_source_config(&self) -> bool {
        self.config
            .source
            .as_ref()
            .is_some_and(|s| s.config.is_some())
    }
}

/// Merges `over` into `base`: tables key by key, anything else replaces.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// One step of a key's path: a key, or an index into an array.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

impl Seg {
    fn key(key: &str) -> Self {
        Seg::Key(key.to_string())
    }
}

/// The dotted path of a key, as written in TOML (indices left out: the
/// line tells which element).
fn key_of(path: &[Seg]) -> Option<String> {
    let keys: Vec<String> = path
        .iter()
        .filter_map(|s| match s {
            Seg::Key(k)
                if !k.is_empty()
                    && k.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
            {
                Some(k.clone())
            }
            Seg::Key(k) => Some(format!("{k:?}")),
            Seg::Index(_) => None,
        })
        .collect();
    (!keys.is_empty()).then(|| keys.join("."))
}

/// An entry of a parsed document: a key and its value, a table, an element
/// of an array.
#[derive(Clone, Debug, Default)]
struct Node {
    path: Vec<Seg>,
    /// The key's span.
    key: Option<Range<usize>>,
    /// The value's span (a table's includes its header).
    span: Option<Range<usize>>,
    /// What to blank out to leave the entry out; empty if it cannot be
    /// left out alone (an element of an inline array).
    blank: Vec<Blank>,
}

/// A range to blank out; in an inline table, with a comma next to it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Blank {
    range: Range<usize>,
    inline: bool,
}

impl Blank {
    /// Blanks the range out of `bytes` (keeping newlines, so lines stay)
    /// and, in an inline table, the comma after it, else the one before
    /// it, so the table stays valid TOML. Whether anything changed.
    fn apply(&self, bytes: &mut [u8]) -> bool {
        let end = self.range.end.min(bytes.len());
        let start = self.range.start.min(end);
        let mut range = start..end;
        if self.inline {
            let is_space = |b: &u8| *b == b' ' || *b == b'\t';
            let after = bytes[end..]
                .iter()
                .position(|b| !is_space(b))
                .map(|i| end + i);
            let before = bytes[..start].iter().rposition(|b| !is_space(b));
            match (after, before) {
                (Some(i), _) if bytes[i] == b',' => range.end = i + 1,
                (_, Some(i)) if bytes[i] == b',' => range.start = i,
                _ => {}
            }
        }
        let mut changed = false;
        for b in &mut bytes[range] {
            if *b != b'\n' && *b != b' ' {
                *b = b' ';
                changed = true;
            }
        }
        changed
    }
}

impl Node {
    /// Where it starts: its key, else its value.
    fn start(&self) -> Option<usize> {
        self.key.as_ref().or(self.span.as_ref()).map(|s| s.start)
    }
}

/// Every entry of `text`, parents before their children.
fn nodes(text: &str) -> Result<Vec<Node>, toml_edit::TomlError> {
    let doc = ImDocument::parse(text)?;
    let mut out = Vec::new();
    walk_table(doc.as_table(), &mut Vec::new(), false, text, &mut out);
    Ok(out)
}

fn walk_table(
    table: &dyn TableLike,
    path: &mut Vec<Seg>,
    inline: bool,
    text: &str,
    out: &mut Vec<Node>,
) {
    for (name, item) in table.iter() {
        let key = table.get_key_value(name).and_then(|(k, _)| k.span());
        path.push(Seg::key(name));
        let at = out.len();
        let mut node = Node {
            path: path.clone(),
            key: key.clone(),
            ..Node::default()
        };
        match item {
            Item::None => {}
            Item::Value(v) => {
                node.span = v.span();
                if let (Some(k), Some(v)) = (&key, v.span()) {
                    node.blank.push(Blank {
                        range: entry_range(text, k.start, v.end, inline),
                        inline,
                    });
                }
                out.push(node);
                walk_value(v, path, text, out);
            }
            Item::Table(t) => {
                node.span = t.span();
                if !t.is_dotted() && !t.is_implicit() {
                    node.blank.extend(t.span().map(|range| Blank {
                        range,
                        inline: false,
                    }));
                }
                out.push(node);
                walk_table(t, path, false, text, out);
            }
            Item::ArrayOfTables(a) => {
                node.span = a.span();
                out.push(node);
                for (i, t) in a.iter().enumerate() {
                    path.push(Seg::Index(i));
                    out.push(Node {
                        path: path.clone(),
                        key: None,
                        span: t.span(),
                        blank: t
                            .span()
                            .map(|range| Blank {
                                range,
                                inline: false,
                            })
                            .into_iter()
                            .collect(),
                    });
                    walk_table(t, path, false, text, out);
                    path.pop();
                }
            }
        }
        // Without a range of its own (a dotted or implicit table, an array
        // of tables), an entry is left out by leaving out its children.
        if out.get(at).is_some_and(|n| n.blank.is_empty()) {
            let children: Vec<Blank> = out[at + 1..]
                .iter()
                .filter(|n| n.path.len() == path.len() + 1)
                .flat_map(|n| n.blank.iter().cloned())
                .collect();
            if let Some(n) = out.get_mut(at) {
                n.blank = children;
            }
        }
        path.pop();
    }
}

fn walk_value(value: &Value, path: &mut Vec<Seg>, text: &str, out: &mut Vec<Node>) {
    match value {
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                path.push(Seg::Index(i));
                out.push(Node {
                    path: path.clone(),
                    key: None,
                    span: v.span(),
                    blank: Vec::new(),
                });
                walk_value(v, path, text, out);
                path.pop();
            }
        }
        Value::InlineTable(t) => walk_table(t, path, true, text, out),
        _ => {}
    }
}

/// The text of the entry `key = value` from the key's start to the value's
/// end: from the start of its line (a dotted key's first part is there),
/// or in an inline table from the separator before it.
fn entry_range(text: &str, key_start: usize, value_end: usize, inline: bool) -> Range<usize> {
    let bytes = text.as_bytes();
    let key_start = key_start.min(bytes.len());
    let value_end = value_end.clamp(key_start, bytes.len());
    let before = &bytes[..key_start];
    let start = if inline {
        before
            .iter()
            .rposition(|&b| b == b',' || b == b'{')
            .map_or(key_start, |i| i + 1)
    } else {
        before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1)
    };
    start..value_end
}

/// The line (from 1) of byte `offset`.
fn line_at(text: &str, offset: usize) -> usize {
    position(text, offset).0
}

/// The line and column (from 1) of byte `offset`.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let before = text.as_bytes().get(..offset).unwrap_or(text.as_bytes());
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
    (line, column)
}

/// The line of the entry at `path`, else of the closest entry above it.
fn line_of_path(text: &str, nodes: &[Node], path: &[Seg]) -> Option<usize> {
    (1..=path.len()).rev().find_map(|len| {
        nodes
            .iter()
            .find(|n| n.path == path[..len])
            .and_then(Node::start)
            .map(|at| line_at(text, at))
    })
}

/// A problem found while deserializing: the entry's path, where it starts,
/// what is wrong.
#[derive(Debug)]
struct Found {
    path: Vec<Seg>,
    at: Option<usize>,
    message: String,
}

const MISSING: &str = "required key is missing";

/// Deserializes a `T` from `text`, collecting every problem instead of the
/// first: after each error, the entry it points at is blanked out (its
/// bytes replaced by spaces, so offsets and lines stay) and the text is
/// deserialized again. Returns the value once the rest deserializes, and
/// every problem found on the way.
fn collect<T: DeserializeOwned>(text: &str, nodes: &[Node]) -> (Option<T>, Vec<Found>) {
    let mut bytes = text.as_bytes().to_vec();
    let mut found: Vec<Found> = Vec::new();
    let mut dropped: Vec<Vec<Seg>> = Vec::new();
    // Each round blanks out at least one entry, so this bounds the rounds.
    for _ in 0..nodes.len() + 2 {
        let current = String::from_utf8_lossy(&bytes);
        let error = match toml::from_str::<T>(&current) {
            Ok(value) => return (Some(value), found),
            Err(e) => e,
        };
        let message = error.message().to_string();
        let span = error.span();
        let node = span.as_ref().and_then(|s| locate(nodes, s));
        // An error about a table an entry was left out of follows from
        // that (an empty `{ retry = .. }`): already reported.
        let knock_on = node.is_some_and(|n| {
            dropped
                .iter()
                .any(|d| d.len() > n.path.len() && d.starts_with(&n.path))
        }) && quoted(&message, "unknown field `").is_none()
            && quoted(&message, "missing field `").is_none();
        let base = node.map(|n| n.path.clone()).unwrap_or_default();
        let base_at = node
            .and_then(Node::start)
            .or(span.as_ref().map(|s| s.start));
        // What the problem is about, and the entry to leave out.
        let subject = if let Some(name) = quoted(&message, "missing field `") {
            let mut path = base.clone();
            path.push(Seg::key(name));
            // A key left out for a bad value is missing now: reported.
            if !dropped.contains(&path) {
                found.push(Found {
                    path,
                    at: base_at,
                    message: MISSING.to_string(),
                });
            }
            node
        } else {
            let subject = match (quoted(&message, "unknown field `"), node) {
                // The error points at a table whose keys serde saw only
                // as a whole (an internally tagged enum): find the key.
                (Some(name), Some(n)) if n.key.as_ref() != span.as_ref() => nodes
                    .iter()
                    .find(|c| {
                        c.path.len() > n.path.len()
                            && c.path.starts_with(&n.path)
                            && c.path.last() == Some(&Seg::key(name))
                            && !dropped.iter().any(|d| c.path.starts_with(d))
                    })
                    .or(node),
                _ => node,
            };
            if !knock_on {
                found.push(Found {
                    path: subject.map(|n| n.path.clone()).unwrap_or_default(),
                    at: subject.and_then(Node::start).or(base_at),
                    message: describe(&message),
                });
            }
            subject
        };
        // Leave out the entry, or the closest one above it that can be.
        let Some(subject) = subject else {
            return (None, found);
        };
        let Some(gone) = (0..=subject.path.len()).rev().find_map(|len| {
            nodes
                .iter()
                .find(|n| n.path == subject.path[..len] && !n.blank.is_empty())
        }) else {
            return (None, found);
        };
        dropped.push(gone.path.clone());
        let mut changed = false;
        for blank in &gone.blank {
            changed |= blank.apply(&mut bytes);
        }
        // Blanking keeps the text TOML; if it ever did not, stop rather
        // than report the damage as the file's.
        if !changed || ImDocument::parse(String::from_utf8_lossy(&bytes).as_ref()).is_err() {
            return (None, found);
        }
    }
    (None, found)
}

/// The deepest entry an error's span points at: its key, or inside its
/// value.
fn locate<'a>(nodes: &'a [Node], span: &Range<usize>) -> Option<&'a Node> {
    nodes
        .iter()
        .filter(|n| {
            n.key.as_ref() == Some(span)
                || n.span
                    .as_ref()
                    .is_some_and(|s| s.start <= span.start && span.end <= s.end)
        })
        .max_by_key(|n| (n.path.len(), n.key.as_ref() == Some(span)))
}

/// The text between `prefix` and the next backtick.
fn quoted<'m>(message: &'m str, prefix: &str) -> Option<&'m str> {
    let rest = message.strip_prefix(prefix)?;
    rest.split_once('`').map(|(name, _)| name)
}

/// serde's message, in the file's terms: unknown keys and values with the
/// closest known one, Rust's integer types as ranges.
fn describe(message: &str) -> String {
    let expected: Vec<&str> = message
        .split_once(", expected ")
        .map(|(_, list)| list.split('`').skip(1).step_by(2).collect())
        .unwrap_or_default();
    if let Some(name) = quoted(message, "unknown field `") {
        return match closest(name, &expected) {
            Some(near) => format!("unknown key; did you mean {near}?"),
            None if expected.is_empty() => "unknown key; this table takes none".to_string(),
            None => format!("unknown key; the keys are: {}", expected.join(", ")),
        };
    }
    if let Some(name) = quoted(message, "unknown variant `") {
        let list: Vec<String> = expected.iter().map(|e| format!("\"{e}\"")).collect();
        return match closest(name, &expected) {
            Some(near) => format!("unknown value \"{name}\"; did you mean \"{near}\"?"),
            None => format!("unknown value \"{name}\"; expected {}", list.join(", ")),
        };
    }
    const TYPES: [(&str, &str); 10] = [
        ("u8", "a whole number from 0 to 255"),
        ("u16", "a whole number from 0 to 65535"),
        ("u32", "a whole number from 0 to 4294967295"),
        ("u64", "a whole number, 0 or more"),
        ("usize", "a whole number, 0 or more"),
        ("i32", "a whole number"),
        ("i64", "a whole number"),
        ("isize", "a whole number"),
        ("f32", "a number"),
        ("f64", "a number"),
    ];
    for (rust, plain) in TYPES {
        if let Some(head) = message.strip_suffix(&format!("expected {rust}")) {
            return format!("{head}expected {plain}");
        }
    }
    message.trim().to_string()
}

/// The known name closest to `name`, if it is close enough to be a typo.
fn closest<'k>(name: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(name, k), *k))
        .filter(|(d, k)| {
            *d < name.chars().count()
                && *d <= (k.chars().count().max(name.chars().count()) / 3).max(1)
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Edit distance with adjacent swaps (`hots` is one edit from `host`).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // d[i][j]: the distance of a[..i] and b[..j].
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
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

    fn lenient(text: &str) -> ConfigFile {
        ConfigFile::parse_lenient(Path::new("Topology.toml"), text.to_string()).unwrap()
    }

    /// Every problem as `Topology.toml:LINE: key: message`.
    fn lines(e: &Error) -> Vec<String> {
        match e {
            Error::Config { file, problems } => problems.iter().map(|p| p.at(file)).collect(),
            other => panic!("not a config error: {other}"),
        }
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct C {
        uri: String,
        key: String,
        count: u32,
        #[serde(default)]
        consumer: Option<String>,
        #[serde(default)]
        tags: Vec<String>,
        #[serde(default)]
        ack: Option<tempest_source::AckPolicy>,
        #[serde(default)]
        nested: Option<Nested>,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq, Default)]
    #[serde(deny_unknown_fields)]
    struct Nested {
        a: Option<u32>,
        b: Option<u32>,
    }

    fn compiled() -> C {
        C {
            uri: "redis://db:6379".into(),
            key: "jobs".into(),
            count: 10,
            consumer: None,
            tags: vec!["x".into(), "y".into()],
            ack: Some(tempest_source::AckPolicy::Batch(100)),
            nested: Some(Nested {
                a: Some(1),
                b: None,
            }),
        }
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
        struct Count {
            count: u32,
        }
        assert_eq!(
            f.source_config::<Count>().unwrap(),
            Some(Count { count: 5 })
        );
        let p = parse("failure_policy = \"best_effort\"").unwrap();
        assert_eq!(p.config.failure_policy, Some(FailurePolicy::BestEffort));
        let p = parse("failure_policy = \"none\"").unwrap();
        assert_eq!(p.config.failure_policy, Some(FailurePolicy::None));
    }

    #[test]
    fn unknown_keys_name_the_file_the_key_and_the_line() {
        let e = parse("name = \"x\"\nmax_pendng = 3\n").unwrap_err();
        assert_eq!(
            lines(&e),
            ["Topology.toml:2: max_pendng: unknown key; did you mean max_pending?"]
        );
        assert_eq!(
            e.to_string(),
            "Topology.toml:2: max_pendng: unknown key; did you mean max_pending?"
        );
        let e = parse("[[task]]\nname = \"split\"\nworker = 2\n").unwrap_err();
        assert_eq!(
            lines(&e),
            ["Topology.toml:3: task.worker: unknown key; did you mean workers?"]
        );
    }

    /// Issue 10: serde stopped at the first unknown key.
    #[test]
    fn every_unknown_key_wrong_type_and_bad_value_is_reported_once() {
        let text = r#"name = "x"
max_pendng = 3
port = "high"
frobnicate = true
failure_policy = "sometimes"

[source]
confg = 1

[[task]]
name = "split"
workrs = 2
poll_count = -1

[[task]]
workers = 1

[metric]
flush = 5
target = [{ type = "statsd", hots = "h", prefx = "p" }, { type = "log" }]

[[metric.extra]]
a = 1
"#;
        let e = parse(text).unwrap_err();
        let got = lines(&e);
        let want = [
            "Topology.toml:2: max_pendng: unknown key; did you mean max_pending?",
            "Topology.toml:3: port: invalid type: string \"high\", expected a whole number from 0 to 65535",
            "Topology.toml:4: frobnicate: unknown key; the keys are: name, host, port, graceful_shutdown, checkpoint_interval, at_most_once_updates, source_connect_timeout, failure_policy, msg_timeout, max_pending, secret, max_frame, heartbeat, handshake_timeout, max_handshakes, retry_backoff, max_retry_backoff, source, task, edge, metric",
            "Topology.toml:5: failure_policy: unknown policy \"sometimes\"; write failure_policy = { retry = 3 } (retry up to 3 times), \"none\" or \"best_effort\"",
            "Topology.toml:8: source.confg: unknown key; did you mean config?",
            "Topology.toml:12: task.workrs: unknown key; did you mean workers?",
            "Topology.toml:13: task.poll_count: invalid value: integer `-1`, expected a whole number, 0 or more",
            "Topology.toml:15: task.name: required key is missing",
            "Topology.toml:19: metric.flush: unknown key; the keys are: flush_interval, target",
            "Topology.toml:20: metric.target.hots: unknown key; did you mean host?",
            "Topology.toml:20: metric.target.prefx: unknown key; did you mean prefix?",
            "Topology.toml:20: metric.target.host: required key is missing",
            "Topology.toml:22: metric.extra: unknown key; the keys are: flush_interval, target",
        ];
        assert_eq!(got, want, "{e}");
        assert!(
            e.to_string()
                .starts_with("13 problems in Topology.toml:\n  Topology.toml:2: max_pendng"),
            "{e}"
        );
        // Leniently, the rest of the file is kept and checked too.
        let f = lenient(text);
        assert_eq!(f.config.name.as_deref(), Some("x"));
        assert_eq!(f.task("split").map(|t| t.workers), Some(None));
        let e = f.check(&dag()).unwrap_err();
        assert_eq!(lines(&e), want);
    }

    #[test]
    fn syntax_errors_are_one_error_with_line_and_column() {
        let e = parse("name = \"x\"\nport = \n").unwrap_err();
        let got = lines(&e);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].starts_with("Topology.toml:2:8: not valid TOML: "),
            "{got:?}"
        );
        assert!(!got[0].contains('\n'), "{got:?}");
    }

    #[test]
    fn failure_policy_errors_show_the_right_form() {
        for (text, want) in [
            ("failure_policy = \"retry\"", "\"retry\" needs a count, as a table: write failure_policy = { retry = 3 }; the other policies are \"none\" and \"best_effort\""),
            ("failure_policy = \"retry(5)\"", "write failure_policy = { retry = 5 }"),
            ("failure_policy = { retry = \"3\" }", "the retry count is a number, not a string: write failure_policy = { retry = 3 }"),
            ("failure_policy = { retries = 3 }", "unknown key \"retries\" in the policy; write failure_policy = { retry = 3 } (retry up to 3 times), \"none\" or \"best_effort\""),
            ("failure_policy = { retry = -1 }", "the retry count -1 is negative"),
            ("failure_policy = \"best-effort\"", "unknown policy \"best-effort\"; did you mean \"best_effort\"?"),
            ("failure_policy = 3", "invalid type: integer `3`, expected \"none\", \"best_effort\" or { retry = N }"),
        ] {
            let e = parse(text).unwrap_err();
            let got = lines(&e);
            assert_eq!(got.len(), 1, "{text}: {got:?}");
            assert!(got[0].starts_with("Topology.toml:1: failure_policy"), "{text}: {got:?}");
            assert!(got[0].contains(want), "{text}: {got:?}");
        }
    }

    #[test]
    fn metric_targets_are_checked_with_the_file_and_line() {
        let f = parse(
            "name = \"x\"\n\n[metric]\nflush_interval = 0\ntarget = [\n  { type = \"log\" },\n  { type = \"prometheus_push\", url = \"gw:9091\" },\n]\n",
        )
        .unwrap();
        let e = f.check(&dag()).unwrap_err();
        let got = lines(&e);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(
            got[0],
            "Topology.toml:4: metric.flush_interval: must be at least 1 ms"
        );
        assert!(
            got[1].starts_with("Topology.toml:7: metric.target: target 2 (prometheus_push)")
                && got[1].contains("\"gw:9091\" is not an http:// URL"),
            "{got:?}"
        );
    }

    #[test]
    fn typed_source_config_errors_have_lines_and_all_are_reported() {
        let f = parse("name = \"x\"\n\n[source.config]\ncont = 3\nuri = 5\nkye = \"k\"\n").unwrap();
        let e = f.source_config::<C>().unwrap_err();
        assert_eq!(
            lines(&e),
            // (serde names one missing key at a time: uri, left out for its
            // bad value, is missing now, so count goes unreported.)
            [
                "Topology.toml:4: source.config.cont: unknown key; did you mean count?",
                "Topology.toml:5: source.config.uri: invalid type: integer `5`, expected a string",
                "Topology.toml:6: source.config.kye: unknown key; did you mean key?",
            ]
        );
        assert!(parse("name = \"x\"")
            .unwrap()
            .source_config::<C>()
            .unwrap()
            .is_none());
    }

    /// Issue 10: `[source.config]` replaced the compiled config, so the
    /// compiled `uri` and `key` vanished when the file set only `count`.
    #[test]
    fn source_config_merges_over_the_compiled_config() {
        let f =
            parse("[source.config]\ncount = 3\nconsumer = \"c1\"\nnested = { b = 2 }\n").unwrap();
        let c = f.source_config_over(compiled()).unwrap();
        assert_eq!(
            c,
            C {
                count: 3,
                consumer: Some("c1".into()),
                nested: Some(Nested {
                    a: Some(1),
                    b: Some(2)
                }),
                ..compiled()
            }
        );
        // Arrays and enums replace; an enum table merges with its own.
        let f = parse("[source.config]\ntags = [\"z\"]\nack = \"individual\"\n").unwrap();
        let c = f.source_config_over(compiled()).unwrap();
        assert_eq!(c.tags, ["z"]);
        assert_eq!(c.ack, Some(tempest_source::AckPolicy::Individual));
        let f = parse("[source.config]\nack = { batch = 7 }\n").unwrap();
        let c = f.source_config_over(compiled()).unwrap();
        assert_eq!(c.ack, Some(tempest_source::AckPolicy::Batch(7)));
        // No table: the compiled config as it is.
        let f = parse("name = \"x\"\n").unwrap();
        assert_eq!(f.source_config_over(compiled()).unwrap(), compiled());
    }

    #[test]
    fn merged_source_config_errors_name_the_files_lines() {
        let f = parse(
            "name = \"x\"\n[source.config]\ncount = \"many\"\ncont = 3\nnested = { a = 1, c = 2 }\ntags = [\"a\", 3]\n",
        )
        .unwrap();
        let e = f.source_config_over(compiled()).unwrap_err();
        assert_eq!(
            lines(&e),
            [
                "Topology.toml:3: source.config.count: invalid type: string \"many\", expected a whole number from 0 to 4294967295",
                "Topology.toml:4: source.config.cont: unknown key; did you mean count?",
                "Topology.toml:5: source.config.nested.c: unknown key; the keys are: a, b",
                "Topology.toml:6: source.config.tags: invalid type: integer `3`, expected a string",
            ]
        );
    }

    #[test]
    fn tasks_must_be_real_and_every_problem_is_reported() {
        let f = parse(
            "max_pending = 0\n\n[[task]]\nname = \"splitt\"\n\n[[task]]\nname = \"count\"\nworkers = 0\n",
        )
        .unwrap();
        let e = f.check(&dag()).unwrap_err();
        assert_eq!(
            lines(&e),
            [
                "Topology.toml:1: max_pending: must be at least 1",
                "Topology.toml:4: task.name: \"splitt\" is not a task of this topology; its tasks are: split, count",
                "Topology.toml:8: task.workers: must be at least 1 (task \"count\")",
            ]
        );
    }

    #[test]
    fn edges_take_a_grouping_and_must_be_edges_of_the_pipeline() {
        let f = parse("[[edge]]\nfrom = \"split\"\nto = \"count\"\ngrouping = \"key\"\n").unwrap();
        f.check(&dag()).unwrap();
        assert_eq!(
            f.groupings().collect::<Vec<_>>(),
            [("split", "count", Grouping::Key)]
        );
        let f = parse(
            "[[edge]]\nfrom = \"count\"\nto = \"split\"\ngrouping = \"all\"\n\n[[edge]]\nfrom = \"split\"\nto = \"count\"\n\n[[edge]]\nfrom = \"split\"\nto = \"count\"\n",
        )
        .unwrap();
        assert_eq!(
            lines(&f.check(&dag()).unwrap_err()),
            [
                "Topology.toml:2: edge.from: \"count\" -> \"split\" is not an edge of this topology; its edges are: \"split\" -> \"count\"",
                "Topology.toml:11: edge.from: \"split\" -> \"count\" is given twice; merge its [[edge]] sections",
            ]
        );
        let e = parse("[[edge]]\nfrom = \"split\"\nto = \"count\"\ngrouping = \"fields\"\n")
            .unwrap_err();
        let got = lines(&e);
        assert!(
            got[0].starts_with("Topology.toml:4: edge.grouping: unknown grouping \"fields\""),
            "{got:?}"
        );
    }

    #[test]
    fn concurrency_is_for_async_tasks_and_at_least_1() {
        let dag = Pipeline::new()
            .task(T("split"))
            .async_task(crate::task::AsyncPassOn("fetch"))
            .edge("split", "fetch")
            .build()
            .unwrap();
        let ok = parse("[[task]]\nname = \"fetch\"\nconcurrency = 256\n").unwrap();
        ok.check(&dag).unwrap();
        assert_eq!(ok.task("fetch").unwrap().concurrency, Some(256));
        let f = parse(
            "[[task]]\nname = \"split\"\nconcurrency = 8\n\n[[task]]\nname = \"fetch\"\nconcurrency = 0\n",
        )
        .unwrap();
        assert_eq!(
            lines(&f.check(&dag).unwrap_err()),
            [
                "Topology.toml:3: task.concurrency: task \"split\" is a sync task; only async tasks take a concurrency",
                "Topology.toml:7: task.concurrency: must be at least 1 (task \"fetch\")",
            ]
        );
        let e = parse("[[task]]\nname = \"fetch\"\nconcurrency = \"many\"\nconcurency = 2\n")
            .unwrap_err();
        let got = lines(&e);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(
            got[0].starts_with("Topology.toml:3: task.concurrency: "),
            "{got:?}"
        );
        assert!(
            got[1].starts_with(
                "Topology.toml:4: task.concurency: unknown key; did you mean concurrency?"
            ),
            "{got:?}"
        );
    }

    #[test]
    fn tick_interval_is_for_sync_tasks_and_more_than_0() {
        let dag = Pipeline::new()
            .task(T("split"))
            .async_task(crate::task::AsyncPassOn("fetch"))
            .edge("split", "fetch")
            .build()
            .unwrap();
        let ok = parse("[[task]]\nname = \"split\"\ntick_interval = 500\n").unwrap();
        ok.check(&dag).unwrap();
        assert_eq!(ok.task("split").unwrap().tick_interval, Some(500));
        let f = parse(
            "[[task]]\nname = \"split\"\ntick_interval = 0\n\n[[task]]\nname = \"fetch\"\ntick_interval = 10\n",
        )
        .unwrap();
        assert_eq!(
            lines(&f.check(&dag).unwrap_err()),
            [
                "Topology.toml:3: task.tick_interval: must be at least 1 ms (task \"split\")",
                "Topology.toml:7: task.tick_interval: task \"fetch\" is an async task; only sync tasks tick",
            ]
        );
    }

    #[test]
    fn entries_are_blanked_without_breaking_the_toml() {
        let text = "a = { x = 1, y = 2, z = 3 }\nb.c.d = 1\nb.e = 2\n";
        let nodes = nodes(text).unwrap();
        let range = |path: &[&str]| {
            let path: Vec<Seg> = path.iter().map(|k| Seg::key(k)).collect();
            let n = nodes.iter().find(|n| n.path == path).unwrap();
            n.blank
                .iter()
                .map(|b| &text[b.range.clone()])
                .collect::<Vec<_>>()
        };
        assert_eq!(range(&["a", "y"]), [" y = 2"]);
        assert_eq!(range(&["a", "z"]), [" z = 3"]);
        assert_eq!(range(&["b", "c", "d"]), ["b.c.d = 1"]);
        assert_eq!(range(&["b"]), ["b.c.d = 1", "b.e = 2"]);
        // Commas go with the entries, whatever the order.
        for order in [[0, 1, 2], [2, 1, 0], [1, 0, 2], [0, 2, 1]] {
            let mut bytes = b"a = { x = 1, y = 2, z = 3 }\n".to_vec();
            let nodes = super::nodes(std::str::from_utf8(&bytes).unwrap()).unwrap();
            for i in order {
                let key = ["x", "y", "z"][i];
                let n = nodes
                    .iter()
                    .find(|n| n.path == [Seg::key("a"), Seg::key(key)])
                    .unwrap();
                n.blank[0].apply(&mut bytes);
                let text = String::from_utf8(bytes.clone()).unwrap();
                assert!(
                    ImDocument::parse(text.as_str()).is_ok(),
                    "{order:?}: {text}"
                );
            }
        }
    }

    #[test]
    fn closest_keys_are_suggested() {
        assert_eq!(
            closest("max_pendng", &["max_pending", "max_frame"]),
            Some("max_pending")
        );
        assert_eq!(closest("workrs", &["name", "workers"]), Some("workers"));
        assert_eq!(closest("hots", &["host", "port"]), Some("host"));
        assert_eq!(closest("c", &["a", "b"]), None);
        assert_eq!(closest("frobnicate", &["name", "port"]), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("kye", "key"), 1);
    }
}
