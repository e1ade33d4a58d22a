//! A panic on the SQLite store's writer thread poisons the store instead of hanging `flush`
//! and `Drop`. Its own test binary because it installs a global logger, one that panics
//! when the writer thread logs (the writer logs after every batch).

mod contract;

use std::sync::mpsc;
use std::time::Duration;

use contract::node;
use pagestore::{Durability, Error, PagableStorage, SqliteOptions};

/// The name of the store's writer thread.
const WRITER_THREAD: &str = "pagestore-sqlite-writer";

/// The text the logger panics with, looked for in the store's error.
const PANIC_TEXT: &str = "test logger refuses the writer thread";

struct PanicsOnTheWriter;

impl log::Log for PanicsOnTheWriter {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        if std::thread::current().name() == Some(WRITER_THREAD) {
            panic!("{PANIC_TEXT} ({})", record.args());
        }
    }

    fn flush(&self) {}
}

static LOGGER: PanicsOnTheWriter = PanicsOnTheWriter;

#[test]
fn a_panic_on_the_writer_thread_poisons_the_store_instead_of_hanging() {
    log::set_logger(&LOGGER).unwrap();
    log::set_max_level(log::LevelFilter::Trace);
    for durability in [Durability::Cache, Durability::Durable] {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let dir = tempfile::tempdir().unwrap();
            let storage = SqliteOptions::default()
                .durability(durability)
                .open(dir.path())
                .unwrap();
            // The writer panics after committing the first batch, so that flush may still
            // succeed; the second store or flush must see the poison.
            let (mut outcome, mut stored) = (None, Vec::new());
            for i in 0..2 {
                let node = node(i, 32, vec![]);
                match storage.store_data(node.clone()) {
                    Ok(_) => stored.push(node),
                    Err(err) => {
                        outcome = Some(err);
                        break;
                    }
                }
                if let Err(err) = storage.flush() {
                    outcome = Some(err);
                    break;
                }
            }
            let readable = stored.iter().all(|node| {
                storage
                    .fetch_data_blocking(&node.compute_key())
                    .is_ok_and(|got| *got == *node)
            });
            drop(storage);
            let _ = tx.send((outcome, readable));
        });
        let (outcome, readable) = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("{durability:?}: store, flush and drop hung"));
        let err = outcome.unwrap_or_else(|| panic!("{durability:?}: no error after the panic"));
        match err.downcast_ref::<Error>() {
            Some(Error::Poisoned { cause }) => {
                assert!(cause.contains(PANIC_TEXT), "{durability:?}: {cause}")
            }
            other => panic!("{durability:?}: expected Poisoned, got {other:?} ({err:#})"),
        }
        // Like a failed commit, a batch the writer did not finish stays readable.
        assert!(readable, "{durability:?}");
    }
}
