//! Type-erased `Arc`s: [`ArcEraseDyn`] and [`WeakEraseDyn`].
//!
//! The storage layer caches and queues `Arc`s of every type its users page, so it handles them
//! as `Box<dyn ArcEraseDyn>`: a strong reference whose concrete `Arc<T>` is recovered with
//! [`downcast_arc`]. Both traits are implemented for `std::sync::Arc<T>` and
//! `std::sync::Weak<T>` for any `T: ?Sized + Send + Sync + 'static`, so unsized values
//! (`Arc<str>`, `Arc<[T]>`, `Arc<dyn Trait + Send + Sync>`) work too.
//!
//! ```
//! use std::sync::Arc;
//! use pagestore::{downcast_arc, ArcEraseDyn};
//!
//! let text: Arc<str> = Arc::from("hello");
//! let erased: Box<dyn ArcEraseDyn> = Box::new(text.clone());
//! assert_eq!(erased.identity(), Arc::as_ptr(&text) as *const u8 as usize);
//! let weak = erased.downgrade();
//! let back: Arc<str> = downcast_arc(&*weak.upgrade().unwrap()).unwrap();
//! assert!(Arc::ptr_eq(&back, &text));
//! ```

use std::any::Any;
use std::sync::{Arc, Weak};

/// A strong `Arc` of some type, with its type erased.
pub trait ArcEraseDyn: Any + Send + Sync {
    /// The `Arc<T>` itself as [`Any`], for downcasting to `Arc<T>` (see [`downcast_arc`]).
    fn as_any(&self) -> &dyn Any;

    /// The name of the pointee type `T`, for messages.
    fn type_name(&self) -> &'static str;

    /// The address of the shared allocation: equal for two handles to the same value. It
    /// identifies the allocation only while a handle keeps it alive.
    fn identity(&self) -> usize;

    /// Another strong handle to the same value.
    fn clone_dyn(&self) -> Box<dyn ArcEraseDyn>;

    /// A weak handle to the same value.
    fn downgrade(&self) -> Box<dyn WeakEraseDyn>;

    /// The bytes the value occupies inside its allocation (`size_of_val` of the pointee):
    /// what a weak handle keeps allocated after the value is dropped. For `Arc<[u8]>` that is
    /// the slice's length; for `Arc<Vec<u8>>` only the `Vec`'s 24 bytes (its buffer is freed
    /// with the value). The default, for other implementors, is 0.
    fn inline_size(&self) -> usize {
        0
    }
}

/// A weak `Arc` of some type, with its type erased.
pub trait WeakEraseDyn: Any + Send + Sync {
    /// A strong handle, if the value is still alive.
    fn upgrade(&self) -> Option<Box<dyn ArcEraseDyn>>;

    /// Whether the value has been dropped (no strong handle is left).
    fn is_expired(&self) -> bool;

    /// The `Weak<T>` itself as [`Any`].
    fn as_any(&self) -> &dyn Any;
}

impl<T: ?Sized + Send + Sync + 'static> ArcEraseDyn for Arc<T> {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn type_name(&self) -> &'static str {
        std::any::type_name::<T>()
    }

    fn identity(&self) -> usize {
        Arc::as_ptr(self) as *const u8 as usize
    }

    fn clone_dyn(&self) -> Box<dyn ArcEraseDyn> {
        Box::new(Arc::clone(self))
    }

    fn downgrade(&self) -> Box<dyn WeakEraseDyn> {
        Box::new(Arc::downgrade(self))
    }

    fn inline_size(&self) -> usize {
        std::mem::size_of_val::<T>(self)
    }
}

impl<T: ?Sized + Send + Sync + 'static> WeakEraseDyn for Weak<T> {
    fn upgrade(&self) -> Option<Box<dyn ArcEraseDyn>> {
        Weak::upgrade(self).map(|arc| Box::new(arc) as Box<dyn ArcEraseDyn>)
    }

    fn is_expired(&self) -> bool {
        self.strong_count() == 0
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl std::fmt::Debug for dyn ArcEraseDyn {
    /// The type and the address; never the value.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Arc<{}>@{:#x}", self.type_name(), self.identity())
    }
}

impl std::fmt::Debug for dyn WeakEraseDyn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_expired() {
            "Weak(expired)"
        } else {
            "Weak(live)"
        })
    }
}

/// Recovers the concrete `Arc<T>` from an erased handle, or `None` if it holds another type.
pub fn downcast_arc<T: ?Sized + Send + Sync + 'static>(erased: &dyn ArcEraseDyn) -> Option<Arc<T>> {
    erased.as_any().downcast_ref::<Arc<T>>().cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    trait Shape: Send + Sync {
        fn sides(&self) -> u32;
    }
    struct Square;
    impl Shape for Square {
        fn sides(&self) -> u32 {
            4
        }
    }

    #[test]
    fn unsized_values_erase_and_come_back() {
        let slice: Arc<[u32]> = Arc::from(vec![1, 2, 3]);
        let shape: Arc<dyn Shape> = Arc::new(Square);
        let erased_slice: Box<dyn ArcEraseDyn> = Box::new(slice.clone());
        let erased_shape: Box<dyn ArcEraseDyn> = Box::new(shape.clone());
        assert!(Arc::ptr_eq(
            &downcast_arc::<[u32]>(&*erased_slice).unwrap(),
            &slice
        ));
        assert_eq!(
            downcast_arc::<dyn Shape>(&*erased_shape).unwrap().sides(),
            4
        );
        assert!(downcast_arc::<[u32]>(&*erased_shape).is_none());
        assert!(erased_shape.type_name().contains("Shape"));
        assert_eq!(erased_shape.clone_dyn().identity(), erased_shape.identity());
    }

    #[test]
    fn weak_handles_do_not_keep_values_alive() {
        let value = Arc::new(String::from("x"));
        let weak = ArcEraseDyn::downgrade(&value);
        assert!(!weak.is_expired());
        assert!(weak.upgrade().is_some());
        drop(value);
        assert!(weak.is_expired());
        assert!(weak.upgrade().is_none());
    }
}
