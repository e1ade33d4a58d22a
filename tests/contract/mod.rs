//! Helpers shared by the test files: the suites' node builders over a `PagableStorage`, and the
//! reference fixture. The contract suites themselves are `pagestore::testing`.

#![allow(dead_code)] // each test binary uses a different part of the shared helpers

use std::collections::HashMap;

use pagestore::{DataKey, PagableData, PagableStorage};

#[allow(unused_imports)] // used by some test binaries only
pub use pagestore::testing::node;

/// Stores a small DAG in `storage` (see `pagestore::testing::store_dag`).
pub fn store_dag<S: PagableStorage + ?Sized>(
    storage: &S,
    seed: u64,
    nodes: usize,
) -> HashMap<DataKey, PagableData> {
    pagestore::testing::store_dag(&|node| storage.store_data(node), seed, nodes)
}

/// Fetches every key of `model` from `storage` and checks the bytes.
pub fn assert_reads_back<S: PagableStorage + ?Sized>(
    storage: &S,
    model: &HashMap<DataKey, PagableData>,
) {
    pagestore::testing::assert_reads_back(&|key| storage.fetch_data_blocking(key), model);
}

/// The lines of `tests/fixtures/pagable-0.3.3/manifest.jsonl` (a copy of `shared/fixtures/`): what the reference stored.
pub fn reference_fixture() -> (std::path::PathBuf, Vec<(DataKey, PagableData)>) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pagable-0.3.3");
    let manifest = std::fs::read_to_string(dir.join("manifest.jsonl"))
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.join("manifest.jsonl").display()));
    let entries = manifest
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            let key: DataKey = value["key"].as_str().unwrap().parse().unwrap();
            let data = hex_bytes(value["data"].as_str().unwrap());
            let arcs = value["arcs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k.as_str().unwrap().parse().unwrap())
                .collect();
            (key, PagableData { data, arcs })
        })
        .collect();
    (dir, entries)
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}
