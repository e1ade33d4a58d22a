//! [`RedisStore`]: the remote tier on a Redis server or a Redis Cluster (feature `redis`).
//!
//! Redis is the first remote because it is what teams already run as a shared cache: one
//! server (or a cluster) that many machines reach in well under a millisecond. The store
//! speaks to it through the `redis` crate's blocking client, on connections it pools, with
//! a timeout on every connect, read and write: a remote that stops answering turns into an
//! [`Error::Remote`](crate::Error::Remote) after about that long, never a hung caller.
//!
//! # Layout
//!
//! - A record lives under the string key `<prefix>:n:<key in hex>` (32 lowercase hex digits,
//!   the key's [`Display`](std::fmt::Display) form); its value is the record's bytes exactly
//!   as given, the same bytes as the SQLite store's `value` column. With
//!   [`RedisOptions::hash_tags`] the key is `<prefix>:n:{<first 2 hex digits>}<other 30>`
//!   instead, which a Redis Cluster places by the braced tag only.
//! - The roots are the fields of one hash, `<prefix>:roots`: field = the root's name (UTF-8),
//!   value = its key in hex (32 digits), so both are readable with `redis-cli`.
//!
//! docs/remote.md says which server settings a store needs (`maxmemory-policy noeviction`
//! for one that must keep every child) and what happens under an evicting one.

use std::collections::HashSet;
use std::error::Error as StdError;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::cluster::{ClusterClient, ClusterConnection};
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Value};

use super::{BatchLimits, RemoteStore};
use crate::error::Error;
use crate::key::DataKey;

/// What a failed exchange with the server carries up to [`Error::Remote`]'s `source`.
type Failure = Box<dyn StdError + Send + Sync + 'static>;

/// SCAN's page size: a hint to the server, which may return more or fewer keys per page.
const SCAN_COUNT: usize = 1000;

/// How a [`RedisStore`] connects and lays out its keys. Every setter says its default.
///
/// ```no_run
/// use std::time::Duration;
/// use pagestore::remote::{RedisOptions, RemoteStore};
///
/// let store = RedisOptions::new()
///     .prefix("build-cache")
///     .io_timeout(Duration::from_millis(500))
///     .connect("redis://cache.internal:6379")?;
/// println!("using {}", store.describe());
/// # anyhow::Ok(())
/// ```
#[derive(Debug, Clone)]
pub struct RedisOptions {
    prefix: String,
    connect_timeout: Duration,
    io_timeout: Duration,
    limits: BatchLimits,
    max_idle: usize,
    hash_tags: bool,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            prefix: "pagestore".to_owned(),
            connect_timeout: Duration::from_secs(2),
            io_timeout: Duration::from_secs(1),
            limits: BatchLimits::default(),
            max_idle: 8,
            hash_tags: false,
        }
    }
}

impl RedisOptions {
    /// The defaults, each named by its setter.
    pub fn new() -> Self {
        Self::default()
    }

    /// The namespace every key of this store starts with, so that several stores (or other
    /// data) share one server. Must not contain `{` or `}` (they would change where a
    /// cluster places keys). Default `"pagestore"`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long opening one connection (TCP and the first exchange) may take. Default 2 s:
    /// a cache tier on the same network answers in milliseconds, and a caller is better
    /// served by an error it can fall back from than by a long wait.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long one read or one write on a connection may block (set on the socket of
    /// every connection). Default 1 s: a batch of 512 small records takes a few
    /// milliseconds, so a second means the server is stopped or overloaded. A batch of
    /// large records on a slow link may need more.
    pub fn io_timeout(mut self, timeout: Duration) -> Self {
        self.io_timeout = timeout;
        self
    }

    /// The size of one round trip. Default [`BatchLimits::default`] (512 keys, 4 MiB).
    pub fn batch_limits(mut self, limits: BatchLimits) -> Self {
        self.limits = limits;
        self
    }

    /// How many idle connections the store keeps for reuse; more callers at once open
    /// more, and close the extra ones when done. Default 8.
    pub fn max_idle_connections(mut self, max: usize) -> Self {
        self.max_idle = max;
        self
    }

    /// Whether record keys carry a hash tag of their first key byte
    /// (`<prefix>:n:{ab}cdef…`), which places them on 256 cluster slots instead of spreading
    /// them by the whole key. It changes the key layout: every client of one store must use
    /// the same setting. Default `false`; docs/remote.md has the measurement behind it.
    pub fn hash_tags(mut self, on: bool) -> Self {
        self.hash_tags = on;
        self
    }

    /// Connects to one Redis server (`redis://[user:password@]host:port[/db]`, or
    /// `rediss://` for TLS if the `redis` crate was built with it) and checks that it
    /// answers `PING`.
    pub fn connect(self, url: &str) -> anyhow::Result<RedisStore> {
        let describe = format!("{} (prefix {:?})", redact(url), self.prefix);
        self.check_prefix(&describe)?;
        let client = redis::Client::open(url).map_err(|e| remote(&describe, "connect", e))?;
        RedisStore::start(Client::Single(client), self, describe)
    }

    /// Connects to a Redis Cluster through any of its nodes (`urls`, one or more of them)
    /// and checks that it answers `PING`. Keys are routed to the shard that owns them; a
    /// batch that spans shards is sent to all of them at once.
    pub fn connect_cluster(self, urls: &[impl AsRef<str>]) -> anyhow::Result<RedisStore> {
        let urls: Vec<&str> = urls.iter().map(AsRef::as_ref).collect();
        let shown: Vec<String> = urls.iter().map(|url| redact(url)).collect();
        let describe = format!(
            "redis cluster {} (prefix {:?})",
            shown.join(","),
            self.prefix
        );
        self.check_prefix(&describe)?;
        let client = ClusterClient::builder(urls)
            .connection_timeout(self.connect_timeout)
            .response_timeout(self.io_timeout)
            // A redirect (MOVED/ASK after a resharding) needs a retry; a dead node should
            // fail the call soon rather than after the crate's default back-off of seconds.
            .retries(2)
            .min_retry_wait(10)
            .max_retry_wait(100)
            .build()
            .map_err(|e| remote(&describe, "connect", e))?;
        RedisStore::start(Client::Cluster(client), self, describe)
    }

    fn check_prefix(&self, describe: &str) -> anyhow::Result<()> {
        if self.prefix.contains(['{', '}']) {
            return Err(remote(
                describe,
                "use its prefix",
                "a prefix must not contain '{' or '}'",
            ));
        }
        Ok(())
    }
}

/// A [`RemoteStore`] on Redis: records as string keys, roots in one hash (the module docs
/// give the layout).
///
/// Every method makes one round trip per batch of at most [`RedisOptions::batch_limits`]:
/// a pipeline of `EXISTS` ([`find_missing`](RemoteStore::find_missing)), one `MGET` (a
/// pipeline of `GET` on a cluster; [`get_many`](RemoteStore::get_many)) or a pipeline of
/// `SET` ([`put_many`](RemoteStore::put_many)). Connections are pooled and shared by
/// threads; one that fails is closed, and so are the idle ones (a failure usually means the
/// server went away, and they would fail next), so the call after a failure connects anew.
pub struct RedisStore {
    client: Client,
    options: RedisOptions,
    describe: String,
    idle: Mutex<Vec<Conn>>,
    round_trips: AtomicU64,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("remote", &self.describe)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

enum Client {
    Single(redis::Client),
    Cluster(ClusterClient),
}

enum Conn {
    Single(redis::Connection),
    // Boxed: it holds a connection per node and would make every pooled `Single` as big.
    Cluster(Box<ClusterConnection>),
}

impl Conn {
    /// Sends `cmds` as one pipeline and reads every reply.
    fn pipeline(&mut self, cmds: Vec<Cmd>) -> Result<Vec<Value>, Failure> {
        match self {
            Conn::Single(conn) => {
                let mut pipe = redis::pipe();
                for cmd in cmds {
                    pipe.add_command(cmd);
                }
                Ok(pipe.query(conn)?)
            }
            Conn::Cluster(conn) => {
                let mut pipe = redis::cluster::cluster_pipe();
                for cmd in cmds {
                    pipe.add_command(cmd);
                }
                Ok(pipe.query(conn)?)
            }
        }
    }

    /// Sends one command (routed by its key on a cluster).
    fn command(&mut self, cmd: &Cmd) -> Result<Value, Failure> {
        let reply = match self {
            Conn::Single(conn) => cmd.query(conn)?,
            Conn::Cluster(conn) => cmd.query(&mut **conn)?,
        };
        Ok(reply)
    }
}

impl RedisStore {
    /// Connects to one server with the default [`RedisOptions`] (prefix `"pagestore"`).
    pub fn connect(url: &str) -> anyhow::Result<RedisStore> {
        RedisOptions::new().connect(url)
    }

    /// Connects to a Redis Cluster with the default [`RedisOptions`].
    pub fn connect_cluster(urls: &[impl AsRef<str>]) -> anyhow::Result<RedisStore> {
        RedisOptions::new().connect_cluster(urls)
    }

    /// The round trips made so far: one per request sent and answered or failed (a
    /// pipeline counts once, also when a cluster spreads it over several shards at once).
    /// Tests use it to check that callers batch.
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// The options it was connected with.
    pub fn options(&self) -> &RedisOptions {
        &self.options
    }

    /// The Redis key of `key`'s record (see the module docs for the layout).
    pub fn record_key(&self, key: &DataKey) -> String {
        let hex = key.to_string();
        if self.options.hash_tags {
            format!("{}:n:{{{}}}{}", self.options.prefix, &hex[..2], &hex[2..])
        } else {
            format!("{}:n:{hex}", self.options.prefix)
        }
    }

    /// The Redis key of the roots' hash.
    pub fn roots_key(&self) -> String {
        format!("{}:roots", self.options.prefix)
    }

    fn start(client: Client, options: RedisOptions, describe: String) -> anyhow::Result<Self> {
        let store = RedisStore {
            client,
            options,
            describe,
            idle: Mutex::new(Vec::new()),
            round_trips: AtomicU64::new(0),
        };
        store.ping_as("connect")?;
        Ok(store)
    }

    fn open_conn(&self) -> Result<Conn, Failure> {
        let io = Some(self.options.io_timeout);
        match &self.client {
            Client::Single(client) => {
                let conn = client.get_connection_with_timeout(self.options.connect_timeout)?;
                conn.set_read_timeout(io)?;
                conn.set_write_timeout(io)?;
                Ok(Conn::Single(conn))
            }
            Client::Cluster(client) => {
                let conn = client.get_connection()?;
                conn.set_read_timeout(io)?;
                conn.set_write_timeout(io)?;
                Ok(Conn::Cluster(Box::new(conn)))
            }
        }
    }

    /// Runs `work` on a pooled connection (a new one if none is idle). A connection whose
    /// work failed is closed, and the idle ones with it.
    fn with_conn<T>(
        &self,
        operation: &'static str,
        work: impl FnOnce(&mut Conn, &AtomicU64) -> Result<T, Failure>,
    ) -> anyhow::Result<T> {
        let pooled = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let mut conn = match pooled {
            Some(conn) => conn,
            None => self
                .open_conn()
                .map_err(|e| remote(&self.describe, operation, e))?,
        };
        match work(&mut conn, &self.round_trips) {
            Ok(value) => {
                if let Ok(mut idle) = self.idle.lock()
                    && idle.len() < self.options.max_idle
                {
                    idle.push(conn);
                }
                Ok(value)
            }
            Err(e) => {
                if let Ok(mut idle) = self.idle.lock() {
                    idle.clear();
                }
                Err(remote(&self.describe, operation, e))
            }
        }
    }

    fn ping_as(&self, operation: &'static str) -> anyhow::Result<()> {
        self.with_conn(operation, |conn, trips| {
            trips.fetch_add(1, Ordering::Relaxed);
            match conn.command(&redis::cmd("PING"))? {
                Value::SimpleString(s) if s == "PONG" => Ok(()),
                Value::Okay => Ok(()),
                other => Err(unexpected("PING", &other)),
            }
        })
    }

    fn parse_record_key(&self, redis_key: &[u8]) -> Option<DataKey> {
        let text = std::str::from_utf8(redis_key).ok()?;
        let rest = text.strip_prefix(self.options.prefix.as_str())?;
        let rest = rest.strip_prefix(":n:")?;
        let hex: String = rest.chars().filter(|c| !matches!(c, '{' | '}')).collect();
        hex.parse().ok()
    }

    /// `SCAN … MATCH <prefix>:n:*` pattern, the prefix's glob characters escaped.
    fn scan_pattern(&self) -> String {
        let mut pattern = String::new();
        for c in self.options.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push_str(":n:*");
        pattern
    }

    /// One SCAN page, on the node at `node` for a cluster: the next cursor and the keys.
    fn scan_page(
        &self,
        node: Option<&(String, u16)>,
        cursor: u64,
    ) -> anyhow::Result<(u64, Vec<DataKey>)> {
        let pattern = self.scan_pattern();
        self.with_conn("list its keys", |conn, trips| {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT);
            trips.fetch_add(1, Ordering::Relaxed);
            let reply = match (conn, node) {
                (Conn::Cluster(conn), Some((host, port))) => {
                    let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                        host: host.clone(),
                        port: *port,
                    });
                    conn.route_command(&cmd, route)?
                }
                (conn, _) => conn.command(&cmd)?,
            };
            let Value::Array(parts) = reply else {
                return Err(unexpected("SCAN", &reply));
            };
            let [next, Value::Array(names)] = parts.as_slice() else {
                return Err(unexpected("SCAN", &Value::Array(parts)));
            };
            let next = match next {
                Value::BulkString(b) => std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()),
                Value::SimpleString(s) => s.parse().ok(),
                Value::Int(n) => u64::try_from(*n).ok(),
                _ => None,
            }
            .ok_or_else(|| unexpected("SCAN", next))?;
            let keys = names
                .iter()
                .filter_map(|name| match name {
                    Value::BulkString(b) => self.parse_record_key(b),
                    _ => None,
                })
                .collect();
            Ok((next, keys))
        })
    }

    /// The cluster's masters as `(host, port)`, from `CLUSTER SLOTS`.
    fn masters(&self) -> anyhow::Result<Vec<(String, u16)>> {
        self.with_conn("list its cluster nodes", |conn, trips| {
            trips.fetch_add(1, Ordering::Relaxed);
            let reply = conn.command(&redis::cmd("CLUSTER").arg("SLOTS").clone())?;
            let Value::Array(ranges) = &reply else {
                return Err(unexpected("CLUSTER SLOTS", &reply));
            };
            let mut masters: Vec<(String, u16)> = Vec::new();
            for range in ranges {
                let master = match range {
                    Value::Array(fields) => match fields.get(2) {
                        Some(Value::Array(node)) => match (node.first(), node.get(1)) {
                            (Some(Value::BulkString(host)), Some(Value::Int(port))) => {
                                String::from_utf8(host.clone())
                                    .ok()
                                    .zip(u16::try_from(*port).ok())
                            }
                            _ => None,
                        },
                        _ => None,
                    },
                    _ => None,
                };
                let master = master.ok_or_else(|| unexpected("CLUSTER SLOTS", range))?;
                if !masters.contains(&master) {
                    masters.push(master);
                }
            }
            Ok(masters)
        })
    }
}

impl RemoteStore for RedisStore {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn limits(&self) -> BatchLimits {
        self.options.limits
    }

    fn find_missing(&self, keys: &[DataKey]) -> anyhow::Result<Vec<DataKey>> {
        let mut missing = Vec::new();
        for batch in self.options.limits.split(keys, |_| 0) {
            let cmds = batch
                .iter()
                .map(|key| redis::cmd("EXISTS").arg(self.record_key(key)).clone())
                .collect();
            let replies = self.with_conn("check which records it holds", |conn, trips| {
                trips.fetch_add(1, Ordering::Relaxed);
                let replies = conn.pipeline(cmds)?;
                if replies.len() != batch.len() {
                    return Err(format!(
                        "{} replies to {} EXISTS commands",
                        replies.len(),
                        batch.len()
                    )
                    .into());
                }
                Ok(replies)
            })?;
            for (key, reply) in batch.iter().zip(replies) {
                match reply {
                    Value::Int(0) => missing.push(*key),
                    Value::Int(_) => {}
                    other => {
                        let e = unexpected("EXISTS", &other);
                        return Err(remote(&self.describe, "check which records it holds", e));
                    }
                }
            }
        }
        Ok(missing)
    }

    fn get_many(&self, keys: &[DataKey]) -> anyhow::Result<Vec<Option<Vec<u8>>>> {
        let mut records = Vec::with_capacity(keys.len());
        for batch in self.options.limits.split(keys, |_| 0) {
            let names: Vec<String> = batch.iter().map(|key| self.record_key(key)).collect();
            let replies = self.with_conn("read records", |conn, trips| {
                trips.fetch_add(1, Ordering::Relaxed);
                let replies = if matches!(conn, Conn::Single(_)) {
                    // MGET: one command and one reply array for the whole batch.
                    match conn.command(redis::cmd("MGET").arg(&names))? {
                        Value::Array(values) => values,
                        other => return Err(unexpected("MGET", &other)),
                    }
                } else {
                    // A cluster refuses an MGET across slots: one GET each, sent to every
                    // shard at once.
                    conn.pipeline(
                        names
                            .iter()
                            .map(|name| redis::cmd("GET").arg(name).clone())
                            .collect(),
                    )?
                };
                if replies.len() != batch.len() {
                    return Err(format!("{} values for {} keys", replies.len(), batch.len()).into());
                }
                replies
                    .into_iter()
                    .map(|reply| match reply {
                        Value::Nil => Ok(None),
                        Value::BulkString(bytes) => Ok(Some(bytes)),
                        other => Err(unexpected("GET", &other)),
                    })
                    .collect::<Result<Vec<_>, Failure>>()
            })?;
            records.extend(replies);
        }
        Ok(records)
    }

    fn put_many(&self, records: &[(DataKey, &[u8])]) -> anyhow::Result<()> {
        for batch in self.options.limits.split(records, |(_, r)| r.len()) {
            let cmds = batch
                .iter()
                .map(|(key, record)| {
                    redis::cmd("SET")
                        .arg(self.record_key(key))
                        .arg(*record)
                        .clone()
                })
                .collect();
            self.with_conn("store records", |conn, trips| {
                trips.fetch_add(1, Ordering::Relaxed);
                let replies = conn.pipeline(cmds)?;
                if replies.len() != batch.len() {
                    return Err(format!(
                        "{} replies to {} SET commands",
                        replies.len(),
                        batch.len()
                    )
                    .into());
                }
                replies.iter().try_for_each(expect_ok("SET"))
            })?;
        }
        Ok(())
    }

    fn set_root(&self, name: &str, key: DataKey) -> anyhow::Result<()> {
        let cmd = redis::cmd("HSET")
            .arg(self.roots_key())
            .arg(name)
            .arg(key.to_string())
            .clone();
        self.with_conn("set a root", |conn, trips| {
            trips.fetch_add(1, Ordering::Relaxed);
            match conn.command(&cmd)? {
                Value::Int(_) => Ok(()),
                other => Err(unexpected("HSET", &other)),
            }
        })
    }

    fn root(&self, name: &str) -> anyhow::Result<Option<DataKey>> {
        let cmd = redis::cmd("HGET").arg(self.roots_key()).arg(name).clone();
        self.with_conn("read a root", |conn, trips| {
            trips.fetch_add(1, Ordering::Relaxed);
            match conn.command(&cmd)? {
                Value::Nil => Ok(None),
                Value::BulkString(hex) => parse_root_key(&hex).map(Some),
                other => Err(unexpected("HGET", &other)),
            }
        })
    }

    fn roots(&self) -> anyhow::Result<Vec<(String, DataKey)>> {
        let cmd = redis::cmd("HGETALL").arg(self.roots_key()).clone();
        self.with_conn("list its roots", |conn, trips| {
            trips.fetch_add(1, Ordering::Relaxed);
            let pairs: Vec<(Value, Value)> = match conn.command(&cmd)? {
                Value::Map(pairs) => pairs,
                Value::Array(flat) => {
                    if flat.len() % 2 != 0 {
                        return Err("HGETALL returned an odd number of items".into());
                    }
                    let mut items = flat.into_iter();
                    std::iter::from_fn(|| Some((items.next()?, items.next()?))).collect()
                }
                other => return Err(unexpected("HGETALL", &other)),
            };
            let mut roots = pairs
                .into_iter()
                .map(|pair| match pair {
                    (Value::BulkString(name), Value::BulkString(hex)) => {
                        let name = String::from_utf8(name)
                            .map_err(|_| Failure::from("a root name that is not UTF-8"))?;
                        Ok((name, parse_root_key(&hex)?))
                    }
                    (name, _) => Err(unexpected("HGETALL", &name)),
                })
                .collect::<Result<Vec<_>, Failure>>()?;
            roots.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(roots)
        })
    }

    fn remove_root(&self, name: &str) -> anyhow::Result<bool> {
        let cmd = redis::cmd("HDEL").arg(self.roots_key()).arg(name).clone();
        self.with_conn("remove a root", |conn, trips| {
            trips.fetch_add(1, Ordering::Relaxed);
            match conn.command(&cmd)? {
                Value::Int(n) => Ok(n > 0),
                other => Err(unexpected("HDEL", &other)),
            }
        })
    }

    fn ping(&self) -> anyhow::Result<()> {
        self.ping_as("answer PING")
    }

    /// `SCAN` with `MATCH <prefix>:n:*`, on every master of a cluster. SCAN may return a
    /// key twice; the keys visited are remembered (16 bytes each) so each is visited once.
    fn for_each_key(
        &self,
        visit: &mut dyn FnMut(DataKey) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let nodes: Vec<Option<(String, u16)>> = match self.client {
            Client::Single(_) => vec![None],
            Client::Cluster(_) => self.masters()?.into_iter().map(Some).collect(),
        };
        let mut seen = HashSet::new();
        for node in &nodes {
            let mut cursor = 0;
            loop {
                let (next, keys) = self.scan_page(node.as_ref(), cursor)?;
                for key in keys {
                    if seen.insert(key) {
                        visit(key)?;
                    }
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(())
    }
}

/// An [`Error::Remote`] for `remote`, as the `anyhow::Error` the trait returns.
fn remote(remote: &str, operation: &'static str, source: impl Into<Failure>) -> anyhow::Error {
    Error::Remote {
        remote: remote.to_owned(),
        operation,
        source: source.into(),
    }
    .into()
}

fn unexpected(command: &str, reply: &Value) -> Failure {
    let mut shown = format!("{reply:?}");
    if shown.len() > 200 {
        let mut end = 200;
        while !shown.is_char_boundary(end) {
            end -= 1;
        }
        shown.truncate(end);
        shown.push('…');
    }
    format!("unexpected reply to {command}: {shown}").into()
}

fn expect_ok(command: &'static str) -> impl Fn(&Value) -> Result<(), Failure> {
    move |reply| match reply {
        Value::Okay => Ok(()),
        Value::SimpleString(s) if s == "OK" => Ok(()),
        other => Err(unexpected(command, other)),
    }
}

fn parse_root_key(hex: &[u8]) -> Result<DataKey, Failure> {
    std::str::from_utf8(hex)
        .ok()
        .and_then(|hex| hex.parse().ok())
        .ok_or_else(|| {
            format!(
                "a root names {:?}, not a key in hex",
                String::from_utf8_lossy(hex)
            )
            .into()
        })
}

/// `url` without its password (the user name stays: it says which account is used).
fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let user = rest[..at].split(':').next().unwrap_or("");
    let user = if user.is_empty() {
        String::new()
    } else {
        format!("{user}@")
    };
    format!("{}{user}{}", &url[..scheme_end + 3], &rest[at + 1..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_never_shows_a_password() {
        assert_eq!(redact("redis://:secret@host:6379/0"), "redis://host:6379/0");
        assert_eq!(
            redact("redis://me:secret@host:6379"),
            "redis://me@host:6379"
        );
        assert_eq!(redact("redis://host:6379"), "redis://host:6379");
        assert_eq!(redact("unix:///tmp/redis.sock"), "unix:///tmp/redis.sock");
    }
}
