//! A paged-out `PagableArc` value can always be faulted back in by this process, also after a
//! commit failed and poisoned the store: what was committed reads from the file, and what was
//! stored but not committed (the failed batch, batches queued behind it, the batch being
//! filled) stays readable in memory until the store is dropped.
//!
//! Commits are made to fail the two ways `io_faults` does: a full disk (a 2 MiB tmpfs, which
//! needs root with CAP_SYS_ADMIN; without it the test says loudly that it was skipped) and a
//! file-size limit (RLIMIT_FSIZE on a child process, no privilege needed), each in every
//! durability mode.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::tmpfs::mount_tmpfs;
use common::{Rng, output_with_timeout, within};
use pagestore::{Durability, Error, PagableArc, PagableStorage, SqliteOptions};

/// Longer than any healthy run takes (about a second): reaching it means a hang.
const HANG_TIMEOUT: Duration = Duration::from_secs(120);

const VALUE_BYTES: usize = 48 << 10;
const PER_ROUND: usize = 8;

const MODES: [Durability; 3] = [Durability::Cache, Durability::Durable, Durability::Sync];

/// Value `n`: random bytes seeded by `n`, so each has its own key and a wrong one is caught.
fn value(n: usize) -> Vec<u8> {
    let mut out = vec![0u8; VALUE_BYTES];
    Rng::new(0xfa17 ^ n as u64).fill(&mut out);
    out
}

fn is_poisoned(err: &anyhow::Error) -> bool {
    matches!(err.downcast_ref::<Error>(), Some(Error::Poisoned { .. }))
}

/// How many of `keys` the database file holds, read through a connection of its own; `None`
/// if it cannot be read that way (then only the pins below say anything).
fn committed(db: &Path, keys: &[pagestore::DataKey]) -> Option<usize> {
    use rusqlite::OpenFlags;
    let conn = rusqlite::Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    // Any layout; a file SQLite cannot read this way panics in the helper: `None`.
    let stored =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| common::stored_keys(&conn)))
            .ok()?;
    let mut found = 0;
    for key in keys {
        found += usize::from(stored.contains(&key.as_bytes()[..]));
    }
    Some(found)
}

/// Creates values and pages them out (into a store whose write buffer seals a batch every
/// few values, so batches commit while the next ones fill) until a commit fails; then checks
/// that the store is poisoned and that every value, paged out or not, pins back with its
/// content, twice (the second time after a clean page-out of the faulted-in values). Returns
/// a summary line.
fn values_fault_back_in_after_a_failed_commit(options: SqliteOptions, dir: &Path) -> String {
    let storage = Arc::new(options.write_buffer_bytes(256 << 10).open(dir).unwrap());
    let durability = storage.durability();
    let mut handles: Vec<PagableArc<Vec<u8>>> = Vec::new();
    let failure = 'fill: {
        for round in 0..1000 {
            for _ in 0..PER_ROUND {
                handles.push(PagableArc::new(value(handles.len()), &storage));
            }
            // A failed commit reaches page-out as failed evictions (storing is refused) ...
            let report = storage.page_out_unpinned().unwrap();
            if report.failed > 0 {
                break 'fill format!("{} evictions failed", report.failed);
            }
            // ... or reaches a flush.
            if round % 2 == 1 {
                if let Err(err) = storage.flush() {
                    break 'fill format!("flush: {err:#}");
                }
            }
        }
        panic!("{durability:?}: 8,000 values of 48 KiB fit on a disk that should be full");
    };
    let flushed = storage
        .flush()
        .expect_err("a failed commit poisons the store");
    assert!(is_poisoned(&flushed), "{durability:?}: {flushed:#}");

    // Values created now cannot be stored: their page-out fails and they stay resident.
    let before = handles.len();
    for _ in 0..4 {
        handles.push(PagableArc::new(value(handles.len()), &storage));
    }
    let report = storage.page_out_unpinned().unwrap();
    assert_eq!(
        report.evicted, 0,
        "{durability:?}: stored into a poisoned store"
    );
    assert!(report.failed >= 4, "{durability:?}: {report:?}");
    assert!(handles[before..].iter().all(PagableArc::is_resident));

    let paged_out: Vec<usize> = (0..handles.len())
        .filter(|&n| !handles[n].is_resident())
        .collect();
    assert!(!paged_out.is_empty());
    let keys: Vec<_> = paged_out
        .iter()
        .map(|&n| handles[n].key().expect("a paged-out value has a key"))
        .collect();
    let on_disk = committed(storage.path(), &keys);
    if let Some(on_disk) = on_disk {
        assert!(
            on_disk < keys.len(),
            "{durability:?}: every paged-out value was committed; the test covers nothing \
             uncommitted"
        );
    }

    for pass in ["faulted in", "faulted in again"] {
        for (n, handle) in handles.iter().enumerate() {
            let pinned = handle.pin().unwrap_or_else(|err| {
                panic!(
                    "{durability:?}: value {n} ({}) cannot be {pass} after the failed commit \
                     ({failure}): {err:#}",
                    if paged_out.contains(&n) {
                        "paged out"
                    } else {
                        "resident"
                    }
                )
            });
            assert!(
                *pinned == value(n),
                "{durability:?}: value {n} {pass} is wrong"
            );
        }
        // Values with a key leave again with no I/O; the ones never stored still cannot.
        let report = storage.page_out_unpinned().unwrap();
        assert_eq!(report.serialized, 0, "{durability:?}: {report:?}");
        assert_eq!(report.evicted as usize, paged_out.len(), "{durability:?}");
    }
    let stats = storage.paging_stats();
    assert!(stats.eviction_failures >= 4, "{stats:?}");
    format!(
        "{durability:?}: the commit failed after {} values ({failure}); {} paged out, of \
         which {} committed; all {} pinned back twice; {stats:?}",
        before,
        paged_out.len(),
        on_disk.map_or("an unknown number".to_string(), |n| n.to_string()),
        handles.len(),
    )
}

// ------------------------------------------------------------------------- full disk

#[test]
fn paged_out_values_fault_back_in_after_a_commit_fails_on_a_full_disk() {
    let scratch = tempfile::tempdir().unwrap();
    for (i, durability) in MODES.into_iter().enumerate() {
        let at = scratch.path().join(format!("tmpfs-{i}"));
        std::fs::create_dir(&at).unwrap();
        let _mount = match mount_tmpfs(&at, "2m") {
            Ok(mount) => mount,
            Err(why) => {
                eprintln!(
                    "\n!!! SKIPPED paged_out_values_fault_back_in_after_a_commit_fails_on_a_\
                     full_disk: {why}. It needs root with CAP_SYS_ADMIN; \
                     paged_out_values_fault_back_in_after_a_commit_fails_under_a_file_size_\
                     limit covers the same path. !!!\n"
                );
                return;
            }
        };
        // mmap off: in-process, a page fault on a full tmpfs would be a SIGBUS (see io_faults).
        let options = SqliteOptions::default()
            .durability(durability)
            .mmap_size_bytes(0);
        let dir = at.join("store");
        let summary = within(HANG_TIMEOUT, "the full-disk run", move || {
            values_fault_back_in_after_a_failed_commit(options, &dir)
        });
        eprintln!("full disk, {summary}");
    }
}

// ------------------------------------------------------------- file-size limit (child)

const FSIZE_CHILD_ENV: &str = "PAGESTORE_PAGING_FSIZE_CHILD";

/// Child of `..._under_a_file_size_limit`: its files are capped by RLIMIT_FSIZE (SIGXFSZ
/// ignored, so writes past it fail with EFBIG). Runs the checks with default options.
#[test]
fn fsize_child() {
    let Ok(spec) = std::env::var(FSIZE_CHILD_ENV) else {
        return; // Only meaningful as a child process.
    };
    let (mode, dir) = spec.split_once(' ').expect("child spec");
    let durability = MODES
        .into_iter()
        .find(|d| format!("{d:?}") == mode)
        .expect("durability");
    let options = SqliteOptions::default().durability(durability);
    let summary = values_fault_back_in_after_a_failed_commit(options, Path::new(dir));
    println!("SUMMARY {summary}");
    println!("CHILD-OK");
}

#[test]
fn paged_out_values_fault_back_in_after_a_commit_fails_under_a_file_size_limit() {
    let scratch = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    for durability in MODES {
        let dir = scratch.path().join(format!("{durability:?}"));
        // 4096 blocks of 512 bytes: 2 MiB per file.
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(
                "trap '' XFSZ; ulimit -f 4096 && \
                 exec \"$0\" --exact fsize_child --nocapture --test-threads 1",
            )
            .arg(&exe)
            .env(FSIZE_CHILD_ENV, format!("{durability:?} {}", dir.display()));
        let output = output_with_timeout(&mut command, HANG_TIMEOUT);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("CHILD-OK"),
            "{durability:?}: the child failed ({}):\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let summary = stdout
            .lines()
            .find_map(|l| l.split_once("SUMMARY ").map(|(_, s)| s))
            .unwrap_or_default();
        eprintln!("file size limit, {summary}");
    }
}
