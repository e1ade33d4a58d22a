//! Write failures: a full disk (tmpfs), a file-size limit (RLIMIT_FSIZE) and the same full disk
//! with default options in a child process. A failed commit must poison the store (a sticky
//! `Poisoned` error until it is reopened), and what was acknowledged before must read back after
//! reopening (`Durable`, `Sync`; `Cache` may reset, but says so and never serves wrong bytes).

use std::path::Path;
use std::process::Command;

use std::sync::Arc;
use std::time::Duration;

use super::common::tmpfs::mount_tmpfs;
use super::common::{Rng, output_with_timeout, within};
use super::{assert_names_path, blob, open};
use pagestore::{
    DataKey, Durability, Error, OpenReport, PagableData, PagableStorage,
    SqliteBackedPagableStorage, SqliteOptions,
};
// ------------------------------------------------------------------------------ disk full

/// Longer than any healthy fill takes (well under a second): reaching it means a hang.
const HANG_TIMEOUT: Duration = Duration::from_secs(120);

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
            // Cache mode's journal is in memory only: should a failed commit not roll back,
            // the file may be damaged (the next open checks it). Reads must still never
            // return wrong bytes.
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

/// Runs `each` once per durability mode, each in a fresh 2 MiB tmpfs mounted under a scratch
/// directory (mounted for the duration of the call). Without CAP_SYS_ADMIN it says loudly that
/// `test` was skipped (adding `note`) and runs nothing.
fn on_small_tmpfs_per_mode(test: &str, note: &str, mut each: impl FnMut(usize, Durability, &Path)) {
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
                    "\n!!! SKIPPED {test}: {why}. It needs root with CAP_SYS_ADMIN. {note} !!!\n"
                );
                return;
            }
        };
        each(i, durability, &at);
    }
}

#[test]
fn disk_full_on_a_small_tmpfs() {
    on_small_tmpfs_per_mode(
        "disk_full_on_a_small_tmpfs",
        "file_size_limit_poisons_the_store covers the same path",
        |i, durability, at| {
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
            let storage = Arc::new(open(&dir).expect("open on the tmpfs"));
            let db = storage.path().to_path_buf();
            let filled = {
                let storage = Arc::clone(&storage);
                within(HANG_TIMEOUT, "filling the disk", move || {
                    fill_until_failure(&storage, &db, 11 + i as u64)
                })
            };
            eprintln!("disk full, {durability:?}: {}", filled.first_error);
            drop(storage);
            let storage = open(&dir).expect("reopen on the full tmpfs");
            check_after_reopen(&storage, &filled, durability);
        },
    );
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
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg("trap '' XFSZ; ulimit -f 4096 && exec \"$0\" --exact write_failures::fsize_child --nocapture --test-threads 1")
            .arg(&exe)
            .env(FSIZE_CHILD_ENV, format!("{durability:?} {}", dir.display()));
        let output = output_with_timeout(&mut command, HANG_TIMEOUT);
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
    let exe = std::env::current_exe().unwrap();
    let mut failures = Vec::new();
    on_small_tmpfs_per_mode(
        "disk_full_with_default_options_does_not_kill_the_process",
        "",
        |_, durability, at| {
            let mut command = Command::new(&exe);
            command
                .args([
                    "--exact",
                    "write_failures::disk_full_default_options_child",
                    "--nocapture",
                ])
                .env(
                    DEFAULT_OPTIONS_CHILD_ENV,
                    format!("{durability:?} {}", at.join("store").display()),
                );
            let output = output_with_timeout(&mut command, HANG_TIMEOUT);
            let stdout = String::from_utf8_lossy(&output.stdout);
            if !(output.status.success() && stdout.contains("CHILD-OK")) {
                failures.push(format!(
                    "{durability:?}: a full disk crashed or failed the process ({}):\n{stdout}\n{}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr)
                ));
            }
        },
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
