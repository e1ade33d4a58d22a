//! What paging does to memory, counted with a counting global allocator (live heap bytes of
//! this test binary, not RSS; SQLite's own C allocations are not counted):
//!
//! - `page_out_unpinned` frees the bytes of the `PagableArc` values it pages out, whether
//!   they were never stored, faulted back in, or paged in lazily inside a graph;
//! - under a memory budget, while a workload creates values and pins random ones, the
//!   worker brings resident paged bytes back within the budget after every burst.
//!
//! Its own binary: the allocator is global. The tests take turns (`serial`), so one test's
//! allocations never show up in another's counts.

mod common;

use std::alloc::System;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{Rng, seed_from_env};
use pagestore::{
    Durability, InMemoryPagableStorage, NodeStore, PagableArc, PagableStorage, SqliteOptions,
    WithRuntime, page_in, page_out,
};
use serde::{Deserialize, Serialize};
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

/// One test at a time: the allocator counts every thread of the binary.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The deadline only turns "never" into a failure.
const DEADLINE: Duration = Duration::from_secs(30);

/// Value `n`: `len` bytes that depend on `n`, so every value has its own key and a wrong
/// value is caught.
fn bytes(n: usize, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    Rng::new(0x5eed ^ n as u64).fill(&mut out);
    out
}

fn percent(part: isize, whole: usize) -> f64 {
    100.0 * part as f64 / whole as f64
}

// ------------------------------------------------------------ (a) page-out frees the bytes

const VALUES: usize = 160;
const VALUE_BYTES: usize = 64 << 10;

#[derive(Serialize, Deserialize)]
struct Module {
    name: String,
    body: PagableArc<Vec<u8>>,
}

/// Runs `page_out` (which must page out every one of `VALUES` values of `VALUE_BYTES`) and
/// waits until at least 90% of the bytes resident at the start are freed; returns the share
/// freed, in percent.
fn freed_by(what: &str, storage: &impl PagableStorage, page_out: impl FnOnce()) -> f64 {
    let value_bytes = VALUES * VALUE_BYTES;
    let before = live_bytes();
    page_out();
    let at_once = percent(before - live_bytes(), value_bytes);
    // Records of values stored just now wait in the store's write buffer until committed;
    // dead arc-cache entries of inline values are swept within a few milliseconds.
    storage.flush().unwrap();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let freed = before - live_bytes();
        let share = percent(freed, value_bytes);
        if share >= 90.0 {
            eprintln!(
                "{what}: freed {freed} of {value_bytes} value bytes ({share:.1}%; \
                 {at_once:.1}% at once, before the commit and the sweep)"
            );
            return share;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: only {freed} of {value_bytes} value bytes freed ({share:.1}%)"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn page_out_unpinned_frees_at_least_90_percent_of_a_graphs_value_bytes() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(SqliteOptions::default().open(dir.path()).unwrap());
    let modules: Vec<Module> = (0..VALUES)
        .map(|n| Module {
            name: format!("module {n}"),
            body: PagableArc::new(bytes(n, VALUE_BYTES), &storage),
        })
        .collect();
    let check = |modules: &[Module]| {
        for (n, module) in modules.iter().enumerate() {
            assert_eq!(module.name, format!("module {n}"));
            assert!(
                *module.body.pin().unwrap() == bytes(n, VALUE_BYTES),
                "value {n}"
            );
        }
    };

    // 1. Never stored: serialized, stored, dropped.
    freed_by("never-stored values", &*storage, || {
        let report = storage.page_out_unpinned().unwrap();
        assert_eq!(
            (report.evicted, report.serialized),
            (VALUES as u64, VALUES as u64)
        );
    });
    assert!(modules.iter().all(|m| !m.body.is_resident()));

    // 2. Faulted back in, then paged out again: clean, no I/O.
    check(&modules);
    freed_by("faulted-in values", &*storage, || {
        let report = storage.page_out_unpinned().unwrap();
        assert_eq!((report.evicted, report.serialized), (VALUES as u64, 0));
    });

    // 3. The graph paged out and back in: its bodies are lazy handles until pinned.
    let key = page_out(&storage, &modules).unwrap();
    drop(modules);
    let back: Vec<Module> = page_in(&storage, key).unwrap();
    assert!(back.iter().all(|m| !m.body.is_resident()));
    check(&back);
    freed_by("values of a paged-in graph", &*storage, || {
        let report = storage.page_out_unpinned().unwrap();
        assert_eq!((report.evicted, report.serialized), (VALUES as u64, 0));
    });
    let stats = storage.paging_stats();
    assert_eq!((stats.resident_values, stats.resident_bytes), (0, 0));
    check(&back);
}

/// An unsized value keeps its bytes inline in the `Arc`'s allocation, which a `Weak` in the
/// arc cache keeps alive: faulted-in `[u8]` values must still be freed once paged out.
#[test]
fn page_out_unpinned_frees_at_least_90_percent_of_inline_slice_bytes() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(SqliteOptions::default().open(dir.path()).unwrap());
    let handles: Vec<PagableArc<[u8]>> = (0..VALUES)
        .map(|n| PagableArc::from_arc(Arc::from(bytes(n, VALUE_BYTES)), &storage))
        .collect();
    freed_by("never-stored slices", &*storage, || {
        let report = storage.page_out_unpinned().unwrap();
        assert_eq!(report.evicted, VALUES as u64);
    });
    for (n, handle) in handles.iter().enumerate() {
        assert!(
            *handle.pin().unwrap() == *bytes(n, VALUE_BYTES),
            "slice {n}"
        );
    }
    freed_by("faulted-in slices", &*storage, || {
        let report = storage.page_out_unpinned().unwrap();
        assert_eq!((report.evicted, report.serialized), (VALUES as u64, 0));
    });
}

// ------------------------------------------------ (b) resident bytes under a budget

const WORKLOAD_VALUE: usize = 16 << 10;
/// A value's weight: its record, a few bytes more than the value.
const ONE_VALUE: usize = WORKLOAD_VALUE + 64;
const BUDGET: usize = 16 * WORKLOAD_VALUE;
const BURSTS: usize = 40;
const NEW_PER_BURST: usize = 8;
const PINS_PER_BURST: usize = 12;
/// Pins held at once within a burst.
const HELD: usize = 3;

/// What a workload saw.
struct Observed {
    /// Its handles, still alive.
    handles: Vec<PagableArc<Vec<u8>>>,
    /// The largest resident bytes sampled after any operation.
    peak: usize,
    /// The largest resident bytes sampled after a burst, once the worker caught up.
    settled: usize,
}

/// Bursts of work (create values, pin random ones while holding a few, drop the pins); after
/// each operation samples resident bytes, and after each burst waits until the worker brings
/// them within `BUDGET` + one value.
fn workload<S: NodeStore>(label: &str, storage: &Arc<WithRuntime<S>>) -> Observed {
    let seed = seed_from_env("PAGESTORE_SEED");
    eprintln!("{label}: seed {seed} (PAGESTORE_SEED to replay)");
    let mut rng = Rng::new(seed);
    let mut handles: Vec<PagableArc<Vec<u8>>> = Vec::new();
    let mut observed = Observed {
        handles: Vec::new(),
        peak: 0,
        settled: 0,
    };
    let sample = |observed: &mut Observed| {
        let resident = storage.paging_stats().resident_bytes;
        observed.peak = observed.peak.max(resident);
    };
    for burst in 0..BURSTS {
        for _ in 0..NEW_PER_BURST {
            let n = handles.len();
            handles.push(PagableArc::new(bytes(n, WORKLOAD_VALUE), storage));
            sample(&mut observed);
        }
        let mut held = Vec::new();
        for _ in 0..PINS_PER_BURST {
            let n = rng.below(handles.len() as u64) as usize;
            let pinned = handles[n].pin().unwrap();
            assert!(*pinned == bytes(n, WORKLOAD_VALUE), "{label}: value {n}");
            held.push(pinned);
            if held.len() > HELD {
                held.swap_remove(rng.below(held.len() as u64) as usize);
            }
            sample(&mut observed);
        }
        drop(held);
        sample(&mut observed);
        let deadline = Instant::now() + DEADLINE;
        let settled = loop {
            let resident = storage.paging_stats().resident_bytes;
            if resident <= BUDGET + ONE_VALUE {
                break resident;
            }
            assert!(
                Instant::now() < deadline,
                "{label}: after burst {burst}, {resident} bytes stay resident over a budget \
                 of {BUDGET}: {:?}",
                storage.paging_stats()
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        observed.settled = observed.settled.max(settled);
    }
    // Every value comes back, whatever was evicted.
    for (n, handle) in handles.iter().enumerate() {
        assert!(
            *handle.pin().unwrap() == bytes(n, WORKLOAD_VALUE),
            "{label}: value {n}"
        );
    }
    let stats = storage.paging_stats();
    eprintln!(
        "{label}: budget {BUDGET}, one value {ONE_VALUE}: peak resident {} ({:.2}x the \
         budget), at most {} after the worker caught up; {stats:?}",
        observed.peak,
        observed.peak as f64 / BUDGET as f64,
        observed.settled
    );
    assert_eq!(stats.eviction_failures, 0, "{label}: {stats:?}");
    // A thread that makes a value resident while resident bytes are more than budget/16 over
    // the budget evicts before it returns: that bounds the peak, not only the settled state.
    assert!(
        observed.peak <= BUDGET + BUDGET / 16 + ONE_VALUE,
        "{label}: peak resident {} over budget + budget/16 + one value",
        observed.peak
    );
    assert!(
        stats.serializations <= handles.len() as u64,
        "{label}: a value serialized twice: {stats:?}"
    );
    assert!(
        stats.evictions > 0 && stats.faults > 0,
        "{label}: {stats:?}"
    );
    observed.handles = handles;
    observed
}

#[test]
fn under_a_budget_resident_bytes_come_back_within_it_after_every_burst_in_memory() {
    let _serial = serial();
    let storage = Arc::new(InMemoryPagableStorage::new().memory_budget(BUDGET));
    workload("memory", &storage);
}

#[test]
fn under_a_budget_resident_bytes_come_back_within_it_after_every_burst_on_sqlite() {
    let _serial = serial();
    for durability in [Durability::Cache, Durability::Durable] {
        let label = format!("sqlite {durability:?}");
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(
            SqliteOptions::default()
                .durability(durability)
                .memory_budget(BUDGET)
                .open(dir.path())
                .unwrap(),
        );
        let base = live_bytes();
        let observed = workload(&label, &storage);
        // The values are on disk, not on the heap: with every handle alive, once the worker
        // caught up with the last pins and the writer committed, the heap holds about the
        // budget's worth of values plus per-handle bookkeeping, not the workload's 5 MiB.
        let total = observed.handles.len() * WORKLOAD_VALUE;
        let bound = BUDGET + ONE_VALUE + total / 8;
        let deadline = Instant::now() + DEADLINE;
        loop {
            storage.flush().unwrap();
            let resident = storage.paging_stats().resident_bytes;
            let grown = live_bytes() - base;
            if resident <= BUDGET + ONE_VALUE && grown <= bound as isize {
                eprintln!(
                    "{label}: with all {} handles alive the heap grew {grown} bytes for \
                     {total} bytes of values ({resident} resident)",
                    observed.handles.len()
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{label}: the heap grew {grown} bytes (bound {bound}) for {total} bytes of \
                 values, {resident} resident"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
