//! Helpers for the Redis tests: the server comes from the crate's
//! `test_server` module.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub use tempest_source_redis::test_server::unique_key;
use tempest_source_redis::test_server::TestServer;

pub struct Server(pub TestServer);

impl std::ops::Deref for Server {
    type Target = TestServer;
    fn deref(&self) -> &TestServer {
        &self.0
    }
}

impl Server {
    pub fn shared() -> Server {
        Server(TestServer::shared().unwrap())
    }
    pub fn own(persistent: bool) -> Server {
        Server(TestServer::own(persistent).unwrap())
    }
    pub fn restart(&mut self) {
        self.0.restart().unwrap();
    }
    pub fn conn(&self) -> redis::Connection {
        self.0.connection().unwrap()
    }
}

/// Appends `n` entries `payload = <prefix><i>` to `key`.
pub fn xadd(conn: &mut redis::Connection, key: &str, prefix: &str, n: usize) {
    let mut pipe = redis::pipe();
    for i in 0..n {
        pipe.cmd("XADD")
            .arg(key)
            .arg("*")
            .arg("payload")
            .arg(format!("{prefix}{i}"))
            .ignore();
    }
    pipe.query::<()>(conn).unwrap();
}

/// How many entries of the group are pending.
pub fn pending(conn: &mut redis::Connection, key: &str, group: &str) -> i64 {
    tempest_source_redis::test_server::pending_count(conn, key, group).unwrap()
}

pub fn xlen(conn: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("XLEN").arg(key).query(conn).unwrap()
}

/// Runs `builder` until `n` messages are acked, restarting `server` once
/// 500 are; returns the report.
pub fn run_through_restart(
    server: &mut Server,
    builder: tempest::TopologyBuilder,
    n: u64,
) -> tempest::testing::TestReport {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    let restarted = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&restarted);
    let handle = tempest::standalone::RuntimeHandle::new();
    let h = handle.clone();
    let run = std::thread::spawn(move || {
        tempest::testing::TestRun::new(builder)
            .handle(h)
            .until(move |s| s.acked >= n && flag.load(Ordering::SeqCst))
            .deadline(Duration::from_secs(90))
            .run()
            .unwrap()
    });
    // Restart once work is under way.
    while handle.stats().map_or(0, |s| s.acked) < 500 {
        std::thread::sleep(Duration::from_millis(5));
    }
    server.restart();
    restarted.store(true, Ordering::SeqCst);
    run.join().unwrap()
}
