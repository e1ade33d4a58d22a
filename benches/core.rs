//! Hot paths of the core types: hashing a node, the record codec, and an arc-cache hit.
//!
//! `cargo bench --bench core`. Target: an arc-cache hit ≤ 100 ns.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pagestore::{DataKey, InMemoryPagableStorage, PagableData, PagableStorage, codec};

fn node(len: usize, arcs: usize) -> PagableData {
    let data = (0..len).map(|i| (i as u8).wrapping_mul(31)).collect();
    let arcs = (1..=arcs as u8)
        .map(|b| DataKey::from_bytes([b; 16]).unwrap())
        .collect();
    PagableData { data, arcs }
}

fn compute_key(c: &mut Criterion) {
    let mut group = c.benchmark_group("compute_key");
    for (label, len) in [("64B", 64), ("4KiB", 4096), ("1MiB", 1 << 20)] {
        let node = node(len, 2);
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::from_parameter(label), &node, |b, node| {
            b.iter(|| black_box(node).compute_key())
        });
    }
    group.finish();
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    for (label, len) in [("64B", 64), ("4KiB", 4096)] {
        let node = node(len, 3);
        let record = codec::encode(&node);
        group.throughput(Throughput::Bytes(record.len() as u64));
        group.bench_with_input(BenchmarkId::new("encode", label), &node, |b, node| {
            b.iter(|| codec::encode(black_box(node)))
        });
        group.bench_with_input(BenchmarkId::new("decode", label), &record, |b, record| {
            b.iter(|| codec::decode(black_box(record)).unwrap())
        });
        group.bench_with_input(
            BenchmarkId::new("key_of_record", label),
            &record,
            |b, record| b.iter(|| codec::key_of_record(black_box(record)).unwrap()),
        );
    }
    group.finish();
}

fn arc_cache_hit(c: &mut Criterion) {
    let storage = InMemoryPagableStorage::new();
    let type_id = std::any::TypeId::of::<u64>();
    // A realistically full cache: 100k live values.
    let values: Vec<(DataKey, Arc<u64>)> = (0..100_000u64)
        .map(|n| {
            let key = node(8, 0).compute_key();
            let key = DataKey::from_bytes({
                let mut b = key.as_bytes();
                b[..8].copy_from_slice(&(n + 1).to_le_bytes());
                b
            })
            .unwrap();
            let value = Arc::new(n);
            assert!(
                storage
                    .on_arc_deserialized(type_id, key, Box::new(value.clone()))
                    .is_none()
            );
            (key, value)
        })
        .collect();
    let mut group = c.benchmark_group("arc_cache_hit");
    let mut i = 0;
    group.bench_function("fetch_arc_or_data_blocking", |b| {
        b.iter(|| {
            i = (i + 7919) % values.len();
            storage
                .fetch_arc_or_data_blocking(&type_id, black_box(&values[i].0))
                .unwrap()
        })
    });
    group.bench_function("resolve_arc", |b| {
        b.iter(|| {
            i = (i + 7919) % values.len();
            storage
                .resolve_arc(
                    type_id,
                    black_box(values[i].0),
                    None,
                    &mut |_| unreachable!(),
                )
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, compute_key, codec, arc_cache_hit);
criterion_main!(benches);
