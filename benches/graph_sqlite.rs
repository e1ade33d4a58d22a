//! The graph benchmark through SQLite: page the 100,000-node DAG of `benches/graph.rs` out to
//! a fresh SQLite store (default options) and back in, from the same store and from a
//! reopened one (its file in the OS cache), next to the in-memory store; µs per node.
//!
//! `cargo bench --bench graph_sqlite` (`GRAPH_BENCH_NODES`, default 100,000;
//! `GRAPH_BENCH_RUNS`, default 5). `harness = false`: one Markdown table of medians.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pagestore::{InMemoryPagableStorage, PagableStorage, Shared, SqliteOptions, page_in, page_out};

#[path = "common/dag.rs"]
mod dag;
#[path = "common/runs.rs"]
mod runs;

use dag::{Node, build};
use runs::{env, median};

type Graph = Vec<Shared<Node>>;

/// Medians of `runs` page-outs of `graph` into a fresh storage, and of page-ins of it from
/// the storage `reopen` gives after the page-out (each page-in with nothing alive).
fn measure<S: PagableStorage + 'static>(
    graph: &Graph,
    runs: usize,
    mut fresh: impl FnMut() -> Arc<S>,
    mut reopen: impl FnMut(Arc<S>) -> Arc<S>,
) -> (Duration, Duration) {
    let (mut outs, mut ins) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let storage = fresh();
        let t = Instant::now();
        let key = page_out(&storage, graph).expect("page out");
        storage.flush().expect("flush");
        outs.push(t.elapsed());
        let storage = reopen(storage);
        let t = Instant::now();
        let back: Graph = page_in(&storage, key).expect("page in");
        ins.push(t.elapsed());
        assert_eq!(back.len(), graph.len());
        drop(back);
    }
    (median(outs), median(ins))
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --benches`: nothing to check beyond building.
        return;
    }
    let n = env("GRAPH_BENCH_NODES", 100_000);
    let runs = env("GRAPH_BENCH_RUNS", 5).max(1);
    let graph = build(n);
    let us = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;

    let memory = measure(
        &graph,
        runs,
        || Arc::new(InMemoryPagableStorage::new()),
        |storage| {
            storage.release_memory();
            storage
        },
    );

    let scratch = tempfile::tempdir().expect("a temporary directory");
    let mut next = 0;
    let mut dir = scratch.path().to_path_buf();
    let open = |dir: &std::path::Path| Arc::new(SqliteOptions::default().open(dir).unwrap());
    let same = measure(
        &graph,
        runs,
        || {
            next += 1;
            dir = scratch.path().join(format!("same-{next}"));
            open(&dir)
        },
        |storage| {
            storage.release_memory();
            storage
        },
    );
    let mut reopened_dir = scratch.path().to_path_buf();
    let mut next = 0;
    let reopened = measure(
        &graph,
        runs,
        || {
            next += 1;
            reopened_dir = scratch.path().join(format!("reopened-{next}"));
            open(&reopened_dir)
        },
        |storage| {
            let dir = storage
                .path()
                .parent()
                .expect("the store's directory")
                .to_path_buf();
            drop(Arc::into_inner(storage).expect("the only handle"));
            // Read once, so that the page-in finds the file in the OS cache.
            let _ = std::fs::read(dir.join("pagable.db"));
            open(&dir)
        },
    );

    println!("{n} nodes, median of {runs} runs; default options (SQLite: Durable, rowid table)\n");
    println!("| store | page_out + flush | µs/node | page_in | µs/node |");
    println!("|---|---:|---:|---:|---:|");
    for (name, (out, inn)) in [
        ("in memory", memory),
        ("SQLite, same store", same),
        ("SQLite, reopened (OS cache warm)", reopened),
    ] {
        println!(
            "| {name} | {:.0} ms | {:.2} | {:.0} ms | {:.2} |",
            out.as_secs_f64() * 1e3,
            us(out),
            inn.as_secs_f64() * 1e3,
            us(inn)
        );
    }
}
