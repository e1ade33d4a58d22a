//! `SqliteOptions::read_only`: reading a store that a writer has open, or that sits on a
//! directory this process cannot write in, without writing anything.

#![cfg(all(feature = "sqlite", unix))]

mod common;
mod contract;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use pagestore::{
    DataKey, Durability, Error, NodeStore, OpenReport, PagableData, PagableStorage, SqliteOptions,
    TableLayout,
};

fn node(i: u32, arcs: Vec<DataKey>) -> PagableData {
    PagableData {
        data: format!("node {i}").into_bytes(),
        arcs,
    }
}

fn read_only() -> SqliteOptions {
    SqliteOptions::default().read_only().readers(2)
}

/// Every file of `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(entry.path()).unwrap())
        })
        .collect()
}

/// Asserts that `err` is the typed refusal of a write to a read-only store.
fn assert_read_only_refusal(err: &anyhow::Error, db: &Path) {
    match err.downcast_ref::<Error>() {
        Some(Error::ReadOnly { path }) => assert_eq!(path, db),
        other => panic!("not Error::ReadOnly: {other:?} ({err:#})"),
    }
    assert!(err.to_string().contains("opened read-only"), "{err}");
}

/// A read-only store beside a live writer store in the same process: it sees what the writer
/// flushed, then what the writer flushes later (each read is a new read transaction), and
/// refuses writes with the typed error.
#[test]
fn reads_beside_a_writer_in_this_process() {
    for durability in [Durability::Durable, Durability::Sync, Durability::Cache] {
        let dir = tempfile::tempdir().unwrap();
        let writer = SqliteOptions::default()
            .durability(durability)
            .open(dir.path())
            .unwrap();
        let mut keys = Vec::new();
        for i in 0..200 {
            let arcs = keys.last().copied().into_iter().collect();
            keys.push(writer.store_data(node(i, arcs)).unwrap());
        }
        writer.flush().unwrap();

        let reader = read_only().open(dir.path()).unwrap();
        assert!(reader.is_read_only());
        let expected_report = if durability == Durability::Cache {
            // The live Cache-mode writer's marker: reported, nothing repaired.
            OpenReport::UncleanNotChecked
        } else {
            OpenReport::Clean
        };
        assert_eq!(reader.open_report(), &expected_report, "{durability:?}");
        for (i, key) in keys.iter().enumerate() {
            assert_eq!(
                reader.fetch_data_blocking(key).unwrap().data,
                node(i as u32, vec![]).data,
                "{durability:?}"
            );
        }
        assert!(reader.verify().unwrap().is_ok(), "{durability:?}");

        // Later writes, flushed by the writer, reach the reader without a reopen.
        let later: Vec<DataKey> = (1000..1100)
            .map(|i| writer.store_data(node(i, vec![keys[0]])).unwrap())
            .collect();
        writer.flush().unwrap();
        for key in &later {
            assert!(reader.fetch_data_blocking(key).is_ok(), "{durability:?}");
        }
        let report = reader.verify().unwrap();
        assert_eq!(report.records, 300, "{durability:?}");

        // Writes are refused, with the typed error; flush has nothing to do.
        let err = reader.store_data(node(5000, vec![])).unwrap_err();
        assert_read_only_refusal(&err, &dir.path().join("pagable.db"));
        reader.flush().unwrap();
        drop(reader);

        // The writer carries on.
        let after = writer.store_data(node(6000, vec![])).unwrap();
        writer.flush().unwrap();
        drop(writer);
        let reopened = read_only().open(dir.path()).unwrap();
        assert_eq!(reopened.open_report(), &OpenReport::Clean, "{durability:?}");
        assert!(reopened.fetch_data_blocking(&after).is_ok());
    }
}

/// The bare node store: `put` refused, `scan` sees every record, `contains` works.
#[test]
fn node_store_scan_and_put() {
    let dir = tempfile::tempdir().unwrap();
    let writer = SqliteOptions::default()
        .durability(Durability::Durable)
        .open_node_store(dir.path())
        .unwrap();
    let keys: Vec<DataKey> = (0..50)
        .map(|i| writer.put(node(i, vec![])).unwrap())
        .collect();
    writer.flush().unwrap();
    let reader = read_only().open_node_store(dir.path()).unwrap();
    let mut seen = 0;
    reader
        .scan(&mut |key, node| {
            assert!(keys.contains(&key));
            node?;
            seen += 1;
            Ok(())
        })
        .unwrap();
    assert_eq!(seen, 50);
    assert!(reader.contains(&keys[7]).unwrap());
    let err = reader.put(node(99, vec![])).unwrap_err();
    assert_read_only_refusal(&err, reader.path());
    assert!(!reader.contains(&node(99, vec![]).compute_key()).unwrap());
}

/// A writer in another process: the read-only store in this one reads what it flushed.
#[test]
fn reads_beside_a_writer_in_a_child_process() {
    if let Ok(dir) = std::env::var(WRITER_CHILD_ENV) {
        // The child: write, flush, say so, and keep the store open until stdin closes.
        let writer = SqliteOptions::default()
            .durability(Durability::Durable)
            .open(&dir)
            .unwrap();
        for i in 0..100 {
            writer.store_data(node(i, vec![])).unwrap();
        }
        writer.flush().unwrap();
        println!("CHILD-FLUSHED");
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).unwrap();
        return;
    }
    use std::io::{BufRead, BufReader, Write};
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "reads_beside_a_writer_in_a_child_process",
            "--nocapture",
        ])
        .env(WRITER_CHILD_ENV, dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("CHILD-FLUSHED") {
        line.clear();
        assert_ne!(
            stdout.read_line(&mut line).unwrap(),
            0,
            "the child ended early"
        );
    }
    // The child holds the directory lock: a second writer is refused, a reader is not.
    assert!(SqliteOptions::default().open(dir.path()).is_err());
    let reader = read_only().open(dir.path()).unwrap();
    for i in 0..100 {
        let key = node(i, vec![]).compute_key();
        assert_eq!(
            reader.fetch_data_blocking(&key).unwrap().data,
            node(i, vec![]).data
        );
    }
    assert_eq!(reader.verify().unwrap().records, 100);
    writeln!(child.stdin.take().unwrap()).unwrap();
    assert!(child.wait().unwrap().success());
}

const WRITER_CHILD_ENV: &str = "PAGESTORE_READ_ONLY_WRITER_CHILD";

/// A missing store is an error, and a read-only open creates nothing.
#[test]
fn a_missing_store_is_not_created() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("absent");
    let err = read_only().open(&dir).map(|_| ()).unwrap_err();
    match err.downcast_ref::<Error>() {
        Some(Error::Io { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound, "{err:#}")
        }
        other => panic!("{other:?}"),
    }
    assert!(!dir.exists());
}

/// An unclean Cache-mode shutdown (the marker left behind) is reported, not repaired: the
/// directory is left exactly as it was, and the next read-write open repairs it.
#[test]
fn an_unclean_marker_is_reported_not_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let key = {
        let store = SqliteOptions::default()
            .durability(Durability::Cache)
            .open(dir.path())
            .unwrap();
        store.store_data(node(1, vec![])).unwrap()
    };
    // What a crash leaves: the marker.
    std::fs::write(dir.path().join("pagable.db.open"), b"crashed").unwrap();
    let before = snapshot(dir.path());
    {
        let reader = read_only().open(dir.path()).unwrap();
        assert_eq!(reader.open_report(), &OpenReport::UncleanNotChecked);
        assert!(!reader.open_report().is_clean());
        assert!(reader.fetch_data_blocking(&key).is_ok());
        assert!(reader.verify().unwrap().is_ok());
    }
    assert_eq!(
        snapshot(dir.path()),
        before,
        "a read-only open changed the directory"
    );
    let store = SqliteOptions::default().open(dir.path()).unwrap();
    assert!(matches!(store.open_report(), OpenReport::Repaired { .. }));
}

/// The reference implementation's database opens read-only, in place, and every file of its
/// directory is byte for byte the same afterwards.
#[test]
fn the_reference_fixture_opens_read_only_unmodified() {
    let (dir, entries) = contract::reference_fixture();
    let before = snapshot(&dir);
    {
        let store = read_only().open(&dir).unwrap();
        assert_eq!(store.open_report(), &OpenReport::Clean);
        assert_eq!(store.table_layout(), TableLayout::WithoutRowid);
        for (key, data) in &entries {
            assert_eq!(*store.fetch_data_blocking(key).unwrap(), *data);
        }
        let report = store.verify().unwrap();
        assert!(report.is_ok(), "{report:?}");
        assert_eq!(report.records, 600);
        store.flush().unwrap();
        // The reference's database has no roots table: no roots, and none can be set.
        use pagestore::NodeStore;
        assert_eq!(store.roots().unwrap(), vec![]);
        assert_eq!(store.root("main").unwrap(), None);
        let refused = store.set_root("main", entries[0].0).unwrap_err();
        assert_read_only_refusal(&refused, &dir.join("pagable.db"));
        let refused = store.remove_root("main").unwrap_err();
        assert_read_only_refusal(&refused, &dir.join("pagable.db"));
    }
    assert!(
        snapshot(&dir) == before,
        "a read-only open modified the fixture"
    );
}

const READ_ONLY_DIR_CHILD_ENV: &str = "PAGESTORE_READ_ONLY_DIR_CHILD";

/// A store on a directory without write permission: the normal open says so and points to
/// `read_only`; the read-only open reads it all and changes nothing. As root (which ignores
/// permission bits) the checks run in a child dropped to uid 65534, or are skipped loudly.
#[test]
fn a_read_only_directory() {
    common::with_permissions_in_force(
        "a_read_only_directory",
        "read_only_dir_child",
        READ_ONLY_DIR_CHILD_ENV,
        "a read-only directory",
        read_only_dir_checks,
    );
}

/// Child of `a_read_only_directory` when the tests run as root: runs unprivileged.
#[test]
fn read_only_dir_child() {
    common::unprivileged_child(READ_ONLY_DIR_CHILD_ENV, read_only_dir_checks);
}

fn read_only_dir_checks(scratch: &Path) {
    use std::os::unix::fs::PermissionsExt;
    // Cache leaves a rollback-journal database; Durable a WAL one (whose WAL files are
    // gone after a clean close, so it is read as immutable).
    for durability in [Durability::Cache, Durability::Durable] {
        let dir = scratch.join(format!("{durability:?}"));
        let keys: Vec<DataKey> = {
            let store = SqliteOptions::default()
                .durability(durability)
                .open(&dir)
                .unwrap();
            (0..100)
                .map(|i| store.store_data(node(i, vec![])).unwrap())
                .collect()
        };
        let set_mode = |mode| {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o666))
                    .unwrap();
            }
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        set_mode(0o555);
        let before = snapshot(&dir);

        let err = SqliteOptions::default()
            .durability(durability)
            .open(&dir)
            .map(|_| ())
            .unwrap_err();
        eprintln!("normal open of a read-only directory ({durability:?}): {err:#}");
        match err.downcast_ref::<Error>() {
            Some(Error::NotWritable { path, source }) => {
                assert_eq!(path, &dir);
                assert_eq!(source.kind(), std::io::ErrorKind::PermissionDenied);
            }
            other => panic!("not Error::NotWritable: {other:?} ({err:#})"),
        }
        let msg = err.to_string();
        for part in ["not writable", "permission denied", "read_only()"] {
            assert!(msg.contains(part), "{part:?} missing: {msg}");
        }

        {
            let reader = read_only().open(&dir).unwrap();
            assert_eq!(reader.open_report(), &OpenReport::Clean);
            for key in &keys {
                assert!(reader.fetch_data_blocking(key).is_ok(), "{durability:?}");
            }
            let report = reader.verify().unwrap();
            assert!(report.is_ok() && report.records == 100, "{report:?}");
            let err = reader.store_data(node(500, vec![])).unwrap_err();
            assert_read_only_refusal(&err, &dir.join("pagable.db"));
            reader.flush().unwrap();
        }
        assert!(
            snapshot(&dir) == before,
            "{durability:?}: the directory changed"
        );
        set_mode(0o755);
    }
}

/// A closed store, in each durability's journal mode (a WAL database after Durable), in a
/// writable directory: a read-only open creates and removes no file, and changes no file but
/// the WAL index (`pagable.db-shm`, where SQLite readers take their read marks).
#[test]
fn a_closed_store_is_left_unchanged() {
    for durability in [Durability::Cache, Durability::Durable] {
        let dir = tempfile::tempdir().unwrap();
        let key = {
            let store = SqliteOptions::default()
                .durability(durability)
                .open(dir.path())
                .unwrap();
            store.store_data(node(1, vec![])).unwrap()
        };
        let before = snapshot(dir.path());
        {
            let reader = read_only().open(dir.path()).unwrap();
            assert_eq!(reader.open_report(), &OpenReport::Clean);
            assert!(reader.fetch_data_blocking(&key).is_ok());
            assert!(reader.verify().unwrap().is_ok());
        }
        let after = snapshot(dir.path());
        assert_eq!(
            after.keys().collect::<Vec<_>>(),
            before.keys().collect::<Vec<_>>(),
            "{durability:?}"
        );
        for (name, bytes) in &before {
            if name.ends_with("-shm") {
                // The WAL index: SQLite's shared memory between the connections, where every
                // reader records which snapshot it reads. Not data.
                continue;
            }
            let changed: Vec<usize> = (0..bytes.len().max(after[name].len()))
                .filter(|&i| bytes.get(i) != after[name].get(i))
                .collect();
            assert!(
                changed.is_empty(),
                "{durability:?}: {name} changed at {changed:?}"
            );
        }
    }
}
