//! A real redis-server for tests and benchmarks: the one at
//! `TEMPEST_REDIS_URL`, or one started on a free loopback port (and stopped
//! when dropped).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A redis-server for a test. See the [module docs](self).
#[derive(Debug)]
pub struct TestServer {
    /// Where it listens, e.g. `redis://127.0.0.1:40001/`.
    pub url: String,
    child: Option<Child>,
    port: u16,
    dir: Option<PathBuf>,
    persistent: bool,
}

/// A problem starting a server.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

impl TestServer {
    /// `TEMPEST_REDIS_URL` if set, else a server of its own.
    pub fn shared() -> Result<TestServer, StartError> {
        match std::env::var("TEMPEST_REDIS_URL") {
            Ok(url) if !url.is_empty() => Ok(TestServer {
                url,
                child: None,
                port: 0,
                dir: None,
                persistent: false,
            }),
            _ => TestServer::own(false),
        }
    }

    /// A server of its own; `persistent` keeps its data across
    /// [`restart`](Self::restart)s (append-only file, fsync per write).
    pub fn own(persistent: bool) -> Result<TestServer, StartError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| StartError(format!("no free port: {e}")))?
            .port();
        let dir = std::env::temp_dir().join(format!("tempest-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| StartError(format!("creating {}: {e}", dir.display())))?;
        let mut s = TestServer {
            url: format!("redis://127.0.0.1:{port}/"),
            child: None,
            port,
            dir: Some(dir),
            persistent,
        };
        s.start()?;
        Ok(s)
    }

    fn start(&mut self) -> Result<(), StartError> {
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if let Some(dir) = &self.dir {
            cmd.arg("--dir").arg(dir);
        }
        if self.persistent {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        let child = cmd.spawn().map_err(|e| {
            StartError(format!(
                "cannot start redis-server ({e}): install it (scripts/test does) or set TEMPEST_REDIS_URL"
            ))
        })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = self.connection() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(StartError(format!(
                    "redis-server did not come up on port {}",
                    self.port
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the server (SIGKILL) and starts it again on the same port.
    /// Only for a server of its own.
    pub fn restart(&mut self) -> Result<(), StartError> {
        if self.child.is_none() {
            return Err(StartError(
                "cannot restart a server this test did not start".into(),
            ));
        }
        self.stop();
        self.start()
    }

    /// Kills the server, if it is its own.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A new connection.
    pub fn connection(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url.as_str())?.get_connection()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// How many entries of consumer group `group` on stream `key` are pending
/// (`XPENDING` summary; 0 for an unknown reply shape).
pub fn pending_count(
    conn: &mut redis::Connection,
    key: &str,
    group: &str,
) -> redis::RedisResult<i64> {
    let v: redis::Value = redis::cmd("XPENDING").arg(key).arg(group).query(conn)?;
    Ok(match v {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => 0,
        },
        _ => 0,
    })
}

/// A key no other test (or earlier run) uses.
pub fn unique_key(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("tempest-test:{name}:{}:{nanos}", std::process::id())
}
