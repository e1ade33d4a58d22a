//! Graph layer: concurrent page-ins share one Arc per node and deserialize each node once;
//! random DAGs round trip with their sharing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};

use pagestore::{InMemoryPagableStorage, Shared, page_in, page_out};
use proptest::prelude::*;
use serde::{Deserialize, Deserializer, Serialize};

/// Deserializations per test (tests run in parallel): indexed by `Counted::test`.
static DESERIALIZED: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

/// A node that counts its deserializations.
#[derive(Debug, Serialize, PartialEq)]
struct Counted {
    test: u8,
    id: u32,
    kids: Vec<Shared<Counted>>,
}

impl<'de> Deserialize<'de> for Counted {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            test: u8,
            id: u32,
            kids: Vec<Shared<Counted>>,
        }
        let raw = Raw::deserialize(deserializer)?;
        DESERIALIZED[usize::from(raw.test % 2)].fetch_add(1, Ordering::SeqCst);
        Ok(Counted {
            test: raw.test,
            id: raw.id,
            kids: raw.kids,
        })
    }
}

/// A DAG of `n` nodes where node i points to up to three earlier nodes.
fn dag(test: u8, n: u32) -> Vec<Shared<Counted>> {
    let mut nodes: Vec<Shared<Counted>> = Vec::new();
    for id in 0..n {
        let kids = [id / 2, id / 3, id.saturating_sub(1)]
            .into_iter()
            .filter(|&k| k < id)
            .map(|k| nodes[k as usize].clone())
            .collect();
        nodes.push(Shared::new(Counted { test, id, kids }));
    }
    nodes
}

fn collect<'a>(node: &'a Shared<Counted>, seen: &mut HashMap<u32, &'a Shared<Counted>>) {
    let mut stack = vec![node];
    while let Some(node) = stack.pop() {
        if let Some(prev) = seen.insert(node.id, node) {
            assert!(
                Shared::ptr_eq(prev, node),
                "node {} came back twice",
                node.id
            );
            continue;
        }
        stack.extend(node.kids.iter());
    }
}

#[test]
fn eight_threads_paging_in_one_graph_get_one_arc_per_node() {
    const N: u32 = 2_000;
    let storage = Arc::new(InMemoryPagableStorage::new());
    let root = dag(0, N);
    let key = page_out(&storage, &root).unwrap();
    drop(root);
    let before = DESERIALIZED[0].load(Ordering::SeqCst);
    let barrier = Barrier::new(8);
    let results: Vec<Vec<Shared<Counted>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    page_in::<Vec<Shared<Counted>>>(&storage, key).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        DESERIALIZED[0].load(Ordering::SeqCst) - before,
        N as usize,
        "each node deserialized once"
    );
    for result in &results {
        assert_eq!(result.len(), N as usize);
        for (a, b) in result.iter().zip(&results[0]) {
            assert!(Shared::ptr_eq(a, b));
        }
        let mut seen = HashMap::new();
        for node in result {
            collect(node, &mut seen);
        }
        assert_eq!(seen.len(), N as usize);
    }
}

#[test]
fn threads_paging_in_overlapping_graphs_share_their_common_nodes() {
    const N: u32 = 1_500;
    let storage = Arc::new(InMemoryPagableStorage::new());
    let all = dag(1, N);
    // Eight different roots over one DAG: every third, fifth, … node, and the last ones.
    let keys: Vec<_> = (0..8usize)
        .map(|t| {
            let root: Vec<Shared<Counted>> = all.iter().skip(t).step_by(t + 2).cloned().collect();
            page_out(&storage, &root).unwrap()
        })
        .collect();
    drop(all);
    let barrier = Barrier::new(8);
    let results: Vec<Vec<Shared<Counted>>> = std::thread::scope(|s| {
        let handles: Vec<_> = keys
            .iter()
            .map(|&key| {
                let barrier = &barrier;
                let storage = &storage;
                s.spawn(move || {
                    barrier.wait();
                    page_in::<Vec<Shared<Counted>>>(storage, key).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // One Arc per node id across every thread's graph.
    let mut seen = HashMap::new();
    for result in &results {
        for node in result {
            collect(node, &mut seen);
        }
    }
    assert!(seen.len() > 1_000, "the roots reach most of the DAG");
    assert_eq!(
        DESERIALIZED[1].load(Ordering::SeqCst),
        seen.len(),
        "each reached node deserialized once"
    );
}

/// Calls of `Deep`'s `Deserialize`, across threads.
static DEEP_CALLS: AtomicUsize = AtomicUsize::new(0);

/// A node of a deep DAG that counts every call of its `Deserialize` (finished or not).
#[derive(Serialize)]
struct Deep {
    id: u32,
    kids: Vec<Shared<Deep>>,
}

impl<'de> Deserialize<'de> for Deep {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            id: u32,
            kids: Vec<Shared<Deep>>,
        }
        DEEP_CALLS.fetch_add(1, Ordering::SeqCst);
        let raw = Raw::deserialize(deserializer)?;
        Ok(Deep {
            id: raw.id,
            kids: raw.kids,
        })
    }
}

/// Was more than once per node: past the recursion bound, an attempt that unwound released
/// the load lock of every node on its path, and the other thread loaded them too.
#[test]
fn two_threads_paging_in_one_deep_graph_deserialize_each_node_once() {
    const N: u32 = 1_000;
    // Node i points to i - 1 (so the graph is N deep) and to i / 2.
    let mut nodes: Vec<Shared<Deep>> = Vec::new();
    for id in 0..N {
        let mut kids = Vec::new();
        if id > 0 {
            kids.push(nodes[id as usize - 1].clone());
            kids.push(nodes[id as usize / 2].clone());
        }
        nodes.push(Shared::new(Deep { id, kids }));
    }
    let root = nodes.pop().unwrap();
    drop(nodes);
    let storage = Arc::new(InMemoryPagableStorage::new());
    let key = page_out(&storage, &root).unwrap();
    pagestore::drop_deep(root).unwrap();
    let barrier = Barrier::new(2);
    let results: Vec<Shared<Deep>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    page_in::<Shared<Deep>>(&storage, key).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        DEEP_CALLS.load(Ordering::SeqCst),
        N as usize,
        "each node deserialized once"
    );
    assert!(Shared::ptr_eq(&results[0], &results[1]));
    assert_eq!(results[0].id, N - 1);
    for result in results {
        pagestore::drop_deep(result).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random DAGs: every node points to random earlier nodes, some values repeat.
    #[test]
    fn random_dags_round_trip_with_their_sharing(
        edges in prop::collection::vec(prop::collection::vec(any::<prop::sample::Index>(), 0..4), 1..60),
        labels in prop::collection::vec(0u8..4, 60),
    ) {
        #[derive(Debug, Serialize, Deserialize, PartialEq)]
        struct Node { label: u8, kids: Vec<Shared<Node>> }

        let mut nodes: Vec<Shared<Node>> = Vec::new();
        for (i, picks) in edges.iter().enumerate() {
            let kids = if i == 0 { vec![] } else { picks.iter().map(|p| nodes[p.index(i)].clone()).collect() };
            nodes.push(Shared::new(Node { label: labels[i], kids }));
        }
        let storage = Arc::new(InMemoryPagableStorage::new());
        let key = page_out(&storage, &nodes).unwrap();
        let back: Vec<Shared<Node>> = page_in(&storage, key).unwrap();
        prop_assert_eq!(&back, &nodes);
        // Sharing in memory implies sharing after the round trip.
        for i in 0..nodes.len() {
            for (k, kid) in nodes[i].kids.iter().enumerate() {
                let j = nodes.iter().position(|n| Shared::ptr_eq(n, kid)).unwrap();
                prop_assert!(Shared::ptr_eq(&back[i].kids[k], &back[j]));
            }
        }
        // Content addressing: the key is deterministic, and one entry per distinct content.
        prop_assert_eq!(page_out(&storage, &back).unwrap(), key);
    }
}
