//! `PagableArc` on SQLite under a memory budget: page-out throughput, fault latency
//! percentiles, hit rates and throughput of uniform, Zipf(0.99) and hot-set accesses, peak
//! resident bytes against the budget, live heap and RSS, serializations per value; with two
//! baselines in the same run: every value resident in plain `Arc`s (the ceiling), and a
//! whole-graph `page_in` per query (what users do without `PagableArc`).
//!
//! `cargo bench --bench paging` prints one Markdown table (docs/bench-paging.md explains it).
//! Each configuration runs in a child process of its own (this binary again), so its heap and
//! RSS figures are its own and no configuration inherits another's freed memory.
//!
//! Sizes, from the environment (defaults in brackets):
//! - `PAGING_BENCH_VALUES` [200000]: values of `PAGING_BENCH_VALUE_BYTES` [2048] bytes each;
//! - `PAGING_BENCH_BUDGET_MIB` [64 MiB scaled by values / 200000]: the memory budget;
//! - `PAGING_BENCH_FAULTS` [min(values / 4, 50000)]: timed faults (and timed store reads);
//! - `PAGING_BENCH_OPS` [values / 10]: pins in each uniform and Zipf pass;
//! - `PAGING_BENCH_HOT_OPS` [4000000]: pins in each hot-set pass;
//! - `PAGING_BENCH_QUERIES` [3]: whole-graph page-ins per thread in that baseline;
//! - `PAGING_BENCH_THREADS` [1,2]: the thread counts to run;
//! - `PAGING_BENCH_DIR` [the system's temp dir]: where the databases are created.

use std::alloc::System;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pagestore::{
    Durability, PagableArc, PagableStorage, Shared, SqliteBackedPagableStorage, SqliteOptions,
    page_in, page_out,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use serde::{Deserialize, Serialize};
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};

#[global_allocator]
static A: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes allocated through Rust's allocator and not freed yet (SQLite's own `malloc` and the
/// memory map are not in it: RSS covers those). `stats_alloc` already adds a `realloc`'s
/// growth to `bytes_allocated` (and its shrinking to `bytes_deallocated`); `bytes_reallocated`
/// is the same change again, so it is not added.
fn live_heap() -> isize {
    let s = A.stats();
    s.bytes_allocated as isize - s.bytes_deallocated as isize
}

const MIB: f64 = 1024.0 * 1024.0;
const CHILD_ENV: &str = "PAGING_BENCH_CHILD";
const RESULT_PREFIX: &str = "PAGING_BENCH_RESULT ";

/// The paged value: a small header and `value_bytes` of pseudo-random bytes (distinct per
/// value, so content addressing stores each one).
#[derive(Serialize, Deserialize)]
struct Value {
    id: u64,
    name: String,
    bytes: Vec<u8>,
}

fn make_value(id: usize, len: usize) -> Value {
    let mut state = (id as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut bytes = Vec::with_capacity(len);
    while bytes.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let take = (len - bytes.len()).min(8);
        bytes.extend_from_slice(&state.to_le_bytes()[..take]);
    }
    Value {
        id: id as u64,
        name: format!("value {id}"),
        bytes,
    }
}

/// What a query does with a value it reached: reads a byte and the header.
fn touch(v: &Value) -> u64 {
    v.id ^ u64::from(v.bytes[v.bytes.len() / 2]) ^ v.name.len() as u64
}

#[derive(Clone, Debug)]
struct Params {
    values: usize,
    value_bytes: usize,
    budget: usize,
    faults: usize,
    ops: usize,
    hot_ops: usize,
    queries: usize,
    threads: Vec<usize>,
    dir: PathBuf,
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a whole number")),
        Err(_) => default,
    }
}

impl Params {
    fn from_env() -> Self {
        let values = env_usize("PAGING_BENCH_VALUES", 200_000).max(100);
        let value_bytes = env_usize("PAGING_BENCH_VALUE_BYTES", 2048).max(1);
        let budget = match std::env::var("PAGING_BENCH_BUDGET_MIB") {
            Ok(_) => env_usize("PAGING_BENCH_BUDGET_MIB", 64) << 20,
            // 64 MiB for 200,000 values: the same fraction of the data at any size.
            Err(_) => ((64u64 << 20) * values as u64 / 200_000) as usize,
        };
        let threads = std::env::var("PAGING_BENCH_THREADS")
            .unwrap_or_else(|_| "1,2".into())
            .split(',')
            .map(|t| {
                t.trim()
                    .parse::<usize>()
                    .expect("PAGING_BENCH_THREADS: 1,2")
            })
            .filter(|&t| t > 0)
            .collect();
        Self {
            values,
            value_bytes,
            budget,
            faults: env_usize("PAGING_BENCH_FAULTS", (values / 4).min(50_000)).min(values / 2),
            ops: env_usize("PAGING_BENCH_OPS", values / 10).max(1),
            hot_ops: env_usize("PAGING_BENCH_HOT_OPS", 4_000_000).max(1),
            queries: env_usize("PAGING_BENCH_QUERIES", 3).max(1),
            threads,
            dir: std::env::var_os("PAGING_BENCH_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir),
        }
    }
}

type Results = BTreeMap<String, f64>;

fn main() {
    let params = Params::from_env();
    match std::env::var(CHILD_ENV) {
        Ok(spec) => {
            let results = run_child(&params, &spec);
            println!(
                "{RESULT_PREFIX}{}",
                serde_json::to_string(&results).expect("results serialize")
            );
        }
        Err(_) => run_parent(&params),
    }
}

// ---------------------------------------------------------------------------------------
// The parent: runs each configuration in a child process, then prints the table.

fn run_parent(p: &Params) {
    let data_mib = (p.values * p.value_bytes) as f64 / MIB;
    println!("## Paging benchmark\n");
    println!(
        "{} values of {} bytes ({:.0} MiB of value bytes), budget {:.1} MiB ({:.1}% of the data); \
         {} timed faults; {} pins per uniform/Zipf pass; {} pins per hot-set pass; {} whole-graph \
         queries per thread; threads {:?}.",
        p.values,
        p.value_bytes,
        data_mib,
        p.budget as f64 / MIB,
        100.0 * p.budget as f64 / (p.values * p.value_bytes) as f64,
        p.faults,
        p.ops,
        p.hot_ops,
        p.queries,
        p.threads
    );
    println!(
        "Machine: {}; load average at start: {}.\n",
        cpu_model(),
        loadavg()
    );

    let mut runs: Vec<(String, Results)> = Vec::new();
    let started = Instant::now();
    let modes = [("cache", "Cache"), ("durable", "Durable")];
    for (mode, _) in modes {
        for &t in &p.threads {
            let spec = format!("paged:{mode}:{t}");
            runs.push((spec.clone(), spawn_child(&spec)));
        }
    }
    runs.push(("resident".into(), spawn_child("resident")));
    for (mode, _) in modes {
        let spec = format!("graph:{mode}");
        runs.push((spec.clone(), spawn_child(&spec)));
    }
    let all: BTreeMap<String, Results> = runs.into_iter().collect();

    let mut columns = Vec::new();
    for (mode, label) in modes {
        for &t in &p.threads {
            columns.push((mode, label, t));
        }
    }
    print_table(p, &all, &columns);
    println!(
        "\nWhole run: {:.0} s; load average at the end: {}.",
        started.elapsed().as_secs_f64(),
        loadavg()
    );
}

fn spawn_child(spec: &str) -> Results {
    eprintln!("paging bench: running {spec} ...");
    let started = Instant::now();
    let exe = std::env::current_exe().expect("the bench's own path");
    let output = Command::new(exe)
        .env(CHILD_ENV, spec)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("the child starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "child {spec} failed ({}):\n{stdout}",
        output.status
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(RESULT_PREFIX))
        .unwrap_or_else(|| panic!("child {spec} printed no result:\n{stdout}"));
    eprintln!(
        "paging bench: {spec} done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    serde_json::from_str(line).expect("the child's result parses")
}

fn print_table(p: &Params, all: &BTreeMap<String, Results>, columns: &[(&str, &str, usize)]) {
    let budget = p.budget as f64;
    let get = |spec: &str, key: &str| -> f64 {
        all.get(spec)
            .and_then(|r| r.get(key))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let paged = |c: &(&str, &str, usize), key: &str| get(&format!("paged:{}:{}", c.0, c.2), key);
    let resident = |c: &(&str, &str, usize), key: &str| paged(c, &format!("resident_{key}"));
    let graph = |c: &(&str, &str, usize), key: &str| get(&format!("graph:{}", c.0), key);

    let mut header = "| measurement | target |".to_string();
    let mut rule = "|---|---|".to_string();
    for (_, label, t) in columns {
        header += &format!(" {label}, {t} thread{} |", if *t == 1 { "" } else { "s" });
        rule += "---|";
    }
    println!("{header}\n{rule}");

    type Cell<'a> = Box<dyn Fn(&(&str, &str, usize)) -> String + 'a>;
    let row = |name: &str, target: &str, cell: Cell| {
        let mut line = format!("| {name} | {target} |");
        for c in columns {
            line += &format!(" {} |", cell(c));
        }
        println!("{line}");
    };
    let mark = |ok: bool| if ok { "✓" } else { "✗" };

    row(
        "page-out: values/s (create + worker + `page_out_unpinned` + flush)",
        "",
        Box::new(|c| rate(paged(c, "pageout_values_per_s"))),
    );
    row(
        "page-out: MiB/s of value bytes",
        "",
        Box::new(|c| format!("{:.0}", paged(c, "pageout_mib_per_s"))),
    );
    row(
        "page-out: evicted by the worker while creating",
        "",
        Box::new(|c| {
            format!(
                "{:.0}%",
                100.0 * paged(c, "pageout_worker_evicted") / p.values as f64
            )
        }),
    );
    row(
        "peak resident while creating (× budget)",
        "≤ 1.1×",
        Box::new(|c| {
            let x = paged(c, "pageout_peak_resident") / budget;
            format!("{:.0} MiB ({x:.2}×) {}", x * budget / MIB, mark(x <= 1.1))
        }),
    );
    row(
        "peak live heap while creating",
        "",
        Box::new(|c| mib(paged(c, "pageout_peak_heap"))),
    );
    row(
        "fault `pin()` p50",
        "≤ 5 µs",
        Box::new(|c| {
            let v = paged(c, "fault_p50_us");
            format!("{v:.1} µs {}", mark(v <= 5.0))
        }),
    );
    row(
        "fault `pin()` p99",
        "≤ 50 µs",
        Box::new(|c| {
            let v = paged(c, "fault_p99_us");
            format!("{v:.1} µs {}", mark(v <= 50.0))
        }),
    );
    row(
        "fault `pin()` p999 / max",
        "",
        Box::new(|c| {
            format!(
                "{:.0} / {:.0} µs",
                paged(c, "fault_p999_us"),
                paged(c, "fault_max_us")
            )
        }),
    );
    row(
        "faults/s (all threads)",
        "",
        Box::new(|c| rate(paged(c, "fault_per_s"))),
    );
    row(
        "store read alone (`fetch_data_blocking`) p50 / p99",
        "",
        Box::new(|c| {
            format!(
                "{:.1} / {:.1} µs",
                paged(c, "read_p50_us"),
                paged(c, "read_p99_us")
            )
        }),
    );
    for (kind, label) in [("uniform", "uniform"), ("zipf", "Zipf(0.99)")] {
        row(
            &format!("{label}: pins/s (hit rate)"),
            "",
            Box::new(move |c| {
                format!(
                    "{} ({:.1}%)",
                    rate(paged(c, &format!("{kind}_ops_per_s"))),
                    100.0 * paged(c, &format!("{kind}_hit"))
                )
            }),
        );
        row(
            &format!("{label}: vs all-resident"),
            "",
            Box::new(move |c| {
                ratio(
                    paged(c, &format!("{kind}_ops_per_s"))
                        / resident(c, &format!("{kind}_ops_per_s")),
                )
            }),
        );
    }
    row(
        "hot 5%: hit rate",
        "→ 100%",
        Box::new(|c| format!("{:.2}%", 100.0 * paged(c, "hot_hit"))),
    );
    row(
        "hot 5%: pins/s",
        "",
        Box::new(|c| rate(paged(c, "hot_ops_per_s"))),
    );
    row(
        "hot 5%: vs all-resident",
        "≥ 0.5×",
        Box::new(|c| {
            let x = paged(c, "hot_ops_per_s") / resident(c, "hot_ops_per_s");
            format!("{} {}", ratio(x), mark(x >= 0.5))
        }),
    );
    row(
        "baseline all-resident (plain `Arc`s): uniform / Zipf / hot pins/s",
        "",
        Box::new(|c| {
            format!(
                "{} / {} / {}",
                rate(resident(c, "uniform_ops_per_s")),
                rate(resident(c, "zipf_ops_per_s")),
                rate(resident(c, "hot_ops_per_s"))
            )
        }),
    );
    row(
        "baseline all-resident: live heap / RSS",
        "",
        Box::new(|_| {
            format!(
                "{} / {}",
                mib(get("resident", "heap")),
                kib_as_mib(get("resident", "rss_kib"))
            )
        }),
    );
    row(
        "baseline whole-graph `page_in` per query: ms/query (queries/s)",
        "",
        Box::new(|c| {
            format!(
                "{:.0} ms ({:.2}/s)",
                graph(c, &format!("query_ms_t{}", c.2)),
                graph(c, &format!("queries_per_s_t{}", c.2))
            )
        }),
    );
    row(
        "uniform pins/s vs whole-graph queries/s",
        "",
        Box::new(|c| {
            ratio(paged(c, "uniform_ops_per_s") / graph(c, &format!("queries_per_s_t{}", c.2)))
        }),
    );
    row(
        "baseline whole-graph: `page_out` once / peak live heap in queries",
        "",
        Box::new(|c| {
            format!(
                "{:.1} s / {}",
                graph(c, "pageout_s"),
                mib(graph(c, &format!("peak_heap_t{}", c.2)))
            )
        }),
    );
    row(
        "peak resident in faults + accesses (× budget)",
        "≤ 1.1×",
        Box::new(|c| {
            let x = paged(c, "access_peak_resident") / budget;
            format!("{:.0} MiB ({x:.2}×) {}", x * budget / MIB, mark(x <= 1.1))
        }),
    );
    row(
        "peak live heap in faults + accesses",
        "",
        Box::new(|c| mib(paged(c, "access_peak_heap"))),
    );
    row(
        "at the end: live heap / RSS (anon + file) / peak RSS",
        "",
        Box::new(|c| {
            format!(
                "{} / {} ({} + {}) / {}",
                mib(paged(c, "end_heap")),
                kib_as_mib(paged(c, "rss_kib")),
                kib_as_mib(paged(c, "rss_anon_kib")),
                kib_as_mib(paged(c, "rss_file_kib")),
                kib_as_mib(paged(c, "hwm_kib"))
            )
        }),
    );
    row(
        "at the end: RssAnon after `malloc_trim(0)`",
        "",
        Box::new(|c| kib_as_mib(paged(c, "rss_anon_trimmed_kib"))),
    );
    row(
        "at the end: live heap beyond the resident values, per value",
        "",
        Box::new(|c| {
            format!(
                "{:.0} B",
                (paged(c, "end_heap") - paged(c, "end_resident")) / p.values as f64
            )
        }),
    );
    row(
        "database files after the page-out",
        "",
        Box::new(|c| mib(paged(c, "db_bytes"))),
    );
    row(
        "serializations per value",
        "= 1",
        Box::new(|c| {
            let x = paged(c, "serializations_per_value");
            format!("{x:.3} {}", mark(x == 1.0))
        }),
    );
    row(
        "faults / evictions (clean) / eviction failures",
        "",
        Box::new(|c| {
            format!(
                "{:.0} / {:.0} ({:.0}) / {:.0}",
                paged(c, "faults"),
                paged(c, "evictions"),
                paged(c, "clean_evictions"),
                paged(c, "eviction_failures")
            )
        }),
    );
}

fn rate(per_s: f64) -> String {
    if per_s >= 1e6 {
        format!("{:.2} M", per_s / 1e6)
    } else if per_s >= 1e3 {
        format!("{:.1} k", per_s / 1e3)
    } else {
        format!("{per_s:.1}")
    }
}

fn ratio(x: f64) -> String {
    if x >= 10.0 {
        format!("{x:.0}×")
    } else if x >= 0.1 || !x.is_normal() {
        format!("{x:.2}×")
    } else {
        // Two significant digits.
        let digits = (1.0 - x.log10().floor()) as usize;
        format!("{x:.digits$}×")
    }
}

fn mib(bytes: f64) -> String {
    format!("{:.0} MiB", bytes / MIB)
}

fn kib_as_mib(kib: f64) -> String {
    format!("{:.0} MiB", kib / 1024.0)
}

fn cpu_model() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} cores, {model}")
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

// ---------------------------------------------------------------------------------------
// The children: one configuration each.

fn run_child(p: &Params, spec: &str) -> Results {
    let parts: Vec<&str> = spec.split(':').collect();
    let durability = |mode: &str| match mode {
        "cache" => Durability::Cache,
        "durable" => Durability::Durable,
        other => panic!("unknown mode {other}"),
    };
    match parts.as_slice() {
        ["paged", mode, threads] => run_paged(p, durability(mode), threads.parse().unwrap()),
        ["resident"] => run_resident(p),
        ["graph", mode] => run_graph(p, durability(mode)),
        _ => panic!("unknown child spec {spec}"),
    }
}

/// The access patterns, each as one index sequence per thread (generated before timing; the
/// same seeds in every child, so the baselines replay the same sequences).
#[derive(Clone, Copy)]
enum Pattern {
    /// Uniform over all values.
    Uniform,
    /// Zipf(0.99) over all values, ranks mapped to values by a fixed random permutation.
    Zipf,
    /// Uniform over a fixed random 5% of the values.
    Hot,
}

fn sequences(p: &Params, pattern: Pattern, ops: usize, threads: usize, seed: u64) -> Vec<Vec<u32>> {
    let n = p.values;
    let ranked = permutation(n, 0x5eed_0002);
    let hot = hot_set(p);
    let zipf = Zipf::new(n as f64, 0.99).expect("valid Zipf parameters");
    (0..threads)
        .map(|t| {
            let mut rng = StdRng::seed_from_u64(seed ^ (t as u64 + 1).wrapping_mul(0x9e37));
            let range = chunk(ops, threads, t);
            range
                .map(|_| match pattern {
                    Pattern::Uniform => rng.random_range(0..n as u32),
                    Pattern::Zipf => {
                        let rank = zipf.sample(&mut rng) as usize;
                        ranked[rank.clamp(1, n) - 1]
                    }
                    Pattern::Hot => hot[rng.random_range(0..hot.len())],
                })
                .collect()
        })
        .collect()
}

fn permutation(n: usize, seed: u64) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    order
}

fn hot_set(p: &Params) -> Vec<u32> {
    let mut hot = permutation(p.values, 0x5eed_0003);
    hot.truncate((p.values / 20).max(1));
    hot
}

/// Part `t` of `0..n` split in `parts`.
fn chunk(n: usize, parts: usize, t: usize) -> std::ops::Range<usize> {
    n * t / parts..n * (t + 1) / parts
}

/// Samples the resident bytes and the live heap every millisecond, keeping the maxima
/// since the last `reset`.
struct Sampler {
    stop: Arc<AtomicBool>,
    resident: Arc<AtomicUsize>,
    heap: Arc<AtomicIsize>,
    handle: Option<JoinHandle<()>>,
}

impl Sampler {
    fn start(resident_now: impl Fn() -> usize + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let resident = Arc::new(AtomicUsize::new(0));
        let heap = Arc::new(AtomicIsize::new(live_heap()));
        let handle = {
            let (stop, resident, heap) = (stop.clone(), resident.clone(), heap.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    resident.fetch_max(resident_now(), Ordering::Relaxed);
                    heap.fetch_max(live_heap(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        Self {
            stop,
            resident,
            heap,
            handle: Some(handle),
        }
    }

    fn reset(&self) {
        self.resident.store(0, Ordering::Relaxed);
        self.heap.store(live_heap(), Ordering::Relaxed);
    }

    /// The maxima since the last reset: (resident bytes, live heap bytes).
    fn peaks(&self) -> (usize, isize) {
        self.heap.fetch_max(live_heap(), Ordering::Relaxed);
        (
            self.resident.load(Ordering::Relaxed),
            self.heap.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            handle.join().expect("the sampler ran");
        }
    }
}

fn open(
    p: &Params,
    durability: Durability,
    budget: usize,
) -> (tempfile::TempDir, Arc<SqliteBackedPagableStorage>) {
    std::fs::create_dir_all(&p.dir).expect("the bench directory");
    let dir = tempfile::Builder::new()
        .prefix("paging-bench-")
        .tempdir_in(&p.dir)
        .expect("a temp dir");
    let storage = SqliteOptions::default()
        .durability(durability)
        .memory_budget(budget)
        .open(dir.path())
        .expect("the store opens");
    (dir, Arc::new(storage))
}

/// The bytes of the files in `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Reads every file of `dir`, so the database is in the OS cache.
fn warm_os_cache(dir: &Path) {
    let mut buf = vec![0u8; 1 << 20];
    for entry in std::fs::read_dir(dir)
        .expect("the store's directory")
        .flatten()
    {
        if let Ok(mut file) = std::fs::File::open(entry.path()) {
            while file.read(&mut buf).is_ok_and(|n| n > 0) {}
        }
    }
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = ((sorted.len() as f64 * q) as usize).min(sorted.len() - 1);
    sorted[at] as f64 / 1000.0
}

/// Runs `work` on `threads` threads over parts of `items`; returns the per-thread outputs and
/// the wall time.
fn parallel<I: Sync, R: Send>(
    threads: usize,
    items: &[Vec<I>],
    work: impl Fn(&[I]) -> R + Sync,
) -> (Vec<R>, Duration) {
    let started = Instant::now();
    let out = std::thread::scope(|s| {
        let handles: Vec<_> = items
            .iter()
            .take(threads)
            .map(|part| {
                let work = &work;
                s.spawn(move || work(part))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a bench thread"))
            .collect()
    });
    (out, started.elapsed())
}

fn split<T: Copy>(items: &[T], threads: usize) -> Vec<Vec<T>> {
    (0..threads)
        .map(|t| items[chunk(items.len(), threads, t)].to_vec())
        .collect()
}

/// One pass of pins over `seqs`, `reps` times: (pins/s, hit rate). A hit is a value resident
/// at pin time (`try_pin` succeeded); a miss is then faulted in with `pin`.
fn access_pass(handles: &[PagableArc<Value>], seqs: &[Vec<u32>], reps: usize) -> (f64, f64) {
    let (out, wall) = parallel(seqs.len(), seqs, |seq| {
        let (mut hits, mut sum) = (0usize, 0u64);
        for _ in 0..reps {
            for &i in seq {
                let handle = &handles[i as usize];
                let value = match handle.try_pin() {
                    Some(v) => {
                        hits += 1;
                        v
                    }
                    None => handle.pin().expect("the value faults in"),
                };
                sum ^= touch(&value);
            }
        }
        black_box(sum);
        hits
    });
    let ops = reps * seqs.iter().map(Vec::len).sum::<usize>();
    let hits: usize = out.iter().sum();
    (ops as f64 / wall.as_secs_f64(), hits as f64 / ops as f64)
}

fn run_paged(p: &Params, durability: Durability, threads: usize) -> Results {
    let mut r = Results::new();
    let (dir, storage) = open(p, durability, p.budget);
    let sampler = {
        let weak = Arc::downgrade(&storage);
        Sampler::start(move || {
            weak.upgrade()
                .map_or(0, |s| s.paging_stats().resident_bytes)
        })
    };

    // Page-out: create every value (the worker evicts over the budget meanwhile), then
    // page out what is left and commit.
    sampler.reset();
    let started = Instant::now();
    let ids: Vec<usize> = (0..p.values).collect();
    let (parts, _) = parallel(threads, &split(&ids, threads), |ids| {
        ids.iter()
            .map(|&i| PagableArc::new(make_value(i, p.value_bytes), &storage))
            .collect::<Vec<_>>()
    });
    let handles: Vec<PagableArc<Value>> = parts.into_iter().flatten().collect();
    r.insert("pageout_created_s".into(), started.elapsed().as_secs_f64());
    r.insert(
        "pageout_worker_evicted".into(),
        storage.paging_stats().evictions as f64,
    );
    let report = storage.page_out_unpinned().expect("page_out_unpinned");
    assert_eq!(report.failed + report.pinned, 0, "{report:?}");
    storage.flush().expect("flush");
    let secs = started.elapsed().as_secs_f64();
    let (resident, heap) = sampler.peaks();
    r.insert("pageout_s".into(), secs);
    r.insert("pageout_values_per_s".into(), p.values as f64 / secs);
    r.insert(
        "pageout_mib_per_s".into(),
        (p.values * p.value_bytes) as f64 / MIB / secs,
    );
    r.insert("pageout_peak_resident".into(), resident as f64);
    r.insert("pageout_peak_heap".into(), heap as f64);
    r.insert("db_bytes".into(), dir_bytes(dir.path()) as f64);
    drop(ids);

    warm_os_cache(dir.path());
    sampler.reset();

    // Fault latency: pin values never pinned since they were paged out.
    let order = permutation(p.values, 0x5eed_0001);
    let faulted = split(&order[..p.faults], threads);
    let (lat, wall) = parallel(threads, &faulted, |ids| {
        let mut lat = Vec::with_capacity(ids.len());
        for &i in ids {
            let handle = &handles[i as usize];
            assert!(
                !handle.is_resident(),
                "a value paged out and not pinned since"
            );
            let t = Instant::now();
            let value = handle.pin().expect("the value faults in");
            let d = t.elapsed();
            black_box(touch(&value));
            drop(value);
            lat.push(d.as_nanos() as u64);
        }
        lat
    });
    let mut lat: Vec<u64> = lat.into_iter().flatten().collect();
    lat.sort_unstable();
    r.insert("fault_p50_us".into(), percentile(&lat, 0.50));
    r.insert("fault_p99_us".into(), percentile(&lat, 0.99));
    r.insert("fault_p999_us".into(), percentile(&lat, 0.999));
    r.insert("fault_max_us".into(), percentile(&lat, 1.0));
    r.insert("fault_per_s".into(), lat.len() as f64 / wall.as_secs_f64());

    // The store read alone, on other values: what the fault costs below the runtime.
    let keys: Vec<_> = order[p.faults..2 * p.faults]
        .iter()
        .map(|&i| handles[i as usize].key().expect("stored"))
        .collect();
    let (lat, _) = parallel(threads, &split(&keys, threads), |keys| {
        keys.iter()
            .map(|key| {
                let t = Instant::now();
                black_box(storage.fetch_data_blocking(key).expect("read"));
                t.elapsed().as_nanos() as u64
            })
            .collect::<Vec<_>>()
    });
    let mut lat: Vec<u64> = lat.into_iter().flatten().collect();
    lat.sort_unstable();
    r.insert("read_p50_us".into(), percentile(&lat, 0.50));
    r.insert("read_p99_us".into(), percentile(&lat, 0.99));

    // Uniform and Zipf passes, each after an unmeasured warm-up pass of the same pattern.
    for (pattern, name) in [(Pattern::Uniform, "uniform"), (Pattern::Zipf, "zipf")] {
        access_pass(&handles, &sequences(p, pattern, p.ops, threads, 11), 1);
        let (per_s, hit) = access_pass(&handles, &sequences(p, pattern, p.ops, threads, 12), 1);
        r.insert(format!("{name}_ops_per_s"), per_s);
        r.insert(format!("{name}_hit"), hit);
    }

    // The hot set: every hot value pinned once, then a measured pass (its throughput is
    // measured again below, next to the baseline's; the hit rate is the lowest of all passes).
    let hot = hot_set(p);
    access_pass(&handles, &split(&hot, threads), 1);
    // A sequence of at most 2^18 pins, repeated: the bench's own buffers stay small next to
    // the heap figures.
    let hot_len = p.hot_ops.min(1 << 18);
    let hot_reps = p.hot_ops.div_ceil(hot_len);
    let hot_seqs = sequences(p, Pattern::Hot, hot_len, threads, 13);
    let (_, mut hot_hit) = access_pass(&handles, &hot_seqs, hot_reps);
    drop((order, keys, lat, hot));

    let (resident, heap) = sampler.peaks();
    r.insert("access_peak_resident".into(), resident as f64);
    r.insert("access_peak_heap".into(), heap as f64);

    let stats = storage.paging_stats();
    r.insert("serializations".into(), stats.serializations as f64);
    r.insert(
        "serializations_per_value".into(),
        stats.serializations as f64 / p.values as f64,
    );
    r.insert("faults".into(), stats.faults as f64);
    r.insert("evictions".into(), stats.evictions as f64);
    r.insert("clean_evictions".into(), stats.clean_evictions as f64);
    r.insert("eviction_failures".into(), stats.eviction_failures as f64);
    r.insert("end_resident".into(), stats.resident_bytes as f64);
    r.insert("end_heap".into(), live_heap() as f64);
    proc_status(&mut r);
    r.insert("rss_anon_trimmed_kib".into(), rss_anon_after_trim());
    drop(sampler);

    // The all-resident baseline, in this process (after the memory figures above): every
    // value in a plain `Arc`, the same sequences. The hot-set passes alternate with the
    // baseline's and each side reports its median, so load from other jobs hits both alike.
    let resident: Vec<Arc<Value>> = (0..p.values)
        .map(|i| Arc::new(make_value(i, p.value_bytes)))
        .collect();
    for (pattern, name) in [(Pattern::Uniform, "uniform"), (Pattern::Zipf, "zipf")] {
        let seqs = sequences(p, pattern, p.ops, threads, 12);
        let reps = 4_000_000usize.div_ceil(p.ops);
        let runs: Vec<f64> = (0..3)
            .map(|_| resident_pass(&resident, &seqs, reps))
            .collect();
        r.insert(format!("resident_{name}_ops_per_s"), median(runs));
    }
    let (mut paged_runs, mut resident_runs) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let (per_s, hit) = access_pass(&handles, &hot_seqs, hot_reps);
        paged_runs.push(per_s);
        hot_hit = hot_hit.min(hit);
        resident_runs.push(resident_pass(&resident, &hot_seqs, hot_reps));
    }
    r.insert("hot_hit".into(), hot_hit);
    r.insert("hot_ops_per_s".into(), median(paged_runs));
    r.insert("resident_hot_ops_per_s".into(), median(resident_runs));
    drop(resident);
    drop(handles);
    drop(storage);
    drop(dir);
    r
}

/// One pass of the baseline over `seqs`, `reps` times (a single uniform or Zipf pass is too
/// short to time): pins/s.
fn resident_pass(values: &[Arc<Value>], seqs: &[Vec<u32>], reps: usize) -> f64 {
    let ops: usize = seqs.iter().map(Vec::len).sum();
    let (_, wall) = parallel(seqs.len(), seqs, |seq| {
        let mut sum = 0u64;
        for _ in 0..reps {
            for &i in seq {
                let value = Arc::clone(&values[i as usize]);
                sum ^= touch(&value);
            }
        }
        black_box(sum)
    });
    (ops * reps) as f64 / wall.as_secs_f64()
}

fn median(mut runs: Vec<f64>) -> f64 {
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

/// The memory of the all-resident baseline: every value in a plain `Arc`.
fn run_resident(p: &Params) -> Results {
    let mut r = Results::new();
    let values: Vec<Arc<Value>> = (0..p.values)
        .map(|i| Arc::new(make_value(i, p.value_bytes)))
        .collect();
    r.insert("heap".into(), live_heap() as f64);
    proc_status(&mut r);
    drop(values);
    r
}

fn run_graph(p: &Params, durability: Durability) -> Results {
    let mut r = Results::new();
    let (dir, storage) = open(p, durability, usize::MAX);
    let graph: Vec<Shared<Value>> = (0..p.values)
        .map(|i| Shared::new(make_value(i, p.value_bytes)))
        .collect();
    let started = Instant::now();
    let root = page_out(&storage, &graph).expect("page_out");
    storage.flush().expect("flush");
    r.insert("pageout_s".into(), started.elapsed().as_secs_f64());
    drop(graph);
    warm_os_cache(dir.path());

    let sampler = Sampler::start(|| 0);
    for &t in &p.threads {
        sampler.reset();
        let seqs = sequences(p, Pattern::Uniform, p.queries * t, t, 14);
        let (lat, wall) = parallel(t, &seqs, |seq| {
            seq.iter()
                .map(|&i| {
                    let started = Instant::now();
                    let graph: Vec<Shared<Value>> = page_in(&storage, root).expect("page_in");
                    black_box(touch(&graph[i as usize]));
                    drop(graph);
                    started.elapsed().as_secs_f64()
                })
                .collect::<Vec<_>>()
        });
        let lat: Vec<f64> = lat.into_iter().flatten().collect();
        let (_, heap) = sampler.peaks();
        r.insert(
            format!("query_ms_t{t}"),
            1000.0 * lat.iter().sum::<f64>() / lat.len() as f64,
        );
        r.insert(
            format!("queries_per_s_t{t}"),
            lat.len() as f64 / wall.as_secs_f64(),
        );
        r.insert(format!("peak_heap_t{t}"), heap as f64);
    }
    drop(sampler);
    proc_status(&mut r);
    drop(storage);
    drop(dir);
    r
}

/// RssAnon after asking glibc's allocator to return its free memory to the OS
/// (`malloc_trim(0)`): what of the anonymous RSS is memory the process freed but the
/// allocator kept.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn rss_anon_after_trim() -> f64 {
    unsafe extern "C" {
        fn malloc_trim(pad: usize) -> std::ffi::c_int;
    }
    // SAFETY: glibc's malloc_trim only releases free memory; it is safe to call at any time.
    unsafe {
        malloc_trim(0);
    }
    let mut r = Results::new();
    proc_status(&mut r);
    r["rss_anon_kib"]
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn rss_anon_after_trim() -> f64 {
    f64::NAN
}

/// VmRSS, RssAnon, RssFile and VmHWM (peak RSS) from /proc/self/status, in KiB.
fn proc_status(r: &mut Results) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for (field, key) in [
        ("VmRSS:", "rss_kib"),
        ("RssAnon:", "rss_anon_kib"),
        ("RssFile:", "rss_file_kib"),
        ("VmHWM:", "hwm_kib"),
    ] {
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN);
        r.insert(key.into(), kib);
    }
}
