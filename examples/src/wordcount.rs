//! Word count: the quick-start topology.
//!
//! ```text
//!            ┌─► words ══key══► count ──┐
//! parse ─────┤                          ├─► report
//!            └─► chars ─────────────────┘
//! ```
//!
//! `words` emits each word of a sentence as its own message, keyed by the
//! word; the `words -> count` edge groups by key, so every occurrence of a
//! word reaches the same `count` worker, however many there are, and its
//! running count is exact. `count` emits that running count, `chars` the
//! number of letters of the sentence; `report` (one worker: both its
//! edges are `global`) keeps each word's highest count and the totals, and
//! prints the top words when it shuts down.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use tempest::{
    Grouping, KeyedState, Msg, MsgCtx, Out, Output, Pipeline, Task, TaskContext, TaskError,
    TaskResult, TopologyBuilder,
};
use tempest_source_mock::{MockConfig, MockSource};

/// The sentences the mock source cycles through.
pub const SENTENCES: [&str; 8] = [
    "the quick brown fox jumps over the lazy dog",
    "a storm of messages flows through the topology",
    "every message is acked exactly when its tasks are done",
    "the fan in waits for both of its parents",
    "words and letters are counted on separate workers",
    "batches keep the hot path cheap",
    "nothing is dropped when the pipeline is full",
    "the source redelivers what the runtime gives up on",
];

/// What the topology counted, shared with the caller.
#[derive(Debug, Default)]
pub struct Totals {
    /// Words seen by `report` (one running count per word of a sentence).
    pub words: AtomicU64,
    /// Letters seen by `report`.
    pub letters: AtomicU64,
    /// Sentences `report` saw the letters of.
    pub sentences: AtomicU64,
    /// Each word's count: the highest running count `report` saw for it.
    pub per_word: Mutex<HashMap<String, u64>>,
}

impl Totals {
    /// The `n` most frequent words, most frequent first.
    pub fn top_words(&self, n: usize) -> Vec<(String, u64)> {
        let map = self.per_word.lock().unwrap_or_else(PoisonError::into_inner);
        let mut v: Vec<_> = map.iter().map(|(w, c)| (w.clone(), *c)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }
}

/// Checks a sentence is text and passes it on.
#[derive(Clone, Debug)]
pub struct Parse;

impl Task for Parse {
    fn name(&self) -> &str {
        "parse"
    }
    fn handle(&mut self, msg: Msg, _: &MsgCtx) -> TaskResult {
        std::str::from_utf8(&msg)?;
        Ok(Output::One(msg))
    }
}

/// Splits a sentence into words: one output per word, keyed by the word.
#[derive(Clone, Debug)]
pub struct Words;

impl Task for Words {
    fn name(&self) -> &str {
        "words"
    }
    fn handle(&mut self, msg: Msg, _: &MsgCtx) -> TaskResult {
        // Slices of the sentence: no copy of a word, as payload or key.
        Ok(Output::Outs(
            msg.split(|b| *b == b' ')
                .filter(|w| !w.is_empty())
                .map(|w| {
                    let word = msg.slice_ref(w);
                    Out::new(word.clone()).key(word)
                })
                .collect(),
        ))
    }
}

/// Counts each word it owns in keyed state and emits the word's running
/// count (keyed by the word, which it inherits). With a state backend
/// (`WORDCOUNT_REDIS_URL` for the `wordcount` binary) the counts survive
/// a counter's death.
#[derive(Clone, Debug, Default)]
pub struct Count {
    counts: Option<KeyedState<u64>>,
}

impl Task for Count {
    fn name(&self) -> &str {
        "count"
    }
    fn started(&mut self, ctx: &TaskContext) {
        match ctx.state("words") {
            Ok(s) => self.counts = Some(s),
            Err(e) => log::error!("count: {e}"),
        }
    }
    fn handle(&mut self, word: Msg, _: &MsgCtx) -> TaskResult {
        let counts = self
            .counts
            .as_ref()
            .ok_or_else(|| TaskError::msg("count: no state"))?;
        let n = counts
            .update(&word, |c| Some(c.unwrap_or(0) + 1))
            .map_err(|e| TaskError::msg(e.to_string()))?
            .unwrap_or(0);
        Ok(Output::One(encode(b'w', n)))
    }
}

/// Counts the letters of each sentence.
#[derive(Clone, Debug)]
pub struct Chars;

impl Task for Chars {
    fn name(&self) -> &str {
        "chars"
    }
    fn handle(&mut self, msg: Msg, _: &MsgCtx) -> TaskResult {
        let n = msg.iter().filter(|b| b.is_ascii_alphabetic()).count() as u64;
        Ok(Output::One(encode(b'c', n)))
    }
}

/// Adds up what `count` and `chars` found (the fan-in), and keeps each
/// word's highest running count.
#[derive(Clone, Debug)]
pub struct Report {
    totals: Arc<Totals>,
    words: u64,
    letters: u64,
    sentences: u64,
    per_word: HashMap<Bytes, u64>,
}

impl Report {
    fn new(totals: &Arc<Totals>) -> Self {
        Report {
            totals: Arc::clone(totals),
            words: 0,
            letters: 0,
            sentences: 0,
            per_word: HashMap::new(),
        }
    }
}

impl Task for Report {
    fn name(&self) -> &str {
        "report"
    }
    fn handle(&mut self, msg: Msg, ctx: &MsgCtx) -> TaskResult {
        let (kind, n) = decode(&msg).ok_or_else(|| TaskError::msg("report: malformed count"))?;
        if kind == b'c' {
            self.letters += n;
            self.sentences += 1;
            return Ok(Output::None);
        }
        self.words += 1;
        let word = ctx
            .key()
            .ok_or_else(|| TaskError::msg("report: a count without its word"))?;
        match self.per_word.get_mut(word) {
            // A retried sentence may bring a word's counts out of order.
            Some(c) => *c = (*c).max(n),
            None => {
                self.per_word.insert(word.clone(), n);
            }
        }
        Ok(Output::None)
    }
    fn flush_metrics(&mut self) {
        self.totals
            .words
            .fetch_add(std::mem::take(&mut self.words), Ordering::Relaxed);
        self.totals
            .letters
            .fetch_add(std::mem::take(&mut self.letters), Ordering::Relaxed);
        self.totals
            .sentences
            .fetch_add(std::mem::take(&mut self.sentences), Ordering::Relaxed);
        let mut all = self
            .totals
            .per_word
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (word, count) in &self.per_word {
            let c = all
                .entry(String::from_utf8_lossy(word).into_owned())
                .or_default();
            *c = (*c).max(*count);
        }
    }
    fn shutdown(&mut self) {
        self.flush_metrics();
        let top: Vec<String> = self
            .totals
            .top_words(5)
            .into_iter()
            .map(|(w, c)| format!("{w}={c}"))
            .collect();
        if !top.is_empty() {
            println!("Top words: {}", top.join(", "));
        }
    }
}

fn encode(kind: u8, n: u64) -> Msg {
    let mut buf = [0u8; 9];
    buf[0] = kind;
    buf[1..].copy_from_slice(&n.to_le_bytes());
    Msg::copy_from_slice(&buf)
}

fn decode(msg: &[u8]) -> Option<(u8, u64)> {
    let (&kind, rest) = msg.split_first()?;
    Some((kind, u64::from_le_bytes(rest.try_into().ok()?)))
}

/// The word-count pipeline, recording into `totals`.
pub fn pipeline(totals: &Arc<Totals>) -> Pipeline {
    Pipeline::new()
        .task(Parse)
        .task(Words)
        .task(Count::default())
        .task(Chars)
        .task(Report::new(totals))
        .edge("parse", "words")
        .edge("parse", "chars")
        .edge_by("words", "count", Grouping::Key)
        .edge_by("count", "report", Grouping::Global)
        .edge_by("chars", "report", Grouping::Global)
}

/// The word-count topology over `count` sentences from the mock source.
pub fn topology(count: u64, totals: &Arc<Totals>) -> TopologyBuilder {
    TopologyBuilder::new("wordcount")
        .source_config::<MockSource>(MockConfig {
            payloads: SENTENCES.iter().map(|s| s.to_string()).collect(),
            ..MockConfig::generator(count, 0)
        })
        .pipeline(pipeline(totals))
}

/// The words and letters `count` sentences hold, counted directly.
pub fn expected(count: u64) -> (u64, u64) {
    (0..count).fold((0, 0), |(w, c), i| {
        let s = SENTENCES[(i % SENTENCES.len() as u64) as usize];
        (
            w + s.split_whitespace().count() as u64,
            c + s.chars().filter(|c| c.is_ascii_alphabetic()).count() as u64,
        )
    })
}

/// Each word's count over `count` sentences, counted directly.
pub fn expected_words(count: u64) -> HashMap<String, u64> {
    let mut words = HashMap::new();
    let n = SENTENCES.len() as u64;
    for (i, s) in SENTENCES.iter().enumerate() {
        // How many of the `count` sentences are this one.
        let times = count / n + u64::from((i as u64) < count % n);
        for w in s.split_whitespace() {
            *words.entry(w.to_string()).or_default() += times;
        }
    }
    words.retain(|_, c| *c > 0);
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_round_trip() {
        assert_eq!(decode(&encode(b'w', 42)), Some((b'w', 42)));
        assert_eq!(decode(b"w"), None);
    }

    #[test]
    fn words_splits_and_count_counts() {
        let out = Words
            .handle(Msg::from_static(b"a b  a"), &MsgCtx::new(1))
            .unwrap();
        assert_eq!(
            out,
            Output::Outs(vec![
                Out::new("a").key("a"),
                Out::new("b").key("b"),
                Out::new("a").key("a")
            ])
        );
        let mut count = Count::default();
        count.started(&TaskContext::new(
            "wc",
            "count",
            0,
            tempest::source::Metrics::new_registry(),
        ));
        let runs: Vec<_> = ["a", "b", "a"]
            .iter()
            .map(|w| count.handle(Msg::from(*w), &MsgCtx::new(1)).unwrap())
            .collect();
        assert_eq!(
            runs,
            [1, 1, 2].map(|n| Output::One(encode(b'w', n))).to_vec()
        );
    }

    #[test]
    fn report_keeps_the_highest_count_of_each_word() {
        let totals = Arc::new(Totals::default());
        let mut r = Report::new(&totals);
        let ctx = MsgCtx::new(1).with_key("a");
        for n in [1, 3, 2] {
            r.handle(encode(b'w', n), &ctx).unwrap();
        }
        r.handle(encode(b'c', 7), &MsgCtx::new(1)).unwrap();
        r.shutdown();
        assert_eq!(totals.top_words(1), vec![("a".to_string(), 3)]);
        assert_eq!(totals.words.load(Ordering::Relaxed), 3);
        assert_eq!(totals.letters.load(Ordering::Relaxed), 7);
    }

    #[test]
    fn expected_words_counts_the_cycle() {
        let w = expected_words(SENTENCES.len() as u64 + 1);
        // "the" is 8 times in the 8 sentences, twice in the ninth (the first).
        assert_eq!(w["the"], 8 + 2);
        assert_eq!(w.values().sum::<u64>(), expected(9).0);
    }
}
