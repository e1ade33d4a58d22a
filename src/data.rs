//! [`PagableData`]: one node of the stored graph.

use crate::key::DataKey;

/// One node of a paged-out graph: its serialized bytes and the keys of the nodes it points to.
///
/// The node's address is [`compute_key`](Self::compute_key), a hash of both fields, so a
/// parent's key changes whenever any descendant changes (a Merkle DAG).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct PagableData {
    /// The node's own serialized bytes.
    pub data: Vec<u8>,
    /// The keys of the child nodes it references, in order (repeats allowed).
    pub arcs: Vec<DataKey>,
}

impl PagableData {
    /// The node's content address: the first 16 bytes of
    /// `blake3( u64_le(arcs.len()) ‖ data ‖ arcs[0] ‖ … )`; see [`DataKey`].
    #[inline]
    pub fn compute_key(&self) -> DataKey {
        DataKey::hash_parts(self.arcs.len() as u64, &self.data, &self.arcs)
    }
}

impl std::fmt::Debug for PagableData {
    /// Shows sizes and child keys, never the payload (which may be large or sensitive).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagableData")
            .field("data_len", &self.data.len())
            .field("arcs", &self.arcs)
            .finish()
    }
}
