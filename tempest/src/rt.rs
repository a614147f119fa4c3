//! The entry point of a topology package: `rt::run(builder)` parses the
//! package's command line and runs the topology in the mode it names.
//!
//! ```no_run
//! # use tempest::{Msg, Output, Pipeline, Task, TaskResult, TopologyBuilder};
//! # use tempest_source_mock::{MockConfig, MockSource};
//! # #[derive(Clone)] struct Echo;
//! # impl Task for Echo {
//! #     fn name(&self) -> &str { "echo" }
//! #     fn handle(&mut self, msg: Msg) -> TaskResult { Ok(Output::One(msg)) }
//! # }
//! fn main() -> std::process::ExitCode {
//!     tempest::rt::run(
//!         TopologyBuilder::new("echo")
//!             .source_config::<MockSource>(MockConfig::generator(1_000, 100))
//!             .pipeline(Pipeline::new().task(Echo)),
//!     )
//! }
//! ```
//!
//! Subcommands: `standalone` runs the whole topology in this process;
//! `graph --format dot|mermaid` prints the pipeline. Exit codes: 0 after a
//! clean stop, 2 for a usage or configuration error, 1 for a runtime
//! failure.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::actors::StopReason;
use crate::error::Error;
use crate::standalone::{self, RunOptions, RuntimeHandle};
use crate::topology::TopologyBuilder;

#[derive(Debug, Parser)]
#[command(version, about = "Runs this Tempest topology package.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the whole topology in this process: the source, the pipeline
    /// and every task, with in-memory queues.
    Standalone(StandaloneArgs),
    /// Prints the pipeline as a graph.
    Graph {
        /// The graph's format.
        #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
        format: GraphFormat,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum GraphFormat {
    Dot,
    Mermaid,
}

#[derive(Debug, Args)]
struct StandaloneArgs {
    /// The most source messages in flight at once.
    #[arg(long, env = "TEMPEST_MAX_PENDING")]
    max_pending: Option<usize>,
    /// How long one attempt of a message may take, in milliseconds.
    #[arg(long, env = "TEMPEST_MSG_TIMEOUT_MS")]
    msg_timeout_ms: Option<u64>,
    /// How long in-flight messages may take to finish on shutdown, in
    /// milliseconds.
    #[arg(long, env = "TEMPEST_GRACEFUL_SHUTDOWN_MS")]
    graceful_shutdown_ms: Option<u64>,
    /// Workers (threads) for a task, as TASK=COUNT; repeatable.
    #[arg(long = "workers", value_parser = parse_workers)]
    workers: Vec<(String, usize)>,
    /// Stop after this many seconds.
    #[arg(long)]
    run_for_secs: Option<u64>,
}

fn parse_workers(s: &str) -> Result<(String, usize), String> {
    let (task, count) = s
        .split_once('=')
        .ok_or_else(|| format!("expected TASK=COUNT, got \"{s}\""))?;
    let count = count
        .parse()
        .map_err(|_| format!("\"{count}\" in \"{s}\" is not a worker count"))?;
    Ok((task.to_string(), count))
}

/// Parses the command line and runs `builder`'s topology accordingly.
/// Call it from the package's `main` and return its exit code.
pub fn run(builder: TopologyBuilder) -> ExitCode {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .try_init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match execute(builder, cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            if e.is_usage() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

fn execute(mut builder: TopologyBuilder, command: Command) -> Result<ExitCode, Error> {
    match command {
        Command::Graph { format } => {
            let dag = builder.current_pipeline().build()?;
            match format {
                GraphFormat::Dot => print!("{}", dag.to_dot(builder.name())),
                GraphFormat::Mermaid => print!("{}", dag.to_mermaid()),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Standalone(args) => {
            if let Some(n) = args.max_pending {
                builder = builder.max_pending(n);
            }
            if let Some(ms) = args.msg_timeout_ms {
                builder = builder.msg_timeout(Duration::from_millis(ms));
            }
            if let Some(ms) = args.graceful_shutdown_ms {
                builder = builder.graceful_shutdown(Duration::from_millis(ms));
            }
            for (task, count) in args.workers {
                builder = builder.workers(task, count);
            }
            let topology = builder.build()?;
            let handle = RuntimeHandle::new();
            install_signal_handlers(&handle)?;
            let report = standalone::run(
                topology,
                RunOptions {
                    deadline: args.run_for_secs.map(Duration::from_secs),
                    handle: Some(handle),
                    ..RunOptions::default()
                },
            )?;
            let s = &report.stats;
            log::info!(
                "Topology {} stopped ({}): {} read, {} acked, {} failed, {} timed out, {} left in flight, in {:.2} s ({:.0} acked/s).",
                report.name,
                report.stop,
                s.read,
                s.acked,
                s.failed,
                s.timed_out,
                s.inflight,
                report.elapsed.as_secs_f64(),
                report.acked_per_sec()
            );
            Ok(match report.stop {
                StopReason::SourceFailed(_) => ExitCode::from(1),
                _ => ExitCode::SUCCESS,
            })
        }
    }
}

/// SIGINT/SIGTERM: the first stops the topology gracefully, a second exits
/// at once.
fn install_signal_handlers(handle: &RuntimeHandle) -> Result<(), Error> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).map_err(|e| Error::Io {
            what: "installing the signal handlers".into(),
            source: e,
        })?;
    let handle = handle.clone();
    std::thread::Builder::new()
        .name("tempest-signals".into())
        .spawn(move || {
            let mut seen = 0;
            for signal in signals.forever() {
                seen += 1;
                if seen == 1 {
                    log::info!("Signal {signal} received: stopping gracefully; send it again to exit at once.");
                    handle.shutdown();
                } else {
                    log::warn!("Second signal {signal}: exiting at once.");
                    std::process::exit(130);
                }
            }
        })
        .map(|_| ())
        .map_err(|e| Error::Io {
            what: "starting the signal thread".into(),
            source: e,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_parse_as_task_equals_count() {
        assert_eq!(parse_workers("split=3"), Ok(("split".into(), 3)));
        assert!(parse_workers("split").unwrap_err().contains("TASK=COUNT"));
        assert!(parse_workers("split=x")
            .unwrap_err()
            .contains("not a worker count"));
    }

    #[test]
    fn the_cli_parses() {
        let cli = Cli::try_parse_from([
            "pkg",
            "standalone",
            "--max-pending",
            "10",
            "--workers",
            "a=2",
        ])
        .unwrap();
        match cli.command {
            Command::Standalone(a) => {
                assert_eq!(a.max_pending, Some(10));
                assert_eq!(a.workers, vec![("a".into(), 2)]);
            }
            Command::Graph { .. } => panic!("wrong subcommand"),
        }
        assert!(Cli::try_parse_from(["pkg", "graph", "--format", "png"]).is_err());
    }
}
