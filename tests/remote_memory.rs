//! The node-store contract on `RemoteNodeStore` over the in-process `MemoryRemoteStore`:
//! the adapter itself, with no network in the way (tests/remote_redis.rs runs it on Redis).

use std::sync::Arc;

use pagestore::remote::{MemoryRemoteStore, RemoteNodeStore};
use pagestore::testing::{self, NodeStoreHarness, Runtime};
use pagestore::{DataKey, Error, NodeStore};

/// Each store a new remote; a reopen is a second client of the same remote.
struct Memory;

impl NodeStoreHarness for Memory {
    type Store = RemoteNodeStore<Arc<MemoryRemoteStore>>;

    fn open(&self) -> Self::Store {
        RemoteNodeStore::new(Arc::new(MemoryRemoteStore::new()))
    }

    fn reopen(&self, store: Self::Store) -> Option<Self::Store> {
        Some(RemoteNodeStore::new(Arc::clone(store.remote())))
    }

    fn corrupt(&self, store: &Self::Store, key: DataKey) -> bool {
        store.remote().overwrite(key, b"garbage".to_vec());
        true
    }
}

#[test]
fn node_store_contract_on_a_memory_remote() {
    testing::node_store_contract(&Memory);
}

#[test]
fn storage_contract_on_a_memory_remote() {
    testing::storage_contract(&Runtime(Memory));
}

#[test]
fn a_record_that_hashes_to_another_key_is_corrupt_and_names_the_remote() {
    let store = Memory.open();
    let a = store.put(testing::node(1, 10, vec![])).unwrap();
    let b = store.put(testing::node(2, 10, vec![])).unwrap();
    let record_of_b = pagestore::codec::encode(&store.get(&b).unwrap());
    store.remote().overwrite(a, record_of_b);
    let err = store.get(&a).unwrap_err();
    match err.downcast_ref::<Error>() {
        Some(Error::Corrupt { key, reason }) => {
            assert_eq!(*key, a);
            assert!(reason.contains("memory"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}: {err:#}"),
    }
}

#[test]
fn get_many_async_is_one_batched_read() {
    let remote = Arc::new(MemoryRemoteStore::new());
    let store = RemoteNodeStore::new(Arc::clone(&remote));
    let keys: Vec<DataKey> = (0..1000)
        .map(|i| store.put(testing::node(i, 20, vec![])).unwrap())
        .collect();
    let before = remote.round_trips();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let nodes = runtime.block_on(store.get_many_async(&keys)).unwrap();
    assert_eq!(nodes.len(), keys.len());
    for (key, node) in keys.iter().zip(&nodes) {
        assert_eq!(node.compute_key(), *key);
    }
    // 1,000 keys at the default 512 per round trip.
    assert_eq!(remote.round_trips() - before, 2);
}
