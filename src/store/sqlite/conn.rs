//! Opening SQLite connections: the schema, and the pragmas each durability mode needs.

use std::path::Path;
use std::time::Duration;

use rusqlite::limits::Limit;
use rusqlite::{Connection, MAIN_DB, OpenFlags};

use super::options::{Durability, SqliteOptions, TableLayout};
use super::table;
use crate::error::Error;

/// The named roots: pagestore's own table, which the reference never reads.
pub(super) const CREATE_ROOTS_SQL: &str =
    "CREATE TABLE IF NOT EXISTS pagestore_roots (name TEXT PRIMARY KEY, key BLOB NOT NULL)";
/// Sets a root (`?1` name, `?2` key bytes).
pub(super) const SET_ROOT_SQL: &str =
    "INSERT OR REPLACE INTO pagestore_roots (name, key) VALUES (?1, ?2)";
/// Removes a root (`?1` name).
pub(super) const REMOVE_ROOT_SQL: &str = "DELETE FROM pagestore_roots WHERE name = ?1";

/// Checks that the `pagable_data` table (and, in the `IntegerKey` layout, the overflow
/// table) has the columns `layout` reads and writes: another program's table of the same
/// name is refused rather than failing every read.
fn check_columns(conn: &Connection, layout: TableLayout) -> rusqlite::Result<()> {
    if layout == TableLayout::IntegerKey {
        conn.prepare("SELECT key_head, key_tail, value FROM pagable_data")?;
        conn.prepare("SELECT key, value FROM pagestore_overflow")?;
    } else {
        conn.prepare("SELECT key, value FROM pagable_data WHERE key = ?1")?;
    }
    Ok(())
}

/// Page size for databases pagestore creates. Bigger pages than the reference's 8 KiB make
/// the tree shallower and batch inserts cheaper; an existing database keeps its page size.
/// Measured against 16 KiB (1M small records): random reads about 7% faster, writes about
/// 6% faster, file 1% smaller; 4,096 64 KiB records take 4% more space (overflow pages
/// are half empty more often) at the same speed. 64 KiB was slower for large records and
/// 14% bigger.
pub(super) const NEW_PAGE_SIZE: u32 = 32 * 1024;

/// How long a connection waits for a lock before SQLite reports "database is locked". Our
/// own readers hold locks for one read (or a few ms), so this only expires if another
/// process holds the database.
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// The writer's own automatic checkpoint, in pages, as a backstop behind the checkpointer thread (`checkpoint`) (64 MiB at 32 KiB pages).
const BACKSTOP_PAGES: u32 = 2048;

/// The backstop in the `IntegerKey` layout (512 MiB at 32 KiB pages). There one commit of
/// random keys writes most of the table to the log, so the 2,048-page backstop would make
/// the writer checkpoint (and sync) after nearly every commit of a large store, instead of
/// the checkpointer beside it. Measured side by side, three alternating runs of a million
/// small writes: 1.92× the reference's speed on average against 1.63×.
const INTEGER_KEY_BACKSTOP_PAGES: u32 = 16_384;

/// The size the WAL is truncated to after a checkpoint (Durable and Sync modes).
const WAL_SIZE_LIMIT: u64 = 64 << 20;

/// The `journal_mode` each durability runs in. Cache keeps its rollback journal in memory, not
/// `off`: with no journal a commit that fails (a full disk) cannot be rolled back and leaves
/// the file damaged, and with it every node committed before, such as the values a
/// `PagableArc` paged out and dropped from memory.
fn journal_mode(durability: Durability) -> &'static str {
    match durability {
        Durability::Cache => "memory",
        Durability::Durable | Durability::Sync => "wal",
    }
}

/// The `synchronous` level each durability runs at. Durable needs `NORMAL`: SQLite keeps a
/// WAL database consistent through power loss at `NORMAL` (the log is synced before each
/// checkpoint), not at `OFF`.
pub(super) fn synchronous(durability: Durability) -> &'static str {
    match durability {
        Durability::Cache => "OFF",
        Durability::Durable => "NORMAL",
        Durability::Sync => "FULL",
    }
}

/// The size of the row SQLite builds to store a value of `value_len` bytes, which is what its
/// length limit (`SQLITE_LIMIT_LENGTH`) is checked against: the record header (its own
/// length, the 16-byte key's type, the value's type as a varint), the key, and the value.
/// Exact for a `WithoutRowid` row and an overflow row of the `IntegerKey` layout, which are
/// this record; a `Rowid` table keeps the rowid outside it (its index on `key` holds only the
/// key and the rowid). An `IntegerKey` main row (a null for the rowid alias, the 8-byte tail,
/// the value) is 7 bytes smaller, so a row this bound accepts fits in either table.
pub(super) fn record_bytes(value_len: usize) -> u64 {
    let value_len = value_len as u64;
    // SQLite's serial type of a BLOB of n bytes is 2n + 12, stored as a varint of 7 bits
    // per byte; the header's own length and the key's type fit in one byte each.
    let mut value_type = value_len.saturating_mul(2).saturating_add(12) >> 7;
    let mut varint = 1;
    while value_type != 0 && varint < 9 {
        varint += 1;
        value_type >>= 7;
    }
    2 + varint + 16 + value_len
}

/// Runs `PRAGMA incremental_vacuum` to the end (each step frees pages; a statement not
/// stepped to completion frees fewer) and returns how many free pages it returned to the
/// file system. Does nothing (returns 0) in a database without `auto_vacuum = INCREMENTAL`.
pub(super) fn release_free_pages(conn: &Connection) -> rusqlite::Result<u64> {
    let free = |conn: &Connection| -> rusqlite::Result<u64> {
        conn.query_row("PRAGMA freelist_count", [], |row| row.get(0))
    };
    let before = free(conn)?;
    {
        let mut stmt = conn.prepare("PRAGMA incremental_vacuum")?;
        let mut rows = stmt.query([])?;
        while rows.next()?.is_some() {}
    }
    Ok(before.saturating_sub(free(conn)?))
}

/// Sets the page-cache size of `conn` (`PRAGMA cache_size`).
pub(super) fn set_cache_size(conn: &Connection, cache_bytes: u64) -> rusqlite::Result<()> {
    let cache_kib = (cache_bytes / 1024).max(1);
    conn.execute_batch(&format!("PRAGMA cache_size = -{cache_kib};"))
}

/// Applies the page-cache size, and turns memory-mapped I/O off (the connections configured
/// here map nothing; readers map the file themselves while records are small).
fn size_pragmas(conn: &Connection, cache_bytes: u64, path: &Path) -> Result<(), Error> {
    set_cache_size(conn, cache_bytes)
        .and_then(|()| conn.execute_batch("PRAGMA mmap_size = 0;"))
        .map_err(Error::sqlite("set the cache size of", path))
}

/// Opens the single read-write connection and makes sure the file is pagestore's: a SQLite
/// database (created if missing, with 32 KiB pages and a table in `new_layout`) whose tables
/// have the columns of the layout they are in. Runs in SQLite's default
/// rollback journal, so a crash here cannot damage the file, and changes nothing in a file
/// that is refused. Returns the connection for [`tune_writer`] and [`set_durability`], and the table's
/// layout.
pub(super) fn open_writer(
    path: &Path,
    new_layout: TableLayout,
) -> Result<(Connection, TableLayout), Error> {
    let conn = Connection::open(path).map_err(Error::sqlite("open", path))?;
    if conn.is_readonly(MAIN_DB).unwrap_or(false) {
        return Err(Error::io("open for writing", path)(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "SQLite could only open the database read-only; check the file's permissions",
        )));
    }
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(Error::sqlite("set the busy timeout of", path))?;
    // Both only take effect before the first table exists (and the page size before WAL is
    // chosen); set only in a new database, so that a later VACUUM (`compact`) keeps an
    // existing database's page size and auto-vacuum mode.
    let new: bool = conn
        .query_row("SELECT count(*) = 0 FROM sqlite_master", [], |row| {
            row.get(0)
        })
        .map_err(Error::sqlite("read the schema of", path))?;
    if new {
        conn.execute_batch(&format!(
            "PRAGMA page_size = {NEW_PAGE_SIZE}; PRAGMA auto_vacuum = INCREMENTAL;"
        ))
        .map_err(Error::sqlite("set the page size of", path))?;
    }
    let found = table::detect(&conn).map_err(Error::sqlite("read the table layout of", path))?;
    let layout = found.unwrap_or(new_layout);
    if found.is_none() || layout == TableLayout::IntegerKey {
        // Both tables of the IntegerKey layout in one transaction: a reader never finds
        // one without the other.
        let overflow = if layout == TableLayout::IntegerKey {
            table::CREATE_OVERFLOW_SQL
        } else {
            "SELECT 1"
        };
        conn.execute_batch(&format!(
            "BEGIN; {}; {overflow}; COMMIT;",
            table::create_sql(layout)
        ))
        .map_err(Error::sqlite("create the table in", path))?;
    }
    check_columns(&conn, layout).map_err(Error::sqlite(
        "find the columns of table pagable_data (is this another program's database?) in",
        path,
    ))?;
    conn.execute_batch(CREATE_ROOTS_SQL)
        .map_err(Error::sqlite("create the roots table in", path))?;
    Ok((conn, layout))
}

/// Applies the writer's settings that write nothing to the file (page cache, no memory
/// map, WAL size limit, record size limit) on the connection from [`open_writer`].
pub(super) fn tune_writer(
    conn: &Connection,
    path: &Path,
    options: &SqliteOptions,
    layout: TableLayout,
) -> Result<(), Error> {
    // A batch of random keys rewrites most leaf pages, so one commit can put most of the
    // database in the WAL; after a checkpoint, truncate the log back to this size instead of
    // keeping it as large as the largest commit.
    conn.execute_batch(&format!("PRAGMA journal_size_limit = {WAL_SIZE_LIMIT};"))
        .map_err(Error::sqlite("set the WAL size limit of", path))?;
    // In WAL mode the checkpointer thread copies the log into the database; the writer's own
    // checkpoint is only a backstop (see `checkpoint`). Nothing in the other modes.
    conn.execute_batch(&format!(
        "PRAGMA wal_autocheckpoint = {};",
        if layout == TableLayout::IntegerKey {
            INTEGER_KEY_BACKSTOP_PAGES
        } else {
            BACKSTOP_PAGES
        }
    ))
    .map_err(Error::sqlite("set the checkpoint interval of", path))?;
    let limit = i32::try_from(options.max_record_bytes).unwrap_or(i32::MAX);
    conn.set_limit(Limit::SQLITE_LIMIT_LENGTH, limit)
        .map_err(Error::sqlite("set the record size limit of", path))?;
    // No mmap for the writer: SQLite would fault every page it writes into the mapping
    // (resident memory as large as the file), and it reads little.
    size_pragmas(conn, options.cache_size_bytes, path)
}

/// Sets the journal mode and sync level `options.durability` needs on the connection from
/// [`open_writer`]. Can write: leaving WAL checkpoints the log into the database and
/// rewrites its header.
pub(super) fn set_durability(
    conn: &Connection,
    path: &Path,
    options: &SqliteOptions,
) -> Result<(), Error> {
    let wanted = journal_mode(options.durability);
    let mode: String = conn
        .query_row(&format!("PRAGMA journal_mode = {wanted}"), [], |row| {
            row.get(0)
        })
        .map_err(Error::sqlite("set the journal mode of", path))?;
    if !mode.eq_ignore_ascii_case(wanted) {
        return Err(Error::Sqlite {
            path: path.into(),
            operation: "switch the journal mode of",
            source: format!(
                "journal_mode stayed {mode} instead of {wanted}; is another process using it?"
            )
            .into(),
        });
    }
    // After the switch, so that a checkpoint out of WAL runs at SQLite's default level.
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {};",
        synchronous(options.durability)
    ))
    .map_err(Error::sqlite("set the sync level of", path))
}

/// The committed roots, by name (all of them, or the one named `only`). A key that is not
/// 16 bytes is reported as damage.
pub(super) fn read_roots(
    conn: &Connection,
    only: Option<&str>,
    path: &Path,
) -> Result<Vec<(String, crate::key::DataKey)>, Error> {
    let sql = match only {
        Some(_) => "SELECT name, key FROM pagestore_roots WHERE name = ?1",
        None => "SELECT name, key FROM pagestore_roots ORDER BY name",
    };
    let read = || -> rusqlite::Result<Vec<(String, Vec<u8>)>> {
        let mut stmt = conn.prepare(sql)?;
        let row = |row: &rusqlite::Row<'_>| Ok((row.get(0)?, row.get(1)?));
        match only {
            Some(name) => stmt.query_map([name], row)?.collect(),
            None => stmt.query_map([], row)?.collect(),
        }
    };
    let rows = match read() {
        Ok(rows) => rows,
        // A database no read-write open has touched yet (one written by the reference, opened
        // read-only) has no roots table: it has no roots.
        Err(rusqlite::Error::SqliteFailure(_, Some(message)))
            if message.starts_with("no such table: pagestore_roots") =>
        {
            Vec::new()
        }
        Err(err) => return Err(Error::sqlite("read the roots of", path)(err)),
    };
    rows.into_iter()
        .map(
            |(name, bytes)| match crate::key::DataKey::from_slice(&bytes) {
                Some(key) => Ok((name, key)),
                None => Err(Error::io("read the roots of", path)(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "root {name:?} holds {} bytes, not a 16-byte key",
                        bytes.len()
                    ),
                ))),
            },
        )
        .collect()
}

/// Opens one read-only connection, without a memory map, for the reader pool (which maps
/// the file while records are small) or a verification scan.
pub(super) fn open_reader(path: &Path, options: &SqliteOptions) -> Result<Connection, Error> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(Error::sqlite("open (read-only)", path))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(Error::sqlite("set the busy timeout of", path))?;
    size_pragmas(&conn, options.cache_size_bytes, path)?;
    Ok(conn)
}

/// Checks, on a read-only connection, that the file is pagestore's (its `pagable_data`
/// table has the columns of one of the layouts) and returns the table's layout. Writes nothing.
pub(super) fn check_read_only(conn: &Connection, path: &Path) -> Result<TableLayout, Error> {
    let refused = || {
        Error::sqlite(
            "find the columns of table pagable_data (is this a pagestore database?) in",
            path,
        )
    };
    let layout = table::detect(conn)
        .map_err(Error::sqlite("read the table layout of", path))?
        // No table: the check below fails with SQLite's "no such table".
        .unwrap_or(TableLayout::Rowid);
    check_columns(conn, layout).map_err(refused())?;
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::options::SQLITE_MAX_LENGTH;

    #[test]
    fn the_default_limit_is_the_bundled_sqlites() {
        let conn = Connection::open_in_memory().unwrap();
        let limit = conn.limit(Limit::SQLITE_LIMIT_LENGTH).unwrap();
        assert_eq!(usize::try_from(limit).unwrap(), SQLITE_MAX_LENGTH);
        // Raising it is clamped: SQLITE_MAX_LENGTH is SQLite's ceiling, not just a default.
        conn.set_limit(Limit::SQLITE_LIMIT_LENGTH, i32::MAX)
            .unwrap();
        let limit = conn.limit(Limit::SQLITE_LIMIT_LENGTH).unwrap();
        assert_eq!(usize::try_from(limit).unwrap(), SQLITE_MAX_LENGTH);
    }

    /// The writer runs at the sync level each durability promises: Durable at `NORMAL`,
    /// the lowest level at which SQLite keeps a WAL database consistent through power loss.
    #[test]
    fn each_durability_gets_its_sync_level() {
        for (durability, level) in [
            (Durability::Cache, 0),
            (Durability::Durable, 1),
            (Durability::Sync, 2),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("pagable.db");
            let options = SqliteOptions::default().durability(durability);
            let (conn, _) = open_writer(&path, TableLayout::Rowid).unwrap();
            tune_writer(&conn, &path, &options, TableLayout::Rowid).unwrap();
            set_durability(&conn, &path, &options).unwrap();
            let got: i64 = conn
                .query_row("PRAGMA synchronous", [], |row| row.get(0))
                .unwrap();
            assert_eq!(got, level, "{durability:?}");
        }
    }

    /// `record_bytes` is exactly the size SQLite checks: a limit of that size stores the
    /// value, one byte less refuses it. Around each change of the varint's length above
    /// the 1 KiB floor of `max_record_bytes` (below it SQLite refuses smaller things too).
    /// In an `IntegerKey` main table (whose rows are smaller) a limit of that size stores
    /// the value too; its overflow table is a `WithoutRowid` table.
    #[test]
    fn record_bytes_is_the_size_sqlite_limits() {
        for layout in [
            TableLayout::Rowid,
            TableLayout::WithoutRowid,
            TableLayout::IntegerKey,
        ] {
            let conn = Connection::open_in_memory().unwrap();
            conn.execute_batch(table::create_sql(layout)).unwrap();
            let insert = if layout == TableLayout::IntegerKey {
                "INSERT INTO pagable_data (key_head, key_tail, value) VALUES (1, ?1, ?2)"
            } else {
                "INSERT INTO pagable_data (key, value) VALUES (?1, ?2)"
            };
            let key: &[u8] = if layout == TableLayout::IntegerKey {
                &[1u8; 8]
            } else {
                &[1u8; 16]
            };
            for value_len in [1010, 8185, 8186, 1_048_569, 1_048_570] {
                let value = vec![0u8; value_len];
                let fits = |limit: u64| {
                    conn.set_limit(Limit::SQLITE_LIMIT_LENGTH, limit as i32)
                        .unwrap();
                    let result = conn.execute(insert, rusqlite::params![key, value]);
                    conn.set_limit(Limit::SQLITE_LIMIT_LENGTH, i32::MAX)
                        .unwrap();
                    conn.execute("DELETE FROM pagable_data", []).unwrap();
                    match result {
                        Ok(_) => true,
                        Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::TooBig) => {
                            false
                        }
                        Err(e) => panic!("{e}"),
                    }
                };
                let bytes = record_bytes(value_len);
                assert!(fits(bytes), "{layout:?}, {value_len}-byte value");
                if layout != TableLayout::IntegerKey {
                    assert!(!fits(bytes - 1), "{layout:?}, {value_len}-byte value");
                }
            }
        }
    }
}
