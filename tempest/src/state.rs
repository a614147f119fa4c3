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
//! [`TaskContext::state`]: crate::TaskContext::state

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

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

/// A durable home for keyed state: what a checkpoint writes and a worker
/// loads. Values arrive encoded (postcard); the backend stores bytes.
///
/// `commit` must be atomic: after a crash, either all of one checkpoint's
/// changes are in the backend or none.
pub trait StateBackend: Send + Sync + fmt::Debug {
    /// The values of `keys` in store `store` (`None`: no value), in order.
    fn load(&self, store: &str, keys: &[Bytes]) -> Result<Vec<Option<Bytes>>, StateError>;
    /// Writes `puts` and deletes `removes` in store `store`, atomically.
    fn commit(
        &self,
        store: &str,
        puts: &[(Bytes, Bytes)],
        removes: &[Bytes],
    ) -> Result<(), StateError>;
}

/// A value of a store, and whether it changed since the last checkpoint.
struct Entry<V> {
    value: Option<V>,
    /// 0 if clean; else the store's change number when it last changed
    /// (a checkpoint cleans only entries that did not change again while
    /// it was being written).
    dirty: u64,
}

struct Store<V> {
    /// `task/name`: the backend's name for it.
    name: String,
    entries: HashMap<Bytes, Entry<V>>,
    /// Dirty entries.
    dirty: usize,
    /// Changes so far (the last change's number).
    changes: u64,
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
        let got = b.load(&self.name, std::slice::from_ref(&key))?;
        let value = decode(&self.name, got.into_iter().next().flatten())?;
        self.entries.insert(key, Entry { value, dirty: 0 });
        Ok(())
    }

    fn set(&mut self, key: &[u8], value: Option<V>) {
        if self.backend.is_none() {
            // In memory: nothing to write later, so a removed key leaves
            // no entry.
            match (self.entries.get_mut(key), value) {
                (Some(e), Some(v)) => e.value = Some(v),
                (None, Some(v)) => {
                    self.entries.insert(
                        Bytes::copy_from_slice(key),
                        Entry {
                            value: Some(v),
                            dirty: 0,
                        },
                    );
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
                self.entries.insert(
                    Bytes::copy_from_slice(key),
                    Entry {
                        value,
                        dirty: change,
                    },
                );
                self.dirty += 1;
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

/// A handle to one keyed store of a task: `get`, `put`, `update` and
/// `remove` by key. Cheap to clone; every clone is the same store.
///
/// A handle's calls fail only with a durable backend (a load that fails);
/// in memory they cannot fail.
pub struct KeyedState<V> {
    store: Arc<Shared<V>>,
}

impl<V> Clone for KeyedState<V> {
    fn clone(&self) -> Self {
        KeyedState {
            store: Arc::clone(&self.store),
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

    /// The value of `key`, if it has one.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<V>, StateError> {
        let key = key.as_ref();
        let mut s = self.lock();
        s.load(key)?;
        Ok(s.entries.get(key).and_then(|e| e.value.clone()))
    }

    /// Sets the value of `key`.
    pub fn put(&self, key: impl AsRef<[u8]>, value: V) {
        self.lock().set(key.as_ref(), Some(value));
    }

    /// Replaces the value of `key` with what `f` makes of it (`None`
    /// removes it); returns the new value.
    pub fn update(
        &self,
        key: impl AsRef<[u8]>,
        f: impl FnOnce(Option<V>) -> Option<V>,
    ) -> Result<Option<V>, StateError> {
        let key = key.as_ref();
        let mut s = self.lock();
        s.load(key)?;
        let old = s.entries.get_mut(key).and_then(|e| e.value.take());
        let new = f(old);
        s.set(key, new.clone());
        Ok(new)
    }

    /// Removes `key`'s value; returns it.
    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<Option<V>, StateError> {
        let key = key.as_ref();
        let mut s = self.lock();
        s.load(key)?;
        let old = s.entries.get_mut(key).and_then(|e| e.value.take());
        s.set(key, None);
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
    /// Drops the clean entries and loads `keys` (those not dirty) in one
    /// round trip.
    fn refresh(&self, keys: &[Bytes]) -> Result<(), StateError>;
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

    fn checkpoint(&self) -> Result<usize, StateError> {
        let _one_at_a_time = self.commit.lock().unwrap_or_else(PoisonError::into_inner);
        let mut puts = Vec::new();
        let mut removes = Vec::new();
        let mut written = Vec::new();
        let (backend, name) = {
            let s = self.lock();
            let Some(backend) = s.backend.clone() else {
                return Ok(0);
            };
            if s.dirty == 0 {
                return Ok(0);
            }
            for (k, e) in s.entries.iter().filter(|(_, e)| e.dirty > 0) {
                match &e.value {
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
            (backend, s.name.clone())
        };
        backend.commit(&name, &puts, &removes)?;
        let mut s = self.lock();
        for (k, change) in written {
            if let Some(e) = s.entries.get_mut(&k) {
                if e.dirty == change {
                    e.dirty = 0;
                    s.dirty -= 1;
                }
            }
        }
        Ok(puts.len() + removes.len())
    }

    fn refresh(&self, keys: &[Bytes]) -> Result<(), StateError> {
        let (backend, name, mut missing) = {
            let mut s = self.lock();
            let Some(backend) = s.backend.clone() else {
                return Ok(());
            };
            s.entries.retain(|_, e| e.dirty > 0);
            let missing: Vec<Bytes> = keys
                .iter()
                .filter(|k| !s.entries.contains_key(&k[..]))
                .cloned()
                .collect();
            (backend, s.name.clone(), missing)
        };
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        let values = backend.load(&name, &missing)?;
        let mut s = self.lock();
        for (k, v) in missing.into_iter().zip(values) {
            // A key set meanwhile (or loaded by another worker) is newer.
            if s.entries.contains_key(&k) {
                continue;
            }
            let value = decode(&name, v)?;
            s.entries.insert(k, Entry { value, dirty: 0 });
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
        }
    }

    pub fn is_durable(&self) -> bool {
        self.backend.is_some()
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
        WorkerStates {
            registry,
            used: Arc::default(),
        }
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
        Ok(KeyedState { store })
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

    /// Before a batch: drops clean entries and loads these keys.
    pub fn refresh(&self, keys: &[Bytes]) -> Result<(), StateError> {
        let used = self.used().clone();
        for s in used {
            s.refresh(keys)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend in a map, counting commits.
    #[derive(Debug, Default)]
    struct MapBackend {
        data: Mutex<HashMap<(String, Bytes), Bytes>>,
        commits: Mutex<u32>,
        fail: Mutex<bool>,
    }

    impl StateBackend for MapBackend {
        fn load(&self, store: &str, keys: &[Bytes]) -> Result<Vec<Option<Bytes>>, StateError> {
            let d = self.data.lock().unwrap();
            Ok(keys
                .iter()
                .map(|k| d.get(&(store.to_string(), k.clone())).cloned())
                .collect())
        }
        fn commit(
            &self,
            store: &str,
            puts: &[(Bytes, Bytes)],
            removes: &[Bytes],
        ) -> Result<(), StateError> {
            if *self.fail.lock().unwrap() {
                return Err(StateError::new(store, "down"));
            }
            let mut d = self.data.lock().unwrap();
            for (k, v) in puts {
                d.insert((store.to_string(), k.clone()), v.clone());
            }
            for k in removes {
                d.remove(&(store.to_string(), k.clone()));
            }
            *self.commits.lock().unwrap() += 1;
            Ok(())
        }
    }

    #[test]
    fn in_memory_state_is_shared_by_the_workers_of_a_run() {
        let reg = StateRegistry::new(None);
        let (a, b) = (WorkerStates::new(reg.clone()), WorkerStates::new(reg));
        let sa = a.handle::<u64>("count", "words").unwrap();
        let sb = b.handle::<u64>("count", "words").unwrap();
        sa.put("x", 1);
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
        s.put("a", 1);
        s.put("b", 2);
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
        w2.refresh(&[Bytes::from_static(b"a"), Bytes::from_static(b"b")])
            .unwrap();
        assert_eq!(s2.get("a").unwrap(), None);
        assert_eq!(s2.get("b").unwrap(), Some(20));
    }

    #[test]
    fn a_failed_checkpoint_keeps_the_changes_for_the_next() {
        let backend = Arc::new(MapBackend::default());
        let w = WorkerStates::new(StateRegistry::new(Some(backend.clone())));
        let s = w.handle::<u64>("t", "s").unwrap();
        s.put("k", 7);
        *backend.fail.lock().unwrap() = true;
        assert!(w.checkpoint().is_err());
        assert!(w.is_dirty());
        // A refresh keeps what is dirty.
        w.refresh(&[Bytes::from_static(b"k")]).unwrap();
        assert_eq!(s.get("k").unwrap(), Some(7));
        *backend.fail.lock().unwrap() = false;
        assert_eq!(w.checkpoint().unwrap(), 1);
        // Clean now: a refresh drops it, and it is read back.
        w.refresh(&[]).unwrap();
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
