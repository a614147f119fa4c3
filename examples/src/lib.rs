//! Example topologies for Tempest.
//!
//! - [`wordcount`]: the quick start. Sentences from the mock source go
//!   through `parse`, then both `words` (counts every word) and `chars`
//!   (counts letters), whose outputs meet in `report` (a fan-in).
//!
//! Run it with `cargo run --release -p tempest-examples --example quickstart`.

pub mod enrich;
pub mod profiles;
pub mod wordcount;

/// The book's chapters, compiled as doc tests so their Rust snippets stay
/// true.
#[cfg(doctest)]
pub mod book {
    #[doc = include_str!("../../README.md")]
    pub struct Readme;
    #[doc = include_str!("../../book/src/introduction.md")]
    pub struct Introduction;
    #[doc = include_str!("../../book/src/quickstart.md")]
    pub struct Quickstart;
    #[doc = include_str!("../../book/src/concepts.md")]
    pub struct Concepts;
    #[doc = include_str!("../../book/src/tasks.md")]
    pub struct Tasks;
    #[doc = include_str!("../../book/src/delivery.md")]
    pub struct Delivery;
    #[doc = include_str!("../../book/src/running.md")]
    pub struct Running;
    #[doc = include_str!("../../book/src/configuration.md")]
    pub struct Configuration;
    #[doc = include_str!("../../book/src/testing.md")]
    pub struct Testing;
    #[doc = include_str!("../../book/src/joins.md")]
    pub struct Joins;
    #[doc = include_str!("../../book/src/groupings.md")]
    pub struct Groupings;
    #[doc = include_str!("../../book/src/ticks.md")]
    pub struct Ticks;
    #[doc = include_str!("../../book/src/state.md")]
    pub struct State;
    #[doc = include_str!("../../book/src/windows.md")]
    pub struct Windows;
    #[doc = include_str!("../../book/src/typed-tasks.md")]
    pub struct TypedTasks;
    #[doc = include_str!("../../book/src/async-tasks.md")]
    pub struct AsyncTasks;
    #[doc = include_str!("../../book/src/sources.md")]
    pub struct Sources;
    #[doc = include_str!("../../book/src/redis.md")]
    pub struct Redis;
    #[doc = include_str!("../../book/src/metrics.md")]
    pub struct Metrics;
    #[doc = include_str!("../../book/src/benchmarks.md")]
    pub struct Benchmarks;
}
