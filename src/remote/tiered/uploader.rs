//! The uploader: a thread that empties the upload queue into the remote, oldest entry
//! first, and publishes roots once their graphs are remote.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::Tiers;
use super::queue::Entry;
use super::transfer;
use crate::error::Error;
use crate::key::DataKey;

/// Entries read from the queue file per round.
const ENTRIES_PER_ROUND: usize = 4096;
/// How often the uploader looks at the queue when nobody wakes it.
const IDLE_WAKE: Duration = Duration::from_millis(100);

#[derive(Debug, Default)]
pub(super) struct Signal {
    wake: bool,
    stop: bool,
    /// Rounds that ended in an error, and the last one's text.
    failures: u64,
    last_error: Option<String>,
    /// Rounds finished, failed or not: a waiter knows the uploader has looked since.
    rounds: u64,
}

/// What the uploader thread and the store's waiters share.
#[derive(Debug, Default)]
pub(super) struct Control {
    signal: Mutex<Signal>,
    changed: Condvar,
}

impl Control {
    fn lock(&self) -> std::sync::MutexGuard<'_, Signal> {
        self.signal.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn wake(&self) {
        self.lock().wake = true;
        self.changed.notify_all();
    }

    fn stop(&self) {
        self.lock().stop = true;
        self.changed.notify_all();
    }
}

pub(super) struct Uploader {
    control: Arc<Control>,
    thread: Option<JoinHandle<()>>,
}

impl Uploader {
    pub fn start(tiers: Arc<Tiers>) -> Result<Self, Error> {
        let control = Arc::new(Control::default());
        let thread = {
            let control = Arc::clone(&control);
            std::thread::Builder::new()
                .name("pagestore-uploader".into())
                .spawn(move || run(&tiers, &control))
                .map_err(Error::io(
                    "start the uploader thread for",
                    "the upload queue",
                ))?
        };
        Ok(Uploader {
            control,
            thread: Some(thread),
        })
    }

    pub fn control(&self) -> &Control {
        &self.control
    }

    /// Blocks until the queue holds nothing up to `target` (a sequence number of the queue
    /// file), or a round fails after this call began: then that round's error.
    pub fn wait_until_uploaded(&self, tiers: &Tiers, target: i64) -> anyhow::Result<()> {
        let mut signal = self.control.lock();
        let failures_before = signal.failures;
        signal.wake = true;
        self.control.changed.notify_all();
        loop {
            drop(signal);
            if tiers.queue.first_seq()?.is_none_or(|first| first > target) {
                return Ok(());
            }
            signal = self.control.lock();
            if signal.failures != failures_before {
                let cause = signal.last_error.clone().unwrap_or_default();
                return Err(match tiers.remote.retry_in() {
                    retry_in if !retry_in.is_zero() => Error::RemoteUnavailable {
                        remote: tiers.remote.describe().to_owned(),
                        cause,
                        retry_in,
                    }
                    .into(),
                    _ => {
                        anyhow::anyhow!("uploading to {} failed: {cause}", tiers.remote.describe())
                    }
                });
            }
            let rounds = signal.rounds;
            while signal.rounds == rounds && !signal.stop {
                signal = self
                    .control
                    .changed
                    .wait_timeout(signal, IDLE_WAKE)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            if signal.stop {
                return Err(anyhow::anyhow!("the uploader stopped"));
            }
        }
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        self.control.stop();
        if let Some(thread) = self.thread.take() {
            // A remote call in progress ends within its timeout; what is left stays queued.
            let _ = thread.join();
        }
    }
}

fn run(tiers: &Tiers, control: &Control) {
    loop {
        {
            let mut signal = control.lock();
            if !signal.wake && !signal.stop {
                signal = control
                    .changed
                    .wait_timeout(signal, IDLE_WAKE)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            if signal.stop {
                break;
            }
            signal.wake = false;
        }
        let outcome = round(tiers, control);
        let mut signal = control.lock();
        signal.rounds += 1;
        if let Err(error) = &outcome {
            signal.failures += 1;
            signal.last_error = Some(format!("{error:#}"));
        }
        control.changed.notify_all();
        if outcome.is_err() {
            // Wait for the breaker's next probe (or a short pause) before trying again;
            // a stop or a new store wakes us sooner.
            let pause = tiers.remote.retry_in().max(IDLE_WAKE);
            let _ = control.changed.wait_timeout(signal, pause);
        }
    }
    // Whatever is still buffered goes to the file, to be uploaded after the next open.
    if let Err(error) = tiers.queue.persist() {
        log::warn!("could not keep the upload queue: {error}");
    }
}

/// Persists the buffer, then works through the queue file until it is empty, a stop is
/// asked, or something fails.
fn round(tiers: &Tiers, control: &Control) -> anyhow::Result<()> {
    tiers.queue.persist()?;
    loop {
        if control.lock().stop {
            return Ok(());
        }
        let entries = tiers.queue.peek(ENTRIES_PER_ROUND)?;
        let Some(&(last, _)) = entries.last() else {
            return Ok(());
        };
        let nodes: Vec<DataKey> = entries
            .iter()
            .filter_map(|(_, e)| match e {
                Entry::Node(key) => Some(*key),
                _ => None,
            })
            .collect();
        let uploaded = transfer::upload(tiers, &nodes)?;
        tiers
            .stats
            .upload_skipped
            .fetch_add(uploaded.skipped, Ordering::Relaxed);
        // Roots in queue order, each after the nodes above (and its own graph, which
        // `upload` checks again: a root may name nodes queued long ago or filled from the
        // remote).
        for (_, entry) in &entries {
            match entry {
                Entry::Node(_) => {}
                Entry::SetRoot(name, key) => {
                    if !transfer::upload(tiers, &[*key])?.complete {
                        log::warn!(
                            "not publishing root {name:?}: part of its graph is in neither store"
                        );
                        continue;
                    }
                    tiers.remote.call(|r| r.set_root(name, *key))?;
                    tiers.stats.roots_published.fetch_add(1, Ordering::Relaxed);
                }
                Entry::RemoveRoot(name) => {
                    tiers.remote.call(|r| r.remove_root(name))?;
                }
            }
        }
        tiers.queue.remove_through(last)?;
    }
}
