//! The checkpointer: in WAL mode (`Durable`, `Sync`), a thread of its own copies the log
//! into the database file while the writer goes on committing.
//!
//! SQLite checkpoints on the committing connection by default (every 1,000 pages), so the
//! writer stops for the copy and its syncs: large records are written twice, and the second
//! write sat on the write path. Here the writer only counts what it commits; past
//! [`CHECKPOINT_BYTES`] or [`CHECKPOINT_COMMITS`] the checkpointer runs a `PASSIVE`
//! checkpoint on its own connection, which never waits for the writer or the readers and
//! copies what it can. The writer's own automatic checkpoint stays as a backstop, at
//! `conn::BACKSTOP_PAGES` (`conn::INTEGER_KEY_BACKSTOP_PAGES` in that layout), for when this
//! thread falls behind.
//!
//! A `PASSIVE` checkpoint copies the log but does not restart it, and while the log holds a
//! page, readers read that page from the log. So once the writer is idle it truncates the log
//! (see `writer`), and reads go to the database file again. A checkpoint is crash-safe by
//! SQLite's design; one that fails is logged and the next one tries again (the log still
//! holds every commit).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use rusqlite::{Connection, OpenFlags};

use super::conn;
use super::options::SqliteOptions;
use crate::error::Error;

/// Record bytes committed between two background checkpoints.
const CHECKPOINT_BYTES: u64 = 32 << 20;
/// Commits between two background checkpoints, whatever their size (a batch of small
/// records rewrites far more pages than its records' bytes).
const CHECKPOINT_COMMITS: u64 = 16;

#[derive(Default)]
struct Due {
    bytes: u64,
    commits: u64,
    stop: bool,
}

/// What the writer and the checkpointer thread share.
pub(super) struct Checkpointer {
    due: Mutex<Due>,
    wake: Condvar,
    /// Whether something was committed since the log was last truncated.
    log_in_use: AtomicBool,
}

impl Checkpointer {
    fn due(&self) -> MutexGuard<'_, Due> {
        self.due.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a commit of `bytes` record bytes; wakes the thread when a checkpoint is due.
    pub(super) fn committed(&self, bytes: u64) {
        self.log_in_use.store(true, Ordering::Relaxed);
        let mut due = self.due();
        due.bytes += bytes;
        due.commits += 1;
        if due.bytes >= CHECKPOINT_BYTES || due.commits >= CHECKPOINT_COMMITS {
            self.wake.notify_one();
        }
    }

    /// Whether the log may hold pages since it was last truncated (and clears the flag: the
    /// caller truncates it, or sets it again with [`log_still_in_use`](Self::log_still_in_use)).
    pub(super) fn take_log_in_use(&self) -> bool {
        self.log_in_use.swap(false, Ordering::Relaxed)
    }

    /// The log could not be truncated: try again later.
    pub(super) fn log_still_in_use(&self) {
        self.log_in_use.store(true, Ordering::Relaxed);
    }

    /// Asks the thread to stop (it finishes a checkpoint in progress first).
    pub(super) fn stop(&self) {
        self.due().stop = true;
        self.wake.notify_one();
    }
}

/// Opens the checkpointer's connection and starts its thread, for a store in a WAL mode.
pub(super) fn start(
    path: &Path,
    options: &SqliteOptions,
) -> Result<(Arc<Checkpointer>, JoinHandle<()>), Error> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(Error::sqlite("open the checkpointer's connection to", path))?;
    conn.busy_timeout(conn::BUSY_TIMEOUT)
        .map_err(Error::sqlite("set the busy timeout of", path))?;
    // The sync level governs the checkpoint's syncs: the same as the writer's.
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {};",
        conn::synchronous(options.durability)
    ))
    .map_err(Error::sqlite("set the sync level of", path))?;
    let shared = Arc::new(Checkpointer {
        due: Mutex::new(Due::default()),
        wake: Condvar::new(),
        log_in_use: AtomicBool::new(false),
    });
    let thread = {
        let (shared, owned) = (Arc::clone(&shared), path.to_path_buf());
        std::thread::Builder::new()
            .name("pagestore-sqlite-checkpointer".into())
            .spawn(move || run(&shared, &conn, &owned))
            .map_err(Error::io("start the checkpointer thread for", path))?
    };
    Ok((shared, thread))
}

fn run(shared: &Checkpointer, conn: &Connection, path: &Path) {
    loop {
        {
            let mut due = shared.due();
            while !due.stop && due.bytes < CHECKPOINT_BYTES && due.commits < CHECKPOINT_COMMITS {
                due = shared.wake.wait(due).unwrap_or_else(|p| p.into_inner());
            }
            if due.stop {
                return;
            }
            *due = Due::default();
        }
        if let Err(err) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            log::warn!(
                "pagestore: a background checkpoint of {} failed ({err}); the next one \
                 retries",
                path.display()
            );
        }
    }
}
