//! The contract suites on the in-memory node store, bare and with the runtime attached.

use pagestore::testing::{self, NodeStoreHarness, Runtime};
use pagestore::{DataKey, InMemoryPagableStorage, MemoryNodeStore};

struct Memory;

impl NodeStoreHarness for Memory {
    type Store = MemoryNodeStore;

    fn open(&self) -> MemoryNodeStore {
        MemoryNodeStore::new()
    }

    fn reopen(&self, _store: MemoryNodeStore) -> Option<MemoryNodeStore> {
        None
    }

    fn corrupt(&self, _store: &MemoryNodeStore, _key: DataKey) -> bool {
        false // nodes live as typed values, never as bytes that could rot
    }
}

#[test]
fn memory_node_store_keeps_the_node_store_contract() {
    testing::node_store_contract(&Memory);
}

#[test]
fn in_memory_storage_keeps_the_storage_contract() {
    testing::storage_contract(&Runtime(Memory));
}

#[test]
fn debug_never_prints_payloads() {
    use pagestore::{PagableData, PagableStorage};
    let storage = InMemoryPagableStorage::new();
    storage
        .store_data(PagableData {
            data: b"secret payload".to_vec(),
            arcs: vec![],
        })
        .unwrap();
    let shown = format!("{storage:?}");
    assert!(!shown.contains("secret"), "{shown}");
    assert!(shown.contains("nodes: 1"), "{shown}");
}
