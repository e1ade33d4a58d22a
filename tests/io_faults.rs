//! I/O faults: a full disk, a read-only database, a missing parent directory, a file where the
//! directory should be, and a file that is not a database. Each must give a typed error that
//! names the path and the operation — never a panic, never damage to what was there — and a
//! failed commit must poison the store (a sticky `Poisoned` error until it is reopened) while
//! everything acknowledged before still reads back after reopening.
//!
//! The disk-full test needs a small tmpfs and so root with CAP_SYS_ADMIN; without them it
//! prints loudly that it was skipped, and the file-size-limit test (RLIMIT_FSIZE on a child
//! process, no privilege needed) still proves the poisoning. CI runs as root, so the
//! read-only test checks whether permissions are really enforced before relying on them.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Rng, effective_uid, permissions_are_bypassed};
use pagestore::{
    DataKey, Durability, Error, OpenReport, PagableData, PagableStorage,
    SqliteBackedPagableStorage, SqliteOptions,
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
#[ignore = "fails on sqlite d691ebe: a failed Cache-mode open leaves its unclean marker, so the \
            next open 'recovers' by resetting the user's file (data loss); run with --ignored"]
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
                    assert_eq!(
                        source.sqlite_error_code(),
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
#[ignore = "fails on sqlite 2a9fc6b: open accepts a pagable_data table without the key/value \
            columns (CREATE TABLE IF NOT EXISTS is a no-op); every fetch then fails with 'no such \
            column: key' and, in Cache mode, a later open may reset the file; run with --ignored"]
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
    let scratch = tempfile::tempdir().unwrap();
    if !permissions_are_bypassed(scratch.path()) {
        read_only_checks(scratch.path());
        return;
    }
    // Root ignores file permissions (CI runs as root): run the checks in a child process
    // that has dropped to the unprivileged uid 65534 ("nobody").
    let why_not = if effective_uid() != Some(0) {
        "this process bypasses permissions (CAP_DAC_OVERRIDE) but is not root".to_string()
    } else {
        let exe = std::env::current_exe().unwrap();
        match Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&exe)
            .args(["--exact", "read_only_child", "--nocapture"])
            .env(READ_ONLY_CHILD_ENV, "1")
            .output()
        {
            Ok(output) => {
                let stdout = String::from_utf8_lossy(&output.stdout);
                let stderr = String::from_utf8_lossy(&output.stderr);
                if stdout.contains("CHILD-OK") {
                    eprintln!("read-only database file, checked as uid 65534:\n{stderr}");
                    return;
                }
                assert!(
                    !stdout.contains("CHILD-STARTED"),
                    "the unprivileged child failed ({}):\n{stdout}\n{stderr}",
                    output.status
                );
                format!("setpriv could not start the child as uid 65534: {stderr}")
            }
            Err(e) => format!("cannot run setpriv: {e}"),
        }
    };
    eprintln!(
        "\n!!! SKIPPED a_read_only_database_file: this process (euid {:?}) ignores file \
         permissions and {why_not}, so a read-only file cannot be simulated. Run the tests as \
         an ordinary user to cover it. !!!\n",
        effective_uid()
    );
}

/// Child of `a_read_only_database_file` when the tests run as root: runs unprivileged.
#[test]
fn read_only_child() {
    if std::env::var(READ_ONLY_CHILD_ENV).is_err() {
        return; // Only meaningful as a child process.
    }
    println!("CHILD-STARTED");
    let scratch = tempfile::tempdir().expect("child: tempdir");
    assert!(
        !permissions_are_bypassed(scratch.path()),
        "the child still bypasses permissions (euid {:?})",
        effective_uid()
    );
    read_only_checks(scratch.path());
    println!("CHILD-OK");
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

// ------------------------------------------------------------------------------ disk full

/// Unmounts the tmpfs when the test ends, even by panic.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Mounts a tmpfs of `size` on `at`, or says why it cannot.
fn mount_tmpfs(at: &Path, size: &str) -> Result<Mount, String> {
    let output = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(at)
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if output.status.success() {
        Ok(Mount(at.to_path_buf()))
    } else {
        Err(format!(
            "mount -t tmpfs failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// What happened when a store ran out of space.
#[derive(Debug)]
struct Filled {
    acknowledged: Vec<(DataKey, PagableData)>,
    first_error: String,
}

/// Stores 64 KiB blobs, flushing every 4, until a write fails; then checks that the store
/// is poisoned: every later `store_data` and `flush` returns `Poisoned` (reads still work).
fn fill_until_failure(storage: &SqliteBackedPagableStorage, db: &Path, seed: u64) -> Filled {
    let durability = storage.durability();
    let mut rng = Rng::new(seed);
    let mut acknowledged = Vec::new();
    let mut batch = Vec::new();
    let first_error = 'fill: {
        for i in 0..10_000u64 {
            let node = blob(&mut rng, 64 * 1024);
            match storage.store_data(node.clone()) {
                Ok(key) => batch.push((key, node)),
                Err(err) => break 'fill err,
            }
            if i % 4 == 3 {
                match storage.flush() {
                    Ok(()) => acknowledged.append(&mut batch),
                    Err(err) => break 'fill err,
                }
            }
        }
        panic!("10,000 blobs of 64 KiB fit on a disk that should be full");
    };
    // The first failure is the real cause, typed and naming the database; a Poisoned error
    // is acceptable only if it carries that cause.
    match first_error.downcast_ref::<Error>() {
        Some(Error::Poisoned { cause }) => assert!(!cause.is_empty()),
        _ => {
            assert_names_path(&first_error, db);
        }
    }
    for attempt in 0..3 {
        let err = storage
            .store_data(blob(&mut rng, 10))
            .and_then(|_| storage.flush())
            .unwrap_err();
        assert!(
            matches!(err.downcast_ref::<Error>(), Some(Error::Poisoned { .. })),
            "attempt {attempt} after a failed commit is not Poisoned: {err:#}"
        );
    }
    for (key, node) in &acknowledged {
        match storage.fetch_data_blocking(key) {
            Ok(got) => assert!(*got == *node, "wrong bytes for {key} from a poisoned store"),
            // Without a journal SQLite cannot roll a failed commit back: the file may now be
            // damaged (the next open checks it). Reads must still never return wrong bytes.
            Err(err) if durability == Durability::Cache => assert!(
                matches!(
                    err.downcast_ref::<Error>(),
                    Some(Error::Corrupt { .. } | Error::Sqlite { .. })
                ),
                "untyped read error from a poisoned Cache store: {err:#}"
            ),
            Err(err) => panic!("a poisoned {durability:?} store must still read {key}: {err:#}"),
        }
    }
    Filled {
        acknowledged,
        first_error: format!("{first_error:#}"),
    }
}

/// After the store is reopened: what was acknowledged reads back (Durable, Sync), or the
/// store says it was reset or repaired (Cache); never wrong bytes.
fn check_after_reopen(
    storage: &SqliteBackedPagableStorage,
    filled: &Filled,
    durability: Durability,
) {
    let mut lost = 0;
    for (key, node) in &filled.acknowledged {
        match storage.fetch_data_blocking(key) {
            Ok(got) => assert!(*got == *node, "wrong bytes for {key} after reopening"),
            Err(err) if durability == Durability::Cache && Error::is_not_found(&err) => lost += 1,
            Err(err) => panic!("acknowledged {key} is gone after reopening: {err:#}"),
        }
    }
    if lost > 0 {
        assert!(
            matches!(
                storage.open_report(),
                OpenReport::Reset { .. } | OpenReport::Repaired { .. }
            ),
            "{lost} acknowledged nodes vanished but the open report is {:?}",
            storage.open_report()
        );
    }
    let report = storage.verify().expect("verify after reopening");
    assert!(report.corrupt.is_empty(), "{report:?}");
    eprintln!(
        "  {durability:?}: {} acknowledged before the failure, {lost} lost on reopen, open report {:?}",
        filled.acknowledged.len(),
        storage.open_report()
    );
}

#[test]
fn disk_full_on_a_small_tmpfs() {
    let scratch = tempfile::tempdir().unwrap();
    for (i, durability) in [Durability::Cache, Durability::Durable, Durability::Sync]
        .into_iter()
        .enumerate()
    {
        let at = scratch.path().join(format!("tmpfs-{i}"));
        std::fs::create_dir(&at).unwrap();
        let _mount = match mount_tmpfs(&at, "2m") {
            Ok(mount) => mount,
            Err(why) => {
                eprintln!(
                    "\n!!! SKIPPED disk_full_on_a_small_tmpfs: {why}. It needs root with \
                     CAP_SYS_ADMIN; file_size_limit_poisons_the_store covers the same path. !!!\n"
                );
                return;
            }
        };
        let dir = at.join("store");
        // mmap off: this test runs in-process, and with memory-mapped I/O a page fault on a
        // full tmpfs is a SIGBUS that would kill the whole test binary (sqlite d691ebe did, in
        // Cache mode). The defaults are checked in a child process instead:
        // disk_full_with_default_options_does_not_kill_the_process.
        let open = |dir: &Path| {
            SqliteOptions::default()
                .durability(durability)
                .mmap_size_bytes(0)
                .open(dir)
        };
        let storage = open(&dir).expect("open on the tmpfs");
        let db = storage.path().to_path_buf();
        let filled = fill_until_failure(&storage, &db, 11 + i as u64);
        eprintln!("disk full, {durability:?}: {}", filled.first_error);
        drop(storage);
        let storage = open(&dir).expect("reopen on the full tmpfs");
        check_after_reopen(&storage, &filled, durability);
    }
}

// ----------------------------------------------------------------- file-size limit (child)

const FSIZE_CHILD_ENV: &str = "PAGESTORE_FSIZE_CHILD";

/// Runs in a child process whose file size is capped by RLIMIT_FSIZE (with SIGXFSZ ignored,
/// so writes past it fail with EFBIG): fills the store, checks it is poisoned, and prints the
/// acknowledged keys for the parent to check after reopening.
#[test]
fn fsize_child() {
    let Ok(spec) = std::env::var(FSIZE_CHILD_ENV) else {
        return; // Only meaningful as the child of file_size_limit_poisons_the_store.
    };
    let (mode, dir) = spec.split_once(' ').expect("child spec");
    let durability = match mode {
        "Cache" => Durability::Cache,
        "Durable" => Durability::Durable,
        _ => Durability::Sync,
    };
    let storage = open(Path::new(dir), durability).expect("child: open");
    let db = storage.path().to_path_buf();
    let filled = fill_until_failure(&storage, &db, 99);
    for (key, _) in &filled.acknowledged {
        println!("ACKED {key}");
    }
    println!("FIRST-ERROR {}", filled.first_error.replace('\n', " "));
    println!("CHILD-OK");
}

#[test]
fn file_size_limit_poisons_the_store() {
    let scratch = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    for durability in [Durability::Cache, Durability::Durable, Durability::Sync] {
        let dir = scratch.path().join(format!("{durability:?}"));
        // 4096 blocks of 512 bytes: 2 MiB per file.
        let output = Command::new("sh")
            .arg("-c")
            .arg("trap '' XFSZ; ulimit -f 4096 && exec \"$0\" --exact fsize_child --nocapture --test-threads 1")
            .arg(&exe)
            .env(FSIZE_CHILD_ENV, format!("{durability:?} {}", dir.display()))
            .output()
            .expect("run the child");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("CHILD-OK"),
            "the child failed ({}):\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let acked: Vec<DataKey> = stdout
            .lines()
            // libtest may print "test fsize_child ... " on the same line as the first one.
            .filter_map(|l| l.split_once("ACKED ").map(|(_, key)| key))
            .map(|k| k.parse().expect("acked key"))
            .collect();
        let first_error = stdout
            .lines()
            .find_map(|l| l.split_once("FIRST-ERROR ").map(|(_, e)| e))
            .unwrap_or_default();
        eprintln!("file size limit, {durability:?}: {first_error}");
        // Regenerate the acknowledged content: same seed, same order.
        let mut rng = Rng::new(99);
        let acknowledged: Vec<(DataKey, PagableData)> = (0..acked.len())
            .map(|i| {
                let node = blob(&mut rng, 64 * 1024);
                assert_eq!(node.compute_key(), acked[i], "regenerated workload differs");
                (acked[i], node)
            })
            .collect();
        let storage = open(&dir, durability).expect("reopen without the limit");
        let filled = Filled {
            acknowledged,
            first_error: first_error.to_string(),
        };
        check_after_reopen(&storage, &filled, durability);
        // Without the limit the store works again.
        let key = storage.store_data(blob(&mut rng, 100)).unwrap();
        storage.flush().unwrap();
        assert!(storage.fetch_data_blocking(&key).is_ok());
    }
}

// ------------------------------------------------- disk full with default options (child)

const DEFAULT_OPTIONS_CHILD_ENV: &str = "PAGESTORE_DISK_FULL_CHILD";

/// Child of `disk_full_with_default_options_does_not_kill_the_process`: fills a store opened
/// with default options (memory-mapped reads on) until the disk is full.
#[test]
fn disk_full_default_options_child() {
    let Ok(spec) = std::env::var(DEFAULT_OPTIONS_CHILD_ENV) else {
        return; // Only meaningful as a child process.
    };
    let (mode, dir) = spec.split_once(' ').expect("child spec");
    let durability = match mode {
        "Cache" => Durability::Cache,
        "Durable" => Durability::Durable,
        _ => Durability::Sync,
    };
    let storage = open(Path::new(dir), durability).expect("child: open");
    let db = storage.path().to_path_buf();
    fill_until_failure(&storage, &db, 5);
    drop(storage);
    let storage = open(Path::new(dir), durability).expect("child: reopen");
    storage.verify().expect("child: verify");
    println!("CHILD-OK");
}

/// A full disk must be an error, not a crash. With memory-mapped reads (SQLite's mmap, on by
/// default), touching a mapped page that a full tmpfs cannot back raises SIGBUS, which kills
/// the whole process. Runs in a child so that such a crash fails this test only.
#[test]
fn disk_full_with_default_options_does_not_kill_the_process() {
    let scratch = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut failures = Vec::new();
    for (i, durability) in [Durability::Cache, Durability::Durable, Durability::Sync]
        .into_iter()
        .enumerate()
    {
        let at = scratch.path().join(format!("tmpfs-{i}"));
        std::fs::create_dir(&at).unwrap();
        let _mount = match mount_tmpfs(&at, "2m") {
            Ok(mount) => mount,
            Err(why) => {
                eprintln!(
                    "\n!!! SKIPPED disk_full_with_default_options_does_not_kill_the_process: \
                     {why}. It needs root with CAP_SYS_ADMIN. !!!\n"
                );
                return;
            }
        };
        let output = Command::new(&exe)
            .args(["--exact", "disk_full_default_options_child", "--nocapture"])
            .env(
                DEFAULT_OPTIONS_CHILD_ENV,
                format!("{durability:?} {}", at.join("store").display()),
            )
            .output()
            .expect("run the child");
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !(output.status.success() && stdout.contains("CHILD-OK")) {
            failures.push(format!(
                "{durability:?}: a full disk crashed or failed the process ({}):\n{stdout}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
