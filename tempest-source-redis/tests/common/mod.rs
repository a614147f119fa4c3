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
