//! Every benchmark scenario in smoke mode: tiny runs, correctness only
//! (every message acked exactly once), never a speed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn all_scenarios_run_and_ack_everything() {
    let out = std::env::temp_dir().join(format!("tempest-bench-smoke-{}.md", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_tempest-bench"))
        .args(["all", "--smoke", "--out"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let report = std::fs::read_to_string(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    for needle in [
        "| baseline",
        "| linear",
        "| diamond",
        "| fan-out",
        "| latency: linear at 50% load",
        "| 65536 B | 4 |",
        "## Scaling an I/O-bound task: workers per task, one burst",
        "spread --messages 200 --sleep-us 1000 --workers 4",
        "runtime memory per in-flight message",
        "RSS of an endless linear run",
        "## Distributed: 1 topology process + 1 task process per task",
        "bytes on the wire per message",
        "## Redis Streams",
        "% of the raw loop",
    ] {
        assert!(report.contains(needle), "missing {needle:?} in\n{report}");
    }
    assert!(!report.contains("| NO |"), "{report}");
}

#[test]
fn single_runs_print_json() {
    let out = Command::new(env!("CARGO_BIN_EXE_tempest-bench"))
        .args(["run", "diamond", "--messages", "2000"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("\"all_acked\":true"), "{text}");
    let out = Command::new(env!("CARGO_BIN_EXE_tempest-bench"))
        .args(["run", "hexagon"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn the_spread_scenario_prints_a_json_line_per_worker_count() {
    let out = Command::new(env!("CARGO_BIN_EXE_tempest-bench"))
        .args([
            "spread",
            "--messages",
            "100",
            "--sleep-us",
            "500",
            "--workers",
            "1,2",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{text}");
    for (row, workers) in rows.iter().zip([1, 2]) {
        assert_eq!(row["workers"], workers, "{text}");
        assert_eq!(row["all_acked"], true, "{text}");
        assert!(row["speedup"].is_number(), "{text}");
        assert_eq!(
            row["per_worker"].as_array().unwrap().len(),
            workers,
            "{text}"
        );
    }
}
