//! A task's queue of ready messages, kept in chunks that go to workers
//! whole.
//!
//! Every task message is written once, by the in-flight table, into the
//! queue of its task; the queue's chunk then *is* the batch a worker gets,
//! so the pipeline thread never moves a message again. (Queueing in one
//! ring and copying into a batch per fetch took a fifth of the pipeline
//! thread's time; a ring that had been drained from its front also had to
//! be rotated before its buffer could go.)
//!
//! A chunk also notes how many attempts had ended early (see
//! [`Tracker::ended_early`](crate::inflight::Tracker::ended_early)) when it
//! was started: a message in it can only have gone stale if one has ended
//! since, so a batch is checked for stale messages only then.

use std::collections::VecDeque;

use crate::msg::TaskMsg;

/// The chunk length a queue starts with: the default `task_batch`.
const FIRST_CHUNK: usize = 1024;

/// The early-end count of a chunk that must be checked whatever the count.
pub(crate) const UNCHECKED: u64 = u64::MAX;

/// See the [module docs](self).
#[derive(Debug)]
pub(crate) struct ReadyQueue {
    /// Each chunk with the early ends counted when it was started
    /// ([`UNCHECKED`] for messages put back, which may be stale already).
    chunks: VecDeque<(Vec<TaskMsg>, u64)>,
    len: usize,
    /// New messages start a new chunk once the last one holds this many:
    /// the most the task's workers last asked for, so a chunk fits a
    /// fetch.
    chunk: usize,
}

impl Default for ReadyQueue {
    fn default() -> Self {
        ReadyQueue {
            chunks: VecDeque::new(),
            len: 0,
            chunk: FIRST_CHUNK,
        }
    }
}

impl ReadyQueue {
    /// A queue whose first chunk has room for `capacity` messages.
    pub fn with_capacity(capacity: usize) -> Self {
        let mut q = ReadyQueue::default();
        if capacity > 0 {
            q.chunks
                .push_back((Vec::with_capacity(capacity.min(FIRST_CHUNK)), 0));
        }
        q
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Chunks start anew at `n` messages (at least 1): what the task's
    /// workers fetch.
    pub fn set_chunk(&mut self, n: usize) {
        self.chunk = n.max(1);
    }

    /// Queues `m` last, in a fresh chunk from `pool` if the last is full
    /// (one that notes `ended_early`, the early ends counted so far).
    #[inline]
    pub fn push_back(&mut self, m: TaskMsg, pool: &mut Vec<Vec<TaskMsg>>, ended_early: u64) {
        self.len += 1;
        if let Some((last, _)) = self.chunks.back_mut() {
            if last.len() < self.chunk {
                last.push(m);
                return;
            }
        }
        self.push_chunk(m, pool, ended_early);
    }

    #[cold]
    #[inline(never)]
    fn push_chunk(&mut self, m: TaskMsg, pool: &mut Vec<Vec<TaskMsg>>, ended_early: u64) {
        let mut fresh = pool.pop().unwrap_or_default();
        fresh.reserve(self.chunk);
        fresh.push(m);
        self.chunks.push_back((fresh, ended_early));
    }

    /// Puts `msgs` back at the front, in order, ahead of everything queued.
    pub fn push_front_all(&mut self, msgs: Vec<TaskMsg>) {
        if msgs.is_empty() {
            return;
        }
        self.len += msgs.len();
        self.chunks.push_front((msgs, UNCHECKED));
    }

    /// Takes the first message.
    pub fn pop_front(&mut self) -> Option<TaskMsg> {
        let (first, _) = self.chunks.front_mut()?;
        let m = (!first.is_empty()).then(|| first.remove(0));
        if first.is_empty() {
            self.chunks.pop_front();
        }
        if m.is_some() {
            self.len -= 1;
        }
        m
    }

    /// Every queued message, first to last, leaving the queue empty.
    pub fn take_all(&mut self) -> impl Iterator<Item = TaskMsg> {
        self.len = 0;
        std::mem::take(&mut self.chunks)
            .into_iter()
            .flat_map(|(c, _)| c)
    }

    /// The queued messages, first to last.
    pub fn iter(&self) -> impl Iterator<Item = &TaskMsg> {
        self.chunks.iter().flat_map(|(c, _)| c)
    }

    /// How many of the first chunk's messages a batch can take: at most
    /// `max`, and only from one chunk.
    pub fn front_len(&self, max: usize) -> usize {
        self.chunks.front().map_or(0, |(c, _)| c.len().min(max))
    }

    /// Takes the first `n` messages (`n` at most [`front_len`]): the first
    /// chunk itself when that is all of it, else its front, moved into a
    /// buffer from `pool`; with the early ends the chunk noted.
    ///
    /// [`front_len`]: Self::front_len
    pub fn take_front(&mut self, n: usize, pool: &mut Vec<Vec<TaskMsg>>) -> (Vec<TaskMsg>, u64) {
        let Some((first, ended_early)) = self.chunks.front_mut() else {
            return (pool.pop().unwrap_or_default(), UNCHECKED);
        };
        let ended_early = *ended_early;
        let n = n.min(first.len());
        self.len -= n;
        if n == first.len() {
            return self.chunks.pop_front().unwrap_or_default();
        }
        let mut batch = pool.pop().unwrap_or_default();
        batch.extend(first.drain(..n));
        (batch, ended_early)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{MsgCtx, Ticket};
    use bytes::Bytes;

    fn msg(i: u32) -> TaskMsg {
        TaskMsg {
            ticket: Ticket {
                slot: i,
                gen: 0,
                task: 0,
                copy: 0,
            },
            payload: Bytes::new(),
            ctx: MsgCtx::new(u64::from(i)),
        }
    }

    fn slots(v: &[TaskMsg]) -> Vec<u32> {
        v.iter().map(|m| m.ticket.slot).collect()
    }

    #[test]
    fn chunks_go_whole_and_in_order() {
        let mut pool = Vec::new();
        let mut q = ReadyQueue::with_capacity(8);
        q.set_chunk(3);
        for i in 0..7 {
            q.push_back(msg(i), &mut pool, 0);
        }
        assert_eq!(q.len(), 7);
        assert_eq!(q.front_len(10), 3, "one chunk per batch");
        let (first, _) = q.take_front(3, &mut pool);
        assert_eq!(slots(&first), [0, 1, 2]);
        assert_eq!(q.front_len(2), 2);
        let (part, _) = q.take_front(2, &mut pool);
        assert_eq!(slots(&part), [3, 4]);
        assert_eq!(slots(&q.iter().cloned().collect::<Vec<_>>()), [5, 6]);
        q.push_front_all(vec![msg(9)]);
        assert_eq!(q.pop_front().map(|m| m.ticket.slot), Some(9));
        assert_eq!(q.pop_front().map(|m| m.ticket.slot), Some(5));
        assert_eq!(q.len(), 1);
        let (rest, _) = q.take_front(q.front_len(usize::MAX), &mut pool);
        assert_eq!(slots(&rest), [6]);
        assert!(q.is_empty());
        assert!(q.pop_front().is_none());
        assert!(q.take_front(5, &mut pool).0.is_empty());
    }

    #[test]
    fn a_chunk_is_the_buffer_it_was_written_in() {
        let mut pool = vec![Vec::with_capacity(4)];
        let mut q = ReadyQueue::default();
        q.set_chunk(4);
        for i in 0..4 {
            q.push_back(msg(i), &mut pool, 0);
        }
        let ptr = q.chunks.front().map(|(c, _)| c.as_ptr());
        let (batch, _) = q.take_front(4, &mut pool);
        assert_eq!(Some(batch.as_ptr()), ptr, "no message was moved");
    }

    #[test]
    fn a_chunk_notes_the_early_ends_when_it_started() {
        let mut pool = Vec::new();
        let mut q = ReadyQueue::default();
        q.set_chunk(2);
        q.push_back(msg(0), &mut pool, 5);
        q.push_back(msg(1), &mut pool, 6);
        q.push_back(msg(2), &mut pool, 7);
        assert_eq!(
            q.take_front(2, &mut pool).1,
            5,
            "the first chunk's, not the last push's"
        );
        assert_eq!(q.take_front(1, &mut pool).1, 7);
        q.push_front_all(vec![msg(3)]);
        assert_eq!(
            q.take_front(1, &mut pool).1,
            UNCHECKED,
            "put back: always checked"
        );
    }
}
