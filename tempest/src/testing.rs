//! A harness to unit-test topologies: run one in-process until a condition
//! or a deadline, then look at what happened to every source message.
//!
//! ```
//! use std::time::Duration;
//! use tempest::testing::TestRun;
//! use tempest::{Msg, MsgCtx, Outcome, Output, Pipeline, Task, TaskResult, TopologyBuilder};
//! use tempest_source::Source;
//! use tempest_source_mock::{MockConfig, MockSource};
//!
//! #[derive(Clone)]
//! struct Echo;
//! impl Task for Echo {
//!     fn name(&self) -> &str { "echo" }
//!     fn handle(&mut self, msg: Msg, _: &MsgCtx) -> TaskResult { Ok(Output::One(msg)) }
//! }
//!
//! let source = MockSource::from_config(MockConfig::default()).unwrap();
//! let mock = source.handle();
//! let id = mock.push("hello");
//! let report = TestRun::new(
//!     TopologyBuilder::new("echo").source(source).pipeline(Pipeline::new().task(Echo)),
//! )
//! .deadline(Duration::from_secs(10))
//! .run()
//! .unwrap();
//! assert_eq!(report.outcome(&id), Some(Outcome::Acked));
//! assert_eq!(mock.ack_count(&id), 1);
//! ```

use std::collections::HashMap;
use std::time::Duration;

use tempest_source::metrics::Snapshot;
use tempest_source::MsgId;

use crate::actors::pipeline::{MsgReport, Stats, Unfinished};
use crate::actors::StopReason;
use crate::error::Error;
use crate::inflight::Outcome;
use crate::standalone::{self, RunOptions, RuntimeHandle, ServeOptions, StopCondition};
use crate::topology::TopologyBuilder;

/// Runs a topology in-process for a test. See the [module docs](self).
pub struct TestRun {
    builder: TopologyBuilder,
    until: Option<StopCondition>,
    deadline: Duration,
    handle: Option<RuntimeHandle>,
}

impl std::fmt::Debug for TestRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestRun")
            .field("builder", &self.builder)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl TestRun {
    /// A run of the topology `builder` describes, with a 30 s deadline.
    pub fn new(builder: TopologyBuilder) -> Self {
        TestRun {
            builder,
            until: None,
            deadline: Duration::from_secs(30),
            handle: None,
        }
    }

    /// Stops (gracefully) once `condition` holds; checked after every batch.
    /// Without it the run ends when the source is exhausted.
    pub fn until(mut self, condition: impl FnMut(&Stats) -> bool + Send + 'static) -> Self {
        self.until = Some(Box::new(condition));
        self
    }

    /// Stops (gracefully) after `deadline` at the latest.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Lets the test stop or inspect the run from another thread.
    pub fn handle(mut self, handle: RuntimeHandle) -> Self {
        self.handle = Some(handle);
        self
    }

    /// Runs the topology on a thread of its own and waits for it to stop.
    pub fn run(self) -> Result<TestReport, Error> {
        self.run_with(None)
    }

    /// Runs the topology as a topology process: no workers in this
    /// process, task workers connect over TCP as `serve` says (see
    /// [`RuntimeHandle::listening`] for the address).
    pub fn run_serving(self, serve: ServeOptions) -> Result<TestReport, Error> {
        self.run_with(Some(serve))
    }

    fn run_with(self, serve: Option<ServeOptions>) -> Result<TestReport, Error> {
        let topology = self.builder.build()?;
        let options = RunOptions {
            until: self.until,
            deadline: Some(self.deadline),
            record_outcomes: true,
            handle: self.handle,
            local_workers: serve.is_none(),
            serve,
        };
        let report = std::thread::Builder::new()
            .name("tempest-test-run".into())
            .spawn(move || standalone::run(topology, options))
            .map_err(|e| Error::Io {
                what: "starting the test run's thread".into(),
                source: e,
            })?
            .join()
            .map_err(|_| Error::Runtime("the test run's thread panicked".into()))??;
        Ok(TestReport {
            stop: report.stop,
            stats: report.stats,
            metrics: report.metrics,
            elapsed: report.elapsed,
            outcomes: report.outcomes.unwrap_or_default(),
            unfinished: report.unfinished,
        })
    }
}

/// What a [`TestRun`] did.
#[derive(Debug)]
pub struct TestReport {
    /// Why the run stopped.
    pub stop: StopReason,
    /// The pipeline's counters.
    pub stats: Stats,
    /// Every metric recorded.
    pub metrics: Snapshot,
    /// How long the run took.
    pub elapsed: Duration,
    outcomes: HashMap<MsgId, Vec<MsgReport>>,
    unfinished: Vec<Unfinished>,
}

impl TestReport {
    /// The outcome of the last finished delivery of message `id`; `None` if
    /// none finished (still in flight at the end, or never polled).
    pub fn outcome(&self, id: &MsgId) -> Option<Outcome> {
        self.report(id).map(|r| r.outcome)
    }

    /// Everything recorded about the last finished delivery of `id`.
    pub fn report(&self, id: &MsgId) -> Option<&MsgReport> {
        self.outcomes.get(id).and_then(|all| all.last())
    }

    /// Every finished delivery of message `id`, in the order they finished
    /// (a source may deliver one id several times: redeliveries, equal
    /// payloads of a list, duplicates settled with the delivery in flight).
    pub fn deliveries(&self, id: &MsgId) -> &[MsgReport] {
        self.outcomes.get(id).map_or(&[], Vec::as_slice)
    }

    /// Every finished message and what happened to each of its deliveries.
    pub fn outcomes(&self) -> &HashMap<MsgId, Vec<MsgReport>> {
        &self.outcomes
    }

    /// The messages still in flight when the run stopped, left unacked:
    /// each with the tasks and workers that held it.
    pub fn unfinished(&self) -> &[Unfinished] {
        &self.unfinished
    }

    /// How many messages' last finished delivery ended with `outcome`.
    pub fn count(&self, outcome: Outcome) -> usize {
        self.outcomes
            .values()
            .filter(|all| all.last().is_some_and(|r| r.outcome == outcome))
            .count()
    }
}
