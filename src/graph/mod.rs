//! Page whole `Arc` graphs out and in with serde: every distinct shared value is stored once,
//! and paging in gives back the same sharing.
//!
//! Mark shared fields as [`Shared<T>`] (or keep `Arc<T>` fields and use the [`arc`] `with`
//! module or the [`AsShared`] adapter), derive `Serialize`/`Deserialize` as usual, and call
//! [`page_out`] and [`page_in`]:
//!
//! ```
//! use std::sync::Arc;
//! use serde::{Deserialize, Serialize};
//! use pagestore::{page_in, page_out, InMemoryPagableStorage, Shared};
//!
//! #[typetag::serde] // external tagging (the default): works with postcard
//! trait Shape: Send + Sync {
//!     fn area(&self) -> f64;
//! }
//!
//! #[derive(Serialize, Deserialize)]
//! struct Square(f64);
//!
//! #[typetag::serde(name = "square")] // a stable name: it is what the store holds
//! impl Shape for Square {
//!     fn area(&self) -> f64 { self.0 * self.0 }
//! }
//!
//! #[derive(Serialize, Deserialize)]
//! struct Node {
//!     label: String,
//!     shape: Shared<dyn Shape>,
//!     kids: Vec<Shared<Node>>,
//! }
//!
//! let storage = Arc::new(InMemoryPagableStorage::new());
//! let square: Shared<dyn Shape> = Shared::from(Arc::new(Square(2.0)) as Arc<dyn Shape>);
//! let leaf = Shared::new(Node { label: "leaf".into(), shape: square.clone(), kids: vec![] });
//! let root = Node { label: "root".into(), shape: square, kids: vec![leaf.clone(), leaf] };
//!
//! let key = page_out(&storage, &root)?; // the root, one leaf, one square
//! assert_eq!(storage.len(), 3);
//!
//! let back: Node = page_in(&storage, key)?;
//! assert!(Shared::ptr_eq(&back.kids[0], &back.kids[1]), "sharing survives");
//! assert!(Shared::ptr_eq(&back.shape, &back.kids[0].shape));
//! assert_eq!(back.kids[0].shape.area(), 4.0);
//! # anyhow::Ok(())
//! ```
//!
//! # How a graph is stored
//!
//! Each distinct shared value is one [`PagableData`](crate::PagableData) node: its postcard
//! bytes, plus the keys of the shared values it holds, in the order its serialization meets
//! them (a `Shared` writes no bytes of its own). The value passed to [`page_out`] is the root
//! node. Children are stored before their parents, so a key is returned only once everything it
//! reaches is stored, and equal content yields one key and one entry whoever wrote it.
//!
//! *Distinct* means distinct `(view type, allocation)`: an `Arc<Circle>` and an
//! `Arc<dyn Shape>` of one allocation are two nodes, since they serialize differently (the
//! `dyn` view carries a type tag).
//!
//! Re-paging is incremental: the storage remembers, weakly, the key of every shared value it
//! paged out or in ([`PagableStorage::key_of`](crate::PagableStorage::key_of)), so a later [`page_out`] writes a value that is
//! still alive by its key, without serializing it or anything below it. Editing one node of a
//! large graph (building new nodes on its path to the root, as immutable values require) and
//! paging the graph out again costs that path, not the graph. (Values of 4 KiB or more inline,
//! such as a large `Shared<[u8]>`, are remembered only while the arc cache holds them.)
//!
//! Paging in resolves each child key through the storage's arc cache
//! ([`PagableStorage::resolve_arc`](crate::PagableStorage::resolve_arc)) by `(TypeId, key)`: a value still alive in memory is reused as is (the same `Arc`), and one that
//! is not is fetched and deserialized once, even when many threads page in overlapping graphs at
//! the same time.
//!
//! Depth is not limited by the thread's stack: a million-deep chain pages out and in on an
//! ordinary thread, or a small one. Page-out keeps an explicit work stack. Page-in deserializes
//! a node when its parent's deserializer reaches it (only then is its type known), so it
//! recurses once per level, on a stack that grows: each child's load runs through
//! [`stacker::maybe_grow`], which moves on to a new stack segment when the current one runs
//! low. Every node is deserialized once, and a `Deserialize` impl behaves at any depth as it
//! does at the root. The price is memory for the stack of the deepest path while it pages in:
//! about 1.2 KiB per level in release builds (a million-deep chain: about 1.2 GB, freed when
//! the call returns) and 4 KiB in debug builds, more for user types with large inline fields.
//! *Dropping* a deep chain recurses in Rust's own drop glue: use [`drop_deep`].
//!
//! # Rules
//!
//! - **A shared value must not change once paged out.** Its key names its content at that
//!   time; interior mutability behind a `Shared` makes the store and memory disagree, and a
//!   later page-in may hand back the old content (from the store) or the new one (from the arc
//!   cache).
//! - **Serialization must be deterministic.** Keys hash the bytes, so a `HashMap` or
//!   `HashSet` field (whose iteration order is random per process) gives equal values different
//!   keys from run to run, and defeats deduplication. Use `BTreeMap`/`BTreeSet` or
//!   `IndexMap`.
//! - **Stay on the calling thread.** `page_out` and `page_in` keep their state in a
//!   thread-local, so a `Serialize`/`Deserialize` impl that hands a `Shared` to another thread
//!   (rayon, a thread pool) gets a serde error saying so. The same error comes from
//!   serializing a `Shared` with no call running (e.g. to JSON): serialize `&*shared` to copy
//!   the value instead.
//! - **Serialize a `Shared` only into the page-out's own serializer.** A `Serialize` impl that
//!   serializes a `Shared` into another format (say, a JSON string) during a page-out records
//!   a child the node's bytes never mention; page-in then reports the node
//!   [`Corrupt`](crate::Error::Corrupt) (its child count does not match its value).
//! - **The graph must be acyclic** (it is, unless a `Mutex`/`OnceLock` closes a loop): a cycle
//!   is reported as an error. Page-in reports stored records that loop back to themselves
//!   (which page-out cannot write, but another program or damage read without verification
//!   can) as [`Corrupt`](crate::Error::Corrupt) naming the key.
//!
//! # Polymorphism with typetag
//!
//! `Shared<dyn Trait>` works for a `#[typetag::serde]` trait whose supertraits include
//! `Send + Sync` (add `typetag` to your own dependencies: its macros name `::typetag`).
//! postcard is not self-describing, which limits the tagging:
//!
//! - **external** (the default, `#[typetag::serde]`) and **adjacent**
//!   (`#[typetag::serde(tag = "type", content = "value")]`) work;
//! - **internal** (`#[typetag::serde(tag = "type")]`) works for struct impls only: an
//!   **enum** impl needs `deserialize_any`, which postcard cannot provide, so its page-in fails
//!   with a [`Deserialize`](crate::Error::Deserialize) error. Prefer external tagging.
//!
//! The tag is the impl's type name unless renamed, and it is stored: give each impl a stable
//! `#[typetag::serde(name = "...")]` so that renaming or moving a type does not orphan stored
//! data. A name the program does not register is reported with the key and typetag's message.
//!
//! # Errors
//!
//! Everything is an [`anyhow::Error`] holding a [`crate::Error`]: a missing child is
//! [`NotFound`](crate::Error::NotFound) naming the child's key; a record that is not the type
//! asked for (or names an unknown typetag) is [`Deserialize`](crate::Error::Deserialize) naming
//! the key, the type and the original message (postcard alone would reduce it to
//! `SerdeDeCustom`); a record whose child keys do not match its value is
//! [`Corrupt`](crate::Error::Corrupt), and so is a record that is its own descendant (a
//! cycle); a failing `Serialize` is [`Serialize`](crate::Error::Serialize).
//!
//! A page-in error also names the root and the type asked for ("could not page in a `T` from
//! root …"), as [`anyhow`] context: `{:#}` prints the whole chain, and
//! `downcast_ref::<pagestore::Error>()` still finds the typed error. A child's failure that a
//! lenient `Deserialize` impl swallows (mapping errors to a default, as
//! `serde_with::DefaultOnError` does) is never reported, at any depth.

mod adapters;
mod held;
mod keep;
mod out;
mod pagable_arc;
mod page_in;
mod session;
mod shared;

use anyhow::Context;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::key::DataKey;

#[cfg(feature = "serde_with")]
pub use adapters::AsShared;
pub use adapters::arc;
pub use pagable_arc::PagableArc;
pub use session::StorageHandle;
pub use shared::Shared;

/// Stores `value` and every shared value it reaches; returns the key of `value`'s node.
///
/// Each distinct shared value (by view type and allocation) is serialized once, children before
/// parents; equal content is stored once. The key is returned only after every node it reaches
/// was stored (call [`PagableStorage::flush`](crate::PagableStorage::flush) to make them durable). Nothing is recursive: depth
/// costs heap, not stack.
///
/// # Errors
///
/// [`Error::Serialize`](crate::Error::Serialize) if a `Serialize` impl fails (with its message)
/// or the graph has a cycle; the storage's error if a store fails. Nodes stored before an error
/// stay stored (they are valid, content-addressed entries).
pub fn page_out<T: ?Sized + Serialize>(
    storage: &impl StorageHandle,
    value: &T,
) -> anyhow::Result<DataKey> {
    out::page_out(&storage.to_dyn(), value)
}

/// Rebuilds the value stored under `key` by [`page_out`], with its sharing.
///
/// Each shared child resolves through the storage's arc cache by `(TypeId, key)`: a value still
/// alive is reused (so two page-ins of overlapping graphs share their common parts), others are
/// fetched and deserialized once, even under concurrent page-ins from many threads.
///
/// # Errors
///
/// [`Error::NotFound`](crate::Error::NotFound) naming the missing key (the root's or a child's),
/// [`Error::Deserialize`](crate::Error::Deserialize) naming the key whose record is not the
/// expected type, [`Error::Corrupt`](crate::Error::Corrupt) (a damaged record, or one that is
/// its own descendant), or the storage's own error; with the root's key and `T` as context.
pub fn page_in<T: DeserializeOwned>(
    storage: &impl StorageHandle,
    key: DataKey,
) -> anyhow::Result<T> {
    page_in::run(storage.to_dyn(), key, Default::default()).with_context(|| root_context::<T>(key))
}

/// The value stored under `key` as a [`Shared<T>`], through the storage's arc cache: a value
/// still alive (paged in earlier, or by another thread meanwhile) comes back as the same `Arc`,
/// and concurrent calls load it once.
///
/// `key` is the key of a `T`'s own node: what [`page_out`] of a `T` returned, a child's key,
/// or a [`PagableArc`]'s [`key`](PagableArc::key). (`page_in::<Shared<T>>` reads something
/// else: the node [`page_out`] of a `Shared<T>` writes, which holds a reference to the value.)
/// `T` may be unsized (`str`, `[u8]`, `dyn Trait`).
///
/// ```
/// use std::sync::Arc;
/// use pagestore::{page_in_shared, page_out, InMemoryPagableStorage, Shared};
///
/// let storage = Arc::new(InMemoryPagableStorage::new());
/// let key = page_out(&storage, &String::from("a value"))?;
/// let a: Shared<String> = page_in_shared(&storage, key)?;
/// let b: Shared<String> = page_in_shared(&storage, key)?;
/// assert!(Shared::ptr_eq(&a, &b), "one value per key while it lives");
/// # anyhow::Ok(())
/// ```
///
/// # Errors
///
/// As [`page_in`].
pub fn page_in_shared<T>(storage: &impl StorageHandle, key: DataKey) -> anyhow::Result<Shared<T>>
where
    T: ?Sized + Send + Sync + 'static,
    Box<T>: DeserializeOwned,
{
    page_in::load_arc::<T>(&storage.to_dyn(), key, None)
        .map(|(arc, _)| Shared::from(arc))
        .with_context(|| root_context::<Shared<T>>(key))
}

/// The context of every page-in error: the root and the type asked for (the error itself names
/// the failing key).
fn root_context<T>(key: DataKey) -> String {
    format!(
        "could not page in a `{}` from root {key}",
        std::any::type_name::<T>()
    )
}

/// [`page_in`] for async callers: first fetches every record reachable from `key` with
/// [`PagableStorage::fetch_data_many`](crate::PagableStorage::fetch_data_many), a level of
/// keys at a time in batches of up to 1024 (two in flight, so a backend with I/O latency
/// overlaps it; the SQLite store reads a batch in one call on tokio's blocking pool, and
/// concurrent calls on one [`WithRuntime`](crate::WithRuntime) share the reads in flight),
/// then deserializes without touching the storage's I/O.
///
/// The deserialization runs on the calling task: for very large graphs, run it in
/// `tokio::task::spawn_blocking` with [`page_in`] instead, or accept that one poll does the CPU
/// work. The records below a child whose value is alive in memory (in the arc cache, under any
/// type it was paged as) are not fetched: the page-in takes the live value. If that value dies
/// in between, or was cached as another type than the one this page-in asks for, its records
/// are read while deserializing, with blocking reads on the calling task.
///
/// # Errors
///
/// As [`page_in`].
pub async fn page_in_async<T: DeserializeOwned>(
    storage: &impl StorageHandle,
    key: DataKey,
) -> anyhow::Result<T> {
    let storage = storage.to_dyn();
    let records = page_in::prefetch(&*storage, key)
        .await
        .with_context(|| root_context::<T>(key))?;
    page_in::run(storage, key, records).with_context(|| root_context::<T>(key))
}

/// Drops `value` without recursing down its shared values, for graphs too deep for Rust's
/// recursive drop glue (a chain of a few hundred thousand nodes overflows a thread's stack).
///
/// It walks the graph as [`page_out`] does (serializing it, storing nothing), holds every shared
/// value it meets, drops `value`, then releases the shared values parents first, so each one
/// freed finds its children still held and no drop recurses.
///
/// ```
/// use serde::Serialize;
/// use pagestore::{graph::drop_deep, Shared};
///
/// #[derive(Serialize)]
/// struct Link(u32, Option<Shared<Link>>);
///
/// let mut chain = Link(0, None);
/// for i in 1..200_000 {
///     chain = Link(i, Some(Shared::new(chain)));
/// }
/// drop_deep(chain)?;
/// # anyhow::Ok(())
/// ```
///
/// # Errors
///
/// [`Error::Serialize`](crate::Error::Serialize) if `value`'s serialization fails; `value` is
/// then dropped the ordinary way.
pub fn drop_deep<T: Serialize>(value: T) -> anyhow::Result<()> {
    const UNUSED: DataKey = DataKey::from_bytes([1; 16]).unwrap();
    let mut finished = out::walk(&value, None, |_, _| Ok(UNUSED))?.into_finished();
    drop(value);
    // `finished` lists children before parents: pop parents first.
    while let Some(shared) = finished.pop() {
        drop(shared);
    }
    Ok(())
}
