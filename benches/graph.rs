//! Graph layer benchmark: page a 100,000-node DAG out and in on the in-memory backend, and
//! compare with serde's `rc` feature + postcard (which copies every shared node) on a graph
//! small enough for it.
//!
//! Each node points to two random earlier nodes and to one of ten shared polymorphic leaves;
//! the root is the list of all nodes. Run: `cargo bench --bench graph`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use pagestore::{InMemoryPagableStorage, PagableStorage, Shared, page_in, page_out};
use serde::{Deserialize, Serialize};

#[path = "common/dag.rs"]
mod dag;

use dag::{Leaf, Node, build, build_with, leaves};

/// The same node for serde's `rc` feature: every `Arc` is serialized in full where it occurs.
#[derive(Serialize, Deserialize)]
struct RcNode {
    id: u32,
    name: String,
    leaf: Arc<dyn Leaf>,
    kids: Vec<Arc<RcNode>>,
}

fn build_rc(n: usize) -> Vec<Arc<RcNode>> {
    let leaves = leaves();
    build_with(n, |id, leaf, kids| {
        Arc::new(RcNode {
            id,
            name: format!("node-{id}"),
            leaf: leaves[leaf].clone(),
            kids,
        })
    })
}

fn stored_bytes(storage: &InMemoryPagableStorage, root: pagestore::DataKey) -> usize {
    // Walk the stored DAG once per distinct key.
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![root];
    let mut bytes = 0;
    while let Some(key) = stack.pop() {
        if seen.insert(key) {
            let node = storage.fetch_data_blocking(&key).unwrap();
            bytes += pagestore::codec::encoded_len(&node);
            stack.extend(node.arcs.iter().copied());
        }
    }
    bytes
}

/// This thread's CPU time in seconds (Linux), which other jobs on a shared machine disturb far
/// less than wall time.
fn thread_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let nanos: f64 = stat.split_whitespace().next()?.parse().ok()?;
    Some(nanos / 1e9)
}

/// Prints the mean CPU time of each operation over a few runs, next to criterion's wall times.
fn cpu_time_per_op(
    root: &Vec<Shared<Node>>,
    storage: &Arc<InMemoryPagableStorage>,
    key: pagestore::DataKey,
    edges: usize,
) {
    const RUNS: u32 = 8;
    let Some(_) = thread_cpu_seconds() else {
        return;
    };
    let mut spent = [0.0f64; 3];
    let mut time = |slot: usize, f: &mut dyn FnMut()| {
        let start = thread_cpu_seconds().unwrap_or(0.0);
        f();
        spent[slot] += thread_cpu_seconds().unwrap_or(0.0) - start;
    };
    for _ in 0..RUNS {
        let fresh = Arc::new(InMemoryPagableStorage::new());
        time(0, &mut || {
            black_box(page_out(&fresh, root).unwrap());
        });
        drop(fresh);
        let mut first = None;
        time(1, &mut || {
            first = Some(page_in::<Vec<Shared<Node>>>(storage, key).unwrap());
        });
        let mut second = None;
        time(2, &mut || {
            second = Some(page_in::<Vec<Shared<Node>>>(storage, key).unwrap());
        });
        drop((first, second));
    }
    let nodes = root.len() as f64;
    let [out, fresh_in, again] = spent.map(|total| total / f64::from(RUNS));
    eprintln!(
        "cpu time per op (mean of {RUNS}): page_out {:.1} ms = {:.2} us/edge; page_in {:.1} ms \
         = {:.2} us/node; page_in while alive {:.1} ms = {:.2} us/node",
        out * 1e3,
        out * 1e6 / edges as f64,
        fresh_in * 1e3,
        fresh_in * 1e6 / nodes,
        again * 1e3,
        again * 1e6 / nodes,
    );
}

fn big_graph(c: &mut Criterion) {
    let n: usize = std::env::var("PAGESTORE_BENCH_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let root = build(n);
    let edges = n + root.iter().map(|node| node.kids.len() + 1).sum::<usize>();
    let storage = Arc::new(InMemoryPagableStorage::new());
    let key = page_out(&storage, &root).unwrap();
    eprintln!(
        "graph: {n} nodes, {edges} Shared edges, {} stored entries, {} stored bytes",
        storage.len(),
        stored_bytes(&storage, key)
    );

    cpu_time_per_op(&root, &storage, key, edges);

    let mut group = c.benchmark_group(format!("graph_{n}"));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("page_out", |b| {
        b.iter_batched(
            || Arc::new(InMemoryPagableStorage::new()),
            // Returned, so criterion drops the store after the measurement.
            |fresh| (black_box(page_out(&fresh, &root).unwrap()), fresh),
            BatchSize::PerIteration,
        )
    });
    group.bench_function("page_in", |b| {
        b.iter_batched(
            || (),
            |()| page_in::<Vec<Shared<Node>>>(&storage, key).unwrap(),
            BatchSize::PerIteration,
        )
    });
    // Incremental re-page-out: replace the newest node (no other node points to it, so it is
    // next to the root list) with an edited copy and page the list out again into the store
    // that remembers every other node's key. Compare with `page_out` above.
    group.bench_function("re_page_out_after_editing_one_node", |b| {
        b.iter_batched(
            || {
                let mut edited = root.clone();
                let last = edited.pop().expect("a non-empty graph");
                edited.push(Shared::new(Node {
                    id: last.id,
                    name: format!("{} (edited)", last.name),
                    leaf: last.leaf.clone(),
                    kids: last.kids.clone(),
                }));
                edited
            },
            // Returned, so the list is dropped after the measurement.
            |edited| (black_box(page_out(&storage, &edited).unwrap()), edited),
            BatchSize::PerIteration,
        )
    });
    let alive = page_in::<Vec<Shared<Node>>>(&storage, key).unwrap();
    group.bench_function("page_in_again_while_alive", |b| {
        b.iter_with_large_drop(|| page_in::<Vec<Shared<Node>>>(&storage, key).unwrap())
    });
    group.finish();
    drop(alive);
}

/// pagestore vs serde `rc` + postcard on graphs small enough for the copying encoding.
fn versus_serde_rc(c: &mut Criterion) {
    for n in [100usize, 300, 1_000] {
        let root = build(n);
        let rc_root = build_rc(n);
        let storage = Arc::new(InMemoryPagableStorage::new());
        let key = page_out(&storage, &root).unwrap();
        let rc_bytes = postcard::to_allocvec(&rc_root).unwrap();
        eprintln!(
            "compare n={n}: pagestore {} bytes in {} entries; serde rc + postcard {} bytes",
            stored_bytes(&storage, key),
            storage.len(),
            rc_bytes.len()
        );
        let mut group = c.benchmark_group(format!("compare_{n}"));
        group.sample_size(10);
        group.measurement_time(Duration::from_secs(3));
        group.bench_function("pagestore_out", |b| {
            b.iter_batched(
                || Arc::new(InMemoryPagableStorage::new()),
                // Returned, so criterion drops the store after the measurement.
                |fresh| (black_box(page_out(&fresh, &root).unwrap()), fresh),
                BatchSize::PerIteration,
            )
        });
        // PerIteration: each result is dropped before the next page-in, so every page-in
        // really loads (a batch of live results would make the next ones cache hits).
        group.bench_function("pagestore_in", |b| {
            b.iter_batched(
                || (),
                |()| page_in::<Vec<Shared<Node>>>(&storage, key).unwrap(),
                BatchSize::PerIteration,
            )
        });
        group.bench_function("serde_rc_out", |b| {
            b.iter(|| black_box(postcard::to_allocvec(&rc_root).unwrap()))
        });
        group.bench_function("serde_rc_in", |b| {
            b.iter_with_large_drop(|| postcard::from_bytes::<Vec<Arc<RcNode>>>(&rc_bytes).unwrap())
        });
        group.finish();
    }
}

/// A 100,000-long chain: page-in recurses once per link, on a stack that grows.
fn deep_chain(c: &mut Criterion) {
    #[derive(Serialize, Deserialize)]
    struct Link(u32, Option<Shared<Link>>);
    const LEN: u32 = 100_000;
    let mut chain = Link(0, None);
    for i in 1..LEN {
        chain = Link(i, Some(Shared::new(chain)));
    }
    let storage = Arc::new(InMemoryPagableStorage::new());
    let key = page_out(&storage, &chain).unwrap();
    let mut group = c.benchmark_group("chain_100000");
    group.sample_size(10);
    group.bench_function("page_out", |b| {
        b.iter_batched(
            || Arc::new(InMemoryPagableStorage::new()),
            |fresh| black_box(page_out(&fresh, &chain).unwrap()),
            BatchSize::PerIteration,
        )
    });
    group.bench_function("page_in", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                let start = std::time::Instant::now();
                let back = page_in::<Link>(&storage, key).unwrap();
                total += start.elapsed();
                // Rust's drop glue would recurse 100,000 deep.
                pagestore::drop_deep(back).unwrap();
            }
            total
        })
    });
    group.finish();
    pagestore::drop_deep(chain).unwrap();
}

criterion_group!(benches, big_graph, deep_chain, versus_serde_rc);
criterion_main!(benches);
