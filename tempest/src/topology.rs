//! A topology: a name, a source, a pipeline and the options that govern
//! delivery.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tempest_source::{
    FailedMsg, MsgId, Source, SourceContext, SourceError, SourceMsg, SourceSettings,
};

use crate::error::Error;
use crate::pipeline::{Dag, Pipeline};

/// What happens to a message when a task fails it or it times out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Give up on the message without acking it: the source redelivers it
    /// (its own visibility timeout or pending list).
    None,
    /// Ack it anyway. A task error counts as that task emitting nothing, so
    /// the rest of the DAG still runs; a timeout acks at once.
    BestEffort,
    /// Run the whole message again from the root, up to this many times,
    /// after a backoff that doubles each time; then give up as with `None`.
    Retry(u32),
}

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
    /// The wait before the first retry (`Retry` policy); doubles per retry.
    pub retry_backoff: Duration,
    /// The longest wait before a retry.
    pub max_retry_backoff: Duration,
    /// The most task messages a worker takes at once.
    pub task_batch: usize,
}

impl Default for TopologyOptions {
    fn default() -> Self {
        TopologyOptions {
            failure_policy: FailurePolicy::Retry(3),
            msg_timeout: Some(Duration::from_secs(30)),
            max_pending: 16_384,
            graceful_shutdown: Duration::from_secs(30),
            retry_backoff: Duration::from_millis(100),
            max_retry_backoff: Duration::from_secs(10),
            task_batch: 1024,
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

type SourceFactory = Box<dyn FnOnce() -> Result<Box<dyn DynSource>, SourceError> + Send>;

/// Builds a [`Topology`].
///
/// ```
/// use std::time::Duration;
/// use tempest::{FailurePolicy, Msg, Output, Pipeline, Task, TaskResult, TopologyBuilder};
/// use tempest_source_mock::{MockConfig, MockSource};
///
/// #[derive(Clone)]
/// struct Upper;
/// impl Task for Upper {
///     fn name(&self) -> &str { "upper" }
///     fn handle(&mut self, msg: Msg) -> TaskResult {
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
    source: Option<(String, SourceFactory)>,
    pipeline: Pipeline,
    options: TopologyOptions,
    workers: Vec<(String, usize)>,
}

impl fmt::Debug for TopologyBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TopologyBuilder")
            .field("name", &self.name)
            .field("source", &self.source.as_ref().map(|(n, _)| n))
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
        }
    }

    /// The source, as an instance.
    pub fn source<S: Source>(mut self, source: S) -> Self {
        let name = source.name().to_string();
        self.source = Some((
            name,
            Box::new(move || Ok(Box::new(source) as Box<dyn DynSource>)),
        ));
        self
    }

    /// The source, built from its typed configuration when the topology
    /// starts (a bad configuration is an error then, not a panic).
    pub fn source_config<S: Source>(mut self, config: S::Config) -> Self {
        let name = std::any::type_name::<S>()
            .rsplit("::")
            .next()
            .unwrap_or("source")
            .to_string();
        self.source = Some((
            name,
            Box::new(move || S::from_config(config).map(|s| Box::new(s) as Box<dyn DynSource>)),
        ));
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

    /// How long in-flight messages may take to finish on shutdown (default 30 s).
    pub fn graceful_shutdown(mut self, grace: Duration) -> Self {
        self.options.graceful_shutdown = grace;
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
    pub fn build(self) -> Result<Topology, Error> {
        let dag = self.pipeline.build()?;
        let mut problems = Vec::new();
        if self.name.trim().is_empty() {
            problems.push("the name is empty".to_string());
        }
        if self.source.is_none() {
            problems.push("no source: call .source(..) or .source_config::<S>(..)".to_string());
        }
        if self.options.max_pending == 0 {
            problems.push("max_pending must be at least 1".to_string());
        }
        if self.options.task_batch == 0 {
            problems.push("task_batch must be at least 1".to_string());
        }
        if self.options.msg_timeout == Some(Duration::ZERO) {
            problems.push("msg_timeout must be more than 0".to_string());
        }
        let mut workers = vec![1; dag.len()];
        let mut seen = HashMap::new();
        for (task, count) in &self.workers {
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
        match (problems.is_empty(), self.source) {
            (true, Some((source_name, source))) => Ok(Topology {
                name: self.name,
                source_name,
                source,
                dag: Arc::new(dag),
                options: self.options,
                workers,
            }),
            _ => Err(Error::Topology {
                topology: self.name,
                problems,
            }),
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{Msg, Output, Task, TaskResult};
    use tempest_source_mock::{MockConfig, MockSource};

    #[derive(Clone)]
    struct T;
    impl Task for T {
        fn name(&self) -> &str {
            "t"
        }
        fn handle(&mut self, msg: Msg) -> TaskResult {
            Ok(Output::One(msg))
        }
    }

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
}
