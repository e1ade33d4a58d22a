//! [`VerifyReport`]: a scan of the whole store that re-hashes every record and checks that
//! every child key is present.

use std::path::Path;

use rusqlite::Connection;

use crate::codec;
use crate::error::Error;
use crate::key::DataKey;

/// Rows per scan step. Each step is its own short read transaction, so a scan of a large
/// store never holds a lock long enough to stall the writer.
const CHUNK: usize = 4096;

/// What [`verify`](super::SqliteNodeStore::verify) found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Rows scanned.
    pub records: u64,
    /// Keys whose record does not decode or does not hash to the key.
    pub corrupt: Vec<DataKey>,
    /// `(parent, child)` pairs where the parent's record names a child that is not stored.
    pub missing_children: Vec<(DataKey, DataKey)>,
    /// Rows whose key column is not a 16-byte, non-zero BLOB (never written by pagestore or
    /// the reference; such rows can never be fetched).
    pub malformed_keys: u64,
}

impl VerifyReport {
    /// Whether nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.corrupt.is_empty() && self.missing_children.is_empty() && self.malformed_keys == 0
    }
}

/// Scans every row of `conn`'s table in key order. `is_pending` says whether a key that is
/// not in the table yet is on its way (buffered, so not missing).
pub(super) fn scan(
    conn: &mut Connection,
    path: &Path,
    is_pending: &dyn Fn(&DataKey) -> bool,
    progress: &mut dyn FnMut(u64),
) -> Result<VerifyReport, Error> {
    let malformed_keys = conn
        .query_row(
            // The scan below visits keys greater than x'', so it counts every other
            // malformed key itself; these are the rows it cannot reach.
            "SELECT count(*) FROM pagable_data WHERE typeof(key) != 'blob' OR length(key) = 0",
            [],
            |row| row.get(0),
        )
        .map_err(Error::sqlite("count malformed keys in", path))?;
    let mut report = VerifyReport {
        malformed_keys,
        ..VerifyReport::default()
    };
    let mut after: Vec<u8> = Vec::new();
    loop {
        let rows = scan_chunk(conn, &mut after, &mut report, is_pending)
            .map_err(Error::sqlite("scan the records of", path))?;
        progress(report.records);
        if rows < CHUNK {
            break;
        }
    }
    // A child committed after a step's snapshot began (possible in WAL mode while the writer
    // runs) was neither in that snapshot nor pending any more: look again, now.
    let mut still_missing = Vec::new();
    for (parent, child) in std::mem::take(&mut report.missing_children) {
        let exists = conn
            .prepare_cached("SELECT 1 FROM pagable_data WHERE key = ?1")
            .and_then(|mut stmt| stmt.exists([&child.as_bytes()[..]]))
            .map_err(Error::sqlite("look up a child key in", path))?;
        if !exists && !is_pending(&child) {
            still_missing.push((parent, child));
        }
    }
    report.missing_children = still_missing;
    Ok(report)
}

/// Checks up to [`CHUNK`] rows after `after` in one read transaction; returns how many.
fn scan_chunk(
    conn: &mut Connection,
    after: &mut Vec<u8>,
    report: &mut VerifyReport,
    is_pending: &dyn Fn(&DataKey) -> bool,
) -> rusqlite::Result<usize> {
    let tx = conn.transaction()?;
    let mut children = Vec::new();
    let mut rows_seen = 0;
    {
        let mut stmt = tx.prepare_cached(
            "SELECT key, value FROM pagable_data WHERE key > ?1 ORDER BY key LIMIT ?2",
        )?;
        let mut rows = stmt.query(rusqlite::params![&after[..], CHUNK as i64])?;
        while let Some(row) = rows.next()? {
            rows_seen += 1;
            report.records += 1;
            let raw_key = row.get_ref(0)?.as_blob().unwrap_or_default();
            after.clear();
            after.extend_from_slice(raw_key);
            let Some(key) = DataKey::from_slice(raw_key) else {
                report.malformed_keys += 1;
                continue;
            };
            let record = match row.get_ref(1)?.as_blob() {
                Ok(bytes) => codec::parse(bytes).ok(),
                Err(_) => None,
            };
            match record {
                Some(record) if record.compute_key() == key => {
                    children.extend(record.arcs().map(|child| (key, child)));
                }
                _ => report.corrupt.push(key),
            }
        }
    }
    {
        let mut exists = tx.prepare_cached("SELECT 1 FROM pagable_data WHERE key = ?1")?;
        for (parent, child) in children {
            if !is_pending(&child) && !exists.exists([&child.as_bytes()[..]])? {
                report.missing_children.push((parent, child));
            }
        }
    }
    tx.commit()?;
    Ok(rows_seen)
}

/// What [`for_each_record`] calls with each row: its key, and its record or why it has none.
pub(super) type RecordVisitor<'a> =
    dyn FnMut(DataKey, Result<&[u8], Error>) -> anyhow::Result<()> + 'a;

/// Calls `visit` with every row's key and record (or, for a record that is not a BLOB, a
/// [`Error::Corrupt`]), in key order, in short read transactions of [`CHUNK`] rows. Rows with
/// a malformed key are skipped (see [`VerifyReport::malformed_keys`]).
pub(super) fn for_each_record(
    conn: &mut Connection,
    path: &Path,
    visit: &mut RecordVisitor<'_>,
) -> anyhow::Result<()> {
    let mut after: Vec<u8> = Vec::new();
    loop {
        let tx = conn
            .transaction()
            .map_err(Error::sqlite("begin a scan of", path))?;
        let mut rows_seen = 0;
        {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT key, value FROM pagable_data WHERE key > ?1 ORDER BY key LIMIT ?2",
                )
                .map_err(Error::sqlite("scan the records of", path))?;
            let mut rows = stmt
                .query(rusqlite::params![&after[..], CHUNK as i64])
                .map_err(Error::sqlite("scan the records of", path))?;
            while let Some(row) = rows
                .next()
                .map_err(Error::sqlite("scan the records of", path))?
            {
                rows_seen += 1;
                let raw_key = row
                    .get_ref(0)
                    .map_err(Error::sqlite("scan the records of", path))?
                    .as_blob()
                    .unwrap_or_default();
                after.clear();
                after.extend_from_slice(raw_key);
                let Some(key) = DataKey::from_slice(raw_key) else {
                    continue;
                };
                let value = row
                    .get_ref(1)
                    .map_err(Error::sqlite("scan the records of", path))?;
                match value.as_blob() {
                    Ok(bytes) => visit(key, Ok(bytes))?,
                    Err(_) => visit(
                        key,
                        Err(Error::Corrupt {
                            key,
                            reason: format!(
                                "the stored value is {}, not a BLOB",
                                value.data_type()
                            ),
                        }),
                    )?,
                }
            }
        }
        tx.commit()
            .map_err(Error::sqlite("end a scan step of", path))?;
        if rows_seen < CHUNK {
            return Ok(());
        }
    }
}
