//! [`VerifyReport`]: a scan of the whole store that re-hashes every record and checks that
//! every child key is present.

use std::path::Path;

use rusqlite::Connection;
use rusqlite::types::ValueRef;

use super::table::{Column, Scan, Table};

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

/// Scans every row of `conn`'s table (see [`Scan`]). `is_pending` says whether a key that
/// is not in the table yet is on its way (buffered, so not missing).
pub(super) fn scan(
    conn: &mut Connection,
    table: Table,
    path: &Path,
    is_pending: &dyn Fn(&DataKey) -> bool,
    progress: &mut dyn FnMut(u64),
) -> Result<VerifyReport, Error> {
    // The scan below counts every other malformed key itself; these are the rows it cannot
    // reach.
    let malformed_keys = table
        .count_unreachable(conn)
        .map_err(Error::sqlite("count malformed keys in", path))?;
    let mut report = VerifyReport {
        malformed_keys,
        ..VerifyReport::default()
    };
    let mut rows = Scan::new(table);
    while !rows.is_done() {
        scan_chunk(conn, table, &mut rows, &mut report, is_pending)
            .map_err(Error::sqlite("scan the records of", path))?;
        progress(report.records);
    }
    // A child committed after a step's snapshot began (possible in WAL mode while the writer
    // runs) was neither in that snapshot nor pending any more: look again, now.
    let mut still_missing = Vec::new();
    for (parent, child) in std::mem::take(&mut report.missing_children) {
        let exists = table
            .exists(conn, &child.as_bytes())
            .map_err(Error::sqlite("look up a child key in", path))?;
        if !exists && !is_pending(&child) {
            still_missing.push((parent, child));
        }
    }
    report.missing_children = still_missing;
    Ok(report)
}

/// Checks up to [`CHUNK`] rows from where `rows` stands, in one read transaction.
fn scan_chunk(
    conn: &mut Connection,
    table: Table,
    rows: &mut Scan,
    report: &mut VerifyReport,
    is_pending: &dyn Fn(&DataKey) -> bool,
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    let mut children = Vec::new();
    rows.step(&tx, CHUNK, Column::Value, |key, value| {
        report.records += 1;
        let Some(key) = key else {
            report.malformed_keys += 1;
            return Ok::<(), rusqlite::Error>(());
        };
        let record = match value {
            ValueRef::Blob(bytes) => codec::parse(bytes).ok(),
            _ => None,
        };
        match record {
            Some(record) if record.compute_key() == key => {
                children.extend(record.arcs().map(|child| (key, child)));
            }
            _ => report.corrupt.push(key),
        }
        Ok(())
    })?;
    for (parent, child) in children {
        if !is_pending(&child) && !table.exists(&tx, &child.as_bytes())? {
            report.missing_children.push((parent, child));
        }
    }
    tx.commit()?;
    Ok(())
}

/// What [`for_each_record`] calls with each row: its key, and its record or why it has none.
pub(super) type RecordVisitor<'a> =
    dyn FnMut(DataKey, Result<&[u8], Error>) -> anyhow::Result<()> + 'a;

/// Calls `visit` with every row's key and record (or, for a record that is not a BLOB, a
/// [`Error::Corrupt`]), in the order of [`Scan`], in short read transactions of [`CHUNK`]
/// rows. Rows with a malformed key are skipped (see [`VerifyReport::malformed_keys`]).
pub(super) fn for_each_record(
    conn: &mut Connection,
    table: Table,
    path: &Path,
    visit: &mut RecordVisitor<'_>,
) -> anyhow::Result<()> {
    let mut rows = Scan::new(table);
    while !rows.is_done() {
        let tx = conn
            .transaction()
            .map_err(Error::sqlite("begin a scan of", path))?;
        rows.step(&tx, CHUNK, Column::Value, |key, value| {
            let Some(key) = key else {
                return Ok::<(), anyhow::Error>(());
            };
            match value {
                ValueRef::Blob(bytes) => visit(key, Ok(bytes)),
                other => visit(
                    key,
                    Err(Error::Corrupt {
                        key,
                        reason: format!("the stored value is {}, not a BLOB", other.data_type()),
                    }),
                ),
            }
        })
        .map_err(|e| match e.downcast::<rusqlite::Error>() {
            Ok(e) => Error::sqlite("scan the records of", path)(e).into(),
            Err(e) => e,
        })?;
        tx.commit()
            .map_err(Error::sqlite("end a scan step of", path))?;
    }
    Ok(())
}
