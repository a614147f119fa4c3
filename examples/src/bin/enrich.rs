//! The enrichment topology as a package binary: `enrich standalone`,
//! `enrich topology`, `enrich task profile`, ...
//!
//! - `PROFILES_URL`: the profile service (`http://host:port`). Unset, the
//!   process starts one of its own on loopback (`PROFILES_DELAY_MS`, default
//!   2, is its answer time), so the example runs with no service around.
//! - `ENRICH_CLICKS`: how many clicks the mock source generates (default
//!   100,000).
//!
//! `count` prints `count: COUNTRY=clicks/points ...` when it stops.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tempest_examples::enrich::{self, Counts};
use tempest_examples::profiles::ProfileService;

fn number(var: &str, default: u64) -> Result<u64, String> {
    match std::env::var(var) {
        Err(_) => Ok(default),
        Ok(v) => v
            .replace('_', "")
            .parse()
            .map_err(|_| format!("{var} must be a whole number, got \"{v}\"")),
    }
}

fn main() -> ExitCode {
    let (clicks, delay) = match (
        number("ENRICH_CLICKS", 100_000),
        number("PROFILES_DELAY_MS", 2),
    ) {
        (Ok(c), Ok(d)) => (c, d),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // Kept alive until the topology stops.
    let mut own_service = None;
    let url = match std::env::var("PROFILES_URL") {
        Ok(url) => url,
        Err(_) => match ProfileService::start(Duration::from_millis(delay), 64) {
            Ok(service) => {
                let url = service.url();
                own_service = Some(service);
                url
            }
            Err(e) => {
                eprintln!("error: starting the built-in profile service: {e}");
                return ExitCode::from(1);
            }
        },
    };
    let counts = Arc::new(Counts::default());
    let code = tempest::rt::run(enrich::topology(clicks, &url, &counts));
    drop(own_service);
    code
}
