//! SQLite backend behaviour beyond the generic contract: the reference's databases, errors
//! naming paths, unclean shutdowns, sticky write errors, readers during big commits.

mod common;
mod contract;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use contract::{node, store_dag};
use pagestore::{
    DataKey, Durability, Error, NodeStore as _, OpenReport, PagableData, PagableStorage,
    SqliteBackedPagableStorage, SqliteOptions, TableLayout,
};
use rusqlite::Connection;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn reads_a_database_written_by_the_reference() {
    let (fixture, entries) = contract::reference_fixture();
    assert_eq!(entries.len(), 600);
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture, dir.path());
    let storage = SqliteBackedPagableStorage::try_new(dir.path()).unwrap();
    assert!(storage.open_report().is_clean());
    // The reference's table is kept as it is.
    assert_eq!(storage.table_layout(), TableLayout::WithoutRowid);
    for (key, expected) in &entries {
        assert_eq!(expected.compute_key(), *key);
        let got = storage.fetch_data_blocking(key).unwrap();
        assert_eq!(&*got, expected, "{key}");
    }
    let report = storage.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.records, 600);
    // The reference has no roots; the open added the (empty) roots table.
    assert_eq!(storage.roots().unwrap(), vec![]);
    // Still writable, in the same file, roots included.
    let key = storage.store_data(node(1, 10, vec![entries[0].0])).unwrap();
    storage.set_root("main", key).unwrap();
    storage.flush().unwrap();
    drop(storage);
    let storage = SqliteBackedPagableStorage::try_new(dir.path()).unwrap();
    assert!(storage.open_report().is_clean());
    assert_eq!(
        storage.fetch_data_blocking(&key).unwrap().arcs,
        [entries[0].0]
    );
    assert_eq!(storage.roots().unwrap(), vec![("main".to_string(), key)]);
    let db = storage.path().to_path_buf();
    drop(storage);
    // And the reference still reads the file with roots in it.
    assert_eq!(read_like_the_reference(&db, &key).arcs, [entries[0].0]);
}

/// Opens a database the way pagable 0.3.3 does (its pragmas, its table statement, its
/// query) and decodes each value with the reference's layout.
fn read_like_the_reference(db: &Path, key: &pagestore::DataKey) -> PagableData {
    let conn = Connection::open(db).unwrap();
    conn.execute_batch(
        "PRAGMA synchronous=OFF; PRAGMA journal_mode=OFF; PRAGMA page_size=8192;
         CREATE TABLE IF NOT EXISTS pagable_data (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;",
    )
    .unwrap();
    let bytes: Vec<u8> = conn
        .query_row(
            "SELECT value FROM pagable_data WHERE key = ?1",
            [&key.as_bytes()[..]],
            |row| row.get(0),
        )
        .unwrap();
    let data_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let arcs_len = u64::from_le_bytes(bytes[8..16].try_into().unwrap()) as usize;
    assert_eq!(bytes.len(), 16 + data_len + 16 * arcs_len);
    PagableData {
        data: bytes[16..16 + data_len].to_vec(),
        arcs: bytes[16 + data_len..]
            .chunks_exact(16)
            .map(|k| pagestore::DataKey::from_slice(k).unwrap())
            .collect(),
    }
}

/// Stores `data` the way pagable 0.3.3 does (its statement, its record layout).
fn write_like_the_reference(db: &Path, data: &PagableData) -> pagestore::DataKey {
    let conn = Connection::open(db).unwrap();
    let key = data.compute_key();
    let mut value = Vec::new();
    value.extend_from_slice(&(data.data.len() as u64).to_le_bytes());
    value.extend_from_slice(&(data.arcs.len() as u64).to_le_bytes());
    value.extend_from_slice(&data.data);
    for arc in &data.arcs {
        value.extend_from_slice(&arc.as_bytes());
    }
    conn.execute(
        "INSERT OR IGNORE INTO pagable_data (key, value) VALUES (?1, ?2)",
        rusqlite::params![&key.as_bytes()[..], value],
    )
    .unwrap();
    key
}

#[test]
fn the_reference_can_read_and_write_what_pagestore_wrote() {
    for layout in [TableLayout::Rowid, TableLayout::WithoutRowid] {
        for durability in [Durability::Cache, Durability::Durable] {
            let dir = tempfile::tempdir().unwrap();
            let storage = SqliteOptions::default()
                .durability(durability)
                .table_layout(layout)
                .open(dir.path())
                .unwrap();
            assert_eq!(storage.table_layout(), layout);
            let model = store_dag(&storage, 11, 300);
            // A roots table in the file does not disturb the reference.
            let (&first, _) = model.iter().next().unwrap();
            storage.set_root("main", first).unwrap();
            let db = storage.path().to_path_buf();
            drop(storage);
            for (key, data) in &model {
                assert_eq!(&read_like_the_reference(&db, key), data, "{layout:?}");
            }
            // The reference adds a node (and repeats one); pagestore reads both back.
            let (&child, _) = model.iter().next().unwrap();
            let added = node(5, 40, vec![child]);
            let added_key = write_like_the_reference(&db, &added);
            write_like_the_reference(&db, &model[&child]);
            let storage = SqliteBackedPagableStorage::try_new(dir.path()).unwrap();
            assert_eq!(storage.table_layout(), layout);
            assert_eq!(*storage.fetch_data_blocking(&added_key).unwrap(), added);
            let report = storage.verify().unwrap();
            assert!(report.is_ok(), "{layout:?}: {report:?}");
            assert_eq!(report.records, model.len() as u64 + 1, "{layout:?}");
        }
    }
}

#[test]
fn new_databases_get_the_chosen_layout_and_existing_ones_keep_theirs() {
    let table_sql = |db: &Path| -> String {
        Connection::open(db)
            .unwrap()
            .query_row(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'pagable_data'",
                [],
                |row| row.get(0),
            )
            .unwrap()
    };
    for (layout, other) in [
        (TableLayout::Rowid, TableLayout::WithoutRowid),
        (TableLayout::WithoutRowid, TableLayout::Rowid),
        (TableLayout::IntegerKey, TableLayout::Rowid),
        (TableLayout::Rowid, TableLayout::IntegerKey),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let storage = SqliteOptions::default()
            .table_layout(layout)
            .open(dir.path())
            .unwrap();
        let key = storage.store_data(node(1, 100, vec![])).unwrap();
        let db = storage.path().to_path_buf();
        drop(storage);
        let sql = table_sql(&db);
        assert_eq!(
            sql.contains("WITHOUT ROWID"),
            layout == TableLayout::WithoutRowid,
            "{sql}"
        );
        // Asking for the other layout does not change an existing database.
        let storage = SqliteOptions::default()
            .table_layout(other)
            .open(dir.path())
            .unwrap();
        assert_eq!(storage.table_layout(), layout);
        assert_eq!(
            *storage.fetch_data_blocking(&key).unwrap(),
            node(1, 100, vec![])
        );
        drop(storage);
        assert_eq!(table_sql(&db), sql);
    }
    let dir = tempfile::tempdir().unwrap();
    let storage = SqliteBackedPagableStorage::try_new(dir.path()).unwrap();
    assert_eq!(storage.table_layout(), TableLayout::Rowid);
}

#[test]
fn a_16_mib_blob_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let storage = SqliteBackedPagableStorage::try_new(dir.path()).unwrap();
    let big = node(42, 16 << 20, vec![]);
    let key = storage.store_data(big.clone()).unwrap();
    assert_eq!(*storage.fetch_data_blocking(&key).unwrap(), big);
    storage.flush().unwrap();
    assert_eq!(*storage.fetch_data_blocking(&key).unwrap(), big);
    drop(storage);
    let storage = SqliteBackedPagableStorage::try_new(dir.path()).unwrap();
    assert_eq!(*storage.fetch_data_blocking(&key).unwrap(), big);
}

fn io_path(err: &anyhow::Error) -> std::path::PathBuf {
    match err.downcast_ref::<Error>() {
        Some(Error::Io { path, .. }) => path.clone(),
        other => panic!("expected an Io error, got {other:?} ({err:#})"),
    }
}

#[test]
fn a_file_where_the_directory_should_be_is_an_io_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let err = SqliteBackedPagableStorage::try_new(&file).unwrap_err();
    assert_eq!(io_path(&err), file);
    assert!(format!("{err:#}").contains("not-a-dir"), "{err:#}");
    let below = file.join("below");
    let err = SqliteBackedPagableStorage::try_new(&below).unwrap_err();
    assert!(io_path(&err).starts_with(&file), "{err:#}");
}

#[test]
fn an_unwritable_path_is_an_io_error_naming_it() {
    // /proc refuses new directories even to root.
    let path = Path::new("/proc/pagestore-cannot-create-this");
    let err = SqliteBackedPagableStorage::try_new(path).unwrap_err();
    assert_eq!(io_path(&err), path);
}

#[test]
fn reopen_after_flush_sees_everything_in_every_mode_and_across_modes() {
    let dir = tempfile::tempdir().unwrap();
    let mut all = std::collections::HashMap::new();
    let modes = [
        Durability::Cache,
        Durability::Durable,
        Durability::Sync,
        Durability::Cache,
        Durability::Sync,
        Durability::Durable,
        Durability::Cache,
    ];
    for (i, durability) in modes.into_iter().enumerate() {
        let storage = SqliteOptions::default()
            .durability(durability)
            .open(dir.path())
            .unwrap();
        assert!(
            storage.open_report().is_clean(),
            "{:?}",
            storage.open_report()
        );
        contract::assert_reads_back(&storage, &all);
        all.extend(store_dag(&storage, 100 + i as u64, 200));
        storage.flush().unwrap();
        contract::assert_reads_back(&storage, &all);
        assert!(storage.verify().unwrap().is_ok());
    }
}

/// A store in `Cache` mode (the marker file and the repair at open are that mode's).
fn cache_mode(dir: &Path) -> anyhow::Result<SqliteBackedPagableStorage> {
    SqliteOptions::default()
        .durability(Durability::Cache)
        .open(dir)
}

/// Copies the store's directory while it is open: what a crash leaves behind in Cache mode
/// (the marker still there).
fn crash_copy(storage: &SqliteBackedPagableStorage, to: &Path) {
    storage.flush().unwrap();
    copy_dir(storage.path().parent().unwrap(), to);
    assert!(to.join("pagable.db.open").exists());
}

#[test]
fn an_unclean_shutdown_in_cache_mode_is_detected_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let storage = cache_mode(dir.path()).unwrap();
    let model = store_dag(&storage, 12, 500);
    let crashed = tempfile::tempdir().unwrap();
    crash_copy(&storage, crashed.path());
    drop(storage);
    assert!(
        !dir.path().join("pagable.db.open").exists(),
        "clean close removes the marker"
    );

    // Damage one record and delete a child, as a torn write might.
    let conn = Connection::open(crashed.path().join("pagable.db")).unwrap();
    let mut keys: Vec<_> = model.keys().copied().collect();
    keys.sort();
    let child = *keys
        .iter()
        .find(|k| model.values().any(|d| d.arcs.contains(k)))
        .unwrap();
    common::on_record(&conn, child, "DELETE FROM {table} WHERE {row}");

    // Roots on the deleted child, on a parent the repair deletes, and on an untouched leaf.
    let parent = *keys
        .iter()
        .find(|k| model[k].arcs.contains(&child))
        .unwrap();
    let leaf = *keys
        .iter()
        .find(|k| model[k].arcs.is_empty() && **k != child)
        .unwrap();
    for (name, key) in [("child", child), ("parent", parent), ("leaf", leaf)] {
        conn.execute(
            "INSERT INTO pagestore_roots (name, key) VALUES (?1, ?2)",
            rusqlite::params![name, &key.as_bytes()[..]],
        )
        .unwrap();
    }
    drop(conn);

    let storage = cache_mode(crashed.path()).unwrap();
    match storage.open_report() {
        OpenReport::Repaired {
            removed_dangling, ..
        } => assert!(*removed_dangling >= 1),
        other => panic!("expected a repair, got {other:?}"),
    }
    let report = storage.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    // The repair drops the roots whose node it deleted (or found missing).
    assert_eq!(storage.roots().unwrap(), vec![("leaf".to_string(), leaf)]);
    drop(storage);
    let storage = cache_mode(crashed.path()).unwrap();
    assert!(storage.open_report().is_clean());
}

#[test]
fn an_unclean_shutdown_with_repair_off_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let storage = cache_mode(dir.path()).unwrap();
    let model = store_dag(&storage, 13, 50);
    let crashed = tempfile::tempdir().unwrap();
    crash_copy(&storage, crashed.path());
    let storage = SqliteOptions::default()
        .repair_unclean(false)
        .open(crashed.path())
        .unwrap();
    assert!(matches!(storage.open_report(), OpenReport::Reset { .. }));
    let key = model.keys().next().unwrap();
    assert!(Error::is_not_found(
        &storage.fetch_data_blocking(key).unwrap_err()
    ));
}

#[test]
fn a_broken_file_after_an_unclean_shutdown_is_reset_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let storage = cache_mode(dir.path()).unwrap();
    store_dag(&storage, 14, 2000);
    let crashed = tempfile::tempdir().unwrap();
    crash_copy(&storage, crashed.path());
    // Garble the middle of the file.
    let db = crashed.path().join("pagable.db");
    let mut bytes = std::fs::read(&db).unwrap();
    let len = bytes.len();
    bytes[len / 2..len / 2 + 20000.min(len / 4)].fill(0xA5);
    bytes[100..200].fill(0x5A);
    std::fs::write(&db, bytes).unwrap();
    let storage = cache_mode(crashed.path()).unwrap();
    assert!(
        matches!(
            storage.open_report(),
            OpenReport::Reset { .. } | OpenReport::Repaired { .. }
        ),
        "{:?}",
        storage.open_report()
    );
    assert!(storage.verify().unwrap().is_ok());
}

#[test]
fn a_failed_commit_poisons_writes_until_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let storage = SqliteOptions::default()
        .durability(Durability::Durable)
        .open(dir.path())
        .unwrap();
    let before = store_dag(&storage, 15, 100);
    storage.flush().unwrap();
    // Sabotage from outside: the writer's next insert fails.
    storage.release_memory();
    let conn = Connection::open(storage.path()).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .unwrap();
    conn.execute_batch("ALTER TABLE pagable_data RENAME TO elsewhere")
        .unwrap();
    let doomed = storage.store_data(node(999, 10, vec![])).unwrap();
    let err = storage.flush().unwrap_err();
    assert!(
        matches!(err.downcast_ref::<Error>(), Some(Error::Poisoned { .. })),
        "{err:#}"
    );
    // Sticky, for stores and flushes alike.
    let err = storage.store_data(node(1000, 10, vec![])).unwrap_err();
    assert!(
        matches!(err.downcast_ref::<Error>(), Some(Error::Poisoned { .. })),
        "{err:#}"
    );
    assert!(storage.flush().is_err());
    // What was stored this session is still readable from memory.
    assert_eq!(
        *storage.fetch_data_blocking(&doomed).unwrap(),
        node(999, 10, vec![])
    );
    drop(storage);
    conn.execute_batch("ALTER TABLE elsewhere RENAME TO pagable_data")
        .unwrap();
    drop(conn);
    let storage = SqliteOptions::default()
        .durability(Durability::Durable)
        .open(dir.path())
        .unwrap();
    contract::assert_reads_back(&storage, &before);
    storage.store_data(node(1001, 10, vec![])).unwrap();
    storage.flush().unwrap();
}

#[test]
fn readers_see_no_errors_while_the_writer_commits_big_batches() {
    for durability in [Durability::Cache, Durability::Durable] {
        let dir = tempfile::tempdir().unwrap();
        let storage = SqliteOptions::default()
            .durability(durability)
            .write_buffer_rows(8192)
            .open(dir.path())
            .unwrap();
        let base: Vec<_> = (0..2000)
            .map(|i| storage.store_data(node(i, 100, vec![])).unwrap())
            .collect();
        storage.flush().unwrap();
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            for t in 0..2 {
                let (storage, base, done) = (&storage, &base, &done);
                s.spawn(move || {
                    let mut i = t;
                    while !done.load(Ordering::Relaxed) {
                        let key = &base[i % base.len()];
                        storage
                            .fetch_data_blocking(key)
                            .unwrap_or_else(|e| panic!("{e:#}"));
                        i += 7;
                    }
                });
            }
            for i in 0..30_000u64 {
                storage
                    .store_data(node(10_000 + i, 200, vec![base[i as usize % 2000]]))
                    .unwrap();
            }
            storage.flush().unwrap();
            done.store(true, Ordering::Relaxed);
        });
        assert!(storage.verify().unwrap().is_ok());
    }
}

#[test]
fn verify_reports_corrupt_records_and_missing_children() {
    let dir = tempfile::tempdir().unwrap();
    let storage = SqliteBackedPagableStorage::try_new(dir.path()).unwrap();
    let leaf = storage.store_data(node(1, 50, vec![])).unwrap();
    let parent = storage.store_data(node(2, 50, vec![leaf])).unwrap();
    let other = storage.store_data(node(3, 50, vec![])).unwrap();
    storage.flush().unwrap();
    storage.release_memory();
    let conn = Connection::open(storage.path()).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .unwrap();
    common::on_record(&conn, leaf, "DELETE FROM {table} WHERE {row}");
    common::on_record(
        &conn,
        other,
        "UPDATE {table} SET value = zeroblob(5) WHERE {row}",
    );
    drop(conn);
    let report = storage.verify().unwrap();
    assert!(!report.is_ok());
    assert_eq!(report.records, 2);
    assert_eq!(report.corrupt, [other]);
    assert_eq!(report.missing_children, [(parent, leaf)]);
    let err = storage.fetch_data_blocking(&other).unwrap_err();
    assert!(Error::is_corrupt(&err), "{err:#}");
}

#[test]
fn verify_on_read_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let storage = SqliteOptions::default()
        .verify_on_read(false)
        .open(dir.path())
        .unwrap();
    let key = storage.store_data(node(5, 40, vec![])).unwrap();
    common::damage_stored_record(&storage, key, 20, 0xff);
    // Not re-hashed: the flipped byte comes back (the caller chose speed).
    let got = storage.fetch_data_blocking(&key).unwrap();
    assert_ne!(*got, node(5, 40, vec![]));
    assert!(!storage.verify().unwrap().is_ok(), "verify() still hashes");
}

#[test]
fn back_pressure_bounds_the_buffer_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let storage = SqliteOptions::default()
        .write_buffer_rows(16)
        .write_buffer_bytes(10_000)
        .open(dir.path())
        .unwrap();
    let model = store_dag(&storage, 16, 3000);
    contract::assert_reads_back(&storage, &model);
    storage.flush().unwrap();
    assert!(storage.verify().unwrap().is_ok());
    // One node bigger than the whole buffer is still accepted.
    let big = node(77, 50_000, vec![]);
    let key = storage.store_data(big.clone()).unwrap();
    assert_eq!(*storage.fetch_data_blocking(&key).unwrap(), big);
}

#[test]
fn a_second_store_on_the_same_directory_is_refused_until_the_first_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let first = SqliteBackedPagableStorage::try_new(dir.path()).unwrap();
    let key = first.store_data(node(1, 10, vec![])).unwrap();
    for durability in [Durability::Cache, Durability::Durable] {
        let err = SqliteOptions::default()
            .durability(durability)
            .open(dir.path())
            .unwrap_err();
        assert_eq!(io_path(&err), dir.path().join("pagable.db"), "{err:#}");
        assert!(format!("{err:#}").contains("another"), "{err:#}");
    }
    // The refused opens did not touch the live store.
    assert!(first.open_report().is_clean());
    first.flush().unwrap();
    drop(first);
    let second = SqliteBackedPagableStorage::try_new(dir.path()).unwrap();
    assert!(
        second.open_report().is_clean(),
        "{:?}",
        second.open_report()
    );
    assert_eq!(
        *second.fetch_data_blocking(&key).unwrap(),
        node(1, 10, vec![])
    );
}

#[test]
fn verify_reports_a_row_whose_key_is_an_empty_blob() {
    let dir = tempfile::tempdir().unwrap();
    let storage = SqliteBackedPagableStorage::try_new(dir.path()).unwrap();
    storage.store_data(node(9, 40, vec![])).unwrap();
    storage.flush().unwrap();
    storage.release_memory();
    let conn = Connection::open(storage.path()).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .unwrap();
    // The scan walks keys greater than x'', so this row is the one it can never visit.
    let table = common::keyed_table(&conn);
    conn.execute(
        &format!("INSERT INTO {table} (key, value) VALUES (x'', x'00')"),
        [],
    )
    .unwrap();
    drop(conn);
    let report = storage.verify().unwrap();
    assert_eq!(report.malformed_keys, 1, "{report:?}");
    assert!(!report.is_ok());
}

/// Runs `f` on its own thread and fails the test if it takes longer than `limit`: turns a
/// hang (or a pass that would take hours) into a failure.
fn within<T: Send + 'static>(
    limit: std::time::Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|e| panic!("{what} did not finish within {limit:?} ({e})"))
}

#[test]
fn a_lock_file_opened_before_a_close_cannot_let_a_second_store_in() {
    let dir = tempfile::tempdir().unwrap();
    let first = SqliteBackedPagableStorage::try_new(dir.path()).unwrap();
    // What another process racing the close holds: the lock file, opened while it was held.
    let late = Connection::open(dir.path().join("pagable.db.lock")).unwrap();
    drop(first);
    // Takes the lock the way a store does. Were the file unlinked at close, this would lock
    // an inode no later opener sees, and the open below would succeed beside it.
    late.busy_timeout(std::time::Duration::ZERO).unwrap();
    late.execute_batch("PRAGMA locking_mode = EXCLUSIVE; BEGIN EXCLUSIVE; COMMIT;")
        .unwrap();
    let err = SqliteBackedPagableStorage::try_new(dir.path()).unwrap_err();
    assert_eq!(io_path(&err), dir.path().join("pagable.db"), "{err:#}");
    assert!(format!("{err:#}").contains("another"), "{err:#}");
    drop(late);
    let second = SqliteBackedPagableStorage::try_new(dir.path()).unwrap();
    assert!(second.open_report().is_clean());
}

/// The longest value SQLite itself stores in a `pagable_data` table of `layout` under a
/// length limit of `limit` bytes, found by asking it (independently of pagestore's own
/// arithmetic).
fn longest_value_sqlite_stores(layout: TableLayout, limit: usize) -> usize {
    let conn = Connection::open_in_memory().unwrap();
    let without_rowid = if layout == TableLayout::WithoutRowid {
        " WITHOUT ROWID"
    } else {
        ""
    };
    conn.execute_batch(&format!(
        "CREATE TABLE pagable_data (key BLOB PRIMARY KEY, value BLOB NOT NULL){without_rowid}"
    ))
    .unwrap();
    conn.set_limit(
        rusqlite::limits::Limit::SQLITE_LIMIT_LENGTH,
        i32::try_from(limit).unwrap(),
    )
    .unwrap();
    let fits = |len: usize| {
        let result = conn.execute(
            "INSERT INTO pagable_data (key, value) VALUES (?1, ?2)",
            rusqlite::params![[7u8; 16], vec![0u8; len]],
        );
        conn.execute("DELETE FROM pagable_data", []).unwrap();
        match result {
            Ok(_) => true,
            Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::TooBig) => false,
            Err(e) => panic!("unexpected SQLite error: {e}"),
        }
    };
    let longest = (0..=limit).rev().find(|&len| fits(len)).unwrap();
    assert!(!fits(longest + 1));
    longest
}

#[test]
fn a_record_over_the_length_limit_is_refused_by_put_and_the_store_keeps_working() {
    const LIMIT: usize = 4096;
    for layout in [TableLayout::Rowid, TableLayout::WithoutRowid] {
        // A node's record is its 16-byte header plus its data (no arcs here).
        let longest_data = longest_value_sqlite_stores(layout, LIMIT) - 16;
        let dir = tempfile::tempdir().unwrap();
        let storage = SqliteOptions::default()
            .table_layout(layout)
            .max_record_bytes(LIMIT)
            .open(dir.path())
            .unwrap();
        let largest = node(1, longest_data, vec![]);
        let key = storage.store_data(largest.clone()).unwrap();
        storage.flush().unwrap();
        storage.release_memory();
        assert_eq!(*storage.fetch_data_blocking(&key).unwrap(), largest);

        let too_large = node(2, longest_data + 1, vec![]);
        let err = storage.store_data(too_large.clone()).unwrap_err();
        match err.downcast_ref::<Error>() {
            Some(Error::TooLarge {
                key: refused,
                bytes,
                limit,
            }) => {
                assert_eq!(*refused, too_large.compute_key());
                assert_eq!((*bytes, *limit), (LIMIT as u64 + 1, LIMIT as u64));
            }
            other => panic!("{layout:?}: expected TooLarge, got {other:?} ({err:#})"),
        }
        let msg = err.to_string();
        for needle in ["4097", "4096", "max_record_bytes"] {
            assert!(msg.contains(needle), "{msg}");
        }

        // Nothing was poisoned: the store goes on storing, committing and reading.
        let after = node(3, 100, vec![key]);
        let after_key = storage.store_data(after.clone()).unwrap();
        storage.flush().unwrap();
        storage.release_memory();
        assert_eq!(*storage.fetch_data_blocking(&after_key).unwrap(), after);
        assert!(Error::is_not_found(
            &storage
                .fetch_data_blocking(&too_large.compute_key())
                .unwrap_err()
        ));
        assert!(storage.verify().unwrap().is_ok());
    }
}

#[test]
fn repairing_a_long_chain_after_a_crash_takes_one_pass() {
    const LEN: usize = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let storage = SqliteBackedPagableStorage::try_new(dir.path()).unwrap();
    let mut chain: Vec<pagestore::DataKey> = Vec::with_capacity(LEN);
    for i in 0..LEN {
        let arcs = chain.last().copied().into_iter().collect();
        chain.push(
            storage
                .store_data(PagableData {
                    data: (i as u64).to_le_bytes().to_vec(),
                    arcs,
                })
                .unwrap(),
        );
    }
    storage.flush().unwrap();
    drop(storage);
    // Damage the leaf, which every other node reaches, and leave the crash marker behind.
    let conn = Connection::open(dir.path().join("pagable.db")).unwrap();
    let changed = common::on_record(
        &conn,
        chain[0],
        "UPDATE {table} SET value = x'00' WHERE {row}",
    );
    assert_eq!(changed, 1);
    drop(conn);
    std::fs::write(dir.path().join("pagable.db.open"), b"crashed").unwrap();

    let path = dir.path().to_path_buf();
    let storage = within(
        std::time::Duration::from_secs(120),
        "the repair of a 20,000-long chain",
        move || {
            SqliteOptions::default()
                .durability(Durability::Cache)
                .open(&path)
        },
    )
    .unwrap();
    assert_eq!(
        storage.open_report(),
        &OpenReport::Repaired {
            records: 0,
            removed_corrupt: 1,
            removed_dangling: LEN as u64 - 1,
        }
    );
    let report = storage.verify().unwrap();
    assert!(report.is_ok() && report.records == 0, "{report:?}");
    assert!(Error::is_not_found(
        &storage.fetch_data_blocking(&chain[LEN - 1]).unwrap_err()
    ));
    let fresh = node(5, 64, vec![]);
    let key = storage.store_data(fresh.clone()).unwrap();
    storage.flush().unwrap();
    assert_eq!(*storage.fetch_data_blocking(&key).unwrap(), fresh);
}

/// Contract item 8 as SQLite keeps it: a root set right after its node, with no flush in
/// between, is never committed before the nodes stored before it. A raw connection watches
/// the committed state while a deep chain is stored (each node pointing to the one before,
/// named root `tip` right after it is stored, over many small batches): in every snapshot,
/// the node `tip` names and every node below it are committed.
#[test]
fn a_root_is_never_committed_before_the_nodes_stored_before_it() {
    const CHAIN: usize = 3_000;
    let dir = tempfile::tempdir().unwrap();
    let storage = SqliteOptions::default()
        .durability(Durability::Durable)
        .write_buffer_rows(32)
        .open(dir.path())
        .unwrap();
    let db = storage.path().to_path_buf();
    let done = AtomicBool::new(false);
    let keys: Vec<DataKey> = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut conn = Connection::open(&db).unwrap();
            conn.busy_timeout(std::time::Duration::from_secs(30))
                .unwrap();
            let mut snapshots = 0u64;
            let mut seen_roots = 0u64;
            loop {
                let finished = done.load(Ordering::Acquire);
                let tx = conn.transaction().unwrap();
                let root: Option<Vec<u8>> = tx
                    .query_row(
                        "SELECT key FROM pagestore_roots WHERE name = 'tip'",
                        [],
                        |row| row.get(0),
                    )
                    .ok();
                let committed = common::stored_keys(&tx);
                drop(tx);
                snapshots += 1;
                if let Some(root) = root {
                    seen_roots += 1;
                    assert!(
                        committed.contains(&root),
                        "snapshot {snapshot}: root tip names a node not yet committed",
                        snapshot = snapshots
                    );
                }
                if finished {
                    return (snapshots, seen_roots, committed);
                }
            }
        });
        let mut keys = Vec::with_capacity(CHAIN);
        for i in 0..CHAIN {
            let arcs = keys.last().copied().into_iter().collect();
            let key = storage
                .store_data(node(70_000 + i as u64, 64, arcs))
                .unwrap();
            storage.set_root("tip", key).unwrap();
            keys.push(key);
        }
        storage.flush().unwrap();
        done.store(true, Ordering::Release);
        let (snapshots, seen_roots, committed) = watcher.join().unwrap();
        assert!(snapshots > 1 && seen_roots >= 1, "{snapshots} snapshots");
        assert_eq!(
            committed.len(),
            CHAIN,
            "the final snapshot has the whole chain"
        );
        keys
    });
    // The chain's order makes "the root's node is committed" mean "its whole graph is", as
    // children are committed first; verify checks that over the whole file.
    let tip = *keys.last().unwrap();
    assert_eq!(storage.root("tip").unwrap(), Some(tip));
    let report = storage.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    drop(storage);
    let storage = SqliteBackedPagableStorage::try_new(dir.path()).unwrap();
    assert_eq!(storage.roots().unwrap(), vec![("tip".to_string(), tip)]);
    let mut next = Some(tip);
    let mut walked = 0;
    while let Some(key) = next {
        next = storage
            .fetch_data_blocking(&key)
            .unwrap()
            .arcs
            .first()
            .copied();
        walked += 1;
    }
    assert_eq!(walked, CHAIN, "the root reaches the whole chain");
}

#[test]
fn verify_reports_its_progress_up_to_the_record_count() {
    let dir = tempfile::tempdir().unwrap();
    let storage = SqliteBackedPagableStorage::try_new(dir.path()).unwrap();
    let model = store_dag(&storage, 77, 10_000);
    storage.flush().unwrap();
    let mut seen = Vec::new();
    let report = storage
        .verify_with_progress(|checked| seen.push(checked))
        .unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.records, model.len() as u64);
    assert!(seen.len() > 1, "several steps for 10,000 records: {seen:?}");
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert_eq!(seen.last().copied(), Some(model.len() as u64));
}
