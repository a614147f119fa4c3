//! A topology package for the process-level tests and for trying
//! distributed mode by hand: a mock source (configured by
//! `[source.config]`), then `a → b → c`.
//!
//! - `TESTBED_SLOW_US`: microseconds task `b` spends per message (default 0).
//! - `TESTBED_FAIL_EVERY`: task `b` fails every N-th message it handles
//!   (default: never).
//! - `TESTBED_STUCK_AT`: task `b` never returns from its call on the
//!   message with this sequence number (from 0; with `max_pending = 1` it
//!   is the mock source's id), after printing `b: stuck on message N`.
//! - Task `b` prints `b: 1000 handled` to stderr once it has handled 1,000
//!   messages, so a test can wait for work to be under way.
//! - When the source shuts down, the topology process prints
//!   `testbed: read=R acked=A twice=T unacked=U failed=F` to stdout.

use std::process::ExitCode;
use std::time::Duration;

use tempest::{Msg, MsgCtx, Output, Pipeline, Task, TaskResult, TopologyBuilder};
use tempest_source::{FailedMsg, MsgId, Source, SourceError, SourceMsg, SourceSettings};
use tempest_source_mock::{MockConfig, MockHandle, MockSource};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The mock source, reporting what happened to its messages at shutdown.
struct Reporting {
    inner: MockSource,
    handle: MockHandle,
}

impl Source for Reporting {
    type Config = MockConfig;

    fn name(&self) -> &str {
        "testbed"
    }
    fn from_config(config: MockConfig) -> Result<Self, SourceError> {
        let inner = MockSource::from_config(config)?;
        let handle = inner.handle();
        Ok(Reporting { inner, handle })
    }
    fn settings(&self) -> SourceSettings {
        self.inner.settings()
    }
    fn poll(&mut self, max: usize, out: &mut Vec<SourceMsg>) -> Result<(), SourceError> {
        self.inner.poll(max, out)
    }
    fn ack(&mut self, id: &MsgId) -> Result<(), SourceError> {
        self.inner.ack(id)
    }
    fn batch_ack(&mut self, ids: &[MsgId]) -> Result<(), SourceError> {
        self.inner.batch_ack(ids)
    }
    fn fail(&mut self, msgs: &[FailedMsg]) -> Result<(), SourceError> {
        self.inner.fail(msgs)
    }
    fn exhausted(&self) -> bool {
        self.inner.exhausted()
    }
    fn shutdown(&mut self) -> Result<(), SourceError> {
        let h = &self.handle;
        println!(
            "testbed: read={} acked={} twice={} unacked={} failed={}",
            h.deliveries(),
            h.acked(),
            h.acked_twice(),
            h.unacked().len(),
            h.failed().len()
        );
        self.inner.shutdown()
    }
}

#[derive(Clone)]
struct Pass(&'static str);

impl Task for Pass {
    fn name(&self) -> &str {
        self.0
    }
    fn handle(&mut self, msg: Msg, _: &MsgCtx) -> TaskResult {
        Ok(Output::One(msg))
    }
}

#[derive(Clone)]
struct Slow {
    per_msg: Duration,
    fail_every: u64,
    handled: u64,
    stuck_at: Option<u64>,
}

impl Task for Slow {
    fn name(&self) -> &str {
        "b"
    }
    fn handle(&mut self, msg: Msg, _: &MsgCtx) -> TaskResult {
        if !self.per_msg.is_zero() {
            std::thread::sleep(self.per_msg);
        }
        if self.stuck_at == Some(self.handled) {
            eprintln!("b: stuck on message {}", self.handled);
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        self.handled += 1;
        if self.handled == 1000 {
            eprintln!("b: 1000 handled");
        }
        if self.fail_every > 0 && self.handled.is_multiple_of(self.fail_every) {
            return Err(tempest::TaskError::msg(format!(
                "message number {} fails on purpose",
                self.handled
            )));
        }
        Ok(Output::One(msg))
    }
}

fn main() -> ExitCode {
    let env = |name: &str| -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let slow_us = env("TESTBED_SLOW_US");
    let fail_every = env("TESTBED_FAIL_EVERY");
    let stuck_at = std::env::var("TESTBED_STUCK_AT")
        .ok()
        .and_then(|v| v.parse().ok());
    tempest::rt::run(
        TopologyBuilder::new("testbed")
            .source_config::<Reporting>(MockConfig::generator(10_000, 16))
            .pipeline(
                Pipeline::new()
                    .task(Pass("a"))
                    .task(Slow {
                        per_msg: Duration::from_micros(slow_us),
                        fail_every,
                        handled: 0,
                        stuck_at,
                    })
                    .task(Pass("c"))
                    .edge("a", "b")
                    .edge("b", "c"),
            ),
    )
}
