//! Property tests of the record decoder and the key parser on arbitrary input: no panic,
//! accepted input round-trips exactly, every proper prefix of a record is rejected, and a
//! header claiming a huge length fails before anything of that size is allocated.
//!
//! Keys are also checked against an independent model: the whole hash input in one buffer,
//! hashed in one call, the zero hash mapped to `01 00 … 00`.
//!
//! 10,000 cases per property (`PAGESTORE_PROPTEST_CASES` changes it). The invariants are the
//! ones the fuzz targets check (`fuzz/checks.rs`), plus structured generators that reach the
//! accepting paths random bytes rarely hit.

#[path = "../fuzz/checks.rs"]
mod checks;

use pagestore::codec::{self, DecodeError, HEADER_LEN};
use pagestore::{DataKey, PagableData};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    let cases = std::env::var("PAGESTORE_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    ProptestConfig {
        cases,
        // The shrunk failing input is printed; keeping no regression files keeps the tree clean.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn any_key() -> impl Strategy<Value = DataKey> {
    any::<[u8; 16]>().prop_filter_map("the zero key is not a key", DataKey::from_bytes)
}

fn any_node() -> impl Strategy<Value = PagableData> {
    (
        prop::collection::vec(any::<u8>(), 0..200),
        prop::collection::vec(any_key(), 0..6),
    )
        .prop_map(|(data, arcs)| PagableData { data, arcs })
}

/// A header whose lengths are individually valid-looking but claim far more than is present.
fn huge_header() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        (1u64 << 40..=u64::MAX, any::<u64>()),
        (any::<u64>(), 1u64 << 36..=u64::MAX),
        (0u64..1 << 20, 1u64 << 60..=u64::MAX),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        checks::decode_record(&bytes);
    }

    #[test]
    fn arbitrary_bytes_after_a_plausible_header(
        data_len in 0u64..64,
        arc_count in 0u64..4,
        body in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        // Random bytes rarely have a consistent header; this reaches the body checks.
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&data_len.to_le_bytes());
        bytes.extend_from_slice(&arc_count.to_le_bytes());
        bytes.extend_from_slice(&body);
        checks::decode_record(&bytes);
    }

    #[test]
    fn keys_match_the_one_buffer_model_from_node_and_record(node in any_node()) {
        let mut input = (node.arcs.len() as u64).to_le_bytes().to_vec();
        input.extend_from_slice(&node.data);
        for arc in &node.arcs {
            input.extend_from_slice(&arc.as_bytes());
        }
        let mut model: [u8; 16] = blake3::hash(&input).as_bytes()[..16].try_into().unwrap();
        if model == [0; 16] {
            model[0] = 1;
        }
        prop_assert_eq!(node.compute_key().as_bytes(), model);
        prop_assert_eq!(codec::key_of_record(&codec::encode(&node)).unwrap().as_bytes(), model);
    }

    #[test]
    fn encoded_nodes_round_trip_and_every_prefix_is_rejected(node in any_node()) {
        let record = codec::encode(&node);
        prop_assert_eq!(record.len(), codec::encoded_len(&node));
        prop_assert_eq!(codec::decode(&record), Ok(node.clone()));
        prop_assert_eq!(codec::key_of_record(&record), Ok(node.compute_key()));
        for cut in 0..record.len() {
            let err = codec::decode(&record[..cut]).unwrap_err();
            let expected_kind = if cut < HEADER_LEN {
                matches!(err, DecodeError::TooShort { .. })
            } else {
                matches!(err, DecodeError::LengthMismatch { .. })
            };
            prop_assert!(expected_kind, "prefix {} of {}: {:?}", cut, record.len(), err);
        }
        let mut longer = record.clone();
        longer.push(0);
        prop_assert!(
            matches!(codec::decode(&longer), Err(DecodeError::LengthMismatch { .. })),
            "trailing byte accepted"
        );
        checks::decode_record(&record);
    }

    #[test]
    fn a_flipped_byte_never_decodes_to_the_same_key(node in any_node(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        // What the storage layer's verify-on-read relies on: a damaged record either fails to
        // decode or hashes to a different key.
        let mut record = codec::encode(&node);
        let i = at.index(record.len());
        record[i] ^= 1 << bit;
        if let Ok(key) = codec::key_of_record(&record) {
            prop_assert_ne!(key, node.compute_key());
        }
        checks::decode_record(&record);
    }

    #[test]
    fn an_oversized_length_fails_before_allocating((data_len, arc_count) in huge_header(), tail in prop::collection::vec(any::<u8>(), 0..64)) {
        // Each claimed size is at least 1 TiB: had the decoder reserved it, the process
        // would abort on allocation failure instead of returning this error.
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&data_len.to_le_bytes());
        bytes.extend_from_slice(&arc_count.to_le_bytes());
        bytes.extend_from_slice(&tail);
        let err = codec::decode(&bytes).unwrap_err();
        prop_assert!(
            matches!(err, DecodeError::LengthOverflow { .. } | DecodeError::LengthMismatch { .. }),
            "{:?}", err
        );
    }

    #[test]
    fn arbitrary_strings_never_panic_the_key_parser(text in ".{0,40}") {
        checks::parse_key(text.as_bytes());
    }

    #[test]
    fn hex_like_strings_exercise_the_parser(text in "[0-9a-fA-F+\\-xg ]{28,36}") {
        checks::parse_key(text.as_bytes());
    }

    #[test]
    fn every_key_round_trips_through_text_and_bytes(key in any_key(), upper in any::<bool>()) {
        let mut text = key.to_string();
        if upper {
            text = text.to_ascii_uppercase();
        }
        prop_assert_eq!(text.parse::<DataKey>(), Ok(key));
        prop_assert_eq!(DataKey::from_bytes(key.as_bytes()), Some(key));
        checks::parse_key(text.as_bytes());
        checks::parse_key(&key.as_bytes());
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_key_constructor(bytes in prop::collection::vec(any::<u8>(), 0..40)) {
        checks::parse_key(&bytes);
    }
}

#[test]
fn the_largest_claims_are_rejected_without_allocating() {
    for (data_len, arc_count) in [
        (u64::MAX, 0),
        (0, u64::MAX),
        (u64::MAX, u64::MAX),
        (u64::MAX - 15, 0),
        (0, u64::MAX / 16),
        (usize::MAX as u64 - 16, 0),
    ] {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&data_len.to_le_bytes());
        bytes.extend_from_slice(&arc_count.to_le_bytes());
        let err = codec::decode(&bytes).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::LengthOverflow { .. } | DecodeError::LengthMismatch { .. }
            ),
            "({data_len}, {arc_count}): {err:?}"
        );
    }
}
