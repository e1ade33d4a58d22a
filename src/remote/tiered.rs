//! [`TieredNodeStore`]: a local SQLite store in front of a shared remote.
//!
//! Reads go to the local store first; a key it lacks is fetched from the remote with
//! everything below it that the local store lacks, a level of keys per round trip, checked
//! against its key, and stored locally (the local store is the remote's cache). Writes go
//! to the local store only and never wait for the network: an uploader thread sends them
//! on, children before parents, and publishes a root once its whole graph is remote. What
//! is waiting to go survives a restart (the upload queue is a file of its own).
//!
//! A remote that fails is retried a few times, then left alone behind a circuit breaker
//! until a probe finds it back: meanwhile everything the local store holds is read and
//! written as usual, uploads wait, and only what needs the remote fails
//! ([`Error::RemoteUnavailable`]). Nothing a remote sends or fails to send can damage the
//! local store.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::data::PagableData;
use crate::error::Error;
use crate::key::DataKey;
use crate::remote::RemoteStore;
use crate::store::sqlite::{SqliteNodeStore, SqliteOptions};
use crate::store::{NodeStore, StoreStats};

mod guard;
mod queue;
mod transfer;
mod uploader;

pub use guard::BreakerState;
use guard::{GuardPolicy, Guarded};
use queue::{Entry, UploadQueue};
use uploader::Uploader;

/// How to open a [`TieredNodeStore`] (or a [`TieredStorage`](crate::TieredStorage)): a
/// consuming builder whose every setter says its default.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use pagestore::remote::MemoryRemoteStore;
/// use pagestore::{SqliteOptions, TieredOptions};
///
/// let dir = tempfile::tempdir()?;
/// let storage = TieredOptions::default()
///     .sqlite(SqliteOptions::default().readers(2))
///     .retries(1)
///     .breaker_cooldown(Duration::from_secs(2))
///     .open(dir.path(), Arc::new(MemoryRemoteStore::new()))?;
/// # drop(storage);
/// # anyhow::Ok(())
/// ```
#[derive(Debug, Clone)]
pub struct TieredOptions {
    pub(crate) sqlite: SqliteOptions,
    policy: GuardPolicy,
}

impl Default for TieredOptions {
    fn default() -> Self {
        TieredOptions {
            sqlite: SqliteOptions::default(),
            policy: GuardPolicy {
                retries: 2,
                backoff: Duration::from_millis(50),
                failures_to_open: 3,
                cooldown: Duration::from_millis(500),
                max_cooldown: Duration::from_secs(30),
            },
        }
    }
}

impl TieredOptions {
    /// The local store's options. Default: `SqliteOptions::default()`.
    pub fn sqlite(mut self, options: SqliteOptions) -> Self {
        self.sqlite = options;
        self
    }

    /// How many times a failed remote call is tried again before it counts as a failure.
    /// Default 2. Each attempt waits at most the remote's own timeout.
    pub fn retries(mut self, retries: u32) -> Self {
        self.policy.retries = retries;
        self
    }

    /// The pause before the first retry; it doubles with each further one. Default 50 ms.
    pub fn retry_backoff(mut self, backoff: Duration) -> Self {
        self.policy.backoff = backoff;
        self
    }

    /// How many failed calls in a row (each after its retries) open the circuit breaker,
    /// after which calls fail at once instead of waiting for the remote. Default 3.
    pub fn breaker_threshold(mut self, failures: u32) -> Self {
        self.policy.failures_to_open = failures.max(1);
        self
    }

    /// How long an open breaker waits before its first probe; each failed probe doubles
    /// it, up to 30 s. Default 500 ms.
    pub fn breaker_cooldown(mut self, cooldown: Duration) -> Self {
        self.policy.cooldown = cooldown;
        self.policy.max_cooldown = self.policy.max_cooldown.max(cooldown);
        self
    }

    /// Opens (creating if needed) the local store in `dir` (`dir/pagable.db`, and the
    /// upload queue `dir/upload-queue.db`) in front of `remote`, and starts the uploader,
    /// which begins with whatever an earlier run left queued. Opening does not contact the
    /// remote.
    pub fn open_node_store(
        self,
        dir: impl AsRef<Path>,
        remote: impl RemoteStore,
    ) -> anyhow::Result<TieredNodeStore> {
        let dir = dir.as_ref();
        let local = self.sqlite.open_node_store(dir)?;
        let queue = UploadQueue::open(dir)?;
        let tiers = Arc::new(Tiers {
            local,
            remote: Guarded::new(Box::new(remote), self.policy),
            queue,
            stats: Counters::default(),
        });
        let uploader = Uploader::start(Arc::clone(&tiers))?;
        Ok(TieredNodeStore { tiers, uploader })
    }
}

/// What the store and its uploader thread share.
pub(crate) struct Tiers {
    local: SqliteNodeStore,
    remote: Guarded,
    queue: UploadQueue,
    stats: Counters,
}

#[derive(Debug, Default)]
struct Counters {
    local_hits: AtomicU64,
    filled: AtomicU64,
    remote_misses: AtomicU64,
    bytes_down: AtomicU64,
    bytes_up: AtomicU64,
    uploaded: AtomicU64,
    upload_skipped: AtomicU64,
    roots_published: AtomicU64,
    verification_failures: AtomicU64,
}

/// The figures of a [`TieredNodeStore`] since it was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TieredStats {
    /// Reads the local store answered.
    pub local_hits: u64,
    /// Nodes fetched from the remote and stored locally.
    pub filled: u64,
    /// Keys the remote was asked for and did not hold.
    pub remote_misses: u64,
    /// Record bytes fetched from the remote.
    pub bytes_down: u64,
    /// Record bytes sent to the remote.
    pub bytes_up: u64,
    /// Nodes sent to the remote.
    pub uploaded: u64,
    /// Nodes not sent because a node below them is in neither store (deleted locally by a
    /// garbage collection and never uploaded).
    pub upload_skipped: u64,
    /// Roots published on the remote.
    pub roots_published: u64,
    /// Records from the remote that did not decode or hash to their key (never stored).
    pub verification_failures: u64,
    /// Entries (stored nodes, root changes) waiting for the uploader.
    pub queue_depth: u64,
    /// Whether the remote is being asked.
    pub breaker: BreakerState,
}

/// A [`NodeStore`] made of a local SQLite store in front of a remote one: the node store of
/// [`TieredStorage`](crate::TieredStorage). Reads fill the local store from the remote
/// (checked against their keys), writes stay local and an uploader thread sends them on,
/// children first; `docs/remote.md` says how it reads, uploads and rides out a remote
/// that fails.
///
/// Keeps the node-store contract over both tiers: a node is stored if either holds it
/// ([`get`](NodeStore::get) fetches it from the remote if need be), and a node may name a
/// child that only the remote holds ([`put`](NodeStore::put) fetches it first). Roots set
/// here are read here first; a root this store never set is read from the remote, so a
/// root published by another machine is found by name. [`scan`](NodeStore::scan) and the
/// stats concern the local store.
///
/// Garbage collection through [`NodeStore::collect_garbage`] is
/// [`Unsupported`](Error::Unsupported): nothing here can say what the remote's other users
/// need. The local store is a cache: `local().gc()` deletes from it what its roots do not
/// reach (what was uploaded stays on the remote and comes back on the next read).
pub struct TieredNodeStore {
    // Dropped first: the uploader stops (queue kept) before the local store closes.
    uploader: Uploader,
    tiers: Arc<Tiers>,
}

impl std::fmt::Debug for TieredNodeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TieredNodeStore")
            .field("local", &self.tiers.local.path())
            .field("remote", &self.tiers.remote.describe())
            .finish_non_exhaustive()
    }
}

impl TieredNodeStore {
    /// Opens the store in `dir` in front of `remote` with default options:
    /// `TieredOptions::default().open_node_store(dir, remote)`.
    pub fn open(dir: impl AsRef<Path>, remote: impl RemoteStore) -> anyhow::Result<Self> {
        TieredOptions::default().open_node_store(dir, remote)
    }

    /// The local store.
    pub fn local(&self) -> &SqliteNodeStore {
        &self.tiers.local
    }

    /// Blocks until everything stored and every root change made before this call is on
    /// the remote (roots published). Fails if an upload fails meanwhile — with
    /// [`Error::RemoteUnavailable`] while the breaker is open; what was not sent stays
    /// queued and goes once the remote is back, so calling again later is safe.
    pub fn wait_for_upload(&self) -> anyhow::Result<()> {
        self.tiers.queue.persist()?;
        match self.tiers.queue.last_seq()? {
            None => Ok(()),
            Some(target) => self.uploader.wait_until_uploaded(&self.tiers, target),
        }
    }

    /// Fetches `keys` and everything below them from the remote into the local store, a
    /// level of keys per round trip; keys already local cost no round trip. Reads do this
    /// on their own for a key the local store lacks; call it to warm a store ahead of use.
    pub fn prefetch(&self, keys: &[DataKey]) -> anyhow::Result<()> {
        transfer::fill(&self.tiers, keys)
    }

    /// The store's figures since it was opened.
    pub fn tiered_stats(&self) -> anyhow::Result<TieredStats> {
        let c = &self.tiers.stats;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Ok(TieredStats {
            local_hits: get(&c.local_hits),
            filled: get(&c.filled),
            remote_misses: get(&c.remote_misses),
            bytes_down: get(&c.bytes_down),
            bytes_up: get(&c.bytes_up),
            uploaded: get(&c.uploaded),
            upload_skipped: get(&c.upload_skipped),
            roots_published: get(&c.roots_published),
            verification_failures: get(&c.verification_failures),
            queue_depth: self.tiers.queue.len()?,
            breaker: self.tiers.remote.state(),
        })
    }

    /// Reads `key` locally, filling it from the remote first if the local store lacks it.
    fn read(&self, key: &DataKey) -> anyhow::Result<Arc<PagableData>> {
        match self.tiers.local.get(key) {
            Ok(node) => {
                self.tiers.stats.local_hits.fetch_add(1, Ordering::Relaxed);
                Ok(node)
            }
            Err(e) if Error::is_not_found(&e) => {
                transfer::fill(&self.tiers, std::slice::from_ref(key))?;
                self.tiers.local.get(key)
            }
            Err(e) => Err(e),
        }
    }

    /// Makes sure the local store holds `key` (and so its graph), from the remote if need be.
    fn hold_locally(&self, key: &DataKey) -> anyhow::Result<()> {
        if self.tiers.local.contains(key)? {
            return Ok(());
        }
        transfer::fill(&self.tiers, std::slice::from_ref(key))
    }
}

#[async_trait::async_trait]
impl NodeStore for TieredNodeStore {
    fn put(&self, node: PagableData) -> anyhow::Result<DataKey> {
        // One lookup for all the children (usually all local); the local `put` checks again
        // under its collection gate.
        for child in &self.tiers.local.missing_of(&node.arcs)? {
            if let Err(e) = transfer::fill(&self.tiers, std::slice::from_ref(child)) {
                return Err(if Error::is_not_found(&e) {
                    Error::MissingChild {
                        key: node.compute_key(),
                        child: *child,
                    }
                    .into()
                } else {
                    e
                });
            }
        }
        let key = self.tiers.local.put(node)?;
        self.tiers.queue.push(Entry::Node(key));
        Ok(key)
    }

    fn get(&self, key: &DataKey) -> anyhow::Result<Arc<PagableData>> {
        self.read(key)
    }

    async fn get_many_async(&self, keys: &[DataKey]) -> anyhow::Result<Vec<Arc<PagableData>>> {
        match self.tiers.local.get_many_async(keys).await {
            Err(e) if Error::is_not_found(&e) => {}
            done => {
                if done.is_ok() {
                    self.tiers
                        .stats
                        .local_hits
                        .fetch_add(keys.len() as u64, Ordering::Relaxed);
                }
                return done;
            }
        }
        // Some are remote only: fetch them all in one fill (a level per round trip), off
        // the async worker, then read the batch locally.
        let fill = {
            let (tiers, keys) = (Arc::clone(&self.tiers), keys.to_vec());
            move || transfer::fill(&tiers, &keys)
        };
        #[cfg(feature = "tokio")]
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => runtime.spawn_blocking(fill).await??,
            Err(_) => fill()?,
        }
        #[cfg(not(feature = "tokio"))]
        fill()?;
        self.tiers.local.get_many_async(keys).await
    }

    fn contains(&self, key: &DataKey) -> anyhow::Result<bool> {
        if self.tiers.local.contains(key)? {
            return Ok(true);
        }
        let missing = self.tiers.remote.call(|r| r.find_missing(&[*key]))?;
        Ok(missing.is_empty())
    }

    /// Queues for upload durably, then flushes the local store: what a flush made durable
    /// locally is uploaded even if the process stops before the uploader got to it.
    fn flush(&self) -> anyhow::Result<()> {
        self.tiers.queue.persist()?;
        self.tiers.local.flush()?;
        self.uploader.control().wake();
        Ok(())
    }

    fn scan(
        &self,
        visit: &mut dyn FnMut(DataKey, anyhow::Result<PagableData>) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        self.tiers.local.scan(visit)
    }

    /// Sets the root locally (fetching its graph from the remote if only the remote holds
    /// it) and queues its publication, which happens once its whole graph is remote.
    fn set_root(&self, name: &str, key: DataKey) -> anyhow::Result<()> {
        self.hold_locally(&key)?;
        self.tiers.local.set_root(name, key)?;
        self.tiers.queue.push(Entry::SetRoot(name.to_owned(), key));
        Ok(())
    }

    /// The root set here if there is one; none if it was removed here (its removal may not
    /// have reached the remote yet); else the remote's (which needs the remote).
    fn root(&self, name: &str) -> anyhow::Result<Option<DataKey>> {
        if let Some(key) = self.tiers.local.root(name)? {
            return Ok(Some(key));
        }
        if self.tiers.queue.removes_root(name)? {
            return Ok(None);
        }
        self.tiers.remote.call(|r| r.root(name))
    }

    /// The remote's roots with this store's over them, sorted by name (needs the remote).
    fn roots(&self) -> anyhow::Result<Vec<(String, DataKey)>> {
        let mut roots = std::collections::BTreeMap::new();
        for (name, key) in self.tiers.remote.call(|r| r.roots())? {
            if !self.tiers.queue.removes_root(&name)? {
                roots.insert(name, key);
            }
        }
        roots.extend(self.tiers.local.roots()?);
        Ok(roots.into_iter().collect())
    }

    /// Removes the root here and queues its removal from the remote; says whether it
    /// existed. Only a root this store does not have is looked up on the remote (and
    /// removed there too if it is found).
    fn remove_root(&self, name: &str) -> anyhow::Result<bool> {
        let existed = self.tiers.local.remove_root(name)?
            || (!self.tiers.queue.removes_root(name)?
                && self.tiers.remote.call(|r| r.root(name))?.is_some());
        if existed {
            self.tiers.queue.push(Entry::RemoveRoot(name.to_owned()));
        }
        Ok(existed)
    }

    fn release_memory(&self) {
        self.tiers.local.release_memory();
    }

    fn gc_epoch(&self) -> u64 {
        self.tiers.local.gc_epoch()
    }

    fn protect(&self, key: &DataKey) {
        self.tiers.local.protect(key);
    }

    fn store_stats(&self) -> anyhow::Result<Option<StoreStats>> {
        self.tiers.local.store_stats()
    }
}
