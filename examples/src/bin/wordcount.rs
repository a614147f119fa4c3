//! The word-count topology as a package binary: `wordcount standalone`,
//! `wordcount graph --format mermaid`, ...
//!
//! `WORDCOUNT_SENTENCES` sets how many sentences the mock source generates
//! (default 1,000,000). `WORDCOUNT_REDIS_URL` keeps the counters' state in
//! that Redis (checkpointed; a counter killed and restarted goes on from
//! it) instead of in memory.

use std::process::ExitCode;
use std::sync::Arc;

use tempest_examples::wordcount::{self, Totals};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let count = match std::env::var("WORDCOUNT_SENTENCES") {
        Err(_) => 1_000_000,
        Ok(v) => match v.replace('_', "").parse() {
            Ok(n) => n,
            Err(_) => {
                eprintln!("error: WORDCOUNT_SENTENCES must be a whole number, got \"{v}\"");
                return ExitCode::from(2);
            }
        },
    };
    let totals = Arc::new(Totals::default());
    let mut topology = wordcount::topology(count, &totals);
    if let Ok(url) = std::env::var("WORDCOUNT_REDIS_URL") {
        match tempest_state_redis::RedisState::open(&url, "wordcount") {
            Ok(backend) => topology = topology.state_backend(backend),
            Err(e) => {
                eprintln!("error: WORDCOUNT_REDIS_URL: {e}");
                return ExitCode::from(2);
            }
        }
    }
    tempest::rt::run(topology)
}
