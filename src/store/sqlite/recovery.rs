//! Unclean-shutdown detection for [`Durability::Cache`](super::Durability::Cache), and what
//! open does about it ([`OpenReport`]).
//!
//! With no journal on disk, a crash in the middle of a commit can leave a database that is broken or
//! holds half a batch. So a Cache-mode session creates a marker file (`pagable.db.open`,
//! fsynced) before its first write and removes it after its final flush at a clean close.
//! If open finds the marker, the last session did not close cleanly and the file is not
//! trusted: it is checked and repaired, or replaced by an empty one.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use rusqlite::Connection;

use super::conn::BUSY_TIMEOUT;
use super::options::SqliteOptions;
use super::table::{self, Column, Scan, Table};

/// Why a repair step failed, as the message it reports.
struct Failed(String);

impl From<rusqlite::Error> for Failed {
    fn from(e: rusqlite::Error) -> Self {
        Self(e.to_string())
    }
}

impl From<String> for Failed {
    fn from(e: String) -> Self {
        Self(e)
    }
}
use crate::codec;
use crate::error::Error;

/// What opening the store found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum OpenReport {
    /// The last session closed cleanly (or the database is new, or was written by another
    /// program such as the reference implementation): opened as is.
    Clean,
    /// The last session did not close cleanly and the database was replaced by an empty one.
    Reset {
        /// Why it was not repaired instead.
        reason: String,
    },
    /// The last session did not close cleanly; the database passed SQLite's structural check
    /// and the records that were damaged, or pointed to missing children, were deleted.
    Repaired {
        /// Records kept.
        records: u64,
        /// Records deleted because they did not decode or did not hash to their key (or had
        /// a malformed key).
        removed_corrupt: u64,
        /// Records deleted because a record they reach through their children, at any depth,
        /// was missing or deleted as corrupt.
        removed_dangling: u64,
    },
    /// A read-only open ([`SqliteOptions::read_only`]) found the Cache-mode marker
    /// `pagable.db.open`: a Cache-mode store has the database open right now, or its last
    /// session did not close cleanly. A read-only store cannot tell which and repairs
    /// nothing; reads still re-hash each record (with
    /// [`verify_on_read`](SqliteOptions::verify_on_read)), and
    /// [`verify`](super::SqliteNodeStore::verify) checks the whole store. The next
    /// read-write open repairs it if it was a crash.
    UncleanNotChecked,
}

impl OpenReport {
    /// Whether the last session closed cleanly.
    pub fn is_clean(&self) -> bool {
        matches!(self, OpenReport::Clean)
    }
}

/// Proof that this process holds the store's directory: an exclusive SQLite lock on
/// `pagable.db.lock`, held for the store's lifetime and released by the OS if the process
/// dies. A second store on the same directory, in this process or another, is refused
/// instead of taking the first one's marker for a crash and repairing a live database.
///
/// The lock file is never removed, not even at close: an opener that opened it before the
/// removal would lock the unlinked file while the next opener created and locked a new one,
/// and two stores would share the directory. Releasing the lock is closing the connection.
pub(super) struct DirLock {
    // Never used after open; the Mutex only makes the holder `Sync`.
    _conn: std::sync::Mutex<Connection>,
}

/// Takes the directory lock of the database `db`, or fails at once if another store holds it.
pub(super) fn lock_dir(db: &Path) -> Result<DirLock, Error> {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    let conn = Connection::open(&path).map_err(Error::sqlite("open the lock file", &path))?;
    // With locking_mode=EXCLUSIVE the lock taken by BEGIN EXCLUSIVE is kept after COMMIT,
    // until the connection closes. No busy timeout: a held lock fails at once. The lock file
    // holds no data, so its journal stays in memory: taking the lock never needs disk space
    // (a store must reopen on a full disk to read what it has).
    conn.busy_timeout(std::time::Duration::ZERO)
        .map_err(Error::sqlite("set the busy timeout of", &path))?;
    conn.execute_batch(
        "PRAGMA journal_mode = MEMORY; PRAGMA locking_mode = EXCLUSIVE; BEGIN EXCLUSIVE; COMMIT;",
    )
    .map_err(|e| match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            Error::io(
                "open (another SqliteBackedPagableStorage, in this or another process, has \
                     it open; close that one first)",
                db,
            )(std::io::Error::new(std::io::ErrorKind::WouldBlock, e))
        }
        _ => Error::sqlite("lock", &path)(e),
    })?;
    Ok(DirLock {
        _conn: std::sync::Mutex::new(conn),
    })
}

/// The marker that exists while a Cache-mode session has the database open.
pub(super) fn marker_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".open");
    PathBuf::from(name)
}

/// Creates the marker and makes it durable before any write can happen.
pub(super) fn write_marker(marker: &Path) -> Result<(), Error> {
    let mut file = File::create(marker).map_err(Error::io("create the open marker", marker))?;
    file.write_all(
        b"pagestore: the database beside this file is open in Cache mode (or its last \
          session crashed); the next open checks it before use.\n",
    )
    .and_then(|()| file.sync_all())
    .map_err(Error::io("write the open marker", marker))?;
    sync_parent(marker)
}

/// Removes the marker it guards when dropped, unless [`disarm`](Self::disarm)ed: an open
/// that fails after writing the marker did not crash, and a marker left behind would make the
/// next open "repair" a healthy database.
pub(super) struct MarkerGuard<'a> {
    marker: Option<&'a Path>,
}

impl<'a> MarkerGuard<'a> {
    /// Guards the marker just written at `marker`, if one was.
    pub(super) fn new(marker: Option<&'a Path>) -> Self {
        Self { marker }
    }

    /// The open succeeded: the marker stays until a clean close.
    pub(super) fn disarm(mut self) {
        self.marker = None;
    }
}

impl Drop for MarkerGuard<'_> {
    fn drop(&mut self) {
        if let Some(marker) = self.marker {
            if let Err(err) = remove_marker(marker) {
                log::warn!("pagestore: {err}; the next open will check the database");
            }
        }
    }
}

/// Removes the marker at a clean close.
pub(super) fn remove_marker(marker: &Path) -> Result<(), Error> {
    match std::fs::remove_file(marker) {
        Ok(()) => sync_parent(marker),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove the open marker", marker)(e)),
    }
}

/// Makes a file's creation or removal durable: fsyncs the directory that holds it. `Sync`
/// mode and the marker rely on it, so a failed fsync is an error naming the directory.
pub(super) fn sync_parent(path: &Path) -> Result<(), Error> {
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    match File::open(dir) {
        Ok(dir_file) => dir_file
            .sync_all()
            .map_err(Error::io("sync the directory", dir)),
        // Where a directory cannot be opened as a file (Windows), there is nothing to sync.
        Err(_) if cfg!(not(unix)) => Ok(()),
        Err(e) => Err(Error::io("open for syncing the directory", dir)(e)),
    }
}

/// Deals with a database left by an unclean shutdown: repair it or start empty.
pub(super) fn recover(db: &Path, options: &SqliteOptions) -> Result<OpenReport, Error> {
    let report = if !options.repair_unclean {
        reset(db, "repair after an unclean shutdown is turned off".into())?
    } else {
        match repair(db, options) {
            Ok(report) => report,
            Err(reason) => reset(db, reason)?,
        }
    };
    match &report {
        OpenReport::Reset { reason } => log::warn!(
            "pagestore: {} was not closed cleanly; started empty ({reason})",
            db.display()
        ),
        OpenReport::Repaired {
            records,
            removed_corrupt,
            removed_dangling,
        } => log::warn!(
            "pagestore: {} was not closed cleanly; repaired: kept {records} records, deleted \
             {removed_corrupt} corrupt and {removed_dangling} with missing children",
            db.display()
        ),
        OpenReport::Clean | OpenReport::UncleanNotChecked => {}
    }
    Ok(report)
}

/// Deletes the database and its side files.
fn reset(db: &Path, reason: String) -> Result<OpenReport, Error> {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        match std::fs::remove_file(&name) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("delete the untrusted database", name)(e)),
        }
    }
    Ok(OpenReport::Reset { reason })
}

/// Checks the structure (`PRAGMA integrity_check`), then deletes, in one transaction, every
/// record that is damaged or has a malformed key, and every record that reaches one of those
/// or a missing record through its children, at any depth. One scan of the table finds them
/// all, so the cost does not grow with the depth of the damage.
/// Returns why the database cannot be repaired.
fn repair(db: &Path, options: &SqliteOptions) -> Result<OpenReport, String> {
    if !db.exists() {
        return Ok(OpenReport::Repaired {
            records: 0,
            removed_corrupt: 0,
            removed_dangling: 0,
        });
    }
    let sql = |e: rusqlite::Error| e.to_string();
    let mut conn = Connection::open(db).map_err(sql)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
    // integrity_check, not quick_check: only the full check verifies that keys are in order,
    // and a torn write can leave them out of order (then a lookup and a scan disagree).
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .map_err(sql)?;
    if check != "ok" {
        return Err(format!("integrity_check: {check}"));
    }
    let Some(layout) = table::detect(&conn).map_err(sql)? else {
        return Ok(OpenReport::Repaired {
            records: 0,
            removed_corrupt: 0,
            removed_dangling: 0,
        });
    };
    let table = Table::new(layout, options.key_head_bytes);
    let graph = Graph::scan(&conn, table)?;
    let (corrupt, dangling) = graph.doomed();
    let tx = conn.transaction().map_err(sql)?;
    // The rows the scan skipped: no key could ever fetch them.
    let mut removed_corrupt = table.delete_malformed(&tx).map_err(sql)?;
    removed_corrupt += table
        .delete(&tx, corrupt.iter().map(|&i| &graph.keys[i as usize]))
        .map_err(sql)?;
    let removed_dangling = table
        .delete(&tx, dangling.iter().map(|&i| &graph.keys[i as usize]))
        .map_err(sql)?;
    // A root whose graph lost a node names nothing complete any more: drop it too.
    let roots_exist: bool = tx
        .query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE name = 'pagestore_roots'",
            [],
            |row| row.get(0),
        )
        .map_err(sql)?;
    if roots_exist {
        let mut dropped = 0;
        let roots: Vec<(String, Vec<u8>)> = tx
            .prepare("SELECT name, key FROM pagestore_roots")
            .and_then(|mut stmt| {
                stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                    .collect()
            })
            .map_err(sql)?;
        for (name, key) in roots {
            let kept = match <[u8; 16]>::try_from(key.as_slice()) {
                Ok(key) => table.exists(&tx, &key).map_err(sql)?,
                Err(_) => false,
            };
            if !kept {
                dropped += tx
                    .execute("DELETE FROM pagestore_roots WHERE name = ?1", [&name])
                    .map_err(sql)?;
            }
        }
        if dropped > 0 {
            log::warn!(
                "pagestore: {}: dropped {dropped} roots whose node was not kept",
                db.display()
            );
        }
    }
    tx.commit().map_err(sql)?;
    if removed_corrupt + removed_dangling > 0 {
        // Give the deleted records' pages back (a no-op without incremental auto-vacuum);
        // only space, so a failure is logged, not fatal.
        if let Err(err) = super::conn::release_free_pages(&conn) {
            log::warn!(
                "pagestore: {}: could not release the free pages after the repair: {err}",
                db.display()
            );
        }
    }
    Ok(OpenReport::Repaired {
        records: (graph.keys.len() - corrupt.len() - dangling.len()) as u64,
        removed_corrupt,
        removed_dangling,
    })
}

/// The table as a graph, for [`repair`]: every well-formed key once, numbered by a `u32` in
/// scan order, and the parent-child edges between stored records by those numbers. Held:
/// 16 bytes a record and 8 an edge, plus a byte a record for the walk; while the scan
/// resolves child keys to numbers, 20 more bytes an edge and 4 a record.
struct Graph {
    keys: Vec<[u8; 16]>,
    /// Records that do not decode or do not hash to their key.
    corrupt: Vec<u32>,
    /// Records that name a child that is not stored.
    missing_child: Vec<u32>,
    /// `(child, parent)`, sorted, so the parents of a record are one contiguous run.
    edges: Vec<(u32, u32)>,
}

impl Graph {
    /// One pass over the table. Rows with a malformed key are left out (no record can name
    /// them as a child, and the caller deletes them by SQL).
    fn scan(conn: &Connection, table: Table) -> Result<Graph, String> {
        let mut keys: Vec<[u8; 16]> = Vec::new();
        let mut corrupt = Vec::new();
        // By child key until every key is known and has its number.
        let mut named: Vec<([u8; 16], u32)> = Vec::new();
        let mut rows = Scan::new(table);
        while !rows.is_done() {
            rows.step(conn, usize::MAX, Column::Value, |key, value| {
                let Some(key) = key else {
                    return Ok(());
                };
                let index = u32::try_from(keys.len()).map_err(|_| {
                    "more than 4,294,967,295 records, more than repair indexes".to_string()
                })?;
                keys.push(key.as_bytes());
                let record = value
                    .as_blob()
                    .ok()
                    .and_then(|bytes| codec::parse(bytes).ok());
                match record {
                    Some(record) if record.compute_key() == key => {
                        named.extend(record.arcs().map(|child| (child.as_bytes(), index)));
                    }
                    _ => corrupt.push(index),
                }
                Ok::<(), Failed>(())
            })
            .map_err(|Failed(e)| e)?;
        }
        let mut by_key: Vec<u32> = (0..keys.len() as u32).collect();
        by_key.sort_unstable_by_key(|&i| keys[i as usize]);
        let mut missing_child = Vec::new();
        let mut edges = Vec::with_capacity(named.len());
        for (child, parent) in named {
            match by_key.binary_search_by_key(&child, |&i| keys[i as usize]) {
                Ok(at) => edges.push((by_key[at], parent)),
                Err(_) => missing_child.push(parent),
            }
        }
        edges.sort_unstable();
        Ok(Graph {
            keys,
            corrupt,
            missing_child,
            edges,
        })
    }

    /// The records to delete: the corrupt ones, and every other record that has a corrupt
    /// or missing descendant (found by walking the edges from child to parent).
    fn doomed(&self) -> (Vec<u32>, Vec<u32>) {
        let mut doomed = vec![false; self.keys.len()];
        for &i in &self.corrupt {
            doomed[i as usize] = true;
        }
        let mut dangling = Vec::new();
        let mut stack: Vec<u32> = self.corrupt.clone();
        for &i in &self.missing_child {
            if !std::mem::replace(&mut doomed[i as usize], true) {
                dangling.push(i);
                stack.push(i);
            }
        }
        while let Some(child) = stack.pop() {
            let from = self.edges.partition_point(|&(c, _)| c < child);
            for &(c, parent) in &self.edges[from..] {
                if c != child {
                    break;
                }
                if !std::mem::replace(&mut doomed[parent as usize], true) {
                    dangling.push(parent);
                    stack.push(parent);
                }
            }
        }
        (self.corrupt.clone(), dangling)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn a_failed_directory_fsync_is_an_error_naming_the_directory() {
        // procfs directories open, but refuse fsync (EINVAL).
        let err = sync_parent(Path::new("/proc/self/pagable.db.open")).unwrap_err();
        match &err {
            Error::Io {
                path, operation, ..
            } => {
                assert_eq!(path, Path::new("/proc/self"));
                assert_eq!(*operation, "sync the directory");
            }
            other => panic!("expected an Io error, got {other:?}"),
        }
    }

    #[test]
    #[cfg(unix)]
    fn a_directory_that_cannot_be_opened_is_an_error_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        let err = sync_parent(&gone.join("pagable.db")).unwrap_err();
        assert!(
            matches!(&err, Error::Io { path, .. } if *path == gone),
            "{err:?}"
        );
    }

    #[test]
    fn a_directory_that_exists_syncs() {
        let dir = tempfile::tempdir().unwrap();
        sync_parent(&dir.path().join("pagable.db")).unwrap();
    }
}
