//! Helpers shared by the integration tests: closure tasks, a gate, and a
//! mock source with a handle.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tempest::{Msg, MsgCtx, Task, TaskResult, TopologyBuilder};
use tempest_source::Source;
use tempest_source_mock::{MockConfig, MockHandle, MockSource};

type Handler = Arc<dyn Fn(Msg) -> TaskResult + Send + Sync>;

/// A task whose `handle` is a closure; every worker shares the closure.
#[derive(Clone)]
pub struct FnTask {
    name: String,
    f: Handler,
}

impl FnTask {
    pub fn new(name: &str, f: impl Fn(Msg) -> TaskResult + Send + Sync + 'static) -> Self {
        FnTask {
            name: name.to_string(),
            f: Arc::new(f),
        }
    }
}

impl Task for FnTask {
    fn name(&self) -> &str {
        &self.name
    }
    fn handle(&mut self, msg: Msg, _: &MsgCtx) -> TaskResult {
        (self.f)(msg)
    }
}

/// Records every payload a task receives.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<Bytes>>>);

impl Log {
    pub fn push(&self, m: &Msg) {
        self.0.lock().unwrap().push(m.clone());
    }
    pub fn all(&self) -> Vec<Bytes> {
        let mut v = self.0.lock().unwrap().clone();
        v.sort();
        v
    }
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// A gate a task waits at until the test opens it.
#[derive(Clone, Default)]
pub struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    pub fn open(&self) {
        *self.0 .0.lock().unwrap() = true;
        self.0 .1.notify_all();
    }
    /// Waits until open (at most a minute, so a broken test cannot hang CI).
    pub fn wait(&self) {
        let guard = self.0 .0.lock().unwrap();
        let _ = self
            .0
             .1
            .wait_timeout_while(guard, Duration::from_secs(60), |open| !*open)
            .unwrap();
    }
}

/// A mock source primed with `payloads`, and its handle.
pub fn primed(payloads: &[&'static str]) -> (MockSource, MockHandle) {
    primed_with(payloads, false)
}

/// A mock source primed with `payloads` that stays open (never exhausted).
pub fn primed_open(payloads: &[&'static str]) -> (MockSource, MockHandle) {
    primed_with(payloads, true)
}

fn primed_with(payloads: &[&'static str], open: bool) -> (MockSource, MockHandle) {
    let source = MockSource::from_config(MockConfig {
        ack_interval_ms: 1,
        open,
        ..MockConfig::default()
    })
    .unwrap();
    let handle = source.handle();
    handle.push_all(payloads.iter().map(|p| Bytes::from(*p)));
    (source, handle)
}

/// A mock source generating `count` messages, and its handle.
pub fn generated(count: u64) -> (MockSource, MockHandle) {
    let source = MockSource::from_config(MockConfig {
        ack_interval_ms: 1,
        ..MockConfig::generator(count, 16)
    })
    .unwrap();
    let handle = source.handle();
    (source, handle)
}

pub fn builder(name: &str, source: MockSource) -> TopologyBuilder {
    TopologyBuilder::new(name)
        .source(source)
        .retry_backoff(Duration::from_millis(5), Duration::from_millis(50))
}

pub fn pass(name: &str) -> FnTask {
    FnTask::new(name, |m| Ok(m.into()))
}

/// Logs to the test's output when `RUST_LOG` is set.
pub fn logs() {
    let _ = env_logger::builder().is_test(true).try_init();
}

/// The give-back scenario: a mock source primed with `slow` and then
/// `fast` other messages, and a task `t` whose `slow` message waits (up to
/// 20 s) until every fast one is done. The fast ones can only all finish
/// if those behind `slow` in its batch move to another worker.
pub struct SlowAndFast {
    pub mock: MockHandle,
    pub fast: u64,
    done: Arc<std::sync::atomic::AtomicU64>,
    seen_by_slow: Arc<std::sync::atomic::AtomicU64>,
}

impl SlowAndFast {
    pub fn new(fast: u64) -> (MockSource, SlowAndFast) {
        let source = MockSource::from_config(MockConfig {
            ack_interval_ms: 1,
            ..MockConfig::default()
        })
        .unwrap();
        let mock = source.handle();
        mock.push("slow");
        mock.push_all((0..fast).map(|i| format!("fast{i}")));
        let run = SlowAndFast {
            mock,
            fast,
            done: Arc::default(),
            seen_by_slow: Arc::default(),
        };
        (source, run)
    }

    /// The task `t` (every worker shares the counters).
    pub fn task(&self) -> FnTask {
        use std::sync::atomic::Ordering;
        let (done, seen, fast) = (
            Arc::clone(&self.done),
            Arc::clone(&self.seen_by_slow),
            self.fast,
        );
        FnTask::new("t", move |m| {
            if m.as_ref() == b"slow" {
                let until = std::time::Instant::now() + Duration::from_secs(20);
                while done.load(Ordering::SeqCst) < fast && std::time::Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(2));
                }
                seen.store(done.load(Ordering::SeqCst), Ordering::SeqCst);
            } else {
                done.fetch_add(1, Ordering::SeqCst);
            }
            Ok(m.into())
        })
    }

    /// Every fast message finished while the slow one ran, something was
    /// given back, and nothing ran or was acked twice.
    pub fn check(&self, stats: &tempest::Stats) {
        use std::sync::atomic::Ordering;
        assert_eq!(stats.acked, self.fast + 1, "{stats:?}");
        assert_eq!(
            self.seen_by_slow.load(Ordering::SeqCst),
            self.fast,
            "every fast message finished while the slow one ran: {stats:?}"
        );
        assert!(stats.returned > 0, "{stats:?}");
        assert_eq!(self.mock.acked_twice(), 0);
        assert_eq!(
            stats.per_worker.iter().map(|w| w.handled).sum::<u64>(),
            self.fast + 1,
            "nothing ran twice: {stats:?}"
        );
    }
}

/// Runs `topology` as a topology process (no local workers) on a thread,
/// serving on loopback, for at most a minute; returns the run and the
/// address workers connect to, once it listens.
pub fn serve_on_loopback(
    topology: tempest::Topology,
) -> (
    std::thread::JoinHandle<tempest::standalone::RunReport>,
    std::net::SocketAddr,
) {
    use tempest::standalone::{self, RunOptions, RuntimeHandle, ServeOptions};
    let handle = RuntimeHandle::new();
    let h = handle.clone();
    let top = std::thread::spawn(move || {
        standalone::run(
            topology,
            RunOptions {
                handle: Some(h),
                local_workers: false,
                serve: Some(ServeOptions::loopback()),
                // A safety net: a test that hangs fails instead.
                deadline: Some(Duration::from_secs(60)),
                ..RunOptions::default()
            },
        )
        .unwrap()
    });
    (top, listening(&handle))
}

/// The address the topology behind `handle` serves workers on, once it
/// listens (at most 10 s).
pub fn listening(handle: &tempest::standalone::RuntimeHandle) -> std::net::SocketAddr {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(a) = handle.listening() {
            return a;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the topology never listened"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
