//! The built-in stores with the runtime attached: [`InMemoryPagableStorage`] and
//! `SqliteBackedPagableStorage`, and the constructors that return them.

#[cfg(feature = "sqlite")]
use std::path::Path;

use super::WithRuntime;
#[cfg(feature = "sqlite")]
use crate::remote::{RemoteStore, TieredNodeStore, TieredOptions};
use crate::store::memory::MemoryNodeStore;
#[cfg(feature = "sqlite")]
use crate::store::sqlite::{SqliteNodeStore, SqliteOptions};

/// The in-memory node store with the runtime attached: a
/// [`PagableStorage`](crate::PagableStorage) that keeps every node in memory.
///
/// ```
/// use pagestore::{InMemoryPagableStorage, PagableData, PagableStorage};
///
/// let storage = InMemoryPagableStorage::new();
/// let leaf = storage.store_data(PagableData { data: b"leaf".to_vec(), arcs: vec![] })?;
/// let root = storage.store_data(PagableData { data: b"root".to_vec(), arcs: vec![leaf, leaf] })?;
/// assert_eq!(storage.fetch_data_blocking(&root)?.arcs, [leaf, leaf]);
/// assert_eq!(storage.len(), 2);
/// # anyhow::Ok(())
/// ```
pub type InMemoryPagableStorage = WithRuntime<MemoryNodeStore>;

impl InMemoryPagableStorage {
    /// An empty in-memory store with the runtime attached.
    pub fn new() -> Self {
        WithRuntime::attach(MemoryNodeStore::new())
    }
}

impl Default for InMemoryPagableStorage {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "sqlite")]
/// The SQLite node store with the runtime attached: a
/// [`PagableStorage`](crate::PagableStorage) that keeps nodes in a SQLite database,
/// `dir/pagable.db`. Methods of the store itself ([`verify`](SqliteNodeStore::verify),
/// [`open_report`](SqliteNodeStore::open_report), …) are called on it directly.
///
/// ```
/// use pagestore::{PagableData, PagableStorage, SqliteBackedPagableStorage};
///
/// let dir = tempfile::tempdir()?;
/// let storage = SqliteBackedPagableStorage::try_new(dir.path())?;
/// let leaf = storage.store_data(PagableData { data: b"leaf".to_vec(), arcs: vec![] })?;
/// let root = storage.store_data(PagableData { data: b"root".to_vec(), arcs: vec![leaf] })?;
/// // Readable at once, before any flush.
/// assert_eq!(storage.fetch_data_blocking(&root)?.arcs, [leaf]);
/// storage.flush()?;
/// assert!(storage.verify()?.is_ok());
/// drop(storage); // flushes, closes cleanly
///
/// let reopened = SqliteBackedPagableStorage::try_new(dir.path())?;
/// assert!(reopened.open_report().is_clean());
/// assert_eq!(reopened.fetch_data_blocking(&leaf)?.data, b"leaf");
/// # anyhow::Ok(())
/// ```
///
/// One store per directory: opening a second one on the same directory, in this process or
/// another, fails with [`Error::Io`](crate::Error::Io) until the first is dropped. Stores
/// opened with [`SqliteOptions::read_only`] are not counted: any number of them can read
/// beside the writer.
pub type SqliteBackedPagableStorage = WithRuntime<SqliteNodeStore>;

#[cfg(feature = "sqlite")]
impl SqliteBackedPagableStorage {
    /// Opens (creating if needed) the store in `dir` with default options:
    /// `SqliteOptions::default().open(dir)`.
    pub fn try_new(dir: impl AsRef<Path>) -> anyhow::Result<Self> {
        SqliteOptions::default().open(dir)
    }
}

#[cfg(feature = "sqlite")]
impl SqliteOptions {
    /// Opens (creating if needed) the store in `dir`, whose database is `dir/pagable.db`.
    ///
    /// Errors: [`Error::Io`](crate::Error::Io) naming the path when the directory cannot be
    /// created or is a file; [`Error::NotWritable`](crate::Error::NotWritable) when this
    /// process cannot write in the directory (a read-only open can still read it);
    /// [`Error::Sqlite`](crate::Error::Sqlite) when SQLite cannot open or set up the database.
    pub fn open(self, dir: impl AsRef<Path>) -> anyhow::Result<SqliteBackedPagableStorage> {
        let runtime = self.clone();
        Ok(runtime.attach_runtime(self.open_node_store(dir)?))
    }

    /// `store` with the runtime attached, set up with these options' memory budget and
    /// collection grace.
    fn attach_runtime<S: crate::NodeStore>(&self, store: S) -> WithRuntime<S> {
        let storage = WithRuntime::attach(store).memory_budget(self.memory_budget_bytes());
        match self.gc_grace_period() {
            Some(grace) => storage.gc_grace(grace),
            None => storage,
        }
    }
}

#[cfg(feature = "sqlite")]
/// A local SQLite store in front of a shared remote, with the runtime attached: a
/// [`PagableStorage`](crate::PagableStorage) whose graphs other machines page in by a
/// root's name. Methods of the tiered store ([`wait_for_upload`](TieredNodeStore::wait_for_upload),
/// [`tiered_stats`](TieredNodeStore::tiered_stats), …) and, with [`NodeStore`](crate::NodeStore)
/// in scope, the roots are called on it directly.
///
/// ```
/// use std::sync::Arc;
/// use pagestore::remote::MemoryRemoteStore;
/// use pagestore::{page_in, page_out, NodeStore, PagableStorage, Shared, TieredStorage};
///
/// let remote = Arc::new(MemoryRemoteStore::new()); // `RedisStore::connect(url)?` in real use
/// let (here, there) = (tempfile::tempdir()?, tempfile::tempdir()?);
///
/// let storage = Arc::new(TieredStorage::open(here.path(), Arc::clone(&remote))?);
/// let word = Shared::new("shared".to_string());
/// let key = page_out(&storage, &vec![word.clone(), word])?;
/// storage.set_root("build-42", key)?; // published once its graph is remote
/// storage.flush()?;
/// storage.wait_for_upload()?;
///
/// // Another machine, with an empty directory, finds the graph by the root's name.
/// let other = Arc::new(TieredStorage::open(there.path(), remote)?);
/// let root = other.root("build-42")?.expect("published");
/// let back: Vec<Shared<String>> = page_in(&other, root)?;
/// assert!(Shared::ptr_eq(&back[0], &back[1]));
/// # anyhow::Ok(())
/// ```
pub type TieredStorage = WithRuntime<TieredNodeStore>;

#[cfg(feature = "sqlite")]
impl TieredStorage {
    /// Opens (creating if needed) the tiered store in `dir` in front of `remote` with
    /// default options: `TieredOptions::default().open(dir, remote)`.
    pub fn open(dir: impl AsRef<Path>, remote: impl RemoteStore) -> anyhow::Result<Self> {
        TieredOptions::default().open(dir, remote)
    }
}

#[cfg(feature = "sqlite")]
impl TieredOptions {
    /// Opens the tiered store in `dir` in front of `remote`
    /// ([`open_node_store`](Self::open_node_store)) with the runtime attached, its memory
    /// budget and collection grace taken from the [`sqlite`](Self::sqlite) options.
    pub fn open(
        self,
        dir: impl AsRef<Path>,
        remote: impl RemoteStore,
    ) -> anyhow::Result<TieredStorage> {
        let runtime = self.sqlite.clone();
        Ok(runtime.attach_runtime(self.open_node_store(dir, remote)?))
    }
}
