//! The module layering ARCHITECTURE.md promises, checked on the sources:
//! what each module may import from the rest of the crate.

use std::collections::BTreeSet;
use std::path::Path;

/// The modules of the crate that `file` names in `use crate::…` (or
/// `crate::…::` paths anywhere, `super::` in `actors/`).
fn imports(file: &str) -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    // Only the code before the unit tests: tests may reach anywhere.
    let code: String = text
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or("")
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() || name.chars().next().is_some_and(|c| c.is_uppercase()) {
            // `crate::{…}` or an item re-exported at the root.
            continue;
        }
        found.insert(name);
    }
    found
}

fn assert_only(file: &str, allowed: &[&str]) {
    let got = imports(file);
    let extra: Vec<&String> = got
        .iter()
        .filter(|m| !allowed.contains(&m.as_str()))
        .collect();
    assert!(
        extra.is_empty(),
        "{file} imports {extra:?}, beyond its layer (allowed: {allowed:?})"
    );
}

#[test]
fn the_bottom_modules_import_nothing_above_them() {
    assert_only("msg.rs", &[]);
    assert_only("envelope.rs", &[]);
    assert_only("policy.rs", &[]);
    assert_only("grouping.rs", &[]);
    assert_only("codec.rs", &["msg"]);
    assert_only("state.rs", &["msg"]);
}

#[test]
fn data_structures_and_the_protocol_know_no_actors() {
    assert_only(
        "inflight.rs",
        &["envelope", "grouping", "msg", "pipeline", "policy"],
    );
    assert_only("wire.rs", &["msg", "pipeline"]);
    assert_only("task.rs", &["msg", "codec", "state"]);
    assert_only("typed.rs", &["msg", "codec", "task"]);
    assert_only("join.rs", &["codec", "envelope", "msg", "task"]);
    assert_only(
        "pipeline.rs",
        &[
            "grouping", "join", "msg", "task", "codec", "typed", "window",
        ],
    );
    assert_only("worker.rs", &["msg", "task", "metrics", "state"]);
    assert_only("window.rs", &["msg", "state", "task"]);
    assert_only(
        "async_worker.rs",
        &["msg", "task", "metrics", "state", "worker"],
    );
}

#[test]
fn configuration_knows_neither_the_protocol_nor_the_topology() {
    assert_only(
        "config.rs",
        &["error", "grouping", "metrics", "msg", "pipeline", "policy"],
    );
    assert_only("error.rs", &["pipeline"]);
}
