//! Word count: the quick-start topology.
//!
//! ```text
//!            ┌─► words ─┐
//! parse ─────┤          ├─► report
//!            └─► chars ─┘
//! ```
//!
//! `words` counts every word of a sentence (each worker keeps its own
//! tally, merged into [`Totals`] when it shuts down) and emits the number of
//! words; `chars` emits the number of letters. `report` is a fan-in: it runs
//! once both have finished with a sentence, on both their outputs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use tempest::{Msg, MsgCtx, Output, Pipeline, Task, TaskError, TaskResult, TopologyBuilder};
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
    /// Words seen by `report`.
    pub words: AtomicU64,
    /// Letters seen by `report`.
    pub letters: AtomicU64,
    /// Sentences `report` saw both counts for.
    pub sentences: AtomicU64,
    /// Per-word counts, merged from every `words` worker at shutdown.
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

/// Counts the words of each sentence.
#[derive(Clone, Debug)]
pub struct Words {
    totals: Arc<Totals>,
    counts: HashMap<Bytes, u64>,
}

impl Task for Words {
    fn name(&self) -> &str {
        "words"
    }
    fn handle(&mut self, msg: Msg, _: &MsgCtx) -> TaskResult {
        let mut n = 0u64;
        for word in msg.split(|b| *b == b' ').filter(|w| !w.is_empty()) {
            n += 1;
            match self.counts.get_mut(word) {
                Some(c) => *c += 1,
                None => {
                    self.counts.insert(msg.slice_ref(word), 1);
                }
            }
        }
        Ok(Output::One(encode(b'w', n)))
    }
    fn shutdown(&mut self) {
        let mut all = self
            .totals
            .per_word
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (word, count) in self.counts.drain() {
            *all.entry(String::from_utf8_lossy(&word).into_owned())
                .or_default() += count;
        }
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

/// Adds up what `words` and `chars` found (the fan-in).
#[derive(Clone, Debug)]
pub struct Report {
    totals: Arc<Totals>,
    words: u64,
    letters: u64,
    halves: u64,
}

impl Task for Report {
    fn name(&self) -> &str {
        "report"
    }
    fn handle(&mut self, msg: Msg, _: &MsgCtx) -> TaskResult {
        let (kind, n) = decode(&msg).ok_or_else(|| TaskError::msg("report: malformed count"))?;
        match kind {
            b'w' => self.words += n,
            _ => self.letters += n,
        }
        self.halves += 1;
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
            .fetch_add(std::mem::take(&mut self.halves) / 2, Ordering::Relaxed);
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
        .task(Words {
            totals: Arc::clone(totals),
            counts: HashMap::new(),
        })
        .task(Chars)
        .task(Report {
            totals: Arc::clone(totals),
            words: 0,
            letters: 0,
            halves: 0,
        })
        .edge("parse", "words")
        .edge("parse", "chars")
        .edge("words", "report")
        .edge("chars", "report")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_round_trip() {
        assert_eq!(decode(&encode(b'w', 42)), Some((b'w', 42)));
        assert_eq!(decode(b"w"), None);
    }

    #[test]
    fn words_counts_each_word() {
        let totals = Arc::new(Totals::default());
        let mut w = Words {
            totals: Arc::clone(&totals),
            counts: HashMap::new(),
        };
        let out = w
            .handle(Msg::from_static(b"a b  a"), &MsgCtx::new(1))
            .unwrap();
        assert_eq!(out, Output::One(encode(b'w', 3)));
        w.shutdown();
        assert_eq!(totals.top_words(1), vec![("a".to_string(), 2)]);
    }
}
