//! An in-memory source for tests, benchmarks and the quick start.
//!
//! [`MockSource`] behaves like a small broker:
//!
//! - it delivers messages you prime through its [`MockHandle`], then
//!   `count` generated ones (payloads cycled from `payloads`, or
//!   `payload_size` bytes each);
//! - it records every delivery, every ack and every message the runtime
//!   gave up on, so a test can assert exactly what happened to each message;
//! - with `redeliver_after_ms` set, a delivered message that is not acked in
//!   that time is delivered again (a visibility timeout), up to
//!   `max_deliveries` deliveries, after which it is dead-lettered.
//!
//! Ids are [`MsgId::Int`] sequence numbers from 0, in the order messages are
//! primed or generated.
//!
//! ```
//! use tempest_source::Source;
//! use tempest_source_mock::{MockConfig, MockSource};
//!
//! let source = MockSource::from_config(MockConfig { count: 3, ..MockConfig::default() }).unwrap();
//! let handle = source.handle();
//! handle.push("primed first");
//! assert_eq!(handle.total(), 4);
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tempest_source::metrics::names;
use tempest_source::{
    now_millis, AckPolicy, FailedMsg, Headers, Metrics, MsgId, Source, SourceContext, SourceError,
    SourceMsg, SourceSettings,
};

/// The mock source's configuration (`[source.config]`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MockConfig {
    /// How many messages to generate after the primed ones.
    pub count: u64,
    /// Payloads to cycle through for generated messages. When empty, each
    /// generated payload is `payload_size` bytes.
    pub payloads: Vec<String>,
    /// The size of a generated payload when `payloads` is empty.
    pub payload_size: usize,
    /// The most messages one poll returns.
    pub batch_size: usize,
    /// Redeliver a message not acked within this many milliseconds.
    pub redeliver_after_ms: Option<u64>,
    /// With redelivery: dead-letter a message instead of delivering it a
    /// time more than this.
    pub max_deliveries: Option<u32>,
    /// Keep the source open after the primed and generated messages are
    /// done, until [`MockHandle::close`] is called.
    pub open: bool,
    /// How the runtime acks.
    pub ack_policy: AckPolicy,
    /// The longest a partial ack batch waits, in milliseconds.
    pub ack_interval_ms: u64,
    /// The wait after an empty poll, in milliseconds.
    pub poll_interval_ms: u64,
    /// The longest wait between polls, in milliseconds.
    pub max_backoff_ms: u64,
    /// Declare that an id names one message (true by default: ids are
    /// sequence numbers), so the runtime does not run a redelivery of an
    /// id that is still in flight. `false` makes the mock behave like a
    /// source whose ids may repeat, where every delivery runs.
    pub unique_ids: bool,
}

impl Default for MockConfig {
    fn default() -> Self {
        let settings = SourceSettings::default();
        MockConfig {
            count: 0,
            payloads: Vec::new(),
            payload_size: 100,
            batch_size: settings.poll_count,
            redeliver_after_ms: None,
            max_deliveries: None,
            open: false,
            ack_policy: settings.ack_policy,
            ack_interval_ms: settings.ack_interval.as_millis() as u64,
            poll_interval_ms: settings.poll_interval.as_millis() as u64,
            max_backoff_ms: settings.max_backoff.as_millis() as u64,
            unique_ids: true,
        }
    }
}

impl MockConfig {
    /// A config that generates `count` messages of `payload_size` bytes.
    pub fn generator(count: u64, payload_size: usize) -> Self {
        MockConfig {
            count,
            payload_size,
            ..MockConfig::default()
        }
    }

    fn validate(&self) -> Result<(), SourceError> {
        let mut problems = Vec::new();
        if self.batch_size == 0 {
            problems.push("batch_size must be at least 1");
        }
        if let AckPolicy::Batch(0) = self.ack_policy {
            problems.push("ack_policy batch size must be at least 1");
        }
        if self.redeliver_after_ms == Some(0) {
            problems.push("redeliver_after_ms must be at least 1");
        }
        if self.max_deliveries == Some(0) {
            problems.push("max_deliveries must be at least 1");
        }
        if self.max_deliveries.is_some() && self.redeliver_after_ms.is_none() {
            problems.push("max_deliveries needs redeliver_after_ms");
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SourceError::config(format!(
                "mock source: {}",
                problems.join("; ")
            )))
        }
    }
}

#[derive(Debug)]
struct State {
    config: MockConfig,
    templates: Vec<Bytes>,
    next_id: u64,
    generated: u64,
    primed: HashMap<u64, Bytes>,
    ready: VecDeque<u64>,
    /// Per id: deliveries so far.
    delivered: Vec<u32>,
    /// Per id: acks received.
    acked: Vec<u32>,
    /// Per id: dead-lettered.
    dead: Vec<bool>,
    /// Deliveries awaiting their ack, in order of their redelivery time.
    visibility: VecDeque<(Instant, u64)>,
    /// Delivered, not yet acked nor dead-lettered.
    outstanding: u64,
    /// Per id: deliveries the runtime holds (not yet acked, handed back by
    /// `fail`, or dead-lettered); one ack settles them all.
    in_hand: Vec<u32>,
    /// Deliveries the runtime holds, and the most it ever held at once.
    held: u64,
    max_held: u64,
    /// Dead-lettered since the last metrics flush.
    dead_unreported: u64,
    failed: Vec<FailedMsg>,
    /// The key and headers of primed messages that have them.
    meta: HashMap<u64, (Option<Bytes>, Headers)>,
    ack_calls: u64,
    unknown_acks: u64,
    closed: bool,
    shut_down: bool,
}

impl State {
    fn new(config: MockConfig) -> Self {
        let templates = if config.payloads.is_empty() {
            vec![Bytes::from(vec![b'x'; config.payload_size])]
        } else {
            config
                .payloads
                .iter()
                .map(|p| Bytes::copy_from_slice(p.as_bytes()))
                .collect()
        };
        State {
            config,
            templates,
            next_id: 0,
            generated: 0,
            primed: HashMap::new(),
            ready: VecDeque::new(),
            delivered: Vec::new(),
            acked: Vec::new(),
            dead: Vec::new(),
            visibility: VecDeque::new(),
            outstanding: 0,
            in_hand: Vec::new(),
            held: 0,
            max_held: 0,
            dead_unreported: 0,
            failed: Vec::new(),
            meta: HashMap::new(),
            ack_calls: 0,
            unknown_acks: 0,
            closed: false,
            shut_down: false,
        }
    }

    fn new_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.delivered.push(0);
        self.acked.push(0);
        self.dead.push(false);
        self.in_hand.push(0);
        id
    }

    /// The runtime no longer holds any delivery of message `i`.
    fn settle(&mut self, i: usize) {
        self.held -= u64::from(std::mem::take(&mut self.in_hand[i]));
    }

    fn payload(&self, id: u64) -> Bytes {
        match self.primed.get(&id) {
            Some(p) => p.clone(),
            None => self.templates[(id % self.templates.len() as u64) as usize].clone(),
        }
    }

    fn requeue_expired(&mut self, now: Instant) {
        while let Some(&(due, id)) = self.visibility.front() {
            if due > now {
                break;
            }
            self.visibility.pop_front();
            let i = id as usize;
            if self.acked[i] > 0 || self.dead[i] {
                continue;
            }
            match self.config.max_deliveries {
                Some(max) if self.delivered[i] >= max => {
                    self.dead[i] = true;
                    self.dead_unreported += 1;
                    self.outstanding -= 1;
                    self.settle(i);
                }
                _ => self.ready.push_back(id),
            }
        }
    }

    fn deliver(&mut self, id: u64, now: Instant, timestamp: u64, out: &mut Vec<SourceMsg>) {
        let i = id as usize;
        self.delivered[i] = self.delivered[i].saturating_add(1);
        if self.delivered[i] == 1 {
            self.outstanding += 1;
        }
        self.in_hand[i] += 1;
        self.held += 1;
        self.max_held = self.max_held.max(self.held);
        if let Some(after) = self.config.redeliver_after_ms {
            self.visibility
                .push_back((now + Duration::from_millis(after), id));
        }
        let (key, headers) = self.meta.get(&id).cloned().unwrap_or_default();
        out.push(SourceMsg {
            id: MsgId::Int(id),
            payload: self.payload(id),
            timestamp,
            delivered: self.delivered[i],
            key,
            headers,
        });
    }

    fn ack(&mut self, id: &MsgId) -> bool {
        let Some(i) = id
            .as_int()
            .filter(|&n| n < self.next_id)
            .map(|n| n as usize)
        else {
            self.unknown_acks += 1;
            return false;
        };
        self.acked[i] = self.acked[i].saturating_add(1);
        if self.acked[i] == 1 && !self.dead[i] && self.delivered[i] > 0 {
            self.outstanding -= 1;
        }
        self.settle(i);
        true
    }

    fn exhausted(&self) -> bool {
        (!self.config.open || self.closed)
            && self.generated >= self.config.count
            && self.ready.is_empty()
            && (self.config.redeliver_after_ms.is_none() || self.outstanding == 0)
    }
}

/// An in-memory source; see the [crate docs](crate).
#[derive(Debug)]
pub struct MockSource {
    state: Arc<Mutex<State>>,
    settings: SourceSettings,
    metrics: Option<Metrics>,
}

/// A handle to prime a [`MockSource`] and to read what happened to its
/// messages, usable from any thread while the topology runs.
#[derive(Clone, Debug)]
pub struct MockHandle {
    state: Arc<Mutex<State>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // Every update leaves the state consistent, so a poisoned lock (a test
    // thread that panicked) is still usable.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MockSource {
    /// A handle onto this source's state.
    pub fn handle(&self) -> MockHandle {
        MockHandle {
            state: Arc::clone(&self.state),
        }
    }
}

impl Source for MockSource {
    type Config = MockConfig;

    fn name(&self) -> &str {
        "mock"
    }

    fn from_config(config: MockConfig) -> Result<Self, SourceError> {
        config.validate()?;
        let settings = SourceSettings {
            poll_count: config.batch_size,
            poll_interval: Duration::from_millis(config.poll_interval_ms),
            max_backoff: Duration::from_millis(config.max_backoff_ms.max(config.poll_interval_ms)),
            ack_policy: config.ack_policy,
            ack_interval: Duration::from_millis(config.ack_interval_ms.max(1)),
            monitor_interval: SourceSettings::default().monitor_interval,
            // Ids are sequence numbers: one id, one message (unless a test
            // says otherwise).
            unique_ids: config.unique_ids,
            // It counts every delivery (and forgets everything when the
            // process ends, redelivering nothing).
            counts_deliveries: true,
        };
        Ok(MockSource {
            state: Arc::new(Mutex::new(State::new(config))),
            settings,
            metrics: None,
        })
    }

    fn setup(&mut self, ctx: &SourceContext) -> Result<(), SourceError> {
        self.metrics = Some(ctx.metrics.clone());
        Ok(())
    }

    fn flush_metrics(&mut self) {
        if let Some(m) = &self.metrics {
            let mut state = lock(&self.state);
            m.incr(
                names::SOURCE_DEAD_LETTERED,
                std::mem::take(&mut state.dead_unreported),
            );
            let waiting = (state.ready.len() as u64)
                .saturating_add(state.config.count.saturating_sub(state.generated));
            m.gauge(
                names::SOURCE_LAG,
                i64::try_from(waiting).unwrap_or(i64::MAX),
            );
        }
    }

    fn settings(&self) -> SourceSettings {
        self.settings.clone()
    }

    fn poll(&mut self, max: usize, out: &mut Vec<SourceMsg>) -> Result<(), SourceError> {
        let mut state = lock(&self.state);
        let max = max.min(state.config.batch_size);
        let now = Instant::now();
        let timestamp = now_millis();
        state.requeue_expired(now);
        let start = out.len();
        while out.len() - start < max {
            let Some(id) = state.ready.pop_front() else {
                break;
            };
            state.deliver(id, now, timestamp, out);
        }
        while out.len() - start < max && state.generated < state.config.count {
            state.generated += 1;
            let id = state.new_id();
            state.deliver(id, now, timestamp, out);
        }
        Ok(())
    }

    fn ack(&mut self, id: &MsgId) -> Result<(), SourceError> {
        let mut state = lock(&self.state);
        state.ack_calls += 1;
        if state.ack(id) {
            Ok(())
        } else {
            Err(SourceError::failed(format!(
                "mock source: ack of unknown message {id}"
            )))
        }
    }

    fn batch_ack(&mut self, ids: &[MsgId]) -> Result<(), SourceError> {
        let mut state = lock(&self.state);
        state.ack_calls += 1;
        let unknown = ids.iter().filter(|id| !state.ack(id)).count();
        if unknown == 0 {
            Ok(())
        } else {
            Err(SourceError::failed(format!(
                "mock source: ack of {unknown} unknown message(s)"
            )))
        }
    }

    fn fail(&mut self, msgs: &[FailedMsg]) -> Result<(), SourceError> {
        let mut state = lock(&self.state);
        for m in msgs {
            if let Some(i) = m.id.as_int().filter(|&n| n < state.next_id) {
                state.settle(i as usize);
            }
        }
        state.failed.extend_from_slice(msgs);
        Ok(())
    }

    fn exhausted(&self) -> bool {
        lock(&self.state).exhausted()
    }

    fn shutdown(&mut self) -> Result<(), SourceError> {
        lock(&self.state).shut_down = true;
        Ok(())
    }
}

impl MockHandle {
    /// Primes one message, delivered before any generated one; returns its id.
    pub fn push(&self, payload: impl Into<Bytes>) -> MsgId {
        let mut state = lock(&self.state);
        let id = state.new_id();
        state.primed.insert(id, payload.into());
        state.ready.push_back(id);
        MsgId::Int(id)
    }

    /// Primes one message with a key and headers (as a broker that has
    /// them would deliver it); returns its id.
    pub fn push_with(
        &self,
        payload: impl Into<Bytes>,
        key: Option<Bytes>,
        headers: Headers,
    ) -> MsgId {
        let mut state = lock(&self.state);
        let id = state.new_id();
        state.primed.insert(id, payload.into());
        state.meta.insert(id, (key, headers));
        state.ready.push_back(id);
        MsgId::Int(id)
    }

    /// Primes several messages; returns their ids.
    pub fn push_all<I, P>(&self, payloads: I) -> Vec<MsgId>
    where
        I: IntoIterator<Item = P>,
        P: Into<Bytes>,
    {
        payloads.into_iter().map(|p| self.push(p)).collect()
    }

    /// Ends an `open` source: once everything is acked it is exhausted.
    pub fn close(&self) {
        lock(&self.state).closed = true;
    }

    /// How many messages exist: primed plus generated (so far, or planned).
    pub fn total(&self) -> u64 {
        let state = lock(&self.state);
        state.next_id - state.generated + state.config.count
    }

    /// How many acks message `id` received.
    pub fn ack_count(&self, id: &MsgId) -> u32 {
        let state = lock(&self.state);
        id.as_int()
            .and_then(|n| state.acked.get(n as usize).copied())
            .unwrap_or(0)
    }

    /// How many times message `id` was delivered.
    pub fn delivery_count(&self, id: &MsgId) -> u32 {
        let state = lock(&self.state);
        id.as_int()
            .and_then(|n| state.delivered.get(n as usize).copied())
            .unwrap_or(0)
    }

    /// How many distinct messages were acked at least once.
    pub fn acked(&self) -> u64 {
        lock(&self.state).acked.iter().filter(|&&n| n > 0).count() as u64
    }

    /// How many distinct messages were acked more than once.
    pub fn acked_twice(&self) -> u64 {
        lock(&self.state).acked.iter().filter(|&&n| n > 1).count() as u64
    }

    /// The ids delivered at least once and never acked.
    pub fn unacked(&self) -> Vec<MsgId> {
        let state = lock(&self.state);
        (0..state.next_id)
            .filter(|&i| state.delivered[i as usize] > 0 && state.acked[i as usize] == 0)
            .map(MsgId::Int)
            .collect()
    }

    /// How many deliveries happened in all, redeliveries included.
    pub fn deliveries(&self) -> u64 {
        lock(&self.state).delivered.iter().map(|&n| n as u64).sum()
    }

    /// The ids dead-lettered after `max_deliveries`.
    pub fn dead_lettered(&self) -> Vec<MsgId> {
        let state = lock(&self.state);
        (0..state.next_id)
            .filter(|&i| state.dead[i as usize])
            .map(MsgId::Int)
            .collect()
    }

    /// Every message the runtime gave up on, in the order it said so.
    pub fn failed(&self) -> Vec<FailedMsg> {
        lock(&self.state).failed.clone()
    }

    /// How many `ack`/`batch_ack` calls the source received.
    pub fn ack_calls(&self) -> u64 {
        lock(&self.state).ack_calls
    }

    /// The most deliveries the runtime ever held at once: delivered and
    /// not yet acked, handed back through `fail`, or dead-lettered. The
    /// runtime keeps this at or below its `max_pending`.
    pub fn max_held(&self) -> u64 {
        lock(&self.state).max_held
    }

    /// Deliveries the runtime holds now (see [`max_held`](Self::max_held)).
    pub fn held(&self) -> u64 {
        lock(&self.state).held
    }

    /// How many acked ids were unknown to the source.
    pub fn unknown_acks(&self) -> u64 {
        lock(&self.state).unknown_acks
    }

    /// Whether the runtime called `shutdown`.
    pub fn was_shut_down(&self) -> bool {
        lock(&self.state).shut_down
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(config: MockConfig) -> (MockSource, MockHandle) {
        let s = MockSource::from_config(config).unwrap();
        let h = s.handle();
        (s, h)
    }

    #[test]
    fn primed_messages_come_before_generated_ones() {
        let (mut s, h) = source(MockConfig::generator(3, 4));
        h.push("a");
        let mut out = Vec::new();
        s.poll(10, &mut out).unwrap();
        assert_eq!(out.len(), 4);
        assert_eq!(out[0].payload, Bytes::from_static(b"a"));
        assert_eq!(out[1].payload, Bytes::from_static(b"xxxx"));
        assert!(out.iter().all(|m| m.delivered == 1));
        assert!(s.exhausted(), "no redelivery: exhausted once all delivered");
    }

    #[test]
    fn polls_respect_max_and_batch_size() {
        let (mut s, _h) = source(MockConfig {
            batch_size: 5,
            ..MockConfig::generator(20, 1)
        });
        let mut out = Vec::new();
        s.poll(3, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        out.clear();
        s.poll(100, &mut out).unwrap();
        assert_eq!(out.len(), 5);
    }

    #[test]
    fn acks_are_recorded_per_message() {
        let (mut s, h) = source(MockConfig::generator(3, 1));
        let mut out = Vec::new();
        s.poll(10, &mut out).unwrap();
        s.ack(&out[0].id).unwrap();
        s.batch_ack(&[out[1].id.clone(), out[1].id.clone()])
            .unwrap();
        assert_eq!(h.acked(), 2);
        assert_eq!(h.acked_twice(), 1);
        assert_eq!(h.unacked(), vec![out[2].id.clone()]);
        assert!(s.ack(&MsgId::Int(99)).is_err());
        assert_eq!(h.unknown_acks(), 1);
    }

    #[test]
    fn unacked_messages_are_redelivered_then_dead_lettered() {
        let (mut s, h) = source(MockConfig {
            redeliver_after_ms: Some(1),
            max_deliveries: Some(2),
            ..MockConfig::generator(1, 1)
        });
        let mut out = Vec::new();
        s.poll(10, &mut out).unwrap();
        assert!(!s.exhausted(), "one message is outstanding");
        std::thread::sleep(Duration::from_millis(3));
        out.clear();
        s.poll(10, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].delivered, 2);
        std::thread::sleep(Duration::from_millis(3));
        out.clear();
        s.poll(10, &mut out).unwrap();
        assert!(out.is_empty(), "delivered twice already: dead-lettered");
        assert_eq!(h.dead_lettered(), vec![MsgId::Int(0)]);
        assert!(s.exhausted());
    }

    #[test]
    fn acked_messages_are_not_redelivered() {
        let (mut s, h) = source(MockConfig {
            redeliver_after_ms: Some(1),
            ..MockConfig::generator(2, 1)
        });
        let mut out = Vec::new();
        s.poll(10, &mut out).unwrap();
        s.ack(&out[0].id).unwrap();
        std::thread::sleep(Duration::from_millis(3));
        out.clear();
        s.poll(10, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].id, MsgId::Int(1));
        s.ack(&out[0].id).unwrap();
        assert!(s.exhausted());
        assert_eq!(h.deliveries(), 3);
    }

    #[test]
    fn open_sources_wait_for_close() {
        let (s, h) = source(MockConfig {
            open: true,
            ..MockConfig::default()
        });
        assert!(!s.exhausted());
        h.close();
        assert!(s.exhausted());
    }

    #[test]
    fn config_rejects_unknown_keys_and_bad_values() {
        let err = serde_json::from_str::<MockConfig>(r#"{"cont": 3}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `cont`"), "{err}");
        let err = MockSource::from_config(MockConfig {
            batch_size: 0,
            max_deliveries: Some(3),
            ..MockConfig::default()
        })
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("batch_size"), "{text}");
        assert!(
            text.contains("max_deliveries needs redeliver_after_ms"),
            "{text}"
        );
    }

    #[test]
    fn payloads_cycle() {
        let (mut s, _h) = source(MockConfig {
            payloads: vec!["a".into(), "b".into()],
            ..MockConfig::generator(3, 0)
        });
        let mut out = Vec::new();
        s.poll(10, &mut out).unwrap();
        let p: Vec<_> = out.iter().map(|m| m.payload.clone()).collect();
        assert_eq!(p, vec!["a", "b", "a"]);
    }
}
