//! The metrics aggregator: every `flush_interval`, a snapshot of the
//! process's registry (runtime, tasks and source all record into it) goes
//! to every backend, with each counter's increase since the last flush.
//! The runner flushes once more after every worker has stopped, so the
//! last flush has every count.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use actix::prelude::*;
use tempest_source::metrics::{Distribution, Key, Value};
use tempest_source::Metrics;

use super::backends::{self, Backend, Flush, Role};
use super::MetricsConfig;
use crate::Error;

/// The registry, the backends, and the counters as last flushed.
pub(crate) struct Flusher {
    root: Metrics,
    backends: Vec<Box<dyn Backend>>,
    last: BTreeMap<Key, u64>,
    last_hist: BTreeMap<Key, Distribution>,
}

impl Flusher {
    /// Opens the backends `config` names for a process in `role`; `None`
    /// if there are none.
    pub fn open(
        config: &MetricsConfig,
        root: &Metrics,
        role: Role,
    ) -> Result<Option<Arc<Mutex<Flusher>>>, Error> {
        let backends = backends::open(&config.target, root, role).map_err(|e| Error::Io {
            what: "opening the metrics backends".into(),
            source: e,
        })?;
        Ok((!backends.is_empty()).then(|| Flusher::new(root.clone(), backends)))
    }

    fn new(root: Metrics, backends: Vec<Box<dyn Backend>>) -> Arc<Mutex<Flusher>> {
        Arc::new(Mutex::new(Flusher {
            root,
            backends,
            last: BTreeMap::new(),
            last_hist: BTreeMap::new(),
        }))
    }

    pub fn flush(&mut self) {
        let snapshot = self.root.snapshot();
        let mut deltas = Vec::new();
        let mut intervals = BTreeMap::new();
        for (key, value) in snapshot.iter() {
            match value {
                Value::Counter(now) => {
                    let before = self.last.insert(key.clone(), *now).unwrap_or(0);
                    deltas.push((key.clone(), now.saturating_sub(before)));
                }
                Value::Histogram(now) => {
                    let interval = match self.last_hist.get_mut(key) {
                        Some(before) => {
                            let interval = now.since(before);
                            before.clone_from(now);
                            interval
                        }
                        None => {
                            self.last_hist.insert(key.clone(), now.clone());
                            now.clone()
                        }
                    };
                    intervals.insert(key.clone(), interval);
                }
                Value::Gauge(_) => {}
            }
        }
        let flush = Flush {
            at: SystemTime::now(),
            snapshot: &snapshot,
            deltas: &deltas,
            intervals: &intervals,
        };
        for b in &mut self.backends {
            if let Err(e) = b.flush(&flush) {
                log::warn!("Flushing metrics failed: {e}.");
            }
        }
    }
}

/// Flushes `flusher` every `interval`.
pub(crate) struct Aggregator {
    flusher: Arc<Mutex<Flusher>>,
    interval: Duration,
}

impl Aggregator {
    pub fn new(flusher: Arc<Mutex<Flusher>>, interval: Duration) -> Self {
        Aggregator { flusher, interval }
    }
}

impl Actor for Aggregator {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.interval, |act, _| {
            act.flusher
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .flush();
        });
    }
}
