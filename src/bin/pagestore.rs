//! `pagestore`: inspect a pagestore SQLite store (`DIR/pagable.db`), collect its garbage and
//! compact it.
//!
//! The inspection subcommands (`stats`, `verify`, `roots`, `cat`, `tree`) and `gc --dry-run`
//! open the store read-only (`SqliteOptions::read_only`), so they run beside a process that
//! has the store open for writing (Durable or Sync mode). `gc` and `compact` change the store:
//! they open it read-write, which needs the store closed (no other process may have it open).
//!
//! Exit codes: 0 when all is well; 1 when damage was found (verify not clean, a missing or
//! corrupt record met by `cat` or `tree`, keys that `gc` found named but not stored); 2 when
//! the command could not run (bad arguments, a bad KEY, a DIR that is not a store, a store
//! that another process has open when `gc` or `compact` needs it closed, an I/O or SQLite
//! error).

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use pagestore::{
    DataKey, Error, GcOptions, GcPhase, GcProgress, NodeStore, OpenReport, SqliteNodeStore,
    SqliteOptions,
};
use serde_json::{Value, json};

/// Inspect a pagestore SQLite store (DIR/pagable.db) read-only, even while another process
/// has it open for writing; collect its garbage and compact it while it is closed.
///
/// Exit codes: 0 ok; 1 damage found; 2 the command could not run (bad arguments, a DIR that
/// is not a store, a store open in another process for gc/compact, an I/O or SQLite error).
#[derive(Debug, Parser)]
#[command(name = "pagestore", version)]
struct Cli {
    /// Print one JSON document on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Re-hash every record and check that every child is stored; exit 1 if anything is wrong.
    Verify {
        /// The store's directory (the one holding pagable.db).
        dir: PathBuf,
    },
    /// Show the store's figures: records, bytes, page size, table layout, free pages, roots
    /// (no record is decoded).
    Stats {
        /// The store's directory (the one holding pagable.db).
        dir: PathBuf,
    },
    /// List the named roots: name and key, one per line, sorted by name.
    Roots {
        /// The store's directory (the one holding pagable.db).
        dir: PathBuf,
    },
    /// Show one record: key, data length, children, and a preview of the data.
    Cat {
        /// The store's directory (the one holding pagable.db).
        dir: PathBuf,
        /// The record's key: 32 hex digits.
        key: String,
    },
    /// Show the DAG under KEY as an indented tree (a node already shown is not expanded again).
    Tree {
        /// The store's directory (the one holding pagable.db).
        dir: PathBuf,
        /// The top node's key: 32 hex digits.
        key: String,
        /// How many levels below KEY to expand.
        #[arg(long, default_value_t = 3)]
        depth: usize,
        /// Print a Graphviz digraph instead (`... | dot -Tsvg > tree.svg`).
        #[arg(long)]
        dot: bool,
    },
    /// Delete every record no root reaches, then give the freed pages back.
    ///
    /// Needs the store closed: it opens the store read-write and exits 2 if another process
    /// has it open. With --dry-run it opens the store read-only (so it runs while the store is
    /// open elsewhere), deletes nothing and reports what a collection would delete. Exits 1
    /// if roots or kept records name keys that are not stored (run `pagestore verify DIR`).
    Gc {
        /// The store's directory (the one holding pagable.db).
        dir: PathBuf,
        /// Count what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Rebuild the database file without its free pages (SQLite VACUUM) and show its size
    /// before and after.
    ///
    /// Needs temporary disk space up to the database's size. Needs the store closed: it opens
    /// the store read-write and exits 2 if another process has it open. Run `gc` first to
    /// delete what no root reaches.
    Compact {
        /// The store's directory (the one holding pagable.db).
        dir: PathBuf,
    },
}

/// Bytes of data that `cat` previews.
const PREVIEW_BYTES: usize = 256;

/// Why a command stopped without its normal output.
enum Failure {
    /// Exit 2: bad input or an operational error; the message is printed on stderr.
    Usage(String),
    /// Exit 1: damage met; the message is printed on stderr (text mode).
    Damage(String),
}

/// What a command prints on stdout, and whether it found damage (exit 1).
struct Output {
    text: String,
    json: Value,
    damaged: bool,
    /// A line for stderr (in both modes), saying what damage was found and what to do.
    warning: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Verify { dir } => verify(dir),
        Command::Stats { dir } => stats(dir),
        Command::Roots { dir } => roots(dir),
        Command::Cat { dir, key } => cat(dir, key),
        Command::Tree {
            dir,
            key,
            depth,
            dot,
        } => {
            if *dot && cli.json {
                Err(Failure::Usage(
                    "--dot and --json cannot be used together".into(),
                ))
            } else {
                tree(dir, key, *depth, *dot)
            }
        }
        Command::Gc { dir, dry_run } => gc(dir, *dry_run),
        Command::Compact { dir } => compact(dir),
    };
    match result {
        Ok(output) => {
            if let Some(warning) = &output.warning {
                eprintln!("pagestore: {warning}");
            }
            let mut stdout = std::io::stdout().lock();
            let written = if cli.json {
                serde_json::to_writer_pretty(&mut stdout, &output.json)
                    .map_err(std::io::Error::from)
                    .and_then(|()| writeln!(stdout))
            } else {
                stdout.write_all(output.text.as_bytes())
            };
            match written.and_then(|()| stdout.flush()) {
                // A reader that stopped early (`| head`) is not an error of ours.
                Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => {
                    eprintln!("pagestore: could not write the output: {err}");
                    ExitCode::from(2)
                }
                _ if output.damaged => ExitCode::from(1),
                _ => ExitCode::SUCCESS,
            }
        }
        Err(Failure::Usage(message)) => {
            eprintln!("pagestore: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Damage(message)) => {
            eprintln!("pagestore: {message}");
            ExitCode::from(1)
        }
    }
}

/// Opens the store in `dir` read-only; a DIR that is not a store is a usage error.
fn open(dir: &Path) -> Result<SqliteNodeStore, Failure> {
    check_store_dir(dir)?;
    SqliteOptions::default()
        .read_only()
        .readers(1)
        .open_node_store(dir)
        .map_err(|err| cannot_open(dir, &err))
}

/// Opens the store in `dir` read-write, for `gc` and `compact`: a DIR that is not a store is a
/// usage error (and no new store is created), a store another process has open too.
fn open_for_writing(dir: &Path, command: &str) -> Result<SqliteNodeStore, Failure> {
    check_store_dir(dir)?;
    SqliteOptions::default()
        .readers(1)
        .open_node_store(dir)
        .map_err(|err| {
            if held_by_another(&err) {
                Failure::Usage(format!(
                    "the store in {} is open in another process; `{command}` needs it closed \
                     (close that process first{})",
                    dir.display(),
                    if command == "gc" {
                        ", or run `gc --dry-run`, which reads it while it is open"
                    } else {
                        ""
                    }
                ))
            } else {
                cannot_open(dir, &err)
            }
        })
}

/// Whether opening failed because another store holds the directory's lock.
fn held_by_another(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::WouldBlock)
    })
}

fn cannot_open(dir: &Path, err: &anyhow::Error) -> Failure {
    Failure::Usage(format!(
        "cannot open the store in {}: {}",
        dir.display(),
        one_line(err)
    ))
}

/// Checks that `dir` is a directory holding `pagable.db` (so that no open creates a store).
fn check_store_dir(dir: &Path) -> Result<(), Failure> {
    if !dir.is_dir() {
        return Err(Failure::Usage(format!(
            "{} is not a directory (DIR is a store's directory, the one holding pagable.db)",
            dir.display()
        )));
    }
    if !dir.join("pagable.db").is_file() {
        return Err(Failure::Usage(format!(
            "{} is not a pagestore store: it holds no pagable.db",
            dir.display()
        )));
    }
    Ok(())
}

/// An error and its causes on one line.
fn one_line(err: &anyhow::Error) -> String {
    format!("{err:#}").replace('\n', " ")
}

fn operational(err: anyhow::Error) -> Failure {
    Failure::Usage(one_line(&err))
}

fn parse_key(text: &str) -> Result<DataKey, Failure> {
    text.parse()
        .map_err(|err| Failure::Usage(format!("invalid KEY {text:?}: {err}")))
}

/// The note for a store whose open found a Cache-mode marker.
fn open_note(store: &SqliteNodeStore) -> Option<&'static str> {
    match store.open_report() {
        OpenReport::UncleanNotChecked => Some(
            "a Cache-mode store has this store open, or its last session did not close \
             cleanly (not repaired by a read-only open)",
        ),
        _ => None,
    }
}

fn verify(dir: &Path) -> Result<Output, Failure> {
    let store = open(dir)?;
    // A bar over the record count when stderr is a terminal (a spinner if the count cannot
    // be read); nothing when it is piped or redirected.
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = match store.stats() {
            Ok(stats) => {
                let bar = indicatif::ProgressBar::new(stats.records);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} {wide_bar} {pos}/{len} records ({eta})",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar
            }
            Err(_) => indicatif::ProgressBar::new_spinner(),
        };
        bar.set_message(format!("verifying {}", store.path().display()));
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    });
    let report = store.verify_with_progress(|checked| {
        if let Some(bar) = &bar {
            bar.set_position(checked);
        }
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let report = report.map_err(operational)?;

    let mut text = String::new();
    let _ = writeln!(text, "store:            {}", store.path().display());
    if let Some(note) = open_note(&store) {
        let _ = writeln!(text, "note:             {note}");
    }
    let _ = writeln!(text, "records:          {}", report.records);
    let _ = writeln!(text, "corrupt:          {}", report.corrupt.len());
    for key in &report.corrupt {
        let _ = writeln!(text, "  {key}");
    }
    let _ = writeln!(text, "missing children: {}", report.missing_children.len());
    for (parent, child) in &report.missing_children {
        let _ = writeln!(text, "  {parent} -> {child}");
    }
    let _ = writeln!(text, "malformed keys:   {}", report.malformed_keys);
    let ok = report.is_ok();
    let _ = writeln!(
        text,
        "result:           {}",
        if ok { "ok" } else { "DAMAGED" }
    );

    let json = json!({
        "store": store.path().display().to_string(),
        "unclean_not_checked": open_note(&store).is_some(),
        "records": report.records,
        "corrupt": report.corrupt.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "missing_children": report
            .missing_children
            .iter()
            .map(|(parent, child)| json!({"parent": parent.to_string(), "child": child.to_string()}))
            .collect::<Vec<_>>(),
        "malformed_keys": report.malformed_keys,
        "ok": ok,
    });
    Ok(Output {
        text,
        json,
        damaged: !ok,
        warning: None,
    })
}

/// How `stats` names a table layout (`docs/format.md` describes each).
fn layout_name(layout: pagestore::TableLayout) -> &'static str {
    match layout {
        pagestore::TableLayout::IntegerKey => "integer-key",
        pagestore::TableLayout::Rowid => "rowid",
        pagestore::TableLayout::WithoutRowid => "without-rowid (the reference's)",
        _ => "unknown",
    }
}

fn stats(dir: &Path) -> Result<Output, Failure> {
    let store = open(dir)?;
    let stats = store.stats().map_err(operational)?;
    let optional = |value: Option<u64>| value.map_or("unknown".to_string(), |v| v.to_string());
    let mut text = String::new();
    let _ = writeln!(text, "store: {}", store.path().display());
    let _ = writeln!(text, "records: {}", stats.records);
    let _ = writeln!(text, "data bytes: {}", stats.data_bytes);
    let _ = writeln!(text, "roots: {}", stats.roots);
    let _ = writeln!(text, "file bytes: {}", optional(stats.file_bytes));
    let _ = writeln!(text, "page size: {}", optional(stats.page_size));
    let _ = writeln!(text, "table layout: {}", layout_name(store.table_layout()));
    let _ = writeln!(text, "free pages: {}", optional(stats.free_pages));
    let _ = writeln!(text, "free bytes: {}", optional(stats.free_bytes));
    if let Some(note) = open_note(&store) {
        let _ = writeln!(text, "note: {note}");
    }
    let json = json!({
        "store": store.path().display().to_string(),
        "records": stats.records,
        "data_bytes": stats.data_bytes,
        "roots": stats.roots,
        "file_bytes": stats.file_bytes,
        "page_size": stats.page_size,
        "table_layout": layout_name(store.table_layout()),
        "free_pages": stats.free_pages,
        "free_bytes": stats.free_bytes,
    });
    Ok(Output {
        text,
        json,
        damaged: false,
        warning: None,
    })
}

fn roots(dir: &Path) -> Result<Output, Failure> {
    let store = open(dir)?;
    let roots = store.roots().map_err(operational)?;
    let mut text = String::new();
    for (name, key) in &roots {
        let _ = writeln!(text, "{}\t{key}", escape_name(name));
    }
    let json = json!({
        "roots": roots
            .iter()
            .map(|(name, key)| json!({"name": name, "key": key.to_string()}))
            .collect::<Vec<_>>(),
    });
    Ok(Output {
        text,
        json,
        damaged: false,
        warning: None,
    })
}

/// A root name for a tab-separated line: backslashes and control characters (tab, newline)
/// escaped, so one root is one line.
fn escape_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

/// A record as `cat` and `tree` meet it.
enum Record {
    Stored(std::sync::Arc<pagestore::PagableData>),
    Missing,
    Corrupt(String),
}

/// Reads `key`; a missing or damaged record is a [`Record`], any other error a failure.
fn read(store: &SqliteNodeStore, key: &DataKey) -> Result<Record, Failure> {
    match store.get(key) {
        Ok(node) => Ok(Record::Stored(node)),
        Err(err) => match err.downcast_ref::<Error>() {
            Some(Error::NotFound(_)) => Ok(Record::Missing),
            Some(Error::Corrupt { reason, .. }) => Ok(Record::Corrupt(reason.clone())),
            _ => Err(operational(err)),
        },
    }
}

fn cat(dir: &Path, key: &str) -> Result<Output, Failure> {
    let key = parse_key(key)?;
    let store = open(dir)?;
    let node = match read(&store, &key)? {
        Record::Stored(node) => node,
        Record::Missing => {
            return Err(Failure::Damage(format!(
                "no record is stored under key {key}"
            )));
        }
        Record::Corrupt(reason) => {
            return Err(Failure::Damage(format!(
                "the record under key {key} is corrupt ({reason})"
            )));
        }
    };
    let mut missing = Vec::new();
    for child in &node.arcs {
        if !store.contains(child).map_err(operational)? {
            missing.push(*child);
        }
    }
    let data = &node.data;
    let window = &data[..data.len().min(PREVIEW_BYTES)];
    let utf8 = utf8_preview(window, data.len() > window.len());

    let mut text = String::new();
    let _ = writeln!(text, "key:      {key}");
    let _ = writeln!(text, "data:     {} bytes", data.len());
    let _ = writeln!(text, "children: {}", node.arcs.len());
    for child in &node.arcs {
        let mark = if missing.contains(child) {
            "  (MISSING)"
        } else {
            ""
        };
        let _ = writeln!(text, "  {child}{mark}");
    }
    if window.len() < data.len() {
        let _ = writeln!(
            text,
            "hex (first {} of {} bytes):",
            window.len(),
            data.len()
        );
    } else {
        let _ = writeln!(text, "hex:");
    }
    text.push_str(&hex_dump(window));
    if let Some(preview) = utf8 {
        let more = if preview.len() < data.len() {
            "..."
        } else {
            ""
        };
        let _ = writeln!(text, "utf-8:    {preview:?}{more}");
    }

    let json = json!({
        "key": key.to_string(),
        "data_len": data.len(),
        "child_count": node.arcs.len(),
        "children": node.arcs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "missing_children": missing.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "preview": {
            "bytes": window.len(),
            "hex": window.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "utf8": utf8,
        },
    });
    Ok(Output {
        text,
        json,
        damaged: !missing.is_empty(),
        warning: None,
    })
}

/// The preview window as text if it is valid UTF-8; when the data goes on past the window, a
/// character cut by the window's end is dropped.
fn utf8_preview(window: &[u8], truncated: bool) -> Option<&str> {
    match std::str::from_utf8(window) {
        Ok(text) => Some(text),
        Err(err) if truncated && err.error_len().is_none() => {
            std::str::from_utf8(&window[..err.valid_up_to()]).ok()
        }
        Err(_) => None,
    }
}

/// `xxd`-style lines: offset, 16 bytes in hex, and their printable ASCII.
fn hex_dump(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (line, chunk) in bytes.chunks(16).enumerate() {
        let _ = write!(out, "  {:08x}  ", line * 16);
        for i in 0..16 {
            match chunk.get(i) {
                Some(byte) => {
                    let _ = write!(out, "{byte:02x} ");
                }
                None => out.push_str("   "),
            }
            if i == 7 {
                out.push(' ');
            }
        }
        out.push_str(" |");
        out.extend(chunk.iter().map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                char::from(b)
            } else {
                '.'
            }
        }));
        out.push_str("|\n");
    }
    out
}

/// One node of the walk, for the JSON and dot outputs.
struct Visited {
    key: DataKey,
    depth: usize,
    record: Record,
    expanded: bool,
}

fn tree(dir: &Path, key: &str, max_depth: usize, dot: bool) -> Result<Output, Failure> {
    let top = parse_key(key)?;
    let store = open(dir)?;

    // Depth-first with an explicit stack, so a deep DAG cannot overflow the call stack.
    struct Frame {
        key: DataKey,
        depth: usize,
        /// What the lines of the parent's ancestors put before this node's connector.
        prefix: String,
        last: bool,
    }
    let mut nodes: Vec<Visited> = Vec::new();
    let mut index: HashMap<DataKey, usize> = HashMap::new();
    let mut expanded: HashSet<DataKey> = HashSet::new();
    let mut damaged = false;
    let mut text = String::new();
    let mut stack = vec![Frame {
        key: top,
        depth: 0,
        prefix: String::new(),
        last: true,
    }];
    while let Some(frame) = stack.pop() {
        let (line_prefix, child_prefix) = if frame.depth == 0 {
            (String::new(), String::new())
        } else if frame.last {
            (
                format!("{}└── ", frame.prefix),
                format!("{}    ", frame.prefix),
            )
        } else {
            (
                format!("{}├── ", frame.prefix),
                format!("{}│   ", frame.prefix),
            )
        };
        let seen = index.get(&frame.key).copied();
        let at = match seen {
            Some(at) => at,
            None => {
                nodes.push(Visited {
                    key: frame.key,
                    depth: frame.depth,
                    record: read(&store, &frame.key)?,
                    expanded: false,
                });
                index.insert(frame.key, nodes.len() - 1);
                nodes.len() - 1
            }
        };
        let node = &nodes[at];
        let children = match &node.record {
            Record::Missing => {
                damaged = true;
                let _ = writeln!(text, "{line_prefix}{}  MISSING", frame.key);
                continue;
            }
            Record::Corrupt(reason) => {
                damaged = true;
                let _ = writeln!(text, "{line_prefix}{}  CORRUPT ({reason})", frame.key);
                continue;
            }
            Record::Stored(data) => data.clone(),
        };
        let expand = frame.depth < max_depth && !children.arcs.is_empty();
        if expanded.contains(&frame.key) || (seen.is_some() && !expand) {
            let _ = writeln!(text, "{line_prefix}{}  (shown above)", frame.key);
            continue;
        }
        let plural = if children.arcs.len() == 1 { "" } else { "ren" };
        let _ = write!(
            text,
            "{line_prefix}{}  {} bytes, {} child{plural}",
            frame.key,
            children.data.len(),
            children.arcs.len(),
        );
        if !expand && !children.arcs.is_empty() {
            text.push_str("  (not expanded: --depth)");
        }
        text.push('\n');
        if expand {
            expanded.insert(frame.key);
            nodes[at].expanded = true;
            let count = children.arcs.len();
            for (i, child) in children.arcs.iter().enumerate().rev() {
                stack.push(Frame {
                    key: *child,
                    depth: frame.depth + 1,
                    prefix: child_prefix.clone(),
                    last: i + 1 == count,
                });
            }
        }
    }

    let json = json!({
        "root": top.to_string(),
        "depth": max_depth,
        "nodes": nodes.iter().map(visited_json).collect::<Vec<_>>(),
    });
    if dot {
        text = dot_graph(&nodes);
    }
    Ok(Output {
        text,
        json,
        damaged,
        warning: None,
    })
}

fn visited_json(node: &Visited) -> Value {
    let key = node.key.to_string();
    match &node.record {
        Record::Stored(data) => json!({
            "key": key,
            "depth": node.depth,
            "status": "ok",
            "data_len": data.data.len(),
            "child_count": data.arcs.len(),
            "children": data.arcs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "expanded": node.expanded,
        }),
        Record::Missing => json!({"key": key, "depth": node.depth, "status": "missing"}),
        Record::Corrupt(reason) => {
            json!({"key": key, "depth": node.depth, "status": "corrupt", "reason": reason})
        }
    }
}

/// The walked nodes as a Graphviz digraph: an edge for each child of an expanded node;
/// nodes not expanded are dashed, missing and corrupt ones red.
fn dot_graph(nodes: &[Visited]) -> String {
    let mut out = String::from("digraph pagestore {\n  node [shape=box, fontname=monospace];\n");
    for node in nodes {
        let short = &node.key.to_string()[..12];
        let (label, style) = match &node.record {
            Record::Stored(data) => {
                let style = if node.expanded || data.arcs.is_empty() {
                    ""
                } else {
                    ", style=dashed"
                };
                (
                    format!(
                        "{short}\\n{} bytes, {} children",
                        data.data.len(),
                        data.arcs.len()
                    ),
                    style,
                )
            }
            Record::Missing => (format!("{short}\\nMISSING"), ", color=red"),
            Record::Corrupt(_) => (format!("{short}\\nCORRUPT"), ", color=red"),
        };
        let _ = writeln!(out, "  \"{}\" [label=\"{label}\"{style}];", node.key);
    }
    for node in nodes {
        if let (Record::Stored(data), true) = (&node.record, node.expanded) {
            for child in &data.arcs {
                let _ = writeln!(out, "  \"{}\" -> \"{child}\";", node.key);
            }
        }
    }
    out.push_str("}\n");
    out
}

fn gc(dir: &Path, dry_run: bool) -> Result<Output, Failure> {
    let store = if dry_run {
        open(dir)?
    } else {
        open_for_writing(dir, "gc")?
    };
    // A counter while marking (how many records it reaches is not known ahead), then a bar
    // over the record count while sweeping, when stderr is a terminal; nothing when it is
    // piped or redirected.
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} {pos} records")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.set_message("marking");
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    });
    let records = bar
        .as_ref()
        .and_then(|_| store.stats().ok())
        .map(|stats| stats.records);
    let progress = |progress: GcProgress| {
        let Some(bar) = &bar else {
            return;
        };
        match progress.phase {
            GcPhase::Mark => bar.set_message("marking"),
            // The first sweep report: the bar gets the record count as its length.
            GcPhase::Sweep if bar.length().is_none() => {
                if let Some(records) = records {
                    bar.set_length(records);
                    bar.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{msg} {wide_bar} {pos}/{len} records ({eta})",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                }
                bar.set_message("sweeping");
            }
            _ => {}
        }
        bar.set_position(progress.done);
    };
    let report = store.collect_garbage(&GcOptions::new().dry_run(dry_run).progress(&progress));
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let report = report.map_err(operational)?;
    let path = store.path().display().to_string();
    let note = open_note(&store);
    if !dry_run {
        store.flush().map_err(operational)?;
    }
    drop(store);

    let would = if report.dry_run { "would be " } else { "" };
    let mut text = String::new();
    let _ = writeln!(text, "store:          {path}");
    if let Some(note) = note {
        let _ = writeln!(text, "note:           {note}");
    }
    if report.dry_run {
        let _ = writeln!(text, "dry run:        nothing was deleted");
    }
    let _ = writeln!(text, "kept:           {} records", report.kept);
    let _ = writeln!(
        text,
        "deleted:        {} records {would}deleted",
        report.deleted
    );
    let _ = writeln!(text, "bytes freed:    {} {would}freed", report.bytes_freed);
    let _ = writeln!(text, "pages released: {}", report.pages_released);
    let _ = writeln!(text, "missing keys:   {}", report.missing);
    let _ = writeln!(
        text,
        "duration:       {:.3} s",
        report.duration.as_secs_f64()
    );

    let warning = (report.missing > 0).then(|| {
        format!(
            "{} keys named by roots or kept records are not stored: the store is damaged \
             (run `pagestore verify {}`)",
            report.missing,
            dir.display()
        )
    });
    let json = json!({
        "store": path,
        "dry_run": report.dry_run,
        "kept": report.kept,
        "deleted": report.deleted,
        "bytes_freed": report.bytes_freed,
        "pages_released": report.pages_released,
        "missing": report.missing,
        "duration_secs": report.duration.as_secs_f64(),
    });
    Ok(Output {
        text,
        json,
        damaged: report.missing > 0,
        warning,
    })
}

fn compact(dir: &Path) -> Result<Output, Failure> {
    let store = open_for_writing(dir, "compact")?;
    let before = store.stats().map_err(operational)?;
    let spinner = std::io::stderr().is_terminal().then(|| {
        let spinner = indicatif::ProgressBar::new_spinner();
        spinner.set_message(format!("compacting {}", store.path().display()));
        spinner.enable_steady_tick(Duration::from_millis(100));
        spinner
    });
    let result = store.compact();
    if let Some(spinner) = &spinner {
        spinner.finish_and_clear();
    }
    result.map_err(operational)?;
    let after = store.stats().map_err(operational)?;
    let path = store.path().display().to_string();
    store.flush().map_err(operational)?;
    drop(store);

    let optional = |value: Option<u64>| value.map_or("unknown".to_string(), |v| v.to_string());
    let mut text = String::new();
    let _ = writeln!(text, "store:             {path}");
    let _ = writeln!(text, "file bytes before: {}", optional(before.file_bytes));
    let _ = writeln!(text, "file bytes after:  {}", optional(after.file_bytes));
    let _ = writeln!(text, "free pages before: {}", optional(before.free_pages));
    let _ = writeln!(text, "free pages after:  {}", optional(after.free_pages));
    let json = json!({
        "store": path,
        "file_bytes_before": before.file_bytes,
        "file_bytes_after": after.file_bytes,
        "free_pages_before": before.free_pages,
        "free_pages_after": after.free_pages,
    });
    Ok(Output {
        text,
        json,
        damaged: false,
        warning: None,
    })
}
