//! Typed tasks end to end: JSON lines from the source, a typed `parse`
//! that splits them into keyed words, a typed `count`; JSON or postcard on
//! the edge between them; a line that does not decode failing through the
//! policy into the mock source's dead letter; typed tasks across the wire.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{builder, primed, FnTask, Log};
use serde::{Deserialize, Serialize};
use tempest::standalone::{self, WorkerOptions};
use tempest::testing::TestRun;
use tempest::{
    Codec, FailurePolicy, MsgCtx, Outcome, Pipeline, StopReason, TaskError, TopologyBuilder,
    TypedOut, TypedResult, TypedTask,
};
use tempest_source::{FailReason, Source};
use tempest_source_mock::{MockConfig, MockSource};

#[derive(Debug, Deserialize)]
struct Line {
    text: String,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Word {
    word: String,
    len: u32,
}

/// Splits a line into words, each keyed by itself.
#[derive(Clone)]
struct Parse;

impl TypedTask for Parse {
    type In = Line;
    type Out = Word;
    fn name(&self) -> &str {
        "parse"
    }
    fn handle(&mut self, line: Line, _: &MsgCtx) -> TypedResult<Word> {
        Ok(line
            .text
            .split_whitespace()
            .map(|w| {
                TypedOut::new(Word {
                    word: w.to_string(),
                    len: w.len() as u32,
                })
                .key(w.to_string())
            })
            .collect::<Vec<_>>()
            .into())
    }
}

type Counts = Arc<Mutex<BTreeMap<String, u64>>>;

/// Counts words; every word must arrive keyed by itself.
#[derive(Clone, Default)]
struct Count(Counts);

impl TypedTask for Count {
    type In = Word;
    type Out = ();
    fn name(&self) -> &str {
        "count"
    }
    fn handle(&mut self, word: Word, ctx: &MsgCtx) -> TypedResult<()> {
        if ctx.key_str() != Some(word.word.as_str()) || word.len as usize != word.word.len() {
            return Err(TaskError::msg(format!("bad word {word:?} keyed {ctx:?}")));
        }
        *self.0.lock().unwrap().entry(word.word).or_default() += 1;
        Ok(tempest::Typed::None)
    }
}

/// parse -> count, and parse -> tap (untyped: records the bytes on the
/// edge, to see its codec).
fn pipeline(edge: Codec, counts: &Counts, tap: &Log) -> Pipeline {
    let tap = tap.clone();
    Pipeline::new()
        .typed(Parse)
        .typed(Count(Arc::clone(counts)))
        .task(FnTask::new("tap", move |m| {
            tap.push(&m);
            Ok(().into())
        }))
        .edge("parse", "count")
        .edge("parse", "tap")
        .output_codec("parse", edge)
}

fn expected(counts: &[(&str, u64)]) -> BTreeMap<String, u64> {
    counts.iter().map(|(w, n)| (w.to_string(), *n)).collect()
}

fn run_standalone(edge: Codec) {
    let (source, mock) = primed(&[
        r#"{"text": "the cat and the hat"}"#,
        r#"{"text": "the end", "extra": true}"#,
    ]);
    let counts = Counts::default();
    let tap = Log::default();
    let report = TestRun::new(builder("typed", source).pipeline(pipeline(edge, &counts, &tap)))
        .deadline(Duration::from_secs(20))
        .run()
        .unwrap();
    assert_eq!(report.stop, StopReason::SourceExhausted);
    assert_eq!(report.stats.acked, 2, "{:?}", report.stats);
    assert_eq!(mock.acked(), 2);
    assert_eq!(
        *counts.lock().unwrap(),
        expected(&[("and", 1), ("cat", 1), ("end", 1), ("hat", 1), ("the", 3)])
    );
    // What travelled on the edge is in `edge`'s encoding, and only in it.
    let on_the_edge = tap.all();
    assert_eq!(on_the_edge.len(), 7);
    for bytes in &on_the_edge {
        let word: Word = edge.decode(bytes).unwrap();
        let other = match edge {
            Codec::Json => Codec::Postcard,
            _ => Codec::Json,
        };
        assert!(other.decode::<Word>(bytes).is_err(), "{word:?} as {other}");
    }
}

#[test]
fn json_lines_through_typed_tasks_with_json_between_them() {
    run_standalone(Codec::Json);
}

#[test]
fn json_lines_through_typed_tasks_with_postcard_between_them() {
    run_standalone(Codec::Postcard);
}

#[test]
fn a_line_that_does_not_decode_fails_through_the_policy_into_the_dead_letter() {
    // Policy None hands a failed message back to the source; the mock
    // redelivers it after 20 ms, and dead-letters it after 2 deliveries.
    let source = MockSource::from_config(MockConfig {
        ack_interval_ms: 1,
        redeliver_after_ms: Some(20),
        max_deliveries: Some(2),
        ..MockConfig::default()
    })
    .unwrap();
    let mock = source.handle();
    let good = mock.push(r#"{"text": "fine words"}"#);
    let bad = mock.push(r#"{"txt": "a misspelt field in a long enough line"}"#);
    let counts = Counts::default();
    let report = TestRun::new(
        builder("dead-letter", source)
            .failure_policy(FailurePolicy::None)
            .pipeline(pipeline(Codec::Postcard, &counts, &Log::default())),
    )
    .deadline(Duration::from_secs(20))
    .run()
    .unwrap();
    assert_eq!(report.stop, StopReason::SourceExhausted);
    assert_eq!(report.outcome(&good), Some(Outcome::Acked));
    assert_eq!(mock.dead_lettered(), vec![bad.clone()]);
    assert_eq!(mock.delivery_count(&bad), 2);
    assert_eq!(mock.ack_count(&bad), 0);
    assert_eq!(
        *counts.lock().unwrap(),
        expected(&[("fine", 1), ("words", 1)])
    );
    let message = format!(
        "task \"parse\": message 1: cannot decode JSON from the source as {}: missing field \
         `text` at line 1 column 49; payload (49 bytes) starts b\"{{\\\"txt\\\": \\\"a \
         misspelt field in a l\"…",
        std::any::type_name::<Line>()
    );
    let failed = mock.failed();
    assert_eq!(failed.len(), 2, "once per delivery: {failed:?}");
    for f in &failed {
        assert_eq!(f.id, bad);
        assert_eq!(
            f.reason,
            FailReason::TaskError {
                task: "parse".into(),
                message: message.clone(),
            }
        );
    }
    assert_eq!(report.stats.task_errors, 2);
}

#[test]
fn a_codec_mismatch_fails_the_build_naming_tasks_and_types() {
    #[derive(Clone)]
    struct Lengths;
    impl TypedTask for Lengths {
        type In = u32;
        type Out = ();
        fn name(&self) -> &str {
            "lengths"
        }
        fn handle(&mut self, _: u32, _: &MsgCtx) -> TypedResult<()> {
            Ok(tempest::Typed::None)
        }
    }
    let (source, _) = primed(&[]);
    let err = builder("mismatch", source)
        .pipeline(
            Pipeline::new()
                .typed(Parse)
                .typed(Lengths)
                .edge("parse", "lengths")
                .codec(Codec::Postcard)
                .source_codec(Codec::Raw),
        )
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "typed root task \"parse\" reads {} from the source, whose payloads are raw bytes",
            std::any::type_name::<Line>()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "edge \"parse\" -> \"lengths\" is postcard, but \"parse\" writes {} and \
             \"lengths\" reads u32",
            std::any::type_name::<Word>()
        )),
        "{err}"
    );
}

#[test]
fn typed_tasks_across_the_wire() {
    common::logs();
    let lines = 300;
    let make = |source: MockSource, counts: &Counts, tap: &Log| {
        TopologyBuilder::new("typed-remote")
            .source(source)
            .failure_policy(FailurePolicy::Retry(3))
            .retry_backoff(Duration::from_millis(5), Duration::from_millis(50))
            .pipeline(pipeline(Codec::Postcard, counts, tap))
    };
    let source = MockSource::from_config(MockConfig {
        ack_interval_ms: 1,
        count: lines,
        payloads: vec![
            r#"{"text": "to be or not to be"}"#.into(),
            r#"{"text": "be quick"}"#.into(),
        ],
        ..MockConfig::default()
    })
    .unwrap();
    let mock = source.handle();
    // The topology process's own tasks never run (no local workers); the
    // remote workers count.
    let (counts, tap) = (Counts::default(), Log::default());
    let (top, addr) = common::serve_on_loopback(
        make(source, &Counts::default(), &Log::default())
            .build()
            .unwrap(),
    );
    let workers: Vec<_> = ["parse", "count", "tap"]
        .into_iter()
        .map(|task| {
            let (counts, tap) = (Arc::clone(&counts), tap.clone());
            std::thread::spawn(move || {
                let t = make(common::generated(0).0, &counts, &tap).build().unwrap();
                let opts = WorkerOptions {
                    topology: addr.to_string(),
                    workers: 2,
                    backoff: Duration::from_millis(20),
                    max_backoff: Duration::from_millis(200),
                    exit_with_topology: true,
                    ..WorkerOptions::default()
                };
                standalone::run_worker(&t, task, opts, None).unwrap()
            })
        })
        .collect();
    let report = top.join().unwrap();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(report.stop, StopReason::SourceExhausted);
    assert_eq!(report.stats.acked, lines, "{:?}", report.stats);
    assert_eq!(report.stats.task_errors, 0, "{:?}", report.stats);
    assert_eq!(mock.acked_twice(), 0);
    // Postcard on the edge, as the pipeline says, in the remote workers too.
    assert_eq!(tap.len() as u64, 8 * lines / 2);
    for bytes in tap.all() {
        Codec::Postcard.decode::<Word>(&bytes).unwrap();
    }
    let half = lines / 2;
    assert_eq!(
        *counts.lock().unwrap(),
        expected(&[
            ("be", 3 * half),
            ("not", half),
            ("or", half),
            ("quick", half),
            ("to", 2 * half)
        ])
    );
}
