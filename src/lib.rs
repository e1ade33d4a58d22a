//! Page `Arc`-shared object graphs out to a content-addressed store and back in, with sharing
//! preserved.
//!
//! Large programs (build systems, compilers, language servers) hold huge graphs of
//! `Arc`-shared data. pagestore stores each distinct shared value once, as a node keyed by a
//! hash of its bytes *and its children's keys* (a Merkle DAG), and rebuilds the graph with the
//! same sharing. Mark shared fields [`Shared<T>`], derive serde as usual, and call
//! [`page_out`] and [`page_in`]:
//!
//! ```
//! use std::sync::Arc;
//! use serde::{Deserialize, Serialize};
//! use pagestore::{page_in, page_out, PagableStorage, Shared, SqliteBackedPagableStorage};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Module {
//!     name: String,
//!     imports: Vec<Shared<Module>>,
//! }
//!
//! let dir = tempfile::tempdir()?;
//! let storage = Arc::new(SqliteBackedPagableStorage::try_new(dir.path())?);
//!
//! let core = Shared::new(Module { name: "core".into(), imports: vec![] });
//! let app = Module { name: "app".into(), imports: vec![core.clone(), core] };
//! let key = page_out(&storage, &app)?; // `core` is stored once
//! storage.flush()?;
//!
//! let back: Module = page_in(&storage, key)?;
//! assert!(Shared::ptr_eq(&back.imports[0], &back.imports[1]), "sharing survives");
//! assert_eq!(back.imports[0].name, "core");
//! # anyhow::Ok(())
//! ```
//!
//! # Two layers
//!
//! - **The node store** ([`NodeStore`]) keeps bytes by key: [`PagableData`] nodes under their
//!   [`DataKey`]. [`SqliteNodeStore`] (one SQLite file, in the format of `pagable` 0.3.3) and
//!   [`MemoryNodeStore`] implement it; so can your own backend. It also keeps named roots
//!   ([`NodeStore::set_root`]), committed after the nodes stored before them.
//! - **The runtime** ([`WithRuntime`]) holds what concerns live values: the arc cache that
//!   makes a node loaded twice come back as the *same* `Arc`, the pager (memory budget and
//!   eviction of [`PagableArc`] values) and the session context. Attached to a node store it is a [`PagableStorage`], the trait the
//!   graph layer and the seed's users work with. [`SqliteBackedPagableStorage`] and
//!   [`InMemoryPagableStorage`] are the two built-in stores with it attached.
//!
//! # Where to start
//!
//! - **Typed graphs**: [`page_out`], [`page_in`] and [`page_in_async`]; the [`graph`] module
//!   docs say how a graph is stored, the rules shared values follow, and how `dyn Trait`
//!   values page through `typetag`.
//! - **Paging**: [`PagableArc<T>`] values leave memory under a byte budget
//!   ([`SqliteOptions::memory_budget`], [`WithRuntime::memory_budget`]) and come back when
//!   pinned; [`WithRuntime::page_out_unpinned`] pages out everything unpinned now, and
//!   [`WithRuntime::paging_stats`] says what happened.
//! - **Persistence**: [`SqliteBackedPagableStorage::try_new`], or [`SqliteOptions`] for the
//!   [`Durability`] mode and sizes.
//! - **Raw nodes**: [`PagableStorage::store_data`] and
//!   [`fetch_data_blocking`](PagableStorage::fetch_data_blocking).
//! - **Maintenance**: named roots ([`NodeStore::set_root`], [`root`](NodeStore::root),
//!   [`roots`](NodeStore::roots), [`remove_root`](NodeStore::remove_root), on a
//!   [`WithRuntime`] through `Deref` with [`NodeStore`] in scope) say which graphs to keep;
//!   [`WithRuntime::gc`] deletes what neither they nor this process need, safely while other
//!   threads work ([`NodeStore::collect_garbage`] for a store alone);
//!   [`WithRuntime::stats`] gives the figures.
//! - **Many machines**: [`TieredStorage`] puts the local SQLite store in front of a shared
//!   remote ([`remote::RemoteStore`]; Redis with the `redis` feature): reads fill the local
//!   store from the remote, checked against their keys; writes stay local and an uploader
//!   sends them on, children first, publishing a root once its graph is remote.
//! - **Another backend**: implement [`NodeStore`], attach it with [`WithRuntime::attach`],
//!   and run the contract suite of [`testing`] (feature `testing`) on it.
//!
//! # Guarantees
//!
//! - A key is the blake3-128 hash of a node's content and children's keys, byte-for-byte the
//!   one `pagable` 0.3.3 computes; records use its encoding (see [`codec`]).
//! - Read-your-writes: once a store returns, every thread can fetch the key.
//! - The arc cache holds values weakly and loads each `(TypeId, DataKey)` at most once at a
//!   time; it never keeps a value alive.
//! - Bad bytes are typed errors ([`Error`]), never panics; with verify-on-read (the SQLite
//!   store's default) a damaged record is never returned as data.
//!
//! # Features
//!
//! - **`sqlite`** (default): [`SqliteNodeStore`] and [`SqliteBackedPagableStorage`], which
//!   build SQLite from source (through `rusqlite`'s `bundled`). Turn it off to use only the
//!   in-memory store or your own.
//! - **`tokio`** (default): async fetches from SQLite run on tokio's blocking pool, so an
//!   async caller never stalls a runtime worker. Without it they read inline.
//! - **`serde_with`**: [`graph::AsShared`], a `serde_with` adapter that pages plain `Arc<T>`
//!   fields as shared children inside `Vec`, `Option`, maps, … (`#[serde_as(as =
//!   "Vec<AsShared>")]`). Without it, `Arc<T>` fields still page through the
//!   [`graph::arc`] `with` module, and [`Shared<T>`] needs neither.
//! - **`redis`**: [`remote::RedisStore`], a remote tier on a Redis server or a Redis Cluster
//!   (the `redis` crate's blocking client; no async runtime). docs/remote.md gives its key
//!   layout and the server settings it needs.
//! - **`testing`**: the [`testing`] module, the contract suites a node store or a
//!   `PagableStorage` passes.
//! - **`cli`**: the `pagestore` command (`src/bin/pagestore.rs`), which inspects a SQLite
//!   store (`stats`, `verify`, `roots`, `cat`, `tree`) and maintains it (`gc`, `compact`). The library itself does not use its
//!   dependencies (clap, indicatif, serde_json).

#![warn(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod codec;
mod data;
mod erase;
mod error;
pub mod graph;
mod key;
pub mod remote;
mod runtime;
mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use data::PagableData;
pub use erase::{ArcEraseDyn, WeakEraseDyn, downcast_arc};
pub use error::Error;
pub use graph::{
    PagableArc, Shared, StorageHandle, drop_deep, page_in, page_in_async, page_in_shared, page_out,
};
pub use key::{DataKey, ParseKeyError};
#[cfg(feature = "sqlite")]
pub use remote::{TieredNodeStore, TieredOptions};
pub use runtime::{
    DEFAULT_GC_GRACE, InMemoryPagableStorage, PagableStorage, PageOutReport, PagingStats,
    SessionContext, StorageStats, WithRuntime,
};
#[cfg(feature = "sqlite")]
pub use runtime::{SqliteBackedPagableStorage, TieredStorage};
pub use store::memory::MemoryNodeStore;
#[cfg(feature = "sqlite")]
pub use store::sqlite::{
    Durability, OpenReport, SqliteNodeStore, SqliteOptions, TableLayout, VerifyReport,
};
pub use store::{GcOptions, GcPhase, GcProgress, GcReport, LiveKeys, NodeStore, StoreStats};

/// The README's examples compile and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
