//! The quick start: word count over 1,000,000 sentences from the mock
//! source, standalone, then a summary.
//!
//! `cargo run --release -p tempest-examples --example quickstart [-- COUNT [COUNTERS]]`

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tempest::metrics::names;
use tempest::standalone::{self, RunOptions};
use tempest_examples::wordcount::{self, Totals};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let usage = "usage: quickstart [COUNT [COUNTERS]]  (COUNT: how many sentences, default \
                 1000000; COUNTERS: how many workers count words, default 2)";
    let mut args = std::env::args()
        .skip(1)
        .map(|a| a.replace('_', "").parse::<u64>());
    let (count, counters) = match (args.next(), args.next(), args.next()) {
        (None, ..) => (1_000_000, 2),
        (Some(Ok(n)), None, None) => (n, 2),
        (Some(Ok(n)), Some(Ok(c)), None) if c > 0 => (n, c as usize),
        _ => {
            eprintln!("{usage}");
            return ExitCode::from(2);
        }
    };
    let totals = Arc::new(Totals::default());
    let topology = match wordcount::topology(count, &totals)
        .workers("count", counters)
        .build()
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "Running word count over {count} sentences \
         (parse -> words -key-> {counters} count workers + chars -> report)..."
    );
    let report = match standalone::run(topology, RunOptions::default()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let s = &report.stats;
    println!(
        "{} messages acked in {:.2} s: {:.0} messages/s ({} failed, {} timed out, {} retried).",
        s.acked,
        report.elapsed.as_secs_f64(),
        report.acked_per_sec(),
        s.failed,
        s.timed_out,
        s.retried
    );
    let (words, letters) = (
        totals.words.load(Ordering::Relaxed),
        totals.letters.load(Ordering::Relaxed),
    );
    println!("Counted {words} words and {letters} letters.");
    let per_task: Vec<String> = ["parse", "words", "count", "chars", "report"]
        .iter()
        .map(|t| {
            let n = report.metrics.counter(names::TASK_MSGS_IN, &[("task", t)]);
            let batches = report
                .metrics
                .counter(names::TASK_BATCHES, &[("task", t)])
                .max(1);
            let batch_us = report
                .metrics
                .histogram(names::TASK_BATCH_US, &[("task", t)]);
            format!(
                "{t} {n} in {batches} batches (p99 {} µs a batch)",
                batch_us.quantile(0.99)
            )
        })
        .collect();
    let latency = report.metrics.histogram(names::MSGS_LATENCY_US, &[]);
    println!(
        "End-to-end latency: p50 {} µs, p90 {} µs, p99 {} µs, max {} µs.",
        latency.quantile(0.5),
        latency.quantile(0.9),
        latency.quantile(0.99),
        latency.max()
    );
    println!(
        "Metrics: {} read, {} acked, max {} in flight; tasks: {}.",
        report.metrics.counter(names::SOURCE_READ, &[]),
        report.metrics.counter(names::MSGS_ACKED, &[]),
        report
            .metrics
            .gauge(names::MSGS_INFLIGHT_MAX, &[])
            .unwrap_or(0),
        per_task.join(", ")
    );
    let per_word = totals
        .per_word
        .lock()
        .map(|m| m.clone())
        .unwrap_or_default();
    let expected_words = wordcount::expected_words(count);
    if s.acked == count
        && (words, letters) == wordcount::expected(count)
        && per_word == expected_words
    {
        println!("Every word's count is exact.");
        ExitCode::SUCCESS
    } else {
        let wrong = expected_words
            .iter()
            .filter(|(w, c)| per_word.get(*w) != Some(c))
            .count();
        eprintln!(
            "error: expected {count} acked with {:?} words and letters, and every word's count \
             exact ({wrong} word(s) are not)",
            wordcount::expected(count)
        );
        ExitCode::from(1)
    }
}
