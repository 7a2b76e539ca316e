//! Per-table locks: appends share a table, creating or altering it is exclusive.
//!
//! DuckDB lets concurrent transactions append to one table, but a transaction that creates or alters a
//! table conflicts with any other touching it. Serialising those few here turns a commit-time conflict
//! into a short wait.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

#[derive(Default)]
pub struct TableLocks {
    locks: Mutex<HashMap<String, Arc<RwLock<()>>>>,
}

impl TableLocks {
    /// The lock of `table` (names are case-insensitive, as in DuckDB).
    pub fn lock_for(&self, table: &str) -> Arc<RwLock<()>> {
        let mut locks = self.locks.lock().expect("table lock map poisoned");
        locks.entry(table.to_ascii_lowercase()).or_default().clone()
    }
}

/// A held table lock of either kind.
pub enum TableGuard<'a> {
    Shared { _guard: RwLockReadGuard<'a, ()> },
    Exclusive { _guard: RwLockWriteGuard<'a, ()> },
}

impl<'a> TableGuard<'a> {
    pub fn shared(lock: &'a RwLock<()>) -> Self {
        Self::Shared { _guard: lock.read().unwrap_or_else(|poisoned| poisoned.into_inner()) }
    }

    pub fn exclusive(lock: &'a RwLock<()>) -> Self {
        Self::Exclusive { _guard: lock.write().unwrap_or_else(|poisoned| poisoned.into_inner()) }
    }
}
