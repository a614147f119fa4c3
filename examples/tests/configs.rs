//! Every Topology.toml shipped in the repository, and every TOML example in
//! the book, parses, passes the checks against the word-count package, and
//! its [source.config] is a valid mock source configuration.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tempest::config::ConfigFile;
use tempest_examples::wordcount::{self, Totals};
use tempest_source::Source;
use tempest_source_mock::MockSource;
use tempest_source_redis::{RedisListSource, RedisStreamSource};

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
    let words = t.dag().index_of("words").unwrap() as usize;
    assert_eq!(t.workers()[words], 2);
    assert_eq!(t.name(), "wordcount");
}
