//! The [`Task`] trait: one step of a pipeline (Storm's bolt).

use std::fmt;

use bytes::Bytes;
use tempest_source::Metrics;

/// A message as a task receives and emits it.
pub type Msg = Bytes;

/// What [`Task::handle`] returns: the task's outputs, or an error that the
/// topology's failure policy handles.
pub type TaskResult = Result<Output, TaskError>;

/// The outputs of one [`Task::handle`] call. Every output goes to every
/// child of the task.
///
/// `Output::None` and `Output::One` do not allocate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Output {
    /// No output: the task's descendants that have no other live parent
    /// complete without running for this message.
    #[default]
    None,
    /// One output.
    One(Msg),
    /// Any number of outputs.
    Many(Vec<Msg>),
}

impl Output {
    /// One output from anything that converts into bytes.
    pub fn one(msg: impl Into<Msg>) -> Self {
        Output::One(msg.into())
    }

    /// How many outputs there are.
    pub fn len(&self) -> usize {
        match self {
            Output::None => 0,
            Output::One(_) => 1,
            Output::Many(v) => v.len(),
        }
    }

    /// Whether there is no output.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the outputs to `out`.
    #[inline]
    pub(crate) fn drain_into(self, out: &mut Vec<Msg>) {
        match self {
            Output::None => {}
            Output::One(m) => out.push(m),
            Output::Many(v) => out.extend(v),
        }
    }
}

impl From<()> for Output {
    fn from((): ()) -> Self {
        Output::None
    }
}

impl From<Msg> for Output {
    fn from(m: Msg) -> Self {
        Output::One(m)
    }
}

impl From<Vec<Msg>> for Output {
    fn from(v: Vec<Msg>) -> Self {
        Output::Many(v)
    }
}

impl From<Option<Msg>> for Output {
    fn from(m: Option<Msg>) -> Self {
        m.map_or(Output::None, Output::One)
    }
}

/// A task's failure to handle one message.
///
/// Any `std::error::Error` converts into it, so `?` works inside
/// [`Task::handle`]; [`TaskError::msg`] makes one from text.
pub struct TaskError {
    message: String,
}

impl TaskError {
    /// An error with this message.
    pub fn msg(message: impl Into<String>) -> Self {
        TaskError {
            message: message.into(),
        }
    }

    /// The error's message, with its causes.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl<E: std::error::Error> From<E> for TaskError {
    fn from(err: E) -> Self {
        let mut message = err.to_string();
        let mut source = err.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        TaskError { message }
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TaskError({:?})", self.message)
    }
}

/// What the runtime hands a task when a worker starts it.
#[derive(Clone, Debug)]
pub struct TaskContext {
    /// The topology's name.
    pub topology: String,
    /// The task's name.
    pub task: String,
    /// Which of the task's workers this is, from 0.
    pub worker: usize,
    /// A handle to record the task's own metrics, labelled with the topology
    /// and the task's name.
    pub metrics: Metrics,
}

/// One step of a pipeline: it handles a message and emits zero, one or many.
///
/// Each worker of a task owns its own instance (cloned from the one given to
/// [`Pipeline::task`](crate::Pipeline::task)), so `handle` takes `&mut self`
/// and needs no locking. A worker calls `handle` for one message at a time.
///
/// A panic inside `filter` or `handle` fails that message (per the failure
/// policy), not the process; the worker keeps its instance and goes on.
pub trait Task: Send + 'static {
    /// The task's name, unique within its pipeline.
    fn name(&self) -> &str;

    /// Called once per worker before its first message.
    fn started(&mut self, _ctx: &TaskContext) {}

    /// Returns `false` to skip a message: it counts as handled with no
    /// output.
    fn filter(&mut self, _msg: &Msg) -> bool {
        true
    }

    /// Handles one message.
    fn handle(&mut self, msg: Msg) -> TaskResult;

    /// Called once per worker when it stops.
    fn shutdown(&mut self) {}

    /// Called after each batch of messages, and when the worker is idle:
    /// record batched metrics here.
    fn flush_metrics(&mut self) {}
}

/// A task that passes every message on unchanged, for the crate's unit
/// tests.
#[cfg(test)]
#[derive(Clone, Copy)]
pub(crate) struct PassOn(pub &'static str);

#[cfg(test)]
impl Task for PassOn {
    fn name(&self) -> &str {
        self.0
    }
    fn handle(&mut self, msg: Msg) -> TaskResult {
        Ok(Output::One(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_convert_and_count() {
        assert_eq!(Output::from(()).len(), 0);
        assert_eq!(Output::one("a").len(), 1);
        assert_eq!(Output::from(vec![Msg::new(), Msg::new()]).len(), 2);
        assert!(Output::from(None::<Msg>).is_empty());
        let mut out = Vec::new();
        Output::from(vec![Msg::from("x"), Msg::from("y")]).drain_into(&mut out);
        Output::one("z").drain_into(&mut out);
        assert_eq!(out, vec!["x", "y", "z"]);
    }

    #[test]
    fn task_errors_keep_their_causes() {
        let err: TaskError = "12x".parse::<u32>().unwrap_err().into();
        assert_eq!(err.message(), "invalid digit found in string");
        assert_eq!(TaskError::msg("bad").to_string(), "bad");
    }
}
