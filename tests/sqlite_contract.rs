//! The backend contract suite on `SqliteBackedPagableStorage`, in every durability mode and
//! both table layouts.

mod common;
mod contract;

use std::sync::Mutex;

use pagestore::{DataKey, Durability, SqliteBackedPagableStorage, SqliteOptions, TableLayout};
use rusqlite::Connection;

/// Opens stores in fresh temporary directories, kept until the suite ends.
struct Sqlite {
    durability: Durability,
    layout: TableLayout,
    dirs: Mutex<Vec<tempfile::TempDir>>,
}

impl Sqlite {
    fn new(durability: Durability) -> Self {
        Self {
            durability,
            layout: TableLayout::default(),
            dirs: Mutex::new(Vec::new()),
        }
    }

    fn options(&self) -> SqliteOptions {
        // Small buffers so the suite's few hundred nodes span several batches.
        SqliteOptions::default()
            .durability(self.durability)
            .table_layout(self.layout)
            .write_buffer_rows(64)
            .write_buffer_bytes(64 << 10)
    }
}

impl contract::Backend for Sqlite {
    type Storage = SqliteBackedPagableStorage;

    fn open(&self) -> SqliteBackedPagableStorage {
        let dir = tempfile::tempdir().unwrap();
        let storage = self.options().open(dir.path()).unwrap();
        self.dirs.lock().unwrap().push(dir);
        storage
    }

    fn reopen(&self, storage: SqliteBackedPagableStorage) -> Option<SqliteBackedPagableStorage> {
        let dir = storage.path().parent().unwrap().to_path_buf();
        drop(storage);
        let reopened = self.options().open(&dir).unwrap();
        assert!(
            reopened.open_report().is_clean(),
            "{:?}",
            reopened.open_report()
        );
        Some(reopened)
    }

    fn count(&self, storage: &SqliteBackedPagableStorage) -> u64 {
        let conn = Connection::open(storage.path()).unwrap();
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .unwrap();
        conn.query_row("SELECT count(*) FROM pagable_data", [], |row| row.get(0))
            .unwrap()
    }

    fn corrupt(&self, storage: &SqliteBackedPagableStorage, key: DataKey) -> bool {
        common::damage_stored_record(storage, key, 16, 0x01); // first data byte
        true
    }
}

#[test]
fn cache_mode_keeps_the_contract() {
    contract::run_all(&Sqlite::new(Durability::Cache));
}

#[test]
fn durable_mode_keeps_the_contract() {
    contract::run_all(&Sqlite::new(Durability::Durable));
}

#[test]
fn sync_mode_keeps_the_contract() {
    contract::run_all(&Sqlite::new(Durability::Sync));
}

#[test]
fn the_reference_table_layout_keeps_the_contract() {
    for durability in [Durability::Cache, Durability::Durable] {
        let mut backend = Sqlite::new(durability);
        backend.layout = TableLayout::WithoutRowid;
        contract::run_all(&backend);
    }
}

#[test]
fn default_options_keep_the_contract() {
    struct Defaults(Sqlite);
    impl contract::Backend for Defaults {
        type Storage = SqliteBackedPagableStorage;
        fn open(&self) -> SqliteBackedPagableStorage {
            let dir = tempfile::tempdir().unwrap();
            let storage = SqliteBackedPagableStorage::try_new(dir.path()).unwrap();
            self.0.dirs.lock().unwrap().push(dir);
            storage
        }
        fn reopen(&self, s: SqliteBackedPagableStorage) -> Option<SqliteBackedPagableStorage> {
            let dir = s.path().parent().unwrap().to_path_buf();
            drop(s);
            Some(SqliteBackedPagableStorage::try_new(&dir).unwrap())
        }
        fn count(&self, s: &SqliteBackedPagableStorage) -> u64 {
            self.0.count(s)
        }
        fn corrupt(&self, s: &SqliteBackedPagableStorage, key: DataKey) -> bool {
            self.0.corrupt(s, key)
        }
    }
    contract::run_all(&Defaults(Sqlite::new(Durability::Cache)));
}
