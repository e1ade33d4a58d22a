//! Helpers shared by the reliability tests: a seeded PRNG, a deterministic workload whose
//! nodes the checker can regenerate from the seed alone, environment knobs, and small file
//! utilities.

#![allow(dead_code)] // each test binary uses a different part of the shared helpers

pub mod redis_server;
pub mod tmpfs;
pub mod watched;

use std::path::Path;

use pagestore::{DataKey, PagableData};

/// splitmix64: tiny, seedable and good enough to pick sizes, offsets and timings. Every test
/// prints its seed so a failure can be replayed exactly.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent`/100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// Fills `out` with random bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        let mut chunks = out.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

/// A seed from the environment variable `var` (decimal or 0x-hex), else from the clock.
/// Printed by the caller so any run can be replayed.
pub fn seed_from_env(var: &str) -> u64 {
    match std::env::var(var) {
        Ok(text) => {
            let text = text.trim();
            let parsed = match text.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("{var}={text:?} is not a u64 seed"))
        }
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x5eed),
    }
}

/// A count from the environment variable `var`, else `default`.
pub fn count_from_env(var: &str, default: u64) -> u64 {
    match std::env::var(var) {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{var}={text:?} is not a count")),
        Err(_) => default,
    }
}

/// Blob sizes for a workload: mostly small (CI runs debug builds), some medium, a few at the
/// maximum, and the edge sizes 0 and `max` themselves.
pub fn blob_size(rng: &mut Rng, max: usize) -> usize {
    match rng.below(100) {
        0..=4 => 0,
        5..=69 => rng.below(1024) as usize,
        70..=93 => rng.range(1024, 16 * 1024) as usize,
        94..=96 => max,
        _ => rng.range(16 * 1024, max as u64) as usize,
    }
}

/// A reproducible stream of nodes: node `i` depends only on `seed`, `i` and the keys of the
/// nodes before it, so a checker that knows the seed regenerates exactly what a writer stored
/// (the writer may be a killed child process). About a third of the nodes point to up to three
/// earlier ones, so the store holds a DAG whose children must never dangle.
#[derive(Debug)]
pub struct Workload {
    seed: u64,
    max_blob: usize,
    keys: Vec<DataKey>,
}

impl Workload {
    /// A workload of blobs up to `max_blob` bytes.
    pub fn new(seed: u64, max_blob: usize) -> Workload {
        Workload {
            seed,
            max_blob,
            keys: Vec::new(),
        }
    }

    /// The next node (node number `self.len()`).
    pub fn next_node(&mut self) -> PagableData {
        let i = self.keys.len() as u64;
        let mut rng = Rng::new(self.seed ^ i.wrapping_mul(0xa076_1d64_78bd_642f));
        let size = blob_size(&mut rng, self.max_blob);
        let mut data = vec![0u8; size];
        rng.fill(&mut data);
        let arcs = if !self.keys.is_empty() && rng.percent(33) {
            (0..rng.range(1, 3))
                .map(|_| self.keys[rng.below(self.keys.len() as u64) as usize])
                .collect()
        } else {
            Vec::new()
        };
        let node = PagableData { data, arcs };
        self.keys.push(node.compute_key());
        node
    }

    /// The nodes generated so far, by key, in order.
    pub fn keys(&self) -> &[DataKey] {
        &self.keys
    }
}

/// Whether this process can ignore file permissions (root, or CAP_DAC_OVERRIDE), which makes
/// read-only-file tests meaningless. Learned by trying, not by reading the uid: containers run
/// as root without the capability and vice versa.
pub fn permissions_are_bypassed(scratch: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let probe = scratch.join(".permission-probe");
    std::fs::write(&probe, b"x").expect("write permission probe");
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o400))
        .expect("chmod permission probe");
    let bypassed = std::fs::OpenOptions::new().write(true).open(&probe).is_ok();
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o600)).ok();
    std::fs::remove_file(&probe).ok();
    bypassed
}

/// The effective uid, read from /proc (no `unsafe` libc call); `None` off Linux.
pub fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Runs `command` to completion like [`Command::output`](std::process::Command::output), but
/// SIGKILLs it and panics if it takes longer than `timeout`: a child that hangs (a deadlock
/// in the code under test) fails the test instead of stalling CI forever.
pub fn output_with_timeout(
    command: &mut std::process::Command,
    timeout: std::time::Duration,
) -> std::process::Output {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll the child") {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let err = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
            panic!("{command:?} hung for {timeout:?}; its stderr:\n{err}");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    std::process::Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// Runs `work` on its own thread and returns its result, or panics if it takes longer than
/// `timeout` (the thread is abandoned): a deadlock fails the test instead of hanging it.
pub fn within<T: Send + 'static>(
    timeout: std::time::Duration,
    what: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let _ = tx.send(work());
    });
    match rx.recv_timeout(timeout) {
        Ok(value) => {
            worker.join().expect("worker thread");
            value
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            // The work panicked: re-raise its panic here.
            match worker.join() {
                Err(panic) => std::panic::resume_unwind(panic),
                Ok(()) => unreachable!("the worker sends before it returns"),
            }
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what} did not finish within {timeout:?}: a hang or deadlock")
        }
    }
}

/// Damages the committed record of `key` behind the store's back: flushes, lets go of the
/// readers' held read transactions (so this outside writer gets its lock), then XORs the
/// record's byte at `offset` with `mask` through a separate SQLite connection.
pub fn damage_stored_record(
    storage: &pagestore::SqliteNodeStore,
    key: DataKey,
    offset: usize,
    mask: u8,
) {
    use pagestore::NodeStore;
    storage.flush().unwrap();
    storage.release_memory();
    let conn = rusqlite::Connection::open(storage.path()).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .unwrap();
    let (table, row) = record_row(&conn, key);
    let mut value: Vec<u8> = conn
        .query_row(
            &format!("SELECT value FROM {table} WHERE {row}"),
            [],
            |row| row.get(0),
        )
        .unwrap();
    value[offset] ^= mask;
    conn.execute(
        &format!("UPDATE {table} SET value = ?1 WHERE {row}"),
        [value],
    )
    .unwrap();
}

/// Where `key`'s row is in the database of `conn`, for tests that change it behind the
/// store's back: the table, and a condition (literals only) that selects the row. In the
/// `IntegerKey` layout (a `key_head` column) the main table's row of the key, or, if it is
/// not there, the overflow table's; in the others the row whose `key` is the key.
pub fn record_row(conn: &rusqlite::Connection, key: DataKey) -> (&'static str, String) {
    let bytes = key.as_bytes();
    let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let integer_key: bool = conn
        .query_row(
            "SELECT count(*) > 0 FROM pragma_table_info('pagable_data') WHERE name = 'key_head'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    if !integer_key {
        return ("pagable_data", format!("key = x'{}'", hex(&bytes)));
    }
    // The head's width, from a tail (8 bytes but in tests of shared heads).
    let tail_len: i64 = conn
        .query_row(
            "SELECT coalesce(max(length(key_tail)), 8) FROM pagable_data",
            [],
            |row| row.get(0),
        )
        .unwrap();
    let n = 16 - tail_len as usize;
    let mut head_bytes = [0u8; 8];
    head_bytes[8 - n..].copy_from_slice(&bytes[..n]);
    let head = u64::from_be_bytes(head_bytes);
    let head = if n == 8 {
        (head ^ (1 << 63)) as i64
    } else {
        head as i64
    };
    let main = format!("key_head = {head} AND key_tail = x'{}'", hex(&bytes[n..]));
    let in_main: bool = conn
        .query_row(
            &format!("SELECT count(*) > 0 FROM pagable_data WHERE {main}"),
            [],
            |row| row.get(0),
        )
        .unwrap();
    if in_main {
        ("pagable_data", main)
    } else {
        ("pagestore_overflow", format!("key = x'{}'", hex(&bytes)))
    }
}

/// Runs `check` on a scratch directory with permission bits in force. Root ignores them (CI
/// runs as root), so then the test `child` of this test binary is run as uid 65534 with `env`
/// set; it must call [`unprivileged_child`] with the same `check`. When neither is possible
/// the test is skipped loudly (naming `test` and `what` cannot be simulated).
pub fn with_permissions_in_force(
    test: &str,
    child: &str,
    env: &str,
    what: &str,
    check: impl FnOnce(&Path),
) {
    let scratch = tempfile::tempdir().unwrap();
    if !permissions_are_bypassed(scratch.path()) {
        check(scratch.path());
        return;
    }
    let why_not = if effective_uid() != Some(0) {
        "this process bypasses permissions (CAP_DAC_OVERRIDE) but is not root".to_string()
    } else {
        let mut command = std::process::Command::new("setpriv");
        command
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", child, "--nocapture"])
            .env(env, "1");
        let setpriv = std::process::Command::new("setpriv")
            .arg("--version")
            .output();
        match setpriv
            .map(|_| output_with_timeout(&mut command, std::time::Duration::from_secs(120)))
        {
            Ok(output) => {
                let stdout = String::from_utf8_lossy(&output.stdout);
                let stderr = String::from_utf8_lossy(&output.stderr);
                if stdout.contains("CHILD-OK") {
                    eprintln!("{what}, checked as uid 65534:\n{stderr}");
                    return;
                }
                assert!(
                    !stdout.contains("CHILD-STARTED"),
                    "the unprivileged child failed ({}):\n{stdout}\n{stderr}",
                    output.status
                );
                format!("setpriv could not start the child as uid 65534: {stderr}")
            }
            Err(e) => format!("cannot run setpriv: {e}"),
        }
    };
    eprintln!(
        "\n!!! SKIPPED {test}: this process (euid {:?}) ignores permission bits and {why_not}, \
         so {what} cannot be simulated. Run the tests as an ordinary user to cover it. !!!\n",
        effective_uid()
    );
}

/// The child side of [`with_permissions_in_force`]: runs `check` if this process is that
/// child (`env` is set), unprivileged.
pub fn unprivileged_child(env: &str, check: impl FnOnce(&Path)) {
    if std::env::var(env).is_err() {
        return; // Only meaningful as a child process.
    }
    println!("CHILD-STARTED");
    let scratch = tempfile::tempdir().expect("child: tempdir");
    assert!(
        !permissions_are_bypassed(scratch.path()),
        "the child still bypasses permissions (euid {:?})",
        effective_uid()
    );
    check(scratch.path());
    println!("CHILD-OK");
}

/// Runs `sql` on the row of `key` (see [`record_row`]), with `{table}` and `{row}` in it
/// replaced by the row's table and condition; returns the rows changed.
pub fn on_record(conn: &rusqlite::Connection, key: DataKey, sql: &str) -> usize {
    let (table, row) = record_row(conn, key);
    conn.execute(&sql.replace("{table}", table).replace("{row}", &row), [])
        .unwrap()
}

/// Every stored key's 16 bytes, in any layout (main and overflow tables).
pub fn stored_keys(conn: &rusqlite::Connection) -> std::collections::HashSet<Vec<u8>> {
    let integer_key: bool = conn
        .query_row(
            "SELECT count(*) > 0 FROM pragma_table_info('pagable_data') WHERE name = 'key_head'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    let keyed = |table: &str| -> Vec<Vec<u8>> {
        conn.prepare(&format!("SELECT key FROM {table}"))
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    if !integer_key {
        return keyed("pagable_data").into_iter().collect();
    }
    let mut keys: std::collections::HashSet<Vec<u8>> =
        keyed("pagestore_overflow").into_iter().collect();
    let mut stmt = conn
        .prepare("SELECT key_head, key_tail FROM pagable_data")
        .unwrap();
    let main = stmt
        .query_map([], |row| {
            let head: i64 = row.get(0)?;
            let tail: Vec<u8> = row.get(1)?;
            Ok((head, tail))
        })
        .unwrap();
    for row in main {
        let (head, tail) = row.unwrap();
        let n = 16 - tail.len();
        let head = if n == 8 {
            (head as u64) ^ (1 << 63)
        } else {
            head as u64
        };
        let mut key = head.to_be_bytes()[8 - n..].to_vec();
        key.extend_from_slice(&tail);
        keys.insert(key);
    }
    keys
}

/// The table a test inserts a row with a malformed key into: the one whose `key` column
/// is a BLOB (the overflow table in the `IntegerKey` layout).
pub fn keyed_table(conn: &rusqlite::Connection) -> &'static str {
    let integer_key: bool = conn
        .query_row(
            "SELECT count(*) > 0 FROM pragma_table_info('pagable_data') WHERE name = 'key_head'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    if integer_key {
        "pagestore_overflow"
    } else {
        "pagable_data"
    }
}
