//! Page-out: serialize an `Arc` graph into content-addressed nodes, children first, without
//! recursion.
//!
//! Serializing a node never serializes its children: each [`Shared`](crate::Shared) it meets
//! only records the child (its identity and a handle to serialize it later) in this thread's
//! session and writes a unit. An explicit work stack then serializes the recorded children and
//! stores each node once all its children have keys, so a million-deep chain uses a million
//! heap entries, not a million stack frames.

use std::any::TypeId;
use std::cell::RefCell;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use serde::Serialize;

use crate::data::PagableData;
use crate::erase::ArcEraseDyn;
use crate::error::Error;
use crate::key::DataKey;
use crate::runtime::PagableStorage;

use super::session::OUTSIDE_SESSION;

/// A shared value waiting to be serialized, with its type erased.
pub(crate) trait OutNode {
    /// The value's postcard bytes (its children are recorded in the session meanwhile).
    fn encode(&self) -> Result<Vec<u8>, postcard::Error>;
    /// The message of the error `encode` failed with, recovered through a serializer that keeps
    /// custom messages (postcard replaces them all with `SerdeSerCustom`).
    fn failure_message(&self) -> String;
    /// The value's type, for messages.
    fn type_name(&self) -> &'static str;
    /// The key the value is already stored under, if it is: then it is written by key and
    /// neither serialized nor stored again.
    fn known_key(&self) -> Option<DataKey> {
        None
    }
    /// Called once the value's node is stored under `key`.
    fn stored(&self, _key: DataKey) {}
    /// The value as the storage's key memo knows it: its view type and allocation, and a
    /// strong handle to offer the memo; `None` for values the memo does not track.
    fn memo_entry(&self) -> Option<(TypeId, usize)> {
        None
    }
    /// A strong handle to the value, to register it with its key after it is stored.
    fn erased(&self) -> Option<Box<dyn ArcEraseDyn>> {
        None
    }
}

impl<T: ?Sized + Serialize + Send + Sync + 'static> OutNode for Arc<T> {
    fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        postcard::to_allocvec(&**self)
    }

    fn failure_message(&self) -> String {
        message_of_failure(&**self)
    }

    fn type_name(&self) -> &'static str {
        std::any::type_name::<T>()
    }

    fn memo_entry(&self) -> Option<(TypeId, usize)> {
        Some(identity_of::<T, T>(self))
    }

    fn erased(&self) -> Option<Box<dyn ArcEraseDyn>> {
        Some(Box::new(Arc::clone(self)))
    }
}

fn message_of_failure<T: ?Sized + Serialize>(value: &T) -> String {
    let mut serializer = postcard::Serializer {
        output: postcard::ser_flavors::AllocVec::new(),
    };
    let mut erased = <dyn erased_serde::Serializer>::erase(&mut serializer);
    match erased_serde::Serialize::erased_serialize(value, &mut erased) {
        Err(err) => err.to_string(),
        Ok(()) => "a custom serde error, which did not happen again on a second try".into(),
    }
}

/// What a page-out records while a node is being serialized.
#[derive(Default)]
struct OutState {
    /// Every shared value met so far in this call, by identity: `(TypeId of the view, address)`.
    /// Keying on the address alone would merge an `Arc<T>` with an `Arc<dyn Trait>` of the same
    /// allocation, whose serializations differ.
    memo: HashMap<(TypeId, usize), u32, BuildHasherDefault<IdentityHasher>>,
    /// Values met for the first time since the driver last looked, in index order.
    discovered: Vec<Met>,
    /// The storage whose remembered keys let a shared value be written by key when it is met
    /// (see [`PagableStorage::key_of`]); `None` when nothing is stored (`drop_deep`).
    storage: Option<Arc<dyn PagableStorage>>,
    /// The children of the node being serialized, in the order met.
    children: Vec<u32>,
}

/// A hasher for `(TypeId, address)`: addresses are aligned and clustered, so each word is
/// multiplied and rotated to spread its bits; SipHash's DoS resistance buys nothing for keys
/// that are our own pointers.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0 ^ value)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
    }

    fn write_u128(&mut self, value: u128) {
        self.write_u64(value as u64);
        self.write_u64((value >> 64) as u64);
    }

    fn write_usize(&mut self, value: usize) {
        self.write_u64(value as u64);
    }
}

thread_local! {
    static OUT: RefCell<Option<OutState>> = const { RefCell::new(None) };
}

/// Records `arc` as the next child of the node being serialized on this thread.
pub(crate) fn record_child<T>(arc: &Arc<T>) -> Result<(), &'static str>
where
    T: ?Sized + Serialize + Send + Sync + 'static,
{
    // The clone keeps the allocation alive until the call ends, so its address cannot be
    // reused by another value and alias a memo entry.
    record_node(identity_of::<T, T>(arc), true, || Box::new(Arc::clone(arc)))
}

/// `(TypeId of the view V, address of the allocation)`: what makes two handles one node.
pub(crate) fn identity_of<V: ?Sized + 'static, T: ?Sized>(arc: &Arc<T>) -> (TypeId, usize) {
    (TypeId::of::<V>(), Arc::as_ptr(arc) as *const u8 as usize)
}

/// A value met for the first time in a page-out.
enum Met {
    /// To serialize (unless it turns out to be stored already).
    Value(Box<dyn OutNode>),
    /// A shared value the storage remembers: written by this key, never serialized.
    Stored(DataKey),
}

/// The [`storage_identity`](PagableStorage::storage_identity) of the storage the page-out
/// running on this thread writes into, if one runs and stores anything.
pub(crate) fn target_storage() -> Option<usize> {
    OUT.with(|cell| {
        let guard = cell.try_borrow().ok()?;
        Some(guard.as_ref()?.storage.as_ref()?.storage_identity())
    })
}

/// Records the node `identity` as the next child of the node being serialized on this
/// thread; `make` gives the node to serialize the first time the identity is met. With
/// `remembered`, a value the storage remembers the key of is written by that key instead.
pub(crate) fn record_node(
    identity: (TypeId, usize),
    remembered: bool,
    make: impl FnOnce() -> Box<dyn OutNode>,
) -> Result<(), &'static str> {
    OUT.with(|cell| {
        let mut guard = cell.try_borrow_mut().map_err(|_| OUTSIDE_SESSION)?;
        let state = guard.as_mut().ok_or(OUTSIDE_SESSION)?;
        // Values are numbered in the order they are met: the next one gets the memo's size.
        let next = state.memo.len() as u32;
        let index = match state.memo.entry(identity) {
            Entry::Occupied(known) => *known.get(),
            Entry::Vacant(new) => {
                let key = match &state.storage {
                    Some(storage) if remembered => storage.key_of(&identity.0, identity.1),
                    _ => None,
                };
                state.discovered.push(match key {
                    Some(key) => Met::Stored(key),
                    None => Met::Value(make()),
                });
                *new.insert(next)
            }
        };
        state.children.push(index);
        Ok(())
    })
}

/// Installs a fresh session on this thread; the previous one (a page-out nested in a
/// `Serialize` impl) comes back on drop.
struct Session {
    previous: Option<OutState>,
}

impl Session {
    fn install(storage: Option<Arc<dyn PagableStorage>>) -> Session {
        let state = OutState {
            storage,
            ..OutState::default()
        };
        Session {
            previous: OUT.with(|cell| cell.replace(Some(state))),
        }
    }

    /// Takes the children recorded since the last call.
    fn take_children(&self) -> Vec<u32> {
        OUT.with(|cell| match cell.borrow_mut().as_mut() {
            Some(state) => std::mem::take(&mut state.children),
            None => Vec::new(),
        })
    }

    /// Moves the values discovered since the last call into the node table.
    fn absorb(&self, nodes: &mut Vec<Node>) {
        OUT.with(|cell| {
            if let Some(state) = cell.borrow_mut().as_mut() {
                nodes.extend(state.discovered.drain(..).map(|met| match met {
                    Met::Value(value) => Node {
                        state: match value.known_key() {
                            Some(key) => State::Done(key),
                            None => State::New,
                        },
                        value: Some(value),
                    },
                    Met::Stored(key) => Node {
                        state: State::Done(key),
                        value: None,
                    },
                }));
            }
        });
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let mine = OUT.with(|cell| cell.replace(self.previous.take()));
        // Dropped outside the borrow: these are the call's Arc clones, whose drop may run
        // arbitrary code.
        drop(mine);
    }
}

enum State {
    New,
    /// Serialized; waiting for its children's keys.
    Open {
        data: Vec<u8>,
        children: Vec<u32>,
    },
    Done(DataKey),
}

struct Node {
    /// `None` for a value written by a remembered key (its state is `Done` from the start).
    value: Option<Box<dyn OutNode>>,
    state: State,
}

impl Node {
    /// The node's value; only a node written by a remembered key has none, and such a node is
    /// `Done` before anything asks.
    fn value(&self) -> &dyn OutNode {
        match &self.value {
            Some(value) => &**value,
            None => &StoredByKey,
        }
    }
}

/// What a node written by a remembered key answers if asked (never, in a correct walk).
struct StoredByKey;

impl OutNode for StoredByKey {
    fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        Err(postcard::Error::SerializeBufferFull)
    }

    fn failure_message(&self) -> String {
        "a value stored under a remembered key is never serialized".into()
    }

    fn type_name(&self) -> &'static str {
        "a shared value stored under a remembered key"
    }
}

/// The result of walking a graph: the root's key, and every shared value met in the order their
/// nodes were finished (children before parents).
pub(crate) struct Walk {
    pub(crate) root: DataKey,
    nodes: Vec<Node>,
    /// Indexes into `nodes`, children before parents.
    order: Vec<u32>,
}

impl Walk {
    /// The values met, children before parents (what `drop_deep` needs; `page_out` does not
    /// pay for building it).
    pub(crate) fn into_finished(self) -> Vec<Box<dyn OutNode>> {
        let mut slots: Vec<Option<Box<dyn OutNode>>> =
            self.nodes.into_iter().map(|node| node.value).collect();
        self.order
            .into_iter()
            .filter_map(|index| slots[index as usize].take())
            .collect()
    }
}

/// Serializes `root` and every shared value it reaches, children first, handing each node to
/// `finish` (which stores it and returns its key) once its children have keys, with the value
/// it came from (`None` for the root). A shared value whose key `storage` remembers is not
/// serialized: it and everything below it are already stored.
pub(crate) fn walk<T: ?Sized + Serialize>(
    root: &T,
    storage: Option<Arc<dyn PagableStorage>>,
    mut finish: impl FnMut(PagableData, Option<&dyn OutNode>) -> anyhow::Result<DataKey>,
) -> anyhow::Result<Walk> {
    let session = Session::install(storage);
    let root_type = std::any::type_name::<T>();
    let (root_data, root_children) = encode_node(
        &session,
        root_type,
        || postcard::to_allocvec(root),
        || message_of_failure(root),
    )?;
    let mut nodes: Vec<Node> = Vec::new();
    let mut order: Vec<u32> = Vec::new();
    session.absorb(&mut nodes);
    let mut stack: Vec<u32> = root_children.iter().rev().copied().collect();
    while let Some(&top) = stack.last() {
        let node = &mut nodes[top as usize];
        match &mut node.state {
            State::Done(_) => {
                stack.pop();
            }
            State::New => {
                let value = node.value();
                let (data, children) = encode_node(
                    &session,
                    value.type_name(),
                    || value.encode(),
                    || value.failure_message(),
                )?;
                session.absorb(&mut nodes);
                for &child in children.iter().rev() {
                    match nodes[child as usize].state {
                        State::Done(_) => {}
                        State::New if child != top => stack.push(child),
                        // An open child is on the path from the root to here (or is this
                        // node itself): a cycle.
                        State::New | State::Open { .. } => {
                            return Err(Error::Serialize {
                                type_name: nodes[child as usize].value().type_name(),
                                reason: "the graph has a cycle (a shared value reaches itself \
                                         through its children); content addressing needs a DAG"
                                    .into(),
                            }
                            .into());
                        }
                    }
                }
                nodes[top as usize].state = State::Open { data, children };
            }
            State::Open { data, children } => {
                let data = std::mem::take(data);
                let children = std::mem::take(children);
                let arcs = keys_of(&nodes, &children)?;
                let key = finish(
                    PagableData { data, arcs },
                    Some(nodes[top as usize].value()),
                )?;
                nodes[top as usize].value().stored(key);
                nodes[top as usize].state = State::Done(key);
                order.push(top);
                stack.pop();
            }
        }
    }
    let arcs = keys_of(&nodes, &root_children)?;
    let root = finish(
        PagableData {
            data: root_data,
            arcs,
        },
        None,
    )?;
    Ok(Walk { root, nodes, order })
}

fn keys_of(nodes: &[Node], children: &[u32]) -> anyhow::Result<Vec<DataKey>> {
    children
        .iter()
        .map(|&child| match nodes[child as usize].state {
            State::Done(key) => Ok(key),
            // The stack finishes every child above its parent, so this is a bug, reported
            // rather than panicking.
            State::New | State::Open { .. } => Err(anyhow::anyhow!(
                "pagestore bug: a child of a `{}` was not paged out before it",
                nodes[child as usize].value().type_name()
            )),
        })
        .collect()
}

/// Serializes one node and collects the children it recorded.
fn encode_node(
    session: &Session,
    type_name: &'static str,
    encode: impl FnOnce() -> Result<Vec<u8>, postcard::Error>,
    failure_message: impl FnOnce() -> String,
) -> anyhow::Result<(Vec<u8>, Vec<u32>)> {
    let result = encode();
    let children = session.take_children();
    match result {
        Ok(data) => Ok((data, children)),
        Err(err) => {
            let reason = match err {
                postcard::Error::SerdeSerCustom => failure_message(),
                other => other.to_string(),
            };
            Err(Error::Serialize { type_name, reason }.into())
        }
    }
}

/// Pages `value` and every shared value it reaches out to `storage`; see
/// [`page_out`](crate::page_out).
pub(crate) fn page_out<T: ?Sized + Serialize>(
    storage: &Arc<dyn PagableStorage>,
    value: &T,
) -> anyhow::Result<DataKey> {
    // The root is kept through the next garbage collection, so that the caller can name
    // it. A collection that began before the root was stored may have deleted it (nothing
    // held it yet): stored again, children and all (those deleted too are forgotten).
    for _ in 0..FRESH_ATTEMPTS {
        let key = match page_out_sized(storage, value) {
            Ok((key, _)) => key,
            // A child stored before a collection began (and not held: too large to be
            // remembered) was deleted before its parent was stored: store them again.
            Err(err) if matches!(err.downcast_ref(), Some(Error::MissingChild { .. })) => continue,
            Err(err) => return Err(err),
        };
        if storage.keep_fresh(key) {
            return Ok(key);
        }
    }
    Err(anyhow::anyhow!(
        "garbage collections deleted the graph {FRESH_ATTEMPTS} times while it was being \
         paged out"
    ))
}

/// How many times [`page_out`] stores a graph that collections keep deleting.
const FRESH_ATTEMPTS: usize = 8;

/// [`page_out`], also returning the length of `value`'s own record (its weight once paged).
pub(crate) fn page_out_sized<T: ?Sized + Serialize>(
    storage: &Arc<dyn PagableStorage>,
    value: &T,
) -> anyhow::Result<(DataKey, usize)> {
    // Equal content from different Arcs has one key: store it once per call.
    let mut stored: std::collections::HashSet<DataKey, crate::key::KeyHasherBuilder> =
        Default::default();
    let mut last_len = 0;
    // A shared value paged in or out before (and unchanged, as shared values must be) is
    // written by the key the storage remembers, without serializing it or its subgraph.
    let walk = walk(value, Some(Arc::clone(storage)), |data, node| {
        let key = data.compute_key();
        // The root is finished last, so this ends as the root's record length.
        last_len = crate::codec::encoded_len(&data);
        if stored.insert(key) {
            let returned = storage.store_data(data)?;
            debug_assert_eq!(returned, key);
        }
        if let Some((arc, (type_id, _))) = node.and_then(|n| n.erased().zip(n.memo_entry())) {
            // Remember the value's key for later page-outs of graphs that still hold it.
            storage.remember_key(type_id, key, &*arc);
        }
        Ok(key)
    })?;
    Ok((walk.root, last_len))
}

/// The length `value`'s own record would have (its children count 16 bytes each, their own
/// records nothing), found without allocating its bytes or touching its children.
pub(crate) fn record_len<T: ?Sized + Serialize>(value: &T) -> anyhow::Result<usize> {
    let session = Session::install(None);
    let size = postcard::serialize_with_flavor(value, postcard::ser_flavors::Size::default());
    let children = session.take_children().len();
    match size {
        Ok(bytes) => Ok(crate::codec::HEADER_LEN + bytes + children * DataKey::LEN),
        Err(err) => Err(Error::Serialize {
            type_name: std::any::type_name::<T>(),
            reason: err.to_string(),
        }
        .into()),
    }
}
