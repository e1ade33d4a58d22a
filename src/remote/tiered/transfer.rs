//! Moving graphs between the tiers, many keys per round trip: [`fill`] brings what a read
//! needs from the remote into the local store, [`upload`] sends what the remote lacks.
//!
//! Both keep the graph whole on the receiving side: a node goes in only after every node
//! it names, so neither store ever holds a node whose children it lacks. On the remote this
//! gives the invariant uploads rely on: a key the remote holds has its whole graph there
//! (unless an evicting remote dropped part of it), so an upload stops descending at the
//! first key the remote already has.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::mpsc;

use super::Tiers;
use crate::error::Error;
use crate::key::{DataKey, KeyHasherBuilder};

/// Maps and sets of keys hash the keys' own (uniform) bits.
type KeyMap<V> = HashMap<DataKey, V, KeyHasherBuilder>;
type KeySet = HashSet<DataKey, KeyHasherBuilder>;

/// Brings `keys`, and every node they reach that the local store lacks, from the remote
/// into the local store. Each record is checked before anything is stored: one that does not
/// decode or hash to its key fails the fill with [`Error::Corrupt`] (naming the key and the
/// remote) and nothing of it is stored locally; a key the remote lacks fails it with
/// [`Error::NotFound`].
pub(super) fn fill(tiers: &Tiers, keys: &[DataKey]) -> anyhow::Result<()> {
    let mut queued = KeySet::default();
    let wanted: Vec<DataKey> = keys.iter().copied().filter(|k| queued.insert(*k)).collect();
    let mut to_fetch: VecDeque<DataKey> = tiers.local.missing_of(&wanted)?.into();
    let mut fetched: KeyMap<Fetched> = KeyMap::default();
    let batch_keys = tiers.remote.limits().max_keys.max(1);
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let mut fetcher = Fetcher::new(tiers, batch_keys, scope);
        loop {
            // Two batches in flight: the next is ready as soon as one comes back.
            while fetcher.in_flight() < 2 && !to_fetch.is_empty() {
                let take = to_fetch.len().min(batch_keys);
                fetcher.submit(to_fetch.drain(..take).collect())?;
            }
            let Some((batch, records)) = fetcher.next()? else {
                return Ok(());
            };
            let mut children = Vec::new();
            for (key, record) in batch.into_iter().zip(records) {
                let Some(record) = record else {
                    tiers.stats.remote_misses.fetch_add(1, Ordering::Relaxed);
                    return Err(Error::NotFound(key).into());
                };
                tiers
                    .stats
                    .bytes_down
                    .fetch_add(record.len() as u64, Ordering::Relaxed);
                let arcs = checked(tiers, key, &record)?;
                children.extend(arcs.iter().copied().filter(|c| queued.insert(*c)));
                fetched.insert(key, Fetched { record, arcs });
            }
            to_fetch.extend(tiers.local.missing_of(&children)?);
        }
    })?;
    let arcs: KeyMap<&[DataKey]> = fetched
        .iter()
        .map(|(k, f)| (*k, f.arcs.as_slice()))
        .collect();
    let order: Vec<DataKey> = children_first(&arcs).into_iter().flatten().collect();
    for key in order {
        if let Some(Fetched { record, arcs }) = fetched.remove(&key) {
            tiers.local.put_record(key, &arcs, record)?;
            tiers.stats.filled.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Batches at least this big are fetched on a second thread, so that the round trip (and
/// parsing the reply) overlaps with checking the previous batch and looking its children up
/// locally. Below it the hand-off between threads costs more than the overlap saves
/// (measured: one key per batch took twice as long through the thread).
const OVERLAP_FROM_KEYS: usize = 16;

/// A batch of keys and what the remote returned for each.
type FetchedBatch = (Vec<DataKey>, Vec<Option<Vec<u8>>>);

/// Where [`fill`]'s batches are fetched: on this thread when they are small, on a second
/// one otherwise (see [`OVERLAP_FROM_KEYS`]).
enum Fetcher<'t> {
    Inline {
        tiers: &'t Tiers,
        waiting: VecDeque<Vec<DataKey>>,
    },
    Overlapped {
        batches: mpsc::Sender<Vec<DataKey>>,
        replies: mpsc::Receiver<anyhow::Result<FetchedBatch>>,
        in_flight: usize,
    },
}

impl<'t> Fetcher<'t> {
    fn new<'scope>(
        tiers: &'t Tiers,
        batch_keys: usize,
        scope: &'scope std::thread::Scope<'scope, '_>,
    ) -> Self
    where
        't: 'scope,
    {
        if batch_keys < OVERLAP_FROM_KEYS {
            return Fetcher::Inline {
                tiers,
                waiting: VecDeque::new(),
            };
        }
        let (batches, batches_out) = mpsc::channel::<Vec<DataKey>>();
        let (replies_in, replies) = mpsc::channel::<anyhow::Result<FetchedBatch>>();
        scope.spawn(move || {
            for batch in batches_out {
                let reply = tiers.remote.call(|remote| remote.get_many(&batch));
                if replies_in
                    .send(reply.map(|records| (batch, records)))
                    .is_err()
                {
                    break;
                }
            }
        });
        Fetcher::Overlapped {
            batches,
            replies,
            in_flight: 0,
        }
    }

    fn in_flight(&self) -> usize {
        match self {
            Fetcher::Inline { waiting, .. } => waiting.len(),
            Fetcher::Overlapped { in_flight, .. } => *in_flight,
        }
    }

    fn submit(&mut self, batch: Vec<DataKey>) -> anyhow::Result<()> {
        match self {
            Fetcher::Inline { waiting, .. } => waiting.push_back(batch),
            Fetcher::Overlapped {
                batches, in_flight, ..
            } => {
                batches
                    .send(batch)
                    .map_err(|_| anyhow::anyhow!("the fetching thread stopped"))?;
                *in_flight += 1;
            }
        }
        Ok(())
    }

    /// The oldest batch submitted, fetched; `None` when none is waiting.
    fn next(&mut self) -> anyhow::Result<Option<FetchedBatch>> {
        match self {
            Fetcher::Inline { tiers, waiting } => match waiting.pop_front() {
                None => Ok(None),
                Some(batch) => {
                    let records = tiers.remote.call(|remote| remote.get_many(&batch))?;
                    Ok(Some((batch, records)))
                }
            },
            Fetcher::Overlapped {
                replies, in_flight, ..
            } => {
                if *in_flight == 0 {
                    return Ok(None);
                }
                *in_flight -= 1;
                let reply = replies
                    .recv()
                    .map_err(|_| anyhow::anyhow!("the fetching thread stopped"))?;
                reply.map(Some)
            }
        }
    }
}

/// A record fetched from the remote and checked against its key, with the keys it names.
struct Fetched {
    record: Vec<u8>,
    arcs: Vec<DataKey>,
}

/// Checks that `record`, fetched from the remote for `key`, decodes and hashes to `key`
/// (counting a failure), and returns the keys it names.
fn checked(tiers: &Tiers, key: DataKey, record: &[u8]) -> Result<Vec<DataKey>, Error> {
    match crate::remote::verified(tiers.remote.describe(), key, record) {
        Ok(view) => Ok(view.arcs().collect()),
        Err(e) => {
            tiers
                .stats
                .verification_failures
                .fetch_add(1, Ordering::Relaxed);
            Err(e)
        }
    }
}

/// What one [`upload`] could not do.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Uploaded {
    /// Nodes that could not go because a node below them is in neither store.
    pub skipped: u64,
    /// Whether every key given now has its whole graph on the remote: no key of it is in
    /// neither store.
    pub complete: bool,
}

/// Makes `keys`, and everything they reach, remote: asks the remote which of them it lacks,
/// reads those from the local store, descends into their children the same way, then sends
/// the lot children first, one `put_many` per height (leaves, then their parents, …).
///
/// A key the local store no longer holds (a garbage collection deleted it after it was
/// queued) is passed over, and so is every node above it: sending those would leave the
/// remote with a node whose child it lacks.
pub(super) fn upload(tiers: &Tiers, keys: &[DataKey]) -> anyhow::Result<Uploaded> {
    let mut records: KeyMap<(Vec<u8>, Vec<DataKey>)> = KeyMap::default();
    let mut seen = KeySet::default();
    let mut gone = KeySet::default();
    let mut level: Vec<DataKey> = keys.iter().copied().filter(|k| seen.insert(*k)).collect();
    while !level.is_empty() {
        let missing = tiers.remote.call(|remote| remote.find_missing(&level))?;
        let mut next = Vec::new();
        for key in missing {
            let (record, arcs) = match tiers.local.get_record(&key) {
                Ok(found) => found,
                Err(e) if Error::is_not_found(&e) => {
                    gone.insert(key);
                    continue;
                }
                Err(e) => return Err(e),
            };
            next.extend(arcs.iter().copied().filter(|c| seen.insert(*c)));
            records.insert(key, (record, arcs));
        }
        level = next;
    }
    let arcs: KeyMap<&[DataKey]> = records
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
        tiers
            .stats
            .uploaded
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        tiers.stats.bytes_up.fetch_add(bytes, Ordering::Relaxed);
    }
    done.complete = gone.is_empty();
    Ok(done)
}

/// Groups the nodes of `arcs` by height among themselves: first those naming no node of
/// the map, then those naming only nodes of earlier groups, and so on. Storing the groups
/// in order stores every node after its children. Iterative, so deep chains do not
/// exhaust the stack.
pub(super) fn children_first(arcs: &KeyMap<&[DataKey]>) -> Vec<Vec<DataKey>> {
    let mut height: KeyMap<usize> = KeyMap::with_capacity_and_hasher(arcs.len(), KeyHasherBuilder);
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
        let arcs: KeyMap<&[DataKey]> = [
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
        let arcs: KeyMap<&[DataKey]> = keys
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
