//! The remote tier on a real Redis server on loopback (started here): hydrating the
//! 100,000-node DAG of `benches/graph.rs` from Redis into an empty local store, batched
//! (512 keys per round trip, the default) against one `GET` per key, and the upload rate.
//! Loopback answers in about 20 µs; the same two hydrations are also timed with a 200 µs
//! sleep before every round trip (about 0.3 ms with the sleep's own overshoot), as on a
//! local network.
//!
//! `cargo bench --features redis --bench remote` (`REMOTE_BENCH_NODES`, default 100,000;
//! `REMOTE_BENCH_RUNS`, default 3). Needs `redis-server` on the PATH. `harness = false`: one
//! Markdown table of medians.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pagestore::remote::{BatchLimits, RedisOptions, RedisStore, RemoteStore};
use pagestore::{DataKey, PagableStorage, Shared, TieredStorage, page_in, page_out};

#[path = "common/dag.rs"]
mod dag;
#[path = "common/runs.rs"]
mod runs;
// The test servers' helpers; this benchmark uses only `start`, `url` and `cli`.
#[allow(dead_code)]
#[path = "../tests/common/redis_server.rs"]
mod redis_server;

use dag::{Node, build};
use runs::{env, median};

type Graph = Vec<Shared<Node>>;

fn connect(url: &str, prefix: &str, limits: BatchLimits) -> RedisStore {
    RedisOptions::new()
        .prefix(prefix)
        .batch_limits(limits)
        .io_timeout(Duration::from_secs(10))
        .connect(url)
        .expect("connect to the benchmark's server")
}

/// `inner` with `delay` added to every round trip of its reads (the benchmark only reads
/// through it): a remote farther away than loopback.
struct Farther {
    inner: RedisStore,
    delay: Duration,
}

impl Farther {
    fn wait(&self, batches: usize) {
        std::thread::sleep(self.delay * batches as u32);
    }
}

impl RemoteStore for Farther {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn limits(&self) -> BatchLimits {
        self.inner.limits()
    }
    fn find_missing(&self, keys: &[DataKey]) -> anyhow::Result<Vec<DataKey>> {
        self.wait(self.limits().split(keys, |_| 0).count());
        self.inner.find_missing(keys)
    }
    fn get_many(&self, keys: &[DataKey]) -> anyhow::Result<Vec<Option<Vec<u8>>>> {
        self.wait(self.limits().split(keys, |_| 0).count());
        self.inner.get_many(keys)
    }
    fn put_many(&self, records: &[(DataKey, &[u8])]) -> anyhow::Result<()> {
        self.inner.put_many(records)
    }
    fn set_root(&self, name: &str, key: DataKey) -> anyhow::Result<()> {
        self.inner.set_root(name, key)
    }
    fn root(&self, name: &str) -> anyhow::Result<Option<DataKey>> {
        self.inner.root(name)
    }
    fn roots(&self) -> anyhow::Result<Vec<(String, DataKey)>> {
        self.inner.roots()
    }
    fn remove_root(&self, name: &str) -> anyhow::Result<bool> {
        self.inner.remove_root(name)
    }
    fn ping(&self) -> anyhow::Result<()> {
        self.inner.ping()
    }
    fn for_each_key(
        &self,
        visit: &mut dyn FnMut(DataKey) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        self.inner.for_each_key(visit)
    }
}

/// Pages `graph` out to a fresh tiered store on `prefix` and times the upload that follows
/// (`wait_for_upload` after the local write); returns it with the root key and node count.
fn upload(url: &str, prefix: &str, graph: &Graph) -> (Duration, DataKey, u64) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        TieredStorage::open(dir.path(), connect(url, prefix, BatchLimits::default())).unwrap(),
    );
    let root = page_out(&store, graph).unwrap();
    store.flush().unwrap();
    let started = Instant::now();
    store.wait_for_upload().unwrap();
    let took = started.elapsed();
    (took, root, store.tiered_stats().unwrap().uploaded)
}

/// Times filling an empty store with the graph under `root` (`prefetch`: fetch, check,
/// store locally) with `delay` added to each round trip, then paging it in from the filled
/// store.
fn hydrate(
    url: &str,
    prefix: &str,
    root: DataKey,
    limits: BatchLimits,
    delay: Duration,
) -> (Duration, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let remote = Farther {
        inner: connect(url, prefix, limits),
        delay,
    };
    let store = Arc::new(TieredStorage::open(dir.path(), remote).unwrap());
    let started = Instant::now();
    store.prefetch(&[root]).unwrap();
    let fill = started.elapsed();
    let started = Instant::now();
    let graph: Graph = page_in(&store, root).unwrap();
    let read = started.elapsed();
    drop(graph);
    (fill, read)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists benchmarks; this one has no named ones
    }
    let nodes = env("REMOTE_BENCH_NODES", 100_000);
    let runs = env("REMOTE_BENCH_RUNS", 3).max(1);
    let Some(server) = redis_server::RedisServer::start() else {
        eprintln!("redis-server is not installed: nothing to measure");
        return;
    };
    let url = server.url();
    let graph: Graph = build(nodes);

    let lan = Duration::from_micros(200);
    let mut uploads = Vec::new();
    let mut batched = (Vec::new(), Vec::new());
    let mut per_key = Vec::new();
    let (mut batched_lan, mut per_key_lan) = (Vec::new(), Vec::new());
    let mut uploaded = 0;
    for run in 0..runs {
        let prefix = format!("bench{run}");
        let (took, root, count) = upload(&url, &prefix, &graph);
        uploads.push(took);
        uploaded = count;
        let one_key = BatchLimits {
            max_keys: 1,
            ..BatchLimits::default()
        };
        let (fill, read) = hydrate(&url, &prefix, root, BatchLimits::default(), Duration::ZERO);
        batched.0.push(fill);
        batched.1.push(read);
        per_key.push(hydrate(&url, &prefix, root, one_key, Duration::ZERO).0);
        batched_lan.push(hydrate(&url, &prefix, root, BatchLimits::default(), lan).0);
        per_key_lan.push(hydrate(&url, &prefix, root, one_key, lan).0);
        server.cli(&["FLUSHALL"]);
    }
    let rate = |d: Duration| uploaded as f64 / d.as_secs_f64();
    let (up, fill, read, single) = (
        median(uploads),
        median(batched.0),
        median(batched.1),
        median(per_key),
    );
    let (fill_lan, single_lan) = (median(batched_lan), median(per_key_lan));
    println!("| {uploaded} nodes, Redis on loopback, median of {runs} | time | nodes/s |");
    println!("|---|---:|---:|");
    println!(
        "| upload (`wait_for_upload` after page-out) | {up:.2?} | {:.0} |",
        rate(up)
    );
    println!(
        "| hydrate, batched (512 keys per round trip) | {fill:.2?} | {:.0} |",
        rate(fill)
    );
    println!(
        "| hydrate, one `GET` per key | {single:.2?} | {:.0} |",
        rate(single)
    );
    println!(
        "| hydrate, batched, 200 µs added per round trip | {fill_lan:.2?} | {:.0} |",
        rate(fill_lan)
    );
    println!(
        "| hydrate, one `GET` per key, 200 µs added per round trip | {single_lan:.2?} | {:.0} |",
        rate(single_lan)
    );
    println!(
        "| page_in from the hydrated local store | {read:.2?} | {:.0} |",
        rate(read)
    );
    println!(
        "\nbatched hydration is {:.1}x one GET per key on loopback, {:.1}x with 200 µs per round trip",
        single.as_secs_f64() / fill.as_secs_f64(),
        single_lan.as_secs_f64() / fill_lan.as_secs_f64()
    );
}
