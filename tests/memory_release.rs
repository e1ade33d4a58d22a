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

/// Bytes currently allocated by the whole test binary. `stats_alloc` already counts a
/// realloc's growth in `bytes_allocated` (and its shrinking in `bytes_deallocated`):
/// adding `bytes_reallocated` too would count every growth twice, for good.
fn live_bytes() -> isize {
    let stats = ALLOCATOR.stats();
    stats.bytes_allocated as isize - stats.bytes_deallocated as isize
}

const VALUES: usize = 1000;
const VALUE_BYTES: usize = 64 << 10;

#[test]
fn dropping_a_paged_in_graph_frees_its_bytes() {
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
        if left < (VALUE_BYTES * 4) as isize {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} bytes of the dropped graph are still allocated"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
