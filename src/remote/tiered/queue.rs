//! The upload queue: what the local store holds that the remote may not, in the order it
//! was stored, kept in a small SQLite file of its own so that it survives a restart.
//!
//! Stores append to a buffer in memory (no I/O on the write path); the buffer moves into
//! the file before every local flush, so whatever a flush made durable locally is also
//! queued durably. The uploader reads the file oldest first and deletes what it finished.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

use crate::error::Error;
use crate::key::DataKey;

/// The queue file's name inside the store's directory.
pub(crate) const QUEUE_FILE: &str = "upload-queue.db";

/// One thing to make remote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Entry {
    /// A node stored locally: upload it and what it reaches that the remote lacks.
    Node(DataKey),
    /// A root set locally: publish it once its graph is remote.
    SetRoot(String, DataKey),
    /// A root removed locally: remove it remotely.
    RemoveRoot(String),
}

const OP_NODE: i64 = 0;
const OP_SET_ROOT: i64 = 1;
const OP_REMOVE_ROOT: i64 = 2;

pub(crate) struct UploadQueue {
    path: PathBuf,
    conn: Mutex<Connection>,
    buffer: Mutex<Vec<Entry>>,
}

impl UploadQueue {
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let path = dir.join(QUEUE_FILE);
        let conn = Connection::open(&path).map_err(Error::sqlite("open", &path))?;
        // WAL with NORMAL sync: a commit survives the process being killed (it is in the OS
        // before `persist` returns), the same promise as the local store's Durable mode.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS upload_queue (
                 seq INTEGER PRIMARY KEY,
                 op INTEGER NOT NULL,
                 key BLOB,
                 root TEXT
             );
             CREATE INDEX IF NOT EXISTS upload_queue_root ON upload_queue (root, seq)
                 WHERE root IS NOT NULL;",
        )
        .map_err(Error::sqlite("set up the upload queue in", &path))?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(Error::sqlite("set up the upload queue in", &path))?;
        Ok(UploadQueue {
            path,
            conn: Mutex::new(conn),
            buffer: Mutex::new(Vec::new()),
        })
    }

    pub fn push(&self, entry: Entry) {
        lock(&self.buffer).push(entry);
    }

    /// Moves the buffer into the file, in one transaction.
    pub fn persist(&self) -> Result<(), Error> {
        let mut conn = lock(&self.conn);
        let entries = std::mem::take(&mut *lock(&self.buffer));
        if entries.is_empty() {
            return Ok(());
        }
        let write = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO upload_queue (op, key, root) VALUES (?1, ?2, ?3)",
                )?;
                for entry in &entries {
                    match entry {
                        Entry::Node(key) => {
                            insert.execute(params![OP_NODE, key.as_bytes(), None::<&str>])?
                        }
                        Entry::SetRoot(name, key) => {
                            insert.execute(params![OP_SET_ROOT, key.as_bytes(), name])?
                        }
                        Entry::RemoveRoot(name) => {
                            insert.execute(params![OP_REMOVE_ROOT, None::<&[u8]>, name])?
                        }
                    };
                }
            }
            tx.commit()
        };
        write(&mut conn).map_err(|e| {
            // Not lost: back at the head of the buffer for the next attempt.
            let mut buffer = lock(&self.buffer);
            let newer = std::mem::replace(&mut *buffer, entries);
            buffer.extend(newer);
            Error::sqlite("write the upload queue to", &self.path)(e)
        })
    }

    /// Up to `limit` entries, oldest first, with their sequence numbers.
    pub fn peek(&self, limit: usize) -> Result<Vec<(i64, Entry)>, Error> {
        let conn = lock(&self.conn);
        let read = || -> rusqlite::Result<Vec<(i64, Entry)>> {
            let mut select = conn.prepare_cached(
                "SELECT seq, op, key, root FROM upload_queue ORDER BY seq LIMIT ?1",
            )?;
            let rows = select.query_map([limit as i64], |row| {
                let seq: i64 = row.get(0)?;
                let op: i64 = row.get(1)?;
                let key: Option<Vec<u8>> = row.get(2)?;
                let root: Option<String> = row.get(3)?;
                Ok((seq, op, key, root))
            })?;
            let mut entries = Vec::new();
            for row in rows {
                let (seq, op, key, root) = row?;
                let key = key.as_deref().and_then(DataKey::from_slice);
                let entry = match (op, key, root) {
                    (OP_NODE, Some(key), _) => Entry::Node(key),
                    (OP_SET_ROOT, Some(key), Some(name)) => Entry::SetRoot(name, key),
                    (OP_REMOVE_ROOT, _, Some(name)) => Entry::RemoveRoot(name),
                    // A row this version did not write: nothing it could mean is safe to do.
                    _ => {
                        log::warn!("skipping an unreadable upload queue entry (seq {seq})");
                        continue;
                    }
                };
                entries.push((seq, entry));
            }
            Ok(entries)
        };
        read().map_err(Error::sqlite("read the upload queue in", &self.path))
    }

    /// Deletes every entry up to and including `seq`.
    pub fn remove_through(&self, seq: i64) -> Result<(), Error> {
        lock(&self.conn)
            .execute("DELETE FROM upload_queue WHERE seq <= ?1", [seq])
            .map(drop)
            .map_err(Error::sqlite("update the upload queue in", &self.path))
    }

    /// Whether the newest queued change of root `name` removes it: the remote may still
    /// have the root, but for this store it is gone.
    pub fn removes_root(&self, name: &str) -> Result<bool, Error> {
        let newest_buffered = lock(&self.buffer)
            .iter()
            .rev()
            .find_map(|entry| match entry {
                Entry::SetRoot(n, _) if n == name => Some(false),
                Entry::RemoveRoot(n) if n == name => Some(true),
                _ => None,
            });
        if let Some(removes) = newest_buffered {
            return Ok(removes);
        }
        lock(&self.conn)
            .query_row(
                "SELECT op FROM upload_queue WHERE root = ?1 ORDER BY seq DESC LIMIT 1",
                [name],
                |row| row.get::<_, i64>(0),
            )
            .optional()
            .map(|op| op == Some(OP_REMOVE_ROOT))
            .map_err(Error::sqlite("read the upload queue in", &self.path))
    }

    /// The newest entry in the file, if any.
    pub fn last_seq(&self) -> Result<Option<i64>, Error> {
        self.seq_query("SELECT max(seq) FROM upload_queue")
    }

    /// The oldest entry in the file, if any.
    pub fn first_seq(&self) -> Result<Option<i64>, Error> {
        self.seq_query("SELECT min(seq) FROM upload_queue")
    }

    fn seq_query(&self, sql: &str) -> Result<Option<i64>, Error> {
        lock(&self.conn)
            .query_row(sql, [], |row| row.get::<_, Option<i64>>(0))
            .optional()
            .map(Option::flatten)
            .map_err(Error::sqlite("read the upload queue in", &self.path))
    }

    /// Entries waiting: in the file and in the buffer.
    pub fn len(&self) -> Result<u64, Error> {
        let buffered = lock(&self.buffer).len() as u64;
        let stored: i64 = lock(&self.conn)
            .query_row("SELECT count(*) FROM upload_queue", [], |row| row.get(0))
            .map_err(Error::sqlite("read the upload queue in", &self.path))?;
        Ok(buffered + stored as u64)
    }
}

/// Locks `mutex`, going on past a thread that panicked while holding it: the queue's state
/// is a buffer and a connection, each left whole by every path.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> DataKey {
        DataKey::from_slice(&[n; 16]).unwrap()
    }

    #[test]
    fn entries_survive_reopen_in_order_once_persisted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let queue = UploadQueue::open(dir.path()).unwrap();
            queue.push(Entry::Node(key(1)));
            queue.push(Entry::SetRoot("r".into(), key(1)));
            queue.push(Entry::RemoveRoot("old".into()));
            assert_eq!(queue.len().unwrap(), 3);
            queue.persist().unwrap();
            queue.push(Entry::Node(key(2))); // never persisted
        }
        let queue = UploadQueue::open(dir.path()).unwrap();
        let entries: Vec<Entry> = queue
            .peek(10)
            .unwrap()
            .into_iter()
            .map(|(_, e)| e)
            .collect();
        assert_eq!(
            entries,
            [
                Entry::Node(key(1)),
                Entry::SetRoot("r".into(), key(1)),
                Entry::RemoveRoot("old".into())
            ]
        );
        let (first, last) = (
            queue.first_seq().unwrap().unwrap(),
            queue.last_seq().unwrap().unwrap(),
        );
        queue.remove_through(first + 1).unwrap();
        assert_eq!(queue.first_seq().unwrap(), Some(last));
        queue.remove_through(last).unwrap();
        assert_eq!(queue.len().unwrap(), 0);
    }

    #[test]
    fn the_newest_change_of_a_root_decides_whether_it_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let queue = UploadQueue::open(dir.path()).unwrap();
        queue.push(Entry::SetRoot("a".into(), key(1)));
        queue.push(Entry::RemoveRoot("a".into()));
        assert!(queue.removes_root("a").unwrap());
        queue.persist().unwrap();
        assert!(queue.removes_root("a").unwrap(), "read from the file");
        queue.push(Entry::SetRoot("a".into(), key(2)));
        assert!(!queue.removes_root("a").unwrap(), "the buffer is newer");
        assert!(!queue.removes_root("b").unwrap());
    }
}
