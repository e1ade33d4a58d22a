//! The main job: page a small `Arc` graph out to SQLite, see deduplication, page it back in
//! with its sharing, and read one raw node.
//!
//! `cargo run --release --example quickstart`

use std::sync::Arc;

use pagestore::{
    PagableStorage, Shared, SqliteBackedPagableStorage, StorageHandle, page_in, page_out,
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
    println!("paging in a key that was never stored fails clearly: {err}");
    Ok(())
}
