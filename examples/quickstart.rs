//! The main job: store a small graph, see deduplication, read it back.
//!
//! `cargo run --release --example quickstart`

use std::any::TypeId;
use std::sync::Arc;

use either::Either;
use pagestore::{InMemoryPagableStorage, PagableData, PagableStorage};

fn main() -> anyhow::Result<()> {
    let storage = InMemoryPagableStorage::new();

    // A diamond: two parents share one child. Children are stored first, because a parent's
    // key covers its children's keys.
    let shared = storage.store_data(PagableData {
        data: b"a config both targets import".to_vec(),
        arcs: vec![],
    })?;
    let app = storage.store_data(PagableData {
        data: b"target //app".to_vec(),
        arcs: vec![shared],
    })?;
    let lib = storage.store_data(PagableData {
        data: b"target //lib".to_vec(),
        arcs: vec![shared],
    })?;
    let root = storage.store_data(PagableData {
        data: b"build graph".to_vec(),
        arcs: vec![app, lib],
    })?;
    storage.flush()?;
    println!("stored a diamond of 4 nodes; root key {root}");

    // Another writer produces the same content independently: same keys, nothing new stored.
    let again = storage.store_data(PagableData {
        data: b"a config both targets import".to_vec(),
        arcs: vec![],
    })?;
    let app_again = storage.store_data(PagableData {
        data: b"target //app".to_vec(),
        arcs: vec![again],
    })?;
    println!(
        "storing equal content again gives the same keys ({}), and the store still holds {} nodes",
        if again == shared && app_again == app {
            "yes"
        } else {
            "NO"
        },
        storage.len()
    );

    // Read the graph back from its root key.
    let node = storage.fetch_data_blocking(&root)?;
    println!(
        "root: {:?} -> {} children",
        String::from_utf8_lossy(&node.data),
        node.arcs.len()
    );
    for child in &node.arcs {
        let child = storage.fetch_data_blocking(child)?;
        println!(
            "  {:?} -> {} child {}",
            String::from_utf8_lossy(&child.data),
            child.arcs.len(),
            child.arcs[0]
        );
    }

    // Sharing survives loading: the first value deserialized for a key is handed to everyone.
    let type_id = TypeId::of::<String>();
    let Either::Right(data) = storage.fetch_arc_or_data_blocking(&type_id, &shared)? else {
        anyhow::bail!("nothing was deserialized yet");
    };
    let value = Arc::new(String::from_utf8(data.data.clone())?);
    storage.on_arc_deserialized(type_id, shared, Box::new(value.clone()));
    let Either::Left(cached) = storage.fetch_arc_or_data_blocking(&type_id, &shared)? else {
        anyhow::bail!("the live value should come from the cache");
    };
    let same =
        pagestore::erase::downcast_arc::<String>(&*cached).is_some_and(|c| Arc::ptr_eq(&c, &value));
    println!(
        "loading the shared child again returns the same Arc: {}",
        if same { "yes" } else { "NO" }
    );

    // A key that was never stored is a typed error that names it.
    let missing = PagableData {
        data: b"never stored".to_vec(),
        arcs: vec![],
    }
    .compute_key();
    let err = storage.fetch_data_blocking(&missing).unwrap_err();
    println!("fetching a missing key: {err}");
    anyhow::ensure!(pagestore::Error::is_not_found(&err));
    Ok(())
}
