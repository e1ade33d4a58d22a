//! Real `redis-server` processes for the remote-tier tests: one server on a free loopback
//! port, or a cluster of them, each in a temporary directory and killed when dropped.
//!
//! Without `redis-server` on the PATH a test skips (prints why and returns), except under
//! CI (`CI=true`), where a missing server is a broken setup and panics.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a started server may take to answer PING (or a cluster to settle).
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Whether `redis-server` can run here; see the module docs for what happens when not.
fn available() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !found {
        if std::env::var("CI").is_ok_and(|ci| ci == "true") {
            panic!(
                "redis-server is not installed; .ci/run installs it (apt-get install redis-server)"
            );
        }
        eprintln!("skipped: redis-server is not installed");
    }
    found
}

/// A loopback port nothing listens on now (the OS picks it; taken again by the server).
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("local address").port()
}

/// Whether the server on `port` answers PING, asked on a raw connection so that readiness
/// does not depend on the code under test.
fn answers_ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"*1\r\n$4\r\nPING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// Polls `ready` until it holds, panicking with `what` after [`READY_TIMEOUT`].
fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + READY_TIMEOUT;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One `redis-server` process on a loopback port, without persistence.
pub struct RedisServer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl RedisServer {
    /// A fresh server, ready for commands; `None` when the test should skip.
    pub fn start() -> Option<RedisServer> {
        RedisServer::start_with(&[])
    }

    /// [`start`](Self::start) with extra `redis-server` arguments (`--name value` pairs).
    pub fn start_with(extra: &[&str]) -> Option<RedisServer> {
        if !available() {
            return None;
        }
        let extra = extra.iter().map(|s| s.to_string()).collect();
        Some(RedisServer::launch(extra, free_port))
    }

    /// Spawns a server on a port from `pick` and waits until it answers. The port was free
    /// when picked but another process may take it before the server binds it; the server
    /// then exits at once, and a new port is picked.
    fn launch(extra: Vec<String>, pick: impl Fn() -> u16) -> RedisServer {
        for _ in 0..10 {
            let port = pick();
            let dir = tempfile::tempdir().expect("server directory");
            let mut child = spawn(port, dir.path(), &extra);
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                if answers_ping(port) {
                    return RedisServer {
                        child,
                        port,
                        dir,
                        extra,
                    };
                }
                if child.try_wait().is_ok_and(|status| status.is_some()) {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("redis-server on port {port} did not answer PING");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("redis-server exited at start on 10 ports in a row");
    }

    fn wait_ready(&self) {
        wait_until(&format!("redis-server on port {}", self.port), || {
            answers_ping(self.port)
        });
    }

    /// The server's URL, `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing answers.
    pub fn stop(&self) {
        signal("STOP", self.pid());
    }

    /// Lets a stopped server run again (SIGCONT).
    pub fn resume(&self) {
        signal("CONT", self.pid());
    }

    /// Kills the server (SIGKILL) and reaps it; its data is gone (no persistence).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a new, empty server on the same port and waits until it answers.
    pub fn restart(&mut self) {
        self.kill();
        self.child = spawn(self.port, self.dir.path(), &self.extra);
        self.wait_ready();
    }

    /// `CONFIG SET name value`.
    pub fn set_config(&self, name: &str, value: &str) {
        let reply = self.cli(&["CONFIG", "SET", name, value]);
        assert_eq!(reply.trim(), "OK", "CONFIG SET {name} {value}");
    }

    /// Runs `redis-cli -p <port> <args>` (following cluster redirects) and returns its
    /// standard output.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["-c", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        assert!(output.status.success(), "redis-cli {args:?}: {output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // A stopped process still dies of SIGKILL.
        self.kill();
    }
}

fn spawn(port: u16, dir: &Path, extra: &[String]) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn redis-server")
}

fn signal(name: &str, pid: u32) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid}");
}

/// A Redis Cluster of masters only, on loopback ports, each a [`RedisServer`].
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// `masters` masters with the 16,384 slots split between them, every node reporting
    /// `cluster_state:ok`; `None` when the test should skip.
    pub fn start(masters: usize) -> Option<RedisCluster> {
        if !available() {
            return None;
        }
        let extra: Vec<String> = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // The cluster bus listens on port + 10000: both must be free.
        let pick = || loop {
            let port = free_port();
            if port <= u16::MAX - 10_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
            {
                break port;
            }
        };
        let nodes: Vec<RedisServer> = (0..masters)
            .map(|_| RedisServer::launch(extra.clone(), pick))
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        let output = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create: {output:?}"
        );
        for node in &nodes {
            wait_until(&format!("cluster_state:ok on port {}", node.port), || {
                node.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")
            });
        }
        Some(RedisCluster { nodes })
    }

    /// Every node's URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The nodes.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }
}
