//! Every Topology.toml shipped in the repository, and every TOML example in
//! the book, parses, passes the checks against the word-count package, and
//! its [source.config] is a valid mock source configuration. Every shipped
//! source configuration survives the merge of `[source.config]` over it,
//! and a package binary reports a bad file's problems all at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tempest::config::ConfigFile;
use tempest_examples::wordcount::{self, Totals};
use tempest_source::{AckPolicy, Source};
use tempest_source_mock::{MockConfig, MockSource};
use tempest_source_redis::{
    PendingAction, RedisListConfig, RedisListSource, RedisStreamConfig, RedisStreamSource,
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn files_named(dir: &Path, name: &str, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let skip = path
            .file_name()
            .is_some_and(|n| n == "target" || n == ".git" || n == "book");
        if path.is_dir() && !skip {
            files_named(&path, name, out);
        } else if path.file_name().is_some_and(|n| n == name) {
            out.push(path);
        }
    }
}

fn toml_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start()) {
            (None, l) if l.starts_with("```toml") => current = Some(String::new()),
            (Some(_), l) if l.starts_with("```") => blocks.extend(current.take()),
            (Some(b), _) => {
                b.push_str(line);
                b.push('\n');
            }
            _ => {}
        }
    }
    blocks
}

fn check(label: &str, file: ConfigFile) {
    let totals = Arc::new(Totals::default());
    let dag = wordcount::pipeline(&totals).build().unwrap();
    file.check(&dag).unwrap_or_else(|e| panic!("{label}: {e}"));
    if !file.has_source_config() {
        return;
    }
    // [source.config] must be valid for one of the shipped sources.
    let errors = [
        fits::<MockSource>(&file),
        fits::<RedisStreamSource>(&file),
        fits::<RedisListSource>(&file),
    ];
    if errors.iter().all(Option::is_some) {
        let errors: Vec<String> = errors.into_iter().flatten().collect();
        panic!(
            "{label}: [source.config] fits no shipped source:\n{}",
            errors.join("\n")
        );
    }
}

/// `None` if `[source.config]` builds an `S`, else why not.
fn fits<S: Source>(file: &ConfigFile) -> Option<String> {
    match file.source_config::<S::Config>() {
        Ok(Some(c)) => S::from_config(c).err().map(|e| e.to_string()),
        Ok(None) => None,
        Err(e) => Some(e.to_string()),
    }
}

#[test]
fn every_shipped_topology_toml_is_valid() {
    let mut files = Vec::new();
    files_named(&repo(), "Topology.toml", &mut files);
    assert!(
        !files.is_empty(),
        "the repository ships at least one Topology.toml"
    );
    for f in files {
        check(&f.display().to_string(), ConfigFile::load(&f).unwrap());
    }
}

#[test]
fn every_toml_example_in_the_book_is_valid() {
    let mut count = 0;
    for entry in std::fs::read_dir(repo().join("book/src")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            for (i, block) in toml_blocks(&std::fs::read_to_string(&path).unwrap())
                .into_iter()
                .enumerate()
            {
                let label = format!("{} block {}", path.display(), i + 1);
                check(
                    &label,
                    ConfigFile::parse(&path, block).unwrap_or_else(|e| panic!("{label}: {e}")),
                );
                count += 1;
            }
        }
    }
    assert!(count > 0, "the book has TOML examples");
}

#[test]
fn the_examples_file_configures_the_word_count_package() {
    let f = ConfigFile::load(&repo().join("examples/Topology.toml")).unwrap();
    let totals = Arc::new(Totals::default());
    let t = wordcount::topology(10, &totals)
        .config_file(f)
        .build()
        .unwrap();
    let dag = t.dag();
    let (words, count) = (
        dag.index_of("words").unwrap(),
        dag.index_of("count").unwrap(),
    );
    assert_eq!(t.workers()[count as usize], 2);
    assert_eq!(dag.grouping(words, count), tempest::Grouping::Key);
    assert_eq!(t.name(), "wordcount");
}

/// `config`, through the runtime's merge with an empty `[source.config]`:
/// written as a TOML table and read back.
fn round_trip<C: Serialize + DeserializeOwned + Debug + PartialEq + Clone>(config: C) {
    let file = ConfigFile::parse(Path::new("Topology.toml"), "[source.config]\n".into()).unwrap();
    let back = file
        .source_config_over(config.clone())
        .unwrap_or_else(|e| panic!("{config:?}: {e}"));
    assert_eq!(back, config);
}

#[test]
fn every_shipped_source_config_round_trips_through_the_merge() {
    round_trip(MockConfig::default());
    round_trip(MockConfig {
        payloads: vec!["a".into(), "b c".into()],
        redeliver_after_ms: Some(5),
        max_deliveries: Some(2),
        open: true,
        ack_policy: AckPolicy::Individual,
        ..MockConfig::generator(10, 8)
    });
    round_trip(MockConfig {
        ack_policy: AckPolicy::None,
        ..MockConfig::default()
    });
    let stream = RedisStreamConfig::new("redis://127.0.0.1:6379", "jobs", "workers");
    round_trip(stream.clone());
    for action in [
        PendingAction::Claim,
        PendingAction::Ack,
        PendingAction::Delete,
    ] {
        round_trip(
            stream
                .clone()
                .consumer("c1")
                .dead_letter("jobs:dlq")
                .on_pending(action)
                .ack_policy(AckPolicy::Individual),
        );
    }
    let list = RedisListConfig::new("redis://127.0.0.1:6379", "jobs");
    round_trip(list.clone());
    round_trip(list.consumer("c1").dead_letter("jobs:dlq"));
}

/// Issue 10: the compiled `uri` and `key` vanished when the file set only
/// `count`.
#[test]
fn source_config_keeps_the_compiled_keys_it_does_not_set() {
    let file = ConfigFile::parse(
        Path::new("Topology.toml"),
        "[source.config]\ncount = 5\nack_policy = { batch = 10 }\n".into(),
    )
    .unwrap();
    let compiled = RedisStreamConfig::new("redis://db:6379", "jobs", "workers").consumer("c1");
    let merged = file.source_config_over(compiled.clone()).unwrap();
    assert_eq!(
        merged,
        compiled.count(5usize).ack_policy(AckPolicy::Batch(10))
    );
}

/// Issue 10: a package binary given a Topology.toml with two unknown keys
/// and a bad value reported only the first, and some problems twice.
#[test]
fn a_package_reports_every_problem_of_its_file_once_with_its_line() {
    let dir = std::env::temp_dir().join(format!("tempest-configs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("Topology.toml");
    std::fs::write(
        &path,
        r#"name = "wordcount"
max_pendng = 100
failure_policy = "retry"
max_pending = 0

[source.config]
cont = 10

[[task]]
name = "words"
workrs = 2
"#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wordcount"))
        .current_dir(&dir)
        .arg("--config")
        .arg(&path)
        .arg("standalone")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let file = path.display().to_string();
    for (line, key, what) in [
        (2, "max_pendng", "unknown key; did you mean max_pending?"),
        (3, "failure_policy", "write failure_policy = { retry = 3 }"),
        (4, "max_pending", "must be at least 1"),
        (7, "source.config.cont", "unknown key; did you mean count?"),
        (11, "task.workrs", "unknown key; did you mean workers?"),
    ] {
        let at = format!("{file}:{line}: {key}: ");
        let hits: Vec<&str> = stderr.lines().filter(|l| l.contains(&at)).collect();
        assert_eq!(hits.len(), 1, "{at} once in:\n{stderr}");
        assert!(hits[0].contains(what), "{at}{what} in:\n{stderr}");
    }
    assert!(
        stderr.starts_with(&format!("error: 5 problems in {file}:\n")),
        "{stderr}"
    );
    // Every problem once: no other line names the file or repeats one.
    assert_eq!(stderr.matches(&file).count(), 6, "{stderr}");
}

/// `concurrency` is for async tasks: on a sync task of the package it is
/// an error naming the file, line and key; `--concurrency` likewise.
#[test]
fn concurrency_on_a_sync_task_is_an_error_with_its_line() {
    let dir = std::env::temp_dir().join(format!("tempest-concurrency-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("Topology.toml");
    std::fs::write(
        &path,
        "name = \"wordcount\"\n\n[[task]]\nname = \"words\"\nconcurrency = 8\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_wordcount"))
            .current_dir(&dir)
            .args(args)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8(out.stderr).unwrap())
    };
    let config = path.display().to_string();
    let (code, stderr) = run(&["--config", &config, "standalone"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{config}:5: task.concurrency: task \"words\" is a sync task; only async tasks take a concurrency"
        )),
        "{stderr}"
    );
    std::fs::write(&path, "name = \"wordcount\"\n").unwrap();
    let (code, stderr) = run(&[
        "--config",
        &config,
        "standalone",
        "--concurrency",
        "words=4",
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("\"words\", a sync task"), "{stderr}");
    let (code, stderr) = run(&["--config", &config, "standalone", "--concurrency", "words"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("TASK=COUNT"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
