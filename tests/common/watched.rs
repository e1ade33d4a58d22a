//! A remote wrapper for the tiered tests: it can be switched off (every call fails as a
//! network error would) and it checks the upload order (every record sent has its
//! children on the remote already).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use pagestore::remote::{BatchLimits, RemoteStore};
use pagestore::{DataKey, Error, codec};

/// `inner`, watched.
pub struct Watched<R> {
    pub inner: R,
    down: AtomicBool,
    /// Records sent whose children were not all on the remote before the call.
    violations: Mutex<Vec<String>>,
    records_sent: AtomicU64,
}

impl<R: RemoteStore> Watched<R> {
    pub fn new(inner: R) -> Self {
        Watched {
            inner,
            down: AtomicBool::new(false),
            violations: Mutex::new(Vec::new()),
            records_sent: AtomicU64::new(0),
        }
    }

    /// Makes every call fail (`true`) or go through (`false`).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// What was sent out of order, one line each.
    pub fn violations(&self) -> Vec<String> {
        self.violations.lock().unwrap().clone()
    }

    /// Records sent so far (each record of each `put_many`).
    pub fn records_sent(&self) -> u64 {
        self.records_sent.load(Ordering::SeqCst)
    }

    fn check(&self, operation: &'static str) -> anyhow::Result<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(Error::Remote {
                remote: self.inner.describe(),
                operation,
                source: "connection refused (switched off by the test)".into(),
            }
            .into());
        }
        Ok(())
    }
}

impl<R: RemoteStore> RemoteStore for Watched<R> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn limits(&self) -> BatchLimits {
        self.inner.limits()
    }
    fn find_missing(&self, keys: &[DataKey]) -> anyhow::Result<Vec<DataKey>> {
        self.check("find missing keys")?;
        self.inner.find_missing(keys)
    }
    fn get_many(&self, keys: &[DataKey]) -> anyhow::Result<Vec<Option<Vec<u8>>>> {
        self.check("read records")?;
        self.inner.get_many(keys)
    }
    fn put_many(&self, records: &[(DataKey, &[u8])]) -> anyhow::Result<()> {
        self.check("store records")?;
        let mut children = Vec::new();
        for (key, record) in records {
            let node = codec::decode(record).expect("the uploader sends valid records");
            assert_eq!(
                node.compute_key(),
                *key,
                "a record is sent under its own key"
            );
            children.extend(node.arcs.iter().map(|child| (*key, *child)));
        }
        let wanted: Vec<DataKey> = children.iter().map(|(_, c)| *c).collect();
        let missing = self.inner.find_missing(&wanted)?;
        if !missing.is_empty() {
            let mut violations = self.violations.lock().unwrap();
            for (parent, child) in children.iter().filter(|(_, c)| missing.contains(c)) {
                violations.push(format!("{parent} sent before its child {child}"));
            }
        }
        self.records_sent
            .fetch_add(records.len() as u64, Ordering::SeqCst);
        self.inner.put_many(records)
    }
    fn set_root(&self, name: &str, key: DataKey) -> anyhow::Result<()> {
        self.check("set a root")?;
        if !self.inner.find_missing(&[key])?.is_empty() {
            self.violations
                .lock()
                .unwrap()
                .push(format!("root {name:?} published before its key {key}"));
        }
        self.inner.set_root(name, key)
    }
    fn root(&self, name: &str) -> anyhow::Result<Option<DataKey>> {
        self.check("read a root")?;
        self.inner.root(name)
    }
    fn roots(&self) -> anyhow::Result<Vec<(String, DataKey)>> {
        self.check("list roots")?;
        self.inner.roots()
    }
    fn remove_root(&self, name: &str) -> anyhow::Result<bool> {
        self.check("remove a root")?;
        self.inner.remove_root(name)
    }
    fn ping(&self) -> anyhow::Result<()> {
        self.check("answer a ping")?;
        self.inner.ping()
    }
    fn for_each_key(
        &self,
        visit: &mut dyn FnMut(DataKey) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        self.check("list keys")?;
        self.inner.for_each_key(visit)
    }
}
