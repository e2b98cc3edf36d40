//! A bounded cache of decoded metadata tables (L2 tables, refcount blocks),
//! shared by the threads of a parallel read.

use crate::error::Result;
use std::collections::{HashMap, VecDeque};
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
        if !inner.tables.contains_key(&offset) {
            if inner.order.len() >= self.capacity {
                if let Some(old) = inner.order.pop_front() {
                    inner.tables.remove(&old);
                }
            }
            inner.order.push_back(offset);
            inner.tables.insert(offset, Arc::clone(&table));
        }
        Ok(table)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave the map inconsistent: keep using it.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
