//! Page-in: rebuild a value from its key, resolving shared children through the arc cache.
//!
//! A node is deserialized top-down: when its deserializer reaches a [`Shared<T>`] field, that
//! field takes the node's next child key and resolves it — from this call's table, else from the
//! storage's arc cache ([`PagableStorage::resolve_arc`]) by `(TypeId of T, key)`, whose load-once
//! entry fetches and deserializes the child (recursively) if no live value exists. That is where
//! the child's type becomes known, so it is the only place it can be deserialized.
//!
//! So page-in recurses once per level of the graph, and the recursion runs on a growable stack:
//! each child's load goes through [`stacker::maybe_grow`], which moves to a new stack segment
//! when the current one runs low. Any depth pages in, on any thread, with one deserialization
//! per node; the cost is memory: the stack of the deepest path is alive until it unwinds.
//!
//! A node's deserialization is never cut short or retried by page-in itself, so a user's
//! lenient `Deserialize` impl (one that maps an error to a default) behaves at every depth as
//! it does at the root. A key met again on its own path is a cycle (possible only in data
//! that page-out did not write, read without verification) and is reported, not waited for.

use std::any::TypeId;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::data::PagableData;
use crate::erase::downcast_arc;
use crate::error::Error;
use crate::key::{DataKey, KeyHasherBuilder};
use crate::runtime::PagableStorage;

use super::held::Held;
use super::keep;
use super::session::OUTSIDE_SESSION;

/// Stack left below which a child's load moves to a new stack segment.
///
/// It must cover everything one level can use before the next level's check: page-in's own
/// frames (the arc cache's load, the node's decoding) plus every serde frame of the user's
/// types between a node's start and its next `Shared` field, and at the bottom a leaf's whole
/// deserialization. Debug builds give every temporary its own stack slot, and serde's derived
/// visitors hold each field's value in their frame, so a user type with a large inline field
/// (a `[u8; 64 << 10]` buffer, say) costs a few times its size per level there. 1 MiB leaves
/// room for such types even in debug builds (rustc uses 100 KiB; a level of ordinary types
/// takes about 4 KiB in debug builds and 1.2 KiB in release builds).
const RED_ZONE: usize = 1 << 20;

/// The size of a new stack segment. A segment is mapped lazily (only the pages the levels
/// touch are committed), so a large one costs address space rather than memory, and it makes
/// switching rare: one segment holds thousands of levels (of a few KiB each in debug builds),
/// and the red zone wastes at most a sixteenth of it.
const STACK_SEGMENT: usize = 16 << 20;

/// The most keys `page_in_async` (and `PagableArc::pin_async`) read in one batched fetch
/// ([`PagableStorage::fetch_data_many`]: one call on tokio's blocking pool for the SQLite
/// store).
const FETCH_BATCH: usize = 1024;

/// How many batched fetches one `page_in_async` keeps in flight: enough to overlap reading
/// with the walk, few enough that the blocking threads stay bounded (the SQLite store also
/// bounds them across callers, to its number of readers).
const BATCHES_IN_FLIGHT: usize = 2;

pub(crate) type Records = HashMap<DataKey, Arc<PagableData>, KeyHasherBuilder>;

/// A node being deserialized: its record and how many child keys its fields have taken.
struct Frame {
    key: DataKey,
    node: Arc<PagableData>,
    next: usize,
    /// Set on the re-run that recovers a custom message ([`custom_message`]): the children
    /// that failed are not loaded again, their failure is replayed, and every child failure
    /// carries its [`marker`] as its message.
    replay: bool,
}

impl Frame {
    fn new(key: DataKey, node: &Arc<PagableData>) -> Frame {
        Frame {
            key,
            node: Arc::clone(node),
            next: 0,
            replay: false,
        }
    }
}

struct InState {
    storage: Arc<dyn PagableStorage>,
    /// Records fetched ahead of time (by `page_in_async`); others are fetched on demand.
    prefetched: Records,
    frames: Vec<Frame>,
    /// The children whose resolution failed, with their real error, for the frames that
    /// resolved them (the last ones belong to the last frame): the serde error that carries a
    /// failure into the node's deserializer has no room for it (postcard keeps no custom
    /// message). A node's failure is reported as a child's only if that child's error explains
    /// it (a lenient impl may have swallowed it; see [`node_error`]).
    failures: Vec<Failure>,
    /// With the first [`SCANNED`] frames, the keys on this thread's page-in path: those of
    /// this session's deeper frames and of every frame of the page-ins it is nested in. A key
    /// met again below itself is a cycle.
    deep: HashSet<DataKey, KeyHasherBuilder>,
    /// Every shared value this call loaded, held strongly so that dropping a partly built
    /// value (after an error) or the call's own handles never recurses down a chain.
    held: Held,
}

/// A child's failure, kept for the node that resolved it.
struct Failure {
    /// The depth of that node's frame (`frames.len()` while it is the last frame).
    depth: usize,
    /// Which child of the node.
    index: usize,
    error: anyhow::Error,
}

/// How many frames at the root end of a session's path are found by scanning; the keys of
/// the frames past them are also kept in a set ([`InState::deep`]). Most graphs are shallow,
/// and scanning a few frames is cheaper than hashing on every push and pop.
const SCANNED: usize = 16;

thread_local! {
    static IN: RefCell<Option<InState>> = const { RefCell::new(None) };
}

fn with_state<R>(f: impl FnOnce(&mut InState) -> R) -> Option<R> {
    IN.with(|cell| cell.try_borrow_mut().ok()?.as_mut().map(f))
}

impl InState {
    /// Whether `key` is on this thread's page-in path.
    fn on_path(&self, key: DataKey) -> bool {
        self.frames
            .iter()
            .take(SCANNED)
            .any(|frame| frame.key == key)
            || (!self.deep.is_empty() && deep_contains(&self.deep, key))
    }
}

/// Resolves the next child key of the node being deserialized as a `T`.
///
/// On failure, the real error is kept for the node ([`InState::failures`]) and the message
/// returned here becomes the serde error that unwinds the node's deserializer.
pub(crate) fn resolve<T>() -> Result<Arc<T>, String>
where
    T: ?Sized + Send + Sync + 'static,
    Box<T>: DeserializeOwned,
{
    enum Step<T: ?Sized> {
        Hit(Arc<T>),
        Miss(DataKey, Parent),
        /// Fails with this message, without touching the frame.
        Refuse(String),
        Fail(usize, anyhow::Error),
    }
    // The hit path (a child this call already loaded) is most of the calls: it stays lean,
    // and a miss goes out of line.
    let step = with_state(|state| {
        let depth = state.frames.len();
        let Some(frame) = state.frames.last_mut() else {
            return Step::Refuse(OUTSIDE_SESSION.to_string());
        };
        let index = frame.next;
        let Some(&key) = frame.node.arcs.get(index) else {
            return Step::Fail(index, too_few_keys(frame.key, frame.node.arcs.len()));
        };
        frame.next += 1;
        if frame.replay && failed_before(&state.failures, depth, index) {
            return Step::Refuse(marker(index));
        }
        let parent = Parent {
            key: frame.key,
            index,
        };
        match state.held.get::<T>(key) {
            Some(arc) => Step::Hit(arc),
            None => Step::Miss(key, parent),
        }
    });
    match step {
        None => Err(OUTSIDE_SESSION.to_string()),
        Some(Step::Hit(arc)) => Ok(arc),
        Some(Step::Refuse(message)) => Err(message),
        Some(Step::Fail(index, err)) => Err(failed(index, err)),
        Some(Step::Miss(key, parent)) => {
            load_child::<T>(key, parent).map_err(|err| failed(parent.index, err))
        }
    }
}

/// Loads child `parent.index` (`key`) of the node being deserialized, unless it is on this
/// thread's page-in path: loading it would then wait for this thread's own load of it (or
/// recurse forever).
fn load_child<T>(key: DataKey, parent: Parent) -> anyhow::Result<Arc<T>>
where
    T: ?Sized + Send + Sync + 'static,
    Box<T>: DeserializeOwned,
{
    let ready = with_state(|state| {
        let prefetched = state.prefetched.get(&key).cloned();
        (!state.on_path(key)).then(|| (Arc::clone(&state.storage), prefetched))
    });
    match ready {
        None => Err(anyhow::anyhow!(OUTSIDE_SESSION)),
        Some(None) => Err(parent.context::<T>(cycle(key))),
        // The only place page-in recurses: one level per node of the path.
        Some(Some((storage, prefetched))) => stacker::maybe_grow(RED_ZONE, STACK_SEGMENT, || {
            load::<T>(&*storage, key, prefetched, parent)
        }),
    }
}

/// Keeps `err`, the failure of child `index`, with the node being deserialized (the child's
/// frames are gone: the last frame is the node that resolved it), and returns the message of
/// the serde error that carries it into the node's deserializer.
#[cold]
#[inline(never)]
fn failed(index: usize, err: anyhow::Error) -> String {
    with_state(|state| {
        let depth = state.frames.len();
        let message = if state.frames.last()?.replay {
            marker(index)
        } else {
            err.to_string()
        };
        state.failures.push(Failure {
            depth,
            index,
            error: err,
        });
        Some(message)
    })
    .flatten()
    .unwrap_or_else(|| OUTSIDE_SESSION.to_string())
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
fn cycle(key: DataKey) -> anyhow::Error {
    Error::Corrupt {
        key,
        reason: "it is its own descendant (a cycle): the records below it lead back to it, \
                 which content-addressed records written by page_out cannot do; they were \
                 written by another program or damaged, and read without verification"
            .into(),
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

/// Whether child `index` of the frame at `depth` failed (on a re-run: in the first run).
#[cold]
#[inline(never)]
fn failed_before(failures: &[Failure], depth: usize, index: usize) -> bool {
    failures
        .iter()
        .rev()
        .take_while(|failure| failure.depth == depth)
        .any(|failure| failure.index == index)
}

/// The message a child's failure carries through a re-run's deserializer: unique, so that the
/// failure reaching the top unchanged is told apart from the node's own errors.
fn marker(index: usize) -> String {
    format!("\u{0}pagestore: shared child {index} failed\u{0}")
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
fn load<T>(
    storage: &dyn PagableStorage,
    key: DataKey,
    prefetched: Option<Arc<PagableData>>,
    parent: Parent,
) -> anyhow::Result<Arc<T>>
where
    T: ?Sized + Send + Sync + 'static,
    Box<T>: DeserializeOwned,
{
    let mut loaded_here = false;
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

// Out of line: most paths are shallow, and the hashing code would weigh on every node.
#[inline(never)]
fn deep_contains(deep: &HashSet<DataKey, KeyHasherBuilder>, key: DataKey) -> bool {
    deep.contains(&key)
}

#[inline(never)]
fn deep_insert(deep: &mut HashSet<DataKey, KeyHasherBuilder>, key: DataKey) {
    deep.insert(key);
}

#[inline(never)]
fn deep_remove(deep: &mut HashSet<DataKey, KeyHasherBuilder>, key: DataKey) {
    deep.remove(&key);
}

/// Pushes `frame` and puts its key on the path (the caller checked that it is not on it).
fn push_frame(frame: Frame) -> anyhow::Result<()> {
    with_state(|state| {
        if state.frames.len() >= SCANNED {
            deep_insert(&mut state.deep, frame.key);
        }
        state.frames.push(frame);
    })
    .ok_or_else(|| anyhow::anyhow!(OUTSIDE_SESSION))
}

/// Pops the last frame and takes its key off the path. Returns how many child keys its
/// value used, and its children's failures if `keep_failures` (else they are dropped: a value
/// that was built anyway swallowed them).
fn pop_frame(keep_failures: bool) -> (usize, Vec<(usize, anyhow::Error)>) {
    with_state(|state| {
        let depth = state.frames.len();
        let Some(frame) = state.frames.pop() else {
            return (0, Vec::new());
        };
        if state.frames.len() >= SCANNED {
            deep_remove(&mut state.deep, frame.key);
        }
        let failed = match state.failures.last() {
            Some(last) if last.depth == depth => {
                take_failures(&mut state.failures, depth, keep_failures)
            }
            _ => Vec::new(),
        };
        (frame.next, failed)
    })
    .unwrap_or_default()
}

/// Removes the failures of the frame at `depth` (the last ones); returns them if `keep`.
#[cold]
#[inline(never)]
fn take_failures(
    failures: &mut Vec<Failure>,
    depth: usize,
    keep: bool,
) -> Vec<(usize, anyhow::Error)> {
    let start = failures
        .iter()
        .rposition(|failure| failure.depth != depth)
        .map_or(0, |at| at + 1);
    let mine = failures.drain(start..);
    if keep {
        mine.map(|failure| (failure.index, failure.error)).collect()
    } else {
        Vec::new()
    }
}

/// Deserializes the record `node` (stored under `key`) as an `X`, with `node` as the frame its
/// `Shared` fields take child keys from.
fn decode_node<X: DeserializeOwned>(key: DataKey, node: Arc<PagableData>) -> anyhow::Result<X> {
    push_frame(Frame::new(key, &node))?;
    let result = decode::<X>(&node.data);
    let (used, failed) = pop_frame(result.is_err());
    match result {
        // A child failure the value swallowed (a lenient impl) is not ours to report.
        Ok(value) if used == node.arcs.len() => Ok(value),
        Ok(value) => {
            // Its children are held by the call's table, so this drop does not recurse.
            drop(value);
            Err(unused_keys(key, node.arcs.len(), used))
        }
        Err(err) => Err(node_error::<X>(key, &node, err, failed)),
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

/// The error of the node stored under `key`, whose deserialization as an `X` failed with `err`.
///
/// A custom serde error may be a child's failure (its real error is in `frame`) or the node's
/// own (a user's validation, an unknown typetag name), and postcard keeps no message to tell.
/// The deserialization is run again in a way that does ([`custom_message`]): a child's error
/// is reported only if it is what reached the top. Otherwise a lenient impl swallowed it and
/// the node failed for its own reason, which is reported.
#[cold]
#[inline(never)]
fn node_error<X: DeserializeOwned>(
    key: DataKey,
    node: &Arc<PagableData>,
    err: DecodeError,
    failed: Vec<(usize, anyhow::Error)>,
) -> anyhow::Error {
    let reason = match err {
        DecodeError::Trailing(count) => format!("{count} bytes are left over after the value"),
        DecodeError::Postcard(postcard::Error::SerdeDeCustom) => {
            let (message, failed) = custom_message::<X>(key, node, failed);
            let mut reason = message;
            for (index, child) in failed {
                let marker = marker(index);
                if reason == marker {
                    return child;
                }
                // The node's own message, quoting the child's failure.
                reason = reason.replace(&marker, &format!("{child:#}"));
            }
            explain_custom::<X>(node, reason)
        }
        DecodeError::Postcard(other) => other.to_string(),
    };
    Error::Deserialize {
        key,
        type_name: std::any::type_name::<X>(),
        reason,
    }
    .into()
}

/// Runs the failed deserialization again with [`keep::deserialize`], which keeps custom
/// messages that postcard drops. The children it meets before the failure point are in the
/// call's table, and those that failed (`failed`) fail again without being loaded again, with
/// their [`marker`] as the message; so this loads nothing, and a failure deep down costs one
/// re-run per level of its path.
///
/// Returns the message and the failed children (with any that failed only this time).
#[inline(never)]
fn custom_message<X: DeserializeOwned>(
    key: DataKey,
    node: &Arc<PagableData>,
    failed: Vec<(usize, anyhow::Error)>,
) -> (String, Vec<(usize, anyhow::Error)>) {
    let mut frame = Frame::new(key, node);
    frame.replay = true;
    if let Err(err) = push_frame(frame) {
        return (err.to_string(), failed);
    }
    with_state(|state| {
        let depth = state.frames.len();
        state
            .failures
            .extend(failed.into_iter().map(|(index, error)| Failure {
                depth,
                index,
                error,
            }));
    });
    let message = match keep::deserialize::<X>(&node.data) {
        Err(err) => err.to_string(),
        Ok(value) => {
            drop(value);
            "a custom serde error, which did not happen again on a second try".into()
        }
    };
    let (_, failed) = pop_frame(true);
    (message, failed)
}

/// The reason to report for a custom serde error with `message` that no child raised.
fn explain_custom<X: DeserializeOwned>(node: &Arc<PagableData>, message: String) -> String {
    if message != postcard::Error::SerdeDeCustom.to_string() {
        return message;
    }
    // The message was lost (a `Deserialize` impl that deserializes through a postcard
    // deserializer of its own, say). For a typetag trait object, name the tag and ask typetag
    // itself whether it knows it.
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
/// `Deserialize` impl) comes back on drop. The path of keys being paged in is the thread's:
/// the new session takes it over and gives it back.
struct Session {
    previous: Option<InState>,
}

impl Session {
    fn install(storage: Arc<dyn PagableStorage>, prefetched: Records) -> Session {
        let mut previous = IN.with(|cell| cell.take());
        let mut deep = HashSet::default();
        if let Some(outer) = previous.as_mut() {
            deep = std::mem::take(&mut outer.deep);
            deep.extend(outer.frames.iter().take(SCANNED).map(|frame| frame.key));
        }
        let state = InState {
            storage,
            prefetched,
            frames: Vec::new(),
            failures: Vec::new(),
            deep,
            held: Held::default(),
        };
        IN.with(|cell| cell.replace(Some(state)));
        Session { previous }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let mine = IN.with(|cell| cell.replace(None));
        if let Some(mut mine) = mine {
            if let Some(outer) = self.previous.as_mut() {
                // Frames left by a panic are not on the path any more, and the outer
                // session's first frames are scanned again.
                let leaving = mine.frames.iter().skip(SCANNED);
                for frame in leaving.chain(outer.frames.iter().take(SCANNED)) {
                    mine.deep.remove(&frame.key);
                }
                outer.deep = std::mem::take(&mut mine.deep);
            }
            // Held releases parents first, so no drop recurses down a chain (which, a million
            // deep, would overflow the stack).
            drop(mine);
        }
        IN.with(|cell| cell.replace(self.previous.take()));
    }
}

/// Pages the value stored under `key` in: see [`page_in`](crate::page_in).
pub(crate) fn run<T: DeserializeOwned>(
    storage: Arc<dyn PagableStorage>,
    key: DataKey,
    prefetched: Records,
) -> anyhow::Result<T> {
    let _session = Session::install(Arc::clone(&storage), prefetched);
    if with_state(|state| state.on_path(key)).unwrap_or(false) {
        // A page-in nested in a `Deserialize` impl, of a key this thread is paging in.
        return Err(cycle(key));
    }
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

/// Fetches every record reachable from `root`, breadth first: the keys met (each once) are
/// read in batches of up to [`FETCH_BATCH`] through
/// [`fetch_data_many`](PagableStorage::fetch_data_many), at most [`BATCHES_IN_FLIGHT`] at a
/// time. A batch starts once enough keys are queued to fill it, or when none is in flight.
/// Below the root, a key whose value the storage [holds live](PagableStorage::holds_live) is
/// not fetched, nor what it reaches through it (the page-in reads it then if it must).
pub(crate) async fn prefetch(
    storage: &dyn PagableStorage,
    root: DataKey,
) -> anyhow::Result<Records> {
    use futures_util::StreamExt;
    use futures_util::stream::FuturesUnordered;

    let mut records = Records::default();
    let mut seen = HashSet::<DataKey, KeyHasherBuilder>::default();
    seen.insert(root);
    let mut queue = std::collections::VecDeque::from([root]);
    let mut in_flight = FuturesUnordered::new();
    loop {
        while in_flight.len() < BATCHES_IN_FLIGHT
            && (queue.len() >= FETCH_BATCH || (in_flight.is_empty() && !queue.is_empty()))
        {
            let take = queue.len().min(FETCH_BATCH);
            let batch: Vec<DataKey> = queue.drain(..take).collect();
            in_flight.push(async move {
                let fetched = storage.fetch_data_many(&batch).await;
                (batch, fetched)
            });
        }
        let Some((batch, fetched)) = in_flight.next().await else {
            break;
        };
        let nodes = fetched?;
        records.reserve(nodes.len());
        for (key, node) in batch.into_iter().zip(nodes) {
            for &child in &node.arcs {
                // A value alive in memory comes back from the arc cache, with what it holds.
                if seen.insert(child) && !storage.holds_live(&child) {
                    queue.push_back(child);
                }
            }
            records.insert(key, node);
        }
    }
    Ok(records)
}

/// The value stored under `key` as an `Arc<T>`, through the storage's arc cache (a value alive
/// elsewhere comes back as is), for a [`PagableArc`](crate::PagableArc) fault. Also returns
/// the record's length, or 0 when nothing was read.
pub(crate) fn load_arc<T>(
    storage: &Arc<dyn PagableStorage>,
    key: DataKey,
    prefetched: Option<Records>,
) -> anyhow::Result<(Arc<T>, usize)>
where
    T: ?Sized + Send + Sync + 'static,
    Box<T>: DeserializeOwned,
{
    let _session = Session::install(Arc::clone(storage), prefetched.unwrap_or_default());
    let record = with_state(|state| state.prefetched.get(&key).cloned()).flatten();
    let mut len = 0;
    let erased = stacker::maybe_grow(RED_ZONE, STACK_SEGMENT, || {
        storage.resolve_arc(TypeId::of::<T>(), key, record, &mut |node| {
            len = crate::codec::encoded_len(&node);
            let value: Arc<T> = decode_node::<Box<T>>(key, node)?.into();
            Ok(Box::new(value))
        })
    })?;
    match downcast_arc::<T>(&*erased) {
        Some(arc) => Ok((arc, len)),
        None => Err(wrong_type::<T>(key, erased.type_name())),
    }
}

/// Takes the next child key of the node being deserialized, for a lazy child (a
/// [`PagableArc`](crate::PagableArc)): nothing is loaded. Returns the key and the storage the
/// child lives in.
pub(crate) fn next_child_key() -> Result<(DataKey, Arc<dyn PagableStorage>), String> {
    let step = with_state(|state| {
        let Some(frame) = state.frames.last_mut() else {
            return Err(None);
        };
        let index = frame.next;
        let Some(&key) = frame.node.arcs.get(index) else {
            return Err(Some((
                index,
                too_few_keys(frame.key, frame.node.arcs.len()),
            )));
        };
        frame.next += 1;
        Ok((key, Arc::clone(&state.storage)))
    });
    match step {
        Some(Ok(found)) => Ok(found),
        Some(Err(Some((index, err)))) => Err(failed(index, err)),
        Some(Err(None)) | None => Err(OUTSIDE_SESSION.to_string()),
    }
}
