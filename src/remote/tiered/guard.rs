//! Retries, backoff and the circuit breaker around a remote: every call the tiered store
//! makes to its remote goes through [`Guarded::call`].
//!
//! A remote that fails is retried a few times with growing pauses (a dropped connection, a
//! restarted server); one that keeps failing trips the breaker, after which calls fail at
//! once with [`Error::RemoteUnavailable`] instead of each waiting for a timeout, until a
//! probe ([`RemoteStore::ping`]) finds it back.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::remote::RemoteStore;

/// Whether the tiered store is asking its remote, as [`TieredStats::breaker`](super::TieredStats::breaker)
/// reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// The remote answers: calls go through.
    Closed,
    /// Recent calls failed: calls fail at once until the next probe is due.
    Open,
    /// A probe is deciding whether the remote is back.
    Probing,
}

/// How hard to try a remote before giving up on it for a while.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GuardPolicy {
    /// Attempts after the first failure of one call.
    pub retries: u32,
    /// The pause before the first retry; it doubles with each further one.
    pub backoff: Duration,
    /// Failed calls in a row (each after its retries) that open the breaker.
    pub failures_to_open: u32,
    /// The first wait of an open breaker before a probe; it doubles after each failed probe.
    pub cooldown: Duration,
    /// The longest wait between probes.
    pub max_cooldown: Duration,
}

#[derive(Debug)]
struct Breaker {
    state: BreakerState,
    failures_in_a_row: u32,
    cooldown: Duration,
    probe_at: Instant,
    last_error: String,
}

/// A remote with its retry policy and circuit breaker.
pub(crate) struct Guarded {
    remote: Box<dyn RemoteStore>,
    policy: GuardPolicy,
    breaker: Mutex<Breaker>,
    described: String,
}

/// The outcome of asking the breaker for permission.
enum Permit {
    Go,
    Probe,
}

impl Guarded {
    pub fn new(remote: Box<dyn RemoteStore>, policy: GuardPolicy) -> Self {
        let described = remote.describe();
        Guarded {
            remote,
            breaker: Mutex::new(Breaker {
                state: BreakerState::Closed,
                failures_in_a_row: 0,
                cooldown: policy.cooldown,
                probe_at: Instant::now(),
                last_error: String::new(),
            }),
            policy,
            described,
        }
    }

    /// The remote's description, for messages.
    pub fn describe(&self) -> &str {
        &self.described
    }

    /// The remote's batch size.
    pub fn limits(&self) -> crate::remote::BatchLimits {
        self.remote.limits()
    }

    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    /// How long until the breaker lets a probe through (zero unless it is open).
    pub fn retry_in(&self) -> Duration {
        let breaker = self.lock();
        match breaker.state {
            BreakerState::Open => breaker.probe_at.saturating_duration_since(Instant::now()),
            _ => Duration::ZERO,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Breaker> {
        // The breaker's fields are plain values that every path leaves consistent; a thread
        // that panicked elsewhere while holding it leaves nothing half-done.
        self.breaker.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn permit(&self) -> Result<Permit, Error> {
        let mut breaker = self.lock();
        match breaker.state {
            BreakerState::Closed => Ok(Permit::Go),
            BreakerState::Open if Instant::now() >= breaker.probe_at => {
                breaker.state = BreakerState::Probing;
                Ok(Permit::Probe)
            }
            BreakerState::Open | BreakerState::Probing => Err(Error::RemoteUnavailable {
                remote: self.described.clone(),
                cause: breaker.last_error.clone(),
                retry_in: breaker.probe_at.saturating_duration_since(Instant::now()),
            }),
        }
    }

    fn succeeded(&self) {
        let mut breaker = self.lock();
        breaker.state = BreakerState::Closed;
        breaker.failures_in_a_row = 0;
        breaker.cooldown = self.policy.cooldown;
    }

    fn failed(&self, error: &anyhow::Error, probing: bool) {
        let mut breaker = self.lock();
        breaker.last_error = format!("{error:#}");
        breaker.failures_in_a_row = breaker.failures_in_a_row.saturating_add(1);
        if probing {
            breaker.cooldown = (breaker.cooldown * 2).min(self.policy.max_cooldown);
        }
        if probing || breaker.failures_in_a_row >= self.policy.failures_to_open {
            if breaker.state != BreakerState::Open {
                log::warn!(
                    "remote store {} unavailable, local only for now: {error:#}",
                    self.described
                );
            }
            breaker.state = BreakerState::Open;
            breaker.probe_at = Instant::now() + breaker.cooldown;
        }
    }

    /// Runs `op` on the remote: at once while the breaker is closed, retried on failure
    /// with backoff; fails at once with [`Error::RemoteUnavailable`] while it is open. When
    /// a probe is due, this call pings the remote first and runs `op` only if it answers.
    pub fn call<T>(&self, op: impl Fn(&dyn RemoteStore) -> anyhow::Result<T>) -> anyhow::Result<T> {
        let probing = matches!(self.permit()?, Permit::Probe);
        if probing {
            if let Err(error) = self.remote.ping() {
                self.failed(&error, true);
                return Err(error);
            }
            log::info!("remote store {} answers again", self.described);
        }
        let mut pause = self.policy.backoff;
        let mut attempt = 0;
        loop {
            match op(&*self.remote) {
                Ok(value) => {
                    self.succeeded();
                    return Ok(value);
                }
                Err(error) if attempt < self.policy.retries && is_transient(&error) => {
                    attempt += 1;
                    std::thread::sleep(pause);
                    pause = pause.saturating_mul(2);
                }
                Err(error) => {
                    if is_transient(&error) {
                        self.failed(&error, false);
                    } else {
                        // The remote answered; what it said is the caller's to judge.
                        self.succeeded();
                    }
                    return Err(error);
                }
            }
        }
    }
}

/// Whether `error` is the remote failing (worth a retry), rather than an answer.
fn is_transient(error: &anyhow::Error) -> bool {
    matches!(error.downcast_ref::<Error>(), Some(Error::Remote { .. }))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    use super::*;
    use crate::key::DataKey;
    use crate::remote::MemoryRemoteStore;

    /// A remote that fails every call while `down` is set.
    struct Flaky {
        inner: MemoryRemoteStore,
        down: AtomicBool,
        calls: AtomicU32,
    }

    impl Flaky {
        fn check(&self) -> anyhow::Result<()> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Err(Error::Remote {
                    remote: "flaky".into(),
                    operation: "answer",
                    source: "connection refused".into(),
                }
                .into());
            }
            Ok(())
        }
    }

    impl RemoteStore for Flaky {
        fn describe(&self) -> String {
            "flaky".into()
        }
        fn find_missing(&self, keys: &[DataKey]) -> anyhow::Result<Vec<DataKey>> {
            self.check()?;
            self.inner.find_missing(keys)
        }
        fn get_many(&self, keys: &[DataKey]) -> anyhow::Result<Vec<Option<Vec<u8>>>> {
            self.check()?;
            self.inner.get_many(keys)
        }
        fn put_many(&self, records: &[(DataKey, &[u8])]) -> anyhow::Result<()> {
            self.check()?;
            self.inner.put_many(records)
        }
        fn set_root(&self, name: &str, key: DataKey) -> anyhow::Result<()> {
            self.check()?;
            self.inner.set_root(name, key)
        }
        fn root(&self, name: &str) -> anyhow::Result<Option<DataKey>> {
            self.check()?;
            self.inner.root(name)
        }
        fn roots(&self) -> anyhow::Result<Vec<(String, DataKey)>> {
            self.check()?;
            self.inner.roots()
        }
        fn remove_root(&self, name: &str) -> anyhow::Result<bool> {
            self.check()?;
            self.inner.remove_root(name)
        }
        fn ping(&self) -> anyhow::Result<()> {
            self.check()
        }
        fn for_each_key(
            &self,
            visit: &mut dyn FnMut(DataKey) -> anyhow::Result<()>,
        ) -> anyhow::Result<()> {
            self.check()?;
            self.inner.for_each_key(visit)
        }
    }

    fn policy() -> GuardPolicy {
        GuardPolicy {
            retries: 2,
            backoff: Duration::from_millis(1),
            failures_to_open: 2,
            cooldown: Duration::from_millis(50),
            max_cooldown: Duration::from_millis(200),
        }
    }

    /// A remote that is down, and the guard around it.
    fn down_remote() -> (std::sync::Arc<Flaky>, Guarded) {
        let flaky = std::sync::Arc::new(Flaky {
            inner: MemoryRemoteStore::new(),
            down: AtomicBool::new(true),
            calls: AtomicU32::new(0),
        });
        let guarded = Guarded::new(Box::new(std::sync::Arc::clone(&flaky)), policy());
        (flaky, guarded)
    }

    #[test]
    fn the_breaker_opens_fails_fast_and_closes_after_a_probe() {
        let (flaky, guarded) = down_remote();
        for _ in 0..2 {
            let err = guarded.call(|r| r.find_missing(&[])).unwrap_err();
            assert!(matches!(err.downcast_ref(), Some(Error::Remote { .. })));
        }
        assert_eq!(
            flaky.calls.load(Ordering::SeqCst),
            6,
            "1 + 2 retries, twice"
        );
        assert_eq!(guarded.state(), BreakerState::Open);

        let err = guarded.call(|r| r.find_missing(&[])).unwrap_err();
        assert!(matches!(
            err.downcast_ref(),
            Some(Error::RemoteUnavailable { .. })
        ));
        assert_eq!(
            flaky.calls.load(Ordering::SeqCst),
            6,
            "open: the remote is not asked"
        );

        flaky.down.store(false, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(60));
        assert!(guarded.call(|r| r.find_missing(&[])).unwrap().is_empty());
        assert_eq!(guarded.state(), BreakerState::Closed);
    }

    #[test]
    fn a_failed_probe_waits_longer() {
        let (_flaky, guarded) = down_remote();
        for _ in 0..2 {
            let _ = guarded.call(|r| r.ping());
        }
        std::thread::sleep(Duration::from_millis(60));
        let _ = guarded.call(|r| r.ping()); // the probe fails
        assert_eq!(guarded.state(), BreakerState::Open);
        assert!(
            guarded.retry_in() > Duration::from_millis(60),
            "cooldown doubled"
        );
    }
}
