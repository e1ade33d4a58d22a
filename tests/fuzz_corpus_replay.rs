//! Replays every file in `fuzz/corpus/<target>/` and `fuzz/artifacts/<target>/` through the
//! same checks the cargo-fuzz targets run, on stable Rust and in CI: a crash the fuzzer once
//! found stays fixed, without needing nightly to check it.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::{Path, PathBuf};

/// The check a fuzz target runs on one input.
type Check = fn(&[u8]);

/// The fuzz targets and the check each replays.
const TARGETS: &[(&str, Check)] = &[
    ("decode_record", checks::decode_record),
    ("parse_key", checks::parse_key),
];

/// Every regular file under `dir` (recursively); none if it does not exist.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("read corpus directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn replay_corpus_and_artifacts() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for (target, check) in TARGETS {
        let mut files = files_under(&root.join("corpus").join(target));
        assert!(
            !files.is_empty(),
            "the seed corpus of fuzz target {target} is missing from fuzz/corpus/{target}/"
        );
        files.extend(files_under(&root.join("artifacts").join(target)));
        for file in files {
            let bytes = std::fs::read(&file)
                .unwrap_or_else(|e| panic!("read fuzz input {}: {e}", file.display()));
            // A panic names the input so it can be replayed alone.
            eprintln!("replaying {}", file.display());
            check(&bytes);
            replayed += 1;
        }
    }
    eprintln!("replayed {replayed} fuzz inputs");
}

#[test]
fn every_prefix_of_every_seed_is_checked_too() {
    // Prefixes of the seeds reach the decoder's early exits (short header, length mismatch).
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode_record");
    for file in files_under(&dir) {
        let bytes = std::fs::read(&file).expect("read seed");
        for cut in 0..=bytes.len() {
            checks::decode_record(&bytes[..cut]);
        }
    }
}
