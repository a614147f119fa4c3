//! Which worker gets a pinned message: the workers of each task by slot,
//! and the queue of messages pinned to each worker (see [`Grouping`]).
//!
//! A shuffled message waits in its task's shared queue for any worker; a
//! message over a `key`, `partial_key`, `global` or `all` edge is routed
//! here, when it is dispatched, into the queue of the worker it is for,
//! which takes it before anything shared. When a worker joins, the queued
//! messages whose key it now owns move to it (in order); when one leaves,
//! its queue is routed again over the others. A message for a task with no
//! live worker waits unrouted until one joins.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::grouping::{owner, two_owners, Grouping};
use crate::msg::{TaskIdx, TaskMsg, WorkerId};
use crate::pipeline::Dag;

use super::ready::ReadyQueue;

/// One task's live workers and the messages waiting for one.
#[derive(Debug, Default)]
struct TaskRoutes {
    /// `(slot, worker)`, by slot.
    members: Vec<(u32, WorkerId)>,
    /// Pinned messages that came while the task had no live worker.
    unrouted: VecDeque<TaskMsg>,
}

/// See the [module docs](self).
#[derive(Debug)]
pub(crate) struct Routes {
    dag: Arc<Dag>,
    tasks: Vec<TaskRoutes>,
    /// Per worker (by id): the messages pinned to it.
    own: Vec<ReadyQueue>,
}

/// The seed of an `all` edge's copies' paths (see `route`).
const ALL_COPIES: u64 = 0x616c_6c5f_636f_7079;

/// What a change of a task's workers moved.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Moved {
    /// Queued pinned messages routed to another worker.
    pub msgs: usize,
    /// The task's live workers after the change.
    pub workers: usize,
}

impl Routes {
    pub fn new(dag: Arc<Dag>) -> Self {
        let tasks = (0..dag.len()).map(|_| TaskRoutes::default()).collect();
        Routes {
            dag,
            tasks,
            own: Vec::new(),
        }
    }

    /// Worker `w`'s queue of pinned messages.
    pub fn own(&mut self, w: WorkerId) -> &mut ReadyQueue {
        let w = w as usize;
        if self.own.len() <= w {
            self.own.resize_with(w + 1, ReadyQueue::default);
        }
        &mut self.own[w]
    }

    /// How many messages are pinned to worker `w`.
    pub fn own_len(&self, w: WorkerId) -> usize {
        self.own.get(w as usize).map_or(0, ReadyQueue::len)
    }

    /// The pinned messages waiting for task `t`: queued for its workers
    /// and unrouted.
    pub fn queued(&self, t: TaskIdx) -> usize {
        let routes = &self.tasks[t as usize];
        routes.unrouted.len()
            + routes
                .members
                .iter()
                .map(|&(_, w)| self.own_len(w))
                .sum::<usize>()
    }

    /// The slot of worker `w` of task `t`, if it is live.
    #[cfg(test)]
    pub fn slot_of(&self, t: TaskIdx, w: WorkerId) -> Option<u32> {
        self.tasks[t as usize]
            .members
            .iter()
            .find(|&&(_, m)| m == w)
            .map(|&(s, _)| s)
    }

    /// The grouping `msg` for task `t` came over.
    pub fn grouping_of(&self, t: TaskIdx, msg: &TaskMsg) -> Grouping {
        self.dag.grouping_into(msg.ctx.parent.task, t)
    }

    /// Queues `msg` for task `t`, come over a pinning `grouping`: for `All`,
    /// a copy to each live worker (as many as [`copies`](Self::copies)).
    pub fn route(
        &mut self,
        t: TaskIdx,
        grouping: Grouping,
        msg: TaskMsg,
        pool: &mut Vec<Vec<TaskMsg>>,
        ended_early: u64,
    ) {
        if grouping == Grouping::All && self.tasks[t as usize].members.len() > 1 {
            let members = self.tasks[t as usize].members.clone();
            let (last, rest) = members
                .split_last()
                .map_or((None, &[][..]), |(l, r)| (Some(l), r));
            // With at-most-once updates each copy is a message of its own:
            // its path names the slot of the worker it goes to (the same
            // on a retry, and after a restart, while that slot is taken).
            let path = msg.ctx.path();
            let copy = |mut m: TaskMsg, slot: u32| {
                if path != 0 {
                    m.ctx = m
                        .ctx
                        .with_path(crate::msg::output_path(path, ALL_COPIES, slot));
                }
                m
            };
            for &(slot, w) in rest {
                self.own(w)
                    .push_back(copy(msg.clone(), slot), pool, ended_early);
            }
            if let Some(&(slot, w)) = last {
                self.own(w).push_back(copy(msg, slot), pool, ended_early);
            }
            return;
        }
        self.route_one(t, grouping, msg, pool, ended_early);
    }

    /// How many copies an `all` edge makes of a message for task `t`.
    pub fn copies(&self, t: TaskIdx) -> u32 {
        self.tasks[t as usize].members.len().max(1) as u32
    }

    /// The worker of task `t` that `msg` goes to by `grouping` (one copy
    /// for `All`: the lowest slot's), if the task has a live worker.
    fn target(&self, t: TaskIdx, grouping: Grouping, msg: &TaskMsg) -> Option<WorkerId> {
        let members = &self.tasks[t as usize].members;
        let slot = match grouping {
            Grouping::Key => owner(key(msg), members.iter().map(|&(s, _)| s))?,
            Grouping::PartialKey => {
                let (a, b) = two_owners(key(msg), members.iter().map(|&(s, _)| s))?;
                let load = |s: u32| {
                    members
                        .iter()
                        .find(|&&(m, _)| m == s)
                        .map_or(usize::MAX, |&(_, w)| self.own_len(w))
                };
                if load(b) < load(a) {
                    b
                } else {
                    a
                }
            }
            Grouping::Shuffle | Grouping::All | Grouping::Global => members.first()?.0,
        };
        members.iter().find(|&&(s, _)| s == slot).map(|&(_, w)| w)
    }

    /// Queues one message: to its worker, or unrouted.
    fn route_one(
        &mut self,
        t: TaskIdx,
        grouping: Grouping,
        msg: TaskMsg,
        pool: &mut Vec<Vec<TaskMsg>>,
        ended_early: u64,
    ) {
        match self.target(t, grouping, &msg) {
            Some(w) => self.own(w).push_back(msg, pool, ended_early),
            None => self.tasks[t as usize].unrouted.push_back(msg),
        }
    }

    /// Puts `msgs` (pinned, put back: undelivered or returned) at the front
    /// of their workers' queues, in order.
    pub fn put_back(&mut self, t: TaskIdx, msgs: Vec<TaskMsg>) {
        let mut by_worker: Vec<(Option<WorkerId>, Vec<TaskMsg>)> = Vec::new();
        for m in msgs {
            let w = self.target(t, self.grouping_of(t, &m), &m);
            match by_worker.iter_mut().find(|(o, _)| *o == w) {
                Some((_, v)) => v.push(m),
                None => by_worker.push((w, vec![m])),
            }
        }
        for (w, v) in by_worker {
            match w {
                Some(w) => self.own(w).push_front_all(v),
                None => {
                    let unrouted = &mut self.tasks[t as usize].unrouted;
                    for m in v.into_iter().rev() {
                        unrouted.push_front(m);
                    }
                }
            }
        }
    }

    /// Worker `w` of task `t` is live: it takes the lowest free slot, and
    /// the queued messages it now owns move to it.
    pub fn join(&mut self, t: TaskIdx, w: WorkerId, pool: &mut Vec<Vec<TaskMsg>>) -> (u32, Moved) {
        let members = &mut self.tasks[t as usize].members;
        let slot = (0..)
            .find(|s| members.iter().all(|&(m, _)| m != *s))
            .unwrap_or(0);
        let at = members.partition_point(|&(s, _)| s < slot);
        members.insert(at, (slot, w));
        let others: Vec<WorkerId> = members
            .iter()
            .map(|&(_, m)| m)
            .filter(|&m| m != w)
            .collect();
        let mut moved = 0;
        for other in others {
            let queue: Vec<TaskMsg> = self.own(other).take_all().collect();
            let mut stay = Vec::new();
            let mut go = Vec::new();
            for m in queue {
                if self.target(t, self.grouping_of(t, &m), &m) == Some(w) {
                    go.push(m);
                } else {
                    stay.push(m);
                }
            }
            moved += go.len();
            self.own(other).push_front_all(stay);
            for m in go {
                self.own(w).push_back(m, pool, super::ready::UNCHECKED);
            }
        }
        let unrouted = std::mem::take(&mut self.tasks[t as usize].unrouted);
        moved += unrouted.len();
        for m in unrouted {
            let g = self.grouping_of(t, &m);
            self.route_one(t, g, m, pool, super::ready::UNCHECKED);
        }
        let workers = self.tasks[t as usize].members.len();
        (
            slot,
            Moved {
                msgs: moved,
                workers,
            },
        )
    }

    /// Worker `w` of task `t` is gone: what was queued for it is routed
    /// over the others (a copy of an `all` message to the lowest slot).
    pub fn leave(&mut self, t: TaskIdx, w: WorkerId, pool: &mut Vec<Vec<TaskMsg>>) -> Moved {
        self.tasks[t as usize].members.retain(|&(_, m)| m != w);
        let queue: Vec<TaskMsg> = self.own(w).take_all().collect();
        let mut moved = 0;
        for m in queue {
            moved += 1;
            let g = self.grouping_of(t, &m);
            self.route_one(t, g, m, pool, super::ready::UNCHECKED);
        }
        Moved {
            msgs: moved,
            workers: self.tasks[t as usize].members.len(),
        }
    }
}

/// A message's key as routing reads it: an empty one for a message without
/// (the pipeline refuses those on keyed edges before they get here).
fn key(msg: &TaskMsg) -> &[u8] {
    msg.ctx.key().map_or(&[][..], |k| &k[..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{MsgCtx, Ticket};
    use crate::task::PassOn;
    use crate::Pipeline;
    use bytes::Bytes;

    /// a -key-> b, a -all-> c, a -global-> d.
    fn routes() -> Routes {
        let dag = Pipeline::new()
            .task(PassOn("a"))
            .task(PassOn("b"))
            .task(PassOn("c"))
            .task(PassOn("d"))
            .edge_by("a", "b", Grouping::Key)
            .edge_by("a", "c", Grouping::All)
            .edge_by("a", "d", Grouping::Global)
            .build()
            .unwrap();
        Routes::new(Arc::new(dag))
    }

    fn msg(t: TaskIdx, key: &str, i: u32) -> TaskMsg {
        let mut ctx = MsgCtx::new(u64::from(i)).with_key(Bytes::copy_from_slice(key.as_bytes()));
        ctx.parent = crate::msg::Parent { task: 0, name: 0 };
        TaskMsg {
            ticket: Ticket::new(i, 0, t),
            payload: Bytes::new(),
            ctx,
        }
    }

    fn drain(r: &mut Routes, w: WorkerId) -> Vec<u32> {
        let q = r.own(w);
        let mut out = Vec::new();
        while let Some(m) = q.pop_front() {
            out.push(m.ticket.slot);
        }
        out
    }

    #[test]
    fn a_key_goes_to_one_worker_in_order_and_moves_to_a_new_owner() {
        let mut r = routes();
        let mut pool = Vec::new();
        r.join(1, 10, &mut pool);
        r.join(1, 11, &mut pool);
        for i in 0..100 {
            let k = format!("k{}", i % 10);
            r.route(1, Grouping::Key, msg(1, &k, i), &mut pool, 0);
        }
        assert_eq!(r.queued(1), 100);
        // Each key's messages sit with one worker, in the order routed.
        let mut seen = std::collections::HashMap::new();
        for w in [10, 11] {
            let q: Vec<TaskMsg> = r.own(w).iter().cloned().collect();
            let mut last = std::collections::HashMap::new();
            for m in q {
                let k = m.ctx.key_str().unwrap().to_string();
                assert_eq!(*seen.entry(k.clone()).or_insert(w), w, "{k} on two workers");
                if let Some(prev) = last.insert(k, m.ticket.slot) {
                    assert!(prev < m.ticket.slot, "out of order");
                }
            }
        }
        // A third worker takes only keys from the others, and whole keys.
        let (slot, moved) = r.join(1, 12, &mut pool);
        assert_eq!(slot, 2);
        assert_eq!(moved.workers, 3);
        assert_eq!(r.queued(1), 100);
        assert_eq!(r.own_len(12), moved.msgs);
        assert_eq!(moved.msgs % 10, 0, "whole keys move: 10 messages per key");
        // It leaves: its messages go back over the other two.
        let back = r.leave(1, 12, &mut pool);
        assert_eq!(back.msgs, moved.msgs);
        assert_eq!(r.queued(1), 100);
        let total = drain(&mut r, 10).len() + drain(&mut r, 11).len();
        assert_eq!(total, 100);
    }

    #[test]
    fn all_copies_to_every_worker_and_global_to_the_lowest_slot() {
        let mut r = routes();
        let mut pool = Vec::new();
        for w in [20, 21, 22] {
            r.join(2, w, &mut pool);
            r.join(3, w + 10, &mut pool);
        }
        assert_eq!(r.copies(2), 3);
        r.route(2, Grouping::All, msg(2, "x", 1), &mut pool, 0);
        for w in [20, 21, 22] {
            assert_eq!(drain(&mut r, w), [1]);
        }
        for i in 0..5 {
            r.route(3, Grouping::Global, msg(3, "x", i), &mut pool, 0);
        }
        assert_eq!(drain(&mut r, 30), [0, 1, 2, 3, 4]);
        r.leave(3, 30, &mut pool);
        r.route(3, Grouping::Global, msg(3, "x", 9), &mut pool, 0);
        assert_eq!(drain(&mut r, 31), [9], "the next lowest slot");
    }

    #[test]
    fn messages_wait_unrouted_until_a_worker_joins_and_slots_are_reused() {
        let mut r = routes();
        let mut pool = Vec::new();
        r.route(1, Grouping::Key, msg(1, "a", 1), &mut pool, 0);
        assert_eq!(r.copies(1), 1);
        assert_eq!(r.queued(1), 1);
        let (slot, moved) = r.join(1, 5, &mut pool);
        assert_eq!((slot, moved.msgs), (0, 1));
        assert_eq!(drain(&mut r, 5), [1]);
        r.join(1, 6, &mut pool);
        r.leave(1, 5, &mut pool);
        let (slot, _) = r.join(1, 7, &mut pool);
        assert_eq!(
            slot, 0,
            "the freed slot, so a restarted worker gets its keys back"
        );
        assert_eq!(r.slot_of(1, 6), Some(1));
    }
}
