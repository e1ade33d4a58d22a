//! Many threads pin and drop overlapping `PagableArc`s while the pager's worker evicts under a
//! tiny budget, on the in-memory store and on SQLite (`Durable`): no panic, no deadlock (a
//! deadline turns a hang into a failure), every pin returns its value's content, no eviction
//! fails, and no value is serialized twice.
//!
//! The handles overlap two ways: threads share clones of one handle (one slot), and half of
//! the keys also have a second handle made with `from_key` (two slots, one key: faulting both
//! in shares one `Arc`).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Rng, seed_from_env, within};
use pagestore::{
    Durability, InMemoryPagableStorage, NodeStore, PagableArc, PagableStorage, SqliteOptions,
    WithRuntime,
};

const VALUES: usize = 48;
const VALUE_BYTES: usize = 4 << 10;
/// About two values: the worker evicts nearly all the time.
const BUDGET: usize = 2 * VALUE_BYTES + 100;
const THREADS: usize = 6;
const OPS_PER_THREAD: usize = 1500;
/// Pins a thread holds at once, at most.
const HELD: usize = 3;
/// Turns a deadlock into a failure; a healthy run takes a few seconds.
const DEADLINE: Duration = Duration::from_secs(180);

fn value(n: usize) -> Vec<u8> {
    let mut out = vec![0u8; VALUE_BYTES];
    Rng::new(0xc0c0 ^ n as u64).fill(&mut out);
    out
}

/// The handles every thread picks from: `(value number, handle)`, where handles of one value
/// are clones of one slot or `from_key` handles to its key.
type Handles = Vec<(usize, PagableArc<Vec<u8>>)>;

fn run<S: NodeStore + 'static>(label: &str, storage: Arc<WithRuntime<S>>) {
    let seed = seed_from_env("PAGESTORE_SEED");
    eprintln!("{label}: seed {seed} (PAGESTORE_SEED to replay)");
    let expected: Arc<Vec<Vec<u8>>> = Arc::new((0..VALUES).map(value).collect());
    let originals: Vec<PagableArc<Vec<u8>>> = (0..VALUES)
        .map(|n| PagableArc::new(value(n), &storage))
        .collect();
    // Store half of them so they have keys, and give those a second slot with the same key.
    for original in &originals[..VALUES / 2] {
        let pinned = original.pin().unwrap();
        drop(pinned);
    }
    let report = storage.page_out_unpinned().unwrap();
    assert_eq!(report.failed, 0, "{label}: {report:?}");
    let mut handles: Handles = originals.iter().cloned().enumerate().collect();
    for (n, original) in originals.iter().enumerate().take(VALUES / 2) {
        let key = original.key().expect("paged out above");
        handles.push((n, PagableArc::from_key(key, &storage)));
    }
    let handles = Arc::new(handles);

    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (storage, handles, expected) = (
                Arc::clone(&storage),
                Arc::clone(&handles),
                Arc::clone(&expected),
            );
            let label = label.to_string();
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed ^ (t as u64 + 1).wrapping_mul(0x9e37_79b9));
                // Thread 0 pins through pin_async on a runtime of its own.
                let runtime = (t == 0).then(|| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap()
                });
                let mut held: Vec<Arc<Vec<u8>>> = Vec::new();
                for op in 0..OPS_PER_THREAD {
                    let (n, handle) = &handles[rng.below(handles.len() as u64) as usize];
                    let pinned = match rng.below(10) {
                        0 => match handle.try_pin() {
                            Some(pinned) => pinned,
                            None => continue,
                        },
                        _ => match &runtime {
                            Some(runtime) => runtime.block_on(handle.pin_async()),
                            None => handle.pin(),
                        }
                        .unwrap_or_else(|err| panic!("{label}: thread {t} op {op}: {err:#}")),
                    };
                    assert!(
                        *pinned == expected[*n],
                        "{label}: thread {t} op {op}: wrong content for value {n}"
                    );
                    held.push(pinned);
                    if held.len() > HELD || rng.percent(30) {
                        held.swap_remove(rng.below(held.len() as u64) as usize);
                    }
                    // Now and then, what an idle-time caller does, concurrently with the
                    // worker and the other threads.
                    match rng.below(200) {
                        0 => {
                            let report = storage.page_out_unpinned().unwrap();
                            assert_eq!(report.failed, 0, "{label}: {report:?}");
                        }
                        1 => storage.release_memory(),
                        _ => {}
                    }
                }
            })
        })
        .collect();
    within(DEADLINE, &format!("{label}: the threads"), move || {
        for thread in threads {
            if let Err(panic) = thread.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });

    // The worker catches up once nothing is pinned.
    let deadline = Instant::now() + DEADLINE;
    while storage.paging_stats().resident_bytes > BUDGET + VALUE_BYTES + 100 {
        assert!(
            Instant::now() < deadline,
            "{label}: resident bytes stay over the budget: {:?}",
            storage.paging_stats()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let stats = storage.paging_stats();
    eprintln!("{label}: {stats:?}");
    assert_eq!(stats.eviction_failures, 0, "{label}: {stats:?}");
    assert!(
        stats.serializations <= VALUES as u64,
        "{label}: a value was serialized twice: {stats:?}"
    );
    assert!(
        stats.faults > 0 && stats.evictions > 0,
        "{label}: {stats:?}"
    );

    // Nothing is pinned any more, however the handles overlap: everything can leave.
    let report = storage.page_out_unpinned().unwrap();
    assert_eq!(
        (report.pinned, report.failed),
        (0, 0),
        "{label}: {report:?}"
    );
    let stats = storage.paging_stats();
    assert_eq!(
        (stats.resident_values, stats.resident_bytes),
        (0, 0),
        "{label}: {stats:?}"
    );
    for (n, handle) in handles.iter() {
        assert!(*handle.pin().unwrap() == expected[*n], "{label}: value {n}");
    }
    drop(handles);
    drop(originals);
    let stats = storage.paging_stats();
    assert_eq!(
        (stats.resident_values, stats.resident_bytes),
        (0, 0),
        "{label}: every handle dropped: {stats:?}"
    );
}

#[test]
fn threads_pinning_overlapping_handles_under_a_tiny_budget_in_memory() {
    run(
        "memory",
        Arc::new(InMemoryPagableStorage::new().memory_budget(BUDGET)),
    );
}

#[test]
fn threads_pinning_overlapping_handles_under_a_tiny_budget_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let storage = SqliteOptions::default()
        .durability(Durability::Durable)
        .memory_budget(BUDGET)
        .open(dir.path())
        .unwrap();
    run("sqlite Durable", Arc::new(storage));
}
