//! Dropping a paged-in graph frees its bytes without the user calling anything, counted with
//! a counting global allocator (bytes live), not RSS.
//!
//! Was a defect: the arc cache holds `Weak`s, and a `Weak` keeps its allocation; a
//! `Shared<[u8]>` holds its bytes *in* that allocation, so 1,000 paged-in 64 KiB slices stayed
//! allocated (62.6 MiB) after their last user dropped them, until `release_memory()`.

use std::alloc::System;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagestore::{InMemoryPagableStorage, Shared, page_in, page_out};
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};

#[global_allocator]
static ALLOCATOR: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes currently allocated by the whole test binary.
fn live_bytes() -> isize {
    let stats = ALLOCATOR.stats();
    // stats_alloc already counts a realloc's growth in `bytes_allocated` (and its shrinking in
    // `bytes_deallocated`); `bytes_reallocated` is the same change again.
    stats.bytes_allocated as isize - stats.bytes_deallocated as isize
}

/// The tests of this file measure one global counter: they run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

const VALUES: usize = 1000;
const VALUE_BYTES: usize = 64 << 10;

#[test]
fn dropping_a_paged_in_graph_frees_its_bytes() {
    let _alone = one_at_a_time();
    let storage = Arc::new(InMemoryPagableStorage::new());
    let graph: Vec<Shared<[u8]>> = (0..VALUES)
        .map(|n| Shared::from(Arc::from(vec![(n % 251) as u8; VALUE_BYTES + n])))
        .collect();
    let key = page_out(&storage, &graph).unwrap();
    drop(graph);

    let before = live_bytes();
    let back: Vec<Shared<[u8]>> = page_in(&storage, key).unwrap();
    assert_eq!(back.len(), VALUES);
    assert_eq!(back[7].len(), VALUE_BYTES + 7);
    let loaded = live_bytes() - before;
    assert!(
        loaded > (VALUES * VALUE_BYTES) as isize,
        "the page-in allocated {loaded} bytes"
    );

    drop(back);
    // Freed by the cache's sweeper within a few of its intervals; the deadline only turns
    // "never" into a failure.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = live_bytes() - before;
        // What may stay is bookkeeping (the cache's map capacity), not values: under 1%.
        if left < loaded / 100 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} bytes of the dropped graph are still allocated"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The SQLite writer remembers the keys it committed (so that storing them again costs a
/// lookup) in at most about 24 bytes each, and keeps no record or record allocation once a
/// batch is committed. Counted with the allocator: SQLite's own memory is not in it.
#[test]
fn remembering_committed_keys_costs_about_24_bytes_each() {
    let _alone = one_at_a_time();
    const KEYS: usize = 200_000;
    let dir = tempfile::tempdir().unwrap();
    let store = pagestore::SqliteOptions::default()
        .open_node_store(dir.path())
        .unwrap();
    let nodes: Vec<pagestore::PagableData> = (0..KEYS as u32)
        .map(|i| pagestore::PagableData {
            data: i.to_le_bytes().repeat(8),
            arcs: vec![],
        })
        .collect();
    let nodes_bytes = live_bytes();
    let before = live_bytes();
    for node in &nodes {
        pagestore::NodeStore::put(&store, node.clone()).unwrap();
    }
    pagestore::NodeStore::flush(&store).unwrap();
    let per_key = (live_bytes() - before) as f64 / KEYS as f64;
    eprintln!("{per_key:.1} bytes per remembered key (nodes: {nodes_bytes} bytes live)");

    assert!(per_key <= 28.0, "{per_key:.1} bytes per remembered key");
    // Storing them again is a lookup: nothing new is queued.
    for node in nodes.iter().take(1000) {
        pagestore::NodeStore::put(&store, node.clone()).unwrap();
    }
    let stats = store.stats().unwrap();
    assert_eq!(stats.pending_records, 0, "{stats:?}");
}
