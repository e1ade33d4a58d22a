//! Graph layer: concurrent `page_in_async` calls over overlapping graphs on one SQLite store
//! return what `page_in` returns, share one `Arc` per node, and keep the process's thread
//! count bounded (the reads go in batches, at most a few on tokio's blocking pool at once).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use pagestore::{
    PagableStorage, Shared, SqliteBackedPagableStorage, page_in, page_in_async, page_out,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Node {
    id: u32,
    name: String,
    kids: Vec<Shared<Node>>,
}

/// `n` nodes, node i pointing to up to three earlier ones.
fn dag(n: u32) -> Vec<Shared<Node>> {
    let mut nodes: Vec<Shared<Node>> = Vec::new();
    for id in 0..n {
        let kids = [id / 2, id / 3, id.saturating_sub(7)]
            .into_iter()
            .filter(|&k| k < id)
            .map(|k| nodes[k as usize].clone())
            .collect();
        nodes.push(Shared::new(Node {
            id,
            name: format!("node-{id}"),
            kids,
        }));
    }
    nodes
}

/// Every node reachable from `roots` by id; panics if one id has two allocations.
fn collect<'a>(roots: &'a [Shared<Node>], seen: &mut HashMap<u32, &'a Shared<Node>>) {
    let mut stack: Vec<&Shared<Node>> = roots.iter().collect();
    while let Some(node) = stack.pop() {
        if let Some(prev) = seen.insert(node.id, node) {
            assert!(Shared::ptr_eq(prev, node), "node {} loaded twice", node.id);
            continue;
        }
        assert_eq!(node.name, format!("node-{}", node.id));
        stack.extend(node.kids.iter());
    }
}

/// The process's OS threads, from `/proc/self/status` (None off Linux).
fn threads() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Threads:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn concurrent_page_in_async_on_overlapping_graphs_shares_nodes_with_bounded_threads() {
    const N: u32 = 6000;
    const TASKS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(SqliteBackedPagableStorage::try_new(dir.path()).unwrap());
    let nodes = dag(N);
    // Overlapping windows of the node list, each paged out as its own root.
    let windows: Vec<Vec<Shared<Node>>> = (0..TASKS)
        .map(|t| {
            let start = t * N as usize / (2 * TASKS);
            nodes[start..start + N as usize / 2].to_vec()
        })
        .collect();
    let keys: Vec<_> = windows
        .iter()
        .map(|w| page_out(&storage, w).unwrap())
        .collect();
    storage.flush().unwrap();
    drop((nodes, windows));
    storage.release_memory();

    let peak = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (Arc::clone(&peak), Arc::clone(&done));
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some(n) = threads() {
                    peak.fetch_max(n, Ordering::Relaxed);
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        })
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let results: Vec<Vec<Shared<Node>>> = runtime.block_on(async {
        let tasks: Vec<_> = keys
            .iter()
            .map(|&key| {
                let storage = Arc::clone(&storage);
                tokio::spawn(async move {
                    page_in_async::<Vec<Shared<Node>>>(&storage, key)
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.unwrap());
        }
        results
    });
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();

    // Every task's graph is the window it stored, and one id is one allocation across tasks.
    let mut seen = HashMap::new();
    for (t, result) in results.iter().enumerate() {
        let start = (t * N as usize / (2 * TASKS)) as u32;
        let ids: Vec<u32> = result.iter().map(|n| n.id).collect();
        assert_eq!(ids, (start..start + N / 2).collect::<Vec<_>>(), "task {t}");
        collect(result, &mut seen);
    }
    // The same as the blocking page-in, which finds the live values.
    let again: Vec<Shared<Node>> = page_in(&storage, keys[3]).unwrap();
    for (a, b) in again.iter().zip(&results[3]) {
        assert!(Shared::ptr_eq(a, b));
    }
    if threads().is_some() {
        let peak = peak.load(Ordering::Relaxed);
        assert!(peak < 64, "{peak} threads at the peak");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_in_async_matches_page_in_on_a_fresh_store() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(SqliteBackedPagableStorage::try_new(dir.path()).unwrap());
    let nodes = dag(3000);
    let key = page_out(&storage, &nodes).unwrap();
    drop(nodes);
    // Read before and after the flush: first from the write buffer, then from the file.
    for flush in [false, true] {
        if flush {
            storage.flush().unwrap();
        }
        let back: Vec<Shared<Node>> = page_in_async(&storage, key).await.unwrap();
        let mut seen = HashMap::new();
        collect(&back, &mut seen);
        assert_eq!(seen.len(), 3000);
        let blocking: Vec<Shared<Node>> = page_in(&storage, key).unwrap();
        assert_eq!(back, blocking);
        drop((back, blocking));
        storage.release_memory();
    }
}

/// The same shape as [`Node`] under another type, so its arc-cache entries are other ones.
#[derive(Debug, Serialize, Deserialize)]
struct Twin {
    id: u32,
    name: String,
    kids: Vec<Shared<Twin>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_in_async_takes_live_values_and_reads_what_a_live_value_of_another_type_hides() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(SqliteBackedPagableStorage::try_new(dir.path()).unwrap());
    let nodes = dag(2000);
    let key = page_out(&storage, &nodes).unwrap();
    storage.flush().unwrap();
    drop(nodes);
    storage.release_memory();
    // Page it in and keep a part alive: the async page-in of the whole takes those values.
    let whole: Vec<Shared<Node>> = page_in(&storage, key).unwrap();
    let kept: Vec<Shared<Node>> = whole[1000..1100].to_vec();
    drop(whole);
    let again: Vec<Shared<Node>> = page_in_async(&storage, key).await.unwrap();
    for node in &kept {
        assert!(Shared::ptr_eq(node, &again[node.id as usize]));
    }
    let mut seen = HashMap::new();
    collect(&again, &mut seen);
    assert_eq!(seen.len(), 2000);
    drop(again);
    // The kept values are `Node`s: a page-in as `Twin` cannot use them, and reads their
    // records (not prefetched) while deserializing.
    let twins: Vec<Shared<Twin>> = page_in_async(&storage, key).await.unwrap();
    assert_eq!(twins.len(), 2000);
    let mut stack: Vec<&Shared<Twin>> = twins.iter().collect();
    let mut count = 0;
    let mut visited = std::collections::HashSet::new();
    while let Some(twin) = stack.pop() {
        if visited.insert(twin.id) {
            count += 1;
            assert_eq!(twin.name, format!("node-{}", twin.id));
            stack.extend(twin.kids.iter());
        }
    }
    assert_eq!(count, 2000);
    drop(kept);
}
