//! The main job: page a small `Arc` graph out to SQLite, see deduplication, page it back in
//! with its sharing, and read one raw node; then use a graph several times larger than its
//! memory budget, whose `PagableArc` values leave memory and come back as they are touched.
//!
//! `cargo run --release --example quickstart`

use std::sync::Arc;
use std::time::{Duration, Instant};

use pagestore::{
    PagableArc, PagableStorage, Shared, SqliteBackedPagableStorage, SqliteOptions, StorageHandle,
    page_in, page_out,
};
use serde::{Deserialize, Serialize};

/// A build rule: polymorphic, stored with a stable type tag.
#[typetag::serde]
trait Rule: Send + Sync {
    fn describe(&self) -> String;
}

#[derive(Serialize, Deserialize)]
struct Compile {
    flags: Vec<String>,
}

#[typetag::serde(name = "compile")]
impl Rule for Compile {
    fn describe(&self) -> String {
        format!("compile {}", self.flags.join(" "))
    }
}

#[derive(Serialize, Deserialize)]
struct Target {
    name: String,
    rule: Shared<dyn Rule>,
    deps: Vec<Shared<Target>>,
}

/// A diamond: `//app` and `//cli` both depend on `//lib`, and all three share one rule.
fn build_graph() -> Target {
    let rule: Shared<dyn Rule> = Shared::from(Arc::new(Compile {
        flags: vec!["-O2".into()],
    }) as Arc<dyn Rule>);
    let target = |name: &str, deps| Target {
        name: name.into(),
        rule: rule.clone(),
        deps,
    };
    let lib = Shared::new(target("//lib", vec![]));
    let app = Shared::new(target("//app", vec![lib.clone()]));
    let cli = Shared::new(target("//cli", vec![lib]));
    target("//all", vec![app, cli])
}

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let key = {
        let storage = Arc::new(SqliteBackedPagableStorage::try_new(dir.path())?);
        let key = page_out(&storage, &build_graph())?;
        storage.flush()?;
        println!(
            "paged out a diamond of 4 targets sharing 1 rule: {} nodes stored, root key {key}",
            storage.verify()?.records
        );

        // Another build produces an equal graph from scratch: same key, nothing new stored.
        let again = page_out(&storage, &build_graph())?;
        storage.flush()?;
        println!(
            "an equal graph built separately pages out to the {} key; the store still holds {} nodes",
            if again == key { "same" } else { "a DIFFERENT" },
            storage.verify()?.records
        );
        key
    }; // dropping the store closes it cleanly

    // A new process (here: a new instance) pages the graph back in from disk.
    let storage = Arc::new(SqliteBackedPagableStorage::try_new(dir.path())?);
    let all: Target = page_in(&storage, key)?;
    let (app, cli) = (&all.deps[0], &all.deps[1]);
    println!(
        "paged back in {}: deps {} and {}, rule '{}'",
        all.name,
        app.name,
        cli.name,
        all.rule.describe()
    );
    println!(
        "sharing survived: //app and //cli point to one //lib ({}), every target to one rule ({})",
        Shared::ptr_eq(&app.deps[0], &cli.deps[0]),
        Shared::ptr_eq(&all.rule, &app.deps[0].rule)
    );

    // Underneath, each distinct value is one content-addressed node: bytes + child keys.
    let root = storage.storage().fetch_data_blocking(&key)?;
    println!(
        "the root node is {} bytes of postcard with {} child keys (its rule, //app, //cli)",
        root.data.len(),
        root.arcs.len()
    );

    // A key that was never stored is a typed error that names it.
    let missing = pagestore::PagableData {
        data: b"never stored".to_vec(),
        arcs: vec![],
    };
    let Err(err) = page_in::<Target>(&storage, missing.compute_key()) else {
        anyhow::bail!("a key that was never stored paged in");
    };
    anyhow::ensure!(pagestore::Error::is_not_found(&err));
    println!("paging in a key that was never stored fails clearly: {err:#}");
    drop(storage);

    larger_than_memory(&dir.path().join("artifacts"))
}

/// A build output: its bytes are a `PagableArc`, resident only while there is room for it.
#[derive(Serialize, Deserialize)]
struct Artifact {
    target: String,
    object: PagableArc<Vec<u8>>,
}

const ARTIFACTS: usize = 300;
const OBJECT_BYTES: usize = 16 << 10;
const BUDGET: usize = 1 << 20;

/// Artifact `n`'s bytes: distinct per artifact, so each is its own node.
fn object(n: usize) -> Vec<u8> {
    let mut bytes = vec![(n % 251) as u8; OBJECT_BYTES];
    bytes[..8].copy_from_slice(&(n as u64).to_le_bytes());
    bytes
}

/// Reads artifact `n`, faulting it in if it was paged out.
fn touch(artifacts: &[Artifact], n: usize) -> anyhow::Result<()> {
    let object = artifacts[n].object.pin()?; // holding `object` pins it in memory
    anyhow::ensure!(*object == self::object(n), "artifact {n} came back wrong");
    Ok(())
}

/// A few hundred artifacts totalling several times the memory budget, touched in a loop: the
/// pager's worker keeps the resident ones near the budget, serializing each value once.
fn larger_than_memory(dir: &std::path::Path) -> anyhow::Result<()> {
    let storage = Arc::new(SqliteOptions::default().memory_budget(BUDGET).open(dir)?);
    let kib = |bytes: usize| bytes >> 10;
    let artifacts: Vec<Artifact> = (0..ARTIFACTS)
        .map(|n| Artifact {
            target: format!("//pkg{n}:lib"),
            object: PagableArc::new(object(n), &storage),
        })
        .collect();
    let report = |what: &str| {
        // The worker evicts in the background: give it a moment to catch up.
        let deadline = Instant::now() + Duration::from_secs(1);
        while storage.paging_stats().resident_bytes > BUDGET && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let stats = storage.paging_stats();
        println!(
            "  {what}: {} KiB resident ({} values) for a budget of {} KiB; {} faults, \
             {} evictions ({} with no I/O), {} serializations",
            kib(stats.resident_bytes),
            stats.resident_values,
            kib(stats.budget_bytes),
            stats.faults,
            stats.evictions,
            stats.clean_evictions,
            stats.serializations,
        );
    };
    println!(
        "{ARTIFACTS} artifacts of {} KiB ({} KiB, {:.1}x the memory budget of {} KiB):",
        kib(OBJECT_BYTES),
        kib(ARTIFACTS * OBJECT_BYTES),
        (ARTIFACTS * OBJECT_BYTES) as f64 / BUDGET as f64,
        kib(BUDGET)
    );
    report("created");
    for _ in 0..3 {
        for n in 0..ARTIFACTS {
            touch(&artifacts, n)?;
        }
    }
    report("every artifact touched 3 times");
    // A working set that fits the budget faults in once, then stays.
    let faults = storage.paging_stats().faults;
    for _ in 0..10 {
        for n in 0..32 {
            touch(&artifacts, n)?;
        }
    }
    let faults = storage.paging_stats().faults - faults;
    report(&format!(
        "a hot set of 32 touched 10 times ({faults} of the faults)"
    ));
    // The graph itself pages out too: values already stored are written by key, untouched.
    let key = page_out(&storage, &artifacts)?;
    storage.flush()?;
    println!(
        "  the graph pages out as one root ({key}) over {} nodes, each value serialized once: {}",
        storage.verify()?.records,
        storage.paging_stats().serializations == ARTIFACTS as u64
    );
    Ok(())
}
