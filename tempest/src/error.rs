//! The runtime's one error type.

use std::fmt;
use std::path::Path;

use tempest_source::SourceError;

use crate::pipeline::PipelineErrors;

/// Everything that can go wrong in the runtime.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The pipeline is invalid; lists every problem.
    #[error(transparent)]
    Pipeline(#[from] PipelineErrors),
    /// The topology's settings are invalid; lists every problem.
    #[error("topology \"{topology}\" is invalid:{}", list(.problems))]
    Topology {
        /// The topology's name.
        topology: String,
        /// Every problem found.
        problems: Vec<String>,
    },
    /// A configuration file is invalid; lists every problem, each with the
    /// file and, where it can, the line and the key.
    #[error("{}", config_problems(file, problems))]
    Config {
        /// The file.
        file: std::path::PathBuf,
        /// Every problem found, in the order of the file's lines.
        problems: Vec<ConfigProblem>,
    },
    /// The source failed in a way the runtime cannot recover from.
    #[error("source \"{name}\" failed: {source}")]
    Source {
        /// The source's name.
        name: String,
        /// What went wrong.
        #[source]
        source: SourceError,
    },
    /// An operating-system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What the runtime was doing.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The runtime itself failed (an actor or a thread went away).
    #[error("runtime failure: {0}")]
    Runtime(String),
}

impl Error {
    /// A configuration error with one problem that belongs to no line (the
    /// file cannot be read, say).
    pub fn config(file: impl Into<std::path::PathBuf>, message: impl Into<String>) -> Self {
        Error::Config {
            file: file.into(),
            problems: vec![ConfigProblem::new(None, None, message)],
        }
    }

    /// Whether the error is the user's to fix (configuration, pipeline):
    /// binaries exit with code 2 for these, 1 for the rest.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Error::Pipeline(_) | Error::Topology { .. } | Error::Config { .. }
        ) || matches!(
            self,
            Error::Source {
                source: SourceError::Config(_),
                ..
            }
        )
    }
}

fn list(problems: &[String]) -> String {
    problems.iter().map(|p| format!("\n  - {p}")).collect()
}

/// One problem: `Topology.toml:4: max_pendng: unknown key; ...`; several:
/// a count, then one problem a line.
fn config_problems(file: &std::path::Path, problems: &[ConfigProblem]) -> String {
    match problems {
        [one] => one.at(file),
        _ => {
            let lines: String = problems
                .iter()
                .map(|p| format!("\n  {}", p.at(file)))
                .collect();
            format!("{} problems in {}:{lines}", problems.len(), file.display())
        }
    }
}

/// One problem in a configuration file: its line (and column, for a syntax
/// error) where known, the key's dotted path where known, and what is
/// wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The line, from 1.
    pub line: Option<usize>,
    /// The column, from 1 (syntax errors only).
    pub column: Option<usize>,
    /// The key's dotted path, as `source.config.count`.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl ConfigProblem {
    /// A problem at `line` with `key`.
    pub fn new(line: Option<usize>, key: Option<String>, message: impl Into<String>) -> Self {
        ConfigProblem {
            line,
            column: None,
            key,
            message: message.into(),
        }
    }

    /// The problem as one line: `Topology.toml:4: max_pendng: unknown key`.
    pub fn at(&self, file: &Path) -> String {
        let mut s = file.display().to_string();
        if let Some(line) = self.line {
            s.push_str(&format!(":{line}"));
            if let Some(column) = self.column {
                s.push_str(&format!(":{column}"));
            }
        }
        s.push_str(": ");
        if let Some(key) = &self.key {
            s.push_str(key);
            s.push_str(": ");
        }
        s.push_str(&self.message);
        s
    }
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, &self.key) {
            (Some(line), Some(key)) => write!(f, "line {line}: {key}: {}", self.message),
            (Some(line), None) => write!(f, "line {line}: {}", self.message),
            (None, Some(key)) => write!(f, "{key}: {}", self.message),
            (None, None) => f.write_str(&self.message),
        }
    }
}
