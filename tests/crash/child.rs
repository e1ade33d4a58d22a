//! The child side of the crash test, and the parent's harness around it: the writer that
//! gets killed, the line protocol it speaks on stdout, and spawning and SIGKILLing it.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::common::{Rng, Workload};
use super::{CHILD_CAP, CHILD_ENV, MAX_BLOB, mode_named, open};
use pagestore::{Error, NodeStore as _, PagableStorage};

/// How many root names the child cycles through.
pub(super) const ROOT_NAMES: u64 = 5;

/// How long a child may take to reach the moment it is to be killed.
const CHILD_TIMEOUT: Duration = Duration::from_secs(60);

/// The writer that gets killed. Its stdout is the protocol: `OPENING`, `OPENED`, `ACK <n>`.
pub(super) fn run_as_child(spec: &str) {
    let mut parts = spec.split(' ');
    let (Some(mode), Some(dir), Some(seed), Some(gc)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        panic!("bad {CHILD_ENV}={spec:?}");
    };
    let collects = gc == "gc";
    let durability = mode_named(mode);
    let seed: u64 = seed.parse().expect("child seed");
    println!("OPENING");
    let mut storage = open(Path::new(dir), durability).expect("child: open the store");
    println!("OPENED");
    let mut workload = Workload::new(seed, MAX_BLOB);
    let mut rng = Rng::new(seed ^ 0xf1u64);
    let mut next_flush = rng.range(1, 8);
    for stored in 1..=CHILD_CAP {
        let node = workload.next_node();
        let stored_key = match storage.store_data(node) {
            Ok(key) => Some(key),
            // A child a collection deleted (no root reached it any more): refused, and the
            // parent finds the node missing, as a collected one.
            Err(e) if collects && matches!(e.downcast_ref(), Some(Error::MissingChild { .. })) => {
                None
            }
            Err(e) => panic!("child: store_data: {e:#}"),
        };
        if let Some(key) = stored_key {
            // Named right after the node is stored, no flush in between: a root that
            // survives the kill must name a complete graph (the parent walks it).
            storage
                .set_root(&format!("r{}", stored % ROOT_NAMES), key)
                .expect("child: set_root");
        }
        if stored == next_flush {
            storage.flush().expect("child: flush");
            // Stdout to a pipe is line-buffered: the line is written in one write(2).
            println!("ACK {stored}");
            next_flush += rng.range(1, 8);
            if collects && rng.percent(40) {
                // Keeps what the last roots reach; a kill may land in the middle.
                println!("GC");
                storage.gc().expect("child: gc");
                println!("GC DONE");
            }
            if rng.percent(15) {
                // Close and reopen, so that some kills land in a clean close (Cache mode
                // syncs and removes its marker there) or in an open of a cleanly closed store.
                // Said before closing: a kill during the close may find it finished (clean).
                println!("CLOSING");
                drop(storage);
                println!("OPENING");
                storage = open(Path::new(dir), durability).expect("child: reopen the store");
                println!("OPENED");
            }
        }
    }
    println!("DONE");
    // Wait to be killed: a clean exit would run Drop, which is not what is being tested.
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// When the parent kills the child.
#[derive(Debug, Clone, Copy)]
pub(super) enum KillAt {
    /// This long after the child says it is opening the store.
    DuringOpen(Duration),
    /// This long after the child's `acks`-th acknowledgement (0: after it opened).
    AfterAcks { acks: u64, delay: Duration },
}

/// What the parent learned from one killed child.
#[derive(Debug)]
pub(super) struct Killed {
    /// Whether the child had finished its last open of the store when it died.
    pub(super) opened: bool,
    /// Whether it had finished its first open (which recovers a store left crashed).
    pub(super) opened_once: bool,
    /// How many nodes were acknowledged (the first `acked` of its workload).
    pub(super) acked: u64,
    /// Whether the session the kill interrupted had written (a flush returned in it).
    pub(super) wrote_since_open: bool,
    /// Whether the child was collecting garbage when it died.
    pub(super) in_gc: bool,
    /// The child's last lines of output.
    pub(super) transcript: String,
}

/// The child's stdout, parsed as the protocol lines arrive.
struct Protocol {
    out: BufReader<std::process::ChildStdout>,
    last: String,
    opening: bool,
    opened: bool,
    opened_once: bool,
    done: bool,
    acked: u64,
    acks_seen: u64,
    /// Whether a flush returned in the session that was open when the child died, and no
    /// close of that session had begun.
    wrote_since_open: bool,
    in_gc: bool,
    /// The last lines the child printed, for failure messages.
    transcript: Vec<String>,
}

/// How many of the child's last lines a failure message shows.
const TRANSCRIPT_LINES: usize = 12;

impl Protocol {
    /// Reads one line; false at the end of the output.
    fn read_line(&mut self) -> bool {
        self.last.clear();
        if self
            .out
            .read_line(&mut self.last)
            .expect("read child stdout")
            == 0
        {
            return false;
        }
        if self.transcript.len() == TRANSCRIPT_LINES {
            self.transcript.remove(0);
        }
        self.transcript.push(self.last.clone());
        // A line cut short by the kill has no newline and is ignored.
        match self.last.strip_suffix('\n') {
            Some("OPENING") => {
                self.opening = true;
                self.opened = false;
            }
            Some("OPENED") => {
                self.opened = true;
                self.opened_once = true;
            }
            Some("DONE") => self.done = true,
            Some("GC") => self.in_gc = true,
            Some("GC DONE") => self.in_gc = false,
            Some("CLOSING") => self.wrote_since_open = false,
            Some(text) => {
                if let Some(n) = text.strip_prefix("ACK ") {
                    self.acked = n.parse().expect("ACK count");
                    self.acks_seen += 1;
                    self.wrote_since_open = true;
                }
            }
            None => {}
        }
        true
    }
}

/// Runs one child on `dir` and kills it as `plan` says.
pub(super) fn run_child(
    durability: &str,
    dir: &Path,
    seed: u64,
    collects: bool,
    plan: KillAt,
    log: &Path,
) -> Killed {
    let stderr = std::fs::File::create(log).expect("create child stderr log");
    let mut child: Child = Command::new(std::env::current_exe().expect("current exe"))
        .env(
            CHILD_ENV,
            format!(
                "{durability} {} {seed} {}",
                dir.display(),
                if collects { "gc" } else { "nogc" }
            ),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn child");
    let mut protocol = Protocol {
        out: BufReader::new(child.stdout.take().expect("child stdout")),
        last: String::new(),
        opening: false,
        opened: false,
        opened_once: false,
        done: false,
        acked: 0,
        acks_seen: 0,
        wrote_since_open: false,
        in_gc: false,
        transcript: Vec::new(),
    };
    // A child that hangs (a deadlock in open, say) would block the reads below forever: a
    // watchdog SIGKILLs it after CHILD_TIMEOUT and the hang is reported as a failure. Its pid
    // cannot be reused before `wait` below reaps it.
    let (finished, finished_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = {
        let pid = child.id();
        std::thread::spawn(move || {
            // Returns at once when `finished` is dropped; times out only if the child hangs.
            let hung = matches!(
                finished_rx.recv_timeout(CHILD_TIMEOUT),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            );
            if hung {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
            hung
        })
    };
    let mut alive = true;
    let delay = loop {
        let due = match plan {
            KillAt::DuringOpen(delay) => protocol.opening.then_some(delay),
            KillAt::AfterAcks { acks, delay } => {
                (protocol.opened && protocol.acks_seen >= acks).then_some(delay)
            }
        };
        if let Some(delay) = due {
            break delay;
        }
        if protocol.done {
            break Duration::ZERO;
        }
        if !protocol.read_line() {
            alive = false;
            break Duration::ZERO;
        }
    };
    if alive {
        std::thread::sleep(delay);
        child.kill().expect("SIGKILL the child");
    }
    // Acknowledgements printed before the kill landed count too.
    while protocol.read_line() {}
    drop(finished);
    let hung = watchdog.join().expect("watchdog thread");
    let status = child.wait().expect("wait for child");
    assert!(
        !hung,
        "the child hung for {CHILD_TIMEOUT:?} (plan {plan:?}); its stderr: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    assert_eq!(
        status.signal(),
        Some(9),
        "the child died by itself ({status}) instead of by SIGKILL; its stderr: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    Killed {
        opened: protocol.opened,
        opened_once: protocol.opened_once,
        acked: protocol.acked,
        wrote_since_open: protocol.wrote_since_open,
        in_gc: protocol.in_gc,
        transcript: protocol.transcript.concat(),
    }
}
