//! The word-count example: counts through the test harness, and the
//! package binary as a real process (graph, usage errors, SIGTERM).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tempest::testing::TestRun;
use tempest::StopReason;
use tempest_examples::wordcount::{self, Totals};

const BIN: &str = env!("CARGO_BIN_EXE_wordcount");

/// Runs the word count over 20,000 sentences with `counters` count workers
/// and checks every total, and every word's count, exactly.
fn counts_exactly_with(counters: usize) {
    let totals = Arc::new(Totals::default());
    let report = TestRun::new(
        wordcount::topology(20_000, &totals)
            .workers("words", 2)
            .workers("count", counters),
    )
    .deadline(Duration::from_secs(60))
    .run()
    .unwrap();
    assert_eq!(report.stop, StopReason::SourceExhausted);
    assert_eq!(report.stats.acked, 20_000);
    let (words, letters) = wordcount::expected(20_000);
    assert_eq!(totals.words.load(Ordering::Relaxed), words);
    assert_eq!(totals.letters.load(Ordering::Relaxed), letters);
    assert_eq!(totals.sentences.load(Ordering::Relaxed), 20_000);
    assert_eq!(totals.top_words(1), vec![("the".to_string(), 20_000)]);
    let per_word = totals.per_word.lock().unwrap().clone();
    assert_eq!(
        per_word,
        wordcount::expected_words(20_000),
        "{counters} counters"
    );
}

#[test]
fn word_count_is_exact_with_one_counter() {
    counts_exactly_with(1);
}

#[test]
fn word_count_is_exact_with_three_counters() {
    counts_exactly_with(3);
}

#[test]
fn graph_prints_the_pipeline() {
    let out = Command::new(BIN)
        .current_dir(std::env::temp_dir())
        .args(["graph", "--format", "mermaid"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("flowchart LR\n"), "{text}");
    assert!(text.contains("t0 --> t1"), "{text}");
    let out = Command::new(BIN)
        .current_dir(std::env::temp_dir())
        .arg("graph")
        .output()
        .unwrap();
    assert!(String::from_utf8(out.stdout)
        .unwrap()
        .contains("\"words\" -> \"count\" [label=\"key\"]"));
}

#[test]
fn usage_errors_exit_with_2_and_say_why() {
    let out = Command::new(BIN)
        .current_dir(std::env::temp_dir())
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN)
        .current_dir(std::env::temp_dir())
        .args(["standalone", "--workers", "nope=2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("unknown task \"nope\"; the tasks are: parse, words, count, chars, report"),
        "{err}"
    );
    let out = Command::new(BIN)
        .current_dir(std::env::temp_dir())
        .arg("standalone")
        .env("WORDCOUNT_SENTENCES", "lots")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn standalone_runs_to_the_end_of_the_source() {
    let out = Command::new(BIN)
        .current_dir(std::env::temp_dir())
        .arg("standalone")
        .env("WORDCOUNT_SENTENCES", "5000")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("stopped (the source is exhausted): 5000 read, 5000 acked, 0 failed, 0 timed out, 0 left in flight"),
        "{err}"
    );
    let out = String::from_utf8(out.stdout).unwrap();
    assert!(out.contains("Top words: the=5000, "), "{out}");
}

#[test]
fn sigterm_stops_gracefully_and_acks_what_was_in_flight() {
    let mut child = Command::new(BIN)
        .current_dir(std::env::temp_dir())
        .arg("standalone")
        .env("WORDCOUNT_SENTENCES", "1000000000000")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    // Wait until the source is polling.
    for line in lines.by_ref() {
        if line.unwrap().contains("connected") {
            break;
        }
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{rest:#?}");
    let summary = rest
        .iter()
        .find(|l| l.contains("stopped (shutdown was requested)"))
        .unwrap_or_else(|| panic!("no summary in {rest:#?}"));
    // "...: R read, A acked, 0 failed, 0 timed out, 0 left in flight, ..."
    let numbers: Vec<u64> = summary
        .split(": ")
        .nth(1)
        .unwrap()
        .split(", ")
        .take(5)
        .map(|part| part.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(numbers[0] > 0, "{summary}");
    assert_eq!(
        numbers[0], numbers[1],
        "every message read was acked: {summary}"
    );
    assert_eq!(&numbers[2..], &[0, 0, 0], "{summary}");
}
