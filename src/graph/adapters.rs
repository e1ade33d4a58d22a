//! Adapters that page plain `Arc<T>` fields as shared children, for types that cannot switch to
//! [`Shared<T>`](crate::Shared).

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserializer, Serialize, Serializer};

use super::shared::{deserialize_arc, serialize_arc};

/// A serde `with` module for an `Arc<T>` field: `#[serde(with = "pagestore::graph::arc")]`.
///
/// The field pages exactly as a [`Shared<T>`](crate::Shared) would. For `Arc`s inside a `Vec`,
/// an `Option` or a map, use [`AsShared`](crate::graph::AsShared) (feature `serde_with`).
///
/// ```
/// use std::sync::Arc;
/// use serde::{Deserialize, Serialize};
/// use pagestore::{page_in, page_out, InMemoryPagableStorage};
///
/// #[derive(Serialize, Deserialize)]
/// struct Doc {
///     #[serde(with = "pagestore::graph::arc")]
///     body: Arc<String>,
/// }
/// let storage = Arc::new(InMemoryPagableStorage::new());
/// let body = Arc::new(String::from("shared text"));
/// let key = page_out(&storage, &(Doc { body: body.clone() }, Doc { body }))?;
/// let (a, b): (Doc, Doc) = page_in(&storage, key)?;
/// assert!(Arc::ptr_eq(&a.body, &b.body));
/// assert_eq!(storage.len(), 2, "the root and one shared body");
/// # anyhow::Ok(())
/// ```
pub mod arc {
    use super::*;

    /// Writes `value` as a child reference (inside [`page_out`](crate::page_out) only).
    pub fn serialize<T, S>(value: &Arc<T>, serializer: S) -> Result<S::Ok, S::Error>
    where
        T: ?Sized + Serialize + Send + Sync + 'static,
        S: Serializer,
    {
        serialize_arc(value, serializer)
    }

    /// Reads a child reference (inside [`page_in`](crate::page_in) only).
    pub fn deserialize<'de, T, D>(deserializer: D) -> Result<Arc<T>, D::Error>
    where
        T: ?Sized + Send + Sync + 'static,
        Box<T>: DeserializeOwned,
        D: Deserializer<'de>,
    {
        deserialize_arc(deserializer)
    }
}

/// A [`serde_with`] adapter that pages an `Arc<T>` as a shared child wherever it sits:
/// `#[serde_as(as = "Vec<AsShared>")]`, `Option<AsShared>`, `BTreeMap<_, AsShared>`, ….
///
/// ```
/// use std::sync::Arc;
/// use serde::{Deserialize, Serialize};
/// use serde_with::serde_as;
/// use pagestore::{graph::AsShared, page_in, page_out, InMemoryPagableStorage};
///
/// #[serde_as]
/// #[derive(Serialize, Deserialize)]
/// struct Bag {
///     #[serde_as(as = "Vec<Option<AsShared>>")]
///     items: Vec<Option<Arc<u64>>>,
/// }
/// let storage = Arc::new(InMemoryPagableStorage::new());
/// let one = Arc::new(1u64);
/// let key = page_out(&storage, &Bag { items: vec![Some(one.clone()), None, Some(one)] })?;
/// let back: Bag = page_in(&storage, key)?;
/// let (a, b) = (back.items[0].as_ref().unwrap(), back.items[2].as_ref().unwrap());
/// assert!(Arc::ptr_eq(a, b));
/// # anyhow::Ok(())
/// ```
#[cfg(feature = "serde_with")]
#[derive(Debug, Clone, Copy, Default)]
pub struct AsShared;

#[cfg(feature = "serde_with")]
impl<T> serde_with::SerializeAs<Arc<T>> for AsShared
where
    T: ?Sized + Serialize + Send + Sync + 'static,
{
    fn serialize_as<S: Serializer>(source: &Arc<T>, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_arc(source, serializer)
    }
}

#[cfg(feature = "serde_with")]
impl<'de, T> serde_with::DeserializeAs<'de, Arc<T>> for AsShared
where
    T: ?Sized + Send + Sync + 'static,
    Box<T>: DeserializeOwned,
{
    fn deserialize_as<D: Deserializer<'de>>(deserializer: D) -> Result<Arc<T>, D::Error> {
        deserialize_arc(deserializer)
    }
}
