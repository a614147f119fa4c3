//! What a remote worker holds: its unanswered messages, by exact ticket.
//!
//! Siblings of a fan-out share slot, generation and task but are different
//! messages (payload, key, headers), and a worker may answer them in any
//! order (an async task's calls end out of order). So every message is
//! stamped, as it is delivered, with the worker's next `copy` number
//! ([`Held::stamp`]); the worker echoes tickets unchanged, so an answer or
//! a give-back removes exactly the message it names, and what is left when
//! the worker is lost is exactly what it had not answered.
//!
//! The pipeline keeps each delivered batch itself, shared with the session
//! that encodes it (no message is cloned to be kept), with a flag per
//! message for "not answered yet". Copy numbers count up through a batch,
//! so a copy number finds its message by arithmetic; batches are few per
//! worker. (A hash map of 120-byte entries once took a fifth of the
//! topology process's time in distributed mode, and cloning every message
//! into a ring another eighth of the pipeline thread.)

use std::collections::VecDeque;
use std::sync::Arc;

use crate::msg::{TaskMsg, Ticket};

/// One delivered batch and which of its messages are still unanswered.
#[derive(Debug)]
struct HeldBatch {
    msgs: Arc<Vec<TaskMsg>>,
    /// The copy number of its first message.
    first: u32,
    open: Vec<bool>,
    left: usize,
}

impl HeldBatch {
    /// The index of the message stamped `copy`, if the batch has one.
    fn index(&self, copy: u32) -> Option<usize> {
        if copy == 0 {
            return None;
        }
        let d = copy.wrapping_sub(self.first) as usize;
        // Past the wrap the stamp skipped copy 0: one number more.
        let wraps = self.first.checked_add(self.msgs.len() as u32).is_none();
        let i = if wraps && copy < self.first { d - 1 } else { d };
        (i < self.msgs.len()).then_some(i)
    }
}

/// See the [module docs](self).
#[derive(Debug)]
pub(crate) struct Held {
    batches: VecDeque<HeldBatch>,
    /// The copy number the next stamped message gets.
    next: u32,
    live: usize,
}

impl Default for Held {
    fn default() -> Self {
        // Copy 0 is what a message carries when not delivered to a remote
        // worker: never a number held.
        Held {
            batches: VecDeque::new(),
            next: 1,
            live: 0,
        }
    }
}

impl Held {
    /// Stamps `msgs`, about to be delivered, with the next copy numbers
    /// (0 is skipped at the wrap).
    pub fn stamp(&self, msgs: &mut [TaskMsg]) {
        let mut copy = self.next;
        for m in msgs {
            if copy == 0 {
                copy = 1;
            }
            m.ticket.copy = copy;
            copy = copy.wrapping_add(1);
        }
    }

    /// The worker now holds `msgs`, stamped by the last
    /// [`stamp`](Self::stamp).
    pub fn add(&mut self, msgs: Arc<Vec<TaskMsg>>) {
        let Some(last) = msgs.last() else {
            return;
        };
        let first = msgs[0].ticket.copy;
        self.next = last.ticket.copy.wrapping_add(1);
        if self.next == 0 {
            self.next = 1;
        }
        self.live += msgs.len();
        self.batches.push_back(HeldBatch {
            first,
            open: vec![true; msgs.len()],
            left: msgs.len(),
            msgs,
        });
    }

    /// Marks the message of exactly `ticket` answered: the batch it is in
    /// and its index there, if the worker held it.
    fn remove(&mut self, ticket: Ticket) -> Option<(usize, usize)> {
        let (b, i) = self.batches.iter().enumerate().find_map(|(b, batch)| {
            let i = batch.index(ticket.copy)?;
            (batch.open[i] && batch.msgs[i].ticket == ticket).then_some((b, i))
        })?;
        let batch = &mut self.batches[b];
        batch.open[i] = false;
        batch.left -= 1;
        self.live -= 1;
        Some((b, i))
    }

    /// Drops batch `b` if all of it is answered.
    fn drop_if_done(&mut self, b: usize) {
        if self.batches[b].left == 0 {
            self.batches.remove(b);
        }
    }

    /// The worker answered the message of `ticket`: whether it held it.
    pub fn answer(&mut self, ticket: Ticket) -> bool {
        let Some((b, _)) = self.remove(ticket) else {
            return false;
        };
        self.drop_if_done(b);
        true
    }

    /// The worker gave back `m`: the pipeline's own copy of it, if held.
    pub fn take_back(&mut self, m: &TaskMsg) -> Option<TaskMsg> {
        let (b, i) = self.remove(m.ticket)?;
        let own = self.batches[b].msgs[i].clone();
        self.drop_if_done(b);
        Some(own)
    }

    /// The unanswered messages, in the order they were delivered.
    pub fn iter(&self) -> impl Iterator<Item = &TaskMsg> {
        self.batches.iter().flat_map(|b| {
            b.msgs
                .iter()
                .zip(&b.open)
                .filter(|(_, &open)| open)
                .map(|(m, _)| m)
        })
    }

    /// What the worker held, in the order it was delivered (moved out of
    /// batches nobody else holds any more, cloned from the others).
    pub fn into_msgs(self) -> Vec<TaskMsg> {
        let mut msgs = Vec::with_capacity(self.live);
        for b in self.batches {
            let open = b.open;
            match Arc::try_unwrap(b.msgs) {
                Ok(own) => msgs.extend(
                    own.into_iter()
                        .zip(open)
                        .filter(|(_, open)| *open)
                        .map(|(m, _)| m),
                ),
                Err(shared) => msgs.extend(
                    shared
                        .iter()
                        .zip(open)
                        .filter(|(_, open)| *open)
                        .map(|(m, _)| m.clone()),
                ),
            }
        }
        msgs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::MsgCtx;
    use bytes::Bytes;

    /// Three siblings of a fan-out: one slot, generation and task, three
    /// payloads.
    fn siblings() -> Vec<TaskMsg> {
        ["a", "b", "c"]
            .into_iter()
            .map(|p| TaskMsg {
                ticket: Ticket::new(4, 2, 1),
                payload: Bytes::from(p),
                ctx: MsgCtx::new(9).with_key(p),
            })
            .collect()
    }

    fn deliver(held: &mut Held, mut msgs: Vec<TaskMsg>) -> Vec<TaskMsg> {
        held.stamp(&mut msgs);
        held.add(Arc::new(msgs.clone()));
        msgs
    }

    fn payloads(msgs: &[TaskMsg]) -> Vec<&[u8]> {
        msgs.iter().map(|m| &m.payload[..]).collect()
    }

    /// Regression: answers out of order removed the oldest sibling, so a
    /// lost worker's answered sibling ran again and an unanswered one was
    /// lost.
    #[test]
    fn siblings_answered_out_of_order_leave_exactly_the_unanswered_held() {
        let mut held = Held::default();
        let sent = deliver(&mut held, siblings());
        let copies: Vec<u32> = sent.iter().map(|m| m.ticket.copy).collect();
        assert_eq!(copies, [1, 2, 3], "copy numbers count up per worker");
        assert!(held.answer(sent[2].ticket));
        assert!(held.answer(sent[1].ticket));
        assert!(!held.answer(sent[1].ticket), "an answer counts once");
        let left = held.into_msgs();
        assert_eq!(payloads(&left), [&b"a"[..]]);
        assert_eq!(left[0].ctx.key_str(), Some("a"));
    }

    #[test]
    fn an_answer_names_a_copy_the_worker_holds_or_none() {
        let mut held = Held::default();
        let sent = deliver(&mut held, siblings());
        let undelivered = siblings()[0].ticket;
        assert!(!held.answer(undelivered), "copy 0 was never delivered");
        let stranger = Ticket {
            copy: 99,
            ..sent[0].ticket
        };
        assert!(!held.answer(stranger));
        let forged = Ticket {
            slot: 5,
            ..sent[0].ticket
        };
        assert!(
            !held.answer(forged),
            "the copy is held, but not with that ticket"
        );
        assert_eq!(held.iter().count(), 3);
    }

    #[test]
    fn a_give_back_takes_the_very_sibling_returned_as_the_pipelines_copy() {
        let mut held = Held::default();
        let sent = deliver(&mut held, siblings());
        let mut forged = sent[1].clone();
        forged.payload = Bytes::from_static(b"forged");
        let own = held.take_back(&forged).expect("held");
        assert_eq!(&own.payload[..], b"b");
        assert!(held.take_back(&sent[1]).is_none(), "returned once");
        assert_eq!(payloads(&held.into_msgs()), [&b"a"[..], &b"c"[..]]);
    }

    #[test]
    fn what_is_left_comes_out_in_delivery_order() {
        let mut held = Held::default();
        let mut sent = Vec::new();
        for _ in 0..20 {
            sent.extend(deliver(&mut held, siblings()));
        }
        for m in sent.iter().skip(1).step_by(2) {
            assert!(held.answer(m.ticket));
        }
        let left: Vec<u32> = held.into_msgs().iter().map(|m| m.ticket.copy).collect();
        let expected: Vec<u32> = sent.iter().step_by(2).map(|m| m.ticket.copy).collect();
        assert_eq!(left, expected);
    }

    #[test]
    fn answered_batches_are_let_go_in_any_order() {
        let mut held = Held::default();
        let first = deliver(&mut held, siblings());
        let second = deliver(&mut held, siblings());
        for m in &second {
            assert!(held.answer(m.ticket));
        }
        assert_eq!(
            held.batches.len(),
            1,
            "the second batch went, the first stays"
        );
        for m in &first {
            assert!(held.answer(m.ticket));
        }
        assert!(held.batches.is_empty());
        assert_eq!(held.live, 0);
        let third = deliver(&mut held, siblings());
        assert_eq!(third[0].ticket.copy, 7, "numbers go on counting");
    }

    #[test]
    fn copy_numbers_wrap_past_zero_and_still_name_their_message() {
        let mut held = Held {
            next: u32::MAX - 1,
            ..Held::default()
        };
        let sent = deliver(&mut held, siblings());
        let copies: Vec<u32> = sent.iter().map(|m| m.ticket.copy).collect();
        assert_eq!(copies, [u32::MAX - 1, u32::MAX, 1], "0 is never a copy");
        assert!(held.answer(sent[2].ticket));
        assert!(held.answer(sent[0].ticket));
        assert_eq!(payloads(&held.into_msgs()), [&b"b"[..]]);
        let mut held = Held {
            next: u32::MAX,
            ..Held::default()
        };
        let a = deliver(&mut held, siblings());
        let b = deliver(&mut held, siblings());
        assert_eq!(b[0].ticket.copy, 3, "after 1 and 2 past the wrap");
        assert!(held.answer(a[1].ticket) && held.answer(b[0].ticket));
        assert_eq!(held.iter().count(), 4);
    }
}
