//! The entry point of a topology package: `rt::run(builder)` parses the
//! package's command line and runs the topology in the mode it names.
//!
//! ```no_run
//! # use tempest::{Msg, MsgCtx, Output, Pipeline, Task, TaskResult, TopologyBuilder};
//! # use tempest_source_mock::{MockConfig, MockSource};
//! # #[derive(Clone)] struct Echo;
//! # impl Task for Echo {
//! #     fn name(&self) -> &str { "echo" }
//! #     fn handle(&mut self, msg: Msg, _: &MsgCtx) -> TaskResult { Ok(Output::One(msg)) }
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
//! `topology` runs the source and the pipeline and serves task workers over
//! TCP; `task NAME` runs workers of one task that connect to it; `graph`
//! prints the pipeline. Settings come from the builder, then `Topology.toml`
//! (`--config`, or `./Topology.toml` when present), then `TEMPEST_*`
//! environment variables, then flags.
//!
//! Exit codes:
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | stopped cleanly, no message given up on |
//! | 1 | a runtime failure: the source failed, the process could not start (among them a port already in use, and a source still unreachable when `source_connect_timeout` runs out) |
//! | 2 | a usage or configuration error |
//! | 3 | stopped cleanly, but messages were given up on: failed or timed out under the failure policy, or acked after a failure under `BestEffort` (the log's WARN lines name the tasks, reasons and message ids) |

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::actors::StopReason;
use crate::config::ConfigFile;
use crate::error::Error;
use crate::standalone::{self, RunOptions, RunReport, RuntimeHandle, ServeOptions, WorkerOptions};
use crate::topology::TopologyBuilder;
use crate::wire;

/// The port a topology process listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 9311;

#[derive(Debug, Parser)]
#[command(version, about = "Runs this Tempest topology package.")]
struct Cli {
    /// The topology's settings file (default: ./Topology.toml if present).
    #[arg(long, global = true, env = "TEMPEST_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the whole topology in this process: the source, the pipeline
    /// and every task, with in-memory queues.
    Standalone {
        #[command(flatten)]
        delivery: DeliveryArgs,
        /// Workers (threads) for a task, as TASK=COUNT; repeatable.
        #[arg(long = "workers", value_parser = parse_workers, value_name = "TASK=COUNT")]
        workers: Vec<(String, usize)>,
        /// Messages each worker of an async task keeps in flight, as
        /// TASK=COUNT; repeatable.
        #[arg(long = "concurrency", value_parser = parse_concurrency, value_name = "TASK=COUNT")]
        concurrency: Vec<(String, usize)>,
        /// The most messages one fetch takes, for every task.
        #[arg(long, env = "TEMPEST_POLL_COUNT")]
        poll_count: Option<usize>,
        /// Stop gracefully after this many seconds.
        #[arg(long)]
        run_for_secs: Option<u64>,
    },
    /// Runs the source and the pipeline, and serves task workers over TCP.
    Topology {
        #[command(flatten)]
        delivery: DeliveryArgs,
        #[command(flatten)]
        net: NetArgs,
        /// The address to listen on (default 127.0.0.1).
        #[arg(long, env = "TEMPEST_HOST")]
        host: Option<String>,
        /// The port to listen on (default 9311; 0 picks a free one).
        #[arg(long, env = "TEMPEST_PORT")]
        port: Option<u16>,
        /// Listen beyond loopback without a secret (anyone who can reach
        /// the port can join).
        #[arg(long)]
        insecure: bool,
        /// The most connections in the handshake at once (default 64); the
        /// topology closes any more at once.
        #[arg(long, env = "TEMPEST_MAX_HANDSHAKES")]
        max_handshakes: Option<usize>,
        /// Stop gracefully after this many seconds.
        #[arg(long)]
        run_for_secs: Option<u64>,
    },
    /// Runs workers of one task, connected to the topology process.
    Task {
        /// The task to run.
        name: String,
        #[command(flatten)]
        net: NetArgs,
        /// The topology process, as HOST:PORT (default: host and port from
        /// the settings).
        #[arg(long, env = "TEMPEST_TOPOLOGY", value_name = "HOST:PORT")]
        topology: Option<String>,
        /// Workers (connections, each with its own thread) in this process.
        #[arg(long, env = "TEMPEST_WORKERS")]
        workers: Option<usize>,
        /// For an async task: messages each worker keeps in flight.
        #[arg(long, env = "TEMPEST_CONCURRENCY")]
        concurrency: Option<usize>,
        /// The most messages one fetch takes.
        #[arg(long, env = "TEMPEST_POLL_COUNT")]
        poll_count: Option<usize>,
        /// The first wait before reconnecting, in milliseconds.
        #[arg(long, env = "TEMPEST_POLL_INTERVAL_MS")]
        poll_interval_ms: Option<u64>,
        /// The longest wait before reconnecting, in milliseconds.
        #[arg(long, env = "TEMPEST_MAX_BACKOFF_MS")]
        max_backoff_ms: Option<u64>,
        /// Stop when the topology stops (it says it is shutting down),
        /// instead of reconnecting until a topology is back. The variable
        /// takes true/false, 1/0, yes/no or on/off.
        #[arg(long, env = "TEMPEST_EXIT_WITH_TOPOLOGY", value_parser = clap::builder::BoolishValueParser::new())]
        exit_with_topology: bool,
    },
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
struct DeliveryArgs {
    /// The most source messages in flight at once.
    #[arg(long, env = "TEMPEST_MAX_PENDING")]
    max_pending: Option<usize>,
    /// How long one attempt of a message may take, in milliseconds (0: no
    /// limit).
    #[arg(long, env = "TEMPEST_MSG_TIMEOUT_MS")]
    msg_timeout_ms: Option<u64>,
    /// How long in-flight messages may take to finish on shutdown, in
    /// milliseconds.
    #[arg(long, env = "TEMPEST_GRACEFUL_SHUTDOWN_MS")]
    graceful_shutdown_ms: Option<u64>,
    /// How long the source may stay unreachable at start before the
    /// topology gives up, in milliseconds (0: retry forever).
    #[arg(long, env = "TEMPEST_SOURCE_CONNECT_TIMEOUT_MS")]
    source_connect_timeout_ms: Option<u64>,
}

#[derive(Debug, Args)]
struct NetArgs {
    /// The shared secret of the topology and its workers.
    #[arg(long, env = "TEMPEST_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// The largest frame after the handshake, in bytes.
    #[arg(long, env = "TEMPEST_MAX_FRAME")]
    max_frame: Option<usize>,
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

fn parse_concurrency(s: &str) -> Result<(String, usize), String> {
    let (task, count) = s
        .split_once('=')
        .ok_or_else(|| format!("expected TASK=COUNT, got \"{s}\""))?;
    let count = count.parse().map_err(|_| {
        format!("\"{count}\" in \"{s}\" is not a concurrency (a count of messages)")
    })?;
    Ok((task.to_string(), count))
}

/// Parses the command line and runs `builder`'s topology accordingly.
/// Call it from the package's `main` and return its exit code.
pub fn run(builder: TopologyBuilder) -> ExitCode {
    run_from(builder, std::env::args_os())
}

/// [`run`] with explicit arguments (the first is the program's name).
pub fn run_from<I, T>(builder: TopologyBuilder, args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .try_init();
    let tasks: Vec<String> = builder
        .current_pipeline()
        .task_names()
        .map(String::from)
        .collect();
    let command = Cli::command().mut_subcommand("task", |c| {
        c.mut_arg("name", |a| {
            a.value_parser(clap::builder::PossibleValuesParser::new(tasks.clone()))
                .help(format!("The task to run: one of {}.", tasks.join(", ")))
        })
    });
    let cli = match command
        .try_get_matches_from(args)
        .and_then(|m| Cli::from_arg_matches(&m))
    {
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
    match execute(builder, cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{}", report(&e));
            if e.is_usage() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// `error: ..` and each cause the message does not already include, so
/// nothing is printed twice.
fn report(e: &Error) -> String {
    let mut out = format!("error: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !out.contains(&cause_text) {
            out.push_str(&format!("\n  caused by: {cause_text}"));
        }
        source = cause.source();
    }
    out
}

/// The settings file, read leniently: its problems are reported with the
/// rest when the topology is built, all at once.
fn config_file(explicit: Option<&Path>) -> Result<Option<ConfigFile>, Error> {
    match explicit {
        Some(path) => ConfigFile::load_lenient(path).map(Some),
        None => {
            let default = Path::new("Topology.toml");
            if default.is_file() {
                log::info!("Reading settings from ./Topology.toml.");
                ConfigFile::load_lenient(default).map(Some)
            } else {
                Ok(None)
            }
        }
    }
}

fn apply_delivery(mut builder: TopologyBuilder, d: &DeliveryArgs) -> TopologyBuilder {
    if let Some(n) = d.max_pending {
        builder = builder.max_pending(n);
    }
    match d.msg_timeout_ms {
        Some(0) => builder = builder.no_msg_timeout(),
        Some(ms) => builder = builder.msg_timeout(Duration::from_millis(ms)),
        None => {}
    }
    if let Some(ms) = d.graceful_shutdown_ms {
        builder = builder.graceful_shutdown(Duration::from_millis(ms));
    }
    match d.source_connect_timeout_ms {
        Some(0) => builder = builder.no_source_connect_timeout(),
        Some(ms) => builder = builder.source_connect_timeout(Duration::from_millis(ms)),
        None => {}
    }
    builder
}

fn usage(topology: &str, problem: String) -> Error {
    Error::Topology {
        topology: topology.to_string(),
        problems: vec![problem],
    }
}

fn execute(mut builder: TopologyBuilder, cli: Cli) -> Result<ExitCode, Error> {
    if let Command::Graph { format } = cli.command {
        let dag = builder.current_pipeline().build()?;
        match format {
            GraphFormat::Dot => print!("{}", dag.to_dot(builder.name())),
            GraphFormat::Mermaid => print!("{}", dag.to_mermaid()),
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(file) = config_file(cli.config.as_deref())? {
        builder = builder.config_file(file);
    }
    let file = builder
        .current_file()
        .map(|f| f.config.clone())
        .unwrap_or_default();
    let secret = |net: &NetArgs| {
        net.secret
            .clone()
            .or_else(|| file.secret.clone())
            .filter(|s| !s.is_empty())
            .map(String::into_bytes)
    };
    let max_frame = |net: &NetArgs| {
        net.max_frame
            .or(file.max_frame)
            .unwrap_or(wire::DEFAULT_MAX_FRAME)
    };
    let handle = RuntimeHandle::new();
    match cli.command {
        Command::Graph { .. } => Ok(ExitCode::SUCCESS),
        Command::Standalone {
            delivery,
            workers,
            concurrency,
            poll_count,
            run_for_secs,
        } => {
            builder = apply_delivery(builder, &delivery);
            if let Some(n) = poll_count {
                builder = builder.task_batch(n);
            }
            for (task, count) in workers {
                builder = builder.workers(task, count);
            }
            for (task, n) in concurrency {
                builder = builder.concurrency(task, n);
            }
            let topology = builder.build()?;
            serve_until_stopped(topology, handle, run_for_secs, None)
        }
        Command::Topology {
            delivery,
            net,
            host,
            port,
            insecure,
            max_handshakes,
            run_for_secs,
        } => {
            builder = apply_delivery(builder, &delivery);
            let topology = builder.build()?;
            let host = host
                .or_else(|| file.host.clone())
                .unwrap_or_else(|| "127.0.0.1".to_string());
            let port = port.or(file.port).unwrap_or(DEFAULT_PORT);
            let bind = (host.as_str(), port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| usage(topology.name(), format!("cannot resolve host \"{host}\"")))?;
            let secret = secret(&net);
            if secret.is_none() && !bind.ip().is_loopback() && !insecure {
                return Err(usage(
                    topology.name(),
                    format!(
                        "no secret is set, so the topology listens on loopback only, not on {bind}: set one (--secret, TEMPEST_SECRET or secret in Topology.toml) or pass --insecure"
                    ),
                ));
            }
            let serve = ServeOptions {
                bind,
                secret,
                max_frame: max_frame(&net),
                heartbeat: Duration::from_millis(file.heartbeat.unwrap_or(1000).max(1)),
                handshake_timeout: Duration::from_millis(
                    file.handshake_timeout.unwrap_or(5000).max(1),
                ),
                max_handshakes: max_handshakes
                    .or(file.max_handshakes)
                    .unwrap_or(crate::server::DEFAULT_MAX_HANDSHAKES),
            };
            if serve.max_handshakes == 0 {
                return Err(usage(
                    topology.name(),
                    "max_handshakes must be at least 1".into(),
                ));
            }
            serve_until_stopped(topology, handle, run_for_secs, Some(serve))
        }
        Command::Task {
            name,
            net,
            topology: address,
            workers,
            concurrency,
            poll_count,
            poll_interval_ms,
            max_backoff_ms,
            exit_with_topology,
        } => {
            let topology = builder.build()?;
            let section = topology.file().and_then(|f| f.task(&name)).cloned();
            let address = match address {
                Some(a) => a,
                None => {
                    let host = file.host.clone().unwrap_or_else(|| "127.0.0.1".into());
                    let host = match host.parse::<IpAddr>() {
                        Ok(ip) if ip.is_unspecified() => "127.0.0.1".to_string(),
                        _ => host,
                    };
                    format!("{host}:{}", file.port.unwrap_or(DEFAULT_PORT))
                }
            };
            if address.to_socket_addrs().is_err() && address.parse::<SocketAddr>().is_err() {
                log::warn!("Cannot resolve the topology address {address} yet; retrying until it resolves.");
            }
            let idx = topology.dag().index_of(&name).map(usize::from).unwrap_or(0);
            let options = WorkerOptions {
                topology: address,
                secret: secret(&net),
                workers: workers
                    .or(section.as_ref().and_then(|s| s.workers))
                    .unwrap_or(1),
                fetch_max: poll_count.unwrap_or(topology.batches()[idx]),
                backoff: Duration::from_millis(
                    poll_interval_ms
                        .or(section.as_ref().and_then(|s| s.poll_interval))
                        .unwrap_or(100),
                ),
                max_backoff: Duration::from_millis(
                    max_backoff_ms
                        .or(section.as_ref().and_then(|s| s.max_backoff))
                        .unwrap_or(5_000),
                ),
                exit_with_topology: exit_with_topology
                    || section
                        .as_ref()
                        .and_then(|s| s.exit_with_topology)
                        .unwrap_or(false),
                graceful_shutdown: topology.options().graceful_shutdown,
                concurrency,
            };
            if let Some(n) = concurrency {
                let is_async = topology
                    .dag()
                    .index_of(&name)
                    .is_some_and(|t| topology.dag().is_async(t));
                if !is_async {
                    return Err(usage(
                        topology.name(),
                        format!("--concurrency is for async tasks; task \"{name}\" is not one"),
                    ));
                }
                if n == 0 {
                    return Err(usage(
                        topology.name(),
                        "concurrency must be at least 1".into(),
                    ));
                }
            }
            if options.workers == 0 || options.fetch_max == 0 {
                return Err(usage(
                    topology.name(),
                    "workers and poll_count must be at least 1".into(),
                ));
            }
            install_signal_handlers(&handle)?;
            let report = standalone::run_worker(&topology, &name, options, Some(handle))?;
            log::info!(
                "Workers of task {name} stopped after {} session(s).",
                report.sessions
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs the topology (standalone without `serve`, a topology process with
/// it) until it stops; logs the summary.
fn serve_until_stopped(
    topology: crate::topology::Topology,
    handle: RuntimeHandle,
    run_for_secs: Option<u64>,
    serve: Option<ServeOptions>,
) -> Result<ExitCode, Error> {
    install_signal_handlers(&handle)?;
    let report = standalone::run(
        topology,
        RunOptions {
            deadline: run_for_secs.map(Duration::from_secs),
            handle: Some(handle),
            local_workers: serve.is_none(),
            serve,
            ..RunOptions::default()
        },
    )?;
    Ok(summarize(&report))
}

/// The exit code of a run that stopped cleanly but gave messages up.
pub const EXIT_GAVE_UP: u8 = 3;

fn summarize(report: &RunReport) -> ExitCode {
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
    let given_up = s.given_up();
    if given_up > 0 {
        log::warn!(
            "{given_up} message(s) were given up on: {} failed, {} timed out, {} acked after a failure (BestEffort). The warnings above name the tasks, the reasons and message ids; the exit code is {EXIT_GAVE_UP}.",
            s.failed,
            s.timed_out,
            s.acked_after_failure
        );
    }
    exit_code(report)
}

fn exit_code(report: &RunReport) -> ExitCode {
    match report.stop {
        StopReason::SourceFailed(_) => ExitCode::from(1),
        _ if report.stats.given_up() > 0 => ExitCode::from(EXIT_GAVE_UP),
        _ => ExitCode::SUCCESS,
    }
}

/// SIGINT/SIGTERM: the first stops gracefully, a second exits at once.
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
                    log::info!(
                        "Signal {signal} received: stopping gracefully; send it again to exit at once."
                    );
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

    /// Issue 10: a source's configuration error was printed twice, in the
    /// message and again as its cause.
    #[test]
    fn errors_print_each_cause_once() {
        let e = Error::Source {
            name: "mock".into(),
            source: tempest_source::SourceError::config("batch_size must be at least 1"),
        };
        let text = report(&e);
        assert_eq!(
            text.matches("batch_size must be at least 1").count(),
            1,
            "{text}"
        );
        let e = Error::Io {
            what: "binding".into(),
            source: std::io::Error::other("address in use"),
        };
        assert_eq!(report(&e), "error: binding: address in use");
    }

    #[test]
    fn workers_parse_as_task_equals_count() {
        assert_eq!(parse_workers("split=3"), Ok(("split".into(), 3)));
        assert!(parse_workers("split").unwrap_err().contains("TASK=COUNT"));
        assert!(parse_workers("split=x")
            .unwrap_err()
            .contains("not a worker count"));
    }

    #[test]
    fn concurrency_parses_as_task_equals_count() {
        assert_eq!(parse_concurrency("fetch=256"), Ok(("fetch".into(), 256)));
        assert!(parse_concurrency("fetch")
            .unwrap_err()
            .contains("TASK=COUNT"));
        assert!(parse_concurrency("fetch=-1")
            .unwrap_err()
            .contains("not a concurrency"));
        let cli = Cli::try_parse_from(["pkg", "standalone", "--concurrency", "fetch=8"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Standalone { ref concurrency, .. } if concurrency == &[("fetch".to_string(), 8)]
        ));
        let cli = Cli::try_parse_from(["pkg", "task", "fetch", "--concurrency", "32"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Task {
                concurrency: Some(32),
                ..
            }
        ));
        assert!(Cli::try_parse_from(["pkg", "task", "fetch", "--concurrency", "x"]).is_err());
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
            Command::Standalone {
                delivery, workers, ..
            } => {
                assert_eq!(delivery.max_pending, Some(10));
                assert_eq!(workers, vec![("a".into(), 2)]);
            }
            other => panic!("wrong subcommand {other:?}"),
        }
        let cli = Cli::try_parse_from([
            "pkg",
            "--config",
            "x.toml",
            "task",
            "split",
            "--topology",
            "h:1",
        ])
        .unwrap();
        assert_eq!(cli.config, Some(PathBuf::from("x.toml")));
        assert!(matches!(cli.command, Command::Task { ref name, .. } if name == "split"));
        assert!(Cli::try_parse_from(["pkg", "graph", "--format", "png"]).is_err());
        let cli = Cli::try_parse_from(["pkg", "task", "a", "--exit-with-topology"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Task {
                exit_with_topology: true,
                ..
            }
        ));
        let cli = Cli::try_parse_from(["pkg", "topology", "--max-handshakes", "8"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Topology {
                max_handshakes: Some(8),
                ..
            }
        ));
    }
}
