//! Garbage collection of a large SQLite store, half of it unreachable: time, peak memory,
//! bytes given back.
//!
//! `cargo bench --bench gc` builds a store of `GC_BENCH_NODES` nodes (default 1,000,000;
//! about 100 bytes each, every node naming one or two earlier ones) in which one root
//! reaches half of them, then collects it in a fresh child process so that its peak RSS is
//! the collection's own: a dry run, the collection, and the file before and after. Peak
//! live heap is sampled every millisecond from a counting allocator (Rust allocations
//! only; SQLite's page cache is in the RSS figure).
//!
//! `GC_BENCH_LAYOUT=integer-key` (or `without-rowid`, `rowid`) builds the store in that table
//! layout instead of the default (`Rowid`, marked in one pass, newest row first; the
//! collection reads by key in the others), to compare them.
//!
//! Prints one Markdown table. The figures are for the machine it runs on; compare runs
//! made one after the other.

use std::alloc::System;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pagestore::{Durability, NodeStore, PagableData, SqliteOptions, TableLayout};
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};

#[global_allocator]
static A: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const CHILD_ENV: &str = "GC_BENCH_CHILD";
const MIB: f64 = 1024.0 * 1024.0;

/// Bytes allocated through Rust's allocator and not freed yet.
fn live_heap() -> isize {
    let s = A.stats();
    s.bytes_allocated as isize - s.bytes_deallocated as isize
}

/// A field of `/proc/self/status` in bytes (`VmHWM`: peak RSS), 0 where there is none.
fn proc_status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Node `i` of graph `graph`: 64 bytes of data and up to two earlier nodes as children.
fn node(graph: u64, i: u64, earlier: &[pagestore::DataKey]) -> PagableData {
    let mut arcs = Vec::new();
    if let Some(last) = earlier.last() {
        // The previous node keeps the whole graph reachable from its last node; a second,
        // random earlier child makes it a DAG rather than a list.
        arcs.push(*last);
        if i % 2 == 0 {
            let pick = (graph << 40 | i).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 11;
            arcs.push(earlier[pick as usize % earlier.len()]);
        }
    }
    pagestore::testing::node(graph << 40 | i, 64, arcs)
}

/// The table layout `GC_BENCH_LAYOUT` names; the default layout without it.
fn layout() -> TableLayout {
    match std::env::var("GC_BENCH_LAYOUT").as_deref() {
        Err(_) => TableLayout::default(),
        Ok("rowid") => TableLayout::Rowid,
        Ok("without-rowid") => TableLayout::WithoutRowid,
        Ok("integer-key") => TableLayout::IntegerKey,
        Ok(other) => panic!("GC_BENCH_LAYOUT={other}: rowid, without-rowid or integer-key"),
    }
}

fn build(dir: &std::path::Path, nodes: u64) {
    let store = SqliteOptions::default()
        .table_layout(layout())
        .durability(Durability::Cache)
        .open_node_store(dir)
        .expect("open the bench store");
    for graph in 0..2u64 {
        let mut keys = Vec::with_capacity((nodes / 2) as usize);
        for i in 0..nodes / 2 {
            let key = store.put(node(graph, i, &keys)).expect("store a node");
            keys.push(key);
        }
        if graph == 0 {
            store
                .set_root("kept", *keys.last().expect("a node"))
                .expect("set the root");
        }
    }
    store.flush().expect("flush");
}

/// Samples the maxima of the live heap and of the anonymous RSS (the heap, SQLite's page
/// cache; not the mapped database file) every millisecond until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    heap: Arc<AtomicIsize>,
    anon: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let heap = Arc::new(AtomicIsize::new(live_heap()));
        let anon = Arc::new(AtomicU64::new(proc_status_bytes("RssAnon:")));
        let handle = {
            let (stop, heap, anon) = (stop.clone(), heap.clone(), anon.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    heap.fetch_max(live_heap(), Ordering::Relaxed);
                    anon.fetch_max(proc_status_bytes("RssAnon:"), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        Self {
            stop,
            heap,
            anon,
            handle: Some(handle),
        }
    }

    /// (peak live heap, peak anonymous RSS).
    fn peaks(mut self) -> (isize, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            handle.join().expect("the sampler ran");
        }
        (
            self.heap.load(Ordering::Relaxed).max(live_heap()),
            self.anon.load(Ordering::Relaxed),
        )
    }
}

fn child(dir: &str) {
    let store = SqliteOptions::default()
        .open_node_store(std::path::Path::new(dir))
        .expect("open the bench store");
    let before = store.stats().expect("stats");
    let base_heap = live_heap();
    let rss_before = proc_status_bytes("VmRSS:");

    let t = Instant::now();
    let dry = store.gc_dry_run().expect("dry run");
    let dry_time = t.elapsed();

    let sampler = Sampler::start();
    let t = Instant::now();
    let report = store.gc().expect("gc");
    let gc_time = t.elapsed();
    let (peak_heap, peak_anon) = sampler.peaks();
    let peak_heap = peak_heap - base_heap;
    let peak_rss = proc_status_bytes("VmHWM:");
    let after = store.stats().expect("stats");

    let row = |what: &str, value: String| println!("| {what} | {value} |");
    println!("| figure | value |");
    println!("|---|---|");
    row(
        "records before",
        format!(
            "{} ({:.0} MiB of records)",
            before.records,
            before.data_bytes as f64 / MIB
        ),
    );
    row(
        "dry run",
        format!(
            "{:.2} s (would delete {} of {})",
            dry_time.as_secs_f64(),
            dry.deleted,
            dry.kept + dry.deleted
        ),
    );
    row(
        "gc",
        format!(
            "{:.2} s: kept {}, deleted {}, {:.0} MiB of records freed",
            gc_time.as_secs_f64(),
            report.kept,
            report.deleted,
            report.bytes_freed as f64 / MIB
        ),
    );
    row(
        "gc peak live heap (Rust allocations)",
        format!("{:.1} MiB", peak_heap as f64 / MIB),
    );
    row(
        "peak RSS of the process, mapped database pages included (RSS before the dry run)",
        format!(
            "{:.0} MiB ({:.0} MiB)",
            peak_rss as f64 / MIB,
            rss_before as f64 / MIB
        ),
    );
    row(
        "gc peak anonymous RSS (heap and SQLite's caches, not the mapped file)",
        format!("{:.0} MiB", peak_anon as f64 / MIB),
    );
    let file = |s: &pagestore::StoreStats| s.file_bytes.unwrap_or(0) as f64 / MIB;
    row(
        "database file before / after (pages given back; free pages left)",
        format!(
            "{:.0} MiB / {:.0} MiB ({} pages; {})",
            file(&before),
            file(&after),
            report.pages_released,
            after.free_pages.unwrap_or(0)
        ),
    );
}

fn main() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(&dir);
        return;
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this with no such flag:
    // then a small store checks that the benchmark works.
    let benching = std::env::args().any(|a| a == "--bench");
    let nodes: u64 = std::env::var("GC_BENCH_NODES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(if benching { 1_000_000 } else { 2_000 });
    let dir = tempfile::tempdir().expect("a temporary directory");
    let t = Instant::now();
    build(dir.path(), nodes);
    eprintln!(
        "built {nodes} nodes ({:?} layout) in {:.1} s; collecting in a child process",
        layout(),
        t.elapsed().as_secs_f64()
    );
    let status = std::process::Command::new(std::env::current_exe().expect("this binary"))
        .env(CHILD_ENV, dir.path())
        .status()
        .expect("run the child");
    assert!(status.success(), "the child failed: {status}");
}
