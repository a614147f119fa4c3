//! `tempest-bench`: runs Tempest's benchmark scenarios.
//!
//! `cargo run --release -p tempest-bench -- all --out BENCHMARKS.md` runs
//! every scenario (each measurement in a child process of its own) and
//! writes the report; `--smoke` runs each briefly, checking only that every
//! message is acked.

use std::fmt::Write as _;
use std::process::{Command, ExitCode};

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use tempest_bench::wordcount_bench::{run_wordcount, WordcountMeasured, WordcountParams};
use tempest_bench::{
    channel_baseline, memory_probe, run_async, run_scenario, run_spread, AsyncMeasured,
    AsyncParams, Measured, Params, Shape, SpreadMeasured, SpreadParams,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "tempest-bench", about = "Runs Tempest's benchmark scenarios.")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Runs every scenario and writes the Markdown report.
    All {
        /// Where to write the report (default: print it).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// Runs each scenario for a moment only, checking correctness.
        #[arg(long)]
        smoke: bool,
        /// Interleaved rounds of the throughput scenarios (medians reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// One run of one shape, printed as JSON.
    Run(RunArgs),
    /// The channel baseline, printed as JSON.
    Baseline {
        /// Messages to pass.
        #[arg(long, default_value_t = 10_000_000)]
        messages: u64,
    },
    /// Resident memory with N messages held in flight, in KiB.
    Memory {
        /// Messages to hold in flight (and max_pending).
        #[arg(long, default_value_t = 1_000_000)]
        inflight: usize,
    },
    /// The linear topology distributed: one topology process and one task
    /// process per task on loopback.
    Distributed {
        /// Source messages.
        #[arg(long, default_value_t = 2_000_000)]
        messages: u64,
        /// Pace the source to this many messages per second.
        #[arg(long)]
        rate: Option<f64>,
    },
    /// One burst through a task that waits per message (sleeps, as on I/O)
    /// with 1, 2 and 4 workers: wall time to ack all, msgs/s, the speed-up
    /// vs 1 worker and the largest share one worker took; one JSON line
    /// per worker count (each run in a child process).
    Spread {
        /// Messages in the burst, all polled at once.
        #[arg(long, default_value_t = 2_000)]
        messages: u64,
        /// Microseconds the task sleeps per message.
        #[arg(long, default_value_t = 1_000)]
        sleep_us: u64,
        /// Workers of the task, one row each (comma-separated).
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2, 4])]
        workers: Vec<usize>,
        /// Interleaved rounds (medians reported).
        #[arg(long, default_value_t = 1)]
        rounds: usize,
    },
    /// One burst through an async task whose calls each await (a timer, as
    /// on I/O), with one worker keeping `concurrency` in flight: msgs/s
    /// against the ceiling of concurrency / await time; one JSON line.
    Async {
        /// Messages in the burst, all polled at once.
        #[arg(long, default_value_t = 20_000)]
        messages: u64,
        /// Microseconds each call awaits.
        #[arg(long, default_value_t = 10_000)]
        sleep_us: u64,
        /// Messages the one worker keeps in flight.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
    },
    /// Word count with keyed state: split (10 words a sentence) -> count,
    /// by key or shuffled, state in memory or checkpointed to Redis; one
    /// JSON line.
    Wordcount {
        /// Sentences.
        #[arg(long, default_value_t = 300_000)]
        sentences: u64,
        /// The grouping of split -> count: key or shuffle.
        #[arg(long, default_value = "key")]
        grouping: String,
        /// Workers of count.
        #[arg(long, default_value_t = 2)]
        counters: usize,
        /// Checkpoint the counts to Redis (TEMPEST_REDIS_URL, else a
        /// redis-server started on a free port).
        #[arg(long)]
        redis: bool,
        /// Apply each update at most once (needs --redis).
        #[arg(long, requires = "redis")]
        at_most_once: bool,
    },
    /// A Redis stream of 100-byte entries consumed by the linear topology,
    /// beside a raw XREADGROUP + XACK loop on the same server.
    Redis {
        /// Entries per run.
        #[arg(long, default_value_t = 1_000_000)]
        messages: u64,
        /// Interleaved rounds.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
    },
    /// Runs one measurement from JSON parameters (used by `all`).
    #[command(hide = true)]
    Child {
        /// The JSON-encoded parameters.
        params: String,
    },
    /// Runs the benchmark topology as a package (used by `distributed`).
    #[command(hide = true)]
    Pkg {
        /// The package's command line.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// linear, diamond or fan-out.
    #[arg(value_parser = parse_shape)]
    shape: Shape,
    /// Source messages.
    #[arg(long, default_value_t = 3_000_000)]
    messages: u64,
    /// Payload bytes.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Allocate every payload (as a real source does).
    #[arg(long)]
    copy: bool,
    /// Workers per task.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Pace the source to this many messages per second.
    #[arg(long)]
    rate: Option<f64>,
    /// The bound on messages in flight.
    #[arg(long, default_value_t = 16_384)]
    max_pending: usize,
}

fn parse_shape(s: &str) -> Result<Shape, String> {
    match s {
        "linear" => Ok(Shape::Linear),
        "diamond" => Ok(Shape::Diamond),
        "fan-out" | "fanout" => Ok(Shape::FanOut),
        _ => Err(format!("unknown shape \"{s}\": linear, diamond or fan-out")),
    }
}

/// What a child measures.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum Job {
    Scenario(Params),
    Baseline { messages: u64 },
    Memory { inflight: usize },
    Spread(SpreadParams),
    Async(AsyncParams),
    Wordcount(WordcountParams),
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum JobResult {
    Scenario(Measured),
    Spread(SpreadMeasured),
    Async(AsyncMeasured),
    Wordcount(WordcountMeasured),
    Baseline { rate: f64, peak_rss_kib: u64 },
    Memory { rss_kib: u64 },
}

fn run_job(job: &Job) -> anyhow::Result<JobResult> {
    Ok(match job {
        Job::Scenario(p) => JobResult::Scenario(run_scenario(p)?),
        Job::Baseline { messages } => JobResult::Baseline {
            rate: channel_baseline(*messages, 100),
            peak_rss_kib: tempest_bench::rss_kib().1,
        },
        Job::Memory { inflight } => JobResult::Memory {
            rss_kib: memory_probe(*inflight)?,
        },
        Job::Spread(p) => JobResult::Spread(run_spread(p)?),
        Job::Async(p) => JobResult::Async(run_async(p)?),
        Job::Wordcount(p) => JobResult::Wordcount(run_wordcount(p)?),
    })
}

/// Runs `job` in a child process of this binary.
fn in_child(job: &Job) -> anyhow::Result<JobResult> {
    let exe = std::env::current_exe().context("finding this binary")?;
    let out = Command::new(exe)
        .arg("child")
        .arg(serde_json::to_string(job)?)
        .env("RUST_LOG", "warn")
        .output()
        .context("starting a benchmark child process")?;
    if !out.status.success() {
        bail!(
            "benchmark child {job:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim())
        .with_context(|| format!("reading the child's result {line:?}"))
}

fn scenario(p: Params) -> anyhow::Result<Measured> {
    match in_child(&Job::Scenario(p))? {
        JobResult::Scenario(m) => Ok(m),
        other => bail!("unexpected child result {other:?}"),
    }
}

/// One row of the spread scenario: the medians of its rounds.
#[derive(Debug, serde::Serialize)]
struct SpreadRow {
    workers: usize,
    messages: u64,
    sleep_us: u64,
    /// Median seconds from the burst's poll to its last ack.
    wall_s: f64,
    /// Messages over the median wall time.
    rate: f64,
    /// The 1-worker median wall time over this one (if 1 worker was run).
    speedup: Option<f64>,
    /// The median of the largest share of the burst one worker took.
    max_share: f64,
    /// Messages per worker in the round closest to the median.
    per_worker: Vec<u64>,
    all_acked: bool,
    /// Each round's wall time.
    wall_s_rounds: Vec<f64>,
}

/// Runs the spread scenario: `rounds` interleaved rounds of one burst per
/// worker count, each in a child process.
fn spread(
    messages: u64,
    sleep_us: u64,
    workers: &[usize],
    rounds: usize,
) -> anyhow::Result<Vec<SpreadRow>> {
    let rounds = rounds.max(1);
    let mut runs: Vec<Vec<SpreadMeasured>> = vec![Vec::new(); workers.len()];
    for round in 0..rounds {
        for (i, &w) in workers.iter().enumerate() {
            eprintln!(
                "round {}/{rounds}: spread, {messages} messages, {w} workers",
                round + 1
            );
            let p = SpreadParams {
                messages,
                sleep_us,
                workers: w.max(1),
            };
            match in_child(&Job::Spread(p))? {
                JobResult::Spread(m) => runs[i].push(m),
                other => bail!("unexpected child result {other:?}"),
            }
        }
    }
    let mut rows: Vec<SpreadRow> = workers
        .iter()
        .zip(runs)
        .map(|(&w, ms)| {
            let wall = median(ms.iter().map(|m| m.wall_s).collect());
            let closest = ms
                .iter()
                .min_by(|a, b| (a.wall_s - wall).abs().total_cmp(&(b.wall_s - wall).abs()))
                .cloned()
                .unwrap_or_default();
            SpreadRow {
                workers: w,
                messages,
                sleep_us,
                wall_s: wall,
                rate: messages as f64 / wall.max(1e-9),
                speedup: None,
                max_share: median(ms.iter().map(|m| m.max_share).collect()),
                per_worker: closest.per_worker,
                all_acked: ms.iter().all(|m| m.all_acked),
                wall_s_rounds: ms.iter().map(|m| m.wall_s).collect(),
            }
        })
        .collect();
    if let Some(one) = rows.iter().find(|r| r.workers == 1).map(|r| r.wall_s) {
        for r in &mut rows {
            r.speedup = Some(one / r.wall_s.max(1e-9));
        }
    }
    Ok(rows)
}

/// What a distributed run measured, and the topology process's bytes read
/// and written per message.
struct Distributed {
    m: Measured,
    wire_bytes_per_msg: f64,
}

/// Bytes sent over the loopback interface so far (Linux `/proc/net/dev`).
fn loopback_bytes() -> u64 {
    std::fs::read_to_string("/proc/net/dev")
        .ok()
        .and_then(|dev| {
            dev.lines()
                .find(|l| l.trim_start().starts_with("lo:"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|rest| rest.split_whitespace().nth(8))
                .and_then(|tx| tx.parse().ok())
        })
        .unwrap_or(0)
}

/// Runs the linear topology as 1 topology process + 1 task process per
/// task on loopback; every process is this binary running `pkg`.
fn distributed(messages: u64, rate: Option<f64>, warmup_s: f64) -> anyhow::Result<Distributed> {
    use std::io::BufRead as _;
    let exe = std::env::current_exe().context("finding this binary")?;
    let dir = std::env::temp_dir().join(format!(
        "tempest-bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("Topology.toml");
    let rate_line = rate.map(|r| format!("rate = {r:.1}\n")).unwrap_or_default();
    std::fs::write(
        &config,
        format!(
            "failure_policy = \"none\"\nmsg_timeout = 600000\nmax_pending = 16384\n\n[source.config]\nmessages = {messages}\npayload = 100\ncopy = false\ntrack = true\nwarmup_s = {warmup_s:.1}\nreport = true\n{rate_line}"
        ),
    )?;
    let cfg = config.to_string_lossy().to_string();
    let lo_before = loopback_bytes();
    let mut topology = Command::new(&exe)
        .args(["pkg", "--config", &cfg, "topology", "--port", "0"])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting the topology process")?;
    let stderr = topology.stderr.take().context("the topology's stderr")?;
    let mut lines = std::io::BufReader::new(stderr).lines();
    let mut addr = None;
    for line in lines.by_ref() {
        let line = line?;
        if let Some(rest) = line.split("Listening for task workers on ").nth(1) {
            addr = rest.split([' ', ';']).next().map(str::to_string);
            break;
        }
    }
    let addr = addr.context("the topology process never listened")?;
    std::thread::spawn(move || lines.for_each(drop));
    let mut workers = Vec::new();
    for task in ["a", "b", "c"] {
        workers.push(
            Command::new(&exe)
                // Task workers outlive the topology (and reconnect) unless
                // told to stop with it: without this the run never ends.
                .args([
                    "pkg",
                    "--config",
                    &cfg,
                    "task",
                    task,
                    "--topology",
                    &addr,
                    "--exit-with-topology",
                ])
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("starting a task process")?,
        );
    }
    let out = topology
        .wait_with_output()
        .context("waiting for the topology")?;
    for mut w in workers {
        let _ = w.wait();
    }
    let lo_bytes = loopback_bytes().saturating_sub(lo_before);
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() {
        bail!("the topology process failed: {:?}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("no report from the topology process in {text:?}"))?;
    let m: Measured = serde_json::from_str(line)?;
    Ok(Distributed {
        wire_bytes_per_msg: lo_bytes as f64 / messages.max(1) as f64,
        m,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

struct Row {
    name: String,
    command: String,
    m: Measured,
    ratio: Option<f64>,
}

fn fmt_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2} M/s", r / 1e6)
    } else {
        format!("{:.0} k/s", r / 1e3)
    }
}

fn fmt_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map(|k| format!("{:.0} GiB", k as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown memory".into());
    format!("{cores} cores ({cpu}), {mem}")
}

fn commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn all(smoke: bool, rounds: usize) -> anyhow::Result<String> {
    let rounds = if smoke { 1 } else { rounds.max(1) };
    let big = |n: u64| if smoke { 20_000 } else { n };
    let warmup_s = if smoke { 0.0 } else { 0.5 };
    let new = |shape: Shape, n: u64| Params {
        warmup_s,
        ..Params::new(shape, n)
    };
    let cmd = |args: &str| format!("`cargo run --release -p tempest-bench -- {args}`");
    let mut failures = Vec::new();

    // Throughput: interleaved rounds of the baseline and each shape.
    let shapes = [
        (Shape::Linear, "linear", 3_000_000u64),
        (Shape::Diamond, "diamond", 2_000_000),
        (Shape::FanOut, "fan-out", 1_000_000),
    ];
    let base_msgs = big(10_000_000);
    let mut base_rates = Vec::new();
    let mut base_rss = 0;
    let mut runs: Vec<Vec<Measured>> = vec![Vec::new(); shapes.len()];
    let dist_msgs = 2_000_000u64;
    let mut dist_runs: Vec<Distributed> = Vec::new();
    for round in 0..rounds {
        eprintln!("round {}/{rounds}: baseline", round + 1);
        match in_child(&Job::Baseline {
            messages: base_msgs,
        })? {
            JobResult::Baseline { rate, peak_rss_kib } => {
                base_rates.push(rate);
                base_rss = base_rss.max(peak_rss_kib);
            }
            other => bail!("unexpected child result {other:?}"),
        }
        for (i, (shape, name, n)) in shapes.iter().enumerate() {
            eprintln!("round {}/{rounds}: {name}", round + 1);
            runs[i].push(scenario(new(*shape, big(*n)))?);
        }
        eprintln!("round {}/{rounds}: distributed", round + 1);
        dist_runs.push(distributed(big(dist_msgs), None, warmup_s)?);
    }
    let base = median(base_rates.clone());
    let mut rows = vec![Row {
        name: "baseline: 3 threads, bounded channels, batches of 1,024".into(),
        command: cmd(&format!("baseline --messages {base_msgs}")),
        m: Measured {
            rate: base,
            peak_rss_kib: base_rss,
            all_acked: true,
            ..Measured::default()
        },
        ratio: Some(1.0),
    }];
    let mut linear_rate = 0.0;
    for ((shape, name, n), ms) in shapes.iter().zip(runs) {
        let rate = median(ms.iter().map(|m| m.rate).collect());
        let mut m = ms
            .iter()
            .min_by(|a, b| (a.rate - rate).abs().total_cmp(&(b.rate - rate).abs()))
            .cloned()
            .unwrap_or_default();
        m.all_acked = ms.iter().all(|m| m.all_acked);
        m.rate = rate;
        if *shape == Shape::Linear {
            linear_rate = rate;
        }
        rows.push(Row {
            name: format!("{name} ({} task messages per source message)", shape.hops()),
            command: cmd(&format!("run {name} --messages {}", big(*n))),
            ratio: Some(rate / base),
            m,
        });
    }

    // Latency at half the linear maximum: the median of `rounds` runs.
    let half = (linear_rate / 2.0).max(1000.0);
    let secs = if smoke { 1.0 } else { 5.0 };
    // Tail latency swings most on a shared host: more rounds.
    let lat_rounds = if smoke { 1 } else { rounds.max(5) };
    let mut lats = Vec::new();
    for round in 0..lat_rounds {
        eprintln!(
            "round {}/{lat_rounds}: latency at {half:.0} msgs/s",
            round + 1
        );
        lats.push(scenario(Params {
            rate: Some(half),
            ..new(Shape::Linear, (half * secs) as u64)
        })?);
    }
    let lat = Measured {
        acked: lats.iter().map(|m| m.acked).sum(),
        all_acked: lats.iter().all(|m| m.all_acked),
        rate: median(lats.iter().map(|m| m.rate).collect()),
        p50_us: median(lats.iter().map(|m| m.p50_us).collect()),
        p99_us: median(lats.iter().map(|m| m.p99_us).collect()),
        p999_us: median(lats.iter().map(|m| m.p999_us).collect()),
        max_us: lats.iter().map(|m| m.max_us).fold(0.0, f64::max),
        peak_rss_kib: lats.iter().map(|m| m.peak_rss_kib).max().unwrap_or(0),
        ..Measured::default()
    };
    rows.push(Row {
        name: format!(
            "latency: linear at 50% load ({}; median of {lat_rounds} runs, max of all)",
            fmt_rate(half)
        ),
        command: cmd(&format!(
            "run linear --rate {half:.0} --messages {}",
            (half * secs) as u64
        )),
        ratio: None,
        m: lat.clone(),
    });

    // Distributed: the median of the rounds, then latency at half its rate.
    let dist_rate = median(dist_runs.iter().map(|d| d.m.rate).collect());
    let dist_wire = median(dist_runs.iter().map(|d| d.wire_bytes_per_msg).collect());
    let dist_all_acked = dist_runs.iter().all(|d| d.m.all_acked);
    let dist_p99_full = median(dist_runs.iter().map(|d| d.m.p99_us).collect());
    let dist_half = (dist_rate / 2.0).max(1000.0);
    let mut dist_lats = Vec::new();
    for round in 0..lat_rounds {
        eprintln!(
            "round {}/{lat_rounds}: distributed latency at {dist_half:.0} msgs/s",
            round + 1
        );
        dist_lats.push(distributed(
            (dist_half * secs) as u64,
            Some(dist_half),
            warmup_s,
        )?);
    }
    let dist_p50 = median(dist_lats.iter().map(|d| d.m.p50_us).collect());
    let dist_p99 = median(dist_lats.iter().map(|d| d.m.p99_us).collect());
    let dist_lat_acked = dist_lats.iter().all(|d| d.m.all_acked);

    // Redis: the topology beside a raw XREADGROUP + XACK loop.
    let redis_msgs = big(1_000_000);
    let (redis_raw, redis_top) = tempest_bench::redis_bench::compare(redis_msgs, rounds)?;
    let (redis_raw, redis_top) = (median(redis_raw), median(redis_top));

    // Scaling: workers per task and payload sizes (payloads allocated per message).
    let mut scaling = Vec::new();
    for (payload, n) in [
        (100usize, 4_000_000u64),
        (1024, 3_000_000),
        (65_536, 200_000),
    ] {
        for workers in [1usize, 2, 4] {
            eprintln!("scaling: {payload} B, {workers} workers per task");
            let p = Params {
                payload,
                copy_payloads: true,
                workers,
                warmup_s: warmup_s.min(0.2),
                ..new(Shape::Linear, big(n))
            };
            let m = scenario(p)?;
            scaling.push((payload, workers, big(n), m));
        }
    }

    // Scaling an I/O-bound task: one burst through a task that sleeps.
    let (spread_msgs, spread_sleep_us) = (if smoke { 200 } else { 2_000 }, 1_000u64);
    let spread_rows = spread(spread_msgs, spread_sleep_us, &[1, 2, 4], rounds)?;

    // An async task: one worker, many calls awaiting at once.
    let async_p = AsyncParams {
        messages: if smoke { 2_000 } else { 20_000 },
        sleep_us: 10_000,
        concurrency: 256,
    };
    let mut async_runs = Vec::new();
    for round in 0..rounds {
        eprintln!("round {}/{rounds}: async, concurrency 256", round + 1);
        match in_child(&Job::Async(async_p.clone()))? {
            JobResult::Async(m) => async_runs.push(m),
            other => bail!("unexpected child result {other:?}"),
        }
    }
    let async_rate = median(async_runs.iter().map(|m| m.rate).collect());
    let async_high = async_runs.iter().map(|m| m.high_water).min().unwrap_or(0);
    let async_ceiling = async_runs.first().map_or(0.0, |m| m.ceiling);
    if !async_runs.iter().all(|m| m.all_acked) {
        failures.push("async: not every message acked".to_string());
    }

    // Word count with keyed state: key vs shuffle, memory vs Redis.
    let wc_sentences = if smoke { 2_000 } else { 300_000 };
    let wc_server = tempest_bench::redis_bench::RedisServer::shared()?;
    // (grouping, state in Redis, updates applied at most once)
    let wc_cases: [(&str, bool, bool); 4] = [
        ("shuffle", false, false),
        ("key", false, false),
        ("key", true, false),
        ("key", true, true),
    ];
    let mut wc_runs: Vec<Vec<WordcountMeasured>> = vec![Vec::new(); wc_cases.len()];
    for round in 0..rounds {
        for (i, (grouping, redis, once)) in wc_cases.iter().enumerate() {
            eprintln!(
                "round {}/{rounds}: word count, {grouping}, state in {}",
                round + 1,
                wc_state(*redis, *once)
            );
            match in_child(&Job::Wordcount(WordcountParams {
                sentences: wc_sentences,
                grouping: grouping.to_string(),
                counters: 2,
                redis: redis.then(|| wc_server.url.clone()),
                at_most_once: *once,
            }))? {
                JobResult::Wordcount(m) => wc_runs[i].push(m),
                other => bail!("unexpected child result {other:?}"),
            }
        }
    }
    if !wc_runs.iter().flatten().all(|m| m.all_acked) {
        failures.push("word count: not every sentence acked".to_string());
    }

    // Memory per message in flight.
    let (hi, lo) = if smoke {
        (20_000, 1_000)
    } else {
        (1_000_000, 1_000)
    };
    eprintln!("memory: {hi} and {lo} in flight");
    let rss = |n: usize| -> anyhow::Result<u64> {
        match in_child(&Job::Memory { inflight: n })? {
            JobResult::Memory { rss_kib } => Ok(rss_kib),
            other => bail!("unexpected child result {other:?}"),
        }
    };
    let (rss_hi, rss_lo) = (rss(hi)?, rss(lo)?);
    let per_msg = (rss_hi.saturating_sub(rss_lo)) as f64 * 1024.0 / (hi - lo) as f64;

    // Soak: is RSS flat between 10 s and 60 s? RSS is sampled every 5 s;
    // each end is the lower of its two samples, so a transient peak of the
    // allocator does not pass for growth (a leak raises the minimum too).
    let (t1, t2) = if smoke { (0.5, 1.0) } else { (10.0, 60.0) };
    let step = if smoke { 0.25 } else { 5.0 };
    let times: Vec<f64> = (0..)
        .map(|i| t1 + step * i as f64)
        .take_while(|t| *t <= t2 + 1e-9)
        .collect();
    eprintln!("soak: RSS from {t1} s to {t2} s");
    let soak = scenario(Params {
        track: false,
        duration_s: Some(t2 + 0.5),
        rss_at_secs: times.clone(),
        ..Params::new(Shape::Linear, u64::MAX / 4)
    })?;
    let rss_at = |t: f64| {
        soak.rss_samples
            .iter()
            .find(|(s, _)| (*s - t).abs() < 1e-6)
            .map(|(_, r)| *r)
            .unwrap_or(0)
    };
    let soak1 = rss_at(t1).min(rss_at(t1 + step));
    let soak2 = rss_at(t2).min(rss_at(t2 - step));
    let growth = soak2 as f64 / soak1.max(1) as f64 - 1.0;

    // Correctness.
    for r in &rows {
        if !r.m.all_acked {
            failures.push(format!(
                "{}: not every message was acked exactly once",
                r.name
            ));
        }
    }
    for (payload, workers, _, m) in &scaling {
        if !m.all_acked {
            failures.push(format!(
                "scaling {payload} B × {workers}: not every message acked"
            ));
        }
    }
    for r in &spread_rows {
        if !r.all_acked {
            failures.push(format!(
                "spread with {} workers: not every message acked",
                r.workers
            ));
        }
    }
    if !(dist_all_acked && dist_lat_acked) {
        failures.push("distributed: not every message was acked exactly once".into());
    }
    if !soak.all_acked {
        failures.push("soak: acks do not match reads".into());
    }

    // The report.
    let mut md = String::new();
    writeln!(md, "# Benchmarks\n")?;
    writeln!(
        md,
        "Generated by `cargo run --release -p tempest-bench -- all --out BENCHMARKS.md`{}; do not edit by hand.\n",
        if smoke { " (SMOKE MODE: tiny runs, numbers meaningless)" } else { "" }
    )?;
    writeln!(md, "- Machine: {}", machine())?;
    writeln!(
        md,
        "- Date: {}",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    )?;
    writeln!(md, "- Commit: {}", commit())?;
    writeln!(
        md,
        "- Method: every measurement runs in a fresh child process; throughput figures are the median of {rounds} interleaved round(s) with the baseline; payloads are 100 bytes shared by reference unless stated; every message is acked at the source (batched acks), end-to-end latency is source poll → source ack, leaving out messages polled in the first {warmup_s} s (start-up).\n"
    )?;
    writeln!(md, "## Throughput and latency\n")?;
    writeln!(md, "| scenario | acked msgs/s | vs baseline | p50 | p99 | p99.9 | max | peak RSS | all acked | command |")?;
    writeln!(
        md,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )?;
    for r in &rows {
        let lat = |v: f64| {
            if r.m.p50_us > 0.0 {
                fmt_us(v)
            } else {
                "–".into()
            }
        };
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} MiB | {} | {} |",
            r.name,
            fmt_rate(r.m.rate),
            r.ratio
                .map(|x| format!("{:.0}%", x * 100.0))
                .unwrap_or_else(|| "–".into()),
            lat(r.m.p50_us),
            lat(r.m.p99_us),
            lat(r.m.p999_us),
            lat(r.m.max_us),
            r.m.peak_rss_kib / 1024,
            if r.m.all_acked { "yes" } else { "NO" },
            r.command
        )?;
    }
    writeln!(md, "\n## Scaling: workers per task and payload size (linear, payloads allocated per message)\n")?;
    writeln!(md, "| payload | workers per task | acked msgs/s | MiB/s of payload | p99 | peak RSS | all acked | command |")?;
    writeln!(md, "| --- | --- | --- | --- | --- | --- | --- | --- |")?;
    for (payload, workers, n, m) in &scaling {
        writeln!(
            md,
            "| {payload} B | {workers} | {} | {:.0} | {} | {} MiB | {} | {} |",
            fmt_rate(m.rate),
            m.rate * *payload as f64 / 1024.0 / 1024.0,
            if m.p50_us > 0.0 {
                fmt_us(m.p99_us)
            } else {
                "–".into()
            },
            m.peak_rss_kib / 1024,
            if m.all_acked { "yes" } else { "NO" },
            cmd(&format!(
                "run linear --payload {payload} --copy --workers {workers} --messages {n}"
            ))
        )?;
    }
    writeln!(
        md,
        "\n## Scaling an I/O-bound task: workers per task, one burst\n"
    )?;
    writeln!(
        md,
        "{spread_msgs} messages polled at once (one poll) through a one-task pipeline whose task sleeps {spread_sleep_us} µs per message (waiting, as on I/O: the speed-up does not depend on the cores); wall time from the burst's poll to its last ack, median of {rounds} interleaved round(s). The largest share is of the task messages one worker handled (`RunReport.stats.per_worker`).\n"
    )?;
    writeln!(md, "| workers per task | wall time to ack all | acked msgs/s | speed-up vs 1 worker | largest share one worker took | all acked | command |")?;
    writeln!(md, "| --- | --- | --- | --- | --- | --- | --- |")?;
    for r in &spread_rows {
        writeln!(
            md,
            "| {} | {:.2} s | {:.0} | {} | {:.0}% | {} | {} |",
            r.workers,
            r.wall_s,
            r.rate,
            r.speedup
                .map(|x| format!("{x:.2}×"))
                .unwrap_or_else(|| "–".into()),
            r.max_share * 100.0,
            if r.all_acked { "yes" } else { "NO" },
            cmd(&format!(
                "spread --messages {spread_msgs} --sleep-us {spread_sleep_us} --workers {}",
                r.workers
            ))
        )?;
    }
    writeln!(md, "\n## An async task: one worker, many calls in flight\n")?;
    writeln!(
        md,
        "{} messages polled at once through a one-task pipeline whose async task awaits {} ms per call (`tokio::time::sleep`), one worker with concurrency {}: the most it can do is concurrency / await time. Median of {rounds} round(s); the high-water mark is the worker's own `tempest.task.in_progress_max`.\n",
        async_p.messages,
        async_p.sleep_us / 1000,
        async_p.concurrency
    )?;
    writeln!(md, "| acked msgs/s | ceiling | share of the ceiling | most in progress | all acked | command |")?;
    writeln!(md, "| --- | --- | --- | --- | --- | --- |")?;
    writeln!(
        md,
        "| {} | {} | {:.0}% | {} | {} | {} |",
        fmt_rate(async_rate),
        fmt_rate(async_ceiling),
        async_rate / async_ceiling.max(1e-9) * 100.0,
        async_high,
        if async_runs.iter().all(|m| m.all_acked) {
            "yes"
        } else {
            "NO"
        },
        cmd(&format!(
            "async --messages {} --sleep-us {} --concurrency {}",
            async_p.messages, async_p.sleep_us, async_p.concurrency
        ))
    )?;
    writeln!(
        md,
        "\n## Word count with keyed state: groupings and state backends\n"
    )?;
    writeln!(
        md,
        "`split` makes each of {wc_sentences} sentences into 10 words (a vocabulary of 1,000), each a message keyed by the word; `count`, 2 workers, adds 1 to the word's entry in a `KeyedState<u64>`. The `split -> count` edge shuffles or groups by key; the state is in memory or checkpointed to Redis every second (answers wait for the checkpoint), with or without updates applied at most once. Median of {rounds} interleaved round(s).\n"
    )?;
    writeln!(md, "| grouping | state | words counted/s | sentences acked/s | vs shuffle, in memory | all acked | command |")?;
    writeln!(md, "| --- | --- | --- | --- | --- | --- | --- |")?;
    let wc_rate = |i: usize| median(wc_runs[i].iter().map(|m| m.words_per_s).collect());
    for (i, (grouping, redis, once)) in wc_cases.iter().enumerate() {
        writeln!(
            md,
            "| {grouping} | {} | {} | {} | {:.0}% | {} | {} |",
            wc_state(*redis, *once),
            fmt_rate(wc_rate(i)),
            fmt_rate(median(
                wc_runs[i].iter().map(|m| m.sentences_per_s).collect()
            )),
            wc_rate(i) / wc_rate(0).max(1.0) * 100.0,
            if wc_runs[i].iter().all(|m| m.all_acked) {
                "yes"
            } else {
                "NO"
            },
            cmd(&format!(
                "wordcount --sentences {wc_sentences} --grouping {grouping}{}{}",
                if *redis { " --redis" } else { "" },
                if *once { " --at-most-once" } else { "" }
            ))
        )?;
    }
    writeln!(
        md,
        "\nWith updates applied at most once the word count ran at {:.0}% of the plain Redis backend's rate in the same run (it adds a record per message to each checkpoint and a removal per sentence after its ack; the benchmark's source counts deliveries, so no message is looked up).",
        wc_rate(3) / wc_rate(2).max(1.0) * 100.0
    )?;
    writeln!(
        md,
        "\n## Distributed: 1 topology process + 1 task process per task, loopback TCP\n"
    )?;
    writeln!(md, "| measure | value | command |")?;
    writeln!(md, "| --- | --- | --- |")?;
    writeln!(
        md,
        "| linear, acked msgs/s (median of {rounds}) | {} ({:.0}% of standalone linear in the same run) | {} |",
        fmt_rate(dist_rate),
        dist_rate / linear_rate.max(1.0) * 100.0,
        cmd(&format!("distributed --messages {}", big(dist_msgs)))
    )?;
    writeln!(
        md,
        "| p99 at full load | {} | (same runs) |",
        fmt_us(dist_p99_full)
    )?;
    writeln!(
        md,
        "| latency at 50% load ({}; median of {lat_rounds} runs): p50 / p99 | {} / {} | {} |",
        fmt_rate(dist_half),
        fmt_us(dist_p50),
        fmt_us(dist_p99),
        cmd(&format!(
            "distributed --rate {dist_half:.0} --messages {}",
            (dist_half * secs) as u64
        ))
    )?;
    writeln!(
        md,
        "| bytes on the wire per message (loopback, TCP/IP headers included, 100-byte payloads, 3 hops) | {dist_wire:.0} | (same runs) |"
    )?;
    writeln!(
        md,
        "| all acked | {} | |",
        if dist_all_acked && dist_lat_acked {
            "yes"
        } else {
            "NO"
        }
    )?;
    writeln!(md, "\n## Redis Streams: {redis_msgs} entries of 100 bytes, standalone linear topology, batched acks\n")?;
    writeln!(md, "| measure | entries/s | command |")?;
    writeln!(md, "| --- | --- | --- |")?;
    writeln!(
        md,
        "| raw loop: XREADGROUP COUNT 1000 + XACK per batch (median of {rounds}) | {} | {} |",
        fmt_rate(redis_raw),
        cmd(&format!("redis --messages {redis_msgs} --rounds {rounds}"))
    )?;
    writeln!(
        md,
        "| the topology, every entry acked, XPENDING 0 at the end (median of {rounds}) | {} ({:.0}% of the raw loop) | (same) |",
        fmt_rate(redis_top),
        redis_top / redis_raw.max(1.0) * 100.0
    )?;
    writeln!(md, "\n## Memory\n")?;
    writeln!(md, "| measure | value | command |")?;
    writeln!(md, "| --- | --- | --- |")?;
    writeln!(
        md,
        "| runtime memory per in-flight message (RSS with {hi} in flight − RSS with {lo}) / {} | {per_msg:.0} bytes | {} and {} |",
        hi - lo,
        cmd(&format!("memory --inflight {hi}")),
        cmd(&format!("memory --inflight {lo}"))
    )?;
    writeln!(
        md,
        "| RSS of an endless linear run near {t1} s and near {t2} s (lower of two samples 5 s apart) | {:.1} MiB → {:.1} MiB ({:+.1}%) | `tempest-bench all` (soak step) |",
        soak1 as f64 / 1024.0,
        soak2 as f64 / 1024.0,
        growth * 100.0
    )?;
    if !smoke {
        writeln!(md, "\n## Targets\n")?;
        writeln!(md, "| target | measured | met |")?;
        writeln!(md, "| --- | --- | --- |")?;
        let diamond = rows
            .iter()
            .find(|r| r.name.starts_with("diamond"))
            .map(|r| r.m.rate)
            .unwrap_or(0.0);
        let targets = [
            (
                "linear ≥ 1,000,000 msgs/s acked",
                fmt_rate(linear_rate),
                linear_rate >= 1e6,
            ),
            (
                "diamond ≥ 500,000 msgs/s",
                fmt_rate(diamond),
                diamond >= 5e5,
            ),
            (
                "≤ 256 bytes per in-flight message",
                format!("{per_msg:.0} bytes"),
                per_msg <= 256.0,
            ),
            (
                "RSS flat (within 10%) from 10 s to 60 s",
                format!("{:+.1}%", growth * 100.0),
                growth.abs() <= 0.10,
            ),
            (
                "p99 ≤ 10 ms at 50% load",
                fmt_us(lat.p99_us),
                lat.p99_us <= 10_000.0,
            ),
            (
                "Redis topology ≥ 80% of the raw XREADGROUP + XACK loop",
                format!("{:.0}%", redis_top / redis_raw.max(1.0) * 100.0),
                redis_top >= 0.8 * redis_raw,
            ),
            (
                "distributed linear ≥ 300,000 msgs/s",
                fmt_rate(dist_rate),
                dist_rate >= 3e5,
            ),
            (
                "distributed p99 ≤ 20 ms at 50% load",
                fmt_us(dist_p99),
                dist_p99 <= 20_000.0,
            ),
        ];
        for (t, m, ok) in targets {
            writeln!(md, "| {t} | {m} | {} |", if ok { "yes" } else { "NO" })?;
        }
    }
    if !failures.is_empty() {
        bail!("correctness failures:\n{}\n\n{md}", failures.join("\n"));
    }
    Ok(md)
}

fn print_json(r: &JobResult) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(r)?);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::All { out, smoke, rounds } => all(smoke, rounds).and_then(|md| match out {
            Some(path) => {
                std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))
            }
            None => {
                print!("{md}");
                Ok(())
            }
        }),
        Cmd::Run(a) => {
            let p = Params {
                payload: a.payload,
                copy_payloads: a.copy,
                workers: a.workers,
                rate: a.rate,
                max_pending: a.max_pending,
                ..Params::new(a.shape, a.messages)
            };
            run_job(&Job::Scenario(p)).and_then(|r| print_json(&r))
        }
        Cmd::Baseline { messages } => {
            run_job(&Job::Baseline { messages }).and_then(|r| print_json(&r))
        }
        Cmd::Memory { inflight } => run_job(&Job::Memory { inflight }).and_then(|r| print_json(&r)),
        Cmd::Pkg { args } => {
            let args = std::iter::once(std::ffi::OsString::from("tempest-bench pkg")).chain(args);
            return tempest::rt::run_from(tempest_bench::package(), args);
        }
        Cmd::Distributed { messages, rate } => distributed(messages, rate, 0.5).map(|d| {
            println!(
                "{{\"distributed\":{},\"wire_bytes_per_msg\":{:.1}}}",
                serde_json::to_string(&d.m).unwrap_or_default(),
                d.wire_bytes_per_msg
            );
        }),
        Cmd::Async {
            messages,
            sleep_us,
            concurrency,
        } => in_child(&Job::Async(AsyncParams {
            messages,
            sleep_us,
            concurrency,
        }))
        .and_then(|r| print_json(&r)),
        Cmd::Wordcount {
            sentences,
            grouping,
            counters,
            redis,
            at_most_once,
        } => (|| {
            let server = if redis {
                Some(tempest_bench::redis_bench::RedisServer::shared()?)
            } else {
                None
            };
            in_child(&Job::Wordcount(WordcountParams {
                sentences,
                grouping,
                counters,
                redis: server.as_ref().map(|s| s.url.clone()),
                at_most_once,
            }))
        })()
        .and_then(|r| print_json(&r)),
        Cmd::Spread {
            messages,
            sleep_us,
            workers,
            rounds,
        } => spread(messages, sleep_us, &workers, rounds).and_then(|rows| {
            for r in rows {
                println!("{}", serde_json::to_string(&r)?);
            }
            Ok(())
        }),
        Cmd::Redis { messages, rounds } => {
            tempest_bench::redis_bench::compare(messages, rounds.max(1)).map(|(raw, top)| {
                println!(
                    "{{\"raw\":{:.0},\"topology\":{:.0},\"ratio\":{:.3}}}",
                    median(raw.clone()),
                    median(top.clone()),
                    median(top) / median(raw).max(1.0)
                );
            })
        }
        Cmd::Child { params } => serde_json::from_str::<Job>(&params)
            .context("reading the job")
            .and_then(|job| run_job(&job))
            .and_then(|r| print_json(&r)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The state column of a word-count row.
fn wc_state(redis: bool, at_most_once: bool) -> &'static str {
    match (redis, at_most_once) {
        (false, _) => "memory",
        (true, false) => "Redis",
        (true, true) => "Redis, updates at most once",
    }
}
