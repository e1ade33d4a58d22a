//! I/O faults: a full disk, a read-only database, a missing parent directory, a file where the
//! directory should be, and a file that is not a database. Each must give a typed error that
//! names the path and the operation — never a panic, never damage to what was there — and a
//! failed commit must poison the store (a sticky `Poisoned` error until it is reopened) while
//! everything acknowledged before still reads back after reopening.
//!
//! Paths and files here; full disks and other failed writes in `io_faults/write_failures.rs`.
//! The disk-full test needs a small tmpfs and so root with CAP_SYS_ADMIN; without them it
//! prints loudly that it was skipped, and the file-size-limit test (RLIMIT_FSIZE on a child
//! process, no privilege needed) still proves the poisoning. CI runs as root, so the
//! read-only test checks whether permissions are really enforced before relying on them, and
//! as root runs itself in a child dropped to uid 65534.

mod common;

use std::path::Path;

use common::Rng;
use pagestore::{
    Durability, Error, PagableData, PagableStorage, SqliteBackedPagableStorage, SqliteOptions,
};

fn open(dir: &Path, durability: Durability) -> anyhow::Result<SqliteBackedPagableStorage> {
    SqliteOptions::default().durability(durability).open(dir)
}

/// Asserts that `err` is pagestore's typed I/O or SQLite error about `path` (or the poison a
/// failed background write left, naming `path`), and returns its operation.
fn assert_names_path(err: &anyhow::Error, path: &Path) -> &'static str {
    let (named, operation) = match err.downcast_ref::<Error>() {
        Some(Error::Io {
            path, operation, ..
        }) => (path, *operation),
        Some(Error::Sqlite {
            path, operation, ..
        }) => (path, *operation),
        // A failure in the background writer reaches the caller as the store's poison; its
        // cause is the original error, which must name the file.
        Some(Error::Poisoned { cause }) => {
            assert!(
                cause.contains(&path.display().to_string()),
                "the poison's cause does not name {}: {err:#}",
                path.display()
            );
            return "(background write)";
        }
        other => {
            panic!("expected a typed Io or Sqlite error about {path:?}, got {other:?}: {err:#}")
        }
    };
    assert_eq!(named, path, "the error names another path: {err:#}");
    assert!(!operation.is_empty());
    let message = err.to_string();
    assert!(
        message.contains(&path.display().to_string()) && message.contains(operation),
        "the message does not name the path and the operation: {message}"
    );
    operation
}

fn blob(rng: &mut Rng, size: usize) -> PagableData {
    let mut data = vec![0u8; size];
    rng.fill(&mut data);
    PagableData {
        data,
        arcs: Vec::new(),
    }
}

// ------------------------------------------------------------------ paths that are wrong

#[test]
fn a_regular_file_where_the_directory_should_be() {
    let scratch = tempfile::tempdir().unwrap();
    let not_a_dir = scratch.path().join("store");
    std::fs::write(&not_a_dir, b"I am a file").unwrap();
    let err = SqliteBackedPagableStorage::try_new(&not_a_dir).unwrap_err();
    let operation = assert_names_path(&err, &not_a_dir);
    eprintln!("file instead of directory: {operation}: {err:#}");
    assert_eq!(
        std::fs::read(&not_a_dir).unwrap(),
        b"I am a file",
        "the file was touched"
    );
}

#[test]
fn a_parent_that_cannot_be_created() {
    // A path through a regular file: the directory cannot exist.
    let scratch = tempfile::tempdir().unwrap();
    std::fs::write(scratch.path().join("file"), b"x").unwrap();
    let dir = scratch.path().join("file/sub/store");
    let err = SqliteBackedPagableStorage::try_new(&dir).unwrap_err();
    let operation = assert_names_path(&err, &dir);
    eprintln!("parent is a file: {operation}: {err:#}");
}

#[test]
fn a_missing_parent_is_created() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("missing/parent/store");
    let storage = SqliteBackedPagableStorage::try_new(&dir).expect("open with missing parents");
    let key = storage
        .store_data(PagableData {
            data: b"x".to_vec(),
            arcs: vec![],
        })
        .unwrap();
    storage.flush().unwrap();
    assert_eq!(storage.fetch_data_blocking(&key).unwrap().data, b"x");
    assert_eq!(storage.path(), dir.join("pagable.db"));
}

#[test]
fn a_file_named_pagable_db_that_is_not_a_database_is_left_alone() {
    let mut rng = Rng::new(7);
    for (label, content) in [
        ("text", b"these are my notes, not a database\n".repeat(40)),
        ("random", {
            let mut bytes = vec![0u8; 20_000];
            rng.fill(&mut bytes);
            bytes
        }),
    ] {
        for durability in [Durability::Cache, Durability::Durable] {
            let scratch = tempfile::tempdir().unwrap();
            let db = scratch.path().join("pagable.db");
            std::fs::write(&db, &content).unwrap();
            // Twice: a failed open must not leave state that makes the next open "recover"
            // (reset) the user's file.
            for attempt in 0..2 {
                let err = open(scratch.path(), durability).unwrap_err();
                let operation = assert_names_path(&err, &db);
                if let Some(Error::Sqlite { source, .. }) = err.downcast_ref::<Error>() {
                    let sqlite = source
                        .downcast_ref::<rusqlite::Error>()
                        .expect("the source of a Sqlite error is SQLite's error");
                    assert_eq!(
                        sqlite.sqlite_error_code(),
                        Some(rusqlite::ErrorCode::NotADatabase),
                        "{err:#}"
                    );
                }
                eprintln!(
                    "{label} pagable.db, {durability:?}, attempt {attempt}: {operation}: {err:#}"
                );
                assert!(
                    std::fs::read(&db).unwrap() == content,
                    "{label} file named pagable.db was modified by a failed open ({durability:?})"
                );
            }
        }
    }
}

const READ_ONLY_CHILD_ENV: &str = "PAGESTORE_READ_ONLY_CHILD";

#[test]
fn another_programs_database_named_pagable_db_is_refused_at_open() {
    for durability in [Durability::Cache, Durability::Durable] {
        let scratch = tempfile::tempdir().unwrap();
        let db = scratch.path().join("pagable.db");
        {
            let conn = rusqlite::Connection::open(&db).unwrap();
            conn.execute_batch(
                "CREATE TABLE pagable_data (id INTEGER PRIMARY KEY, note TEXT);
                 INSERT INTO pagable_data (note) VALUES ('not pagestore''s');",
            )
            .unwrap();
        }
        let before = std::fs::read(&db).unwrap();
        for attempt in 0..2 {
            let err = open(scratch.path(), durability).map(|_| ()).unwrap_err();
            let operation = assert_names_path(&err, &db);
            eprintln!(
                "foreign pagable.db, {durability:?}, attempt {attempt}: {operation}: {err:#}"
            );
            assert!(
                std::fs::read(&db).unwrap() == before,
                "a failed open modified another program's database ({durability:?})"
            );
        }
    }
}

#[test]
fn a_read_only_database_file() {
    common::with_permissions_in_force(
        "a_read_only_database_file",
        "read_only_child",
        READ_ONLY_CHILD_ENV,
        "a read-only database file",
        read_only_checks,
    );
}

/// Child of `a_read_only_database_file` when the tests run as root: runs unprivileged.
#[test]
fn read_only_child() {
    common::unprivileged_child(READ_ONLY_CHILD_ENV, read_only_checks);
}

/// A database file without write permission: opening either fails with a typed error naming
/// the file and the operation, or opens and then fails writes that way; the data stays
/// readable and is intact once the permission is back.
fn read_only_checks(scratch: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let key = {
        let storage = SqliteBackedPagableStorage::try_new(scratch).unwrap();
        let key = storage
            .store_data(PagableData {
                data: b"kept".to_vec(),
                arcs: vec![],
            })
            .unwrap();
        storage.flush().unwrap();
        key
    };
    let db = scratch.join("pagable.db");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o444)).unwrap();
    for durability in [Durability::Cache, Durability::Durable] {
        match open(scratch, durability) {
            Err(err) => {
                let operation = assert_names_path(&err, &db);
                eprintln!("read-only pagable.db, {durability:?}: {operation}: {err:#}");
            }
            Ok(storage) => {
                // Opening read-only may be allowed; then reads work and a write fails typed.
                assert_eq!(storage.fetch_data_blocking(&key).unwrap().data, b"kept");
                let stored = storage.store_data(PagableData {
                    data: b"new".to_vec(),
                    arcs: vec![],
                });
                let err = stored.and_then(|_| storage.flush()).unwrap_err();
                let operation = assert_names_path(&err, &db);
                eprintln!(
                    "read-only pagable.db, {durability:?}: opened; a write: {operation}: {err:#}"
                );
                // Sticky: the store keeps refusing writes until reopened.
                let again = storage.flush().unwrap_err();
                assert!(
                    matches!(again.downcast_ref::<Error>(), Some(Error::Poisoned { .. })),
                    "after a failed write, flush is not Poisoned: {again:#}"
                );
                assert_eq!(storage.fetch_data_blocking(&key).unwrap().data, b"kept");
            }
        }
    }
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let storage = SqliteBackedPagableStorage::try_new(scratch).unwrap();
    assert_eq!(storage.fetch_data_blocking(&key).unwrap().data, b"kept");
}

#[path = "io_faults/write_failures.rs"]
mod write_failures;
