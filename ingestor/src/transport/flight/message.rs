//! Flight messages as IPC messages, their bodies shared, not copied.
//!
//! arrow-flight's `FlightDataDecoder` copies each record batch's body into a fresh buffer before reading
//! it. Bodies from [`super::receive`] already start aligned, so [`crate::ipc`] reads the columns straight
//! out of them (arrow-ipc still copies any column the producer misaligned).

use arrow::buffer::Buffer;
use arrow_flight::FlightData;

use crate::ipc::RawMessage;

/// The IPC message a `FlightData` carries (none, if its header is empty: `app_metadata` alone).
pub fn raw_message(data: &FlightData) -> RawMessage {
    // Zero-copy: the buffer shares the received body.
    RawMessage { header: data.data_header.clone(), body: Buffer::from(data.data_body.clone()) }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, DictionaryArray, Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::Int32Type;
    use arrow_flight::encode::{DictionaryHandling, FlightDataEncoderBuilder};
    use futures::TryStreamExt;
    use prost::Message;

    use super::*;
    use crate::ipc::{MessageDecoder, Payload};

    fn batch() -> RecordBatch {
        let ids = Int64Array::from_iter_values(0..1000);
        let names = StringArray::from_iter_values((0..1000).map(|i| format!("row {i}")));
        let kinds: DictionaryArray<Int32Type> = (0..1000).map(|i| ["a", "b", "c"][i % 3]).collect();
        RecordBatch::try_from_iter([
            ("id", Arc::new(ids) as ArrayRef),
            ("name", Arc::new(names) as ArrayRef),
            ("kind", Arc::new(kinds) as ArrayRef),
        ])
        .unwrap()
    }

    /// The messages as the server receives them: encoded, then placed by `receive`.
    fn received(batch: &RecordBatch) -> Vec<FlightData> {
        // Dictionaries travel as dictionary messages, as pyarrow sends them.
        let encoder = FlightDataEncoderBuilder::new()
            .with_dictionary_handling(DictionaryHandling::Resend)
            .build(futures::stream::iter([Ok(batch.clone())]));
        let messages: Vec<FlightData> = futures::executor::block_on(encoder.try_collect()).unwrap();
        messages
            .iter()
            .map(|m| FlightData::decode(super::super::receive::aligned_copy(&m.encode_to_vec())).unwrap())
            .collect()
    }

    #[test]
    fn batches_are_read_in_place_with_their_dictionaries() {
        let sent = batch();
        let mut decoder = MessageDecoder::new(1 << 30);
        let mut batches = Vec::new();
        for message in received(&sent) {
            let raw = raw_message(&message);
            decoder.check(&raw).unwrap();
            match decoder.decode(&raw).unwrap() {
                Payload::Schema(schema) => assert_eq!(schema, sent.schema()),
                Payload::Batch(batch) => {
                    // The id column's values lie inside the received body: nothing was copied.
                    let body = message.data_body.as_ptr_range();
                    let ids = batch.column(0).to_data().buffers()[0].as_ptr();
                    assert!(body.contains(&ids), "the column was copied out of the body");
                    batches.push(batch);
                }
                Payload::None => {}
            }
        }
        assert_eq!(batches, [sent]);
    }

    #[test]
    fn metadata_alone_is_no_message() {
        let metadata_only =
            FlightData { app_metadata: b"{\"request_id\": 1}".to_vec().into(), ..FlightData::default() };
        let raw = raw_message(&metadata_only);
        assert!(raw.header.is_empty());
        assert!(matches!(MessageDecoder::new(1 << 30).decode(&raw), Ok(Payload::None)));
    }
}
