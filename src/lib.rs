//! Page `Arc`-shared object graphs out to a content-addressed store and back in, with sharing
//! preserved.
//!
//! Large programs (build systems, compilers, language servers) hold huge graphs of
//! `Arc`-shared data. pagestore stores each node as a [`PagableData`] — its serialized bytes
//! plus the [`DataKey`]s of the nodes it points to — under a key that hashes both, so equal
//! subgraphs are stored once whoever wrote them (a Merkle DAG). A [`PagableStorage`] backend
//! holds the nodes; its [`ArcCache`] makes a node loaded twice come back as the *same* `Arc`.
//!
//! ```
//! use std::sync::Arc;
//! use pagestore::{InMemoryPagableStorage, PagableData, PagableStorage};
//!
//! let storage: Arc<dyn PagableStorage> = Arc::new(InMemoryPagableStorage::new());
//!
//! // Children first: a parent's key covers its children's keys.
//! let leaf = storage.store_data(PagableData { data: b"shared leaf".to_vec(), arcs: vec![] })?;
//! let left = storage.store_data(PagableData { data: b"left".to_vec(), arcs: vec![leaf] })?;
//! let right = storage.store_data(PagableData { data: b"right".to_vec(), arcs: vec![leaf] })?;
//! let root = storage.store_data(PagableData { data: b"root".to_vec(), arcs: vec![left, right] })?;
//! storage.flush()?;
//!
//! // Same content, same key: storing it again is free and changes nothing.
//! let again = storage.store_data(PagableData { data: b"shared leaf".to_vec(), arcs: vec![] })?;
//! assert_eq!(again, leaf);
//!
//! let node = storage.fetch_data_blocking(&root)?;
//! assert_eq!(node.data, b"root");
//! assert_eq!(node.arcs, [left, right]);
//! # anyhow::Ok(())
//! ```
//!
//! # Where to start
//!
//! - **Typed graphs**: [`page_out`] and [`page_in`] store and rebuild a whole graph of
//!   `#[derive(Serialize, Deserialize)]` values whose shared fields are [`Shared<T>`]
//!   (`Shared<dyn Trait>` through `typetag`); see [`graph`].
//! - **Persistence**: [`SqliteBackedPagableStorage::try_new`] (or [`SqliteOptions`]) keeps the
//!   nodes in one SQLite file in the reference's format, in one of three [`Durability`] modes;
//!   [`InMemoryPagableStorage`] keeps them in memory.
//! - **Another backend**: implement [`PagableStorage`]; its docs are the contract, and the
//!   suite in `tests/contract/` checks it.
//!
//! # Guarantees
//!
//! - A key is the blake3-128 hash of a node's content and children's keys, byte-for-byte the
//!   one the reference implementation (`pagable` 0.3.3) computes; records use its encoding
//!   (see [`codec`]).
//! - Read-your-writes: once `store_data` returns, every thread can fetch the key.
//! - The arc cache holds values weakly and loads each `(TypeId, DataKey)` at most once at a
//!   time; it never keeps a value alive and it prunes itself.
//! - Bad bytes are typed errors ([`Error`]), never panics; with verify-on-read (the SQLite
//!   backend's default) a damaged record is never returned as data.
//!
//! # Features
//!
//! - **`tokio`** (default): async fetches run the backend's blocking read on tokio's blocking
//!   pool, so an async caller never stalls a runtime worker. Without it they read inline.
//! - **`serde_with`**: [`graph::AsShared`], a `serde_with` adapter that pages plain `Arc<T>`
//!   fields as shared children inside `Vec`, `Option`, maps, … (`#[serde_as(as =
//!   "Vec<AsShared>")]`). Without it, `Arc<T>` fields still page through the
//!   [`graph::arc`] `with` module, and [`Shared<T>`] needs neither.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod cache;
pub mod codec;
pub mod data;
pub mod erase;
pub mod error;
pub mod graph;
pub mod key;
pub mod paging;
pub mod session;
pub mod storage;

pub use cache::ArcCache;
pub use data::PagableData;
pub use erase::{ArcEraseDyn, WeakEraseDyn};
pub use error::Error;
pub use graph::{Shared, StorageHandle, drop_deep, page_in, page_in_async, page_out};
pub use key::{DataKey, ParseKeyError};
pub use paging::PagingQueue;
pub use session::SessionContext;
pub use storage::PagableStorage;
pub use storage::memory::InMemoryPagableStorage;
pub use storage::sqlite::{
    Durability, OpenReport, SqliteBackedPagableStorage, SqliteOptions, TableLayout, VerifyReport,
};

/// The README's examples compile and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
