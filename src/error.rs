//! [`Error`]: what pagestore itself reports.

use std::path::PathBuf;

use crate::key::DataKey;

/// An error raised by pagestore.
///
/// The [`PagableStorage`](crate::PagableStorage) and [`NodeStore`](crate::NodeStore) traits
/// return [`anyhow::Result`], the error type of the ecosystem they plug into. Errors that
/// pagestore raises travel inside it as an `Error`, which a caller recovers with
/// [`anyhow::Error::downcast_ref`] (context added on the way keeps it reachable):
///
/// ```
/// use pagestore::{DataKey, Error, InMemoryPagableStorage, PagableStorage};
///
/// let storage = InMemoryPagableStorage::new();
/// let key: DataKey = "0123456789abcdef0123456789abcdef".parse().unwrap();
/// let err = storage.fetch_data_blocking(&key).unwrap_err();
/// match err.downcast_ref::<Error>() {
///     Some(Error::NotFound(missing)) => assert_eq!(*missing, key),
///     other => panic!("unexpected: {other:?}"),
/// }
/// // Or, for the common question, without matching:
/// assert!(Error::is_not_found(&err));
/// ```
///
/// A message names what failed and, where one is, the key in hex; the underlying error
/// (I/O, SQLite) is the [`source`](std::error::Error::source), printed by `{:#}` on the
/// `anyhow::Error`, not repeated in the message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No node is stored under this key.
    #[error(
        "no data stored under key {0}: it was never stored here, or was stored in another store \
         or before a reset"
    )]
    NotFound(DataKey),

    /// The record stored under `key` is damaged: it does not decode, or its content does not
    /// hash to `key`. The damaged bytes are never returned.
    #[error(
        "the record stored under key {key} is corrupt ({reason}); run verify() to find all damaged \
         records, and store the value again from its source"
    )]
    Corrupt {
        /// The key whose record is damaged.
        key: DataKey,
        /// What is wrong with it.
        reason: String,
    },

    /// An I/O operation on `path` failed. The I/O error is the [`source`](std::error::Error::source).
    #[error("could not {operation} {}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// What pagestore was doing, as a verb phrase ("create directory", "open database").
        operation: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// SQLite failed while pagestore was doing `operation` on the database at `path`.
    /// SQLite's own error is the [`source`](std::error::Error::source).
    #[error("SQLite could not {operation} {}", path.display())]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// What pagestore was doing, as a verb phrase ("commit a batch to", "read a record from").
        operation: &'static str,
        /// SQLite's error (a `rusqlite::Error`; its type is not part of pagestore's API).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },

    /// A value could not be serialized for page-out: its `Serialize` impl failed, a
    /// [`Shared`](crate::Shared) was met outside the page-out's thread, or the graph has a cycle.
    #[error("could not page out a value of type `{type_name}`: {reason}")]
    Serialize {
        /// The type being serialized (the root's, or the shared value's).
        type_name: &'static str,
        /// What went wrong, with the original message of a custom serde error.
        reason: String,
    },

    /// The record stored under `key` does not deserialize as the type it was asked for.
    #[error(
        "the record stored under key {key} does not deserialize as `{type_name}` ({reason}); it \
         was written from another type or an incompatible version of it, or names a typetag \
         type this program does not register (keep `#[typetag::serde(name = \"...\")]` names \
         stable)"
    )]
    Deserialize {
        /// The key whose record failed to deserialize.
        key: DataKey,
        /// The type it was read as.
        type_name: &'static str,
        /// What went wrong, with the original message of a custom serde error.
        reason: String,
    },

    /// A node is too large for the store: its record would be `bytes` bytes, over the
    /// store's `limit` (for SQLite, `SqliteOptions::max_record_bytes`). Refused by `put`
    /// before anything is queued, so the store carries on.
    #[error(
        "the node under key {key} needs a {bytes}-byte record, over this store's limit of \
         {limit} bytes (SqliteOptions::max_record_bytes; SQLite allows at most 1000000000); \
         split its data across child nodes"
    )]
    TooLarge {
        /// The key of the refused node.
        key: DataKey,
        /// The size of the record it needs, as the store counts it against `limit` (for
        /// SQLite: the whole row, key and record header included).
        bytes: u64,
        /// The store's limit, in the same unit.
        limit: u64,
    },

    /// A paged-out [`PagableArc`](crate::PagableArc) was pinned (or an unstored one paged
    /// out) after its storage was dropped: the value cannot be read or written any more.
    #[error(
        "a PagableArc<{type_name}>{} needs its storage, which was dropped; keep the storage (an \
         Arc of it) alive as long as its paged values are used",
        key.map(|key| format!(" stored under key {key}")).unwrap_or_default()
    )]
    StoreClosed {
        /// The value's key, if it has one.
        key: Option<DataKey>,
        /// The value's type.
        type_name: &'static str,
    },

    /// A write (`put`, `store_data`, a page-out) to a store opened with
    /// [`SqliteOptions::read_only`](crate::SqliteOptions::read_only). Nothing was queued.
    #[error(
        "the store at {} was opened read-only (SqliteOptions::read_only) and cannot store data; \
         open it without read_only to write",
        path.display()
    )]
    ReadOnly {
        /// The database file.
        path: PathBuf,
    },

    /// A node names a child that is not stored: nodes are stored children first (a child a
    /// garbage collection deleted, because nothing reached it, must be stored again before a
    /// new parent names it). Nothing was stored.
    #[error(
        "cannot store {key}: its child {child} is not stored (store children before their \
         parents; a garbage collection deletes what no root or live value reaches)"
    )]
    MissingChild {
        /// The node that was refused.
        key: DataKey,
        /// The child it names that is not stored.
        child: DataKey,
    },

    /// The store does not support this operation (for example garbage collection on a
    /// [`NodeStore`](crate::NodeStore) that does not implement it).
    #[error("this store does not support {operation}")]
    Unsupported {
        /// What was asked.
        operation: &'static str,
    },

    /// A normal (read-write) open of a store whose directory this process cannot write in:
    /// a read-only directory or medium, or another user's directory. Opening for writing
    /// needs to create the lock and journal files beside the database; a read-only open
    /// ([`SqliteOptions::read_only`](crate::SqliteOptions::read_only)) needs none. The I/O
    /// error that showed it (its kind is `PermissionDenied` or `ReadOnlyFilesystem`) is the
    /// [`source`](std::error::Error::source).
    #[error(
        "the store directory {} is not writable ({}); open it with \
         SqliteOptions::read_only() to read it",
        path.display(),
        source.kind()
    )]
    NotWritable {
        /// The store's directory.
        path: PathBuf,
        /// The error of an attempt to create a file in it.
        #[source]
        source: std::io::Error,
    },

    /// An operation on a remote store ([`RemoteStore`](crate::remote::RemoteStore)) failed:
    /// the connection, a timeout, or the server's error, which is the
    /// [`source`](std::error::Error::source). The local store is unaffected.
    #[error("the remote store {remote} could not {operation}")]
    Remote {
        /// The remote, as its [`describe`](crate::remote::RemoteStore::describe) says.
        remote: String,
        /// What pagestore was doing, as a verb phrase ("read 512 records", "store 3 records").
        operation: &'static str,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },

    /// The remote store is not being asked: recent operations on it failed, and its circuit
    /// breaker waits before the next probe. Local reads and writes go on; what needs the
    /// remote (a node stored only there) fails with this until it is back.
    #[error(
        "the remote store {remote} is unavailable after repeated failures ({cause}); it is \
         probed again in {} ms",
        retry_in.as_millis()
    )]
    RemoteUnavailable {
        /// The remote, as its [`describe`](crate::remote::RemoteStore::describe) says.
        remote: String,
        /// The last failure, as text.
        cause: String,
        /// How long until the breaker lets a probe through.
        retry_in: std::time::Duration,
    },

    /// An earlier write failed, so the store no longer knows what reached disk; it refuses
    /// further writes instead of pretending they succeed.
    #[error(
        "an earlier write failed ({cause}); data stored since the last successful flush may be \
         lost. Close and re-open the store"
    )]
    Poisoned {
        /// The first failure, as text.
        cause: String,
    },
}

impl Error {
    /// Whether `err` (as returned by the storage trait) is a [`Error::NotFound`].
    pub fn is_not_found(err: &anyhow::Error) -> bool {
        matches!(err.downcast_ref::<Error>(), Some(Error::NotFound(_)))
    }

    /// Whether `err` (as returned by the storage trait) is a [`Error::Corrupt`].
    pub fn is_corrupt(err: &anyhow::Error) -> bool {
        matches!(err.downcast_ref::<Error>(), Some(Error::Corrupt { .. }))
    }

    /// Wraps an I/O error with the path and operation it concerns.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) fn io(
        operation: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io {
            path,
            operation,
            source,
        }
    }
}

#[cfg(feature = "sqlite")]
impl Error {
    /// Wraps a SQLite error with the database path and the operation it concerns.
    pub(crate) fn sqlite(
        operation: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(rusqlite::Error) -> Error {
        let path = path.into();
        move |source| Error::Sqlite {
            path,
            operation,
            source: Box::new(source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_key_in_hex_and_say_what_to_do() {
        let key: DataKey = "000102030405060708090a0b0c0d0e0f".parse().unwrap();
        let msg = Error::Corrupt {
            key,
            reason: "bad".into(),
        }
        .to_string();
        assert!(msg.contains("000102030405060708090a0b0c0d0e0f"), "{msg}");
        assert!(msg.contains("verify()"), "{msg}");
        let msg = Error::NotFound(key).to_string();
        assert!(msg.contains("000102030405060708090a0b0c0d0e0f"), "{msg}");
        let io = Error::io("open database", "/x/pagable.db")(std::io::ErrorKind::NotFound.into());
        assert!(
            io.to_string()
                .starts_with("could not open database /x/pagable.db"),
            "{io}"
        );
    }

    #[test]
    fn downcasts_through_anyhow() {
        let key: DataKey = "000102030405060708090a0b0c0d0e0f".parse().unwrap();
        let err = anyhow::Error::from(Error::NotFound(key));
        assert!(Error::is_not_found(&err));
        assert!(!Error::is_corrupt(&err));
        let err = err.context("while paging in");
        assert!(
            Error::is_not_found(&err),
            "context keeps the error reachable"
        );
    }
}
