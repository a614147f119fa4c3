//! Metrics: every name the runtime records, and the backends a topology
//! flushes them to.
//!
//! Every series carries the label `topology`; task metrics also `task`,
//! source metrics also `source`. The book's metrics chapter lists the same
//! names. The aggregator takes a snapshot of the process's registry every
//! `flush_interval` and hands it to each configured [`backends`] entry:
//! statsd, a Prometheus scrape endpoint or push gateway, a JSON-lines
//! file, the log, the console.
//!
//! Histograms (`_us` names are microseconds) are recorded into local
//! [`Histogram`](tempest_source::metrics::Histogram)s on the hot paths and
//! merged into the registry when the component flushes (about once a
//! second), so recording costs no lock.

pub(crate) mod aggregator;
pub mod backends;

pub use backends::{MetricsConfig, Target};

/// The names of the runtime's metrics.
pub mod names {
    /// Counter: source messages read from the source.
    pub const SOURCE_READ: &str = "tempest.source.read";
    /// Counter: polls of the source.
    pub const SOURCE_POLLS: &str = "tempest.source.polls";
    /// Counter: polls that returned nothing.
    pub const SOURCE_EMPTY_POLLS: &str = "tempest.source.empty_polls";
    /// Counter: ack calls made to the source (`ack` or `batch_ack`).
    pub const SOURCE_ACK_CALLS: &str = "tempest.source.ack_calls";
    /// Gauge: 1 while the source reports itself healthy, else 0.
    pub const SOURCE_HEALTHY: &str = "tempest.source.healthy";
    /// Histogram: microseconds one poll of the source took (polls that
    /// returned messages and empty ones alike).
    pub const SOURCE_POLL_US: &str = "tempest.source.poll_us";
    /// Histogram: messages returned per poll that returned any.
    pub const SOURCE_POLL_SIZE: &str = "tempest.source.poll_size";
    pub use tempest_source::metrics::names::{SOURCE_DEAD_LETTERED, SOURCE_LAG, SOURCE_LOST};
    /// Counter: source messages acked.
    pub const MSGS_ACKED: &str = "tempest.msgs.acked";
    /// Counter: source messages given up on after a task failure.
    pub const MSGS_FAILED: &str = "tempest.msgs.failed";
    /// Counter: source messages given up on after a timeout.
    pub const MSGS_TIMED_OUT: &str = "tempest.msgs.timed_out";
    /// Counter: retries started.
    pub const MSGS_RETRIED: &str = "tempest.msgs.retried";
    /// Histogram: microseconds from a source message entering the pipeline
    /// to its last task ack, per acked source message (retries included).
    pub const MSGS_LATENCY_US: &str = "tempest.msgs.latency_us";
    /// Gauge: source messages in flight.
    pub const MSGS_INFLIGHT: &str = "tempest.msgs.inflight";
    /// Gauge: the most source messages ever in flight at once.
    pub const MSGS_INFLIGHT_MAX: &str = "tempest.msgs.inflight_max";
    /// Counter: results for messages already retried, failed or timed out.
    pub const STALE_RESULTS: &str = "tempest.msgs.stale_results";
    /// Counter: deliveries of an id already in flight (from a source whose
    /// ids name one entry), not run again but settled with it.
    pub const MSGS_DUPLICATES: &str = "tempest.msgs.duplicates";
    /// Counter (per task): task messages received.
    pub const TASK_MSGS_IN: &str = "tempest.task.msgs_in";
    /// Counter (per task): task messages emitted.
    pub const TASK_MSGS_OUT: &str = "tempest.task.msgs_out";
    /// Counter (per task): `handle` errors.
    pub const TASK_ERRORS: &str = "tempest.task.errors";
    /// Counter (per task): panics in `filter` or `handle`.
    pub const TASK_PANICS: &str = "tempest.task.panics";
    /// Counter (per task): messages `filter` skipped.
    pub const TASK_FILTERED: &str = "tempest.task.filtered";
    /// Counter (per task): batches handled.
    pub const TASK_BATCHES: &str = "tempest.task.batches";
    /// Counter (per task): nanoseconds spent handling batches; divided by
    /// `msgs_in`, the mean handle time per message.
    pub const TASK_HANDLE_NANOS: &str = "tempest.task.handle_nanos";
    /// Histogram (per task): microseconds to handle one batch (`filter`
    /// and `handle` of every message in it). The loop reads the clock per
    /// batch, not per message, to stay cheap.
    pub const TASK_BATCH_US: &str = "tempest.task.batch_us";
    /// Histogram (per task): messages per batch a worker took.
    pub const TASK_BATCH_SIZE: &str = "tempest.task.batch_size";
    /// Gauge (per task): workers connected: worker threads in this
    /// process plus sessions of remote workers.
    pub const TASK_WORKERS: &str = "tempest.task.workers";
    /// Gauge (per task): task messages waiting for a worker.
    pub const TASK_QUEUE_DEPTH: &str = "tempest.task.queue_depth";
    /// Gauge (per worker of an async task, label `worker`): messages whose
    /// call is in progress (at most the task's concurrency).
    pub const TASK_IN_PROGRESS: &str = "tempest.task.in_progress";
    /// Gauge (per worker of an async task, label `worker`): the most
    /// messages ever in progress at once.
    pub const TASK_IN_PROGRESS_MAX: &str = "tempest.task.in_progress_max";
    /// Counter (per task): async calls cancelled because their message's
    /// deadline passed (each answered as a timeout).
    pub const TASK_CANCELLED: &str = "tempest.task.cancelled";
    /// Counter (per task): ticks its workers ran ([`Task::tick`](crate::Task::tick)).
    pub const TASK_TICKS: &str = "tempest.task.ticks";
    /// Counter (per task, with at-most-once updates): changes to keyed
    /// state left undone because the message's update was applied before
    /// (a message handled again after a failure).
    pub const STATE_UPDATES_SKIPPED: &str = "tempest.state.updates_skipped";
}
