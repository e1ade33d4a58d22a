//! The backend contract suite on `InMemoryPagableStorage`.

mod contract;

use pagestore::{DataKey, InMemoryPagableStorage};

struct Memory;

impl contract::Backend for Memory {
    type Storage = InMemoryPagableStorage;

    fn open(&self) -> InMemoryPagableStorage {
        InMemoryPagableStorage::new()
    }

    fn reopen(&self, _storage: InMemoryPagableStorage) -> Option<InMemoryPagableStorage> {
        None
    }

    fn count(&self, storage: &InMemoryPagableStorage) -> u64 {
        storage.len() as u64
    }

    fn corrupt(&self, _storage: &InMemoryPagableStorage, _key: DataKey) -> bool {
        false // nodes live as typed values, never as bytes that could rot
    }
}

#[test]
fn in_memory_backend_keeps_the_contract() {
    contract::run_all(&Memory);
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
