//! The DAG the graph benchmarks page: node i points to two random earlier nodes and to one of
//! ten shared polymorphic leaves (a fixed seed, so every benchmark pages the same graph).
//! Included by `benches/graph.rs`, `benches/graph_sqlite.rs` and `benches/async_page_in.rs`.

#![allow(dead_code)] // each benchmark uses its part

use std::sync::Arc;

use pagestore::Shared;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

#[typetag::serde]
pub trait Leaf: Send + Sync {
    fn weight(&self) -> f64;
}

#[derive(Serialize, Deserialize)]
pub struct Color(pub [u8; 3]);

#[typetag::serde(name = "color")]
impl Leaf for Color {
    fn weight(&self) -> f64 {
        f64::from(self.0[0])
    }
}

#[derive(Serialize, Deserialize)]
pub struct Weight(pub f64);

#[typetag::serde(name = "weight")]
impl Leaf for Weight {
    fn weight(&self) -> f64 {
        self.0
    }
}

/// The node pagestore pages: shared fields are `Shared`.
#[derive(Serialize, Deserialize)]
pub struct Node {
    pub id: u32,
    pub name: String,
    pub leaf: Shared<dyn Leaf>,
    pub kids: Vec<Shared<Node>>,
}

pub fn leaves() -> Vec<Arc<dyn Leaf>> {
    (0..10u8)
        .map(|i| {
            if i % 2 == 0 {
                Arc::new(Color([i, 2 * i, 3 * i])) as Arc<dyn Leaf>
            } else {
                Arc::new(Weight(f64::from(i) / 3.0)) as Arc<dyn Leaf>
            }
        })
        .collect()
}

/// The random shape: for node i, its two earlier nodes and its leaf.
pub fn shape(n: usize) -> Vec<([usize; 2], usize)> {
    let mut rng = StdRng::seed_from_u64(42);
    (0..n)
        .map(|i| {
            let kids = if i == 0 {
                [usize::MAX; 2]
            } else {
                [rng.random_range(0..i), rng.random_range(0..i)]
            };
            (kids, rng.random_range(0..10))
        })
        .collect()
}

/// Builds the `shape(n)` graph, `make` turning (id, leaf index, kids) into a node handle.
pub fn build_with<N: Clone>(n: usize, make: impl Fn(u32, usize, Vec<N>) -> N) -> Vec<N> {
    let mut nodes: Vec<N> = Vec::with_capacity(n);
    for (i, (kids, leaf)) in shape(n).into_iter().enumerate() {
        let kids = kids
            .iter()
            .filter(|&&k| k < i)
            .map(|&k| nodes[k].clone())
            .collect();
        nodes.push(make(i as u32, leaf, kids));
    }
    nodes
}

pub fn build(n: usize) -> Vec<Shared<Node>> {
    let leaves: Vec<Shared<dyn Leaf>> = leaves().into_iter().map(Shared::from).collect();
    build_with(n, |id, leaf, kids| {
        Shared::new(Node {
            id,
            name: format!("node-{id}"),
            leaf: leaves[leaf].clone(),
            kids,
        })
    })
}
