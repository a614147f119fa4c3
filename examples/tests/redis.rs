//! The Redis stream example as real processes: a topology killed with
//! `kill -9` mid-stream and restarted loses no entry, runs again at most
//! the entries pending at the crash, and two processes of one package on
//! one host are two consumers.
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
    terminate(&mut second);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// The stream source's guarantees after `kill -9`, with real processes: the
// `stream_idlog` topology appends every entry it handles to a log that
// survives the kill, so duplicates are counted exactly.

const IDLOG: &str = env!("CARGO_BIN_EXE_stream_idlog");

/// A child process killed (and reaped) when dropped, so a failing test
/// leaves no topology running.
struct Proc(Child);

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `stream_idlog` process logging handled entries to `log`.
fn start_idlog(cfg: &std::path::Path, log: &std::path::Path, delay_ms: u64) -> Proc {
    Proc(
        Command::new(IDLOG)
            .current_dir(std::env::temp_dir())
            .args(["--config", cfg.to_str().unwrap(), "standalone"])
            .env("RUST_LOG", "info")
            .env("TEMPEST_ID_LOG", log)
            .env("TEMPEST_TASK_DELAY_MS", delay_ms.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

/// Appends `n` entries `payload = e<i>` to `key`.
fn load(conn: &mut redis::Connection, key: &str, n: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("XADD")
                .arg(key)
                .arg("*")
                .arg("payload")
                .arg(format!("e{i}"))
                .ignore();
        }
        pipe.query::<()>(conn).unwrap();
    }
}

/// The lines of the handled-entries log (empty before the first one).
fn handled(log: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .map(|t| t.lines().map(String::from).collect())
        .unwrap_or_default()
}

/// How many entries of the group `group` are pending.
fn pending_of(conn: &mut redis::Connection, key: &str, group: &str) -> i64 {
    tempest_source_redis::test_server::pending_count(conn, key, group).unwrap()
}

/// The group's lag (entries not yet delivered to it); -1 if unknown.
fn lag_of(conn: &mut redis::Connection, key: &str, group: &str) -> i64 {
    let groups: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(key)
        .query(conn)
        .unwrap();
    for g in groups {
        let fields: Vec<(String, redis::Value)> = match g {
            redis::Value::Array(kv) => kv
                .chunks(2)
                .filter_map(|p| match (&p[0], p.get(1)) {
                    (redis::Value::BulkString(k), Some(v)) => {
                        Some((String::from_utf8_lossy(k).into_owned(), v.clone()))
                    }
                    _ => None,
                })
                .collect(),
            redis::Value::Map(kv) => kv
                .into_iter()
                .filter_map(|(k, v)| match k {
                    redis::Value::BulkString(k) => {
                        Some((String::from_utf8_lossy(&k).into_owned(), v))
                    }
                    redis::Value::SimpleString(k) => Some((k, v)),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        let name = fields.iter().find(|(k, _)| k == "name").map(|(_, v)| v);
        let is_ours = matches!(name, Some(redis::Value::BulkString(b)) if b == group.as_bytes());
        if is_ours {
            return match fields.iter().find(|(k, _)| k == "lag").map(|(_, v)| v) {
                Some(redis::Value::Int(n)) => *n,
                _ => -1,
            };
        }
    }
    -1
}

/// The group's consumers: (name, pending entries).
fn consumers(conn: &mut redis::Connection, key: &str, group: &str) -> Vec<(String, i64)> {
    let v: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(key)
        .arg(group)
        .query(conn)
        .unwrap();
    v.into_iter()
        .filter_map(|c| {
            let kv = match c {
                redis::Value::Array(kv) => kv,
                _ => return None,
            };
            let mut name = None;
            let mut pending = 0;
            for p in kv.chunks(2) {
                match (&p[0], p.get(1)) {
                    (redis::Value::BulkString(k), Some(redis::Value::BulkString(v)))
                        if k == b"name" =>
                    {
                        name = Some(String::from_utf8_lossy(v).into_owned());
                    }
                    (redis::Value::BulkString(k), Some(redis::Value::Int(n)))
                        if k == b"pending" =>
                    {
                        pending = *n;
                    }
                    _ => {}
                }
            }
            Some((name?, pending))
        })
        .collect()
}

/// Polls `condition` every 10 ms until it holds; panics after `limit`.
fn await_condition(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Stops a topology process with SIGTERM and checks it exits cleanly.
fn terminate(child: &mut Child) {
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// A stream loaded with `n` entries under a unique key, and a fresh
/// directory with a `Topology.toml` and the path of the handled-id log. The
/// file reads the stream from the start in consumer group `name`, with
/// `top` and `source` added to the file and to `[source.config]`.
struct IdLogRun {
    server: TestServer,
    key: String,
    conn: redis::Connection,
    dir: std::path::PathBuf,
    cfg: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl IdLogRun {
    fn new(name: &str, n: usize, top: &str, source: &str) -> IdLogRun {
        let server = TestServer::shared().unwrap();
        let key = unique_key(&format!("stream-{name}"));
        let mut conn = server.connection().unwrap();
        load(&mut conn, &key, n);
        let dir = std::env::temp_dir().join(format!("tempest-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("Topology.toml");
        let log = dir.join("handled.log");
        let _ = std::fs::remove_file(&log);
        let url = &server.url;
        std::fs::write(
            &cfg,
            format!(
                "{top}\n[source.config]\nuri = \"{url}\"\nkey = \"{key}\"\ngroup = \"{name}\"\ngroup_start_id = \"0\"\n{source}"
            ),
        )
        .unwrap();
        IdLogRun {
            server,
            key,
            conn,
            dir,
            cfg,
            log,
        }
    }
}

/// Total lines, and how many distinct entries they name.
fn duplicates(lines: &[String]) -> (usize, usize) {
    let distinct: std::collections::HashSet<&String> = lines.iter().collect();
    (lines.len(), distinct.len())
}

/// Regression test for "Duplicate storm after a restart": re-reading its
/// own pending entries from id 0 on every poll delivered entries already in
/// flight again and again (one entry ran 597 times).
#[test]
fn restart_after_kill_9_duplicates_at_most_the_entries_pending_at_the_crash() {
    let n = 100_000;
    let IdLogRun {
        server: _server,
        key,
        mut conn,
        dir,
        cfg,
        log,
    } = IdLogRun::new(
        "storm",
        n,
        "",
        "consumer = \"storm-1\"\nmonitor_interval_ms = 100\nlease_ttl_ms = 1000\n",
    );

    let mut first = start_idlog(&cfg, &log, 0);
    wait_for(&mut first, "connected");
    await_condition(Duration::from_secs(30), "a third is handled", || {
        handled(&log).len() >= n / 3
    });
    // Kill it with entries pending. Between seeing some pending and the
    // kill it may ack them all (1 run in the full suite on a loaded host),
    // so it is frozen first (SIGSTOP): what is pending then is what is
    // pending at the kill; with none, it goes on and is frozen again later.
    let signal = |sig: &str, pid: u32| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    };
    let mut pending_at_crash = 0;
    for _ in 0..100 {
        await_condition(Duration::from_secs(30), "entries are pending", || {
            pending_of(&mut conn, &key, "storm") > 0
        });
        signal("-STOP", first.id());
        pending_at_crash = pending_of(&mut conn, &key, "storm");
        if pending_at_crash > 0 {
            break;
        }
        signal("-CONT", first.id());
    }
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(pending_at_crash > 0, "killed with entries in flight");
    assert_eq!(pending_of(&mut conn, &key, "storm"), pending_at_crash);

    // Restart under the same name once the dead process's lease is gone,
    // so the restarted one re-reads its own pending entries.
    let lease = format!("{key}:lease:storm:storm-1");
    await_condition(Duration::from_secs(10), "the lease expired", || {
        redis::cmd("EXISTS")
            .arg(&lease)
            .query::<i64>(&mut conn)
            .unwrap()
            == 0
    });
    let mut second = start_idlog(&cfg, &log, 0);
    wait_for(&mut second, "connected");
    await_condition(Duration::from_secs(40), "everything is acked", || {
        pending_of(&mut conn, &key, "storm") == 0 && lag_of(&mut conn, &key, "storm") == 0
    });
    terminate(&mut second);

    let (total, distinct) = duplicates(&handled(&log));
    assert_eq!(distinct, n, "every entry was handled");
    let dups = (total - distinct) as i64;
    eprintln!(
        "{pending_at_crash} entries pending at the crash, {dups} duplicate(s) after the restart"
    );
    assert!(
        dups <= pending_at_crash,
        "{dups} duplicates, more than the {pending_at_crash} entries pending at the crash"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Regression test for "Consumer identity": two processes of one package on
/// one host took the same default consumer name and became one consumer
/// (each re-read the other's in-flight entries).
#[test]
fn two_processes_of_one_package_are_two_consumers_and_a_restart_adopts_its_pending_entries() {
    let n = 4000;
    // No consumer name: both take the default one (host and program name).
    let IdLogRun {
        server: _server,
        key,
        mut conn,
        dir,
        cfg,
        log,
    } = IdLogRun::new("twins", n, "max_pending = 200\n", "count = 100\n");

    let mut a = start_idlog(&cfg, &log, 1);
    wait_for(&mut a, "connected");
    await_condition(
        Duration::from_secs(30),
        "the first has entries in flight",
        || pending_of(&mut conn, &key, "twins") > 0,
    );
    let first = consumers(&mut conn, &key, "twins");
    assert_eq!(first.len(), 1, "{first:?}");
    let a_name = first[0].0.clone();
    let mut b = start_idlog(&cfg, &log, 1);
    wait_for(&mut b, "connected");
    await_condition(Duration::from_secs(30), "both consume", || {
        consumers(&mut conn, &key, "twins")
            .iter()
            .filter(|(_, p)| *p > 0)
            .count()
            >= 2
    });
    let names = consumers(&mut conn, &key, "twins");
    assert_eq!(names.len(), 2, "two processes, two consumers: {names:?}");
    assert_ne!(names[0].0, names[1].0);
    await_condition(Duration::from_secs(30), "a quarter is handled", || {
        handled(&log).len() >= n / 4
    });

    // kill -9 the first mid-stream; no entry ran twice before that.
    a.kill().unwrap();
    a.wait().unwrap();
    let killed_at = Instant::now();
    let (total, distinct) = duplicates(&handled(&log));
    assert_eq!(total, distinct, "no fault, no duplicate");
    let a_pending = consumers(&mut conn, &key, "twins")
        .iter()
        .find(|(name, _)| *name == a_name)
        .map_or(0, |(_, p)| *p);
    assert!(a_pending > 0, "killed with entries in flight");

    // Its restart picks up what it had in flight within seconds, not after
    // claim_min_idle_ms (60 s).
    let mut a2 = start_idlog(&cfg, &log, 1);
    wait_for(&mut a2, "connected");
    await_condition(
        Duration::from_secs(20),
        "the killed process's entries are picked up",
        || {
            consumers(&mut conn, &key, "twins")
                .iter()
                .find(|(name, _)| *name == a_name)
                .is_none_or(|(_, p)| *p == 0)
        },
    );
    let picked_up = killed_at.elapsed();
    eprintln!("{a_pending} entries pending at the kill were picked up {picked_up:?} after it");
    await_condition(Duration::from_secs(40), "everything is acked", || {
        pending_of(&mut conn, &key, "twins") == 0 && lag_of(&mut conn, &key, "twins") == 0
    });
    terminate(&mut b);
    terminate(&mut a2);

    let lines = handled(&log);
    let (total, distinct) = duplicates(&lines);
    assert_eq!(distinct, n, "every entry was handled");
    // Only the entries the killed process had in flight may run twice.
    let dups = (total - distinct) as i64;
    assert!(
        dups <= a_pending,
        "{dups} duplicates, more than the {a_pending} entries pending at the kill"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
