//! The invariants the decoder and the key parser must keep on ANY input: one oracle shared by
//! the cargo-fuzz targets (`fuzz_targets/*.rs`), the corpus replay test
//! (`tests/fuzz_corpus_replay.rs`) and the property tests (`tests/decoder_props.rs`), so a
//! crash found by one is checked by all.
//!
//! Each function panics (which the fuzzer and the test harness report) only when pagestore
//! breaks an invariant; pagestore itself must never panic on the input.

use pagestore::DataKey;
use pagestore::codec::{self, DecodeError};

/// Checks the record decoder on `bytes`: accepted records re-encode to exactly `bytes` and
/// hash to the key of their decoded node; rejected ones are rejected the same way by every
/// entry point, and so are their prefixes.
pub fn decode_record(bytes: &[u8]) {
    let parsed = codec::parse(bytes);
    let decoded = codec::decode(bytes);
    let keyed = codec::key_of_record(bytes);
    match parsed {
        Ok(view) => {
            let node = decoded.expect("parse accepted the record but decode rejected it");
            assert_eq!(view.to_data(), node, "parse and decode disagree");
            assert_eq!(
                codec::encode(&node),
                bytes,
                "an accepted record must be canonical: re-encoding gives the same bytes"
            );
            assert_eq!(codec::encoded_len(&node), bytes.len());
            let key = keyed.expect("parse accepted the record but key_of_record rejected it");
            assert_eq!(key, node.compute_key(), "record hash and node key disagree");
            assert_eq!(key, view.compute_key());
            assert!(node.arcs.iter().all(|k| k.as_bytes() != [0; 16]));
            // A record is exactly as long as its header says: no proper prefix is one.
            for cut in prefix_cuts(bytes.len()) {
                assert!(
                    codec::parse(&bytes[..cut]).is_err(),
                    "a {cut}-byte prefix of a valid {}-byte record was accepted",
                    bytes.len()
                );
            }
        }
        Err(err) => {
            assert_eq!(
                decoded.as_ref().err(),
                Some(&err),
                "decode disagrees with parse"
            );
            assert_eq!(
                keyed.as_ref().err(),
                Some(&err),
                "key_of_record disagrees with parse"
            );
            assert!(!err.to_string().is_empty());
            if bytes.len() < codec::HEADER_LEN {
                assert_eq!(err, DecodeError::TooShort { len: bytes.len() });
            }
        }
    }
}

/// Checks the key parser and the byte constructor on `bytes`: an accepted string is 32 hex
/// digits that print back (lowercased) and re-parse to the same key; accepted bytes are 16
/// non-zero bytes that round-trip.
pub fn parse_key(bytes: &[u8]) {
    match DataKey::from_slice(bytes) {
        Some(key) => {
            assert_eq!(bytes.len(), DataKey::LEN);
            assert_eq!(&key.as_bytes()[..], bytes);
        }
        None => assert!(bytes.len() != DataKey::LEN || bytes.iter().all(|&b| b == 0)),
    }
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    match text.parse::<DataKey>() {
        Ok(key) => {
            assert_eq!(text.len(), 32, "accepted {text:?}, which is not 32 bytes");
            assert!(
                text.bytes().all(|b| b.is_ascii_hexdigit()),
                "accepted {text:?}"
            );
            let printed = key.to_string();
            assert_eq!(printed, text.to_ascii_lowercase());
            assert_eq!(printed.parse::<DataKey>(), Ok(key));
            assert_eq!(format!("{key:?}"), format!("DataKey({printed})"));
            for cut in 0..text.len() {
                assert!(
                    text[..cut].parse::<DataKey>().is_err(),
                    "prefix {cut} accepted"
                );
            }
        }
        Err(err) => {
            assert!(!err.to_string().is_empty());
            let valid_hex = text.len() == 32 && text.bytes().all(|b| b.is_ascii_hexdigit());
            assert!(
                !valid_hex || text.bytes().all(|b| b == b'0'),
                "rejected {text:?}, which is 32 hex digits and not all zero"
            );
        }
    }
}

/// Prefix lengths worth checking: all of them for small records, a sample for large ones
/// (so one fuzz input stays cheap).
fn prefix_cuts(len: usize) -> impl Iterator<Item = usize> {
    let all = len <= 512;
    (0..len).filter(move |&cut| all || cut <= 64 || cut + 64 >= len || cut % 97 == 0)
}
