//! Keyed state: a map per task and name that a task's workers read and
//! change by key, kept in memory, optionally checkpointed to a durable
//! [`StateBackend`].
//!
//! A worker gets a handle in `started` ([`TaskContext::state`]) and keeps
//! it. The stores of a run (one `standalone` run, or one `task` process)
//! are shared by its workers: with `key` grouping each key is handled by
//! one worker, so a key's value is only ever changed by its owner.
//!
//! With a durable backend, the store is a cache over the backend: a key
//! not in it is loaded on first use (a batch's message keys in one round
//! trip before the batch runs), changes are written to the backend in one
//! atomic checkpoint every `checkpoint_interval`, and the worker holds
//! back its results until the checkpoint holding their changes is
//! written, so a source message is acked only once what it changed is
//! durable. Clean entries are dropped before each batch and loaded again
//! when used: a key that moved to another worker and back is read fresh.
//!
//!
//! With [at-most-once updates] the worker tells the stores which message
//! it is handling ([`UpdateId`]: the source message's id and the message's
//! [path]). The first change a message makes to a store records the
//! update as applied there, and the record is written with the store's
//! checkpoint, in the same atomic commit; a message whose update a store
//! already holds (handled before a failure, or by an earlier attempt)
//! changes nothing in that store. The topology drops a source message's
//! records once the source has acked it ([`StateBackend::forget`]).
//!
//! [`TaskContext::state`]: crate::TaskContext::state
//! [at-most-once updates]: crate::TopologyBuilder::at_most_once_updates
//! [path]: crate::MsgCtx::path

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tempest_source::MsgId;

/// A failure of a state backend, or of encoding a value for it.
#[derive(Debug, thiserror::Error)]
#[error("state {store:?}: {message}")]
pub struct StateError {
    /// The store (`task/name`).
    pub store: String,
    /// What went wrong.
    pub message: String,
}

impl StateError {
    /// An error of store `store`.
    pub fn new(store: impl Into<String>, message: impl Into<String>) -> Self {
        StateError {
            store: store.into(),
            message: message.into(),
        }
    }
}

/// One message's updates, for applying them at most once: the source
/// message it derives from and its place in that message's processing
/// ([`MsgCtx::path`](crate::MsgCtx::path)). The same on every attempt and
/// every redelivery of the source message.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UpdateId {
    /// The source message's id.
    pub source: MsgId,
    /// The message's path.
    pub path: u64,
}

impl UpdateId {
    /// Its source message's id as bytes, for a backend's records: a tag
    /// (`i` an integer, `b` bytes), then the integer big-endian or the
    /// bytes' length (`u32` big-endian) and the bytes. Every record of one
    /// source message starts with this, and no other's does.
    pub fn source_prefix(source: &MsgId) -> Vec<u8> {
        match source {
            MsgId::Int(n) => {
                let mut v = Vec::with_capacity(9);
                v.push(b'i');
                v.extend_from_slice(&n.to_be_bytes());
                v
            }
            MsgId::Bytes(b) => {
                // Ids are far below 4 GiB (a frame could not carry more).
                let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
                let mut v = Vec::with_capacity(5 + b.len());
                v.push(b'b');
                v.extend_from_slice(&len.to_be_bytes());
                v.extend_from_slice(b);
                v
            }
        }
    }

    /// The update's record in store `store`: [`source_prefix`](Self::source_prefix),
    /// the store's name, a zero byte, and the path (8 bytes big-endian).
    pub fn record(&self, store: &str) -> Vec<u8> {
        let mut v = Self::source_prefix(&self.source);
        v.extend_from_slice(store.as_bytes());
        v.push(0);
        v.extend_from_slice(&self.path.to_be_bytes());
        v
    }
}

/// What one checkpoint writes to a store: values, removals, and (with
/// at-most-once updates) the updates now applied.
#[derive(Clone, Copy, Debug, Default)]
pub struct Changes<'a> {
    /// Keys and their new values.
    pub puts: &'a [(Bytes, Bytes)],
    /// Keys removed.
    pub removes: &'a [Bytes],
    /// Updates the changes hold: recorded as applied in this store, in the
    /// same atomic commit.
    pub applied: &'a [UpdateId],
}

impl Changes<'_> {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.removes.is_empty() && self.applied.is_empty()
    }
}

/// What a load found: a value per key asked for, and per update asked
/// for, whether the store has it applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    /// The values of the keys, in order (`None`: no value).
    pub values: Vec<Option<Bytes>>,
    /// Whether each update is recorded as applied, in order.
    pub applied: Vec<bool>,
}

/// A durable home for keyed state: what a checkpoint writes and a worker
/// loads. Values arrive encoded (postcard); the backend stores bytes.
///
/// `commit` must be atomic: after a crash, either all of one checkpoint's
/// changes are in the backend or none. A backend that can record applied
/// updates (see [`records_updates`](Self::records_updates)) writes them in
/// that same commit, and answers for them in `load`.
pub trait StateBackend: Send + Sync + fmt::Debug {
    /// The values of `keys` in store `store`, and whether each of `updates`
    /// is recorded as applied there, in one round trip where it can.
    fn load(&self, store: &str, keys: &[Bytes], updates: &[UpdateId])
        -> Result<Loaded, StateError>;
    /// Writes `changes` to store `store`, atomically.
    fn commit(&self, store: &str, changes: &Changes<'_>) -> Result<(), StateError>;
    /// Whether it records applied updates, so that a topology can apply
    /// updates at most once with it (default: no).
    fn records_updates(&self) -> bool {
        false
    }
    /// Drops the applied-update records of these source messages, in
    /// every store: the source has acked them, so they never come back.
    fn forget(&self, sources: &[MsgId]) -> Result<(), StateError> {
        let _ = sources;
        Ok(())
    }
}

/// A value of a store, and whether it changed since the last checkpoint.
struct Entry<V> {
    value: Option<V>,
    /// 0 if clean; else the store's change number when it last changed
    /// (a checkpoint cleans only entries that did not change again while
    /// it was being written).
    dirty: u64,
    /// At-most-once updates: changed by a handling still in progress —
    /// its number and the value before it, which is what a checkpoint
    /// writes (and what the entry goes back to if the handling fails).
    tx: Option<(u64, Option<V>)>,
}

impl<V> Entry<V> {
    fn new(value: Option<V>, dirty: u64) -> Self {
        Entry {
            value,
            dirty,
            tx: None,
        }
    }

    /// The value a checkpoint may write: the committed one.
    fn committed(&self) -> &Option<V> {
        match &self.tx {
            Some((_, before)) => before,
            None => &self.value,
        }
    }
}

/// What a store knows of one update (at-most-once updates only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Applied {
    /// Not applied here (as of the last load).
    No,
    /// Being applied by the handling numbered `by` (not written by a
    /// checkpoint until it succeeds).
    Claimed { by: u64 },
    /// Applied, by the handling numbered `by` (0: before this run, or in a
    /// handling since ended); `dirty` as for an [`Entry`].
    Yes { by: u64, dirty: u64 },
}

struct Store<V> {
    /// `task/name`: the backend's name for it.
    name: String,
    entries: HashMap<Bytes, Entry<V>>,
    /// At-most-once updates: what is known of the updates of the messages
    /// handled lately (those applied since the last checkpoint stay until
    /// it is written).
    updates: HashMap<UpdateId, Applied>,
    /// Dirty entries and updates.
    dirty: usize,
    /// Changes so far (the last change's number).
    changes: u64,
    /// Changes left undone since last taken (at-most-once updates: the
    /// message's update was applied before).
    skipped: u64,
    /// At-most-once updates: the keys changed by handlings in progress.
    in_progress: Vec<(u64, Bytes)>,
    backend: Option<Arc<dyn StateBackend>>,
}

/// A store, and the lock that keeps its checkpoints one at a time. No
/// backend I/O of a checkpoint or a refresh happens under the store's own
/// lock, so the other workers of the task go on while it is written.
struct Shared<V> {
    store: Mutex<Store<V>>,
    commit: Mutex<()>,
}

impl<V: Serialize + DeserializeOwned + Clone> Store<V> {
    /// Makes sure `key` is loaded (a durable store's miss goes to the
    /// backend).
    fn load(&mut self, key: &[u8]) -> Result<(), StateError> {
        let Some(b) = &self.backend else {
            return Ok(());
        };
        if self.entries.contains_key(key) {
            return Ok(());
        }
        let key = Bytes::copy_from_slice(key);
        let got = b.load(&self.name, std::slice::from_ref(&key), &[])?;
        let value = decode(&self.name, got.values.into_iter().next().flatten())?;
        self.entries.insert(key, Entry::new(value, 0));
        Ok(())
    }

    /// Whether the handling `current` may change this store: yes unless
    /// its update is applied here already by another handling (before a
    /// failure, or an earlier attempt). The first change of a handling
    /// records the update as applied.
    fn may_change(&mut self, current: Option<&Current>) -> Result<bool, StateError> {
        let Some(cur) = current else {
            return Ok(true);
        };
        let known = match self.updates.get(&cur.update) {
            Some(&a) => a,
            None if !cur.maybe_before => Applied::No,
            None => {
                let applied = match &self.backend {
                    Some(b) => {
                        let got = b.load(&self.name, &[], std::slice::from_ref(&cur.update))?;
                        got.applied.first().copied().unwrap_or(false)
                    }
                    None => false,
                };
                if applied {
                    Applied::Yes { by: 0, dirty: 0 }
                } else {
                    Applied::No
                }
            }
        };
        match known {
            Applied::Yes { by, .. } | Applied::Claimed { by } => {
                self.updates.insert(cur.update.clone(), known);
                let mine = by == cur.handling;
                if !mine {
                    self.skipped += 1;
                }
                Ok(mine)
            }
            Applied::No => {
                self.updates
                    .insert(cur.update.clone(), Applied::Claimed { by: cur.handling });
                Ok(true)
            }
        }
    }

    fn set(&mut self, key: &[u8], value: Option<V>) {
        if self.backend.is_none() {
            // In memory: nothing to write later, so a removed key leaves
            // no entry.
            match (self.entries.get_mut(key), value) {
                (Some(e), Some(v)) => e.value = Some(v),
                (None, Some(v)) => {
                    self.entries
                        .insert(Bytes::copy_from_slice(key), Entry::new(Some(v), 0));
                }
                (_, None) => {
                    self.entries.remove(key);
                }
            }
            return;
        }
        self.changes += 1;
        let change = self.changes;
        match self.entries.get_mut(key) {
            Some(e) => {
                if e.dirty == 0 {
                    self.dirty += 1;
                }
                e.dirty = change;
                e.value = value;
            }
            None => {
                self.entries
                    .insert(Bytes::copy_from_slice(key), Entry::new(value, change));
                self.dirty += 1;
            }
        }
    }

    /// Changes `key` for the handling `current` (with at-most-once
    /// updates): at once, so others see it and read-modify-writes stay
    /// atomic, but kept apart from what a checkpoint writes until the
    /// handling ends ([`finish`](Self::finish)).
    fn change(&mut self, key: &[u8], value: Option<V>, current: Option<&Current>) {
        let Some(cur) = current else {
            return self.set(key, value);
        };
        let e = match self.entries.get_mut(key) {
            Some(e) => e,
            None => self
                .entries
                .entry(Bytes::copy_from_slice(key))
                .or_insert_with(|| Entry::new(None, 0)),
        };
        if e.tx.is_none() {
            e.tx = Some((cur.handling, e.value.take()));
            self.in_progress
                .push((cur.handling, Bytes::copy_from_slice(key)));
        }
        // (A key another handling in progress changed first stays with
        // it: it commits or fails both.)
        e.value = value;
    }

    /// The handling `handling` of `update` ended: its changes become what
    /// a checkpoint writes and the update is recorded as applied (`ok`),
    /// or its changes are undone and the update is not recorded, so a
    /// failed handling leaves nothing half done and its retry runs whole.
    fn finish(&mut self, update: &UpdateId, handling: u64, ok: bool) {
        if self.in_progress.iter().any(|(h, _)| *h == handling) {
            let mut mine = Vec::new();
            self.in_progress.retain(|(h, k)| {
                if *h == handling {
                    mine.push(k.clone());
                    false
                } else {
                    true
                }
            });
            for k in mine {
                let Some(e) = self.entries.get_mut(&k) else {
                    continue;
                };
                if !matches!(e.tx, Some((by, _)) if by == handling) {
                    continue;
                }
                let Some((_, before)) = e.tx.take() else {
                    continue;
                };
                if ok {
                    self.changes += 1;
                    if e.dirty == 0 {
                        self.dirty += 1;
                    }
                    e.dirty = self.changes;
                } else {
                    e.value = before;
                }
            }
        }
        if let Some(&Applied::Claimed { by }) = self.updates.get(update) {
            if by == handling {
                if ok {
                    self.changes += 1;
                    self.dirty += 1;
                    let dirty = self.changes;
                    self.updates
                        .insert(update.clone(), Applied::Yes { by, dirty });
                } else {
                    self.updates.remove(update);
                }
            }
        }
    }
}

fn decode<V: DeserializeOwned>(store: &str, bytes: Option<Bytes>) -> Result<Option<V>, StateError> {
    bytes
        .map(|b| {
            postcard::from_bytes(&b).map_err(|e| {
                StateError::new(store, format!("a stored value does not decode ({e})"))
            })
        })
        .transpose()
}

/// The message a worker is handling, with at-most-once updates.
#[derive(Clone, Debug)]
struct Current {
    update: UpdateId,
    /// Unique in the run: tells this handling from another of the same
    /// update (an earlier attempt).
    handling: u64,
    /// Whether the message may have been handled before: if not, its
    /// update cannot be applied yet, and the backend is not asked.
    maybe_before: bool,
}

/// A worker's current message, shared by its store handles.
type CurrentCell = Arc<Mutex<Option<Current>>>;

/// A handle to one keyed store of a task: `get`, `put`, `update` and
/// `remove` by key. Cheap to clone; every clone is the same store.
///
/// A handle's calls fail only with a durable backend (a load that fails);
/// in memory they cannot fail.
///
/// With [at-most-once updates](crate::TopologyBuilder::at_most_once_updates),
/// a message whose changes this store already holds (from its handling
/// before a failure) changes nothing: `put` and `remove` leave the store as
/// it is and `update` does not call its function; `update` and `remove`
/// return the stored value.
pub struct KeyedState<V> {
    store: Arc<Shared<V>>,
    /// With at-most-once updates: the worker's current message.
    current: Option<CurrentCell>,
}

impl<V> Clone for KeyedState<V> {
    fn clone(&self) -> Self {
        KeyedState {
            store: Arc::clone(&self.store),
            current: self.current.clone(),
        }
    }
}

impl<V> fmt::Debug for KeyedState<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedState").finish_non_exhaustive()
    }
}

impl<V: Serialize + DeserializeOwned + Clone + Send + 'static> KeyedState<V> {
    fn lock(&self) -> MutexGuard<'_, Store<V>> {
        self.store.lock()
    }

    /// The worker's current message, with at-most-once updates.
    fn current(&self) -> Option<Current> {
        let cell = self.current.as_ref()?;
        cell.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The value of `key`, if it has one.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<V>, StateError> {
        let key = key.as_ref();
        let mut s = self.lock();
        s.load(key)?;
        Ok(s.entries.get(key).and_then(|e| e.value.clone()))
    }

    /// Sets the value of `key`. (With at-most-once updates, it can fail:
    /// finding out whether the message's update is applied may need the
    /// backend.)
    pub fn put(&self, key: impl AsRef<[u8]>, value: V) -> Result<(), StateError> {
        let current = self.current();
        let mut s = self.lock();
        if s.may_change(current.as_ref())? {
            s.change(key.as_ref(), Some(value), current.as_ref());
        }
        Ok(())
    }

    /// Replaces the value of `key` with what `f` makes of it (`None`
    /// removes it); returns the new value.
    pub fn update(
        &self,
        key: impl AsRef<[u8]>,
        f: impl FnOnce(Option<V>) -> Option<V>,
    ) -> Result<Option<V>, StateError> {
        let key = key.as_ref();
        let current = self.current();
        let mut s = self.lock();
        s.load(key)?;
        if !s.may_change(current.as_ref())? {
            return Ok(s.entries.get(key).and_then(|e| e.value.clone()));
        }
        let old = s.entries.get(key).and_then(|e| e.value.clone());
        let new = f(old);
        s.change(key, new.clone(), current.as_ref());
        Ok(new)
    }

    /// Removes `key`'s value; returns it.
    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<Option<V>, StateError> {
        let key = key.as_ref();
        let current = self.current();
        let mut s = self.lock();
        s.load(key)?;
        if !s.may_change(current.as_ref())? {
            return Ok(s.entries.get(key).and_then(|e| e.value.clone()));
        }
        let old = s.entries.get(key).and_then(|e| e.value.clone());
        s.change(key, None, current.as_ref());
        Ok(old)
    }

    /// Every key and value the store holds in memory (with a durable
    /// backend: those loaded or changed since the last batch began).
    pub fn entries(&self) -> Vec<(Bytes, V)> {
        self.lock()
            .entries
            .iter()
            .filter_map(|(k, e)| Some((k.clone(), e.value.clone()?)))
            .collect()
    }
}

/// What the worker loop does with a store, whatever its value type.
pub(crate) trait Checkpointed: Send + Sync {
    /// Whether it has changes no checkpoint holds yet.
    fn is_dirty(&self) -> bool;
    /// Writes its changes in one commit; they are clean after.
    fn checkpoint(&self) -> Result<usize, StateError>;
    /// Drops the clean entries and loads `keys` (those not dirty), and
    /// whether `updates` are applied, in one round trip. The records of
    /// handlings in progress (claimed, never checkpointed) stay.
    fn refresh(&self, keys: &[Bytes], updates: &[UpdateId]) -> Result<(), StateError>;
    /// The changes left undone since last asked (at-most-once updates).
    fn take_skipped(&self) -> u64;
    /// A handling ended (at-most-once updates): see [`Store::finish`].
    fn finish(&self, update: &UpdateId, handling: u64, ok: bool);
}

impl<V> Shared<V> {
    fn lock(&self) -> MutexGuard<'_, Store<V>> {
        // Every critical section leaves the store consistent.
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<V: Serialize + DeserializeOwned + Clone + Send + 'static> Checkpointed for Shared<V> {
    fn is_dirty(&self) -> bool {
        self.lock().dirty > 0
    }

    fn take_skipped(&self) -> u64 {
        std::mem::take(&mut self.lock().skipped)
    }

    fn finish(&self, update: &UpdateId, handling: u64, ok: bool) {
        self.lock().finish(update, handling, ok);
    }

    fn checkpoint(&self) -> Result<usize, StateError> {
        let _one_at_a_time = self.commit.lock().unwrap_or_else(PoisonError::into_inner);
        let mut puts = Vec::new();
        let mut removes = Vec::new();
        let mut written = Vec::new();
        let mut applied = Vec::new();
        let mut applied_written = Vec::new();
        let (backend, name) = {
            let s = self.lock();
            let Some(backend) = s.backend.clone() else {
                return Ok(0);
            };
            if s.dirty == 0 {
                return Ok(0);
            }
            for (k, e) in s.entries.iter().filter(|(_, e)| e.dirty > 0) {
                // A change of a handling in progress waits for it.
                match e.committed() {
                    Some(v) => {
                        let bytes = postcard::to_allocvec(v).map_err(|err| {
                            StateError::new(&s.name, format!("a value does not encode ({err})"))
                        })?;
                        puts.push((k.clone(), Bytes::from(bytes)));
                    }
                    None => removes.push(k.clone()),
                }
                written.push((k.clone(), e.dirty));
            }
            for (u, a) in &s.updates {
                if let Applied::Yes { dirty, .. } = *a {
                    if dirty > 0 {
                        applied.push(u.clone());
                        applied_written.push(dirty);
                    }
                }
            }
            (backend, s.name.clone())
        };
        backend.commit(
            &name,
            &Changes {
                puts: &puts,
                removes: &removes,
                applied: &applied,
            },
        )?;
        let mut s = self.lock();
        for (k, change) in written {
            if let Some(e) = s.entries.get_mut(&k) {
                if e.dirty == change {
                    e.dirty = 0;
                    s.dirty -= 1;
                }
            }
        }
        for (u, change) in applied.into_iter().zip(applied_written) {
            if let Some(Applied::Yes { dirty, .. }) = s.updates.get_mut(&u) {
                if *dirty == change {
                    *dirty = 0;
                    s.dirty -= 1;
                }
            }
        }
        Ok(puts.len() + removes.len())
    }

    fn refresh(&self, keys: &[Bytes], updates: &[UpdateId]) -> Result<(), StateError> {
        let (backend, name, mut missing, mut unknown) = {
            let mut s = self.lock();
            let Some(backend) = s.backend.clone() else {
                return Ok(());
            };
            s.entries.retain(|_, e| e.dirty > 0 || e.tx.is_some());
            // What a checkpoint holds is read again when needed (another
            // process may have handled the message since); what no
            // checkpoint holds yet stays.
            s.updates.retain(|_, a| match *a {
                Applied::Yes { dirty, .. } => dirty > 0,
                // In progress: it commits or fails later.
                Applied::Claimed { .. } => true,
                Applied::No => false,
            });
            let missing: Vec<Bytes> = keys
                .iter()
                .filter(|k| !s.entries.contains_key(&k[..]))
                .cloned()
                .collect();
            let unknown: Vec<UpdateId> = updates
                .iter()
                .filter(|u| !s.updates.contains_key(u))
                .cloned()
                .collect();
            (backend, s.name.clone(), missing, unknown)
        };
        missing.sort_unstable();
        missing.dedup();
        unknown.dedup();
        if missing.is_empty() && unknown.is_empty() {
            return Ok(());
        }
        let loaded = backend.load(&name, &missing, &unknown)?;
        if loaded.values.len() != missing.len() || loaded.applied.len() != unknown.len() {
            return Err(StateError::new(
                &name,
                format!(
                    "the backend answered {} values and {} update records for {} keys and {} updates",
                    loaded.values.len(),
                    loaded.applied.len(),
                    missing.len(),
                    unknown.len()
                ),
            ));
        }
        let mut s = self.lock();
        for (k, v) in missing.into_iter().zip(loaded.values) {
            // A key set meanwhile (or loaded by another worker) is newer.
            if s.entries.contains_key(&k) {
                continue;
            }
            let value = decode(&name, v)?;
            s.entries.insert(k, Entry::new(value, 0));
        }
        for (u, applied) in unknown.into_iter().zip(loaded.applied) {
            s.updates.entry(u).or_insert(if applied {
                Applied::Yes { by: 0, dirty: 0 }
            } else {
                Applied::No
            });
        }
        Ok(())
    }
}

/// The stores of one run, shared by its workers, and the backend they
/// checkpoint to.
#[derive(Clone, Default)]
pub(crate) struct StateRegistry {
    stores: Arc<Mutex<HashMap<String, Arc<dyn Any + Send + Sync>>>>,
    backend: Option<Arc<dyn StateBackend>>,
    /// Whether updates are applied at most once.
    at_most_once: bool,
    /// Numbers the handlings of messages (for at-most-once updates).
    handlings: Arc<AtomicU64>,
}

impl fmt::Debug for StateRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateRegistry")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl StateRegistry {
    pub fn new(backend: Option<Arc<dyn StateBackend>>) -> Self {
        StateRegistry {
            stores: Arc::default(),
            backend,
            at_most_once: false,
            handlings: Arc::default(),
        }
    }

    /// The registry applying each update at most once (its backend must
    /// record applied updates: the topology checks when it is built).
    pub fn at_most_once(mut self, on: bool) -> Self {
        self.at_most_once = on;
        self
    }

    pub fn is_durable(&self) -> bool {
        self.backend.is_some()
    }

    pub fn is_at_most_once(&self) -> bool {
        self.at_most_once
    }

    /// Store `name` of task `task`, made on first use. `None` if it exists
    /// with another value type.
    fn store<V: Serialize + DeserializeOwned + Clone + Send + 'static>(
        &self,
        task: &str,
        name: &str,
    ) -> Option<Arc<Shared<V>>> {
        let full = format!("{task}/{name}");
        let mut stores = self.stores.lock().unwrap_or_else(PoisonError::into_inner);
        let any = stores
            .entry(full.clone())
            .or_insert_with(|| {
                Arc::new(Shared {
                    store: Mutex::new(Store::<V> {
                        name: full,
                        entries: HashMap::new(),
                        updates: HashMap::new(),
                        skipped: 0,
                        in_progress: Vec::new(),
                        dirty: 0,
                        changes: 0,
                        backend: self.backend.clone(),
                    }),
                    commit: Mutex::new(()),
                }) as Arc<dyn Any + Send + Sync>
            })
            .clone();
        any.downcast::<Shared<V>>().ok()
    }
}

/// The stores one worker uses, for its loop to checkpoint and refresh.
#[derive(Clone, Default)]
pub(crate) struct WorkerStates {
    registry: StateRegistry,
    used: Arc<Mutex<Vec<Arc<dyn Checkpointed>>>>,
    /// With at-most-once updates: the message being handled.
    current: Option<CurrentCell>,
}

impl fmt::Debug for WorkerStates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerStates")
            .field("durable", &self.registry.is_durable())
            .finish_non_exhaustive()
    }
}

impl WorkerStates {
    pub fn new(registry: StateRegistry) -> Self {
        let current = registry.at_most_once.then(CurrentCell::default);
        WorkerStates {
            registry,
            used: Arc::default(),
            current,
        }
    }

    /// Whether updates are applied at most once: the worker names each
    /// message it handles ([`begin`](Self::begin)) and gives its outputs
    /// paths.
    pub fn at_most_once(&self) -> bool {
        self.current.is_some()
    }

    /// The handling of the current message ended: its changes stand and
    /// its update is recorded if it succeeded (`ok`), else its changes are
    /// undone. Then no message is current.
    pub fn end(&self, ok: bool) {
        let Some(cell) = &self.current else { return };
        let Some(cur) = cell.lock().unwrap_or_else(PoisonError::into_inner).take() else {
            return;
        };
        let used = self.used().clone();
        for s in used {
            s.finish(&cur.update, cur.handling, ok);
        }
    }

    /// The worker handles the message of `ctx` now (`None`: a tick, whose
    /// changes always apply). A handling not ended yet ends as succeeded.
    pub fn begin(&self, ctx: Option<&crate::msg::MsgCtx>) {
        self.end(true);
        let Some(cell) = &self.current else { return };
        let next = ctx.map(|c| Current {
            update: UpdateId {
                source: c.id().clone(),
                path: c.path(),
            },
            handling: self.registry.handlings.fetch_add(1, Ordering::Relaxed) + 1,
            maybe_before: c.maybe_handled_before(),
        });
        *cell.lock().unwrap_or_else(PoisonError::into_inner) = next;
    }

    fn used(&self) -> MutexGuard<'_, Vec<Arc<dyn Checkpointed>>> {
        self.used.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A handle to store `name` of `task`, which this worker now uses.
    pub fn handle<V: Serialize + DeserializeOwned + Clone + Send + 'static>(
        &self,
        task: &str,
        name: &str,
    ) -> Result<KeyedState<V>, StateError> {
        let store = self.registry.store::<V>(task, name).ok_or_else(|| {
            StateError::new(
                format!("{task}/{name}"),
                format!(
                    "already opened with another value type than {}",
                    std::any::type_name::<V>()
                ),
            )
        })?;
        let erased: Arc<dyn Checkpointed> = store.clone();
        let mut used = self.used();
        if !used.iter().any(|u| Arc::ptr_eq(u, &erased)) {
            used.push(erased);
        }
        Ok(KeyedState {
            store,
            current: self.current.clone(),
        })
    }

    /// Whether the worker's results must wait for checkpoints.
    pub fn is_durable(&self) -> bool {
        self.registry.is_durable() && !self.used().is_empty()
    }

    /// Whether a store it uses has changes no checkpoint holds.
    pub fn is_dirty(&self) -> bool {
        self.used().iter().any(|s| s.is_dirty())
    }

    /// Checkpoints every store it uses; the number of keys written.
    pub fn checkpoint(&self) -> Result<usize, StateError> {
        let used = self.used().clone();
        let mut n = 0;
        for s in used {
            n += s.checkpoint()?;
        }
        Ok(n)
    }

    /// The changes to its stores left undone since last asked, because
    /// their message's update was applied before (at-most-once updates).
    pub fn take_skipped(&self) -> u64 {
        if self.current.is_none() {
            return 0;
        }
        self.used().iter().map(|s| s.take_skipped()).sum()
    }

    /// Before a batch: drops clean entries and loads these keys, and
    /// (with at-most-once updates) whether these updates are applied.
    pub fn refresh(&self, keys: &[Bytes], updates: &[UpdateId]) -> Result<(), StateError> {
        let used = self.used().clone();
        for s in used {
            s.refresh(keys, updates)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend in maps, counting commits and loads.
    #[derive(Debug, Default)]
    struct MapBackend {
        data: Mutex<HashMap<(String, Bytes), Bytes>>,
        applied: Mutex<std::collections::BTreeSet<Vec<u8>>>,
        commits: Mutex<u32>,
        loads: Mutex<u32>,
        fail: Mutex<bool>,
    }

    impl StateBackend for MapBackend {
        fn load(
            &self,
            store: &str,
            keys: &[Bytes],
            updates: &[UpdateId],
        ) -> Result<Loaded, StateError> {
            *self.loads.lock().unwrap() += 1;
            let d = self.data.lock().unwrap();
            let a = self.applied.lock().unwrap();
            Ok(Loaded {
                values: keys
                    .iter()
                    .map(|k| d.get(&(store.to_string(), k.clone())).cloned())
                    .collect(),
                applied: updates
                    .iter()
                    .map(|u| a.contains(&u.record(store)))
                    .collect(),
            })
        }
        fn commit(&self, store: &str, changes: &Changes<'_>) -> Result<(), StateError> {
            if *self.fail.lock().unwrap() {
                return Err(StateError::new(store, "down"));
            }
            let mut d = self.data.lock().unwrap();
            for (k, v) in changes.puts {
                d.insert((store.to_string(), k.clone()), v.clone());
            }
            for k in changes.removes {
                d.remove(&(store.to_string(), k.clone()));
            }
            let mut a = self.applied.lock().unwrap();
            for u in changes.applied {
                a.insert(u.record(store));
            }
            *self.commits.lock().unwrap() += 1;
            Ok(())
        }
        fn records_updates(&self) -> bool {
            true
        }
        fn forget(&self, sources: &[MsgId]) -> Result<(), StateError> {
            let mut a = self.applied.lock().unwrap();
            for id in sources {
                let prefix = UpdateId::source_prefix(id);
                a.retain(|r| !r.starts_with(&prefix));
            }
            Ok(())
        }
    }

    fn at_most_once(backend: &Arc<MapBackend>) -> WorkerStates {
        let backend: Arc<dyn StateBackend> = backend.clone();
        WorkerStates::new(StateRegistry::new(Some(backend)).at_most_once(true))
    }

    fn msg(id: u64, path: u64) -> crate::msg::MsgCtx {
        crate::msg::MsgCtx::new(id).with_path(path)
    }

    fn add(s: &KeyedState<u64>, key: &str) -> Option<u64> {
        s.update(key, |v| Some(v.unwrap_or(0) + 1)).unwrap()
    }

    #[test]
    fn at_most_once_a_message_handled_again_changes_nothing() {
        let backend = Arc::new(MapBackend::default());
        let w = at_most_once(&backend);
        assert!(w.at_most_once());
        let s = w.handle::<u64>("count", "words").unwrap();
        // One handling may change a key several times, and several keys.
        w.begin(Some(&msg(1, 7)));
        assert_eq!(add(&s, "a"), Some(1));
        assert_eq!(add(&s, "a"), Some(2));
        s.put("b", 10).unwrap();
        // The same message handled again (a retry) before any checkpoint:
        // nothing changes, and `update` answers the stored value.
        w.begin(Some(&msg(1, 7)));
        assert_eq!(add(&s, "a"), Some(2));
        s.put("b", 99).unwrap();
        assert_eq!(s.remove("b").unwrap(), Some(10));
        assert_eq!(s.get("b").unwrap(), Some(10));
        // Another place in the same source message's processing, and
        // another source message, are other updates.
        w.begin(Some(&msg(1, 8)));
        assert_eq!(add(&s, "a"), Some(3));
        w.begin(Some(&msg(2, 7)));
        assert_eq!(add(&s, "a"), Some(4));
        // A tick's changes always apply.
        w.begin(None);
        assert_eq!(add(&s, "a"), Some(5));
        w.checkpoint().unwrap();
        assert_eq!(backend.applied.lock().unwrap().len(), 3);

        // A restarted process: the checkpoint holds the values and the
        // updates, so a redelivered message (marked as maybe handled
        // before) changes nothing.
        let w2 = at_most_once(&backend);
        let s2 = w2.handle::<u64>("count", "words").unwrap();
        let updates = [UpdateId {
            source: MsgId::Int(1),
            path: 7,
        }];
        w2.refresh(&[Bytes::from_static(b"a")], &updates).unwrap();
        let loads = *backend.loads.lock().unwrap();
        w2.begin(Some(&msg(1, 7).handled_before()));
        assert_eq!(add(&s2, "a"), Some(5));
        // A message never handled before is not looked up at all.
        w2.begin(Some(&msg(3, 7)));
        assert_eq!(add(&s2, "a"), Some(6));
        assert_eq!(
            *backend.loads.lock().unwrap(),
            loads,
            "the refresh answered for the redelivered update, and a first delivery needs none"
        );
        // One marked as maybe handled before that the refresh did not
        // cover is looked up when it first changes the store.
        w2.begin(Some(&msg(4, 7).handled_before()));
        assert_eq!(add(&s2, "a"), Some(7));
        assert_eq!(*backend.loads.lock().unwrap(), loads + 1);

        // Once the source has acked message 1, its records go: a new
        // message that reuses the id (a new entry) counts again.
        backend.forget(&[MsgId::Int(1)]).unwrap();
        assert_eq!(
            backend.applied.lock().unwrap().len(),
            1,
            "message 2's stays"
        );
        let w3 = at_most_once(&backend);
        let s3 = w3.handle::<u64>("count", "words").unwrap();
        w3.begin(Some(&msg(1, 7)));
        assert_eq!(add(&s3, "a"), Some(6));
    }

    /// Regression: another worker's checkpoint wrote a handling's record
    /// and its refresh then dropped it (clean), so the handling's next
    /// change looked the record up, found it, and was left undone.
    #[test]
    fn at_most_once_a_handling_in_progress_keeps_its_record_through_a_peer_s_refresh() {
        let backend = Arc::new(MapBackend::default());
        let shared: Arc<dyn StateBackend> = backend.clone();
        let registry = StateRegistry::new(Some(shared)).at_most_once(true);
        let (a, b) = (
            WorkerStates::new(registry.clone()),
            WorkerStates::new(registry),
        );
        let (sa, sb) = (
            a.handle::<u64>("count", "words").unwrap(),
            b.handle::<u64>("count", "words").unwrap(),
        );
        // B handles a redelivered message: its first change records it.
        b.begin(Some(&msg(1, 7).handled_before()));
        assert_eq!(add(&sb, "x"), Some(1));
        // A, between its runs, checkpoints the store (B's record with it)
        // and refreshes.
        a.checkpoint().unwrap();
        a.refresh(&[], &[]).unwrap();
        // B goes on with the same handling: its second change applies.
        assert_eq!(add(&sb, "y"), Some(1));
        // Once B is done, a later refresh lets the record go (it is in the
        // backend), and a redelivery of the message is skipped.
        b.begin(None);
        a.refresh(&[], &[]).unwrap();
        a.begin(Some(&msg(1, 7).handled_before()));
        assert_eq!(add(&sa, "y"), Some(1));
    }

    /// Regression: a handling that changed one key and then failed left
    /// that change and the update recorded, so its retry changed nothing
    /// and the rest of its work was never done. A failed handling's changes
    /// are undone now, and a checkpoint while it runs writes none of them.
    #[test]
    fn at_most_once_a_failed_handling_leaves_nothing_and_its_retry_runs_whole() {
        let backend = Arc::new(MapBackend::default());
        let w = at_most_once(&backend);
        let s = w.handle::<u64>("t", "s").unwrap();
        s.put("a", 10).unwrap(); // (no message: applies at once)
        w.checkpoint().unwrap();
        w.begin(Some(&msg(9, 1)));
        assert_eq!(add(&s, "a"), Some(11));
        assert_eq!(s.get("a").unwrap(), Some(11), "it sees its own change");
        // A checkpoint now writes none of the handling's changes.
        w.checkpoint().unwrap();
        let stored = |k: &'static [u8]| {
            backend
                .data
                .lock()
                .unwrap()
                .get(&("t/s".to_string(), Bytes::from_static(k)))
                .map(|v| postcard::from_bytes::<u64>(v).unwrap())
        };
        assert_eq!(stored(b"a"), Some(10));
        assert!(backend.applied.lock().unwrap().is_empty());
        w.end(false); // `handle` failed after changing "a"
        assert_eq!(s.get("a").unwrap(), Some(10), "its change is undone");
        // The retry does all of it.
        w.begin(Some(&msg(9, 1).with_attempt(2)));
        assert_eq!(add(&s, "a"), Some(11));
        assert_eq!(add(&s, "b"), Some(1));
        w.end(true);
        w.checkpoint().unwrap();
        assert_eq!((stored(b"a"), stored(b"b")), (Some(11), Some(1)));
        assert_eq!(backend.applied.lock().unwrap().len(), 1);
        // And a third time changes nothing.
        w.begin(Some(&msg(9, 1).with_attempt(3)));
        assert_eq!(add(&s, "a"), Some(11));
        w.end(true);
        assert_eq!(s.get("a").unwrap(), Some(11));
    }

    #[test]
    fn at_most_once_a_failed_checkpoint_keeps_the_update_applied() {
        let backend = Arc::new(MapBackend::default());
        let w = at_most_once(&backend);
        let s = w.handle::<u64>("t", "s").unwrap();
        w.begin(Some(&msg(5, 1)));
        assert_eq!(add(&s, "k"), Some(1));
        w.end(true);
        *backend.fail.lock().unwrap() = true;
        assert!(w.checkpoint().is_err());
        assert!(w.is_dirty());
        // The next batch's refresh keeps what no checkpoint holds yet.
        w.refresh(
            &[],
            &[UpdateId {
                source: MsgId::Int(5),
                path: 1,
            }],
        )
        .unwrap();
        w.begin(Some(&msg(5, 1)));
        assert_eq!(add(&s, "k"), Some(1));
        *backend.fail.lock().unwrap() = false;
        w.checkpoint().unwrap();
        assert!(!w.is_dirty());
        assert_eq!(backend.applied.lock().unwrap().len(), 1);
    }

    #[test]
    fn update_records_of_one_source_are_one_prefix() {
        let id = |b: &'static [u8]| MsgId::Bytes(Bytes::from_static(b));
        let r = UpdateId {
            source: id(b"1-0"),
            path: 3,
        }
        .record("count/words");
        assert!(r.starts_with(&UpdateId::source_prefix(&id(b"1-0"))));
        assert!(!r.starts_with(&UpdateId::source_prefix(&id(b"1-"))));
        assert!(!r.starts_with(&UpdateId::source_prefix(&MsgId::Int(1))));
        let prefix = UpdateId::source_prefix(&id(b"1-0"));
        // What Redis's lexical range relies on: a record sorts after its
        // prefix and before the prefix with 0xff after it.
        let mut upper = prefix.clone();
        upper.push(0xff);
        assert!(r > prefix && r < upper);
        // Long ids are told apart however long.
        let long = |last: u8| {
            let mut b = vec![b'x'; 70_000];
            b.push(last);
            UpdateId::source_prefix(&MsgId::Bytes(Bytes::from(b)))
        };
        assert_ne!(long(b'1'), long(b'2'));
    }

    #[test]
    fn in_memory_state_is_shared_by_the_workers_of_a_run() {
        let reg = StateRegistry::new(None);
        let (a, b) = (WorkerStates::new(reg.clone()), WorkerStates::new(reg));
        let sa = a.handle::<u64>("count", "words").unwrap();
        let sb = b.handle::<u64>("count", "words").unwrap();
        sa.put("x", 1).unwrap();
        assert_eq!(sb.update("x", |v| v.map(|v| v + 1)).unwrap(), Some(2));
        assert_eq!(sa.get("x").unwrap(), Some(2));
        assert_eq!(sa.remove("x").unwrap(), Some(2));
        assert_eq!(sb.get("x").unwrap(), None);
        assert!(sb.entries().is_empty());
        assert!(!a.is_durable());
        assert!(!a.is_dirty());
        let err = a.handle::<String>("count", "words").unwrap_err();
        assert!(err.to_string().contains("another value type"), "{err}");
    }

    #[test]
    fn a_durable_store_loads_misses_and_checkpoints_only_changes() {
        let backend = Arc::new(MapBackend::default());
        let reg = StateRegistry::new(Some(backend.clone()));
        let w = WorkerStates::new(reg.clone());
        let s = w.handle::<u64>("count", "words").unwrap();
        assert!(w.is_durable());
        s.put("a", 1).unwrap();
        s.put("b", 2).unwrap();
        assert!(w.is_dirty());
        assert_eq!(w.checkpoint().unwrap(), 2);
        assert!(!w.is_dirty());
        assert_eq!(w.checkpoint().unwrap(), 0, "nothing changed");
        assert_eq!(*backend.commits.lock().unwrap(), 1);
        s.remove("a").unwrap();
        s.update("b", |v| v.map(|v| v * 10)).unwrap();
        assert_eq!(w.checkpoint().unwrap(), 2);
        // Another run (a restarted process) loads what was checkpointed.
        let w2 = WorkerStates::new(StateRegistry::new(Some(backend.clone())));
        let s2 = w2.handle::<u64>("count", "words").unwrap();
        w2.refresh(&[Bytes::from_static(b"a"), Bytes::from_static(b"b")], &[])
            .unwrap();
        assert_eq!(s2.get("a").unwrap(), None);
        assert_eq!(s2.get("b").unwrap(), Some(20));
    }

    #[test]
    fn a_failed_checkpoint_keeps_the_changes_for_the_next() {
        let backend = Arc::new(MapBackend::default());
        let w = WorkerStates::new(StateRegistry::new(Some(backend.clone())));
        let s = w.handle::<u64>("t", "s").unwrap();
        s.put("k", 7).unwrap();
        *backend.fail.lock().unwrap() = true;
        assert!(w.checkpoint().is_err());
        assert!(w.is_dirty());
        // A refresh keeps what is dirty.
        w.refresh(&[Bytes::from_static(b"k")], &[]).unwrap();
        assert_eq!(s.get("k").unwrap(), Some(7));
        *backend.fail.lock().unwrap() = false;
        assert_eq!(w.checkpoint().unwrap(), 1);
        // Clean now: a refresh drops it, and it is read back.
        w.refresh(&[], &[]).unwrap();
        assert!(s.entries().is_empty());
        assert_eq!(s.get("k").unwrap(), Some(7));
    }

    #[test]
    fn a_value_that_does_not_decode_is_an_error_naming_the_store() {
        let backend = Arc::new(MapBackend::default());
        backend.data.lock().unwrap().insert(
            ("t/s".to_string(), Bytes::from_static(b"k")),
            Bytes::from_static(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"),
        );
        let w = WorkerStates::new(StateRegistry::new(Some(backend)));
        let s = w.handle::<u64>("t", "s").unwrap();
        let err = s.get("k").unwrap_err().to_string();
        assert!(
            err.starts_with("state \"t/s\": a stored value does not decode"),
            "{err}"
        );
    }
}
