//! A small metrics handle shared by the runtime, tasks and sources.
//!
//! A [`Metrics`] handle records counters, gauges and histograms, each under
//! a name and the handle's labels, into one registry per process. The
//! runtime reads a [`Snapshot`] of the registry (the test harness returns
//! one; the metrics backends flush one). Handles are cheap to clone;
//! recording into the registry takes one uncontended lock, so on hot paths
//! count locally and record per batch, and observe latencies into a local
//! [`Histogram`], which records without any lock and merges into the
//! registry when flushed.
//!
//! Histograms are HDR histograms (2 significant digits: every quantile is
//! within 1% of the true value) that grow to the largest value recorded.
//! Durations are recorded in microseconds; by convention their names end
//! in `_us`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Names of metrics that any source may record, so that every source
/// reports them alike. The runtime's own names are in `tempest::metrics::names`.
pub mod names {
    /// Counter: messages the source gave up on and set aside (a dead-letter
    /// stream or list, or dropped), after too many deliveries.
    pub const SOURCE_DEAD_LETTERED: &str = "tempest.source.dead_lettered";
    /// Counter: messages the source lost before they could be processed
    /// (for example trimmed from a stream while pending).
    pub const SOURCE_LOST: &str = "tempest.source.lost";
    /// Gauge: messages waiting at the source, not yet read, where the
    /// source can tell (for example a consumer group's lag).
    pub const SOURCE_LAG: &str = "tempest.source.lag";
}

type Labels = Arc<[(Cow<'static, str>, Cow<'static, str>)]>;

/// This host's name (`$HOSTNAME`, else the kernel's), or `localhost`: for
/// default names that should be stable per host, such as a consumer name
/// or a metrics instance.
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

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
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A monotonic count.
    Counter(u64),
    /// A level that goes up and down.
    Gauge(i64),
    /// Every observation so far.
    Histogram(Distribution),
}

/// A distribution of observed values: count, sum, min, max and quantiles.
///
/// An HDR histogram with 2 significant digits (quantiles within 1%) that
/// grows to the largest value recorded; the count, sum, min and max are
/// exact, and no quantile is reported beyond min or max.
#[derive(Clone)]
pub struct Distribution {
    hist: hdrhistogram::Histogram<u64>,
    sum: u64,
    min: u64,
    max: u64,
}

impl Default for Distribution {
    fn default() -> Self {
        Distribution::new()
    }
}

impl PartialEq for Distribution {
    fn eq(&self, other: &Self) -> bool {
        self.sum == other.sum && self.hist == other.hist
    }
}

impl fmt::Debug for Distribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "count={} p50={} p90={} p99={} max={}",
            self.count(),
            self.quantile(0.5),
            self.quantile(0.9),
            self.quantile(0.99),
            self.max()
        )
    }
}

impl Distribution {
    /// An empty distribution.
    pub fn new() -> Self {
        // Two significant digits with auto-resize: a few KiB that grow
        // only as far as the largest value seen.
        #[allow(clippy::expect_used)] // Constant arguments: it cannot fail.
        let hist = hdrhistogram::Histogram::new(2).expect("2 significant digits are valid");
        Distribution {
            hist,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    /// Records one observation of `value`.
    #[inline]
    pub fn record(&mut self, value: u64) {
        self.record_n(value, 1);
    }

    /// Records `count` observations of `value`.
    #[inline]
    pub fn record_n(&mut self, value: u64, count: u64) {
        if count == 0 {
            return;
        }
        if self.hist.record_n(value, count).is_err() {
            // Beyond what the histogram can grow to: clamp to its maximum.
            self.hist.saturating_record_n(value, count);
        }
        self.sum = self.sum.saturating_add(value.saturating_mul(count));
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    /// Records a duration, in microseconds.
    #[inline]
    pub fn record_duration(&mut self, d: Duration) {
        self.record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    /// How many observations.
    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// True if nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.hist.is_empty()
    }

    /// The sum of every observation (exact, saturating).
    pub fn sum(&self) -> u64 {
        self.sum
    }

    /// The smallest observation (0 if none).
    pub fn min(&self) -> u64 {
        if self.is_empty() {
            0
        } else {
            self.min
        }
    }

    /// The largest observation (0 if none).
    pub fn max(&self) -> u64 {
        if self.is_empty() {
            0
        } else {
            self.max
        }
    }

    /// The mean (0 if none).
    pub fn mean(&self) -> f64 {
        if self.is_empty() {
            0.0
        } else {
            self.sum as f64 / self.count() as f64
        }
    }

    /// The value at quantile `q` (0.0 to 1.0; 0.99 is p99), within 1%;
    /// 0 if nothing was recorded.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.is_empty() {
            0
        } else {
            self.hist
                .value_at_quantile(q.clamp(0.0, 1.0))
                .clamp(self.min, self.max)
        }
    }

    /// Adds every observation of `other` to this one.
    pub fn merge(&mut self, other: &Distribution) {
        if other.is_empty() {
            return;
        }
        if self.hist.add(&other.hist).is_err() {
            // Cannot happen with auto-resize; keep the count right anyway.
            for v in other.hist.iter_recorded() {
                self.hist
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
        self.sum = self.sum.saturating_add(other.sum);
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// What was recorded since `earlier`, a copy of this distribution taken
    /// before: the observations of one flush interval.
    pub fn since(&self, earlier: &Distribution) -> Distribution {
        let mut d = self.clone();
        if d.hist.subtract(&earlier.hist).is_err() {
            // `earlier` is not a prefix of `self` (say, the registry was
            // replaced): report everything.
            return self.clone();
        }
        d.sum = self.sum.saturating_sub(earlier.sum);
        // The interval's extremes are known to the histogram's precision,
        // and lie within the whole run's exact ones.
        if !d.is_empty() {
            let (lo, hi) = (self.min, self.max);
            d.min = d.hist.lowest_equivalent(d.hist.min()).clamp(lo, hi);
            d.max = d.hist.highest_equivalent(d.hist.max()).clamp(lo, hi);
        }
        d
    }

    /// Forgets every observation, keeping the memory.
    pub fn reset(&mut self) {
        self.hist.reset();
        self.sum = 0;
        self.min = u64::MAX;
        self.max = 0;
    }
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

    /// Records one observation into histogram `name`. On hot paths keep a
    /// [`Histogram`] instead: it records without taking the lock.
    pub fn record(&self, name: impl Into<Cow<'static, str>>, value: u64) {
        self.update_histogram(name.into(), |h| h.record(value));
    }

    /// Records a duration, in microseconds, into histogram `name`.
    pub fn record_duration(&self, name: impl Into<Cow<'static, str>>, d: Duration) {
        self.record(name, u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    /// A local recorder for histogram `name` under this handle's labels.
    /// It records without locking and adds its observations to the
    /// registry on [`Histogram::flush`] and when dropped.
    pub fn histogram(&self, name: impl Into<Cow<'static, str>>) -> Histogram {
        Histogram {
            metrics: self.clone(),
            name: name.into(),
            local: Distribution::new(),
        }
    }

    fn merge(&self, name: Cow<'static, str>, d: &Distribution) {
        if !d.is_empty() {
            self.update_histogram(name, |h| h.merge(d));
        }
    }

    /// Applies `update` to histogram `name` in the registry, under one lock;
    /// a series of another kind under that name becomes a histogram.
    fn update_histogram(&self, name: Cow<'static, str>, update: impl FnOnce(&mut Distribution)) {
        let key = self.key(name);
        let mut values = self.lock();
        let value = values
            .entry(key)
            .or_insert_with(|| Value::Histogram(Distribution::new()));
        if !matches!(value, Value::Histogram(_)) {
            *value = Value::Histogram(Distribution::new());
        }
        if let Value::Histogram(h) = value {
            update(h);
        }
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

/// A histogram recorder local to one thread or actor: observations go into
/// a private [`Distribution`] (no lock, no allocation once warm) and are
/// added to the registry on [`flush`](Histogram::flush) and on drop.
pub struct Histogram {
    metrics: Metrics,
    name: Cow<'static, str>,
    local: Distribution,
}

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Histogram")
            .field("name", &self.name)
            .field("unflushed", &self.local)
            .finish_non_exhaustive()
    }
}

impl Histogram {
    /// Records one observation of `value`.
    #[inline]
    pub fn record(&mut self, value: u64) {
        self.local.record(value);
    }

    /// Records `count` observations of `value`.
    #[inline]
    pub fn record_n(&mut self, value: u64, count: u64) {
        self.local.record_n(value, count);
    }

    /// Records a duration, in microseconds.
    #[inline]
    pub fn record_duration(&mut self, d: Duration) {
        self.local.record_duration(d);
    }

    /// Adds what was recorded since the last flush to the registry.
    pub fn flush(&mut self) {
        if !self.local.is_empty() {
            self.metrics.merge(self.name.clone(), &self.local);
            self.local.reset();
        }
    }
}

impl Drop for Histogram {
    fn drop(&mut self) {
        self.flush();
    }
}

/// A copy of every series in a registry at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
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
                _ => 0,
            })
            .sum()
    }

    /// Histogram `name` merged over every series whose labels include all
    /// of `labels` (empty if there is none).
    pub fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Distribution {
        let mut d = Distribution::new();
        for v in self.matching(name, labels) {
            if let Value::Histogram(h) = v {
                d.merge(h);
            }
        }
        d
    }

    /// The value of gauge `name` in the first series whose labels include
    /// all of `labels`.
    pub fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> Option<i64> {
        self.matching(name, labels).find_map(|v| match v {
            Value::Gauge(g) => Some(*g),
            _ => None,
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
    fn histograms_merge_locally_recorded_values_on_flush() {
        let root = Metrics::new_registry().with_label("topology", "t");
        let mut a = root.with_label("task", "a").histogram("lat_us");
        for v in 1..=1000 {
            a.record(v);
        }
        assert!(root.snapshot().histogram("lat_us", &[]).is_empty());
        a.flush();
        a.record_duration(Duration::from_millis(5));
        drop(a);
        root.with_label("task", "b").record("lat_us", 7);
        let snap = root.snapshot();
        let d = snap.histogram("lat_us", &[("task", "a")]);
        assert_eq!(d.count(), 1001);
        assert_eq!(d.sum(), 500_500 + 5000);
        let p50 = d.quantile(0.5);
        assert!((495..=505).contains(&p50), "p50 {p50}");
        let p99 = d.quantile(0.99);
        assert!((985..=1000).contains(&p99), "p99 {p99}");
        assert_eq!(d.max(), 5000);
        assert_eq!(d.min(), 1);
        assert!(d.quantile(1.0) <= d.max() && d.quantile(0.0) >= d.min());
        let all = snap.histogram("lat_us", &[("topology", "t")]);
        assert_eq!(all.count(), 1002);
        assert_eq!(snap.histogram("absent", &[]).count(), 0);
        assert_eq!(snap.histogram("absent", &[]).quantile(0.99), 0);
    }

    #[test]
    fn a_distribution_since_an_earlier_copy_is_the_interval() {
        let mut d = Distribution::new();
        d.record_n(10, 5);
        let earlier = d.clone();
        d.record_n(1_000_000, 2);
        let interval = d.since(&earlier);
        assert_eq!(interval.count(), 2);
        assert_eq!(interval.sum(), 2_000_000);
        assert_eq!(interval.min(), d.max().min(interval.min()));
        assert!(interval.min() >= 990_000, "{interval:?}");
        // Not a prefix: everything.
        assert_eq!(earlier.since(&d).count(), 5);
        // Huge values clamp rather than fail.
        d.record(u64::MAX);
        assert_eq!(d.count(), 8);
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
