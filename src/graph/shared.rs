//! [`Shared<T>`]: an `Arc<T>` that pages out as a child node instead of being copied.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{out, page_in};

/// An `Arc<T>` that pages out as a reference to its own stored node, so every holder of one
/// allocation shares one stored entry, and paging in gives them one `Arc` again.
///
/// `Shared<T>` derefs to `T` and clones as cheaply as an `Arc`. Equality, ordering, hashing,
/// `Debug` and `Display` are those of the value (compare identity with [`Shared::ptr_eq`]);
/// `==` checks identity first, so comparing graphs that share subgraphs does not walk them
/// twice (and two handles to one allocation are equal even if the value is not equal to
/// itself, such as a NaN).
/// `T` may be unsized: `Shared<str>`, `Shared<[u8]>`, and `Shared<dyn Trait>` for a
/// `#[typetag::serde]` trait (see the [module docs](crate::graph)).
///
/// Its `Serialize`/`Deserialize` impls only work inside [`page_out`](crate::page_out) and
/// [`page_in`](crate::page_in): elsewhere they return a serde error with the message
/// saying so (never a panic).
///
/// ```
/// use pagestore::Shared;
/// let a = Shared::new(String::from("x"));
/// let b = a.clone();
/// let c = Shared::new(String::from("x"));
/// assert!(Shared::ptr_eq(&a, &b));
/// assert!(!Shared::ptr_eq(&a, &c));
/// assert_eq!(a, c, "equality is the value's");
/// assert_eq!(a.len(), 1, "derefs to the value");
/// ```
pub struct Shared<T: ?Sized>(Arc<T>);

impl<T> Shared<T> {
    /// Puts `value` in a new shared allocation.
    pub fn new(value: T) -> Self {
        Shared(Arc::new(value))
    }
}

impl<T: ?Sized> Shared<T> {
    /// Whether `a` and `b` point to the same allocation.
    #[inline]
    pub fn ptr_eq(a: &Self, b: &Self) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }

    /// The `Arc` inside.
    #[inline]
    pub fn into_arc(self) -> Arc<T> {
        self.0
    }

    /// A reference to the `Arc` inside.
    #[inline]
    pub fn as_arc(&self) -> &Arc<T> {
        &self.0
    }
}

impl<T: ?Sized> Deref for Shared<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: ?Sized> AsRef<T> for Shared<T> {
    fn as_ref(&self) -> &T {
        &self.0
    }
}

impl<T: ?Sized> Clone for Shared<T> {
    #[inline]
    fn clone(&self) -> Self {
        Shared(Arc::clone(&self.0))
    }
}

impl<T: ?Sized> From<Arc<T>> for Shared<T> {
    fn from(arc: Arc<T>) -> Self {
        Shared(arc)
    }
}

impl<T: ?Sized> From<Shared<T>> for Arc<T> {
    fn from(shared: Shared<T>) -> Self {
        shared.0
    }
}

impl<T: ?Sized + PartialEq> PartialEq for Shared<T> {
    fn eq(&self, other: &Self) -> bool {
        // Identity implies equality (for every sane `PartialEq`); checking it first keeps
        // comparisons of shared subgraphs from walking them twice.
        Arc::ptr_eq(&self.0, &other.0) || *self.0 == *other.0
    }
}

impl<T: ?Sized + Eq> Eq for Shared<T> {}

impl<T: ?Sized + PartialOrd> PartialOrd for Shared<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        (*self.0).partial_cmp(&*other.0)
    }
}

impl<T: ?Sized + Ord> Ord for Shared<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (*self.0).cmp(&*other.0)
    }
}

impl<T: ?Sized + std::hash::Hash> std::hash::Hash for Shared<T> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (*self.0).hash(state)
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl<T: ?Sized + fmt::Display> fmt::Display for Shared<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl<T: ?Sized + Serialize + Send + Sync + 'static> Serialize for Shared<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_arc(&self.0, serializer)
    }
}

impl<'de, T> Deserialize<'de> for Shared<T>
where
    T: ?Sized + Send + Sync + 'static,
    Box<T>: DeserializeOwned,
{
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_arc(deserializer).map(Shared)
    }
}

/// Records `arc` as the next child of the node being paged out, and writes the child reference.
///
/// The reference is a unit (no bytes in postcard): the i-th shared value a node's serialization
/// meets is its i-th child key, so the data never holds positions and a node's key depends only
/// on its own bytes and its children's keys.
pub(crate) fn serialize_arc<T, S>(arc: &Arc<T>, serializer: S) -> Result<S::Ok, S::Error>
where
    T: ?Sized + Serialize + Send + Sync + 'static,
    S: Serializer,
{
    out::record_child(arc).map_err(serde::ser::Error::custom)?;
    serializer.serialize_unit()
}

/// Reads a child reference and resolves it to the shared value (see [`serialize_arc`]).
pub(crate) fn deserialize_arc<'de, T, D>(deserializer: D) -> Result<Arc<T>, D::Error>
where
    T: ?Sized + Send + Sync + 'static,
    Box<T>: DeserializeOwned,
    D: Deserializer<'de>,
{
    <()>::deserialize(deserializer)?;
    page_in::resolve::<T>().map_err(serde::de::Error::custom)
}
