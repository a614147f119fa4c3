//! The metrics aggregator: every `flush_interval`, a snapshot of the
//! process's registry (runtime, tasks and source all record into it) goes
//! to every backend, with each counter's increase since the last flush.
//! The runner flushes once more after every worker has stopped, so the
//! last flush has every count.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use actix::prelude::*;
use tempest_source::metrics::{Key, Value};
use tempest_source::Metrics;

use super::backends::{Backend, Flush};

/// The registry, the backends, and the counters as last flushed.
pub(crate) struct Flusher {
    root: Metrics,
    backends: Vec<Box<dyn Backend>>,
    last: BTreeMap<Key, u64>,
}

impl Flusher {
    pub fn new(root: Metrics, backends: Vec<Box<dyn Backend>>) -> Arc<Mutex<Flusher>> {
        Arc::new(Mutex::new(Flusher {
            root,
            backends,
            last: BTreeMap::new(),
        }))
    }

    pub fn flush(&mut self) {
        let snapshot = self.root.snapshot();
        let mut deltas = Vec::new();
        for (key, value) in snapshot.iter() {
            if let Value::Counter(now) = value {
                let before = self.last.insert(key.clone(), *now).unwrap_or(0);
                deltas.push((key.clone(), now.saturating_sub(before)));
            }
        }
        let flush = Flush {
            at: SystemTime::now(),
            snapshot: &snapshot,
            deltas: &deltas,
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
