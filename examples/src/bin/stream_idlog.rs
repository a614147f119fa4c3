//! A Redis stream topology that logs every entry it handles: the process
//! tests of the stream source count duplicates from its log.
//!
//! ```text
//! TEMPEST_ID_LOG=/tmp/handled.log cargo run -p tempest-examples --bin stream_idlog -- standalone
//! ```
//!
//! Its one task, `log`, appends each payload and a newline to the file named
//! by `TEMPEST_ID_LOG` before it returns (one `write` per entry on a file
//! opened for appending, so the log survives `kill -9` and lines never
//! interleave), after waiting `TEMPEST_TASK_DELAY_MS` milliseconds when that
//! is set. The source reads `[source.config]` of the `Topology.toml` given
//! with `--config`, else the stream `sentences` (group `idlog`) at
//! `REDIS_URL`.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tempest::{Msg, MsgCtx, Output, Pipeline, Task, TaskError, TaskResult, TopologyBuilder};
use tempest_source_redis::{RedisStreamConfig, RedisStreamSource};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Appends each payload to the log, then returns.
#[derive(Clone, Debug)]
struct LogIds {
    path: Option<PathBuf>,
    delay: Duration,
    file: Option<std::sync::Arc<File>>,
}

impl Task for LogIds {
    fn name(&self) -> &str {
        "log"
    }

    fn handle(&mut self, msg: Msg, _: &MsgCtx) -> TaskResult {
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        let Some(path) = &self.path else {
            return Ok(Output::None);
        };
        if self.file.is_none() {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| TaskError::msg(format!("cannot open {}: {e}", path.display())))?;
            self.file = Some(std::sync::Arc::new(file));
        }
        let mut line = Vec::with_capacity(msg.len() + 1);
        line.extend_from_slice(&msg);
        line.push(b'\n');
        if let Some(file) = &self.file {
            (&**file)
                .write_all(&line)
                .map_err(|e| TaskError::msg(format!("cannot append to {}: {e}", path.display())))?;
        }
        Ok(Output::None)
    }
}

fn main() -> ExitCode {
    let uri = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let delay_ms = std::env::var("TEMPEST_TASK_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let task = LogIds {
        path: std::env::var_os("TEMPEST_ID_LOG").map(PathBuf::from),
        delay: Duration::from_millis(delay_ms),
        file: None,
    };
    tempest::rt::run(
        TopologyBuilder::new("stream-idlog")
            .source_config::<RedisStreamSource>(RedisStreamConfig {
                group_start_id: "0".into(),
                ..RedisStreamConfig::new(uri, "sentences", "idlog")
            })
            .pipeline(Pipeline::new().task(task)),
    )
}
