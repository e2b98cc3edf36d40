//! A bounded cache of decoded L2 tables, shared by the threads of a parallel
//! read. A writer updates tables in place and marks them dirty; dirty tables
//! are never evicted, only written back by the writer's flush.

use crate::error::Result;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

/// Memory the cache may hold, whatever the cluster size.
const CACHE_BYTES: u64 = 32 << 20;

pub struct L2Cache {
    table_bytes: usize,
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    tables: HashMap<u64, Arc<[u64]>>,
    /// Insertion order, oldest first: the eviction order.
    order: VecDeque<u64>,
    /// Tables changed in memory and not yet written to the file.
    dirty: HashSet<u64>,
}

impl L2Cache {
    /// A cache of tables one cluster (`table_bytes`) long.
    pub fn new(table_bytes: u64) -> L2Cache {
        L2Cache {
            table_bytes: table_bytes as usize,
            capacity: (CACHE_BYTES / table_bytes).max(16) as usize,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// How many tables fit in the cache's memory budget.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The cached table at `offset`, if any.
    pub fn get(&self, offset: u64) -> Option<Arc<[u64]>> {
        self.lock().tables.get(&offset).cloned()
    }

    /// The table at `offset`, read with `load` (which fills a raw buffer) on a miss.
    pub fn get_or_load(
        &self,
        offset: u64,
        load: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<Arc<[u64]>> {
        if let Some(t) = self.lock().tables.get(&offset) {
            return Ok(Arc::clone(t));
        }
        let mut raw = vec![0u8; self.table_bytes];
        load(&mut raw)?;
        let table: Arc<[u64]> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let mut inner = self.lock();
        if let Some(t) = inner.tables.get(&offset) {
            // Another thread loaded (or a writer replaced) it meanwhile.
            return Ok(Arc::clone(t));
        }
        self.make_room(&mut inner);
        inner.order.push_back(offset);
        inner.tables.insert(offset, Arc::clone(&table));
        Ok(table)
    }

    /// Changes the cached table at `offset` (which must have been loaded or
    /// inserted) with `edit` and marks it dirty. Readers holding the old
    /// version keep it; new lookups see the new one.
    pub fn update<T>(&self, offset: u64, edit: impl FnOnce(&mut [u64]) -> T) -> Option<T> {
        let mut inner = self.lock();
        let table = inner.tables.get_mut(&offset)?;
        let out = edit(Arc::make_mut(table));
        inner.dirty.insert(offset);
        Some(out)
    }

    /// Adds a table that exists only in memory so far (a new L2 table), dirty.
    pub fn insert_new(&self, offset: u64, table: Vec<u64>) {
        let mut inner = self.lock();
        if inner.tables.insert(offset, table.into()).is_none() {
            self.make_room(&mut inner);
            inner.order.push_back(offset);
        }
        inner.dirty.insert(offset);
    }

    /// Forgets the table at `offset` (its cluster was freed).
    pub fn remove(&self, offset: u64) {
        let mut inner = self.lock();
        inner.tables.remove(&offset);
        inner.dirty.remove(&offset);
        inner.order.retain(|&o| o != offset);
    }

    /// Forgets every table not waiting to be written (after the tables an
    /// image refers to changed wholesale: a snapshot applied or deleted).
    pub fn clear_clean(&self) {
        let mut inner = self.lock();
        let Inner {
            tables,
            order,
            dirty,
        } = &mut *inner;
        tables.retain(|offset, _| dirty.contains(offset));
        order.retain(|offset| dirty.contains(offset));
    }

    pub fn dirty_count(&self) -> usize {
        self.lock().dirty.len()
    }

    /// The dirty tables, encoded as they are stored, in file order; they stay
    /// dirty until [`mark_clean`](Self::mark_clean).
    pub fn dirty_tables(&self) -> Vec<(u64, Vec<u8>)> {
        let inner = self.lock();
        let mut out: Vec<(u64, Vec<u8>)> = inner
            .dirty
            .iter()
            .filter_map(|&off| {
                inner.tables.get(&off).map(|t| {
                    let bytes = t.iter().flat_map(|e| e.to_be_bytes()).collect();
                    (off, bytes)
                })
            })
            .collect();
        out.sort_unstable_by_key(|(off, _)| *off);
        out
    }

    pub fn mark_clean(&self, offsets: impl IntoIterator<Item = u64>) {
        let mut inner = self.lock();
        for off in offsets {
            inner.dirty.remove(&off);
        }
    }

    /// Drops clean tables, oldest first, until one more fits.
    fn make_room(&self, inner: &mut Inner) {
        let mut tries = inner.order.len();
        while inner.tables.len() >= self.capacity && tries > 0 {
            tries -= 1;
            let Some(old) = inner.order.pop_front() else {
                break;
            };
            if inner.dirty.contains(&old) {
                inner.order.push_back(old);
            } else {
                inner.tables.remove(&old);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave the map inconsistent: keep using it.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
