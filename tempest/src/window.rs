//! Windows: tumbling and sliding, by count and by time, in processing time
//! or in event time, over keyed state and ticks.
//!
//! A [`WindowTask`] says how a message adds to a window's accumulator and
//! what a closed window emits; [`Windowed`] makes it a [`Task`]: it keeps
//! each open window's accumulator in a [`KeyedState`] (so with a durable
//! backend a message is acked once its contribution is checkpointed, and a
//! window can span more messages than `max_pending`), and closes windows
//! on its ticks. Windows are per message key (messages without a key
//! share one window).

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::msg::MsgCtx;
use crate::state::KeyedState;
use crate::task::{Msg, Out, Output, Task, TaskContext, TaskError, TaskResult};

/// How windows are cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// Every `size` messages of a key, a new window every `slide` (equal:
    /// tumbling). A window closes, and emits, on its last message.
    Count {
        /// Messages per window.
        size: u64,
        /// Messages between window starts.
        slide: u64,
    },
    /// Windows of `size` of time, a new one every `slide` (equal:
    /// tumbling), aligned to the Unix epoch. A window closes on the first
    /// tick after its end has passed (in processing time) or after the
    /// watermark has passed it (in event time).
    Time {
        /// How long a window lasts.
        size: Duration,
        /// Time between window starts.
        slide: Duration,
    },
}

impl Window {
    /// Tumbling windows of `n` messages.
    pub fn tumbling_count(n: u64) -> Self {
        Window::Count { size: n, slide: n }
    }
    /// Windows of `size` messages, one starting every `slide` messages.
    pub fn sliding_count(size: u64, slide: u64) -> Self {
        Window::Count { size, slide }
    }
    /// Tumbling windows of `size` of time.
    pub fn tumbling(size: Duration) -> Self {
        Window::Time { size, slide: size }
    }
    /// Windows of `size` of time, one starting every `slide`.
    pub fn sliding(size: Duration, slide: Duration) -> Self {
        Window::Time { size, slide }
    }

    /// What is wrong with it, if anything.
    pub(crate) fn problem(&self) -> Option<&'static str> {
        let (size, slide) = match *self {
            Window::Count { size, slide } => (u128::from(size), u128::from(slide)),
            Window::Time { size, slide } => (size.as_millis(), slide.as_millis()),
        };
        if size == 0 || slide == 0 {
            Some("size and slide must be more than 0 (time: at least 1 ms)")
        } else if slide > size {
            Some("the slide must not be longer than the size (that would skip messages)")
        } else {
            None
        }
    }

    /// The starts of the windows that contain position `t` (a message
    /// number or a time in ms), oldest first, with the windows' size.
    fn starts(&self, t: u64) -> (impl Iterator<Item = u64>, u64) {
        let (size, slide) = match *self {
            Window::Count { size, slide } => (size, slide),
            Window::Time { size, slide } => (size.as_millis() as u64, slide.as_millis() as u64),
        };
        let last = t / slide * slide;
        let first = (t + 1).saturating_sub(size).div_ceil(slide) * slide;
        ((first..=last).step_by(slide as usize), size)
    }
}

/// Which clock time windows follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Clock {
    /// The worker's clock when it handles the message (the default).
    #[default]
    Processing,
    /// The message's timestamp ([`MsgCtx::timestamp`]). The watermark is
    /// the latest timestamp the worker has seen minus `allowed_lateness`:
    /// a window closes once the watermark passes its end, and a message
    /// for a window that has closed is *late* ([`WindowTask::late`]).
    Event {
        /// How far behind the latest timestamp seen a message may be and
        /// still count.
        allowed_lateness: Duration,
    },
}

/// One window: from `start` (included) to `end` (excluded), in messages of
/// its key (count windows) or in milliseconds since the Unix epoch (time
/// windows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Span {
    /// The first position in it.
    pub start: u64,
    /// The first position after it.
    pub end: u64,
}

/// An aggregation over windows; [`Windowed`] makes it a task.
pub trait WindowTask: Clone + Send + 'static {
    /// What a window accumulates (kept in keyed state).
    type Acc: Serialize + DeserializeOwned + Clone + Default + Send + 'static;

    /// The task's name.
    fn name(&self) -> &str;

    /// Adds a message to a window's accumulator.
    fn add(&mut self, acc: &mut Self::Acc, msg: &Msg, ctx: &MsgCtx) -> Result<(), TaskError>;

    /// What a closed window emits. An output without a key of its own
    /// gets the window's key.
    fn emit(&mut self, key: &Bytes, span: Span, acc: Self::Acc) -> TaskResult;

    /// A message that came after every window it belongs to had closed
    /// (event time only). By default it is dropped (counted in
    /// `tempest.window.late`); return outputs to send it on, a side
    /// output (mark it with a header so the children can tell).
    fn late(&mut self, _msg: Msg, _ctx: &MsgCtx) -> TaskResult {
        Ok(Output::None)
    }
}

/// A [`WindowTask`] as a [`Task`]; add it with
/// [`Pipeline::window`](crate::Pipeline::window).
#[derive(Clone)]
pub struct Windowed<W: WindowTask> {
    inner: W,
    window: Window,
    clock: Clock,
    accs: Option<KeyedState<W::Acc>>,
    counts: Option<KeyedState<u64>>,
    /// Open time windows: (end, key, start).
    open: BTreeSet<(u64, Bytes, u64)>,
    /// The latest event timestamp seen (event time).
    latest: u64,
    late: u64,
    metrics: Option<tempest_source::Metrics>,
}

impl<W: WindowTask> std::fmt::Debug for Windowed<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Windowed")
            .field("window", &self.window)
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

/// The metric a window task counts late messages in.
pub const WINDOW_LATE: &str = "tempest.window.late";

impl<W: WindowTask> Windowed<W> {
    /// `inner` over `window`, following `clock`.
    pub fn new(inner: W, window: Window, clock: Clock) -> Self {
        Windowed {
            inner,
            window,
            clock,
            accs: None,
            counts: None,
            open: BTreeSet::new(),
            latest: 0,
            late: 0,
            metrics: None,
        }
    }

    /// How often it must tick to close time windows on time.
    pub(crate) fn tick_every(&self) -> Option<Duration> {
        match self.window {
            Window::Count { .. } => None,
            Window::Time { slide, .. } => {
                Some((slide / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)))
            }
        }
    }

    fn watermark(&self) -> u64 {
        match self.clock {
            Clock::Processing => tempest_source::now_millis(),
            Clock::Event { allowed_lateness } => self
                .latest
                .saturating_sub(allowed_lateness.as_millis() as u64),
        }
    }

    fn states(&self) -> Result<(&KeyedState<W::Acc>, &KeyedState<u64>), TaskError> {
        match (&self.accs, &self.counts) {
            (Some(a), Some(c)) => Ok((a, c)),
            _ => Err(TaskError::msg(format!(
                "window task {}: its state is not open (started() did not run)",
                self.inner.name()
            ))),
        }
    }

    /// The outputs of closed window `span` of `key`. A window whose
    /// accumulator is gone was closed already (by the worker its key moved
    /// to, through the store they share): it emits nothing.
    fn close(&mut self, key: &Bytes, span: Span, out: &mut Vec<Out>) -> Result<(), TaskError> {
        let (accs, _) = self.states()?;
        let Some(acc) = accs
            .remove(state_key(key, span.start))
            .map_err(|e| TaskError::msg(e.to_string()))?
        else {
            return Ok(());
        };
        let emitted = self.inner.emit(key, span, acc)?;
        let keyed = |p: Msg| Out::new(p).key(key.clone());
        match emitted {
            Output::None => {}
            Output::One(p) => out.push(keyed(p)),
            Output::Many(ps) => out.extend(ps.into_iter().map(keyed)),
            Output::Outs(os) => out.extend(os.into_iter().map(|o| o.key_if_unset(key))),
        }
        Ok(())
    }
}

/// The state key of the window of `key` starting at `start`.
fn state_key(key: &[u8], start: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(key.len() + 9);
    b.put_slice(key);
    b.put_u8(0);
    b.put_u64(start);
    b.freeze()
}

impl<W: WindowTask> Task for Windowed<W> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn started(&mut self, ctx: &TaskContext) {
        match (ctx.state("window"), ctx.state("window-count")) {
            (Ok(a), Ok(c)) => {
                self.accs = Some(a);
                self.counts = Some(c);
            }
            (Err(e), _) | (_, Err(e)) => {
                log::error!("Window task {}: {e}; its messages fail.", ctx.task)
            }
        }
        self.metrics = Some(ctx.metrics.clone());
    }

    fn handle(&mut self, msg: Msg, ctx: &MsgCtx) -> TaskResult {
        let key = ctx.key().cloned().unwrap_or_default();
        let pos = match self.window {
            Window::Count { .. } => {
                let (_, counts) = self.states()?;
                counts
                    .update(&key, |n| Some(n.unwrap_or(0) + 1))
                    .map_err(|e| TaskError::msg(e.to_string()))?
                    .unwrap_or(1)
                    - 1
            }
            Window::Time { .. } => match self.clock {
                Clock::Processing => tempest_source::now_millis(),
                Clock::Event { .. } => ctx.timestamp(),
            },
        };
        let (starts, size) = self.window.starts(pos);
        let watermark = match (self.window, self.clock) {
            (Window::Time { .. }, Clock::Event { .. }) => Some(self.watermark()),
            _ => None,
        };
        let mut added = false;
        let mut out = Vec::new();
        for start in starts {
            let span = Span {
                start,
                end: start + size,
            };
            if watermark.is_some_and(|w| span.end <= w) {
                continue; // closed already
            }
            added = true;
            let (accs, _) = self.states()?;
            let mut acc = accs
                .get(state_key(&key, start))
                .map_err(|e| TaskError::msg(e.to_string()))?
                .unwrap_or_default();
            self.inner.add(&mut acc, &msg, ctx)?;
            let (accs, _) = self.states()?;
            accs.put(state_key(&key, start), acc)
                .map_err(|e| TaskError::msg(e.to_string()))?;
            match self.window {
                Window::Count { .. } if pos + 1 == span.end => self.close(&key, span, &mut out)?,
                Window::Count { .. } => {}
                Window::Time { .. } => {
                    self.open.insert((span.end, key.clone(), start));
                }
            }
        }
        if let Clock::Event { .. } = self.clock {
            self.latest = self.latest.max(ctx.timestamp());
        }
        if !added {
            self.late += 1;
            return self.inner.late(msg, ctx);
        }
        Ok(if out.is_empty() {
            Output::None
        } else {
            Output::Outs(out)
        })
    }

    fn tick(&mut self) -> TaskResult {
        let watermark = self.watermark();
        let mut out = Vec::new();
        while let Some(first) = self.open.first() {
            if first.0 > watermark {
                break;
            }
            let Some((end, key, start)) = self.open.pop_first() else {
                break;
            };
            self.close(&key, Span { start, end }, &mut out)?;
        }
        Ok(if out.is_empty() {
            Output::None
        } else {
            Output::Outs(out)
        })
    }

    fn flush_metrics(&mut self) {
        if let Some(m) = &self.metrics {
            m.incr(WINDOW_LATE, std::mem::take(&mut self.late));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts its messages per window.
    #[derive(Clone)]
    struct Counter;

    impl WindowTask for Counter {
        type Acc = u64;
        fn name(&self) -> &str {
            "count"
        }
        fn add(&mut self, acc: &mut u64, _: &Msg, _: &MsgCtx) -> Result<(), TaskError> {
            *acc += 1;
            Ok(())
        }
        fn emit(&mut self, _: &Bytes, _: Span, acc: u64) -> TaskResult {
            Ok(Output::one(acc.to_string()))
        }
    }

    fn at(key: &'static str, ts: u64) -> MsgCtx {
        MsgCtx::new(ts).with_key(key).with_timestamp(ts)
    }

    /// Regression: a key that moved from one worker to another left the
    /// window open on both; the second to close it emitted an empty
    /// accumulator (a count of 0) besides the real one.
    #[test]
    fn a_window_closed_by_another_worker_emits_once() {
        let registry = crate::state::StateRegistry::new(None);
        let ctx = |w| {
            let mut c = TaskContext::new("t", "count", w, tempest_source::Metrics::new_registry());
            c.states = crate::state::WorkerStates::new(registry.clone());
            c
        };
        let clock = Clock::Event {
            allowed_lateness: Duration::ZERO,
        };
        let window = Window::tumbling(Duration::from_millis(10));
        let (mut a, mut b) = (
            Windowed::new(Counter, window, clock),
            Windowed::new(Counter, window, clock),
        );
        a.started(&ctx(0));
        b.started(&ctx(1));
        // Key k's window [0, 10) gets a message on each worker (the key
        // moved between them), then each sees time pass.
        a.handle(Msg::from("x"), &at("k", 1)).unwrap();
        b.handle(Msg::from("x"), &at("k", 2)).unwrap();
        a.handle(Msg::from("x"), &at("other", 100)).unwrap();
        b.handle(Msg::from("x"), &at("other2", 100)).unwrap();
        let from_a = a.tick().unwrap();
        let from_b = b.tick().unwrap();
        let count = |o: &Output| match o {
            Output::Outs(v) => v.len(),
            Output::None => 0,
            other => panic!("{other:?}"),
        };
        assert_eq!(count(&from_a) + count(&from_b), 1, "{from_a:?} {from_b:?}");
        let Output::Outs(v) = from_a else {
            panic!("{from_a:?}")
        };
        assert_eq!(v[0], Out::new(Msg::from("2")).key(Bytes::from_static(b"k")));
    }

    #[test]
    fn a_position_is_in_every_window_that_covers_it() {
        let w = Window::sliding_count(4, 2);
        let (s, size) = w.starts(5);
        assert_eq!((s.collect::<Vec<_>>(), size), (vec![2, 4], 4));
        let (s, _) = w.starts(1);
        assert_eq!(s.collect::<Vec<_>>(), vec![0]);
        let (s, _) = Window::tumbling_count(3).starts(7);
        assert_eq!(s.collect::<Vec<_>>(), vec![6]);
        let w = Window::sliding(Duration::from_millis(10), Duration::from_millis(5));
        let (s, _) = w.starts(12);
        assert_eq!(s.collect::<Vec<_>>(), vec![5, 10]);
        assert!(Window::sliding_count(2, 3).problem().is_some());
        assert!(Window::tumbling_count(0).problem().is_some());
        assert!(Window::tumbling(Duration::from_micros(10))
            .problem()
            .is_some());
    }
}
