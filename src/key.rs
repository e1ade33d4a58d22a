//! [`DataKey`]: the content address of one stored node.

use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::num::NonZeroU128;
use std::str::FromStr;

/// The content address of a [`PagableData`](crate::PagableData): the first 16 bytes of
/// `blake3( u64_le(arcs.len()) ‖ data ‖ arcs[0] ‖ arcs[1] ‖ … )`.
///
/// Because a node's key covers its children's keys, keys form a Merkle DAG: equal subgraphs
/// get equal keys wherever and by whoever they were written, and a key names one immutable
/// value forever.
///
/// A key is never all-zero. The one hash whose first 16 bytes are zero (astronomically
/// unlikely) is mapped to the key `01 00 … 00`, as the reference implementation does, so
/// `Option<DataKey>` is as small as `DataKey`.
///
/// The byte form ([`as_bytes`](Self::as_bytes), [`from_bytes`](Self::from_bytes)) is the
/// identity: it is what is stored on disk and it is the same on every platform.
/// `Display` and `Debug` print it as 32 lowercase hex digits, which [`FromStr`] parses back.
///
/// ```
/// use pagestore::{DataKey, PagableData};
///
/// let key = PagableData { data: Vec::new(), arcs: Vec::new() }.compute_key();
/// assert_eq!(key.to_string(), "71e0a99173564931c0b8acc52d2685a8");
/// assert_eq!(key.to_string().parse::<DataKey>().unwrap(), key);
/// assert_eq!(DataKey::from_bytes(key.as_bytes()), Some(key));
/// assert_eq!(DataKey::from_bytes([0; 16]), None);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, bytemuck::NoUninit)]
#[repr(transparent)]
pub struct DataKey(NonZeroU128);

const _: () = assert!(size_of::<Option<DataKey>>() == size_of::<DataKey>());

impl DataKey {
    /// The length of a key in bytes.
    pub const LEN: usize = 16;

    /// The key that stands in for a hash whose first 16 bytes are all zero.
    const ZERO_HASH_REPLACEMENT: NonZeroU128 = NonZeroU128::MIN;

    /// Hashes a node in the key's canonical form: `u64_le(arc_count) ‖ data ‖ arc bytes`.
    ///
    /// `arc_bytes` is the concatenation of the children's 16-byte keys. Callers that hold an
    /// encoded record hash its tail in one call instead (see
    /// [`codec::key_of_record`](crate::codec::key_of_record)).
    pub(crate) fn hash_parts(arc_count: u64, data: &[u8], arcs: &[DataKey]) -> DataKey {
        // blake3 hashes several chunks at once only when it sees them in one contiguous
        // input (incremental updates are limited to power-of-two-aligned subtrees), so up to
        // 64 KiB copying into one buffer and hashing it in one shot is faster than feeding the
        // parts: 2.5x at 4 KiB. Above that the copy costs more than the misalignment.
        const SMALL: usize = 256;
        const STACK: usize = 1024;
        const ONE_SHOT: usize = 64 * 1024;
        let total = 8 + data.len() + arcs.len() * DataKey::LEN;
        let fill = |buffer: &mut [u8]| {
            buffer[..8].copy_from_slice(&arc_count.to_le_bytes());
            buffer[8..8 + data.len()].copy_from_slice(data);
            for (slot, key) in buffer[8 + data.len()..]
                .chunks_exact_mut(DataKey::LEN)
                .zip(arcs)
            {
                slot.copy_from_slice(&key.as_bytes());
            }
        };
        if total <= SMALL {
            let mut buffer = [0u8; SMALL];
            fill(&mut buffer[..total]);
            return Self::from_hash(blake3::hash(&buffer[..total]));
        }
        if total <= STACK {
            let mut buffer = [0u8; STACK];
            fill(&mut buffer[..total]);
            return Self::from_hash(blake3::hash(&buffer[..total]));
        }
        if total <= ONE_SHOT {
            let mut buffer = vec![0u8; total];
            fill(&mut buffer);
            return Self::from_hash(blake3::hash(&buffer));
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(&arc_count.to_le_bytes());
        hasher.update(data);
        hash_keys_into(&mut hasher, arcs);
        Self::from_hash(hasher.finalize())
    }

    /// Truncates a blake3 hash to a key.
    pub(crate) fn from_hash(hash: blake3::Hash) -> DataKey {
        let head: [u8; 16] = hash.as_bytes()[..16]
            .try_into()
            .expect("blake3 hash is 32 bytes");
        DataKey(NonZeroU128::new(u128::from_le_bytes(head)).unwrap_or(Self::ZERO_HASH_REPLACEMENT))
    }

    /// Builds a key from its 16-byte form, or `None` for the all-zero bytes (never a key).
    #[inline]
    pub const fn from_bytes(bytes: [u8; 16]) -> Option<DataKey> {
        match NonZeroU128::new(u128::from_le_bytes(bytes)) {
            Some(value) => Some(DataKey(value)),
            None => None,
        }
    }

    /// Builds a key from a slice that must be exactly 16 non-zero bytes.
    #[inline]
    pub fn from_slice(bytes: &[u8]) -> Option<DataKey> {
        Self::from_bytes(bytes.try_into().ok()?)
    }

    /// The key's 16-byte form, as stored on disk.
    #[inline]
    pub const fn as_bytes(&self) -> [u8; 16] {
        self.0.get().to_le_bytes()
    }
}

/// Feeds keys to a hasher in their byte form.
pub(crate) fn hash_keys_into(hasher: &mut blake3::Hasher, keys: &[DataKey]) {
    #[cfg(target_endian = "little")]
    {
        // In memory a key is a little-endian u128: exactly its byte form.
        hasher.update(bytemuck::cast_slice(keys));
    }
    #[cfg(not(target_endian = "little"))]
    for key in keys {
        hasher.update(&key.as_bytes());
    }
}

impl fmt::Display for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 32];
        for (i, byte) in self.as_bytes().iter().enumerate() {
            out[2 * i] = HEX[usize::from(byte >> 4)];
            out[2 * i + 1] = HEX[usize::from(byte & 0xf)];
        }
        f.write_str(std::str::from_utf8(&out).expect("hex digits are ASCII"))
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DataKey({self})")
    }
}

/// The error returned when a string is not a [`DataKey`]: it must be exactly 32 hex digits,
/// not all zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseKeyError(());

impl fmt::Display for ParseKeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a data key is 32 hex digits, not all zero")
    }
}

impl std::error::Error for ParseKeyError {}

impl FromStr for DataKey {
    type Err = ParseKeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.as_bytes();
        if digits.len() != 32 {
            return Err(ParseKeyError(()));
        }
        let mut bytes = [0u8; 16];
        for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
            *byte = (hex_value(pair[0]).ok_or(ParseKeyError(()))? << 4)
                | hex_value(pair[1]).ok_or(ParseKeyError(()))?;
        }
        DataKey::from_bytes(bytes).ok_or(ParseKeyError(()))
    }
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

impl Hash for DataKey {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The key is already a uniform hash: its low 64 bits are as good as any digest of it.
        state.write_u64(self.0.get() as u64);
    }
}

/// A [`BuildHasher`] for maps keyed by [`DataKey`] (alone or in a tuple such as
/// `(TypeId, DataKey)`): it uses the key's own bits instead of running SipHash over them.
///
/// Only use it for keys whose `Hash` feeds already-uniform integers (a `DataKey`, a
/// `TypeId`); it is not a general-purpose hasher.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct KeyHasherBuilder;

impl BuildHasher for KeyHasherBuilder {
    type Hasher = KeyHasher;

    #[inline]
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(0)
    }
}

/// The hasher built by [`KeyHasherBuilder`]: folds the integers it is fed with one multiply
/// each.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }

    #[inline]
    fn write_u64(&mut self, value: u64) {
        // Mixing keeps a tuple's parts from cancelling out; the odd constant is from
        // splitmix64. For a lone DataKey this is a bijection of already uniform bits.
        self.0 = (self.0.rotate_left(23) ^ value).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    #[inline]
    fn write_u128(&mut self, value: u128) {
        self.write_u64(value as u64);
        self.write_u64((value >> 64) as u64);
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not on the hot path (DataKey and TypeId feed integers); kept correct for anything.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_node_has_the_reference_key() {
        let key = DataKey::hash_parts(0, &[], &[]);
        assert_eq!(key.to_string(), "71e0a99173564931c0b8acc52d2685a8");
    }

    #[test]
    fn every_hashing_tier_matches_one_buffer_hashing() {
        // hash_parts picks a strategy by size; each boundary and each side of it must give the
        // key of the plain one-buffer definition.
        let arcs: Vec<DataKey> = (1..=3u8)
            .map(|b| DataKey::from_bytes([b; 16]).unwrap())
            .collect();
        for boundary in [256usize, 1024, 64 * 1024] {
            for total in boundary - 17..=boundary + 17 {
                for arc_count in 0..=3 {
                    let Some(data_len) = total.checked_sub(8 + 16 * arc_count) else {
                        continue;
                    };
                    let data: Vec<u8> = (0..data_len).map(|i| (i * 7 + total) as u8).collect();
                    let arcs = &arcs[..arc_count];
                    let mut input = (arc_count as u64).to_le_bytes().to_vec();
                    input.extend_from_slice(&data);
                    arcs.iter()
                        .for_each(|k| input.extend_from_slice(&k.as_bytes()));
                    assert_eq!(
                        DataKey::hash_parts(arc_count as u64, &data, arcs),
                        DataKey::from_hash(blake3::hash(&input)),
                        "total {total}, {arc_count} arcs"
                    );
                }
            }
        }
        let big = vec![5u8; (1 << 20) + 3];
        let mut input = 1u64.to_le_bytes().to_vec();
        input.extend_from_slice(&big);
        input.extend_from_slice(&arcs[0].as_bytes());
        assert_eq!(
            DataKey::hash_parts(1, &big, &arcs[..1]),
            DataKey::from_hash(blake3::hash(&input))
        );
    }

    #[test]
    fn display_parse_round_trip_and_case() {
        let key: DataKey = "0123456789abcdef0123456789ABCDEF".parse().unwrap();
        assert_eq!(key.to_string(), "0123456789abcdef0123456789abcdef");
        assert_eq!(
            format!("{key:?}"),
            "DataKey(0123456789abcdef0123456789abcdef)"
        );
    }

    #[test]
    fn parse_rejects_bad_input() {
        for bad in [
            "",
            "00000000000000000000000000000000",
            "0123456789abcdef0123456789abcde",
            "0123456789abcdef0123456789abcdef0",
            "0123456789abcdef0123456789abcdeg",
            "+123456789abcdef0123456789abcdef",
            "é123456789abcdef0123456789abcde",
        ] {
            assert_eq!(bad.parse::<DataKey>(), Err(ParseKeyError(())), "{bad:?}");
        }
    }

    #[test]
    fn zero_bytes_are_not_a_key_and_the_zero_hash_maps_to_one() {
        assert_eq!(DataKey::from_bytes([0; 16]), None);
        assert_eq!(DataKey::from_slice(&[1; 15]), None);
        let zero = blake3::Hash::from_bytes([0; 32]);
        let mut one = [0u8; 16];
        one[0] = 1;
        assert_eq!(DataKey::from_hash(zero).as_bytes(), one);
    }

    #[test]
    fn byte_form_is_little_endian_of_the_hash_prefix() {
        let hash = blake3::hash(b"x");
        let key = DataKey::from_hash(hash);
        assert_eq!(&key.as_bytes()[..], &hash.as_bytes()[..16]);
    }
}
