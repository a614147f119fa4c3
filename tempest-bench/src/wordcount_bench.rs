//! Word count with keyed state: `split` emits each word of a sentence as a
//! message keyed by the word, `count` (two workers by default) counts it in
//! a [`KeyedState`]; the `split -> count` edge groups by key or shuffles,
//! and the state lives in memory or is checkpointed to Redis.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tempest::standalone::{self, RunOptions};
use tempest::{
    FailurePolicy, Grouping, KeyedState, Msg, MsgCtx, Out, Output, Pipeline, Task, TaskContext,
    TaskError, TaskResult, TopologyBuilder,
};

use tempest_source::Source;

use crate::{BenchSource, BenchSourceConfig};

/// One word-count run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WordcountParams {
    /// Sentences (source messages), 10 words each.
    pub sentences: u64,
    /// The grouping of `split -> count`: `key` or `shuffle`.
    pub grouping: String,
    /// Workers of `count`.
    pub counters: usize,
    /// A Redis URL to checkpoint the counts to (`None`: in memory).
    pub redis: Option<String>,
    /// Apply each update at most once (with `redis`).
    #[serde(default)]
    pub at_most_once: bool,
}

/// What it measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WordcountMeasured {
    /// Sentences acked per second.
    pub sentences_per_s: f64,
    /// Words counted per second.
    pub words_per_s: f64,
    /// Whether every sentence was acked and no task failed.
    pub all_acked: bool,
}

const WORDS: usize = 10;
const VOCABULARY: u64 = 1_000;

/// Makes each source message into a sentence of [`WORDS`] words from a
/// vocabulary of [`VOCABULARY`], picked by its id.
#[derive(Clone)]
struct Split {
    vocabulary: std::sync::Arc<Vec<Msg>>,
}

impl Task for Split {
    fn name(&self) -> &str {
        "split"
    }
    fn handle(&mut self, m: Msg, ctx: &MsgCtx) -> TaskResult {
        // The source's payloads are all alike; the message id varies.
        let mut x = ctx.id().as_int().unwrap_or(0).wrapping_add(1);
        let words: Vec<Out> = (0..WORDS)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let w = self.vocabulary[((x >> 33) % VOCABULARY) as usize].clone();
                Out::new(w.clone()).key(w)
            })
            .collect();
        let _ = m;
        Ok(Output::Outs(words))
    }
}

#[derive(Clone, Default)]
struct Count {
    counts: Option<KeyedState<u64>>,
}

impl Task for Count {
    fn name(&self) -> &str {
        "count"
    }
    fn started(&mut self, ctx: &TaskContext) {
        self.counts = ctx.state("words").ok();
    }
    fn handle(&mut self, word: Msg, _: &MsgCtx) -> TaskResult {
        let counts = self
            .counts
            .as_ref()
            .ok_or_else(|| TaskError::msg("no state"))?;
        counts
            .update(&word, |c| Some(c.unwrap_or(0) + 1))
            .map_err(|e| TaskError::msg(e.to_string()))?;
        Ok(Output::None)
    }
}

/// Runs the word count once.
pub fn run_wordcount(p: &WordcountParams) -> anyhow::Result<WordcountMeasured> {
    let grouping: Grouping = p
        .grouping
        .parse()
        .map_err(|e| anyhow::anyhow!("--grouping: {e}"))?;
    let source = BenchSource::from_config(BenchSourceConfig {
        messages: p.sentences,
        payload: 16,
        copy: false,
        rate: None,
        track: false,
        warmup_s: 0.0,
        report: false,
    })?;
    let mut b = TopologyBuilder::new("bench-wordcount")
        .source(source)
        .pipeline(
            Pipeline::new()
                .task(Split {
                    vocabulary: std::sync::Arc::new(
                        (0..VOCABULARY)
                            .map(|i| Msg::from(format!("w{i}")))
                            .collect(),
                    ),
                })
                .task(Count::default())
                .edge_by("split", "count", grouping),
        )
        .failure_policy(FailurePolicy::None)
        .msg_timeout(Duration::from_secs(600))
        .workers("count", p.counters.max(1));
    if let Some(url) = &p.redis {
        let prefix = format!("tempest-bench:{}", std::process::id());
        b = b.state_backend(tempest_state_redis::RedisState::with_prefix(url, &prefix)?);
    }
    if p.at_most_once {
        b = b.at_most_once_updates();
    }
    let started = Instant::now();
    let report = standalone::run(b.build()?, RunOptions::default())?;
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    if let Some(url) = &p.redis {
        // Leave nothing behind on the server.
        let mut conn = redis::Client::open(url.as_str())?.get_connection()?;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("tempest-bench:{}:*", std::process::id()))
            .query(&mut conn)?;
        if !keys.is_empty() {
            redis::cmd("DEL").arg(keys).query::<()>(&mut conn)?;
        }
    }
    let acked = report.stats.acked;
    Ok(WordcountMeasured {
        sentences_per_s: acked as f64 / secs,
        words_per_s: (acked * WORDS as u64) as f64 / secs,
        all_acked: acked == p.sentences
            && report.stats.task_errors == 0
            && report.stats.failed == 0
            && report.stats.timed_out == 0,
    })
}
