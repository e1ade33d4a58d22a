//! [`RedisStore`]: the remote tier on a Redis server or a Redis Cluster (feature `redis`).
//!
//! Redis is the first remote because it is what teams already run as a shared cache: one
//! server (or a cluster) that many machines reach in well under a millisecond. The store
//! speaks to it over the `redis` crate's blocking connections, which it pools, with a
//! timeout on every connect, read and write: a remote that stops answering turns into an
//! [`Error::Remote`](crate::Error::Remote) after about that long, never a hung caller. It
//! writes each batch and reads the replies itself (and routes a cluster's keys itself), so
//! that the first timed-out reply ends the call (see `Conn::run` and `ClusterConn`).
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

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::error::Error as StdError;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::{Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Value};

use super::{BatchLimits, RemoteStore};
use crate::error::Error;
use crate::key::DataKey;

/// What a failed exchange with the server carries up to [`Error::Remote`]'s `source`.
type Failure = Box<dyn StdError + Send + Sync + 'static>;

/// SCAN's page size: a hint to the server, which may return more or fewer keys per page.
const SCAN_COUNT: usize = 1000;

/// The hash slots of a Redis Cluster.
const SLOTS: usize = 16384;

/// How many times a cluster request follows `MOVED`/`ASK` before it gives up.
const MAX_REDIRECTS: usize = 3;

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
        if urls.is_empty() {
            return Err(remote(&describe, "connect", "no cluster node was given"));
        }
        let seeds = urls
            .iter()
            .map(|url| url.into_connection_info())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| remote(&describe, "connect", e))?;
        RedisStore::start(Client::Cluster(seeds), self, describe)
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
    /// The nodes given to `connect_cluster`, asked in turn for the slot map.
    Cluster(Vec<ConnectionInfo>),
}

/// A cluster node as `CLUSTER SLOTS` names it.
type NodeAddr = (String, u16);

/// Where one command of a request goes on a cluster; a single server takes them all.
#[derive(Debug, Clone)]
enum Route {
    /// The master that owns this slot.
    Slot(u16),
    /// This node.
    Node(NodeAddr),
    /// Any master (a command that names no key).
    Any,
}

/// One command and where it goes.
struct Request {
    cmd: Cmd,
    route: Route,
}

impl Request {
    /// A command about the Redis key `key`, routed to the slot that holds it.
    fn keyed(cmd: Cmd, key: &str) -> Request {
        Request {
            cmd,
            route: Route::Slot(slot_of(key.as_bytes())),
        }
    }

    fn any(cmd: Cmd) -> Request {
        Request {
            cmd,
            route: Route::Any,
        }
    }
}

/// One pooled connection: to the server, or to every cluster master it has needed.
enum Conn {
    Single(redis::Connection),
    // Boxed: it holds the slot map and would make every pooled `Single` as big.
    Cluster(Box<ClusterConn>),
}

impl Conn {
    /// Sends `requests` in one write (per node) and reads every reply: one round trip.
    /// A reply that is a server error fails the whole request.
    fn run(&mut self, requests: &[Request], trips: &AtomicU64) -> Result<Vec<Value>, Failure> {
        let replies = match self {
            Conn::Single(conn) => {
                trips.fetch_add(1, Ordering::Relaxed);
                let mut packed = Vec::new();
                for request in requests {
                    request.cmd.write_packed_command(&mut packed);
                }
                conn.send_packed_command(&packed)?;
                receive(conn, requests.len())?
            }
            Conn::Cluster(cluster) => cluster.run(requests, trips)?,
        };
        for reply in &replies {
            if let Value::ServerError(e) = reply {
                return Err(Box::new(e.clone()));
            }
        }
        Ok(replies)
    }

    /// [`run`](Self::run) of one command.
    fn run_one(&mut self, request: Request, trips: &AtomicU64) -> Result<Value, Failure> {
        self.run(std::slice::from_ref(&request), trips)?
            .pop()
            .ok_or_else(|| "no reply".into())
    }
}

/// Reads `count` replies, stopping at the first read that fails. (The `redis` crate's own
/// pipeline reads on after a timed-out read, to stay in step with the server, so a stopped
/// server would hold the caller for a timeout per command; here the connection is dropped
/// instead.)
fn receive(conn: &mut redis::Connection, count: usize) -> Result<Vec<Value>, Failure> {
    (0..count)
        .map(|_| conn.recv_response().map_err(Failure::from))
        .collect()
}

/// Opens one connection with the store's timeouts.
fn open(
    info: &ConnectionInfo,
    connect: Duration,
    io: Duration,
) -> Result<redis::Connection, Failure> {
    let conn = redis::Client::open(info.clone())?.get_connection_with_timeout(connect)?;
    conn.set_read_timeout(Some(io))?;
    conn.set_write_timeout(Some(io))?;
    Ok(conn)
}

/// Connections to a cluster's masters and the slot map that routes keys to them.
///
/// Routing is done here rather than by the `redis` crate's cluster client, whose sync
/// pipeline reads every reply of a batch even after one timed out: with a master stopped,
/// a batch of 512 keys would take 512 timeouts to fail.
struct ClusterConn {
    /// The master serving each slot, an index into `masters` (`u16::MAX`: none).
    owner: Vec<u16>,
    masters: Vec<NodeAddr>,
    nodes: HashMap<NodeAddr, redis::Connection>,
    /// Settings (user, password, database) for connections to the nodes found.
    template: ConnectionInfo,
    connect_timeout: Duration,
    io_timeout: Duration,
}

impl ClusterConn {
    /// Asks the seeds in turn for the slot map.
    fn open(seeds: &[ConnectionInfo], connect: Duration, io: Duration) -> Result<Self, Failure> {
        let mut last: Failure = "no cluster node was given".into();
        for seed in seeds {
            let attempt = open(seed, connect, io).and_then(|mut conn| {
                let slots = cluster_slots(&mut conn, seed)?;
                Ok((conn, slots))
            });
            match attempt {
                Ok((conn, (owner, masters))) => {
                    // The seed is usually a master too: its connection serves it from now on.
                    let mut nodes = HashMap::new();
                    if let ConnectionAddr::Tcp(host, port) = seed.addr() {
                        nodes.insert((host.clone(), *port), conn);
                    }
                    return Ok(ClusterConn {
                        owner,
                        masters,
                        nodes,
                        template: seed.clone(),
                        connect_timeout: connect,
                        io_timeout: io,
                    });
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The connection to `addr`, opened if needed.
    fn node(&mut self, addr: &NodeAddr) -> Result<&mut redis::Connection, Failure> {
        Ok(match self.nodes.entry(addr.clone()) {
            Entry::Occupied(open_already) => open_already.into_mut(),
            Entry::Vacant(slot) => {
                let info = self
                    .template
                    .clone()
                    .set_addr(ConnectionAddr::Tcp(addr.0.clone(), addr.1));
                slot.insert(open(&info, self.connect_timeout, self.io_timeout)?)
            }
        })
    }

    fn target(&self, route: &Route) -> Result<NodeAddr, Failure> {
        let index = match route {
            Route::Node(addr) => return Ok(addr.clone()),
            Route::Any => 0,
            Route::Slot(slot) => self.owner[usize::from(*slot) % SLOTS],
        };
        self.masters
            .get(usize::from(index))
            .cloned()
            .ok_or_else(|| format!("no master serves {route:?} (is the cluster complete?)").into())
    }

    /// Fetches the slot map again, from a node already connected.
    fn refresh(&mut self) -> Result<(), Failure> {
        let mut last: Failure = "no cluster node is connected".into();
        let addrs: Vec<NodeAddr> = self.nodes.keys().cloned().collect();
        for addr in addrs {
            let info = self
                .template
                .clone()
                .set_addr(ConnectionAddr::Tcp(addr.0.clone(), addr.1));
            let Some(conn) = self.nodes.get_mut(&addr) else {
                continue;
            };
            match cluster_slots(conn, &info) {
                Ok((owner, masters)) => {
                    self.owner = owner;
                    self.masters = masters;
                    return Ok(());
                }
                Err(e) => {
                    self.nodes.remove(&addr);
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// Sends each request to its node (all nodes' parts written before any reply is read,
    /// so the batch costs one round trip) and follows `MOVED` and `ASK` redirects.
    fn run(&mut self, requests: &[Request], trips: &AtomicU64) -> Result<Vec<Value>, Failure> {
        let mut replies = vec![Value::Nil; requests.len()];
        let mut pending: Vec<(usize, NodeAddr, bool)> = requests
            .iter()
            .enumerate()
            .map(|(i, request)| Ok((i, self.target(&request.route)?, false)))
            .collect::<Result<_, Failure>>()?;
        for _ in 0..=MAX_REDIRECTS {
            trips.fetch_add(1, Ordering::Relaxed);
            let got = self.exchange(requests, &pending)?;
            let mut again = Vec::new();
            let mut moved = false;
            for ((i, _, _), reply) in pending.iter().zip(got) {
                match redirect(&reply) {
                    Some((addr, asking)) => {
                        moved |= !asking;
                        again.push((*i, addr, asking));
                    }
                    None => replies[*i] = reply,
                }
            }
            if again.is_empty() {
                return Ok(replies);
            }
            if moved {
                self.refresh()?;
            }
            pending = again;
        }
        Err(format!("still redirected after {MAX_REDIRECTS} attempts").into())
    }

    /// One round trip: `pending` (request index, node, whether `ASKING` goes first) grouped
    /// by node; the replies in the order of `pending`.
    fn exchange(
        &mut self,
        requests: &[Request],
        pending: &[(usize, NodeAddr, bool)],
    ) -> Result<Vec<Value>, Failure> {
        let mut groups: Vec<(NodeAddr, Vec<usize>)> = Vec::new();
        for (position, (_, addr, _)) in pending.iter().enumerate() {
            match groups.iter_mut().find(|(node, _)| node == addr) {
                Some((_, positions)) => positions.push(position),
                None => groups.push((addr.clone(), vec![position])),
            }
        }
        for (addr, positions) in &groups {
            let mut packed = Vec::new();
            for &position in positions {
                let (index, _, asking) = &pending[position];
                if *asking {
                    redis::cmd("ASKING").write_packed_command(&mut packed);
                }
                requests[*index].cmd.write_packed_command(&mut packed);
            }
            self.node(addr)?.send_packed_command(&packed)?;
        }
        let mut replies = vec![Value::Nil; pending.len()];
        for (addr, positions) in &groups {
            let conn = self.node(addr)?;
            for &position in positions {
                if pending[position].2 {
                    receive(conn, 1)?;
                }
                replies[position] = conn.recv_response()?;
            }
        }
        Ok(replies)
    }
}

/// The node a `MOVED`/`ASK` error reply sends a command to, and whether it was `ASK`.
fn redirect(reply: &Value) -> Option<(NodeAddr, bool)> {
    let Value::ServerError(e) = reply else {
        return None;
    };
    let asking = match e.code() {
        "MOVED" => false,
        "ASK" => true,
        _ => return None,
    };
    // "<slot> <host>:<port>"
    let endpoint = e.details()?.split_whitespace().nth(1)?;
    let (host, port) = endpoint.rsplit_once(':')?;
    Some(((host.to_owned(), port.parse().ok()?), asking))
}

/// `CLUSTER SLOTS` on `conn` (connected as `info`): the master of each slot, as an index
/// into the list of masters.
fn cluster_slots(
    conn: &mut redis::Connection,
    info: &ConnectionInfo,
) -> Result<(Vec<u16>, Vec<NodeAddr>), Failure> {
    conn.send_packed_command(&redis::cmd("CLUSTER").arg("SLOTS").get_packed_command())?;
    let reply = conn.recv_response()?;
    let Value::Array(ranges) = &reply else {
        return Err(unexpected("CLUSTER SLOTS", &reply));
    };
    let asked_host = match info.addr() {
        ConnectionAddr::Tcp(host, _) => host.clone(),
        _ => String::new(),
    };
    let mut owner = vec![u16::MAX; SLOTS];
    let mut masters: Vec<NodeAddr> = Vec::new();
    for range in ranges {
        let parsed = match range {
            Value::Array(fields) => match (fields.first(), fields.get(1), fields.get(2)) {
                (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(node))) => {
                    match (node.first(), node.get(1)) {
                        (Some(Value::BulkString(host)), Some(Value::Int(port))) => {
                            let host = String::from_utf8_lossy(host).into_owned();
                            // An empty or "?" host means "the node you asked".
                            let host = if host.is_empty() || host == "?" {
                                asked_host.clone()
                            } else {
                                host
                            };
                            let slots = usize::try_from(*start)
                                .ok()
                                .zip(usize::try_from(*end).ok())
                                .filter(|(s, e)| s <= e && *e < SLOTS);
                            slots.zip(u16::try_from(*port).ok().map(|port| (host, port)))
                        }
                        _ => None,
                    }
                }
                _ => None,
            },
            _ => None,
        };
        let ((start, end), master) = parsed.ok_or_else(|| unexpected("CLUSTER SLOTS", range))?;
        let index = match masters.iter().position(|m| *m == master) {
            Some(index) => index,
            None => {
                masters.push(master);
                masters.len() - 1
            }
        };
        let index = u16::try_from(index).map_err(|_| "more masters than slots")?;
        owner[start..=end].fill(index);
    }
    Ok((owner, masters))
}

/// The cluster hash slot of a Redis key: CRC16 (XMODEM) of its hash tag (the text between
/// the first `{` and the next `}`, if not empty) or of the whole key, modulo 16384.
fn slot_of(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key)) % SLOTS as u16
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
        if self.options.hash_tags {
            let hex = key.to_string();
            format!("{}:n:{{{}}}{}", self.options.prefix, &hex[..2], &hex[2..])
        } else {
            format!("{}:n:{key}", self.options.prefix)
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
        let (connect, io) = (self.options.connect_timeout, self.options.io_timeout);
        match &self.client {
            Client::Single(client) => Ok(Conn::Single(open(
                client.get_connection_info(),
                connect,
                io,
            )?)),
            Client::Cluster(seeds) => Ok(Conn::Cluster(Box::new(ClusterConn::open(
                seeds, connect, io,
            )?))),
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
                .map_err(|e| remote(&self.describe, operation, explain(e)))?,
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
                Err(remote(&self.describe, operation, explain(e)))
            }
        }
    }

    fn ping_as(&self, operation: &'static str) -> anyhow::Result<()> {
        self.with_conn(operation, |conn, trips| {
            // Every master of a cluster, in the one round trip.
            let requests: Vec<Request> = match conn {
                Conn::Single(_) => vec![Request::any(redis::cmd("PING"))],
                Conn::Cluster(cluster) => cluster
                    .masters
                    .iter()
                    .map(|addr| Request {
                        cmd: redis::cmd("PING"),
                        route: Route::Node(addr.clone()),
                    })
                    .collect(),
            };
            for reply in conn.run(&requests, trips)? {
                match reply {
                    Value::SimpleString(s) if s == "PONG" => {}
                    Value::Okay => {}
                    other => return Err(unexpected("PING", &other)),
                }
            }
            Ok(())
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
        node: Option<&NodeAddr>,
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
            let route = node.map_or(Route::Any, |addr| Route::Node(addr.clone()));
            let reply = conn.run_one(Request { cmd, route }, trips)?;
            let (next, names): (u64, Vec<Vec<u8>>) = redis::from_redis_value(reply)?;
            let keys = names
                .iter()
                .filter_map(|name| self.parse_record_key(name))
                .collect();
            Ok((next, keys))
        })
    }

    /// The cluster's masters, from the slot map a connection holds.
    fn masters(&self) -> anyhow::Result<Vec<NodeAddr>> {
        self.with_conn("list its cluster nodes", |conn, _| match conn {
            Conn::Cluster(cluster) => Ok(cluster.masters.clone()),
            Conn::Single(_) => Ok(Vec::new()),
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
            let requests: Vec<Request> = batch
                .iter()
                .map(|key| {
                    let name = self.record_key(key);
                    Request::keyed(redis::cmd("EXISTS").arg(&name).take(), &name)
                })
                .collect();
            self.with_conn("check which records it holds", |conn, trips| {
                for (key, reply) in batch.iter().zip(conn.run(&requests, trips)?) {
                    match reply {
                        Value::Int(0) => missing.push(*key),
                        Value::Int(_) => {}
                        other => return Err(unexpected("EXISTS", &other)),
                    }
                }
                Ok(())
            })?;
        }
        Ok(missing)
    }

    fn get_many(&self, keys: &[DataKey]) -> anyhow::Result<Vec<Option<Vec<u8>>>> {
        let mut records = Vec::with_capacity(keys.len());
        for batch in self.options.limits.split(keys, |_| 0) {
            let names: Vec<String> = batch.iter().map(|key| self.record_key(key)).collect();
            self.with_conn("read records", |conn, trips| {
                let replies = if matches!(conn, Conn::Single(_)) {
                    // MGET: one command and one reply array for the whole batch.
                    let mget = Request::any(redis::cmd("MGET").arg(&names).take());
                    match conn.run_one(mget, trips)? {
                        Value::Array(values) => values,
                        other => return Err(unexpected("MGET", &other)),
                    }
                } else {
                    // A cluster refuses an MGET across slots: one GET each, every master's
                    // share sent at once.
                    let gets: Vec<Request> = names
                        .iter()
                        .map(|name| Request::keyed(redis::cmd("GET").arg(name).take(), name))
                        .collect();
                    conn.run(&gets, trips)?
                };
                if replies.len() != batch.len() {
                    return Err(format!("{} values for {} keys", replies.len(), batch.len()).into());
                }
                for reply in replies {
                    match reply {
                        Value::Nil => records.push(None),
                        Value::BulkString(bytes) => records.push(Some(bytes)),
                        other => return Err(unexpected("GET", &other)),
                    }
                }
                Ok(())
            })?;
        }
        Ok(records)
    }

    fn put_many(&self, records: &[(DataKey, &[u8])]) -> anyhow::Result<()> {
        for batch in self.options.limits.split(records, |(_, r)| r.len()) {
            let requests: Vec<Request> = batch
                .iter()
                .map(|(key, record)| {
                    let name = self.record_key(key);
                    Request::keyed(redis::cmd("SET").arg(&name).arg(*record).take(), &name)
                })
                .collect();
            self.with_conn("store records", |conn, trips| {
                conn.run(&requests, trips)?
                    .iter()
                    .try_for_each(expect_ok("SET"))
            })?;
        }
        Ok(())
    }

    fn set_root(&self, name: &str, key: DataKey) -> anyhow::Result<()> {
        let roots = self.roots_key();
        let cmd = redis::cmd("HSET")
            .arg(&roots)
            .arg(name)
            .arg(key.to_string())
            .take();
        self.with_conn("set a root", |conn, trips| {
            match conn.run_one(Request::keyed(cmd, &roots), trips)? {
                Value::Int(_) => Ok(()),
                other => Err(unexpected("HSET", &other)),
            }
        })
    }

    fn root(&self, name: &str) -> anyhow::Result<Option<DataKey>> {
        let roots = self.roots_key();
        let cmd = redis::cmd("HGET").arg(&roots).arg(name).take();
        self.with_conn("read a root", |conn, trips| {
            match conn.run_one(Request::keyed(cmd, &roots), trips)? {
                Value::Nil => Ok(None),
                Value::BulkString(hex) => parse_root_key(&hex).map(Some),
                other => Err(unexpected("HGET", &other)),
            }
        })
    }

    fn roots(&self) -> anyhow::Result<Vec<(String, DataKey)>> {
        let roots_key = self.roots_key();
        let cmd = redis::cmd("HGETALL").arg(&roots_key).take();
        self.with_conn("list its roots", |conn, trips| {
            // A RESP2 flat array or a RESP3 map alike.
            let pairs: Vec<(String, Vec<u8>)> =
                redis::from_redis_value(conn.run_one(Request::keyed(cmd, &roots_key), trips)?)?;
            let mut roots = pairs
                .into_iter()
                .map(|(name, hex)| Ok((name, parse_root_key(&hex)?)))
                .collect::<Result<Vec<_>, Failure>>()?;
            roots.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(roots)
        })
    }

    fn remove_root(&self, name: &str) -> anyhow::Result<bool> {
        let roots = self.roots_key();
        let cmd = redis::cmd("HDEL").arg(&roots).arg(name).take();
        self.with_conn("remove a root", |conn, trips| {
            match conn.run_one(Request::keyed(cmd, &roots), trips)? {
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
        let nodes: Vec<Option<NodeAddr>> = match self.client {
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

/// Says what a timeout means (the socket's own message is "resource temporarily
/// unavailable", repeated by its source).
fn explain(failure: Failure) -> Failure {
    match failure.downcast_ref::<redis::RedisError>() {
        Some(e) if e.is_timeout() => format!(
            "no answer in time (RedisOptions::io_timeout and connect_timeout bound each wait): {e}"
        )
        .into(),
        _ => failure,
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
    fn slots_are_the_clusters() {
        // The cluster specification's check value, and CLUSTER KEYSLOT of a few keys.
        assert_eq!(slot_of(b"123456789"), 0x31c3);
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"bar"), 5061);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"{user1000}.following"), 3443);
        assert_eq!(slot_of(b"foo{}{bar}"), 8363); // an empty tag: the whole key
        assert_eq!(slot_of(b"foo{{bar}}zap"), 4015); // the tag is "{bar"
    }

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
