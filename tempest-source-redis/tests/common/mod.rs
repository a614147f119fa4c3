//! A real redis-server for the tests: the one at `TEMPEST_REDIS_URL`, or
//! one started here on a free port (and stopped when dropped).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    pub url: String,
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    persistent: bool,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    /// `TEMPEST_REDIS_URL` if set, else a server of our own.
    pub fn shared() -> Server {
        match std::env::var("TEMPEST_REDIS_URL") {
            Ok(url) if !url.is_empty() => Server {
                url,
                child: None,
                port: 0,
                dir: PathBuf::new(),
                persistent: false,
            },
            _ => Server::own(false),
        }
    }

    /// A server of our own; `persistent` keeps its data across restarts
    /// (append-only file, fsync on every write).
    pub fn own(persistent: bool) -> Server {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("tempest-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = Server {
            url: format!("redis://127.0.0.1:{port}/"),
            child: None,
            port,
            dir,
            persistent,
        };
        s.start();
        s
    }

    fn start(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .arg("--dir")
        .arg(&self.dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if self.persistent {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start redis-server ({e}): install it (scripts/test does) or set TEMPEST_REDIS_URL")
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = redis::Client::open(self.url.as_str())
                .unwrap()
                .get_connection()
            {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not come up on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the server (SIGKILL) and starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.start();
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url.as_str())
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A key no other test (or earlier run) uses.
pub fn unique_key(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("tempest-test:{name}:{}:{nanos}", std::process::id())
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
    let v: redis::Value = redis::cmd("XPENDING")
        .arg(key)
        .arg(group)
        .query(conn)
        .unwrap();
    match v {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => 0,
        },
        _ => 0,
    }
}

pub fn xlen(conn: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("XLEN").arg(key).query(conn).unwrap()
}
