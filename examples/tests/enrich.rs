//! The enrichment example against a real HTTP profile service started by
//! the test: typed parse, an async HTTP lookup, a join and a count, in the
//! test harness, as a standalone process, and distributed over task
//! processes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::Proc;
use tempest::metrics::names;
use tempest::testing::TestRun;
use tempest::StopReason;
use tempest_examples::enrich::{self, Counts};
use tempest_examples::profiles::ProfileService;

const BIN: &str = env!("CARGO_BIN_EXE_enrich");

/// `count: DE=1/5 FR=2/9` into country → (clicks, points).
fn parse_counts(line: &str) -> BTreeMap<String, (u64, u64)> {
    line.trim()
        .strip_prefix("count: ")
        .unwrap_or_else(|| panic!("not a count line: {line}"))
        .split_whitespace()
        .map(|kv| {
            let (country, v) = kv.split_once('=').unwrap();
            let (clicks, points) = v.split_once('/').unwrap();
            (
                country.to_string(),
                (clicks.parse().unwrap(), points.parse().unwrap()),
            )
        })
        .collect()
}

#[test]
fn clicks_are_parsed_looked_up_joined_and_counted() {
    let service = ProfileService::start(Duration::from_millis(1), 32).unwrap();
    let counts = Arc::new(Counts::default());
    let report = TestRun::new(enrich::topology(3_000, &service.url(), &counts))
        .deadline(Duration::from_secs(60))
        .run()
        .unwrap();
    assert_eq!(report.stop, StopReason::SourceExhausted);
    assert_eq!(report.stats.acked, 3_000);
    assert_eq!(report.stats.failed + report.stats.timed_out, 0);
    assert_eq!(counts.snapshot(), enrich::expected(3_000));
    assert_eq!(service.served(), 3_000, "one lookup per click");
    // The lookups overlapped: one worker had many requests in flight.
    let most = report
        .metrics
        .gauge(names::TASK_IN_PROGRESS_MAX, &[("task", "profile")])
        .expect("the async loop records its high-water mark");
    assert!(most > 1, "at most {most} lookup(s) in flight at once");
}

#[test]
fn the_package_runs_standalone_against_the_service() {
    let service = ProfileService::start(Duration::from_millis(1), 32).unwrap();
    let url = service.url();
    let p = Proc::start_bin(
        BIN,
        "enrich standalone",
        &["standalone"],
        &[("PROFILES_URL", url.as_str()), ("ENRICH_CLICKS", "2000")],
    );
    let (code, out, said) = p.exit_within(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{}", said.join("\n"));
    let line = out.lines().find(|l| l.starts_with("count: ")).unwrap();
    assert_eq!(parse_counts(line), enrich::expected(2_000));
    assert_eq!(service.served(), 2_000);
}

#[test]
fn the_package_runs_distributed_over_task_processes() {
    let service = ProfileService::start(Duration::from_millis(1), 32).unwrap();
    let url = service.url();
    let env = [
        ("PROFILES_URL", url.as_str()),
        ("ENRICH_CLICKS", "2000"),
        ("TEMPEST_EXIT_WITH_TOPOLOGY", "true"),
    ];
    let mut top = Proc::start_bin(BIN, "topology", &["topology", "--port", "0"], &env);
    let addr = top.listening_addr();
    // One count worker (until key routing exists), two of the rest.
    let workers: Vec<(&str, Proc)> = [
        ("parse", "2"),
        ("profile", "2"),
        ("score", "2"),
        ("enrich", "2"),
        ("count", "1"),
    ]
    .into_iter()
    .map(|(task, n)| {
        let p = Proc::start_bin(
            BIN,
            &format!("task {task}"),
            &["task", task, "--topology", &addr, "--workers", n],
            &env,
        );
        (task, p)
    })
    .collect();
    let (code, _, said) = top.exit_within(Duration::from_secs(90));
    assert_eq!(code, Some(0), "{}", said.join("\n"));
    let stopped = said
        .iter()
        .find(|l| l.contains("Topology enrich stopped"))
        .unwrap_or_else(|| panic!("no summary in:\n{}", said.join("\n")));
    assert!(stopped.contains("2000 acked, 0 failed"), "{stopped}");
    for (task, p) in workers {
        let (code, out, said) = p.exit_within(Duration::from_secs(30));
        assert_eq!(code, Some(0), "{task}: {}", said.join("\n"));
        if task == "count" {
            let line = out.lines().find(|l| l.starts_with("count: ")).unwrap();
            assert_eq!(parse_counts(line), enrich::expected(2_000));
        }
    }
    assert_eq!(service.served(), 2_000);
}
