//! [`Held`]: the shared values one page-in call has loaded, held strongly and found by
//! `(TypeId, key)`.
//!
//! One typed table per view type instead of a `Box<dyn ArcEraseDyn>` per value: a page-in of
//! 100,000 nodes saves 100,000 allocations, and a lookup finds the `Arc` in the bucket it
//! probes (page-in is bound by cache misses on large graphs).

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;

use crate::key::{DataKey, KeyHasherBuilder};

trait Table: Any {
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
    /// Drops the values, last loaded first.
    fn release(&mut self);
}

struct Typed<T: ?Sized> {
    by_key: HashMap<DataKey, Arc<T>, KeyHasherBuilder>,
    /// The same values in load order (children before parents), for the drop order.
    order: Vec<Arc<T>>,
}

impl<T: ?Sized + Send + Sync + 'static> Table for Typed<T> {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn release(&mut self) {
        // `order` still holds every value, so clearing the map frees nothing.
        self.by_key = HashMap::default();
        // Values are loaded children first, so popping frees parents first: each freed value
        // finds its children still held, and no drop recurses down a chain.
        while let Some(value) = self.order.pop() {
            drop(value);
        }
    }
}

#[derive(Default)]
pub(crate) struct Held {
    /// Few entries (one per view type met), so a linear scan beats hashing.
    tables: Vec<(TypeId, Box<dyn Table>)>,
    /// Capacity for the first table (the root's fan-out: a cheap hint of the graph's size).
    hint: usize,
}

impl Held {
    pub(crate) fn reserve(&mut self, additional: usize) {
        self.hint = additional;
    }

    pub(crate) fn get<T: ?Sized + Send + Sync + 'static>(&self, key: DataKey) -> Option<Arc<T>> {
        let type_id = TypeId::of::<T>();
        let (_, table) = self.tables.iter().find(|(id, _)| *id == type_id)?;
        let typed = table.as_any().downcast_ref::<Typed<T>>()?;
        typed.by_key.get(&key).cloned()
    }

    pub(crate) fn insert<T: ?Sized + Send + Sync + 'static>(
        &mut self,
        key: DataKey,
        value: &Arc<T>,
    ) {
        let type_id = TypeId::of::<T>();
        let at = match self.tables.iter().position(|(id, _)| *id == type_id) {
            Some(at) => at,
            None => {
                let capacity = std::mem::take(&mut self.hint);
                let table = Typed::<T> {
                    by_key: HashMap::with_capacity_and_hasher(capacity, KeyHasherBuilder),
                    order: Vec::with_capacity(capacity),
                };
                self.tables.push((type_id, Box::new(table)));
                self.tables.len() - 1
            }
        };
        if let Some(typed) = self.tables[at].1.as_any_mut().downcast_mut::<Typed<T>>() {
            if typed.by_key.insert(key, Arc::clone(value)).is_none() {
                typed.order.push(Arc::clone(value));
            }
        }
    }

    /// Drops every value, parents first within each view type (see [`Table::release`]).
    pub(crate) fn release(&mut self) {
        for (_, table) in self.tables.iter_mut().rev() {
            table.release();
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.release();
    }
}
