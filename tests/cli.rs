//! The `pagestore` command: each subcommand's text and `--json` output, its exit codes, and
//! reading a store that this process has open for writing.

#![cfg(feature = "cli")]

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use pagestore::{DataKey, Durability, NodeStore, PagableData, SqliteNodeStore, SqliteOptions};
use serde_json::Value;

/// Runs the built binary with `args`; panics if it hangs.
fn run(args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pagestore"));
    command.args(args);
    common::output_with_timeout(&mut command, Duration::from_secs(60))
}

fn exit_code(output: &Output) -> i32 {
    output.status.code().expect("exited, not killed")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("UTF-8 stdout")
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).expect("UTF-8 stderr")
}

/// Runs with `--json` and parses stdout as one JSON document.
fn run_json(args: &[&str]) -> (i32, Value) {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let output = run(&all);
    let json = serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
        panic!(
            "stdout of {all:?} is not JSON ({err}): {}\nstderr: {}",
            stdout(&output),
            stderr(&output)
        )
    });
    (exit_code(&output), json)
}

fn node(data: &[u8], arcs: Vec<DataKey>) -> PagableData {
    PagableData {
        data: data.to_vec(),
        arcs,
    }
}

/// A diamond: `top` → `left`, `right`; both → `leaf`.
struct Diamond {
    top: DataKey,
    left: DataKey,
    right: DataKey,
    leaf: DataKey,
}

fn store_diamond(store: &SqliteNodeStore) -> Diamond {
    let leaf = store.put(node(b"the shared leaf", vec![])).unwrap();
    let left = store.put(node(b"left", vec![leaf])).unwrap();
    let right = store.put(node(&[0xff, 0x00, 0x80], vec![leaf])).unwrap();
    let top = store.put(node(b"top", vec![left, right])).unwrap();
    store.set_root("main", top).unwrap();
    store.set_root("leaf\tname", leaf).unwrap();
    store.flush().unwrap();
    Diamond {
        top,
        left,
        right,
        leaf,
    }
}

/// A closed store in a new directory, holding a diamond.
fn diamond_dir() -> (tempfile::TempDir, Diamond) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteOptions::default()
        .open_node_store(dir.path())
        .unwrap();
    let diamond = store_diamond(&store);
    drop(store);
    (dir, diamond)
}

fn path(dir: &Path) -> &str {
    dir.to_str().unwrap()
}

/// Deletes the record of `key` behind the store's back (the store is closed).
fn delete_record(dir: &Path, key: DataKey) {
    let conn = rusqlite::Connection::open(dir.join("pagable.db")).unwrap();
    let deleted = common::on_record(&conn, key, "DELETE FROM {table} WHERE {row}");
    assert_eq!(deleted, 1);
}

/// Flips a byte of `key`'s record (the store is closed).
fn damage(dir: &Path, key: DataKey) {
    let store = SqliteOptions::default().open_node_store(dir).unwrap();
    common::damage_stored_record(&store, key, 2, 0x5a);
}

#[test]
fn verify_a_clean_store() {
    let (dir, _) = diamond_dir();
    let output = run(&["verify", path(dir.path())]);
    assert_eq!(exit_code(&output), 0, "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("records:          4\n"), "{text}");
    assert!(text.contains("corrupt:          0\n"), "{text}");
    assert!(text.contains("result:           ok\n"), "{text}");
    // Not a terminal: no spinner.
    assert_eq!(stderr(&output), "");

    let (code, json) = run_json(&["verify", path(dir.path())]);
    assert_eq!(code, 0);
    assert_eq!(json["records"], 4);
    assert_eq!(json["ok"], true);
    assert_eq!(json["corrupt"], Value::Array(vec![]));
    assert_eq!(json["missing_children"], Value::Array(vec![]));
    assert_eq!(json["malformed_keys"], 0);
}

#[test]
fn verify_reports_a_corrupt_record_and_a_missing_child() {
    let (dir, diamond) = diamond_dir();
    damage(dir.path(), diamond.left);
    delete_record(dir.path(), diamond.leaf);

    let output = run(&["verify", path(dir.path())]);
    assert_eq!(exit_code(&output), 1, "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains(&format!("  {}\n", diamond.left)), "{text}");
    // The damaged `left` names nothing any more; `right` still names the deleted leaf.
    assert!(
        text.contains(&format!("  {} -> {}\n", diamond.right, diamond.leaf)),
        "{text}"
    );
    assert!(text.contains("result:           DAMAGED\n"), "{text}");

    let (code, json) = run_json(&["verify", path(dir.path())]);
    assert_eq!(code, 1);
    assert_eq!(json["ok"], false);
    assert_eq!(json["records"], 3);
    assert_eq!(json["corrupt"][0], diamond.left.to_string());
    assert_eq!(
        json["missing_children"][0]["parent"],
        diamond.right.to_string()
    );
    assert_eq!(
        json["missing_children"][0]["child"],
        diamond.leaf.to_string()
    );
}

#[test]
fn stats_shows_the_store_s_figures() {
    let (dir, _) = diamond_dir();
    let output = run(&["stats", path(dir.path())]);
    assert_eq!(exit_code(&output), 0, "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("records: 4\n"), "{text}");
    assert!(text.contains("roots: 2\n"), "{text}");
    assert!(text.contains("page size: "), "{text}");
    assert!(text.contains("table layout: rowid"), "{text}");

    let (code, json) = run_json(&["stats", path(dir.path())]);
    assert_eq!(code, 0);
    assert_eq!(json["records"], 4);
    assert_eq!(json["roots"], 2);
    // Four records: a 16-byte header each, the data, and 16 bytes per child key.
    let data = 4 * 16 + (15 + 4 + 3 + 3) + 4 * 16;
    assert_eq!(json["data_bytes"], data);
    assert!(json["file_bytes"].as_u64().unwrap() > 0);

    let output = run(&["stats", "/nonexistent/store"]);
    assert_eq!(exit_code(&output), 2);
}

#[test]
fn roots_lists_name_and_key() {
    let (dir, diamond) = diamond_dir();
    let output = run(&["roots", path(dir.path())]);
    assert_eq!(exit_code(&output), 0, "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        format!("leaf\\tname\t{}\nmain\t{}\n", diamond.leaf, diamond.top)
    );

    let (code, json) = run_json(&["roots", path(dir.path())]);
    assert_eq!(code, 0);
    let roots = json["roots"].as_array().unwrap();
    assert_eq!(roots.len(), 2);
    assert_eq!(roots[0]["name"], "leaf\tname");
    assert_eq!(roots[0]["key"], diamond.leaf.to_string());
    assert_eq!(roots[1]["name"], "main");
    assert_eq!(roots[1]["key"], diamond.top.to_string());
}

#[test]
fn cat_shows_a_record() {
    let (dir, diamond) = diamond_dir();
    let top = diamond.top.to_string();
    let output = run(&["cat", path(dir.path()), &top]);
    assert_eq!(exit_code(&output), 0, "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.starts_with(&format!("key:      {top}\n")), "{text}");
    assert!(text.contains("data:     3 bytes\n"), "{text}");
    assert!(text.contains("children: 2\n"), "{text}");
    assert!(text.contains(&format!("  {}\n", diamond.left)), "{text}");
    assert!(text.contains(&format!("  {}\n", diamond.right)), "{text}");
    assert!(text.contains("  00000000  74 6f 70 "), "{text}");
    assert!(text.contains("|top|"), "{text}");
    assert!(text.contains("utf-8:    \"top\"\n"), "{text}");

    let (code, json) = run_json(&["cat", path(dir.path()), &top]);
    assert_eq!(code, 0);
    assert_eq!(json["key"], top);
    assert_eq!(json["data_len"], 3);
    assert_eq!(json["child_count"], 2);
    assert_eq!(json["children"][0], diamond.left.to_string());
    assert_eq!(json["children"][1], diamond.right.to_string());
    assert_eq!(json["preview"]["hex"], "746f70");
    assert_eq!(json["preview"]["utf8"], "top");

    // Data that is not UTF-8: a hex dump only.
    let right = diamond.right.to_string();
    let output = run(&["cat", path(dir.path()), &right]);
    assert_eq!(exit_code(&output), 0);
    assert!(!stdout(&output).contains("utf-8:"), "{}", stdout(&output));
    let (_, json) = run_json(&["cat", path(dir.path()), &right]);
    assert_eq!(json["preview"]["hex"], "ff0080");
    assert_eq!(json["preview"]["utf8"], Value::Null);
}

#[test]
fn cat_previews_only_the_first_256_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteOptions::default()
        .open_node_store(dir.path())
        .unwrap();
    // 299 bytes whose 256th byte starts a two-byte character: cut at the preview's end.
    let mut data = vec![b'a'; 255];
    data.extend_from_slice("é".repeat(22).as_bytes());
    let key = store.put(node(&data, vec![])).unwrap();
    drop(store);
    let key = key.to_string();
    let output = run(&["cat", path(dir.path()), &key]);
    assert_eq!(exit_code(&output), 0);
    let text = stdout(&output);
    assert!(text.contains("hex (first 256 of 299 bytes):"), "{text}");
    assert!(text.contains("  000000f0  "), "{text}");
    assert!(!text.contains("  00000100  "), "{text}");
    assert!(text.contains(&format!("utf-8:    \"{}\"...\n", "a".repeat(255))));
    let (_, json) = run_json(&["cat", path(dir.path()), &key]);
    assert_eq!(json["data_len"], 299);
    assert_eq!(json["preview"]["bytes"], 256);
    assert_eq!(json["preview"]["hex"].as_str().unwrap().len(), 512);
    assert_eq!(json["preview"]["utf8"], "a".repeat(255));
}

#[test]
fn cat_exits_1_on_a_missing_or_corrupt_record_or_a_missing_child() {
    let (dir, diamond) = diamond_dir();
    damage(dir.path(), diamond.left);
    let left = diamond.left.to_string();
    let output = run(&["cat", path(dir.path()), &left]);
    assert_eq!(exit_code(&output), 1);
    assert!(stderr(&output).contains("corrupt"), "{}", stderr(&output));
    assert_eq!(stdout(&output), "");

    delete_record(dir.path(), diamond.leaf);
    let leaf = diamond.leaf.to_string();
    let output = run(&["cat", path(dir.path()), &leaf]);
    assert_eq!(exit_code(&output), 1);
    assert!(stderr(&output).contains("no record"), "{}", stderr(&output));

    // `right` is intact but names the deleted leaf.
    let right = diamond.right.to_string();
    let output = run(&["cat", path(dir.path()), &right]);
    assert_eq!(exit_code(&output), 1);
    assert!(stdout(&output).contains(&format!("  {leaf}  (MISSING)\n")));
    let (code, json) = run_json(&["cat", path(dir.path()), &right]);
    assert_eq!(code, 1);
    assert_eq!(json["missing_children"][0], leaf);
}

#[test]
fn tree_shows_each_node_once() {
    let (dir, d) = diamond_dir();
    let output = run(&["tree", path(dir.path()), &d.top.to_string()]);
    assert_eq!(exit_code(&output), 0, "{}", stderr(&output));
    let expected = [
        format!("{}  3 bytes, 2 children", d.top),
        format!("├── {}  4 bytes, 1 child", d.left),
        format!("│   └── {}  15 bytes, 0 children", d.leaf),
        format!("└── {}  3 bytes, 1 child", d.right),
        format!("    └── {}  (shown above)", d.leaf),
    ];
    assert_eq!(stdout(&output), expected.map(|line| line + "\n").concat());

    let output = run(&["tree", path(dir.path()), &d.top.to_string(), "--depth", "1"]);
    assert_eq!(exit_code(&output), 0);
    let text = stdout(&output);
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(
        text.contains(&format!(
            "├── {}  4 bytes, 1 child  (not expanded: --depth)\n",
            d.left
        )),
        "{text}"
    );

    let (code, json) = run_json(&["tree", path(dir.path()), &d.top.to_string()]);
    assert_eq!(code, 0);
    assert_eq!(json["root"], d.top.to_string());
    let nodes = json["nodes"].as_array().unwrap();
    let keys: Vec<&str> = nodes.iter().map(|n| n["key"].as_str().unwrap()).collect();
    let expected_keys = [d.top, d.left, d.leaf, d.right].map(|k| k.to_string());
    assert_eq!(keys, expected_keys);
    assert_eq!(nodes[0]["children"][1], d.right.to_string());
    assert_eq!(nodes[0]["expanded"], true);
    assert_eq!(nodes[2]["depth"], 2);
    assert_eq!(nodes[2]["status"], "ok");
    assert_eq!(nodes[2]["data_len"], 15);

    let output = run(&["tree", path(dir.path()), &d.top.to_string(), "--dot"]);
    assert_eq!(exit_code(&output), 0);
    let dot = stdout(&output);
    assert!(dot.starts_with("digraph pagestore {\n"), "{dot}");
    assert!(dot.ends_with("}\n"), "{dot}");
    for (from, to) in [(d.top, d.left), (d.top, d.right), (d.left, d.leaf)] {
        assert!(
            dot.contains(&format!("  \"{from}\" -> \"{to}\";\n")),
            "{dot}"
        );
    }
    assert_eq!(dot.matches(" -> ").count(), 4, "{dot}");
}

#[test]
fn tree_marks_missing_and_corrupt_nodes_and_exits_1() {
    let (dir, d) = diamond_dir();
    damage(dir.path(), d.left);
    delete_record(dir.path(), d.leaf);
    let output = run(&["tree", path(dir.path()), &d.top.to_string()]);
    assert_eq!(exit_code(&output), 1, "{}", stderr(&output));
    let text = stdout(&output);
    assert!(
        text.contains(&format!("├── {}  CORRUPT (", d.left)),
        "{text}"
    );
    assert!(
        text.contains(&format!("    └── {}  MISSING\n", d.leaf)),
        "{text}"
    );

    let (code, json) = run_json(&["tree", path(dir.path()), &d.top.to_string()]);
    assert_eq!(code, 1);
    let nodes = json["nodes"].as_array().unwrap();
    assert_eq!(nodes[1]["status"], "corrupt");
    assert_eq!(nodes[3]["status"], "missing");

    // A missing top node.
    let output = run(&["tree", path(dir.path()), &d.leaf.to_string()]);
    assert_eq!(exit_code(&output), 1);
    assert_eq!(stdout(&output), format!("{}  MISSING\n", d.leaf));
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    let (dir, d) = diamond_dir();
    let not_a_store = tempfile::tempdir().unwrap();
    let file = not_a_store.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let garbage = tempfile::tempdir().unwrap();
    std::fs::write(garbage.path().join("pagable.db"), vec![7u8; 4096]).unwrap();
    let key = d.top.to_string();
    let zero_key = "0".repeat(32);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["cat", path(dir.path()), "xyz"], "invalid KEY"),
        (vec!["tree", path(dir.path()), &zero_key], "invalid KEY"),
        (
            vec!["verify", path(not_a_store.path())],
            "not a pagestore store",
        ),
        (vec!["roots", path(&file)], "not a directory"),
        (vec!["cat", "/no/such/dir", &key], "not a directory"),
        (vec!["roots", path(garbage.path())], "cannot open the store"),
        (
            vec!["--json", "tree", path(dir.path()), &key, "--dot"],
            "cannot be used together",
        ),
    ];
    for (args, message) in cases {
        let output = run(&args);
        assert_eq!(exit_code(&output), 2, "{args:?}: {}", stderr(&output));
        let err = stderr(&output);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("pagestore: ") && err.contains(message),
            "{args:?}: {err}"
        );
        assert_eq!(stdout(&output), "", "{args:?}");
    }
    // clap's own usage errors.
    for args in [
        &[][..],
        &["verify"],
        &["frobnicate"],
        &["roots", "--bogus", "x"],
    ] {
        assert_eq!(exit_code(&run(args)), 2, "{args:?}");
    }
    assert_eq!(exit_code(&run(&["--help"])), 0);
}

/// The subcommands read a store that a Durable or Sync store in this process has open for
/// writing, see what it flushes later, and leave it working.
#[test]
fn reads_a_store_open_for_writing() {
    for durability in [Durability::Durable, Durability::Sync] {
        let dir = tempfile::tempdir().unwrap();
        let writer = SqliteOptions::default()
            .durability(durability)
            .open_node_store(dir.path())
            .unwrap();
        let d = store_diamond(&writer);

        let output = run(&["verify", path(dir.path())]);
        assert_eq!(exit_code(&output), 0, "{durability:?}: {}", stderr(&output));
        let (code, json) = run_json(&["roots", path(dir.path())]);
        assert_eq!(code, 0);
        assert_eq!(json["roots"][1]["key"], d.top.to_string());
        let (code, json) = run_json(&["cat", path(dir.path()), &d.left.to_string()]);
        assert_eq!(code, 0, "{durability:?}");
        assert_eq!(json["data_len"], 4);

        // Later writes are seen by later runs; the writer carries on.
        let more = writer.put(node(b"more", vec![d.top])).unwrap();
        writer.set_root("more", more).unwrap();
        writer.flush().unwrap();
        let (code, json) = run_json(&["verify", path(dir.path())]);
        assert_eq!(code, 0);
        assert_eq!(json["records"], 5);
        let (_, json) = run_json(&["roots", path(dir.path())]);
        assert_eq!(json["roots"].as_array().unwrap().len(), 3);
        let output = run(&["cat", path(dir.path()), &more.to_string()]);
        assert_eq!(exit_code(&output), 0);
        assert!(stdout(&output).contains("utf-8:    \"more\"\n"));
        writer.put(node(b"after", vec![more])).unwrap();
        writer.flush().unwrap();
        assert_eq!(writer.verify().unwrap().records, 6);
    }
}

/// A closed store holding a rooted diamond and three records no root reaches.
fn diamond_and_garbage_dir() -> (tempfile::TempDir, Diamond, Vec<DataKey>) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteOptions::default()
        .open_node_store(dir.path())
        .unwrap();
    let diamond = store_diamond(&store);
    let lone = store.put(node(b"unreachable", vec![])).unwrap();
    let parent = store.put(node(b"unreachable parent", vec![lone])).unwrap();
    // Names a rooted node, but no root names it.
    let above = store
        .put(node(b"above the root", vec![diamond.top]))
        .unwrap();
    store.flush().unwrap();
    drop(store);
    (dir, diamond, vec![lone, parent, above])
}

fn open_read_only(dir: &Path) -> SqliteNodeStore {
    SqliteOptions::default()
        .read_only()
        .open_node_store(dir)
        .unwrap()
}

#[test]
fn gc_dry_run_counts_and_gc_deletes_the_unreachable_records() {
    let (dir, d, garbage) = diamond_and_garbage_dir();

    let (code, json) = run_json(&["gc", path(dir.path()), "--dry-run"]);
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["dry_run"], true);
    assert_eq!(json["deleted"], 3);
    assert_eq!(json["kept"], 4);
    assert_eq!(json["missing"], 0);
    assert!(json["bytes_freed"].as_u64().unwrap() > 0);
    assert!(json["duration_secs"].as_f64().unwrap() >= 0.0);
    let store = open_read_only(dir.path());
    assert_eq!(store.stats().unwrap().records, 7);
    for key in &garbage {
        assert!(store.contains(key).unwrap());
    }
    drop(store);

    let output = run(&["gc", path(dir.path()), "--dry-run"]);
    assert_eq!(exit_code(&output), 0, "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("dry run:"), "{text}");
    assert!(
        text.contains("deleted:        3 records would be deleted\n"),
        "{text}"
    );
    // Not a terminal: no progress bar.
    assert_eq!(stderr(&output), "");

    let (code, json) = run_json(&["gc", path(dir.path())]);
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["dry_run"], false);
    assert_eq!(json["deleted"], 3);
    assert_eq!(json["kept"], 4);
    assert_eq!(json["missing"], 0);
    let store = open_read_only(dir.path());
    assert_eq!(store.stats().unwrap().records, 4);
    for key in &garbage {
        assert!(!store.contains(key).unwrap(), "{key} survived");
    }
    for key in [d.top, d.left, d.right, d.leaf] {
        store.get(&key).unwrap();
    }
    assert!(store.verify().unwrap().is_ok());
    drop(store);

    // Nothing left to collect.
    let output = run(&["gc", path(dir.path())]);
    assert_eq!(exit_code(&output), 0, "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("kept:           4 records\n"), "{text}");
    assert!(
        text.contains("deleted:        0 records deleted\n"),
        "{text}"
    );
    assert_eq!(stderr(&output), "");
}

#[test]
fn gc_and_compact_need_the_store_closed_but_a_dry_run_does_not() {
    let (dir, _, _) = diamond_and_garbage_dir();
    let writer = SqliteOptions::default()
        .durability(Durability::Durable)
        .open_node_store(dir.path())
        .unwrap();
    for args in [
        vec!["gc", path(dir.path())],
        vec!["compact", path(dir.path())],
        vec!["--json", "gc", path(dir.path())],
    ] {
        let output = run(&args);
        assert_eq!(exit_code(&output), 2, "{args:?}: {}", stderr(&output));
        let err = stderr(&output);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("pagestore: ")
                && err.contains("open in another process")
                && err.contains("needs it closed"),
            "{args:?}: {err}"
        );
        assert_eq!(stdout(&output), "", "{args:?}");
    }
    let (code, json) = run_json(&["gc", path(dir.path()), "--dry-run"]);
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["deleted"], 3);
    // The writer carries on, and nothing was deleted.
    assert_eq!(writer.stats().unwrap().records, 7);
    writer.put(node(b"after", vec![])).unwrap();
    writer.flush().unwrap();
    drop(writer);

    let (code, json) = run_json(&["gc", path(dir.path())]);
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["deleted"], 4);
}

#[test]
fn gc_and_compact_refuse_a_missing_dir_or_one_that_is_not_a_store() {
    let empty = tempfile::tempdir().unwrap();
    let gone = empty.path().join("gone");
    let garbage = tempfile::tempdir().unwrap();
    std::fs::write(garbage.path().join("pagable.db"), vec![7u8; 4096]).unwrap();
    for command in [&["gc"][..], &["gc", "--dry-run"], &["compact"]] {
        for (dir, message) in [
            (gone.as_path(), "not a directory"),
            (empty.path(), "not a pagestore store"),
            (garbage.path(), "cannot open the store"),
        ] {
            let mut args = command.to_vec();
            args.push(path(dir));
            let output = run(&args);
            assert_eq!(exit_code(&output), 2, "{args:?}: {}", stderr(&output));
            let err = stderr(&output);
            assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
            assert!(
                err.starts_with("pagestore: ") && err.contains(message),
                "{args:?}: {err}"
            );
            assert_eq!(stdout(&output), "", "{args:?}");
        }
        // No store was created.
        assert!(!gone.exists());
        assert_eq!(std::fs::read_dir(empty.path()).unwrap().count(), 0);
    }
    // The damaged file was left as it was.
    assert_eq!(
        std::fs::read(garbage.path().join("pagable.db")).unwrap(),
        vec![7u8; 4096]
    );
}

#[test]
fn gc_exits_1_when_a_root_names_a_key_not_stored() {
    let (dir, d, _) = diamond_and_garbage_dir();
    delete_record(dir.path(), d.left);

    let (code, json) = run_json(&["gc", path(dir.path()), "--dry-run"]);
    assert_eq!(code, 1, "{json}");
    assert_eq!(json["missing"], 1);

    let output = run(&["gc", path(dir.path())]);
    assert_eq!(exit_code(&output), 1, "{}", stderr(&output));
    assert!(stdout(&output).contains("missing keys:   1\n"));
    let err = stderr(&output);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("pagestore: ")
            && err.contains("not stored")
            && err.contains(&format!("pagestore verify {}", path(dir.path()))),
        "{err}"
    );
    // What the roots still reach was kept.
    let store = open_read_only(dir.path());
    for key in [d.top, d.right, d.leaf] {
        store.get(&key).unwrap();
    }
}

/// Stores `count` records of 4 KiB that no root names, and closes the store.
fn store_unrooted(dir: &Path, count: u32, salt: u8) {
    // Cache mode: every record is in the database file once the store is closed.
    let store = SqliteOptions::default()
        .durability(pagestore::Durability::Cache)
        .open_node_store(dir)
        .unwrap();
    for i in 0..count {
        let mut data = vec![salt; 4096];
        data[..4].copy_from_slice(&i.to_le_bytes());
        store.put(node(&data, vec![])).unwrap();
    }
    store.flush().unwrap();
}

#[test]
fn compact_shrinks_the_file_after_gc() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("pagable.db");
    let store = SqliteOptions::default()
        .durability(pagestore::Durability::Cache)
        .open_node_store(dir.path())
        .unwrap();
    let kept = store.put(node(b"kept", vec![])).unwrap();
    store.set_root("kept", kept).unwrap();
    drop(store);
    store_unrooted(dir.path(), 2_000, 0);
    let full = std::fs::metadata(&db).unwrap().len();
    assert!(full > 2_000 * 4096, "{full}");

    let (code, json) = run_json(&["gc", path(dir.path())]);
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["deleted"], 2_000);
    assert_eq!(json["kept"], 1);
    assert!(
        json["bytes_freed"].as_u64().unwrap() > 2_000 * 4096,
        "{json}"
    );

    let (code, json) = run_json(&["compact", path(dir.path())]);
    assert_eq!(code, 0, "{json}");
    let compacted = std::fs::metadata(&db).unwrap().len();
    assert!(compacted < full / 10, "{full} -> {compacted}");
    let reported_before = json["file_bytes_before"].as_u64().unwrap();
    let reported_after = json["file_bytes_after"].as_u64().unwrap();
    assert!(reported_after <= reported_before, "{json}");
    assert_eq!(json["free_pages_after"], 0, "{json}");

    // Records deleted without giving their pages back (behind the store's back, by SQL):
    // only compact shrinks the file.
    store_unrooted(dir.path(), 2_000, 1);
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        let deleted = common::on_record(&conn, kept, "DELETE FROM {table} WHERE NOT ({row})")
            + conn
                .execute("DELETE FROM pagestore_overflow", [])
                .unwrap_or(0);
        assert_eq!(deleted, 2_000);
    }
    let before = std::fs::metadata(&db).unwrap().len();
    let output = run(&["compact", path(dir.path())]);
    assert_eq!(exit_code(&output), 0, "{}", stderr(&output));
    let after = std::fs::metadata(&db).unwrap().len();
    assert!(after < before / 10, "{before} -> {after}");
    let text = stdout(&output);
    assert!(
        text.contains(&format!("file bytes before: {before}\n")),
        "{text}"
    );
    assert!(
        text.contains(&format!("file bytes after:  {after}\n")),
        "{text}"
    );
    assert!(text.contains("free pages after:  0\n"), "{text}");
    // Not a terminal: no spinner.
    assert_eq!(stderr(&output), "");

    let store = open_read_only(dir.path());
    assert_eq!(store.get(&kept).unwrap().data, b"kept");
    assert_eq!(store.stats().unwrap().records, 1);
}

#[test]
fn gc_and_compact_usage_errors_exit_2() {
    for args in [
        &["gc"][..],
        &["compact"],
        &["gc", "--bogus", "x"],
        &["compact", "x", "--dry-run"],
        &["gc", "a", "b"],
    ] {
        let output = run(args);
        assert_eq!(exit_code(&output), 2, "{args:?}");
        assert_eq!(stdout(&output), "", "{args:?}");
    }
    for command in ["gc", "compact"] {
        let output = run(&[command, "--help"]);
        assert_eq!(exit_code(&output), 0);
        assert!(stdout(&output).contains("closed"), "{}", stdout(&output));
    }
    assert!(stdout(&run(&["compact", "--help"])).contains("temporary disk space"));
}
