//! Moving graphs between the tiers, a level of keys per round trip: [`fill`] brings what a
//! read needs from the remote into the local store, [`upload`] sends what the remote lacks.
//!
//! Both keep the graph whole on the receiving side: a node goes in only after every node
//! it names, so neither store ever holds a node whose children it lacks. On the remote this
//! gives the invariant uploads rely on: a key the remote holds has its whole graph there
//! (unless an evicting remote dropped part of it), so an upload stops descending at the
//! first key the remote already has.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use super::Tiers;
use crate::codec;
use crate::data::PagableData;
use crate::error::Error;
use crate::key::DataKey;
use crate::store::NodeStore;

/// Brings `keys`, and every node they reach that the local store lacks, from the remote
/// into the local store. Each record is checked before anything is stored: one that does not
/// decode or hash to its key fails the fill with [`Error::Corrupt`] (naming the key and the
/// remote) and nothing of it is stored locally; a key the remote lacks fails it with
/// [`Error::NotFound`].
pub(super) fn fill(tiers: &Tiers, keys: &[DataKey]) -> anyhow::Result<()> {
    let mut fetched: HashMap<DataKey, PagableData> = HashMap::new();
    let mut queued: HashSet<DataKey> = HashSet::new();
    let mut level: Vec<DataKey> = Vec::new();
    for key in keys {
        if queued.insert(*key) && !tiers.local.contains(key)? {
            level.push(*key);
        }
    }
    while !level.is_empty() {
        let records = tiers.remote.call(|remote| remote.get_many(&level))?;
        let mut next = Vec::new();
        for (key, record) in level.iter().zip(records) {
            let Some(record) = record else {
                tiers.stats.remote_misses.fetch_add(1, Ordering::Relaxed);
                return Err(Error::NotFound(*key).into());
            };
            tiers
                .stats
                .bytes_down
                .fetch_add(record.len() as u64, Ordering::Relaxed);
            let node = checked(tiers, *key, &record)?;
            for child in &node.arcs {
                if queued.insert(*child) && !tiers.local.contains(child)? {
                    next.push(*child);
                }
            }
            fetched.insert(*key, node);
        }
        level = next;
    }
    let arcs: HashMap<DataKey, &[DataKey]> = fetched
        .iter()
        .map(|(k, n)| (*k, n.arcs.as_slice()))
        .collect();
    let order: Vec<DataKey> = children_first(&arcs).into_iter().flatten().collect();
    for key in order {
        if let Some(node) = fetched.remove(&key) {
            tiers.local.put(node)?;
            tiers.stats.filled.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Decodes `record`, fetched from the remote for `key`, and checks it hashes to `key`.
fn checked(tiers: &Tiers, key: DataKey, record: &[u8]) -> Result<PagableData, Error> {
    let refused = |reason: String| {
        tiers
            .stats
            .verification_failures
            .fetch_add(1, Ordering::Relaxed);
        Error::Corrupt {
            key,
            reason: format!(
                "the remote store {} returned a record that {reason}; nothing was stored \
                 locally",
                tiers.remote.describe()
            ),
        }
    };
    let node = codec::decode(record).map_err(|e| refused(format!("does not decode: {e}")))?;
    let actual = node.compute_key();
    if actual != key {
        return Err(refused(format!("hashes to {actual}")));
    }
    Ok(node)
}

/// What one [`upload`] did.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Uploaded {
    pub nodes: u64,
    pub bytes: u64,
    /// Nodes that could not go because a node below them is in neither store.
    pub skipped: u64,
}

/// Makes `keys`, and everything they reach, remote: asks the remote which of them it lacks,
/// reads those from the local store, descends into their children the same way, then sends
/// the lot children first, one `put_many` per height (leaves, then their parents, …).
///
/// A key the local store no longer holds (a garbage collection deleted it after it was
/// queued) is passed over, and so is every node above it: sending those would leave the
/// remote with a node whose child it lacks.
pub(super) fn upload(tiers: &Tiers, keys: &[DataKey]) -> anyhow::Result<Uploaded> {
    let mut records: HashMap<DataKey, (Vec<u8>, Vec<DataKey>)> = HashMap::new();
    let mut seen: HashSet<DataKey> = HashSet::new();
    let mut gone: HashSet<DataKey> = HashSet::new();
    let mut level: Vec<DataKey> = keys.iter().copied().filter(|k| seen.insert(*k)).collect();
    while !level.is_empty() {
        let missing = tiers.remote.call(|remote| remote.find_missing(&level))?;
        let mut next = Vec::new();
        for key in missing {
            let node = match tiers.local.get(&key) {
                Ok(node) => node,
                Err(e) if Error::is_not_found(&e) => {
                    gone.insert(key);
                    continue;
                }
                Err(e) => return Err(e),
            };
            next.extend(node.arcs.iter().copied().filter(|c| seen.insert(*c)));
            records.insert(key, (codec::encode(&node), node.arcs.clone()));
        }
        level = next;
    }
    let arcs: HashMap<DataKey, &[DataKey]> = records
        .iter()
        .map(|(k, (_, arcs))| (*k, arcs.as_slice()))
        .collect();
    let heights = children_first(&arcs);
    let mut done = Uploaded::default();
    for height in heights {
        let mut batch: Vec<(DataKey, &[u8])> = Vec::with_capacity(height.len());
        for key in &height {
            let (record, arcs) = &records[key];
            if arcs.iter().any(|child| gone.contains(child)) {
                gone.insert(*key);
                done.skipped += 1;
                log::warn!(
                    "not uploading {key}: a node it reaches is in neither the local store nor \
                     the remote {}",
                    tiers.remote.describe()
                );
                continue;
            }
            batch.push((*key, record.as_slice()));
        }
        if batch.is_empty() {
            continue;
        }
        tiers.remote.call(|remote| remote.put_many(&batch))?;
        let bytes: u64 = batch.iter().map(|(_, r)| r.len() as u64).sum();
        done.nodes += batch.len() as u64;
        done.bytes += bytes;
        tiers
            .stats
            .uploaded
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        tiers.stats.bytes_up.fetch_add(bytes, Ordering::Relaxed);
    }
    Ok(done)
}

/// Groups the nodes of `arcs` by height among themselves: first those naming no node of
/// the map, then those naming only nodes of earlier groups, and so on. Storing the groups
/// in order stores every node after its children. Iterative, so deep chains do not
/// exhaust the stack.
pub(super) fn children_first(arcs: &HashMap<DataKey, &[DataKey]>) -> Vec<Vec<DataKey>> {
    let mut height: HashMap<DataKey, usize> = HashMap::with_capacity(arcs.len());
    let mut groups: Vec<Vec<DataKey>> = Vec::new();
    for &start in arcs.keys() {
        if height.contains_key(&start) {
            continue;
        }
        // (node, index of the next child to look at)
        let mut stack: Vec<(DataKey, usize)> = vec![(start, 0)];
        while let Some((node, next)) = stack.pop() {
            let children = arcs[&node];
            let pending = children[next..]
                .iter()
                .position(|c| arcs.contains_key(c) && !height.contains_key(c));
            match pending {
                Some(offset) => {
                    stack.push((node, next + offset + 1));
                    stack.push((children[next + offset], 0));
                }
                None => {
                    let h = children
                        .iter()
                        .filter_map(|c| height.get(c))
                        .map(|h| h + 1)
                        .max()
                        .unwrap_or(0);
                    height.insert(node, h);
                    if groups.len() <= h {
                        groups.resize_with(h + 1, Vec::new);
                    }
                    groups[h].push(node);
                }
            }
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> DataKey {
        DataKey::from_slice(&[n; 16]).unwrap()
    }

    #[test]
    fn children_first_puts_every_node_after_the_nodes_it_names() {
        // 1 -> 2 -> 3, 1 -> 3 (a diamond's short edge), 4 alone, 5 -> outside key 9.
        let (k1, k2, k3, k4, k5, k9) = (key(1), key(2), key(3), key(4), key(5), key(9));
        let arcs_1 = [k2, k3];
        let arcs_2 = [k3];
        let arcs_5 = [k9];
        let arcs: HashMap<DataKey, &[DataKey]> = [
            (k1, &arcs_1[..]),
            (k2, &arcs_2[..]),
            (k3, &[][..]),
            (k4, &[][..]),
            (k5, &arcs_5[..]),
        ]
        .into_iter()
        .collect();
        let groups = children_first(&arcs);
        let position = |k: DataKey| groups.iter().position(|g| g.contains(&k)).unwrap();
        assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), 5);
        assert!(position(k3) < position(k2) && position(k2) < position(k1));
        assert_eq!(position(k4), 0);
        assert_eq!(position(k5), 0, "a child outside the map does not count");
    }

    #[test]
    fn children_first_walks_a_deep_chain_without_recursion() {
        let keys: Vec<DataKey> = (0..100_000u32)
            .map(|i| {
                let mut bytes = [1u8; 16];
                bytes[..4].copy_from_slice(&i.to_le_bytes());
                DataKey::from_slice(&bytes).unwrap()
            })
            .collect();
        let arcs: HashMap<DataKey, &[DataKey]> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                (
                    *k,
                    if i + 1 < keys.len() {
                        &keys[i + 1..i + 2]
                    } else {
                        &[][..]
                    },
                )
            })
            .collect();
        let groups = children_first(&arcs);
        assert_eq!(groups.len(), 100_000);
        assert_eq!(groups[0], [keys[99_999]]);
    }
}
