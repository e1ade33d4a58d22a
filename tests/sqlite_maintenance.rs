//! Store figures (`stats`) and giving space back (`auto_vacuum`, `release_free_pages`,
//! `compact`).

#![cfg(feature = "sqlite")]

mod common;
mod contract;

use std::path::Path;

use pagestore::{
    DataKey, Durability, Error, MemoryNodeStore, NodeStore, PagableData, SqliteOptions,
    WithRuntime, codec,
};

fn node(i: u32, len: usize) -> PagableData {
    let mut data = format!("node {i} ").into_bytes();
    data.resize(len, b'x');
    PagableData { data, arcs: vec![] }
}

fn pragma(db: &Path, name: &str) -> i64 {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row(&format!("PRAGMA {name}"), [], |row| row.get(0))
        .unwrap()
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// A writer that seals nothing on its own: records stay pending until `flush`.
fn buffered() -> SqliteOptions {
    SqliteOptions::default()
        .readers(2)
        .write_buffer_rows(1 << 20)
        .write_buffer_bytes(1 << 30)
}

#[test]
fn memory_stats_count_records_bytes_and_roots() {
    let store = MemoryNodeStore::new();
    let empty = store.stats();
    assert_eq!((empty.records, empty.data_bytes, empty.roots), (0, 0, 0));
    let nodes: Vec<PagableData> = (0..5).map(|i| node(i, 100 + i as usize)).collect();
    let mut keys = vec![];
    for n in &nodes {
        keys.push(store.put(n.clone()).unwrap());
    }
    store.put(nodes[0].clone()).unwrap(); // a repeat is one record
    store.set_root("main", keys[0]).unwrap();
    let stats = store.stats();
    assert_eq!(stats.records, 5);
    let bytes: usize = nodes.iter().map(|n| codec::encode(n).len()).sum();
    assert_eq!(stats.data_bytes, bytes as u64);
    assert_eq!(stats.roots, 1);
    assert_eq!((stats.pending_records, stats.pending_bytes), (0, 0));
    assert_eq!(stats.file_bytes, None);
    assert_eq!(stats.free_pages, None);
    assert_eq!(store.store_stats().unwrap(), Some(stats.clone()));

    let storage = WithRuntime::attach(store);
    let all = storage.stats().unwrap();
    assert_eq!(all.store, Some(stats));
    assert_eq!(all.arc_cache_entries, storage.arc_cache_len());
    assert_eq!(all.paging, storage.paging_stats());
}

#[test]
fn sqlite_stats_before_and_after_flush() {
    let dir = tempfile::tempdir().unwrap();
    let store = buffered().open_node_store(dir.path()).unwrap();
    let nodes: Vec<PagableData> = (0..50).map(|i| node(i, 200)).collect();
    let bytes: u64 = nodes.iter().map(|n| codec::encode(n).len() as u64).sum();
    let mut keys = vec![];
    for n in &nodes {
        keys.push(store.put(n.clone()).unwrap());
    }
    store.set_root("main", keys[0]).unwrap();
    store.set_root("other", keys[1]).unwrap();

    let before = store.stats().unwrap();
    assert_eq!(before.records, 0);
    assert_eq!(before.data_bytes, 0);
    assert_eq!(before.pending_records, 50);
    assert_eq!(before.pending_bytes, bytes);
    assert_eq!(before.roots, 2, "pending roots count");
    assert_eq!(before.page_size, Some(32 * 1024));

    store.flush().unwrap();
    let after = store.stats().unwrap();
    assert_eq!(after.records, 50);
    assert_eq!(after.data_bytes, bytes);
    assert_eq!((after.pending_records, after.pending_bytes), (0, 0));
    assert_eq!(after.roots, 2);
    assert!(after.file_bytes.unwrap() > 0);
    assert_eq!(
        after.free_bytes,
        Some(after.free_pages.unwrap() * after.page_size.unwrap())
    );
    assert_eq!(store.store_stats().unwrap(), Some(after));
    drop(store);

    // Through the runtime, and on a read-only store.
    let storage = SqliteOptions::default().open(dir.path()).unwrap();
    let all = storage.stats().unwrap();
    assert_eq!(all.store.as_ref().unwrap().records, 50);
    assert_eq!(all.paging, storage.paging_stats());
    drop(storage);
    let reader = SqliteOptions::default()
        .read_only()
        .open_node_store(dir.path())
        .unwrap();
    let stats = reader.stats().unwrap();
    assert_eq!(
        (stats.records, stats.data_bytes, stats.roots),
        (50, bytes, 2)
    );
}

#[test]
fn a_new_database_uses_incremental_auto_vacuum() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteOptions::default()
        .open_node_store(dir.path())
        .unwrap();
    store.put(node(1, 10)).unwrap();
    let db = store.path().to_owned();
    drop(store);
    assert_eq!(pragma(&db, "auto_vacuum"), 2);
    // And keeps it across reopening and compaction.
    let store = SqliteOptions::default()
        .open_node_store(dir.path())
        .unwrap();
    store.compact().unwrap();
    drop(store);
    assert_eq!(pragma(&db, "auto_vacuum"), 2);
    assert_eq!(pragma(&db, "page_size"), 32 * 1024);
}

/// Stores `n` records of 4 KiB, closes, and deletes every other one with rusqlite.
fn store_then_delete_half(dir: &Path, durability: Durability, n: u32) -> Vec<DataKey> {
    let store = SqliteOptions::default()
        .durability(durability)
        .open_node_store(dir)
        .unwrap();
    let keys: Vec<DataKey> = (0..n).map(|i| store.put(node(i, 4096)).unwrap()).collect();
    let db = store.path().to_owned();
    drop(store);
    let conn = rusqlite::Connection::open(&db).unwrap();
    for key in keys.iter().step_by(2) {
        assert_eq!(
            common::on_record(&conn, *key, "DELETE FROM {table} WHERE {row}"),
            1
        );
    }
    keys.into_iter().skip(1).step_by(2).collect()
}

#[test]
fn released_free_pages_shrink_the_file() {
    for durability in [Durability::Durable, Durability::Cache] {
        let dir = tempfile::tempdir().unwrap();
        let kept = store_then_delete_half(dir.path(), durability, 400);
        let store = SqliteOptions::default()
            .durability(durability)
            .open_node_store(dir.path())
            .unwrap();
        let db = store.path().to_owned();
        let before = store.stats().unwrap();
        assert_eq!(before.records, 200, "{durability:?}");
        assert!(before.free_pages.unwrap() > 0, "{durability:?}: {before:?}");
        let db_before = file_len(&db);

        let released = store.release_free_pages().unwrap();
        assert_eq!(released, before.free_pages.unwrap(), "{durability:?}");
        let after = store.stats().unwrap();
        assert_eq!(after.free_pages, Some(0), "{durability:?}");
        assert_eq!(after.records, 200);
        assert!(
            file_len(&db) < db_before,
            "{durability:?}: {} -> {}",
            db_before,
            file_len(&db)
        );
        assert!(
            after.file_bytes.unwrap() < before.file_bytes.unwrap(),
            "{durability:?}: {before:?} -> {after:?}"
        );
        // Nothing more to release; records still read.
        assert_eq!(store.release_free_pages().unwrap(), 0);
        for key in &kept {
            store.get(key).unwrap();
        }
        assert!(store.verify().unwrap().is_ok());
    }
}

#[test]
fn compact_keeps_every_record_and_shrinks_the_file() {
    for durability in [Durability::Durable, Durability::Sync, Durability::Cache] {
        let dir = tempfile::tempdir().unwrap();
        let kept = store_then_delete_half(dir.path(), durability, 300);
        let store = SqliteOptions::default()
            .durability(durability)
            .open_node_store(dir.path())
            .unwrap();
        // A parent and a root stored just before: compact commits them first.
        let parent = store
            .put(PagableData {
                data: b"parent".to_vec(),
                arcs: kept[..3].to_vec(),
            })
            .unwrap();
        store.set_root("main", parent).unwrap();
        let before = store.stats().unwrap();
        assert!(before.free_pages.unwrap() > 0);
        store.compact().unwrap();
        let after = store.stats().unwrap();
        assert_eq!(after.free_pages, Some(0), "{durability:?}");
        assert_eq!(after.pending_records, 0, "{durability:?}");
        assert_eq!(after.records, 151, "{durability:?}");
        assert!(
            after.file_bytes.unwrap() < before.file_bytes.unwrap(),
            "{durability:?}: {before:?} -> {after:?}"
        );
        for key in kept.iter().chain([&parent]) {
            store.get(key).unwrap();
        }
        assert_eq!(store.root("main").unwrap(), Some(parent));
        let report = store.verify().unwrap();
        assert!(report.is_ok(), "{durability:?}: {report:?}");
        // Writes go on after it.
        let later = store.put(node(10_000, 10)).unwrap();
        store.flush().unwrap();
        drop(store);
        let store = SqliteOptions::default()
            .open_node_store(dir.path())
            .unwrap();
        store.get(&later).unwrap();
        assert_eq!(store.stats().unwrap().records, 152);
    }
}

#[test]
fn a_read_only_store_refuses_maintenance() {
    let dir = tempfile::tempdir().unwrap();
    drop(
        SqliteOptions::default()
            .open_node_store(dir.path())
            .unwrap(),
    );
    let reader = SqliteOptions::default()
        .read_only()
        .open_node_store(dir.path())
        .unwrap();
    for err in [
        reader.compact().unwrap_err(),
        reader.release_free_pages().unwrap_err(),
    ] {
        assert!(
            matches!(err.downcast_ref::<Error>(), Some(Error::ReadOnly { .. })),
            "{err:#}"
        );
    }
}

/// The reference's database (auto_vacuum none, 8 KiB pages) opens, keeps its mode and page
/// size through a write and a `compact`, and every record reads.
#[test]
fn the_reference_fixture_keeps_its_auto_vacuum_mode() {
    let (fixture, entries) = contract::reference_fixture();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture.join("pagable.db"), dir.path().join("pagable.db")).unwrap();
    let db = dir.path().join("pagable.db");
    assert_eq!(pragma(&db, "auto_vacuum"), 0);

    let store = SqliteOptions::default()
        .open_node_store(dir.path())
        .unwrap();
    let stats = store.stats().unwrap();
    assert_eq!(stats.records, entries.len() as u64);
    assert_eq!(stats.page_size, Some(8192));
    store.put(node(1, 100)).unwrap();
    store.flush().unwrap();
    // No incremental auto-vacuum here: nothing to release.
    assert_eq!(store.release_free_pages().unwrap(), 0);
    store.compact().unwrap();
    for (key, data) in &entries {
        assert_eq!(*store.get(key).unwrap(), *data);
    }
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    drop(store);
    assert_eq!(pragma(&db, "auto_vacuum"), 0);
    assert_eq!(pragma(&db, "page_size"), 8192);
}

/// A repair after an unclean shutdown gives the pages of the records it deletes back.
#[test]
fn a_repair_releases_the_pages_it_frees() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteOptions::default()
        .durability(Durability::Cache)
        .open_node_store(dir.path())
        .unwrap();
    let keys: Vec<DataKey> = (0..200)
        .map(|i| store.put(node(i, 4096)).unwrap())
        .collect();
    let db = store.path().to_owned();
    drop(store);
    // Damage half the records (a value that does not decode), then leave the marker of an
    // unclean shutdown.
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        for key in keys.iter().step_by(2) {
            let sql = "UPDATE {table} SET value = x'00' WHERE {row}";
            assert_eq!(common::on_record(&conn, *key, sql), 1);
        }
    }
    let mut marker = db.as_os_str().to_owned();
    marker.push(".open");
    std::fs::write(&marker, b"").unwrap();
    let db_before = file_len(&db);

    let store = SqliteOptions::default()
        .durability(Durability::Cache)
        .open_node_store(dir.path())
        .unwrap();
    match store.open_report() {
        pagestore::OpenReport::Repaired {
            removed_corrupt, ..
        } => assert_eq!(*removed_corrupt, 100),
        other => panic!("not repaired: {other:?}"),
    }
    let stats = store.stats().unwrap();
    assert_eq!(stats.records, 100);
    assert_eq!(stats.free_pages, Some(0));
    assert!(
        file_len(&db) < db_before,
        "{db_before} -> {}",
        file_len(&db)
    );
}

/// `compact` and `release_free_pages` while other threads store and read: nothing is lost,
/// nothing deadlocks.
#[test]
fn maintenance_runs_beside_writers_and_readers() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteOptions::default()
        .write_buffer_rows(64)
        .open_node_store(dir.path())
        .unwrap();
    let keys = std::thread::scope(|scope| {
        let writers: Vec<_> = (0..3u32)
            .map(|t| {
                let store = &store;
                scope.spawn(move || {
                    (0..300)
                        .map(|i| {
                            let key = store.put(node(t * 1000 + i, 300)).unwrap();
                            store.get(&key).unwrap();
                            key
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for _ in 0..3 {
            store.compact().unwrap();
            store.release_free_pages().unwrap();
        }
        writers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect::<Vec<_>>()
    });
    store.flush().unwrap();
    for key in &keys {
        store.get(key).unwrap();
    }
    assert_eq!(store.stats().unwrap().records, 900);
    assert!(store.verify().unwrap().is_ok());
}
