//! SQLite backend hot paths: store, flush, and the three kinds of fetch (a SQLite read, a
//! read of a pending record, an arc-cache hit). The side-by-side comparison with the
//! reference lives in a separate harness outside this repository (see docs/bench-sqlite.md).

use std::any::TypeId;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use pagestore::{DataKey, Durability, PagableData, PagableStorage, SqliteBackedPagableStorage};

/// Node `i`: 64..=256 pseudo-random bytes, like the anchor harness's small blobs.
fn node(i: u64) -> PagableData {
    pagestore::testing::node(i, 64 + (i % 193) as usize, vec![])
}

fn store(c: &mut Criterion) {
    let mut group = c.benchmark_group("sqlite/store");
    group.throughput(Throughput::Elements(1));
    let dir = tempfile::tempdir().unwrap();
    let storage = SqliteBackedPagableStorage::try_new(dir.path()).unwrap();
    let mut i = 0u64;
    group.bench_function("new", |b| {
        b.iter_batched(
            || {
                i += 1;
                node(i)
            },
            |data| storage.store_data(data).unwrap(),
            BatchSize::SmallInput,
        )
    });
    storage.flush().unwrap();
    group.bench_function("duplicate", |b| {
        b.iter_batched(
            || node(i / 2),
            |data| storage.store_data(data).unwrap(),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn flush(c: &mut Criterion) {
    let mut group = c.benchmark_group("sqlite/flush");
    let dir = tempfile::tempdir().unwrap();
    let storage = SqliteBackedPagableStorage::try_new(dir.path()).unwrap();
    let mut i = 0u64;
    group.throughput(Throughput::Elements(1000));
    group.bench_function("1000_new_nodes", |b| {
        b.iter_batched(
            || {
                for _ in 0..1000 {
                    i += 1;
                    storage.store_data(node(i)).unwrap();
                }
            },
            |()| storage.flush().unwrap(),
            BatchSize::PerIteration,
        )
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("nothing_pending", |b| b.iter(|| storage.flush().unwrap()));

    // The same commits in Durable mode (WAL): what its `synchronous` level costs per commit.
    let durable_dir = tempfile::tempdir().unwrap();
    let durable = pagestore::SqliteOptions::default()
        .durability(Durability::Durable)
        .open(durable_dir.path())
        .unwrap();
    group.throughput(Throughput::Elements(1000));
    group.bench_function("1000_new_nodes_durable", |b| {
        b.iter_batched(
            || {
                for _ in 0..1000 {
                    i += 1;
                    durable.store_data(node(i)).unwrap();
                }
            },
            |()| durable.flush().unwrap(),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn fetch(c: &mut Criterion) {
    const N: u64 = 100_000;
    let mut group = c.benchmark_group("sqlite/fetch");
    group.throughput(Throughput::Elements(1));
    let dir = tempfile::tempdir().unwrap();
    let storage = SqliteBackedPagableStorage::try_new(dir.path()).unwrap();
    let keys: Vec<DataKey> = (0..N)
        .map(|i| storage.store_data(node(i)).unwrap())
        .collect();
    storage.flush().unwrap();

    let mut n = 0usize;
    let mut next = || {
        n = (n + 7919) % keys.len();
        keys[n]
    };
    group.bench_function("sqlite_read", |b| {
        b.iter(|| black_box(storage.fetch_data_blocking(&next()).unwrap()))
    });

    // A key that is only in the write buffer: a large buffer keeps it pending.
    let pending_dir = tempfile::tempdir().unwrap();
    let pending = pagestore::SqliteOptions::default()
        .write_buffer_rows(1 << 22)
        .write_buffer_bytes(1 << 30)
        .open(pending_dir.path())
        .unwrap();
    let pending_keys: Vec<DataKey> = (0..10_000)
        .map(|i| pending.store_data(node(i)).unwrap())
        .collect();
    let mut m = 0usize;
    group.bench_function("pending_read", |b| {
        b.iter(|| {
            m = (m + 7919) % pending_keys.len();
            black_box(pending.fetch_data_blocking(&pending_keys[m]).unwrap())
        })
    });

    let key = keys[0];
    let live = Arc::new(String::from("live"));
    storage.on_arc_deserialized(TypeId::of::<String>(), key, Box::new(live.clone()));
    group.bench_function("arc_cache_hit", |b| {
        b.iter(|| {
            black_box(
                storage
                    .fetch_arc_or_data_blocking(&TypeId::of::<String>(), &key)
                    .unwrap(),
            )
        })
    });
    group.finish();
}

/// A SQLite read while another thread stores and commits big batches. With no journal
/// (Cache) a read that meets a commit waits for it on SQLite's busy handler; in WAL mode
/// (Durable) it reads the last committed snapshot without waiting.
fn fetch_while_writing(c: &mut Criterion) {
    for (name, durability) in [
        ("cache", Durability::Cache),
        ("durable", Durability::Durable),
    ] {
        fetch_while_writing_in(c, name, durability);
    }
}

fn fetch_while_writing_in(c: &mut Criterion, name: &str, durability: Durability) {
    use std::sync::atomic::{AtomicBool, Ordering};
    const N: u64 = 100_000;
    let mut group = c.benchmark_group("sqlite/fetch_while_writing");
    group.throughput(Throughput::Elements(1));
    let dir = tempfile::tempdir().unwrap();
    let storage = pagestore::SqliteOptions::default()
        .durability(durability)
        .open(dir.path())
        .unwrap();
    let keys: Vec<DataKey> = (0..N)
        .map(|i| storage.store_data(node(i)).unwrap())
        .collect();
    storage.flush().unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut i = N;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..20_000 {
                    i += 1;
                    storage.store_data(node(i)).unwrap();
                }
                storage.flush().unwrap();
            }
        });
        let mut n = 0usize;
        group.bench_function(name, |b| {
            b.iter(|| {
                n = (n + 7919) % keys.len();
                black_box(storage.fetch_data_blocking(&keys[n]).unwrap())
            })
        });
        stop.store(true, Ordering::Relaxed);
    });
    group.finish();
}

criterion_group!(benches, store, flush, fetch, fetch_while_writing);
criterion_main!(benches);
