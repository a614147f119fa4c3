//! A topology: a name, a source, a pipeline and the options that govern
//! delivery.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tempest_source::{
    FailedMsg, MsgId, Source, SourceContext, SourceError, SourceMsg, SourceSettings,
};

use crate::config::{in_file_order, ConfigFile, ConfigProblem};
use crate::error::Error;
use crate::pipeline::{Dag, Pipeline, TaskIdx};
pub use crate::policy::FailurePolicy;
use crate::state::StateBackend;

/// The settings that govern delivery and shutdown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopologyOptions {
    /// What happens to a failed or timed-out message.
    pub failure_policy: FailurePolicy,
    /// How long one attempt of a message may take before it fails as timed
    /// out; `None` for no limit.
    pub msg_timeout: Option<Duration>,
    /// The most source messages in flight at once. When reached, polling
    /// pauses until messages complete; nothing is dropped.
    pub max_pending: usize,
    /// On shutdown, how long in-flight messages may take to finish.
    pub graceful_shutdown: Duration,
    /// At start, how long the source may stay unreachable (its `connect`
    /// retried with backoff) before the topology gives up and exits with
    /// an error; `None` to retry forever.
    pub source_connect_timeout: Option<Duration>,
    /// The wait before the first retry (`Retry` policy); doubles per retry.
    pub retry_backoff: Duration,
    /// The longest wait before a retry.
    pub max_retry_backoff: Duration,
    /// The most task messages a worker takes at once.
    pub task_batch: usize,
    /// Where metrics go, and how often.
    pub metrics: crate::metrics::MetricsConfig,
    /// With a durable state backend: how often a worker writes its
    /// state's changes (its results wait for the checkpoint holding them).
    pub checkpoint_interval: Duration,
    /// Whether each message's state updates are applied at most once (see
    /// [`TopologyBuilder::at_most_once_updates`]).
    pub at_most_once_updates: bool,
}

impl Default for TopologyOptions {
    fn default() -> Self {
        TopologyOptions {
            failure_policy: FailurePolicy::Retry(3),
            msg_timeout: Some(Duration::from_secs(30)),
            max_pending: 16_384,
            graceful_shutdown: Duration::from_secs(30),
            source_connect_timeout: Some(Duration::from_secs(60)),
            retry_backoff: Duration::from_millis(100),
            max_retry_backoff: Duration::from_secs(10),
            task_batch: 1024,
            metrics: crate::metrics::MetricsConfig::default(),
            checkpoint_interval: Duration::from_secs(1),
            at_most_once_updates: false,
        }
    }
}

/// The object-safe face of a [`Source`], as the runtime drives it.
pub(crate) trait DynSource: Send {
    fn name(&self) -> &str;
    fn settings(&self) -> SourceSettings;
    fn setup(&mut self, ctx: &SourceContext) -> Result<(), SourceError>;
    fn connect(&mut self) -> Result<(), SourceError>;
    fn healthy(&self) -> bool;
    fn poll(&mut self, max: usize, out: &mut Vec<SourceMsg>) -> Result<(), SourceError>;
    fn ack(&mut self, id: &MsgId) -> Result<(), SourceError>;
    fn batch_ack(&mut self, ids: &[MsgId]) -> Result<(), SourceError>;
    fn fail(&mut self, msgs: &[FailedMsg]) -> Result<(), SourceError>;
    fn monitor(&mut self) -> Result<(), SourceError>;
    fn exhausted(&self) -> bool;
    fn shutdown(&mut self) -> Result<(), SourceError>;
    fn flush_metrics(&mut self);
}

impl<S: Source> DynSource for S {
    fn name(&self) -> &str {
        Source::name(self)
    }
    fn settings(&self) -> SourceSettings {
        Source::settings(self)
    }
    fn setup(&mut self, ctx: &SourceContext) -> Result<(), SourceError> {
        Source::setup(self, ctx)
    }
    fn connect(&mut self) -> Result<(), SourceError> {
        Source::connect(self)
    }
    fn healthy(&self) -> bool {
        Source::healthy(self)
    }
    fn poll(&mut self, max: usize, out: &mut Vec<SourceMsg>) -> Result<(), SourceError> {
        Source::poll(self, max, out)
    }
    fn ack(&mut self, id: &MsgId) -> Result<(), SourceError> {
        Source::ack(self, id)
    }
    fn batch_ack(&mut self, ids: &[MsgId]) -> Result<(), SourceError> {
        Source::batch_ack(self, ids)
    }
    fn fail(&mut self, msgs: &[FailedMsg]) -> Result<(), SourceError> {
        Source::fail(self, msgs)
    }
    fn monitor(&mut self) -> Result<(), SourceError> {
        Source::monitor(self)
    }
    fn exhausted(&self) -> bool {
        Source::exhausted(self)
    }
    fn shutdown(&mut self) -> Result<(), SourceError> {
        Source::shutdown(self)
    }
    fn flush_metrics(&mut self) {
        Source::flush_metrics(self)
    }
}

type SourceFactory =
    Box<dyn FnOnce(Option<&ConfigFile>) -> Result<Box<dyn DynSource>, Error> + Send>;

/// Resolves a source's configuration against the `Topology.toml` applied
/// (when the topology is built) and returns its factory, or every problem
/// of `[source.config]`.
type SourceResolver =
    Box<dyn FnOnce(Option<&ConfigFile>) -> Result<SourceFactory, Vec<ConfigProblem>> + Send>;

enum SourceMaker {
    /// A ready instance: `[source.config]` cannot apply.
    Fixed(SourceFactory),
    /// Built from a typed config that `[source.config]` merges over.
    Configured(SourceResolver),
}

struct SourceSpec {
    name: String,
    make: SourceMaker,
}

/// Builds a [`Topology`].
///
/// ```
/// use std::time::Duration;
/// use tempest::{FailurePolicy, Msg, MsgCtx, Output, Pipeline, Task, TaskResult, TopologyBuilder};
/// use tempest_source_mock::{MockConfig, MockSource};
///
/// #[derive(Clone)]
/// struct Upper;
/// impl Task for Upper {
///     fn name(&self) -> &str { "upper" }
///     fn handle(&mut self, msg: Msg, _: &MsgCtx) -> TaskResult {
///         Ok(Output::one(msg.to_ascii_uppercase()))
///     }
/// }
///
/// let topology = TopologyBuilder::new("shout")
///     .source_config::<MockSource>(MockConfig::generator(10, 8))
///     .pipeline(Pipeline::new().task(Upper))
///     .failure_policy(FailurePolicy::Retry(2))
///     .msg_timeout(Duration::from_secs(5))
///     .max_pending(1_000)
///     .build()
///     .unwrap();
/// assert_eq!(topology.name(), "shout");
/// ```
pub struct TopologyBuilder {
    name: String,
    source: Option<SourceSpec>,
    pipeline: Pipeline,
    options: TopologyOptions,
    workers: Vec<(String, usize)>,
    batches: Vec<(String, usize)>,
    concurrency: Vec<(String, usize)>,
    file: Option<ConfigFile>,
    state: Option<Arc<dyn StateBackend>>,
}

impl fmt::Debug for TopologyBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TopologyBuilder")
            .field("name", &self.name)
            .field("source", &self.source.as_ref().map(|s| &s.name))
            .field("pipeline", &self.pipeline)
            .field("options", &self.options)
            .field("workers", &self.workers)
            .finish()
    }
}

impl TopologyBuilder {
    /// A topology named `name`, with default options.
    pub fn new(name: impl Into<String>) -> Self {
        TopologyBuilder {
            name: name.into(),
            source: None,
            pipeline: Pipeline::new(),
            options: TopologyOptions::default(),
            workers: Vec::new(),
            batches: Vec::new(),
            concurrency: Vec::new(),
            file: None,
            state: None,
        }
    }

    /// The source, as an instance. Its configuration is fixed in code, so a
    /// `Topology.toml` with `[source.config]` is an error for it.
    pub fn source<S: Source>(mut self, source: S) -> Self {
        let name = source.name().to_string();
        self.source = Some(SourceSpec {
            name,
            make: SourceMaker::Fixed(Box::new(
                move |_| Ok(Box::new(source) as Box<dyn DynSource>),
            )),
        });
        self
    }

    /// The source, built from its typed configuration when the topology
    /// starts: `config`, with `[source.config]` of `Topology.toml` merged
    /// over it when the file has one (keys the file sets win, the others
    /// keep their compiled values; tables merge key by key, arrays and
    /// plain values replace). [`build`](Self::build) checks the result and
    /// reports every problem with the file's others, each naming the file,
    /// line and key, never a panic.
    pub fn source_config<S: Source>(mut self, config: S::Config) -> Self {
        let name = std::any::type_name::<S>()
            .rsplit("::")
            .next()
            .unwrap_or("source")
            .to_string();
        let source_name = name.clone();
        self.source = Some(SourceSpec {
            name,
            make: SourceMaker::Configured(Box::new(move |file| {
                let config = match file {
                    Some(f) => f.merged_source_config(config)?,
                    None => config,
                };
                Ok(Box::new(move |_: Option<&ConfigFile>| {
                    S::from_config(config)
                        .map(|s| Box::new(s) as Box<dyn DynSource>)
                        .map_err(|e| Error::Source {
                            name: source_name,
                            source: e,
                        })
                }) as SourceFactory)
            })),
        });
        self
    }

    /// The pipeline of tasks.
    pub fn pipeline(mut self, pipeline: Pipeline) -> Self {
        self.pipeline = pipeline;
        self
    }

    /// What happens to failed and timed-out messages (default `Retry(3)`).
    pub fn failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.options.failure_policy = policy;
        self
    }

    /// How long one attempt may take (default 30 s).
    pub fn msg_timeout(mut self, timeout: Duration) -> Self {
        self.options.msg_timeout = Some(timeout);
        self
    }

    /// No limit on how long a message may take.
    pub fn no_msg_timeout(mut self) -> Self {
        self.options.msg_timeout = None;
        self
    }

    /// The most source messages in flight at once (default 16,384).
    pub fn max_pending(mut self, max: usize) -> Self {
        self.options.max_pending = max;
        self
    }

    /// Keeps the tasks' keyed state ([`KeyedState`](crate::KeyedState)) in
    /// `backend`, checkpointed every
    /// [`checkpoint_interval`](Self::checkpoint_interval), instead of in
    /// memory only.
    pub fn state_backend(mut self, backend: impl StateBackend + 'static) -> Self {
        self.state = Some(Arc::new(backend));
        self
    }

    /// How often a worker checkpoints its state's changes to the state
    /// backend (default 1 s); its results wait for the checkpoint.
    pub fn checkpoint_interval(mut self, every: Duration) -> Self {
        self.options.checkpoint_interval = every;
        self
    }

    /// Applies each message's updates of keyed state at most once, even
    /// when the message is handled again after a failure (a worker killed
    /// after its checkpoint, a retry, a redelivery by the source): a store
    /// records the updates it holds with its checkpoint, in the same atomic
    /// commit, and a message whose update it already holds changes
    /// nothing there. The records of a source message are dropped once the
    /// source has acked it. Needs a state backend that records updates
    /// ([`StateBackend::records_updates`]; the Redis one does); covers the
    /// changes sync tasks make in `handle` (a tick's, and an async task's,
    /// apply at least once). Costs a record per message in the checkpoint,
    /// a removal per source message after its ack, and a lookup in the
    /// batch's load for each message that may have been handled before
    /// (all of them, with a source that does not count deliveries:
    /// `SourceSettings::counts_deliveries`).
    pub fn at_most_once_updates(mut self) -> Self {
        self.options.at_most_once_updates = true;
        self
    }

    /// How long in-flight messages may take to finish on shutdown (default 30 s).
    pub fn graceful_shutdown(mut self, grace: Duration) -> Self {
        self.options.graceful_shutdown = grace;
        self
    }

    /// How long the source may stay unreachable at start before the
    /// topology gives up (default 60 s).
    pub fn source_connect_timeout(mut self, timeout: Duration) -> Self {
        self.options.source_connect_timeout = Some(timeout);
        self
    }

    /// Retry connecting the source at start for as long as it takes.
    pub fn no_source_connect_timeout(mut self) -> Self {
        self.options.source_connect_timeout = None;
        self
    }

    /// The first retry's backoff and the longest one (default 100 ms, 10 s).
    pub fn retry_backoff(mut self, first: Duration, max: Duration) -> Self {
        self.options.retry_backoff = first;
        self.options.max_retry_backoff = max;
        self
    }

    /// The most task messages a worker takes at once (default 1,024).
    pub fn task_batch(mut self, max: usize) -> Self {
        self.options.task_batch = max;
        self
    }

    /// How many workers (threads, in standalone mode) run task `task`
    /// (default 1).
    pub fn workers(mut self, task: impl Into<String>, count: usize) -> Self {
        self.workers.push((task.into(), count));
        self
    }

    /// The most task messages one fetch of task `task` takes (overrides
    /// `task_batch` for it).
    pub fn batch_for(mut self, task: impl Into<String>, max: usize) -> Self {
        self.batches.push((task.into(), max));
        self
    }

    /// How many messages each worker of async task `task` keeps in flight
    /// (overrides the pipeline's [`Pipeline::concurrency`] for it; an
    /// error for a sync task).
    pub fn concurrency(mut self, task: impl Into<String>, n: usize) -> Self {
        let task = task.into();
        self.concurrency.retain(|(name, _)| *name != task);
        self.concurrency.push((task, n));
        self
    }

    /// Applies a `Topology.toml`: its settings replace the builder's, its
    /// `[source.config]` merges over the source's compiled configuration.
    /// Its problems are reported by [`build`](Self::build). Flags and
    /// environment variables go on top (see [`rt`](crate::rt)).
    pub fn config_file(mut self, file: ConfigFile) -> Self {
        let c = &file.config;
        if let Some(name) = &c.name {
            self.name = name.clone();
        }
        let o = &mut self.options;
        if let Some(ms) = c.graceful_shutdown {
            o.graceful_shutdown = Duration::from_millis(ms);
        }
        if let Some(ms) = c.checkpoint_interval.filter(|&ms| ms > 0) {
            o.checkpoint_interval = Duration::from_millis(ms);
        }
        if let Some(on) = c.at_most_once_updates {
            o.at_most_once_updates = on;
        }
        if let Some(ms) = c.source_connect_timeout {
            o.source_connect_timeout = (ms > 0).then(|| Duration::from_millis(ms));
        }
        if let Some(p) = c.failure_policy {
            o.failure_policy = p;
        }
        if let Some(ms) = c.msg_timeout {
            o.msg_timeout = (ms > 0).then(|| Duration::from_millis(ms));
        }
        if let Some(n) = c.max_pending {
            o.max_pending = n;
        }
        if let Some(ms) = c.retry_backoff {
            o.retry_backoff = Duration::from_millis(ms);
        }
        if let Some(ms) = c.max_retry_backoff {
            o.max_retry_backoff = Duration::from_millis(ms);
        }
        if let Some(m) = &c.metric {
            o.metrics = m.clone();
        }
        for t in &c.task {
            if let Some(n) = t.workers {
                self.workers.retain(|(name, _)| name != t.name.get_ref());
                self.workers.push((t.name.get_ref().clone(), n));
            }
            if let Some(n) = t.poll_count {
                self.batches.retain(|(name, _)| name != t.name.get_ref());
                self.batches.push((t.name.get_ref().clone(), n));
            }
            if let Some(n) = t.concurrency {
                self.concurrency
                    .retain(|(name, _)| name != t.name.get_ref());
                self.concurrency.push((t.name.get_ref().clone(), n));
            }
        }
        self.file = Some(file);
        self
    }

    /// The `Topology.toml` applied, if any.
    pub fn current_file(&self) -> Option<&ConfigFile> {
        self.file.as_ref()
    }

    /// Where metrics go and how often (`[metric]` in `Topology.toml`).
    pub fn metrics(mut self, config: crate::metrics::MetricsConfig) -> Self {
        self.options.metrics = config;
        self
    }

    /// All options at once.
    pub fn options(mut self, options: TopologyOptions) -> Self {
        self.options = options;
        self
    }

    /// The options as they stand.
    pub fn current_options(&self) -> &TopologyOptions {
        &self.options
    }

    /// The topology's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pipeline as it stands (for `graph`).
    pub fn current_pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// Checks everything and returns the topology, or every problem found.
    ///
    /// Problems of the `Topology.toml` applied (its own, its checks against
    /// the pipeline, its `[source.config]` against the source's typed
    /// configuration) are listed once each, with the file and line; a
    /// setting from the file is not reported again as the builder's.
    pub fn build(self) -> Result<Topology, Error> {
        let mut dag = self.pipeline.build()?;
        if let Some(file) = &self.file {
            // Groupings are per edge: the file's apply to the built DAG (an
            // edge it names that the DAG lacks is one of its problems).
            for (from, to, grouping) in file.groupings() {
                dag.set_grouping(from, to, grouping);
            }
            for t in 0..dag.len() as TaskIdx {
                let ms = file.task(dag.name(t)).and_then(|s| s.tick_interval);
                if let Some(ms) = ms.filter(|&ms| ms > 0) {
                    dag.set_tick_interval(t, Some(Duration::from_millis(ms)));
                }
            }
        }
        let mut problems = Vec::new();
        let mut file_problems = Vec::new();
        let file = self.file.as_ref();
        // Whether the file's own checks report this setting already.
        let task_in_file = |task: &str, value: &dyn Fn(&crate::config::TaskSection) -> bool| {
            file.and_then(|f| f.task(task)).is_some_and(value)
        };
        if self.name.trim().is_empty() {
            problems.push("the name is empty".to_string());
        }
        if self.source.is_none() {
            problems.push("no source: call .source(..) or .source_config::<S>(..)".to_string());
        }
        if self.options.max_pending == 0 && file.is_none_or(|f| f.config.max_pending != Some(0)) {
            problems.push("max_pending must be at least 1".to_string());
        }
        if self.options.task_batch == 0 {
            problems.push("task_batch must be at least 1".to_string());
        }
        if self.options.msg_timeout == Some(Duration::ZERO) {
            problems.push("msg_timeout must be more than 0".to_string());
        }
        if self.options.at_most_once_updates {
            match &self.state {
                None => problems.push(
                    "at_most_once_updates needs a durable state backend (.state_backend(..)): state in memory does not survive the failures it guards against"
                        .to_string(),
                ),
                Some(b) if !b.records_updates() => problems.push(format!(
                    "at_most_once_updates: the state backend {b:?} does not record applied updates"
                )),
                Some(_) => {}
            }
        }
        // Metrics settings from the file are checked with the file, below.
        if file.is_none_or(|f| f.config.metric.is_none()) {
            for p in self.options.metrics.problems() {
                problems.push(format!("metrics: {p}"));
            }
        }
        if let Some(file) = file {
            file_problems.extend(file.problems_with(&dag));
        }
        let mut batches = vec![self.options.task_batch; dag.len()];
        for (task, max) in &self.batches {
            if task_in_file(task, &|t| t.poll_count == Some(*max)) {
                // From the file: checked with it.
                if let Some(i) = dag.index_of(task).filter(|_| *max > 0) {
                    batches[i as usize] = *max;
                }
                continue;
            }
            match dag.index_of(task) {
                None => problems.push(format!(
                    "batch set for unknown task \"{task}\"; the tasks are: {}",
                    dag.names().join(", ")
                )),
                Some(_) if *max == 0 => {
                    problems.push(format!("task \"{task}\": batch must be at least 1"))
                }
                Some(i) => batches[i as usize] = *max,
            }
        }
        let mut workers = vec![1; dag.len()];
        let mut seen = HashMap::new();
        for (task, count) in &self.workers {
            if task_in_file(task, &|t| t.workers == Some(*count)) {
                if let Some(i) = dag.index_of(task).filter(|_| *count > 0) {
                    workers[i as usize] = *count;
                }
                continue;
            }
            match dag.index_of(task) {
                None => problems.push(format!(
                    "workers set for unknown task \"{task}\"; the tasks are: {}",
                    dag.names().join(", ")
                )),
                Some(_) if *count == 0 => {
                    problems.push(format!("task \"{task}\" needs at least 1 worker"))
                }
                Some(i) => {
                    workers[i as usize] = *count;
                    if seen.insert(task.clone(), ()).is_some() {
                        problems.push(format!("workers for task \"{task}\" set twice"));
                    }
                }
            }
        }
        let mut concurrency: Vec<usize> = (0..dag.len())
            .map(|t| dag.concurrency(t as TaskIdx).unwrap_or(0))
            .collect();
        for (task, n) in &self.concurrency {
            let from_file = task_in_file(task, &|t| t.concurrency == Some(*n));
            match dag.index_of(task) {
                // From the file: checked with it.
                _ if from_file => {
                    if let Some(i) = dag.index_of(task).filter(|&i| *n > 0 && dag.is_async(i)) {
                        concurrency[i as usize] = *n;
                    }
                }
                None => problems.push(format!(
                    "concurrency set for unknown task \"{task}\"; the tasks are: {}",
                    dag.names().join(", ")
                )),
                Some(i) if !dag.is_async(i) => problems.push(format!(
                    "concurrency set for task \"{task}\", a sync task; only async tasks take a concurrency"
                )),
                Some(_) if *n == 0 => {
                    problems.push(format!("task \"{task}\": concurrency must be at least 1"))
                }
                Some(i) => concurrency[i as usize] = *n,
            }
        }
        let source = match self.source {
            None => None,
            Some(SourceSpec {
                name,
                make: SourceMaker::Fixed(make),
            }) => {
                if let Some(f) = file.filter(|f| f.has_source_config()) {
                    file_problems.push(f.source_problem(
                        "cannot apply: this package builds its source in code (TopologyBuilder::source); build it with source_config::<S>(..) to make it configurable".to_string(),
                    ));
                }
                Some((name, make))
            }
            Some(SourceSpec {
                name,
                make: SourceMaker::Configured(resolve),
            }) => match resolve(file) {
                Ok(make) => Some((name, make)),
                Err(p) => {
                    file_problems.extend(p);
                    None
                }
            },
        };
        match (problems.is_empty(), file_problems.is_empty(), source, file) {
            (true, true, Some((source_name, source)), _) => Ok(Topology {
                name: self.name,
                source_name,
                source,
                dag: Arc::new(dag),
                options: self.options,
                workers,
                batches,
                concurrency,
                file: self.file,
                state: self.state,
            }),
            (true, false, _, Some(file)) => Err(file.error(file_problems)),
            (_, _, _, file) => {
                if let Some(file) = file {
                    problems.extend(
                        in_file_order(file_problems)
                            .iter()
                            .map(|p| p.at(&file.path)),
                    );
                }
                Err(Error::Topology {
                    topology: self.name,
                    problems,
                })
            }
        }
    }
}

/// A validated topology, ready to run.
pub struct Topology {
    pub(crate) name: String,
    pub(crate) source_name: String,
    pub(crate) source: SourceFactory,
    pub(crate) dag: Arc<Dag>,
    pub(crate) options: TopologyOptions,
    pub(crate) workers: Vec<usize>,
    pub(crate) batches: Vec<usize>,
    /// Per task: its workers' concurrency (async tasks), 0 (sync tasks).
    pub(crate) concurrency: Vec<usize>,
    pub(crate) file: Option<ConfigFile>,
    /// Where keyed state is checkpointed (`None`: in memory only).
    pub(crate) state: Option<Arc<dyn StateBackend>>,
}

impl fmt::Debug for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Topology")
            .field("name", &self.name)
            .field("source", &self.source_name)
            .field("dag", &self.dag)
            .field("options", &self.options)
            .field("workers", &self.workers)
            .finish()
    }
}

impl Topology {
    /// The topology's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The compiled pipeline.
    pub fn dag(&self) -> &Dag {
        &self.dag
    }

    /// The options it runs with.
    pub fn options(&self) -> &TopologyOptions {
        &self.options
    }

    /// Workers per task (standalone threads), by task index.
    pub fn workers(&self) -> &[usize] {
        &self.workers
    }

    /// The most messages one fetch takes, by task index.
    pub fn batches(&self) -> &[usize] {
        &self.batches
    }

    /// How many messages each worker keeps in flight, by task index: the
    /// concurrency of an async task, 0 for a sync task.
    pub fn concurrency(&self) -> &[usize] {
        &self.concurrency
    }

    /// The `Topology.toml` applied, if any.
    pub fn file(&self) -> Option<&ConfigFile> {
        self.file.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempest_source_mock::{MockConfig, MockSource};

    const T: crate::task::PassOn = crate::task::PassOn("t");

    #[test]
    fn every_problem_is_reported() {
        let err = TopologyBuilder::new(" ")
            .pipeline(Pipeline::new().task(T))
            .max_pending(0)
            .workers("nope", 2)
            .workers("t", 0)
            .build()
            .unwrap_err();
        let text = err.to_string();
        for needle in [
            "the name is empty",
            "no source",
            "max_pending must be at least 1",
            "unknown task \"nope\"; the tasks are: t",
            "task \"t\" needs at least 1 worker",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in {text}");
        }
        assert!(err.is_usage());
    }

    #[test]
    fn pipeline_errors_come_first() {
        let err = TopologyBuilder::new("x")
            .source_config::<MockSource>(MockConfig::default())
            .pipeline(Pipeline::new().task(T).edge("t", "u"))
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::Pipeline(_)), "{err}");
    }

    #[test]
    fn workers_default_to_one() {
        let t = TopologyBuilder::new("x")
            .source_config::<MockSource>(MockConfig::default())
            .pipeline(Pipeline::new().task(T))
            .build()
            .unwrap();
        assert_eq!(t.workers, vec![1]);
        assert_eq!(t.source_name, "MockSource");
    }

    fn file(text: &str) -> ConfigFile {
        ConfigFile::parse_lenient(std::path::Path::new("Topology.toml"), text.to_string()).unwrap()
    }

    fn problems(err: &Error) -> Vec<String> {
        match err {
            Error::Config { file, problems } => problems.iter().map(|p| p.at(file)).collect(),
            other => panic!("not a config error: {other}"),
        }
    }

    /// Issue 10: a setting from the file was reported by the file's check
    /// and again by the builder's, in another format.
    #[test]
    fn file_problems_are_reported_once_each_with_their_lines() {
        let err = TopologyBuilder::new("x")
            .source_config::<MockSource>(MockConfig::default())
            .pipeline(Pipeline::new().task(T))
            .config_file(file(
                "max_pending = 0\nmax_pendng = 1\n\n[[task]]\nname = \"t\"\nworkers = 0\npoll_count = 0\n\n[[task]]\nname = \"nope\"\nworkers = 2\n",
            ))
            .build()
            .unwrap_err();
        assert_eq!(
            problems(&err),
            [
                "Topology.toml:1: max_pending: must be at least 1",
                "Topology.toml:2: max_pendng: unknown key; did you mean max_pending?",
                "Topology.toml:6: task.workers: must be at least 1 (task \"t\")",
                "Topology.toml:7: task.poll_count: must be at least 1 (task \"t\")",
                "Topology.toml:10: task.name: \"nope\" is not a task of this topology; its tasks are: t",
            ],
            "{err}"
        );
        assert!(err.is_usage());
        // With problems of the builder's own, the file's are listed in the
        // same format.
        let err = TopologyBuilder::new(" ")
            .source_config::<MockSource>(MockConfig::default())
            .pipeline(Pipeline::new().task(T))
            .config_file(file("max_pending = 0\n"))
            .build()
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "topology \" \" is invalid:\n  - the name is empty\n  - Topology.toml:1: max_pending: must be at least 1"
        );
    }

    /// A flag after the file (`--workers t=3` over `workers = 2`) wins;
    /// it was reported as "set twice".
    #[test]
    fn a_flag_overrides_the_files_workers() {
        let t = TopologyBuilder::new("x")
            .source_config::<MockSource>(MockConfig::default())
            .pipeline(Pipeline::new().task(T))
            .config_file(file("[[task]]\nname = \"t\"\nworkers = 2\n"))
            .workers("t", 3)
            .build()
            .unwrap();
        assert_eq!(t.workers, vec![3]);
    }

    /// Issue 10: `[source.config]` replaced the compiled configuration.
    #[test]
    fn source_config_merges_over_the_compiled_config() {
        let compiled = MockConfig {
            batch_size: 7,
            ..MockConfig::generator(10, 8)
        };
        let t = TopologyBuilder::new("x")
            .source_config::<MockSource>(compiled)
            .pipeline(Pipeline::new().task(T))
            .config_file(file("[source.config]\ncount = 5\nack_interval_ms = 3\n"))
            .build()
            .unwrap();
        let source = (t.source)(None).unwrap();
        let settings = source.settings();
        assert_eq!(settings.poll_count, 7, "the compiled batch_size stays");
        assert_eq!(settings.ack_interval, Duration::from_millis(3));
    }

    #[test]
    fn source_config_problems_are_reported_with_the_files_others() {
        let err = TopologyBuilder::new("x")
            .source_config::<MockSource>(MockConfig::default())
            .pipeline(Pipeline::new().task(T))
            .config_file(file(
                "prot = 1\n\n[source.config]\ncont = 5\nbatch_size = \"big\"\n",
            ))
            .build()
            .unwrap_err();
        assert_eq!(
            problems(&err),
            [
                "Topology.toml:1: prot: unknown key; did you mean port?",
                "Topology.toml:4: source.config.cont: unknown key; did you mean count?",
                "Topology.toml:5: source.config.batch_size: invalid type: string \"big\", expected a whole number, 0 or more",
            ]
        );
        let err = TopologyBuilder::new("x")
            .source(MockSource::from_config(MockConfig::default()).unwrap())
            .pipeline(Pipeline::new().task(T))
            .config_file(file("name = \"x\"\n[source.config]\ncount = 5\n"))
            .build()
            .unwrap_err();
        let got = problems(&err);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].starts_with("Topology.toml:2: source.config: cannot apply: this package builds its source in code"),
            "{got:?}"
        );
    }

    #[test]
    fn failure_policies_deserialize_from_their_three_forms() {
        let p = |s: &str| toml::from_str::<std::collections::BTreeMap<String, FailurePolicy>>(s);
        assert_eq!(p("p = \"none\"").unwrap()["p"], FailurePolicy::None);
        assert_eq!(
            p("p = \"best_effort\"").unwrap()["p"],
            FailurePolicy::BestEffort
        );
        assert_eq!(
            p("p = { retry = 4 }").unwrap()["p"],
            FailurePolicy::Retry(4)
        );
        let e = p("p = \"retry\"").unwrap_err().to_string();
        assert!(e.contains("write failure_policy = { retry = 3 }"), "{e}");
        assert!(p("p = { retry = 4294967296 }").is_err());
        assert!(p("p = {}").is_err());
    }
}
