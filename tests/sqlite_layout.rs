//! The `IntegerKey` table layout: what a new database looks like, what the reference makes
//! of it, and keys that share their integer head (simulated with a head of one byte, since
//! real 8-byte prefix collisions of blake3 keys cannot be found for a test).

mod common;

use std::collections::HashSet;
use std::path::Path;

use pagestore::testing::node;
use pagestore::{
    DataKey, NodeStore as _, PagableData, SqliteNodeStore, SqliteOptions, TableLayout,
};
use rusqlite::Connection;

/// Rows in the main table and in the overflow table.
fn rows(db: &Path) -> (u64, u64) {
    let conn = Connection::open(db).unwrap();
    let count = |table: &str| {
        conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |row| {
            row.get(0)
        })
        .unwrap()
    };
    (count("pagable_data"), count("pagestore_overflow"))
}

/// Options whose `IntegerKey` heads are one byte: keys share heads after the first few.
fn shared_heads() -> SqliteOptions {
    SqliteOptions::default()
        .table_layout(TableLayout::IntegerKey)
        .key_head_bytes_for_tests(1)
        .write_buffer_rows(64)
        .write_buffer_bytes(64 << 10)
}

/// `n` leaves (no two empty: different seeds give different keys), and a parent of each
/// pair of them.
fn store_nodes(store: &SqliteNodeStore, seed: u64, n: u64) -> Vec<(DataKey, PagableData)> {
    let mut stored = Vec::new();
    for i in 0..n {
        let leaf = node(seed, i as usize + 1, vec![]);
        stored.push((store.put(leaf.clone()).unwrap(), leaf));
        if i % 2 == 1 {
            let kids = vec![stored[stored.len() - 2].0, stored[stored.len() - 1].0];
            let parent = node(seed + 1, i as usize + 1, kids);
            stored.push((store.put(parent.clone()).unwrap(), parent));
        }
    }
    stored
}

#[test]
fn an_integer_key_database_keeps_its_layout_and_the_reference_fails_clearly_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteOptions::default()
        .table_layout(TableLayout::IntegerKey)
        .open_node_store(dir.path())
        .unwrap();
    assert_eq!(store.table_layout(), TableLayout::IntegerKey);
    let leaf = node(1, 1, vec![]);
    let key = store.put(leaf.clone()).unwrap();
    let db = store.path().to_path_buf();
    drop(store);

    let conn = Connection::open(&db).unwrap();
    let schema: String = conn
        .query_row(
            "SELECT sql FROM sqlite_master WHERE name = 'pagable_data'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert!(schema.contains("key_head INTEGER PRIMARY KEY"), "{schema}");
    let page_size: u32 = conn
        .query_row("PRAGMA page_size", [], |row| row.get(0))
        .unwrap();
    assert!(page_size >= 16 * 1024, "{page_size}");
    // What the reference does on open, then on its first read: its CREATE TABLE IF NOT
    // EXISTS leaves the table alone, and its read fails naming the missing column.
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS pagable_data (key BLOB PRIMARY KEY, value BLOB NOT NULL) \
         WITHOUT ROWID",
    )
    .unwrap();
    let err = conn
        .prepare("SELECT value FROM pagable_data WHERE key = ?1")
        .expect_err("the reference's read must fail");
    assert!(err.to_string().contains("no such column: key"), "{err}");
    drop(conn);

    // Reopened with another layout asked for: it keeps its own.
    let store = SqliteOptions::default()
        .table_layout(TableLayout::WithoutRowid)
        .open_node_store(dir.path())
        .unwrap();
    assert_eq!(store.table_layout(), TableLayout::IntegerKey);
    assert_eq!(*store.get(&key).unwrap(), leaf);
    drop(store);
    let read_only = SqliteOptions::default()
        .read_only()
        .open_node_store(dir.path())
        .unwrap();
    assert_eq!(read_only.table_layout(), TableLayout::IntegerKey);
    assert_eq!(*read_only.get(&key).unwrap(), leaf);
}

#[test]
fn keys_sharing_a_head_are_stored_read_verified_and_counted_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = shared_heads().open_node_store(dir.path()).unwrap();
    let stored = store_nodes(&store, 7, 600);
    store.flush().unwrap();
    let db = store.path().to_path_buf();
    let (main, overflow) = rows(&db);
    assert!(main <= 256 && overflow > 0, "{main} + {overflow}");
    assert_eq!(main + overflow, stored.len() as u64);
    for (key, data) in &stored {
        assert!(store.contains(key).unwrap(), "{key}");
        assert_eq!(*store.get(key).unwrap(), *data, "{key}");
    }
    // A repeat of every node (dedup memory dropped, so the writer sees them) adds nothing.
    store.release_memory();
    for (_, data) in &stored {
        store.put(data.clone()).unwrap();
    }
    store.flush().unwrap();
    assert_eq!(rows(&db), (main, overflow));
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.records, stored.len() as u64);
    assert_eq!(store.stats().unwrap().records, stored.len() as u64);
    let mut seen = HashSet::new();
    store
        .scan(&mut |key, node| {
            assert!(seen.insert(key), "{key} twice");
            assert!(node.is_ok(), "{key}");
            Ok(())
        })
        .unwrap();
    assert_eq!(seen.len(), stored.len());
    // A key never found: misses in both tables.
    let absent = node(99, 99, vec![]).compute_key();
    assert!(!store.contains(&absent).unwrap());
    drop(store);

    let store = shared_heads().open_node_store(dir.path()).unwrap();
    assert!(store.open_report().is_clean());
    for (key, data) in &stored {
        assert_eq!(*store.get(key).unwrap(), *data, "{key}");
    }
}

#[test]
fn gc_deletes_exactly_the_unreachable_keys_wherever_they_are_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = shared_heads().open_node_store(dir.path()).unwrap();
    let kept = store_nodes(&store, 3, 300);
    let gone = store_nodes(&store, 5, 300);
    // One root over every kept node.
    let root = node(11, 0, kept.iter().map(|(key, _)| *key).collect());
    let root_key = store.put(root.clone()).unwrap();
    store.set_root("main", root_key).unwrap();
    store.flush().unwrap();
    let db = store.path().to_path_buf();
    assert!(rows(&db).1 > 0);

    let report = store.gc().unwrap();
    assert_eq!(report.deleted, gone.len() as u64, "{report:?}");
    assert_eq!(report.kept, kept.len() as u64 + 1, "{report:?}");
    let (main, overflow) = rows(&db);
    assert_eq!(main + overflow, kept.len() as u64 + 1);
    // The kept keys whose head's row went with a deleted key are still found (in the
    // overflow table), and the deleted ones in neither table.
    for (key, data) in &kept {
        assert_eq!(*store.get(key).unwrap(), *data, "{key}");
    }
    for (key, _) in &gone {
        assert!(!store.contains(key).unwrap(), "{key}");
    }
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");

    // Stored again, a deleted key may find its head free now: stored once, in one place.
    store.release_memory();
    for (_, data) in gone.iter().chain(&kept) {
        store.put(data.clone()).unwrap();
    }
    store.flush().unwrap();
    let (main, overflow) = rows(&db);
    assert_eq!(main + overflow, (kept.len() + gone.len()) as u64 + 1);
    for (key, data) in gone.iter().chain(&kept) {
        assert_eq!(*store.get(key).unwrap(), *data, "{key}");
    }
    let report = store.gc().unwrap();
    assert_eq!(report.deleted, gone.len() as u64, "{report:?}");
    for (key, data) in &kept {
        assert_eq!(*store.get(key).unwrap(), *data, "{key}");
    }
}

#[test]
fn a_damaged_record_in_the_overflow_table_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let store = shared_heads()
        .durability(pagestore::Durability::Cache)
        .open_node_store(dir.path())
        .unwrap();
    let stored = store_nodes(&store, 13, 400);
    store.flush().unwrap();
    // A leaf stored in the overflow table.
    let conn = Connection::open(store.path()).unwrap();
    let (victim, _) = stored
        .iter()
        .find(|(key, data)| {
            data.arcs.is_empty() && common::record_row(&conn, *key).0 == "pagestore_overflow"
        })
        .expect("a leaf in the overflow table");
    drop(conn);
    common::damage_stored_record(&store, *victim, 16, 0x01);
    let err = store.get(victim).unwrap_err();
    assert!(format!("{err:#}").contains(&victim.to_string()), "{err:#}");
    let report = store.verify().unwrap();
    assert_eq!(report.corrupt, vec![*victim]);
}
