//! [`Table`]: where a key's record is in each [`TableLayout`], and the SQL that finds it.
//!
//! In the `Rowid` and `WithoutRowid` layouts a record is the row whose `key` column holds
//! the key's 16 bytes. In the `IntegerKey` layout the table is
//! `pagable_data (key_head INTEGER PRIMARY KEY, key_tail BLOB NOT NULL, value BLOB NOT NULL)`:
//! the key's first 8 bytes, as an integer that sorts like them, are the rowid, the other 8
//! are `key_tail`, and a read is one descent of one B-tree. Two keys can share their first 8
//! bytes (rarely: about 3% of stores of a billion keys hold one such pair), and a rowid
//! holds one row; the key that finds its slot taken by another key is stored in
//! `pagestore_overflow (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID`, whole.
//! A read that finds no row for the head, or a row with another tail, looks there too (in
//! the usual empty overflow table, one probe of its root page). A key is stored in one place
//! only: while the overflow table holds anything, the writer looks a key up there before it
//! inserts it in the main table.

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension};

use super::options::TableLayout;
use crate::key::DataKey;

/// The overflow table of the `IntegerKey` layout.
pub(super) const CREATE_OVERFLOW_SQL: &str = "CREATE TABLE IF NOT EXISTS pagestore_overflow \
     (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID";

/// The statement that creates the main table in a new database, in `layout`.
pub(super) fn create_sql(layout: TableLayout) -> &'static str {
    const KEYED: &str =
        "CREATE TABLE IF NOT EXISTS pagable_data (key BLOB PRIMARY KEY, value BLOB NOT NULL)";
    match layout {
        TableLayout::Rowid => KEYED,
        TableLayout::WithoutRowid => concat!(
            "CREATE TABLE IF NOT EXISTS pagable_data (key BLOB PRIMARY KEY, value BLOB NOT NULL)",
            " WITHOUT ROWID"
        ),
        TableLayout::IntegerKey => {
            "CREATE TABLE IF NOT EXISTS pagable_data (key_head INTEGER PRIMARY KEY, \
             key_tail BLOB NOT NULL, value BLOB NOT NULL)"
        }
    }
}

/// Which layout the existing `pagable_data` table of `conn` has: SQLite's `table_list`
/// pragma reports `wr` = 1 for a WITHOUT ROWID table, and only the `IntegerKey` layout has a
/// `key_head` column. `None` if there is no such table.
pub(super) fn detect(conn: &Connection) -> rusqlite::Result<Option<TableLayout>> {
    let without_rowid: Option<bool> = conn
        .query_row(
            "SELECT wr FROM pragma_table_list('pagable_data') WHERE schema = 'main'",
            [],
            |row| row.get(0),
        )
        .optional()?;
    let Some(without_rowid) = without_rowid else {
        return Ok(None);
    };
    if without_rowid {
        return Ok(Some(TableLayout::WithoutRowid));
    }
    let integer_key: bool = conn.query_row(
        "SELECT count(*) > 0 FROM pragma_table_info('pagable_data') WHERE name = 'key_head'",
        [],
        |row| row.get(0),
    )?;
    Ok(Some(if integer_key {
        TableLayout::IntegerKey
    } else {
        TableLayout::Rowid
    }))
}

/// A chunked scan's columns: the record, or only its length (which SQLite reads from the
/// row header, without the record's overflow pages).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Column {
    Value,
    Length,
}

/// The table of one database: its layout, and how its keys split into head and tail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Table {
    pub(super) layout: TableLayout,
    /// How many of the key's leading bytes the integer head holds (`IntegerKey` only): 8,
    /// except in tests of shared heads.
    head_bytes: u8,
}

impl Table {
    /// The table in `layout`; `head_bytes` (clamped to 1..=8) only matters for `IntegerKey`.
    pub(super) fn new(layout: TableLayout, head_bytes: u8) -> Self {
        Self {
            layout,
            head_bytes: head_bytes.clamp(1, 8),
        }
    }

    /// Whether rows are found by key head and tail (the `IntegerKey` layout).
    pub(super) fn integer_key(&self) -> bool {
        self.layout == TableLayout::IntegerKey
    }

    /// The integer the key is stored under: its first `head_bytes` bytes, big-endian (with
    /// 8, the sign bit flipped), so that integer order is the order of those bytes and a
    /// batch sorted by key is inserted in rowid order.
    pub(super) fn head(&self, key: &[u8; 16]) -> i64 {
        let n = usize::from(self.head_bytes);
        let mut bytes = [0u8; 8];
        bytes[8 - n..].copy_from_slice(&key[..n]);
        let value = u64::from_be_bytes(bytes);
        if n == 8 {
            (value ^ (1 << 63)) as i64
        } else {
            value as i64
        }
    }

    /// The rest of the key, stored beside its head.
    pub(super) fn tail<'k>(&self, key: &'k [u8; 16]) -> &'k [u8] {
        &key[usize::from(self.head_bytes)..]
    }

    /// The key a main-table row stands for; `None` if it stands for none (a tail of the
    /// wrong length, a head out of range, the zero key).
    pub(super) fn join(&self, head: i64, tail: &[u8]) -> Option<DataKey> {
        let n = usize::from(self.head_bytes);
        if tail.len() != 16 - n {
            return None;
        }
        let value = if n == 8 {
            (head as u64) ^ (1 << 63)
        } else if head < 0 || (head as u64) >> (8 * n) != 0 {
            return None;
        } else {
            head as u64
        };
        let mut key = [0u8; 16];
        key[..n].copy_from_slice(&value.to_be_bytes()[8 - n..]);
        key[n..].copy_from_slice(tail);
        DataKey::from_slice(&key)
    }

    /// Runs `on_row` on the value stored under `key` (borrowed from SQLite), in the
    /// caller's transaction if one is open; `Ok(None)` if no row holds `key`.
    pub(super) fn read<R>(
        &self,
        conn: &Connection,
        key: &[u8; 16],
        on_row: impl FnOnce(ValueRef<'_>) -> R,
    ) -> rusqlite::Result<Option<R>> {
        if !self.integer_key() {
            let mut stmt = conn.prepare_cached("SELECT value FROM pagable_data WHERE key = ?1")?;
            let mut rows = stmt.query([&key[..]])?;
            return match rows.next()? {
                Some(row) => Ok(Some(on_row(row.get_ref(0)?))),
                None => Ok(None),
            };
        }
        {
            let mut stmt = conn
                .prepare_cached("SELECT key_tail, value FROM pagable_data WHERE key_head = ?1")?;
            let mut rows = stmt.query([self.head(key)])?;
            if let Some(row) = rows.next()? {
                if row.get_ref(0)?.as_blob().ok() == Some(self.tail(key)) {
                    return Ok(Some(on_row(row.get_ref(1)?)));
                }
            }
        }
        // No row for the head, or another key's: the key may have overflowed.
        let mut stmt =
            conn.prepare_cached("SELECT value FROM pagestore_overflow WHERE key = ?1")?;
        let mut rows = stmt.query([&key[..]])?;
        match rows.next()? {
            Some(row) => Ok(Some(on_row(row.get_ref(0)?))),
            None => Ok(None),
        }
    }

    /// Whether a row holds `key`, without reading its value (in `Rowid`, from the key index
    /// alone).
    pub(super) fn exists(&self, conn: &Connection, key: &[u8; 16]) -> rusqlite::Result<bool> {
        if !self.integer_key() {
            return conn
                .prepare_cached("SELECT 1 FROM pagable_data WHERE key = ?1")?
                .exists([&key[..]]);
        }
        let in_main = conn
            .prepare_cached("SELECT 1 FROM pagable_data WHERE key_head = ?1 AND key_tail = ?2")?
            .exists(rusqlite::params![self.head(key), self.tail(key)])?;
        // Not in its head's row: the key may have overflowed.
        Ok(in_main
            || conn
                .prepare_cached("SELECT 1 FROM pagestore_overflow WHERE key = ?1")?
                .exists([&key[..]])?)
    }

    /// Deletes the rows of `keys`, wherever they are; returns how many rows went.
    pub(super) fn delete<'k>(
        &self,
        conn: &Connection,
        keys: impl IntoIterator<Item = &'k [u8; 16]>,
    ) -> rusqlite::Result<u64> {
        let mut deleted = 0;
        if !self.integer_key() {
            let mut stmt = conn.prepare_cached("DELETE FROM pagable_data WHERE key = ?1")?;
            for key in keys {
                deleted += stmt.execute([&key[..]])? as u64;
            }
            return Ok(deleted);
        }
        // A key is in the overflow table only after a collision: while it is empty (almost
        // always), looking there is skipped.
        let overflow_used: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM pagestore_overflow)",
            [],
            |row| row.get(0),
        )?;
        let mut main =
            conn.prepare_cached("DELETE FROM pagable_data WHERE key_head = ?1 AND key_tail = ?2")?;
        let mut overflow = conn.prepare_cached("DELETE FROM pagestore_overflow WHERE key = ?1")?;
        for key in keys {
            deleted += main.execute(rusqlite::params![self.head(key), self.tail(key)])? as u64;
            if overflow_used {
                deleted += overflow.execute([&key[..]])? as u64;
            }
        }
        Ok(deleted)
    }

    /// The number of rows and the sum of their values' lengths.
    pub(super) fn count(&self, conn: &Connection) -> rusqlite::Result<(u64, u64)> {
        let count = |sql: &str| -> rusqlite::Result<(u64, u64)> {
            conn.query_row(sql, [], |row| Ok((row.get(0)?, row.get(1)?)))
        };
        let (mut rows, mut bytes) =
            count("SELECT count(*), coalesce(sum(length(value)), 0) FROM pagable_data")?;
        if self.integer_key() {
            let (more_rows, more_bytes) =
                count("SELECT count(*), coalesce(sum(length(value)), 0) FROM pagestore_overflow")?;
            rows += more_rows;
            bytes += more_bytes;
        }
        Ok((rows, bytes))
    }

    /// Rows whose key column holds something no scan by key reaches (not a BLOB, or an
    /// empty one): they hold no key, and a [`Scan`] does not visit them.
    pub(super) fn count_unreachable(&self, conn: &Connection) -> rusqlite::Result<u64> {
        let table = if self.integer_key() {
            // Every main row has an integer head, so a scan reaches every one.
            "pagestore_overflow"
        } else {
            "pagable_data"
        };
        conn.query_row(
            &format!("SELECT count(*) FROM {table} WHERE typeof(key) != 'blob' OR length(key) = 0"),
            [],
            |row| row.get(0),
        )
    }

    /// Deletes every row that holds no key (see [`join`](Self::join)); returns how many.
    pub(super) fn delete_malformed(&self, conn: &Connection) -> rusqlite::Result<u64> {
        const KEYED: &str = "typeof(key) != 'blob' OR length(key) != 16 OR key = zeroblob(16)";
        if !self.integer_key() {
            return Ok(
                conn.execute(&format!("DELETE FROM pagable_data WHERE {KEYED}"), [])? as u64,
            );
        }
        let mut malformed = Vec::new();
        {
            let mut stmt = conn.prepare("SELECT key_head, key_tail FROM pagable_data")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let head: i64 = row.get(0)?;
                let key = match row.get_ref(1)? {
                    ValueRef::Blob(tail) => self.join(head, tail),
                    _ => None,
                };
                if key.is_none() {
                    malformed.push(head);
                }
            }
        }
        let mut deleted = 0;
        {
            let mut stmt = conn.prepare("DELETE FROM pagable_data WHERE key_head = ?1")?;
            for head in malformed {
                deleted += stmt.execute([head])? as u64;
            }
        }
        deleted +=
            conn.execute(&format!("DELETE FROM pagestore_overflow WHERE {KEYED}"), [])? as u64;
        Ok(deleted)
    }
}

/// Where a chunked scan of the table stands.
#[derive(Debug, Clone)]
enum At {
    /// In a table ordered by `key`: the rows after this key.
    Key(Vec<u8>),
    /// In the `IntegerKey` main table: the rows from this head on.
    Head(i64),
    /// In the overflow table: the rows after this key.
    Overflow(Vec<u8>),
    Done,
}

/// A scan of every row in chunks, each in the caller's transaction of the moment (so that
/// a long scan holds no lock for long). `Rowid` and `WithoutRowid` tables in key order;
/// `IntegerKey` the main table in key order, then the overflow table in key order.
pub(super) struct Scan {
    table: Table,
    at: At,
}

impl Scan {
    /// A scan from the first row.
    pub(super) fn new(table: Table) -> Self {
        let at = if table.integer_key() {
            At::Head(i64::MIN)
        } else {
            At::Key(Vec::new())
        };
        Self { table, at }
    }

    /// Whether every row was visited.
    pub(super) fn is_done(&self) -> bool {
        matches!(self.at, At::Done)
    }

    /// Visits up to `limit` rows from where the scan stands: `visit(key, column)`, with
    /// `None` for a row that holds no key. Returns how many rows it visited.
    pub(super) fn step<E: From<rusqlite::Error>>(
        &mut self,
        conn: &Connection,
        limit: usize,
        column: Column,
        mut visit: impl FnMut(Option<DataKey>, ValueRef<'_>) -> Result<(), E>,
    ) -> Result<usize, E> {
        let value = match column {
            Column::Value => "value",
            Column::Length => "length(value)",
        };
        let limit_sql = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut seen = 0;
        match &mut self.at {
            At::Done => return Ok(0),
            At::Head(from) => {
                let sql = format!(
                    "SELECT key_head, key_tail, {value} FROM pagable_data WHERE key_head >= ?1 \
                     ORDER BY key_head LIMIT ?2"
                );
                let mut stmt = conn.prepare_cached(&sql)?;
                let mut rows = stmt.query(rusqlite::params![*from, limit_sql])?;
                let mut last = None;
                while let Some(row) = rows.next()? {
                    seen += 1;
                    let head: i64 = row.get(0)?;
                    last = Some(head);
                    let key = match row.get_ref(1)? {
                        ValueRef::Blob(tail) => self.table.join(head, tail),
                        _ => None,
                    };
                    visit(key, row.get_ref(2)?)?;
                }
                self.at = match last.and_then(|head| head.checked_add(1)) {
                    Some(next) if seen == limit => At::Head(next),
                    _ => At::Overflow(Vec::new()),
                };
            }
            At::Key(after) | At::Overflow(after) => {
                let after = std::mem::take(after);
                let overflow = matches!(self.at, At::Overflow(_));
                let table = if overflow {
                    "pagestore_overflow"
                } else {
                    "pagable_data"
                };
                let sql = format!(
                    "SELECT key, {value} FROM {table} WHERE key > ?1 ORDER BY key LIMIT ?2"
                );
                let mut stmt = conn.prepare_cached(&sql)?;
                let mut rows = stmt.query(rusqlite::params![&after[..], limit_sql])?;
                let mut next = after.clone();
                while let Some(row) = rows.next()? {
                    seen += 1;
                    let raw = row.get_ref(0)?.as_blob().unwrap_or_default();
                    next.clear();
                    next.extend_from_slice(raw);
                    visit(DataKey::from_slice(raw), row.get_ref(1)?)?;
                }
                self.at = match (seen == limit, overflow) {
                    (false, _) => At::Done,
                    (true, false) => At::Key(next),
                    (true, true) => At::Overflow(next),
                };
            }
        }
        Ok(seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_sort_like_the_key_bytes_and_join_back() {
        for head_bytes in [8, 1, 2] {
            let table = Table::new(TableLayout::IntegerKey, head_bytes);
            let mut keys: Vec<[u8; 16]> = vec![
                [0x00; 16],
                [0x7f; 16],
                [0x80; 16],
                [0xff; 16],
                *b"\x00\x00\x00\x00\x00\x00\x00\x00abcdefgh",
                *b"\x80\x00\x00\x00\x00\x00\x00\x01abcdefgh",
            ];
            keys[0][15] = 1; // not the zero key
            keys.sort();
            let heads: Vec<i64> = keys.iter().map(|k| table.head(k)).collect();
            assert!(
                heads.windows(2).all(|w| w[0] <= w[1]),
                "{head_bytes}: {heads:?}"
            );
            for key in &keys {
                let back = table.join(table.head(key), table.tail(key)).unwrap();
                assert_eq!(&back.as_bytes(), key);
            }
            assert_eq!(table.join(0, b"short"), None);
        }
        let one = Table::new(TableLayout::IntegerKey, 1);
        assert_eq!(one.join(256, &[1; 15]), None);
        assert_eq!(one.join(-1, &[1; 15]), None);
    }
}
