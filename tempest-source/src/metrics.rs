//! A small metrics handle shared by the runtime, tasks and sources.
//!
//! A [`Metrics`] handle records counters and gauges, each under a name and
//! the handle's labels, into one registry per topology process. The runtime
//! reads a [`Snapshot`] of the registry (the test harness returns one; the
//! metrics backends flush one). Handles are cheap to clone; recording takes
//! one uncontended lock, so record per batch on hot paths where you can.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

type Labels = Arc<[(Cow<'static, str>, Cow<'static, str>)]>;

/// The identity of one time series: a name and its labels.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    name: Cow<'static, str>,
    labels: Labels,
}

impl Key {
    /// The metric's name, e.g. `tempest.task.msgs_in`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The value of label `label`, if the series has it.
    pub fn label(&self, label: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == label)
            .map(|(_, v)| v.as_ref())
    }

    /// All labels, in the order they were added.
    pub fn labels(&self) -> impl Iterator<Item = (&str, &str)> {
        self.labels.iter().map(|(k, v)| (k.as_ref(), v.as_ref()))
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name)?;
        if !self.labels.is_empty() {
            f.write_str("{")?;
            for (i, (k, v)) in self.labels.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                write!(f, "{k}={v}")?;
            }
            f.write_str("}")?;
        }
        Ok(())
    }
}

/// The current value of one series.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Value {
    /// A monotonic count.
    Counter(u64),
    /// A level that goes up and down.
    Gauge(i64),
}

#[derive(Debug, Default)]
struct Registry {
    values: Mutex<BTreeMap<Key, Value>>,
}

/// A handle to record metrics under a fixed set of labels.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    labels: Labels,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// A handle onto a new, empty registry, with no labels.
    pub fn new_registry() -> Self {
        Metrics {
            registry: Arc::default(),
            labels: Arc::new([]),
        }
    }

    /// A handle onto the same registry with one more label.
    pub fn with_label(
        &self,
        key: impl Into<Cow<'static, str>>,
        value: impl Into<Cow<'static, str>>,
    ) -> Self {
        let mut labels: Vec<_> = self.labels.iter().cloned().collect();
        labels.push((key.into(), value.into()));
        Metrics {
            registry: Arc::clone(&self.registry),
            labels: labels.into(),
        }
    }

    /// Adds `by` to counter `name`.
    pub fn incr(&self, name: impl Into<Cow<'static, str>>, by: u64) {
        if by == 0 {
            return;
        }
        let key = self.key(name.into());
        let mut values = self.lock();
        match values.entry(key).or_insert(Value::Counter(0)) {
            Value::Counter(c) => *c = c.saturating_add(by),
            other => *other = Value::Counter(by),
        }
    }

    /// Sets gauge `name` to `value`.
    pub fn gauge(&self, name: impl Into<Cow<'static, str>>, value: i64) {
        let key = self.key(name.into());
        self.lock().insert(key, Value::Gauge(value));
    }

    /// Every series in the registry, labels and all.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            values: self.lock().clone(),
        }
    }

    fn key(&self, name: Cow<'static, str>) -> Key {
        Key {
            name,
            labels: Arc::clone(&self.labels),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, Value>> {
        // A panic while holding this lock leaves the map consistent (every
        // update is a single insert), so a poisoned lock is still usable.
        self.registry
            .values
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A copy of every series in a registry at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    values: BTreeMap<Key, Value>,
}

impl Snapshot {
    /// Every series and its value.
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Value)> {
        self.values.iter()
    }

    /// The sum of counter `name` over every series whose labels include all
    /// of `labels`.
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.matching(name, labels)
            .map(|v| match v {
                Value::Counter(c) => *c,
                Value::Gauge(_) => 0,
            })
            .sum()
    }

    /// The value of gauge `name` in the first series whose labels include
    /// all of `labels`.
    pub fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> Option<i64> {
        self.matching(name, labels).find_map(|v| match v {
            Value::Gauge(g) => Some(*g),
            Value::Counter(_) => None,
        })
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Value> + 'a {
        self.values
            .iter()
            .filter(move |(k, _)| {
                k.name() == name && labels.iter().all(|(lk, lv)| k.label(lk) == Some(lv))
            })
            .map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_up_per_label_set() {
        let root = Metrics::new_registry().with_label("topology", "t");
        let a = root.with_label("task", "a");
        let b = root.with_label("task", "b");
        a.incr("msgs", 2);
        a.incr("msgs", 3);
        b.incr("msgs", 10);
        b.incr("msgs", 0);
        let snap = root.snapshot();
        assert_eq!(snap.counter("msgs", &[("task", "a")]), 5);
        assert_eq!(snap.counter("msgs", &[("task", "b")]), 10);
        assert_eq!(snap.counter("msgs", &[("topology", "t")]), 15);
        assert_eq!(snap.counter("msgs", &[("task", "c")]), 0);
    }

    #[test]
    fn gauges_keep_the_last_value() {
        let m = Metrics::new_registry();
        m.gauge("depth", 5);
        m.gauge("depth", -2);
        assert_eq!(m.snapshot().gauge("depth", &[]), Some(-2));
        assert_eq!(m.snapshot().gauge("absent", &[]), None);
    }

    #[test]
    fn keys_debug_print_like_prometheus() {
        let m = Metrics::new_registry().with_label("task", "split");
        m.incr("in", 1);
        let snap = m.snapshot();
        let (key, _) = snap.iter().next().unwrap();
        assert_eq!(format!("{key:?}"), "in{task=split}");
    }
}
