//! A small HTTP profile service for the enrichment example: `GET
//! /users/{name}` answers `{"user": name, "country": …, "tier": …}` as JSON,
//! after an optional delay (a stand-in for a real service's latency), and
//! `404` for a name that is not a plain word.
//!
//! It is a real HTTP/1.1 server on loopback (tiny_http), run on threads of
//! its own, so the example's async task talks to it as it would to any
//! service.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The countries profiles are spread over, by the name's bytes.
pub const COUNTRIES: [&str; 4] = ["NL", "DE", "FR", "SE"];

/// The profile the service answers for `user`, as the example expects it.
pub fn country_of(user: &str) -> &'static str {
    let sum: usize = user.bytes().map(usize::from).sum();
    COUNTRIES[sum % COUNTRIES.len()]
}

/// A running profile service; stops when dropped.
pub struct ProfileService {
    addr: SocketAddr,
    server: Arc<tiny_http::Server>,
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl ProfileService {
    /// Starts the service on `127.0.0.1` at a free port, answering each
    /// request after `delay`, on `threads` threads (so up to that many
    /// requests are in progress at once).
    pub fn start(delay: Duration, threads: usize) -> std::io::Result<Self> {
        let server = tiny_http::Server::http("127.0.0.1:0")
            .map(Arc::new)
            .map_err(std::io::Error::other)?;
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| std::io::Error::other("the server has no IP address"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let threads = (0..threads.max(1))
            .map(|i| {
                let (server, stop, served) =
                    (Arc::clone(&server), Arc::clone(&stop), Arc::clone(&served));
                std::thread::Builder::new()
                    .name(format!("profiles-{i}"))
                    .spawn(move || serve(&server, &stop, &served, delay))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ProfileService {
            addr,
            server,
            stop,
            served,
            threads,
        })
    }

    /// The base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for ProfileService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProfileService")
            .field("addr", &self.addr)
            .field("served", &self.served())
            .finish_non_exhaustive()
    }
}

impl Drop for ProfileService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.server.unblock();
        for _ in 1..self.threads.len() {
            self.server.unblock();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve(server: &tiny_http::Server, stop: &AtomicBool, served: &AtomicU64, delay: Duration) {
    while !stop.load(Ordering::SeqCst) {
        let request = match server.recv_timeout(Duration::from_millis(100)) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(_) => return,
        };
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let user = request
            .url()
            .strip_prefix("/users/")
            .filter(|u| !u.is_empty() && u.bytes().all(|b| b.is_ascii_alphanumeric()))
            .map(str::to_string);
        let response = match user {
            Some(user) => {
                let tier = if user.len() > 5 { "gold" } else { "basic" };
                let body = format!(
                    r#"{{"user":"{user}","country":"{}","tier":"{tier}"}}"#,
                    country_of(&user)
                );
                tiny_http::Response::from_string(body).with_header(
                    tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..])
                        .unwrap_or_else(|_| unreachable!("a valid header")),
                )
            }
            None => tiny_http::Response::from_string("no such user").with_status_code(404),
        };
        served.fetch_add(1, Ordering::Relaxed);
        // One request per connection: under a pooling client's load,
        // requests on kept-alive connections sometimes never reached
        // `recv` (seen as 5 s client timeouts), so the service closes each
        // connection after its answer and its clients should not pool.
        let response = response.with_header(
            tiny_http::Header::from_bytes(&b"Connection"[..], &b"close"[..])
                .unwrap_or_else(|_| unreachable!("a valid header")),
        );
        let _ = request.respond(response);
    }
}
