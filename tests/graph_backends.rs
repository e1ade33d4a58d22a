//! Graph layer on every backend: the same round trips on the in-memory and SQLite stores, and
//! page-in from a freshly reopened SQLite database.

use std::collections::HashSet;
use std::sync::{Arc, Barrier};

use pagestore::{
    DataKey, InMemoryPagableStorage, PagableStorage, Shared, SqliteBackedPagableStorage, drop_deep,
    page_in, page_in_async, page_out,
};
use serde::{Deserialize, Serialize};

#[typetag::serde]
trait Payload: Send + Sync + std::fmt::Debug {
    fn weight(&self) -> u64;
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Bytes(Vec<u8>);

#[typetag::serde(name = "bytes")]
impl Payload for Bytes {
    fn weight(&self) -> u64 {
        self.0.len() as u64
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Number(u64);

#[typetag::serde(name = "number")]
impl Payload for Number {
    fn weight(&self) -> u64 {
        self.0
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Node {
    id: u32,
    payload: Shared<dyn Payload>,
    kids: Vec<Shared<Node>>,
}

const NODES: u32 = 600;

/// Node i points to two earlier nodes and to one of six shared payloads.
fn graph() -> Vec<Shared<Node>> {
    let payloads: Vec<Shared<dyn Payload>> = (0..6u64)
        .map(|i| {
            let payload: Arc<dyn Payload> = if i % 2 == 0 {
                Arc::new(Bytes(vec![i as u8; 3]))
            } else {
                Arc::new(Number(i))
            };
            Shared::from(payload)
        })
        .collect();
    let mut nodes: Vec<Shared<Node>> = Vec::new();
    for id in 0..NODES {
        let kids = [id / 2, id * 7 / 10]
            .into_iter()
            .filter(|&k| k < id)
            .map(|k| nodes[k as usize].clone())
            .collect();
        nodes.push(Shared::new(Node {
            id,
            payload: payloads[(id % 6) as usize].clone(),
            kids,
        }));
    }
    nodes
}

fn reachable(storage: &dyn PagableStorage, root: DataKey) -> usize {
    let mut seen = HashSet::new();
    let mut stack = vec![root];
    while let Some(key) = stack.pop() {
        if seen.insert(key) {
            stack.extend(
                storage
                    .fetch_data_blocking(&key)
                    .unwrap()
                    .arcs
                    .iter()
                    .copied(),
            );
        }
    }
    seen.len()
}

fn check(back: &[Shared<Node>]) {
    assert_eq!(back.len(), NODES as usize);
    for (i, node) in back.iter().enumerate() {
        assert_eq!(node.id, i as u32);
        assert_eq!(node.payload.weight(), [3, 1, 3, 3, 3, 5][i % 6]);
        for kid in &node.kids {
            assert!(Shared::ptr_eq(kid, &back[kid.id as usize]), "sharing kept");
        }
    }
    assert!(Shared::ptr_eq(&back[0].payload, &back[6].payload));
}

fn round_trip(storage: Arc<dyn PagableStorage>) -> DataKey {
    let key = page_out(&storage, &graph()).unwrap();
    assert_eq!(reachable(&*storage, key), NODES as usize + 6 + 1);
    let back: Vec<Shared<Node>> = page_in(&storage, key).unwrap();
    check(&back);
    key
}

fn sqlite(dir: &std::path::Path) -> Arc<dyn PagableStorage> {
    Arc::new(SqliteBackedPagableStorage::try_new(dir).unwrap())
}

#[test]
fn round_trip_in_memory() {
    round_trip(Arc::new(InMemoryPagableStorage::new()));
}

#[test]
fn round_trip_on_sqlite_and_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let storage = sqlite(dir.path());
    let key = round_trip(Arc::clone(&storage));
    storage.flush().unwrap();
    drop(storage);
    let reopened = sqlite(dir.path());
    let back: Vec<Shared<Node>> = page_in(&reopened, key).unwrap();
    check(&back);
}

#[test]
fn eight_threads_page_in_from_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let storage = sqlite(dir.path());
    let key = page_out(&storage, &graph()).unwrap();
    storage.flush().unwrap();
    let barrier = Barrier::new(8);
    let results: Vec<Vec<Shared<Node>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    page_in::<Vec<Shared<Node>>>(&storage, key).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for result in &results {
        check(result);
        for (a, b) in result.iter().zip(&results[0]) {
            assert!(Shared::ptr_eq(a, b), "one Arc per node across threads");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_in_async_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let storage = sqlite(dir.path());
    let key = page_out(&storage, &graph()).unwrap();
    storage.flush().unwrap();
    // Spawned: the future is Send, so it runs on any worker.
    let back: Vec<Shared<Node>> = tokio::spawn(async move { page_in_async(&storage, key).await })
        .await
        .unwrap()
        .unwrap();
    check(&back);
}

#[test]
fn a_deep_chain_on_sqlite() {
    #[derive(Serialize, Deserialize)]
    struct Link(u32, Option<Shared<Link>>);
    let dir = tempfile::tempdir().unwrap();
    let storage = sqlite(dir.path());
    let mut chain = Link(0, None);
    for i in 1..20_000 {
        chain = Link(i, Some(Shared::new(chain)));
    }
    let key = page_out(&storage, &chain).unwrap();
    drop_deep(chain).unwrap();
    let back: Link = page_in(&storage, key).unwrap();
    assert_eq!(back.0, 19_999);
    drop_deep(back).unwrap();
}
