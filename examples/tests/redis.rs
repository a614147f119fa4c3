//! The Redis stream example as real processes: a topology killed with
//! `kill -9` mid-stream and restarted loses no entry.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempest_source_redis::test_server::{unique_key, TestServer};

const BIN: &str = env!("CARGO_BIN_EXE_stream_wordcount");

fn start(cfg: &std::path::Path) -> Child {
    Command::new(BIN)
        .current_dir(std::env::temp_dir())
        .args(["--config", cfg.to_str().unwrap(), "standalone"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a stderr line containing `needle`.
fn wait_for(child: &mut Child, needle: &str) {
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        if line.unwrap().contains(needle) {
            std::thread::spawn(move || lines.for_each(drop));
            return;
        }
    }
    panic!("the topology never said {needle:?}");
}

fn group_state(conn: &mut redis::Connection, key: &str) -> (i64, i64) {
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(key)
        .arg("wordcount")
        .query(conn)
        .unwrap();
    let pending = match pending {
        redis::Value::Array(v) => match v.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => 0,
        },
        _ => 0,
    };
    let info: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(key)
        .query(conn)
        .unwrap();
    let text = format!("{info:?}");
    // The group's lag: entries not yet delivered to it.
    let lag = text
        .split("lag")
        .nth(1)
        .and_then(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .find(|s| !s.is_empty())
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(-1);
    (pending, lag)
}

#[test]
fn kill_9_of_the_topology_and_a_restart_lose_no_entry() {
    let server = TestServer::shared().unwrap();
    let key = unique_key("stream-kill-9");
    let mut conn = server.connection().unwrap();
    let n = 200_000;
    let mut pipe = redis::pipe();
    for i in 0..n {
        pipe.cmd("XADD")
            .arg(&key)
            .arg("*")
            .arg("payload")
            .arg(format!("sentence number {i}"))
            .ignore();
    }
    pipe.query::<()>(&mut conn).unwrap();

    let dir = std::env::temp_dir().join(format!("tempest-stream-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("Topology.toml");
    std::fs::write(
        &cfg,
        format!(
            "max_pending = 2000\nfailure_policy = {{ retry = 3 }}\n\n[source.config]\nuri = \"{}\"\nkey = \"{key}\"\ngroup = \"wordcount\"\nconsumer = \"c1\"\ngroup_start_id = \"0\"\ncount = 500\nblock_ms = 50\nack_policy = {{ batch = 500 }}\n",
            server.url
        ),
    )
    .unwrap();

    let mut first = start(&cfg);
    wait_for(&mut first, "connected");
    // Kill it while entries are in flight.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (pending, _) = group_state(&mut conn, &key);
        if pending > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "nothing was ever in flight");
        std::thread::sleep(Duration::from_millis(1));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let (pending_at_kill, lag_at_kill) = group_state(&mut conn, &key);
    assert!(pending_at_kill > 0 || lag_at_kill > 0, "killed mid-stream");

    // The restarted topology re-reads its own pending entries, then the rest.
    let mut second = start(&cfg);
    wait_for(&mut second, "connected");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (pending, lag) = group_state(&mut conn, &key);
        if pending == 0 && lag == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stuck at pending {pending}, lag {lag}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = second.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert_eq!(second.wait().unwrap().code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}
