//! The keys that paged-out [`PagableArc`](crate::PagableArc)s hold, for garbage collection.
//!
//! Kept per storage (by its [`storage_identity`](crate::PagableStorage::storage_identity)) in
//! one process-wide map, so that a handle can let go of its key when it drops without
//! reaching its storage (a handle's drop must never be what keeps a storage alive, or drops
//! it). Entries of a storage that is gone drop with their handles; if its address is reused
//! meanwhile, the new storage only keeps a few more nodes through one collection.

use std::sync::LazyLock;

use dashmap::DashMap;

use crate::key::{DataKey, KeyHasherBuilder};

/// `(storage identity, key)` → how many handles hold it.
static HELD: LazyLock<DashMap<(usize, DataKey), usize, KeyHasherBuilder>> =
    LazyLock::new(DashMap::default);

/// Counts one more handle of `storage` holding `key`.
pub(crate) fn hold(storage: usize, key: DataKey) {
    *HELD.entry((storage, key)).or_insert(0) += 1;
}

/// Counts one handle fewer.
pub(crate) fn release(storage: usize, key: DataKey) {
    HELD.remove_if_mut(&(storage, key), |_, count| {
        *count -= 1;
        *count == 0
    });
}

/// Hands every key some handle of `storage` holds to `keep`.
pub(crate) fn for_each(storage: usize, keep: &mut dyn FnMut(DataKey)) {
    for entry in HELD.iter() {
        if entry.key().0 == storage {
            keep(entry.key().1);
        }
    }
}
