//! Loads test data into a Redis stream: `xadd --count N` appends N entries
//! (`payload` = a sentence of the word-count example, or `--size` bytes),
//! pipelined in batches.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use tempest_examples::wordcount::SENTENCES;

#[derive(Debug, Parser)]
#[command(about = "Appends test entries to a Redis stream.")]
struct Args {
    /// The server.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    uri: String,
    /// The stream.
    #[arg(long, default_value = "sentences")]
    key: String,
    /// How many entries.
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Payloads of this many bytes instead of sentences.
    #[arg(long)]
    size: Option<usize>,
    /// Entries per round trip.
    #[arg(long, default_value_t = 1000)]
    batch: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.batch == 0 {
        eprintln!("error: --batch must be at least 1");
        return ExitCode::from(2);
    }
    let mut conn = match redis::Client::open(args.uri.as_str()).and_then(|c| c.get_connection()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: cannot connect to {}: {e}", args.uri);
            return ExitCode::from(1);
        }
    };
    let fixed = args.size.map(|n| "x".repeat(n));
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < args.count {
        let n = args.batch.min(args.count - sent);
        let mut pipe = redis::pipe();
        for i in sent..sent + n {
            let payload = fixed
                .as_deref()
                .unwrap_or(SENTENCES[(i % SENTENCES.len() as u64) as usize]);
            pipe.cmd("XADD")
                .arg(&args.key)
                .arg("*")
                .arg("payload")
                .arg(payload)
                .ignore();
        }
        if let Err(e) = pipe.query::<()>(&mut conn) {
            eprintln!(
                "error: XADD to {} failed after {sent} entries: {e}",
                args.key
            );
            return ExitCode::from(1);
        }
        sent += n;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "Appended {sent} entries to {} in {secs:.2} s ({:.0} entries/s).",
        args.key,
        sent as f64 / secs.max(1e-9)
    );
    ExitCode::SUCCESS
}
