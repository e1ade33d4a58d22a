//! Property tests: the record codec and keys against a simple model.

use pagestore::codec::{self, DecodeError};
use pagestore::{DataKey, PagableData};
use proptest::prelude::*;

fn arb_key() -> impl Strategy<Value = DataKey> {
    any::<[u8; 16]>().prop_filter_map("zero is not a key", DataKey::from_bytes)
}

fn arb_node() -> impl Strategy<Value = PagableData> {
    (
        proptest::collection::vec(any::<u8>(), 0..600),
        proptest::collection::vec(arb_key(), 0..8),
    )
        .prop_map(|(data, arcs)| PagableData { data, arcs })
}

/// The key computed the slow, obvious way: one buffer, one hash.
fn model_key(node: &PagableData) -> [u8; 16] {
    let mut input = (node.arcs.len() as u64).to_le_bytes().to_vec();
    input.extend_from_slice(&node.data);
    for arc in &node.arcs {
        input.extend_from_slice(&arc.as_bytes());
    }
    let hash = blake3::hash(&input);
    let mut key: [u8; 16] = hash.as_bytes()[..16].try_into().unwrap();
    if key == [0; 16] {
        key[0] = 1;
    }
    key
}

proptest! {
    #[test]
    fn encode_then_decode_is_identity(node in arb_node()) {
        let record = codec::encode(&node);
        prop_assert_eq!(record.len(), node.encoded_len());
        prop_assert_eq!(codec::decode(&record).unwrap(), node.clone());
        let view = codec::parse(&record).unwrap();
        prop_assert_eq!(view.data(), &node.data[..]);
        prop_assert_eq!(view.arcs().collect::<Vec<_>>(), node.arcs.clone());
    }

    #[test]
    fn key_matches_the_model_from_node_and_from_record(node in arb_node()) {
        let key = node.compute_key();
        prop_assert_eq!(key.as_bytes(), model_key(&node));
        prop_assert_eq!(codec::key_of_record(&codec::encode(&node)).unwrap(), key);
    }

    #[test]
    fn key_text_and_bytes_round_trip(key in arb_key()) {
        prop_assert_eq!(key.to_string().parse::<DataKey>().unwrap(), key);
        prop_assert_eq!(key.to_string().to_uppercase().parse::<DataKey>().unwrap(), key);
        prop_assert_eq!(DataKey::from_bytes(key.as_bytes()), Some(key));
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        // Ok or a typed error: both are fine, a panic is not.
        if let Ok(node) = codec::decode(&bytes) {
            prop_assert_eq!(codec::encode(&node), bytes);
        }
    }

    #[test]
    fn every_strict_prefix_and_any_extension_is_rejected(node in arb_node(), extra in 1usize..20) {
        let record = codec::encode(&node);
        for len in 0..record.len() {
            prop_assert!(codec::decode(&record[..len]).is_err(), "prefix of {} bytes accepted", len);
        }
        let mut longer = record.clone();
        longer.resize(record.len() + extra, 0xAB);
        prop_assert!(
            matches!(codec::decode(&longer), Err(DecodeError::LengthMismatch { .. })),
            "trailing bytes accepted"
        );
    }
}
