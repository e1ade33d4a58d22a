//! What the graph calls share with the serde impls they drive: the handle to a storage, and
//! the error a shared value reports outside a call.

use std::sync::Arc;

use crate::runtime::PagableStorage;

/// The message of the serde error a `Shared` (or `PagableArc`) returns when it is serialized or deserialized
/// with no [`page_out`](crate::page_out) / [`page_in`](crate::page_in) call running on the
/// current thread.
pub(crate) const OUTSIDE_SESSION: &str = "Shared<T> used outside page_out/page_in: a shared value is \
     written as a child reference, which exists only inside a page_out or page_in call on the \
     same thread (a Serialize/Deserialize impl that hands work to another thread loses the call; \
     serialize a Shared's value itself with `&*shared` to copy it instead)";

/// A handle to a storage that the graph calls accept: an `Arc` of a backend type, or an
/// `Arc<dyn PagableStorage>`.
///
/// [`page_in`](crate::page_in) keeps a clone in its thread-local session (shared fields deep inside serde reach
/// the storage through it), which is why it takes an `Arc` rather than a reference.
pub trait StorageHandle {
    /// The storage, as a trait object.
    fn storage(&self) -> &dyn PagableStorage;
    /// A new strong handle to the storage.
    fn to_dyn(&self) -> Arc<dyn PagableStorage>;
}

impl<S: PagableStorage> StorageHandle for Arc<S> {
    fn storage(&self) -> &dyn PagableStorage {
        &**self
    }

    fn to_dyn(&self) -> Arc<dyn PagableStorage> {
        Arc::clone(self) as Arc<dyn PagableStorage>
    }
}

impl StorageHandle for Arc<dyn PagableStorage> {
    fn storage(&self) -> &dyn PagableStorage {
        &**self
    }

    fn to_dyn(&self) -> Arc<dyn PagableStorage> {
        Arc::clone(self)
    }
}
