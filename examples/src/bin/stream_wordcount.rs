//! Word count on a Redis stream: the quick-start pipeline fed by a Redis
//! Streams consumer group.
//!
//! ```text
//! cargo run --release -p tempest-examples --bin xadd -- --count 100000
//! cargo run --release -p tempest-examples --bin stream_wordcount -- standalone
//! ```
//!
//! The source reads `[source.config]` of `Topology.toml` when there is one,
//! else the stream `sentences` (group `wordcount`) at `REDIS_URL`
//! (default `redis://127.0.0.1:6379`).

use std::process::ExitCode;
use std::sync::Arc;

use tempest::TopologyBuilder;
use tempest_examples::wordcount::{self, Totals};
use tempest_source_redis::{RedisStreamConfig, RedisStreamSource};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let uri = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let totals = Arc::new(Totals::default());
    tempest::rt::run(
        TopologyBuilder::new("stream-wordcount")
            .source_config::<RedisStreamSource>(RedisStreamConfig {
                group_start_id: "0".into(),
                ..RedisStreamConfig::new(uri, "sentences", "wordcount")
            })
            .pipeline(wordcount::pipeline(&totals)),
    )
}
