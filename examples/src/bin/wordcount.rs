//! The word-count topology as a package binary: `wordcount standalone`,
//! `wordcount graph --format mermaid`, ...
//!
//! `WORDCOUNT_SENTENCES` sets how many sentences the mock source generates
//! (default 1,000,000).

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
    tempest::rt::run(wordcount::topology(count, &totals))
}
