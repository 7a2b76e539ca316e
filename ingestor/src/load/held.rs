//! Room in the memory budget that lasts as long as the batch it covers.
//!
//! DuckDB's Arrow scan releases a batch only when it has read it (a batch per thread), well after it
//! pulled it from the session's stream: tying the batch's reservation to its buffers keeps the budget
//! counting what DuckDB still holds. Arrow makes a buffer with another owner an `unsafe` constructor.
#![allow(unsafe_code)]

use std::ptr::NonNull;
use std::sync::Arc;

use arrow::array::{ArrayData, RecordBatch, RecordBatchOptions, make_array};
use arrow::buffer::{BooleanBuffer, Buffer, NullBuffer};

use crate::budget::Reservation;

/// `batch` with `reservation` tied to its buffers: the room returns to the budget when DuckDB releases the
/// batch (its Arrow scan keeps a batch per thread while it reads it), not when it takes the batch.
pub fn holding(batch: &RecordBatch, reservation: Reservation) -> RecordBatch {
    let held = Arc::new(Held { _room: reservation });
    let columns = batch.columns().iter().map(|column| make_array(rewrap(column.to_data(), &held))).collect();
    let options = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    RecordBatch::try_new_with_options(batch.schema(), columns, &options).expect("the same columns, rewrapped")
}

/// A reservation as a buffer's owner. `Reservation` is not `RefUnwindSafe` (tokio's `Notify`), which an
/// owner must be; dropping it during an unwind only gives room back, so nothing is left inconsistent.
struct Held {
    _room: Reservation,
}

impl std::panic::RefUnwindSafe for Held {}

/// `data` whose buffers (its own, its null mask's and its children's) keep `held` alive, over the same bytes.
fn rewrap(data: ArrayData, held: &Arc<Held>) -> ArrayData {
    let wrap = |buffer: &Buffer| {
        let owner = Arc::new((buffer.clone(), held.clone()));
        let start = NonNull::new(buffer.as_ptr().cast_mut()).expect("a buffer's pointer is never null");
        // SAFETY: `owner` keeps the original buffer, and so the `len` bytes at `start`, alive and unchanged
        // for as long as the new buffer exists.
        unsafe { Buffer::from_custom_allocation(start, buffer.len(), owner) }
    };
    let buffers = data.buffers().iter().map(wrap).collect();
    let children = data.child_data().iter().map(|child| rewrap(child.clone(), held)).collect();
    let nulls = data.nulls().map(|nulls| {
        let bits = BooleanBuffer::new(wrap(nulls.buffer()), nulls.offset(), nulls.len());
        // SAFETY: the same bits and null count as before.
        unsafe { NullBuffer::new_unchecked(bits, nulls.null_count()) }
    });
    let builder = data.into_builder().buffers(buffers).child_data(children).nulls(nulls);
    // SAFETY: the same type, length, offsets and bytes as `data`, which was valid.
    unsafe { builder.build_unchecked() }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use arrow::array::RecordBatch;
    use arrow::array::{Array, Int64Array, ListArray, StringArray};
    use arrow::datatypes::Int64Type;

    use super::*;
    use crate::budget::MemoryBudget;

    #[test]
    fn the_room_returns_when_the_last_column_of_the_batch_is_dropped() {
        let budget = MemoryBudget::new(1 << 20, Duration::ZERO);
        let list = ListArray::from_iter_primitive::<Int64Type, _, _>([Some(vec![Some(1), None]), None, Some(vec![])]);
        let batch = RecordBatch::try_from_iter([
            ("id", Arc::new(Int64Array::from(vec![Some(1), None, Some(3)])) as _),
            ("name", Arc::new(StringArray::from(vec!["a", "bb", "ccc"])) as _),
            ("list", Arc::new(list) as _),
        ])
        .unwrap();
        let held = holding(&batch, budget.try_reserve(1000).unwrap());
        assert_eq!(held, batch, "the same values");
        assert_eq!(held.column(0).to_data().buffers()[0].as_ptr(), batch.column(0).to_data().buffers()[0].as_ptr());
        drop(batch);
        let (first, rest) = (held.column(0).clone(), held.column(2).clone());
        drop(held);
        assert_eq!(budget.used(), 1000, "columns still alive keep the room");
        drop(first);
        assert_eq!(rest.len(), 3);
        assert_eq!(budget.used(), 1000);
        drop(rest);
        assert_eq!(budget.used(), 0);
    }
}
