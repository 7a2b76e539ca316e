//! Arrow IPC messages out of `FlightData`, their columns read in place.
//!
//! arrow-flight's `FlightDataDecoder` copies each record batch's body into a fresh buffer before reading
//! it. Bodies from [`super::receive`] already start aligned, so here arrow-ipc reads the columns straight
//! out of them (it still copies any column the producer misaligned).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::buffer::Buffer;
use arrow::datatypes::{Schema, SchemaRef};
use arrow_flight::FlightData;
use arrow_ipc::MessageHeader;
use arrow_ipc::reader::{read_dictionary, read_record_batch};

/// What one `FlightData` carried.
pub enum Payload {
    Schema(SchemaRef),
    Batch(RecordBatch),
    /// No rows: a dictionary (kept for the batches after it), or `app_metadata` alone.
    None,
}

/// Decodes one call's messages, keeping its schema and dictionaries.
#[derive(Default)]
pub struct MessageDecoder {
    schema: Option<SchemaRef>,
    dictionaries: HashMap<i64, ArrayRef>,
}

impl MessageDecoder {
    pub fn decode(&mut self, data: &FlightData) -> Result<Payload, String> {
        if data.data_header.is_empty() {
            // Metadata alone (pyarrow's `write_metadata`): no IPC message in it.
            return Ok(Payload::None);
        }
        let message =
            arrow_ipc::root_as_message(&data.data_header).map_err(|e| format!("invalid message header: {e}"))?;
        check_body(&message, data.data_body.len())?;
        // Zero-copy: the buffer shares the received body.
        let body = || Buffer::from(data.data_body.clone());
        match message.header_type() {
            MessageHeader::NONE => Ok(Payload::None),
            MessageHeader::Schema => {
                let schema = Arc::new(Schema::try_from(data).map_err(|e| format!("invalid schema message: {e}"))?);
                self.dictionaries.clear();
                self.schema = Some(schema.clone());
                Ok(Payload::Schema(schema))
            }
            MessageHeader::DictionaryBatch => {
                let schema = self.schema.as_ref().ok_or("a dictionary batch came before the schema")?;
                let batch = message.header_as_dictionary_batch().ok_or("a dictionary message without its batch")?;
                read_dictionary(&body(), batch, schema, &mut self.dictionaries, &message.version())
                    .map_err(|e| format!("invalid dictionary batch: {e}"))?;
                Ok(Payload::None)
            }
            MessageHeader::RecordBatch => {
                let schema = self.schema.clone().ok_or("a record batch came before the schema")?;
                let batch = message.header_as_record_batch().ok_or("a record batch message without its batch")?;
                read_record_batch(&body(), batch, schema, &self.dictionaries, None, &message.version())
                    .map(Payload::Batch)
                    .map_err(|e| format!("invalid record batch: {e}"))
            }
            other => Err(format!("unexpected IPC message: {}", other.variant_name().unwrap_or("unknown"))),
        }
    }
}

/// Checks that a message's body holds every buffer its header points at: arrow-ipc trusts the header and
/// panics on a body that is too short.
fn check_body(message: &arrow_ipc::Message, body_len: usize) -> Result<(), String> {
    let batch = match message.header_type() {
        MessageHeader::RecordBatch => message.header_as_record_batch(),
        MessageHeader::DictionaryBatch => message.header_as_dictionary_batch().and_then(|d| d.data()),
        _ => return Ok(()),
    };
    let batch = batch.ok_or("a batch message without its batch header")?;
    let body_len = body_len as i64;
    if !(0..=body_len).contains(&message.bodyLength()) {
        return Err(format!("the message body has {body_len} bytes but its header says {}", message.bodyLength()));
    }
    for buffer in batch.buffers().iter().flatten() {
        let in_body = buffer.offset() >= 0
            && buffer.length() >= 0
            && buffer.offset().checked_add(buffer.length()).is_some_and(|end| end <= body_len);
        if !in_body {
            return Err(format!(
                "a buffer at {}+{} lies outside the {body_len}-byte message body",
                buffer.offset(),
                buffer.length()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use arrow::array::{DictionaryArray, Int64Array, StringArray};
    use arrow::datatypes::Int32Type;
    use arrow_flight::encode::{DictionaryHandling, FlightDataEncoderBuilder};
    use futures::TryStreamExt;
    use prost::Message;

    use super::*;

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
        let mut decoder = MessageDecoder::default();
        let mut batches = Vec::new();
        for message in received(&sent) {
            match decoder.decode(&message).unwrap() {
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
    fn messages_out_of_order_or_malformed_are_errors() {
        let messages = received(&batch());
        let batch_message = messages.last().unwrap();
        let error = MessageDecoder::default().decode(batch_message).err().unwrap();
        assert!(error.contains("before the schema"), "{error}");
        let garbage = FlightData { data_header: vec![7; 40].into(), ..FlightData::default() };
        assert!(MessageDecoder::default().decode(&garbage).is_err());
        let mut short = batch_message.clone();
        short.data_body = short.data_body.slice(..16);
        assert!(MessageDecoder::default().decode(&short).err().unwrap().contains("message body"));
        let metadata_only =
            FlightData { app_metadata: b"{\"request_id\": 1}".to_vec().into(), ..FlightData::default() };
        assert!(matches!(MessageDecoder::default().decode(&metadata_only), Ok(Payload::None)));
    }
}
