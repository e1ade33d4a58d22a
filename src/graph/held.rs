//! [`Held`]: the shared values one page-in call has loaded, held strongly and found by
//! `(TypeId, key)`.
//!
//! One typed vector per view type instead of a `Box<dyn ArcEraseDyn>` per value: a page-in of
//! 100,000 nodes saves 100,000 allocations.

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

struct Typed<T: ?Sized>(Vec<Arc<T>>);

impl<T: ?Sized + Send + Sync + 'static> Table for Typed<T> {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn release(&mut self) {
        // Values are loaded children first, so popping frees parents first: each freed value
        // finds its children still held, and no drop recurses down a chain.
        while let Some(value) = self.0.pop() {
            drop(value);
        }
    }
}

#[derive(Default)]
pub(crate) struct Held {
    index: HashMap<(TypeId, DataKey), u32, KeyHasherBuilder>,
    /// Few entries (one per view type met), so a linear scan beats hashing.
    tables: Vec<(TypeId, Box<dyn Table>)>,
}

impl Held {
    pub(crate) fn reserve(&mut self, additional: usize) {
        self.index.reserve(additional);
    }

    pub(crate) fn get<T: ?Sized + Send + Sync + 'static>(&self, key: DataKey) -> Option<Arc<T>> {
        let type_id = TypeId::of::<T>();
        let &position = self.index.get(&(type_id, key))?;
        let table = self.table::<T>()?;
        table.0.get(position as usize).cloned()
    }

    pub(crate) fn insert<T: ?Sized + Send + Sync + 'static>(
        &mut self,
        key: DataKey,
        value: &Arc<T>,
    ) {
        let type_id = TypeId::of::<T>();
        let table = match self.tables.iter().position(|(id, _)| *id == type_id) {
            Some(at) => at,
            None => {
                self.tables
                    .push((type_id, Box::new(Typed::<T>(Vec::new()))));
                self.tables.len() - 1
            }
        };
        let Some(typed) = self.tables[table].1.as_any_mut().downcast_mut::<Typed<T>>() else {
            return;
        };
        let Ok(position) = u32::try_from(typed.0.len()) else {
            return;
        };
        typed.0.push(Arc::clone(value));
        self.index.insert((type_id, key), position);
    }

    /// Drops every value, parents first within each view type (see [`Table::release`]).
    pub(crate) fn release(&mut self) {
        self.index = HashMap::default();
        for (_, table) in self.tables.iter_mut().rev() {
            table.release();
        }
    }

    fn table<T: ?Sized + Send + Sync + 'static>(&self) -> Option<&Typed<T>> {
        let type_id = TypeId::of::<T>();
        let (_, table) = self.tables.iter().find(|(id, _)| *id == type_id)?;
        table.as_any().downcast_ref::<Typed<T>>()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.release();
    }
}
