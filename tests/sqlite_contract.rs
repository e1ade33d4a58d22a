//! The backend contract suite on `SqliteBackedPagableStorage`, in every durability mode and
//! every table layout, and with keys that share their integer head.

mod common;

use std::sync::Mutex;

use pagestore::testing::{self, NodeStoreHarness, Runtime};
use pagestore::{DataKey, Durability, SqliteNodeStore, SqliteOptions, TableLayout};

/// Opens stores in fresh temporary directories, kept until the suite ends.
struct Sqlite {
    durability: Durability,
    layout: TableLayout,
    /// Leading key bytes in an `IntegerKey` head (fewer than 8: keys share heads).
    head_bytes: u8,
    dirs: Mutex<Vec<tempfile::TempDir>>,
}

impl Sqlite {
    fn new(durability: Durability) -> Self {
        Self {
            durability,
            layout: TableLayout::default(),
            head_bytes: 8,
            dirs: Mutex::new(Vec::new()),
        }
    }

    fn options(&self) -> SqliteOptions {
        // Small buffers so the suite's few hundred nodes span several batches.
        SqliteOptions::default()
            .durability(self.durability)
            .table_layout(self.layout)
            .key_head_bytes_for_tests(self.head_bytes)
            .write_buffer_rows(64)
            .write_buffer_bytes(64 << 10)
    }
}

impl NodeStoreHarness for Sqlite {
    type Store = SqliteNodeStore;

    fn open(&self) -> SqliteNodeStore {
        let dir = tempfile::tempdir().unwrap();
        let store = self.options().open_node_store(dir.path()).unwrap();
        self.dirs.lock().unwrap().push(dir);
        store
    }

    fn reopen(&self, store: SqliteNodeStore) -> Option<SqliteNodeStore> {
        let dir = store.path().parent().unwrap().to_path_buf();
        drop(store);
        let reopened = self.options().open_node_store(&dir).unwrap();
        assert!(
            reopened.open_report().is_clean(),
            "{:?}",
            reopened.open_report()
        );
        Some(reopened)
    }

    fn corrupt(&self, store: &SqliteNodeStore, key: DataKey) -> bool {
        common::damage_stored_record(store, key, 16, 0x01); // first data byte
        true
    }
}

/// Both suites: the bare node store, and the store with the runtime attached.
fn keeps_both_contracts(sqlite: Sqlite) {
    testing::node_store_contract(&sqlite);
    testing::storage_contract(&Runtime(sqlite));
}

#[test]
fn cache_mode_keeps_the_contract() {
    keeps_both_contracts(Sqlite::new(Durability::Cache));
}

#[test]
fn durable_mode_keeps_the_contract() {
    keeps_both_contracts(Sqlite::new(Durability::Durable));
}

#[test]
fn sync_mode_keeps_the_contract() {
    keeps_both_contracts(Sqlite::new(Durability::Sync));
}

#[test]
fn the_reference_table_layout_keeps_the_contract() {
    for durability in [Durability::Cache, Durability::Durable] {
        let mut backend = Sqlite::new(durability);
        backend.layout = TableLayout::WithoutRowid;
        testing::node_store_contract(&backend);
    }
}

#[test]
fn the_integer_key_layout_keeps_the_contract() {
    for durability in [Durability::Cache, Durability::Durable] {
        let mut backend = Sqlite::new(durability);
        backend.layout = TableLayout::IntegerKey;
        keeps_both_contracts(backend);
    }
}

/// Keys whose heads are only their first byte: with the suite's hundreds of nodes, most
/// keys find their head's slot taken and are stored in the overflow table, so every check
/// of the contract (put, get, contains, scan, verify, gc, dedup, reopen) runs on them.
#[test]
fn keys_sharing_their_head_keep_the_contract() {
    for durability in [Durability::Cache, Durability::Durable] {
        let mut backend = Sqlite::new(durability);
        backend.layout = TableLayout::IntegerKey;
        backend.head_bytes = 1;
        keeps_both_contracts(backend);
    }
}

#[test]
fn default_options_keep_the_contract() {
    struct Defaults(Sqlite);
    impl NodeStoreHarness for Defaults {
        type Store = SqliteNodeStore;
        fn open(&self) -> SqliteNodeStore {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteOptions::default()
                .open_node_store(dir.path())
                .unwrap();
            self.0.dirs.lock().unwrap().push(dir);
            store
        }
        fn reopen(&self, store: SqliteNodeStore) -> Option<SqliteNodeStore> {
            let dir = store.path().parent().unwrap().to_path_buf();
            drop(store);
            Some(SqliteOptions::default().open_node_store(&dir).unwrap())
        }
        fn corrupt(&self, store: &SqliteNodeStore, key: DataKey) -> bool {
            self.0.corrupt(store, key)
        }
    }
    testing::storage_contract(&Runtime(Defaults(Sqlite::new(Durability::Cache))));
}
