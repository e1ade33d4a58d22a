//! The record encoding: how one [`PagableData`] is laid out as bytes on disk.
//!
//! ```text
//! u64_le(data.len()) ‖ u64_le(arcs.len()) ‖ data ‖ arcs[0] ‖ arcs[1] ‖ …   (16 bytes per key)
//! ```
//!
//! This is exactly the format of the reference implementation (pagable 0.3.3), so records
//! written by either read back in the other. A record's tail from byte 8 on is the input of
//! its key's hash (`u64_le(arcs.len()) ‖ data ‖ arcs`), so [`key_of_record`] verifies a stored
//! record with one hash call and no copy.
//!
//! Decoding is strict: the record must be exactly as long as its header says, lengths that
//! overflow are rejected before anything is allocated, and an all-zero child key (never a
//! valid key) is an error. No input makes the decoder panic.

use crate::data::PagableData;
use crate::key::DataKey;

/// Bytes before the payload: the data length and the child count, each a `u64` little-endian.
pub const HEADER_LEN: usize = 16;

/// Why a byte string is not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Fewer bytes than the 16-byte header.
    #[error("record is {len} bytes, shorter than its 16-byte header")]
    TooShort {
        /// The record's length.
        len: usize,
    },
    /// The header's lengths do not fit in memory (a corrupt header).
    #[error(
        "record header claims {data_len} data bytes and {arc_count} child keys, which overflows"
    )]
    LengthOverflow {
        /// The data length from the header.
        data_len: u64,
        /// The child count from the header.
        arc_count: u64,
    },
    /// The header's lengths disagree with the record's length (truncated or trailing bytes).
    #[error("record header implies {expected} bytes but the record has {actual}")]
    LengthMismatch {
        /// The length the header implies.
        expected: usize,
        /// The record's length.
        actual: usize,
    },
    /// A child key is all zero bytes, which no key ever is.
    #[error("child key #{index} is all zero")]
    ZeroChildKey {
        /// The child's position in `arcs`.
        index: usize,
    },
}

/// The length of `node`'s record: the header, the data and 16 bytes per child key.
#[inline]
pub fn encoded_len(node: &PagableData) -> usize {
    HEADER_LEN + node.data.len() + node.arcs.len() * DataKey::LEN
}

/// Encodes a node as a record.
pub fn encode(node: &PagableData) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(node));
    encode_into(node, &mut out);
    out
}

/// Appends a node's record to `out`.
pub fn encode_into(node: &PagableData, out: &mut Vec<u8>) {
    out.reserve(encoded_len(node));
    out.extend_from_slice(&(node.data.len() as u64).to_le_bytes());
    out.extend_from_slice(&(node.arcs.len() as u64).to_le_bytes());
    out.extend_from_slice(&node.data);
    for key in &node.arcs {
        out.extend_from_slice(&key.as_bytes());
    }
}

/// A record checked by [`parse`]: borrowed views of its parts.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    record: &'a [u8],
    data_len: usize,
}

impl<'a> RecordRef<'a> {
    /// The whole record, as parsed.
    #[inline]
    pub fn record(&self) -> &'a [u8] {
        self.record
    }

    /// The node's data bytes.
    #[inline]
    pub fn data(&self) -> &'a [u8] {
        &self.record[HEADER_LEN..HEADER_LEN + self.data_len]
    }

    /// The child keys, in order.
    #[inline]
    pub fn arcs(&self) -> impl ExactSizeIterator<Item = DataKey> + 'a {
        self.record[HEADER_LEN + self.data_len..]
            .chunks_exact(DataKey::LEN)
            .map(|bytes| DataKey::from_slice(bytes).expect("parse checked every child key"))
    }

    /// The key the record's content hashes to (what it must be stored under).
    #[inline]
    pub fn compute_key(&self) -> DataKey {
        DataKey::from_hash(blake3::hash(&self.record[8..]))
    }

    /// Copies the record into an owned node.
    pub fn to_data(&self) -> PagableData {
        PagableData {
            data: self.data().to_vec(),
            arcs: self.arcs().collect(),
        }
    }
}

/// Checks that `record` is a well-formed record and returns views of its parts.
pub fn parse(record: &[u8]) -> Result<RecordRef<'_>, DecodeError> {
    let Some((header, _)) = record.split_first_chunk::<HEADER_LEN>() else {
        return Err(DecodeError::TooShort { len: record.len() });
    };
    let data_len = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
    let arc_count = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
    let overflow = DecodeError::LengthOverflow {
        data_len,
        arc_count,
    };
    let expected = usize::try_from(arc_count)
        .ok()
        .and_then(|n| n.checked_mul(DataKey::LEN))
        .and_then(|n| n.checked_add(usize::try_from(data_len).ok()?))
        .and_then(|n| n.checked_add(HEADER_LEN))
        .ok_or(overflow)?;
    if expected != record.len() {
        return Err(DecodeError::LengthMismatch {
            expected,
            actual: record.len(),
        });
    }
    let data_len = data_len as usize; // fits: checked above
    let arc_bytes = &record[HEADER_LEN + data_len..];
    if let Some(index) = arc_bytes
        .chunks_exact(DataKey::LEN)
        .position(|k| k.iter().all(|&b| b == 0))
    {
        return Err(DecodeError::ZeroChildKey { index });
    }
    Ok(RecordRef { record, data_len })
}

/// Decodes a record into an owned node.
pub fn decode(record: &[u8]) -> Result<PagableData, DecodeError> {
    parse(record).map(|view| view.to_data())
}

/// Checks a record and returns the key its content hashes to.
pub fn key_of_record(record: &[u8]) -> Result<DataKey, DecodeError> {
    parse(record).map(|view| view.compute_key())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> DataKey {
        DataKey::from_bytes([byte; 16]).unwrap()
    }

    #[test]
    fn layout_is_the_reference_layout() {
        let node = PagableData {
            data: vec![7, 8, 9],
            arcs: vec![key(1), key(2)],
        };
        let record = encode(&node);
        assert_eq!(&record[..8], &3u64.to_le_bytes());
        assert_eq!(&record[8..16], &2u64.to_le_bytes());
        assert_eq!(&record[16..19], &[7, 8, 9]);
        assert_eq!(&record[19..35], &[1; 16]);
        assert_eq!(&record[35..], &[2; 16]);
        assert_eq!(record.len(), encoded_len(&node));
        assert_eq!(decode(&record).unwrap(), node);
        assert_eq!(key_of_record(&record).unwrap(), node.compute_key());
    }

    #[test]
    fn rejects_malformed_records() {
        let record = encode(&PagableData {
            data: vec![1, 2],
            arcs: vec![key(3)],
        });
        assert_eq!(
            decode(&record[..10]),
            Err(DecodeError::TooShort { len: 10 })
        );
        assert_eq!(
            decode(&record[..record.len() - 1]),
            Err(DecodeError::LengthMismatch {
                expected: record.len(),
                actual: record.len() - 1
            })
        );
        let mut trailing = record.clone();
        trailing.push(0);
        assert!(matches!(
            decode(&trailing),
            Err(DecodeError::LengthMismatch { .. })
        ));

        let mut huge = vec![0u8; 16];
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        huge[8..].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode(&huge),
            Err(DecodeError::LengthOverflow { .. })
        ));

        let mut zero_child = record.clone();
        let at = zero_child.len() - 16;
        zero_child[at..].fill(0);
        assert_eq!(
            decode(&zero_child),
            Err(DecodeError::ZeroChildKey { index: 0 })
        );
    }
}
