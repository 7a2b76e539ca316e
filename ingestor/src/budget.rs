//! The memory budget: decoded Arrow data that all in-flight requests may hold together.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use crate::error::IngestError;

/// Shared byte budget. Reservations give their bytes back when dropped.
#[derive(Clone, Debug)]
pub struct MemoryBudget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    capacity: u64,
    used: AtomicU64,
    released: Notify,
    /// How long a request may wait for room before it is refused.
    patience: Duration,
}

/// Bytes held against the budget until dropped.
#[derive(Debug)]
pub struct Reservation {
    inner: Arc<Inner>,
    bytes: u64,
}

impl MemoryBudget {
    pub fn new(capacity: u64, patience: Duration) -> Self {
        Self { inner: Arc::new(Inner { capacity, used: AtomicU64::new(0), released: Notify::new(), patience }) }
    }

    pub fn capacity(&self) -> u64 {
        self.inner.capacity
    }

    pub fn used(&self) -> u64 {
        self.inner.used.load(Ordering::Relaxed)
    }

    /// Takes `bytes` now, or `None` if that would exceed the capacity.
    pub fn try_reserve(&self, bytes: u64) -> Option<Reservation> {
        let inner = &self.inner;
        inner
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= inner.capacity)
            })
            .ok()
            .map(|_| Reservation { inner: inner.clone(), bytes })
    }

    /// Takes `bytes`, waiting up to the budget's patience for other requests to give room back.
    pub async fn reserve(&self, bytes: u64) -> Option<Reservation> {
        let deadline = tokio::time::Instant::now() + self.inner.patience;
        loop {
            let released = self.inner.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(reservation) = self.try_reserve(bytes) {
                return Some(reservation);
            }
            if bytes > self.inner.capacity || tokio::time::timeout_at(deadline, released).await.is_err() {
                return None;
            }
        }
    }
}

impl MemoryBudget {
    /// Takes room for a batch that decodes to `bytes`, before it is decoded: a batch larger than the
    /// whole budget can never fit (`batch_too_large`), one that does not fit now waits for room and is
    /// then refused as `overloaded` (retry later).
    pub async fn reserve_batch(&self, bytes: u64) -> Result<Reservation, IngestError> {
        if bytes > self.capacity() {
            return Err(IngestError::BatchTooLarge { bytes, limit: self.capacity() });
        }
        self.reserve(bytes).await.ok_or(IngestError::Overloaded)
    }

    /// Makes `held` (room taken earlier, such as a message body's) cover at least `bytes`, reserving the
    /// rest as [`reserve_batch`](Self::reserve_batch) does.
    pub async fn top_up(&self, held: Option<Reservation>, bytes: u64) -> Result<Reservation, IngestError> {
        let Some(mut held) = held else {
            return self.reserve_batch(bytes).await;
        };
        if bytes > self.capacity() {
            return Err(IngestError::BatchTooLarge { bytes, limit: self.capacity() });
        }
        if bytes > held.bytes {
            held.absorb(self.reserve_batch(bytes - held.bytes).await?);
        }
        Ok(held)
    }

    /// Makes `held` (what a stream's dictionaries hold against the budget) `bytes` large: more is
    /// reserved as [`reserve_batch`](Self::reserve_batch) reserves, less is given back.
    pub async fn resize(&self, held: &mut Option<Reservation>, bytes: u64) -> Result<(), IngestError> {
        let current = held.as_ref().map_or(0, Reservation::bytes);
        if bytes > current {
            let more = self.reserve_batch(bytes - current).await?;
            match held {
                Some(reservation) => reservation.absorb(more),
                None => *held = Some(more),
            }
        } else if let Some(reservation) = held {
            drop(reservation.split(current - bytes));
        }
        Ok(())
    }
}

impl Reservation {
    /// Takes over `other`'s bytes (of the same budget).
    fn absorb(&mut self, mut other: Reservation) {
        debug_assert!(Arc::ptr_eq(&self.inner, &other.inner), "reservations of one budget");
        self.bytes += std::mem::take(&mut other.bytes);
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Moves up to `bytes` of this reservation into a new one (for the slices of a batch).
    pub fn split(&mut self, bytes: u64) -> Reservation {
        let moved = bytes.min(self.bytes);
        self.bytes -= moved;
        Reservation { inner: self.inner.clone(), bytes: moved }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.inner.used.fetch_sub(self.bytes, Ordering::AcqRel);
        self.inner.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reservations_are_bounded_and_returned() {
        let budget = MemoryBudget::new(100, Duration::from_millis(10));
        let a = budget.try_reserve(60).unwrap();
        assert!(budget.try_reserve(60).is_none());
        assert!(budget.reserve(60).await.is_none(), "waits only as long as its patience");
        drop(a);
        assert_eq!(budget.used(), 0);
        let _b = budget.reserve(100).await.unwrap();
        assert!(budget.reserve(101).await.is_none());
    }

    #[tokio::test]
    async fn a_batch_larger_than_the_budget_is_refused_for_good_and_a_busy_budget_for_now() {
        let budget = MemoryBudget::new(100, Duration::from_millis(10));
        let error = budget.reserve_batch(101).await.unwrap_err();
        assert!(matches!(error, IngestError::BatchTooLarge { bytes: 101, limit: 100 }), "{error}");
        let mut held = budget.reserve_batch(100).await.unwrap();
        assert!(matches!(budget.reserve_batch(1).await, Err(IngestError::Overloaded)));
        let part = held.split(30);
        assert_eq!((part.bytes(), held.bytes(), budget.used()), (30, 70, 100));
        drop(held);
        assert_eq!(budget.used(), 30, "a split part keeps its bytes until it is dropped");
        drop(part);
        assert_eq!(budget.used(), 0);
        let mut dictionaries = None;
        budget.resize(&mut dictionaries, 60).await.unwrap();
        budget.resize(&mut dictionaries, 90).await.unwrap();
        assert_eq!((dictionaries.as_ref().unwrap().bytes(), budget.used()), (90, 90));
        assert!(matches!(budget.resize(&mut dictionaries, 150).await, Err(IngestError::Overloaded)));
        budget.resize(&mut dictionaries, 20).await.unwrap();
        assert_eq!(budget.used(), 20);
        drop(dictionaries);
        assert_eq!(budget.used(), 0);
        // A body's room covers the batch read from it, and grows when the batch needs more.
        let body = budget.reserve_batch(40).await.unwrap();
        let batch = budget.top_up(Some(body), 30).await.unwrap();
        assert_eq!((batch.bytes(), budget.used()), (40, 40));
        let batch = budget.top_up(Some(batch), 70).await.unwrap();
        assert_eq!((batch.bytes(), budget.used()), (70, 70));
        assert!(matches!(budget.top_up(Some(batch), 101).await, Err(IngestError::BatchTooLarge { .. })));
        assert_eq!(budget.used(), 0, "a refused top-up gives the room it had back");
    }

    #[tokio::test]
    async fn a_waiter_gets_room_when_it_is_released() {
        let budget = MemoryBudget::new(100, Duration::from_secs(5));
        let held = budget.try_reserve(100).unwrap();
        let waiter = tokio::spawn({
            let budget = budget.clone();
            async move { budget.reserve(50).await.is_some() }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        assert!(waiter.await.unwrap());
    }
}
