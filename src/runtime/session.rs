//! [`SessionContext`]: per-session state that serializers share through the storage.

use std::any::{Any, TypeId};

use dashmap::DashMap;

/// A thread-safe map holding at most one value per type.
///
/// Each layer that serializes through a storage keeps its own state here, keyed by a type it
/// owns, without the layers knowing about each other. Values are cloned out, so store cheap
/// handles (an `Arc`, an id).
///
/// ```
/// use pagestore::SessionContext;
///
/// #[derive(Clone, Debug, PartialEq)]
/// struct Interner(u32);
///
/// let ctx = SessionContext::new();
/// assert_eq!(ctx.get::<Interner>(), None);
/// assert_eq!(ctx.get_or_insert_with(|| Interner(1)), Interner(1));
/// assert_eq!(ctx.get_or_insert_with(|| Interner(2)), Interner(1), "first value stays");
/// ctx.set(Interner(3));
/// assert_eq!(ctx.get::<Interner>(), Some(Interner(3)));
/// ```
#[derive(Default)]
pub struct SessionContext {
    values: DashMap<TypeId, Box<dyn Any + Send + Sync>>,
}

impl SessionContext {
    /// An empty context.
    pub fn new() -> Self {
        Self::default()
    }

    /// A clone of the value of type `T`, if one is set.
    pub fn get<T: Any + Send + Sync + Clone>(&self) -> Option<T> {
        self.values
            .get(&TypeId::of::<T>())
            .map(|value| Self::cast::<T>(&**value.value()).clone())
    }

    /// A clone of the value of type `T`, first setting it to `init()` if none is set. When
    /// threads race, exactly one `init` result is kept and every caller gets it.
    pub fn get_or_insert_with<T: Any + Send + Sync + Clone>(&self, init: impl FnOnce() -> T) -> T {
        let entry = self
            .values
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Box::new(init()));
        Self::cast::<T>(&**entry.value()).clone()
    }

    /// Sets the value of type `T`, returning the one it replaces.
    pub fn set<T: Any + Send + Sync>(&self, value: T) -> Option<T> {
        let old = self.values.insert(TypeId::of::<T>(), Box::new(value))?;
        Some(
            *old.downcast::<T>()
                .expect("values are stored under their own TypeId"),
        )
    }

    /// Removes and returns the value of type `T`.
    pub fn remove<T: Any + Send + Sync>(&self) -> Option<T> {
        let (_, old) = self.values.remove(&TypeId::of::<T>())?;
        Some(
            *old.downcast::<T>()
                .expect("values are stored under their own TypeId"),
        )
    }

    fn cast<T: Any>(value: &(dyn Any + Send + Sync)) -> &T {
        value
            .downcast_ref::<T>()
            .expect("values are stored under their own TypeId")
    }
}

impl std::fmt::Debug for SessionContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionContext")
            .field("values", &self.values.len())
            .finish()
    }
}
