//! `tempest`: runs a topology package in each of its modes.
//!
//! A topology package is a Cargo binary whose `main` calls
//! `tempest::rt::run(builder)`. `tempest standalone|topology|task NAME|graph`
//! builds it with Cargo (release profile unless `--debug`) and replaces
//! itself with `PKG MODE ARGS...`, so signals reach the topology directly.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "tempest", version, about = "Runs Tempest topology packages.")]
struct Cli {
    #[command(flatten)]
    package: PackageArgs,
    #[command(subcommand)]
    command: Mode,
}

#[derive(Debug, Args)]
struct PackageArgs {
    /// The package's Cargo.toml (default: the one Cargo finds from here).
    #[arg(long, global = true, value_name = "PATH")]
    manifest_path: Option<PathBuf>,
    /// The package to run, in a workspace.
    #[arg(short = 'p', long, global = true, value_name = "SPEC")]
    package: Option<String>,
    /// The binary to run, when the package has several.
    #[arg(long, global = true, value_name = "NAME")]
    bin: Option<String>,
    /// Build without optimizations.
    #[arg(long, global = true)]
    debug: bool,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Runs the whole topology in one process.
    Standalone {
        /// Passed on to the package: see `tempest standalone -- --help`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Runs the source and the pipeline, serving task workers over TCP.
    Topology {
        /// Passed on to the package, e.g. `--port 9311 --secret S`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Runs workers of one task, connected to the topology process.
    Task {
        /// The task's name and options passed on to the package, e.g.
        /// `words --workers 2 --topology host:9311`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        args: Vec<OsString>,
    },
    /// Prints the package's pipeline as a graph (DOT or Mermaid).
    Graph {
        /// Passed on to the package, e.g. `--format mermaid`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

impl Mode {
    fn split(&self) -> (&'static str, &[OsString]) {
        match self {
            Mode::Standalone { args } => ("standalone", args),
            Mode::Topology { args } => ("topology", args),
            Mode::Task { args } => ("task", args),
            Mode::Graph { args } => ("graph", args),
        }
    }
}

/// The `cargo run` command that builds the package and runs it in `mode`.
fn cargo_command(package: &PackageArgs, mode: &Mode) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("run").arg("--quiet");
    if !package.debug {
        cmd.arg("--release");
    }
    if let Some(path) = &package.manifest_path {
        cmd.arg("--manifest-path").arg(path);
    }
    if let Some(p) = &package.package {
        cmd.args(["--package", p]);
    }
    if let Some(b) = &package.bin {
        cmd.args(["--bin", b]);
    }
    let (sub, args) = mode.split();
    cmd.arg("--").arg(sub).args(args);
    cmd
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut cmd = cargo_command(&cli.package, &cli.command);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt as _;
        let err = cmd.exec();
        Err(err).context("could not run cargo to build and start the package")
    }
    #[cfg(not(unix))]
    {
        let status = cmd
            .status()
            .context("could not run cargo to build and start the package")?;
        Ok(ExitCode::from(
            status.code().unwrap_or(1).clamp(0, 255) as u8
        ))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args_of(cmd: &Command) -> Vec<String> {
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn standalone_becomes_cargo_run_release() {
        let cli = Cli::try_parse_from([
            "tempest",
            "--manifest-path",
            "pkg/Cargo.toml",
            "--bin",
            "wc",
            "standalone",
            "--max-pending",
            "10",
        ])
        .unwrap();
        assert_eq!(
            args_of(&cargo_command(&cli.package, &cli.command)),
            [
                "run",
                "--quiet",
                "--release",
                "--manifest-path",
                "pkg/Cargo.toml",
                "--bin",
                "wc",
                "--",
                "standalone",
                "--max-pending",
                "10"
            ]
        );
    }

    #[test]
    fn graph_in_debug_for_a_workspace_member() {
        let cli = Cli::try_parse_from(["tempest", "graph", "-p", "x", "--debug"]).unwrap();
        let args = args_of(&cargo_command(&cli.package, &cli.command));
        assert_eq!(args, ["run", "--quiet", "--package", "x", "--", "graph"]);
    }

    #[test]
    fn topology_and_task_pass_everything_on() {
        let cli =
            Cli::try_parse_from(["tempest", "--bin", "wc", "task", "words", "--workers", "2"])
                .unwrap();
        let args = args_of(&cargo_command(&cli.package, &cli.command));
        assert_eq!(
            &args[args.len() - 5..],
            ["--", "task", "words", "--workers", "2"]
        );
        let cli = Cli::try_parse_from(["tempest", "topology", "--port", "0"]).unwrap();
        let args = args_of(&cargo_command(&cli.package, &cli.command));
        assert_eq!(&args[args.len() - 4..], ["--", "topology", "--port", "0"]);
        assert!(
            Cli::try_parse_from(["tempest", "task"]).is_err(),
            "task needs a name"
        );
    }

    #[test]
    fn unknown_modes_are_usage_errors() {
        assert!(Cli::try_parse_from(["tempest", "launch"]).is_err());
    }
}
