//! Distributed mode with real processes on loopback: one `topology` process
//! of the testbed package and `task` worker processes, killed, restarted,
//! refused; raw TCP clients that send garbage, too much, or nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tempest::wire::{ErrorCode, Frame, VERSION};

mod common;

use common::Proc;

const BIN: &str = env!("CARGO_BIN_EXE_testbed");

/// Starts the testbed binary.
fn start(name: &str, args: &[&str], envs: &[(&str, &str)]) -> Proc {
    Proc::start_bin(BIN, name, args, envs)
}

/// A Topology.toml in a fresh temporary directory.
fn config(name: &str, body: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tempest-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("Topology.toml");
    std::fs::write(&path, body).unwrap();
    path
}

/// Starts the topology process and returns it with its `host:port`.
fn topology(cfg: &Path) -> (Proc, String) {
    let mut p = start(
        "topology",
        &["--config", cfg.to_str().unwrap(), "topology", "--port", "0"],
        &[],
    );
    let addr = p.listening_addr();
    (p, addr)
}

fn worker(cfg: &Path, task: &str, addr: &str, envs: &[(&str, &str)]) -> Proc {
    start(
        &format!("worker {task}"),
        &[
            "--config",
            cfg.to_str().unwrap(),
            "task",
            task,
            "--topology",
            addr,
        ],
        envs,
    )
}

/// Parses `testbed: read=.. acked=.. twice=.. unacked=.. failed=..`.
fn summary(stdout: &str) -> Vec<(String, u64)> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("testbed:"))
        .unwrap_or_else(|| panic!("no summary in {stdout:?}"));
    line.trim_start_matches("testbed:")
        .split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

fn get(s: &[(String, u64)], key: &str) -> u64 {
    s.iter().find(|(k, _)| k == key).unwrap().1
}

#[test]
fn one_topology_and_four_worker_processes_ack_everything() {
    let cfg = config(
        "four-workers",
        "secret = \"s3cret\"\nfailure_policy = { retry = 3 }\n\n[source.config]\ncount = 20000\npayload_size = 32\n",
    );
    let (top, addr) = topology(&cfg);
    let exit = [("TEMPEST_EXIT_WITH_TOPOLOGY", "true")];
    let workers = vec![
        worker(&cfg, "a", &addr, &exit),
        worker(&cfg, "b", &addr, &exit),
        worker(&cfg, "b", &addr, &exit),
        worker(&cfg, "c", &addr, &exit),
    ];
    let (code, out) = top.finish();
    assert_eq!(code, Some(0));
    let s = summary(&out);
    assert_eq!(get(&s, "acked"), 20000, "{s:?}");
    assert_eq!(get(&s, "twice"), 0);
    assert_eq!(get(&s, "unacked"), 0);
    for w in workers {
        let name = w.name.clone();
        let (code, _) = w.finish();
        assert_eq!(
            code,
            Some(0),
            "{name} exits cleanly when the topology stops (exit_with_topology)"
        );
    }
}

/// A topology with workers for a and c and two slow workers for b; returns
/// once the first b worker has handled 1,000 messages.
fn two_slow_b_workers(cfg: &Path) -> (Proc, String, Proc, Vec<Proc>) {
    let (top, addr) = topology(cfg);
    let slow = [("TESTBED_SLOW_US", "100")];
    let others = vec![
        worker(cfg, "a", &addr, &[]),
        worker(cfg, "c", &addr, &[]),
        worker(cfg, "b", &addr, &slow),
    ];
    let mut b1 = worker(cfg, "b", &addr, &slow);
    b1.wait_for("b: 1000 handled");
    (top, addr, b1, others)
}

#[test]
fn kill_9_of_a_worker_mid_stream_loses_nothing_with_retry() {
    let cfg = config(
        "kill-9",
        "failure_policy = { retry = 5 }\nretry_backoff = 10\nheartbeat = 200\n\n[source.config]\ncount = 20000\npayload_size = 16\n",
    );
    let (mut top, addr, mut b1, _others) = two_slow_b_workers(&cfg);
    b1.kill_9();
    // The topology notices at once and hands what b1 held to the policy.
    top.wait_for("was lost holding");
    // A replacement joins mid-run and gets work.
    let mut b3 = worker(&cfg, "b", &addr, &[("TESTBED_SLOW_US", "100")]);
    b3.wait_for("joined the topology");
    b3.wait_for("b: 1000 handled");
    let (code, out) = top.finish();
    assert_eq!(code, Some(0));
    let s = summary(&out);
    assert_eq!(get(&s, "acked"), 20000, "{s:?}");
    assert_eq!(get(&s, "twice"), 0, "{s:?}");
    assert_eq!(get(&s, "unacked"), 0, "{s:?}");
    assert_eq!(get(&s, "failed"), 0, "{s:?}");
}

#[test]
fn sigterm_makes_a_worker_finish_what_it_holds_before_leaving() {
    // Policy None: a message a worker dropped would fail and stay unacked.
    let cfg = config(
        "worker-sigterm",
        "failure_policy = \"none\"\n\n[source.config]\ncount = 20000\npayload_size = 16\n",
    );
    let (mut top, _addr, mut b1, _others) = two_slow_b_workers(&cfg);
    let pid = b1.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    b1.wait_for("finishing what it holds");
    top.wait_for("said goodbye");
    let (code, _) = b1.finish();
    assert_eq!(code, Some(0));
    let (code, out) = top.finish();
    assert_eq!(code, Some(0));
    let s = summary(&out);
    assert_eq!(get(&s, "acked"), 20000, "{s:?}");
    assert_eq!(
        get(&s, "failed"),
        0,
        "nothing the leaving worker held was lost: {s:?}"
    );
}

#[test]
fn wrong_secrets_and_unknown_tasks_are_refused() {
    let cfg = config(
        "refused",
        "secret = \"right\"\n\n[source.config]\ncount = 10\n",
    );
    let (mut top, addr) = topology(&cfg);
    let err = refused(&["task", "a", "--topology", &addr, "--secret", "wrong"]);
    assert!(err.contains("wrong secret"), "{err}");
    top.wait_for("refused: wrong secret");

    let err = refused(&["task", "nope", "--topology", &addr]);
    assert!(err.contains("possible values: a, b, c"), "{err}");
}

/// Sends a Hello and returns the error the topology answers with; checks
/// the connection is closed after it.
fn refused_hello(addr: &str, version: u16, task: &str) -> (ErrorCode, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(
        &Frame::Hello {
            version,
            task: task.into(),
        }
        .to_wire(),
    )
    .unwrap();
    let answer = match read_frame(&mut s) {
        Some(Frame::Error { code, message }) => (code, message),
        other => panic!("expected an error frame, got {other:?}"),
    };
    assert!(closed(&mut s), "the connection is closed after the error");
    answer
}

fn read_frame(stream: &mut TcpStream) -> Option<Frame> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).ok()?;
    Frame::decode_body(body.into()).ok()
}

/// Reads until the server closes the connection; true if it did.
fn closed(stream: &mut TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

#[test]
fn raw_clients_sending_garbage_too_much_or_nothing_are_dropped_harmlessly() {
    let cfg = config(
        "raw",
        "handshake_timeout = 300\n\n[source.config]\ncount = 3000\n",
    );
    let (top, addr) = topology(&cfg);

    // Garbage: an HTTP request.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(closed(&mut s), "garbage is dropped");

    // An oversized length before the handshake.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).unwrap();
    assert!(closed(&mut s), "an oversized frame is dropped");

    // Nothing at all: dropped at the handshake deadline.
    let mut s = TcpStream::connect(&addr).unwrap();
    let started = Instant::now();
    assert!(closed(&mut s), "a silent client is dropped");
    assert!(started.elapsed() >= Duration::from_millis(250));

    // A Tempest worker of another protocol version gets a clear error.
    let (code, message) = refused_hello(&addr, VERSION + 1, "a");
    assert_eq!(code, ErrorCode::Version);
    assert!(message.contains("not supported"), "{message}");

    // An unknown task name.
    let (code, message) = refused_hello(&addr, VERSION, "zzz");
    assert_eq!(code, ErrorCode::UnknownTask);
    assert!(message.contains("its tasks are: a, b, c"), "{message}");

    // The topology is unharmed: real workers finish the job.
    let _workers: Vec<Proc> = ["a", "b", "c"]
        .iter()
        .map(|t| worker(&cfg, t, &addr, &[]))
        .collect();
    let (code, out) = top.finish();
    assert_eq!(code, Some(0));
    let s = summary(&out);
    assert_eq!(get(&s, "acked"), 3000, "{s:?}");
}

/// Runs the package with `args`, which it must refuse with exit code 2;
/// its stderr.
fn refused(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .current_dir(std::env::temp_dir())
        .args(args)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn config_errors_name_the_file_the_key_and_the_line() {
    let cfg = config(
        "bad-config",
        "max_pending = 10\n\n[[task]]\nname = \"bb\"\n\n[source.config]\ncont = 3\n",
    );
    let err = refused(&["--config", cfg.to_str().unwrap(), "standalone"]);
    // Both problems, each once, each with its file, line and key.
    assert!(err.contains("2 problems in "), "{err}");
    assert!(
        err.contains(
            "Topology.toml:4: task.name: \"bb\" is not a task of this topology; its tasks are: a, b, c"
        ),
        "{err}"
    );
    assert!(
        err.contains("Topology.toml:7: source.config.cont: unknown key; did you mean count?"),
        "{err}"
    );

    let cfg = config("bad-source-config", "[source.config]\ncont = 3\n");
    let err = refused(&["--config", cfg.to_str().unwrap(), "standalone"]);
    assert!(
        err.contains("Topology.toml:2: source.config.cont: unknown key"),
        "{err}"
    );

    let cfg = config("no-secret", "host = \"0.0.0.0\"\n");
    let err = refused(&["--config", cfg.to_str().unwrap(), "topology"]);
    assert!(err.contains("no secret is set"), "{err}");
}

#[test]
fn flags_beat_the_environment_which_beats_the_file() {
    // The file says 5 messages; the environment and flags set max_pending;
    // a standalone run reports through the source's summary.
    let cfg = config(
        "precedence",
        "max_pending = 1\n\n[source.config]\ncount = 50\n",
    );
    let out = Command::new(BIN)
        .current_dir(std::env::temp_dir())
        .args(["--config", cfg.to_str().unwrap(), "standalone"])
        .env("TEMPEST_MAX_PENDING", "0")
        .output()
        .unwrap();
    // The environment's 0 overrides the file's 1 and is refused.
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(BIN)
        .current_dir(std::env::temp_dir())
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "standalone",
            "--max-pending",
            "7",
        ])
        .env("TEMPEST_MAX_PENDING", "0")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        get(&summary(&String::from_utf8_lossy(&out.stdout)), "acked"),
        50
    );
}

#[test]
fn workers_reconnect_to_a_restarted_topology() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = config(
        "restart",
        &format!(
            "port = {port}\nheartbeat = 200\n\n[source.config]\ncount = 1000000000\nopen = true\n"
        ),
    );
    let start_topology =
        |name: &str| start(name, &["--config", cfg.to_str().unwrap(), "topology"], &[]);
    let mut first = start_topology("first topology");
    first.wait_for("Listening for task workers on");
    let addr = format!("127.0.0.1:{port}");
    let mut workers: Vec<Proc> = ["a", "b", "c"]
        .iter()
        .map(|t| {
            start(
                &format!("worker {t}"),
                &[
                    "--config",
                    cfg.to_str().unwrap(),
                    "task",
                    t,
                    "--topology",
                    &addr,
                    // A crash is not a stop: they reconnect all the same.
                    "--exit-with-topology",
                ],
                &[("TESTBED_SLOW_US", "50")],
            )
        })
        .collect();
    workers[1].wait_for("b: 1000 handled");
    first.kill_9();
    for w in &mut workers {
        w.wait_for("lost its connection");
    }
    let mut second = start_topology("second topology");
    second.wait_for("Listening for task workers on");
    for w in &mut workers {
        w.wait_for("joined the topology");
    }
    second.wait_for("Worker 2 joined task");
    // Work flows again: stop the second topology gracefully and check it
    // acked what it read.
    let pid = second.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let line = second.wait_for("stopped (shutdown was requested)");
    let (code, out) = second.finish();
    assert_eq!(code, Some(0));
    let s = summary(&out);
    assert!(get(&s, "acked") > 0, "{line}");
    assert_eq!(get(&s, "failed"), 0, "{line}");
    assert_eq!(
        get(&s, "unacked"),
        0,
        "graceful: everything read was acked; {line}"
    );
    for w in workers {
        let name = w.name.clone();
        let (code, _) = w.finish();
        assert_eq!(code, Some(0), "{name} stops with the topology");
    }
}

/// A free port on loopback (bound, read and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Regression: after a topology's SIGTERM every worker exited 0, so a
/// rolling restart of the topology stranded the deployment.
#[test]
fn a_gracefully_restarted_topology_keeps_its_workers() {
    let port = free_port();
    let endless = config(
        "graceful-restart-1",
        &format!(
            "port = {port}\nheartbeat = 200\n\n[source.config]\ncount = 1000000000\nopen = true\n"
        ),
    );
    let mut first = start(
        "first topology",
        &["--config", endless.to_str().unwrap(), "topology"],
        &[],
    );
    first.wait_for("Listening for task workers on");
    let addr = format!("127.0.0.1:{port}");
    let reconnect = [
        ("TEMPEST_POLL_INTERVAL_MS", "20"),
        ("TEMPEST_MAX_BACKOFF_MS", "200"),
    ];
    let mut workers: Vec<Proc> = ["a", "b", "c"]
        .iter()
        .map(|t| worker(&endless, t, &addr, &reconnect))
        .collect();
    workers[1].wait_for("b: 1000 handled");
    first.sigterm();
    for w in &mut workers {
        w.wait_for("reconnects when a topology is back");
    }
    let (code, _, _) = first.exit_within(Duration::from_secs(60));
    assert_eq!(code, Some(0));
    for w in &mut workers {
        assert!(
            w.child.try_wait().unwrap().is_none(),
            "{} is still running",
            w.name
        );
    }

    // The next topology on the same port, with 5,000 messages: the same
    // worker processes join it and do all the work.
    let bounded = config(
        "graceful-restart-2",
        &format!("port = {port}\nheartbeat = 200\n\n[source.config]\ncount = 5000\n"),
    );
    let second = start(
        "second topology",
        &["--config", bounded.to_str().unwrap(), "topology"],
        &[],
    );
    for w in &mut workers {
        w.wait_for("joined the topology");
    }
    let (code, out) = second.finish();
    assert_eq!(code, Some(0));
    let s = summary(&out);
    assert_eq!(get(&s, "acked"), 5000, "{s:?}");
    assert_eq!(get(&s, "unacked"), 0, "{s:?}");
}

/// Regression: a task stuck in its call kept a SIGTERMed process running
/// long past its graceful shutdown (31 s and counting).
#[test]
fn sigterm_with_a_task_stuck_forever_exits_after_the_grace_naming_what_is_stuck() {
    // One message in flight at a time: b's 101st message is message 100.
    let cfg = config(
        "stuck",
        "max_pending = 1\ngraceful_shutdown = 1000\nmsg_timeout = 0\n\n[source.config]\ncount = 1000000\nopen = true\n",
    );
    let mut p = start(
        "standalone",
        &["--config", cfg.to_str().unwrap(), "standalone"],
        &[("TESTBED_STUCK_AT", "100")],
    );
    p.wait_for("b: stuck on message 100");
    p.sigterm();
    let (code, _, said) = p.exit_within(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{}", said.join("\n"));
    // Standalone workers are numbered a = 0, b = 1, c = 2.
    assert!(
        said.iter()
            .any(|l| l
                .contains("Left unacked: message 100 (attempt 1) was held by worker 1 of task b")),
        "{}",
        said.join("\n")
    );
    assert!(
        said.iter()
            .any(|l| l.contains("Worker 1 of task b is still in a task call")),
        "{}",
        said.join("\n")
    );
}

/// Distributed, a stuck worker bounds nothing either: the topology names
/// the message and the worker holding it and exits after its grace; the
/// worker, told to stop, leaves its stuck call behind and exits.
#[test]
fn a_stuck_remote_worker_does_not_hold_the_topology_or_itself() {
    let cfg = config(
        "stuck-remote",
        "max_pending = 1\ngraceful_shutdown = 1000\nmsg_timeout = 0\n\n[source.config]\ncount = 1000000\nopen = true\n",
    );
    let (top, addr) = topology(&cfg);
    let _a = worker(&cfg, "a", &addr, &[]);
    let _c = worker(&cfg, "c", &addr, &[]);
    let mut b = worker(&cfg, "b", &addr, &[("TESTBED_STUCK_AT", "100")]);
    b.wait_for("b: stuck on message 100");
    top.sigterm();
    let (code, _, said) = top.exit_within(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{}", said.join("\n"));
    let named = said
        .iter()
        .find(|l| l.contains("Left unacked: message 100 (attempt 1) was held by worker "))
        .unwrap_or_else(|| panic!("{}", said.join("\n")));
    assert!(named.contains("of task b"), "{named}");
    // The worker stays for the next topology; told to stop, it does not
    // wait for its stuck call.
    b.wait_for("reconnects when a topology is back");
    b.sigterm();
    let (code, _, said) = b.exit_within(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{}", said.join("\n"));
    assert!(
        said.iter().any(|l| l.contains("is still in a task call")),
        "{}",
        said.join("\n")
    );
}

/// A worker told to stop while its task is stuck gives up on what it
/// holds after `graceful_shutdown` and exits; the topology hands the
/// message to the failure policy.
#[test]
fn sigterm_to_a_worker_with_a_stuck_task_exits_after_the_grace() {
    let cfg = config(
        "stuck-worker",
        "max_pending = 1\ngraceful_shutdown = 1000\nmsg_timeout = 0\n\n[source.config]\ncount = 1000000\nopen = true\n",
    );
    let (mut top, addr) = topology(&cfg);
    let _a = worker(&cfg, "a", &addr, &[]);
    let _c = worker(&cfg, "c", &addr, &[]);
    let mut b = worker(&cfg, "b", &addr, &[("TESTBED_STUCK_AT", "100")]);
    b.wait_for("b: stuck on message 100");
    b.sigterm();
    let (code, _, said) = b.exit_within(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{}", said.join("\n"));
    assert!(
        said.iter()
            .any(|l| l.contains("still holds 1 unfinished batch(es) after the graceful shutdown")),
        "{}",
        said.join("\n")
    );
    top.wait_for("was lost holding 1 message(s)");
}

/// Regression: with messages queued for a task no worker was connected
/// for, SIGTERM waited out the whole graceful shutdown.
#[test]
fn sigterm_with_nothing_that_can_finish_exits_at_once() {
    let cfg = config(
        "no-workers",
        "graceful_shutdown = 60000\n\n[source.config]\ncount = 1000\nopen = true\n",
    );
    let (mut top, _addr) = topology(&cfg);
    if !top
        .seen
        .iter()
        .any(|l| l.contains("Source testbed connected."))
    {
        top.wait_for("Source testbed connected.");
    }
    top.sigterm();
    // Far less than the 60 s grace period.
    let (code, out, said) = top.exit_within(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{}", said.join("\n"));
    assert!(
        said.iter().any(|l| l.contains("Stopping without waiting")),
        "{}",
        said.join("\n")
    );
    assert_eq!(get(&summary(&out), "acked"), 0);
}

/// Regression: a second topology on a busy port polled 14,336 messages,
/// blamed the source, and exited after the full grace period.
#[test]
fn a_busy_port_fails_the_start_before_the_source_is_polled() {
    let cfg = config(
        "busy-port",
        "[source.config]\ncount = 100000\nopen = true\n",
    );
    let (_first, addr) = topology(&cfg);
    let port = addr.rsplit(':').next().unwrap();
    let second = start(
        "second topology",
        &[
            "--config",
            cfg.to_str().unwrap(),
            "topology",
            "--port",
            port,
        ],
        &[],
    );
    let (code, out, said) = second.exit_within(Duration::from_secs(20));
    let said = said.join("\n");
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains(&format!("listening for task workers on {addr}")),
        "{said}"
    );
    assert!(said.contains("in use"), "{said}");
    assert!(!said.contains("Source testbed connected"), "{said}");
    assert!(
        !out.contains("testbed:"),
        "the source was never started: {out}"
    );
}

/// An unreachable source at start is retried with backoff, then given up
/// on after `source_connect_timeout`, naming the address.
#[test]
fn an_unreachable_source_at_start_gives_up_after_source_connect_timeout() {
    let port = free_port();
    let cfg = config("unreachable", "source_connect_timeout = 2000\n");
    let url = format!("redis://127.0.0.1:{port}");
    let p = Proc::start_bin(
        env!("CARGO_BIN_EXE_stream_wordcount"),
        "stream_wordcount",
        &["--config", cfg.to_str().unwrap(), "standalone"],
        &[("REDIS_URL", &url)],
    );
    let (code, _, said) = p.exit_within(Duration::from_secs(30));
    let said = said.join("\n");
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains(&format!("127.0.0.1:{port}")), "{said}");
    assert!(said.contains("source_connect_timeout"), "{said}");
}

/// Reads nothing for a moment; true if the connection is still open.
fn still_open(stream: &mut TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        // EOF, or bytes the server should not have sent.
        Ok(_n) => false,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Regression: a failing task printed nothing at the default log level and
/// the process exited 0.
#[test]
fn failures_are_logged_at_the_default_level_and_set_the_exit_code() {
    let cfg = config(
        "failures-visible",
        "failure_policy = \"none\"\n\n[source.config]\ncount = 2000\npayload_size = 16\n",
    );
    let mut p = start(
        "standalone",
        &["--config", cfg.to_str().unwrap(), "standalone"],
        &[("TESTBED_FAIL_EVERY", "100")],
    );
    let warn = p.wait_for("message(s) failed in the last");
    assert!(
        warn.contains("WARN")
            && warn.contains("Task b: ")
            && warn.contains("fails on purpose")
            && warn.contains("(message "),
        "{warn}"
    );
    let given_up = p.wait_for("were given up on");
    assert!(given_up.contains("20 failed"), "{given_up}");
    let (code, out) = p.finish();
    assert_eq!(code, Some(3), "a run that gave messages up exits 3");
    let s = summary(&out);
    assert_eq!(get(&s, "acked"), 1980, "{s:?}");
    assert_eq!(get(&s, "failed"), 20, "{s:?}");
}

/// Regression: a topology with no worker for a task, and a source paused
/// on max_pending, logged nothing.
#[test]
fn a_task_without_workers_and_a_paused_source_are_logged() {
    let cfg = config(
        "no-worker",
        "max_pending = 100\n\n[source.config]\ncount = 2000\npayload_size = 16\n",
    );
    let (mut top, addr) = topology(&cfg);
    let _a = worker(&cfg, "a", &addr, &[]);
    let _c = worker(&cfg, "c", &addr, &[]);
    // The two warnings come about 5 s in, in either order.
    let lines = top.wait_for_all(&[
        "Polling source testbed has been paused",
        "waiting and no worker connected",
    ]);
    let (paused, no_worker) = (&lines[0], &lines[1]);
    assert!(paused.contains("max_pending = 100"), "{paused}");
    assert!(
        no_worker.contains("Task b has 100 message(s) waiting and no worker connected"),
        "{no_worker}"
    );
    let _b = worker(&cfg, "b", &addr, &[]);
    top.wait_for("Task b has a worker again");
    top.wait_for("resumed after a pause");
    let (code, out) = top.finish();
    assert_eq!(code, Some(0));
    assert_eq!(get(&summary(&out), "acked"), 2000);
}

/// Regression: idle sockets that never finish the handshake could use up
/// the topology's file descriptors and keep real workers out.
#[test]
fn connections_beyond_max_handshakes_are_closed_at_once() {
    let cfg = config(
        "max-handshakes",
        "max_handshakes = 4\nhandshake_timeout = 5000\n\n[source.config]\ncount = 100\n",
    );
    let (mut top, addr) = topology(&cfg);
    let mut idle: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    let mut excess: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    for s in &mut excess {
        assert!(closed(s), "a connection over the cap is closed");
    }
    // Closed for the cap, not at the handshake deadline: the idle ones,
    // opened first, are still open.
    for s in &mut idle {
        assert!(still_open(s), "an idle connection within the cap waits");
    }
    // A real worker gets in once the idle ones have timed out.
    let mut w = worker(
        &cfg,
        "a",
        &addr,
        &[
            ("TEMPEST_POLL_INTERVAL_MS", "50"),
            ("TEMPEST_MAX_BACKOFF_MS", "200"),
        ],
    );
    w.wait_for("joined the topology");
    top.wait_for("Worker 0 joined task a");
    let refusals = top.seen.iter().filter(|l| l.contains("refused")).count();
    assert!(
        refusals <= 7,
        "24+ refusals make at most 5 lines and a notice, plus a summary: {}",
        top.seen.join("\n")
    );
    drop(idle);
}
