//! Page-in: rebuild a value from its key, resolving shared children through the arc cache.
//!
//! A node is deserialized top-down: when its deserializer reaches a [`Shared<T>`] field, that
//! field takes the node's next child key and resolves it — from this call's table, else from the
//! storage's arc cache ([`PagableStorage::resolve_arc`]) by `(TypeId of T, key)`, whose load-once entry
//! fetches and deserializes the child (recursively) if no live value exists. That is where the
//! child's type becomes known, so it is the only place it can be deserialized.
//!
//! So page-in recurses once per level of the graph, and the recursion runs on a growable stack:
//! each child's load goes through [`stacker::maybe_grow`], which moves to a new stack segment
//! when the current one runs low. Any depth pages in, on any thread, with one deserialization
//! per node; the cost is memory: the stack of the deepest path is alive until it unwinds.
//!
//! A node's deserialization is never cut short or retried by page-in itself, so a user's
//! lenient `Deserialize` impl (one that maps an error to a default) behaves at every depth as
//! it does at the root.

use std::any::TypeId;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::data::PagableData;
use crate::erase::downcast_arc;
use crate::error::Error;
use crate::key::{DataKey, KeyHasherBuilder};
use crate::storage::PagableStorage;

use super::held::Held;
use super::shared::OUTSIDE_SESSION;

/// Stack left below which a child's load moves to a new stack segment.
///
/// It must cover everything one level can use before the next level's check: page-in's own
/// frames (the arc cache's load, the node's decoding) plus every serde frame of the user's
/// types between a node's start and its next `Shared` field, and at the bottom a leaf's whole
/// deserialization. Debug builds give every temporary its own stack slot, and serde's derived
/// visitors hold each field's value in their frame, so a user type with a large inline field
/// (a `[u8; 64 << 10]` buffer, say) costs a few times its size per level there. 1 MiB leaves
/// room for such types even in debug builds (rustc uses 100 KiB; a level of ordinary types
/// takes a few KiB in debug builds and well under 1 KiB in release builds).
const RED_ZONE: usize = 1 << 20;

/// The size of a new stack segment. A segment is mapped lazily (only the pages the levels
/// touch are committed), so a large one costs address space rather than memory, and it makes
/// switching rare: one segment holds thousands of levels (of a few KiB each in debug builds),
/// and the red zone wastes at most a sixteenth of it.
const STACK_SEGMENT: usize = 16 << 20;

type Records = HashMap<DataKey, Arc<PagableData>, KeyHasherBuilder>;

/// A node being deserialized: its record and how many child keys its fields have taken.
struct Frame {
    key: DataKey,
    node: Arc<PagableData>,
    next: usize,
}

struct InState {
    storage: Arc<dyn PagableStorage>,
    /// Records fetched ahead of time (by `page_in_async`); others are fetched on demand.
    prefetched: Records,
    frames: Vec<Frame>,
    /// Every shared value this call loaded, held strongly so that dropping a partly built
    /// value (after an error) or the call's own handles never recurses down a chain.
    held: Held,
    /// The real error behind the serde custom error a failing `Shared` returned: postcard keeps
    /// no message, so the error travels here.
    error: Option<anyhow::Error>,
}

thread_local! {
    static IN: RefCell<Option<InState>> = const { RefCell::new(None) };
}

fn with_state<R>(f: impl FnOnce(&mut InState) -> R) -> Option<R> {
    IN.with(|cell| cell.try_borrow_mut().ok()?.as_mut().map(f))
}

/// Stashes `err` (unless an inner one is already there) and returns the message for the serde
/// error that carries it up to the driver.
fn stash(err: anyhow::Error) -> String {
    let message = err.to_string();
    with_state(|state| {
        if state.error.is_none() {
            state.error = Some(err);
        }
    });
    message
}

fn take_stashed() -> Option<anyhow::Error> {
    with_state(|state| state.error.take()).flatten()
}

/// Resolves the next child key of the node being deserialized as a `T`.
pub(crate) fn resolve<T>() -> Result<Arc<T>, String>
where
    T: ?Sized + Send + Sync + 'static,
    Box<T>: DeserializeOwned,
{
    enum Step<T: ?Sized> {
        Hit(Arc<T>),
        Load(DataKey, Arc<dyn PagableStorage>, Parent),
        Fail(anyhow::Error),
    }
    let step = with_state(|state| {
        let Some(frame) = state.frames.last_mut() else {
            return Step::Fail(anyhow::anyhow!(OUTSIDE_SESSION));
        };
        let Some(&key) = frame.node.arcs.get(frame.next) else {
            return Step::Fail(too_few_keys(frame.key, frame.node.arcs.len()));
        };
        let parent = Parent {
            key: frame.key,
            index: frame.next,
        };
        frame.next += 1;
        if let Some(arc) = state.held.get::<T>(key) {
            return Step::Hit(arc);
        }
        Step::Load(key, Arc::clone(&state.storage), parent)
    });
    match step {
        None => Err(OUTSIDE_SESSION.to_string()),
        Some(Step::Hit(arc)) => Ok(arc),
        Some(Step::Fail(err)) => Err(stash(err)),
        Some(Step::Load(key, storage, parent)) => {
            // The only place page-in recurses: one level per node of the path.
            match stacker::maybe_grow(RED_ZONE, STACK_SEGMENT, || {
                load::<T>(&*storage, key, parent)
            }) {
                Ok(arc) => Ok(arc),
                Err(err) => Err(stash(err)),
            }
        }
    }
}

// Error constructors live out of line, in cold functions: page-in recurses through `resolve`,
// `load` and `decode_node`, and every byte of their frames is paid once per level of depth.

#[cold]
#[inline(never)]
fn too_few_keys(key: DataKey, keys: usize) -> anyhow::Error {
    Error::Corrupt {
        key,
        reason: format!("its value holds more shared references than its {keys} child keys"),
    }
    .into()
}

#[cold]
#[inline(never)]
fn unused_keys(key: DataKey, keys: usize, used: usize) -> anyhow::Error {
    Error::Corrupt {
        key,
        reason: format!("it has {keys} child keys but its value used {used}"),
    }
    .into()
}

/// Where a child key was found, for error messages.
#[derive(Clone, Copy)]
struct Parent {
    key: DataKey,
    index: usize,
}

impl Parent {
    /// `err`, about the child itself, with the parent it was met in as context (context keeps
    /// the typed error reachable by downcast).
    #[cold]
    #[inline(never)]
    fn context<T: ?Sized>(self, err: anyhow::Error) -> anyhow::Error {
        err.context(format!(
            "child {} of the node stored under {} (a `{}`)",
            self.index,
            self.key,
            std::any::type_name::<T>()
        ))
    }
}

/// The value of `(T, key)`: live in the arc cache, or fetched and deserialized once (other
/// threads loading the same entry wait for this one); then held by the call's table.
fn load<T>(storage: &dyn PagableStorage, key: DataKey, parent: Parent) -> anyhow::Result<Arc<T>>
where
    T: ?Sized + Send + Sync + 'static,
    Box<T>: DeserializeOwned,
{
    let mut loaded_here = false;
    let prefetched = with_state(|state| state.prefetched.get(&key).cloned()).flatten();
    let erased = storage
        .resolve_arc(TypeId::of::<T>(), key, prefetched, &mut |node| {
            loaded_here = true;
            let value: Arc<T> = decode_node::<Box<T>>(key, node)?.into();
            Ok(Box::new(value))
        })
        .map_err(|err| {
            // Only the fetch of this very key gets the context (a descendant's error already
            // has its own).
            if names_key(&err, key) {
                parent.context::<T>(err)
            } else {
                err
            }
        })?;
    let Some(arc) = downcast_arc::<T>(&*erased) else {
        return Err(wrong_type::<T>(key, erased.type_name()));
    };
    // A value that was already alive is held by someone else; only what this call loaded needs
    // holding.
    if loaded_here {
        with_state(|state| state.held.insert(key, &arc));
    }
    Ok(arc)
}

#[cold]
#[inline(never)]
fn wrong_type<T: ?Sized>(key: DataKey, resolved: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "the storage resolved {key} as a `{resolved}`, not the `{}` asked for",
        std::any::type_name::<T>()
    )
}

/// Whether `err` is a fetch error about `key` itself (not about one of its descendants).
fn names_key(err: &anyhow::Error, key: DataKey) -> bool {
    match err.downcast_ref::<Error>() {
        Some(Error::NotFound(missing)) => *missing == key,
        Some(Error::Corrupt { key: damaged, .. }) => *damaged == key,
        _ => false,
    }
}

/// The root's record: prefetched, or fetched now.
fn fetch(storage: &dyn PagableStorage, key: DataKey) -> anyhow::Result<Arc<PagableData>> {
    if let Some(node) = with_state(|state| state.prefetched.get(&key).cloned()).flatten() {
        return Ok(node);
    }
    storage.fetch_data_blocking(&key)
}

/// Deserializes the record `node` (stored under `key`) as an `X`, with `node` as the frame its
/// `Shared` fields take child keys from.
fn decode_node<X: DeserializeOwned>(key: DataKey, node: Arc<PagableData>) -> anyhow::Result<X> {
    let pushed = with_state(|state| {
        state.frames.push(Frame {
            key,
            node: Arc::clone(&node),
            next: 0,
        })
    });
    if pushed.is_none() {
        anyhow::bail!(OUTSIDE_SESSION);
    }
    let result = decode::<X>(&node.data);
    let used = with_state(|state| state.frames.pop().map(|frame| frame.next))
        .flatten()
        .unwrap_or(0);
    match result {
        Ok(value) if used == node.arcs.len() => {
            // A user impl may have swallowed an inner error; it is not ours to report.
            take_stashed();
            Ok(value)
        }
        Ok(value) => {
            // Its children are held by the call's table, so this drop does not recurse.
            drop(value);
            Err(unused_keys(key, node.arcs.len(), used))
        }
        Err(err) => Err(match take_stashed() {
            Some(inner) => inner,
            None => deserialize_error::<X>(key, &node, err),
        }),
    }
}

enum DecodeError {
    Postcard(postcard::Error),
    Trailing(usize),
}

fn decode<X: DeserializeOwned>(data: &[u8]) -> Result<X, DecodeError> {
    let mut deserializer = postcard::Deserializer::from_bytes(data);
    let value = X::deserialize(&mut deserializer).map_err(DecodeError::Postcard)?;
    match deserializer.finalize() {
        Ok([]) => Ok(value),
        Ok(rest) => Err(DecodeError::Trailing(rest.len())),
        Err(err) => Err(DecodeError::Postcard(err)),
    }
}

#[cold]
#[inline(never)]
fn deserialize_error<X: DeserializeOwned>(
    key: DataKey,
    node: &Arc<PagableData>,
    err: DecodeError,
) -> anyhow::Error {
    let type_name = std::any::type_name::<X>();
    let reason = match err {
        DecodeError::Trailing(count) => format!("{count} bytes are left over after the value"),
        DecodeError::Postcard(postcard::Error::SerdeDeCustom) => custom_message::<X>(key, node),
        DecodeError::Postcard(other) => other.to_string(),
    };
    Error::Deserialize {
        key,
        type_name,
        reason,
    }
    .into()
}

/// Runs the failed deserialization again through erased-serde, whose error keeps a custom
/// message (an unknown typetag name, a user's validation) that postcard drops. The children it
/// meets before the failure point are already in the call's table, so this loads nothing.
#[inline(never)]
fn custom_message<X: DeserializeOwned>(key: DataKey, node: &Arc<PagableData>) -> String {
    with_state(|state| {
        state.frames.push(Frame {
            key,
            node: Arc::clone(node),
            next: 0,
        })
    });
    let mut deserializer = postcard::Deserializer::from_bytes(&node.data);
    let mut erased = <dyn erased_serde::Deserializer>::erase(&mut deserializer);
    let message = match erased_serde::deserialize::<X>(&mut erased) {
        Err(err) => err.to_string(),
        Ok(value) => {
            drop(value);
            "a custom serde error, which did not happen again on a second try".into()
        }
    };
    with_state(|state| state.frames.pop());
    take_stashed();
    if message != postcard::Error::SerdeDeCustom.to_string() {
        return message;
    }
    // The message was lost at a nested serde layer. For a typetag trait object, name the tag
    // and ask typetag itself whether it knows it.
    if let Some(unknown) = unknown_typetag::<X>(&node.data) {
        return unknown;
    }
    "a custom serde error whose message postcard does not keep; for a `dyn Trait`, check that \
     the stored typetag name is registered in this program and that the trait is not \
     internally tagged with an enum impl"
        .into()
}

/// typetag's own message ("unknown variant `cat`, expected one of …") when `data` is an
/// externally tagged trait object whose tag this program does not register.
fn unknown_typetag<X: DeserializeOwned>(data: &[u8]) -> Option<String> {
    if !std::any::type_name::<X>().starts_with("alloc::boxed::Box<dyn ") {
        return None;
    }
    // Externally tagged in postcard: a one-entry map, then the tag as a string.
    let (len, rest) = postcard::take_from_bytes::<usize>(data).ok()?;
    let (tag, _) = postcard::take_from_bytes::<&str>(rest).ok()?;
    if len != 1 {
        return None;
    }
    // Ask typetag through a self-describing deserializer, which keeps its message.
    let probe = serde::de::value::MapDeserializer::<_, serde::de::value::Error>::new(
        std::iter::once((tag, ())),
    );
    match X::deserialize(probe) {
        Err(err) if err.to_string().starts_with("unknown variant") => Some(err.to_string()),
        _ => None,
    }
}

/// Installs a fresh page-in session on this thread; the previous one (a page-in nested in a
/// `Deserialize` impl) comes back on drop.
struct Session {
    previous: Option<InState>,
}

impl Session {
    fn install(storage: Arc<dyn PagableStorage>, prefetched: Records) -> Session {
        let state = InState {
            storage,
            prefetched,
            frames: Vec::new(),
            held: Held::default(),
            error: None,
        };
        Session {
            previous: IN.with(|cell| cell.replace(Some(state))),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let mine = IN.with(|cell| cell.replace(self.previous.take()));
        // Held releases parents first, so no drop recurses down a chain (which, a million
        // deep, would overflow the stack).
        drop(mine);
    }
}

/// Pages the value stored under `key` in: see [`page_in`](crate::page_in).
pub(crate) fn run<T: DeserializeOwned>(
    storage: Arc<dyn PagableStorage>,
    key: DataKey,
    prefetched: Records,
) -> anyhow::Result<T> {
    let _session = Session::install(Arc::clone(&storage), prefetched);
    let root = fetch(&*storage, key)?;
    // The root's fan-out is a cheap hint of the table's size; growing it step by step costs
    // rehashes and large allocations.
    with_state(|state| {
        let hint = root.arcs.len().min(1 << 20);
        state.held.reserve(hint);
    });
    // The root's own deserialization runs on the caller's stack unless it is short.
    stacker::maybe_grow(RED_ZONE, STACK_SEGMENT, || decode_node::<T>(key, root))
}

/// Fetches every record reachable from `root` with at most `limit` fetches in flight.
pub(crate) async fn prefetch(
    storage: &dyn PagableStorage,
    root: DataKey,
    limit: usize,
) -> anyhow::Result<Records> {
    use futures_util::StreamExt;
    use futures_util::stream::FuturesUnordered;

    let mut records = Records::default();
    let mut seen = std::collections::HashSet::<DataKey, KeyHasherBuilder>::default();
    seen.insert(root);
    let mut queue = std::collections::VecDeque::from([root]);
    let mut in_flight = FuturesUnordered::new();
    loop {
        while in_flight.len() < limit.max(1) {
            let Some(key) = queue.pop_front() else { break };
            in_flight.push(async move { (key, storage.fetch_data(&key).await) });
        }
        let Some((key, fetched)) = in_flight.next().await else {
            break;
        };
        let node = fetched?;
        for &child in &node.arcs {
            if seen.insert(child) {
                queue.push_back(child);
            }
        }
        records.insert(key, node);
    }
    Ok(records)
}
