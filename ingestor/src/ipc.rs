//! Arrow IPC messages, checked before they are decoded: the one decoder HTTP and Flight share.
//!
//! A message is a flatbuffer header and a body. arrow-ipc trusts the header: it allocates a compressed
//! buffer's declared size before decompressing (`arrow_ipc::compression::decompress_zstd`/`decompress_lz4`
//! call `Vec::with_capacity` with the 8-byte prefix), slices buffers at the header's offsets
//! (`Buffer::slice_with_length` asserts), and panics on malformed schemas (`arrow_ipc::convert::fb_to_schema`
//! unwraps and calls `panic!`/`unimplemented!`). Those are upstream's to fix; until then every header is
//! checked here first — every buffer lies inside the body, every declared decompressed size is sane and
//! adds up to at most [`MessageDecoder::new`]'s limit — and the decoding itself runs under
//! `catch_unwind`, so that whatever is left becomes an `invalid_ipc` answer instead of a dead worker.
//! The check also tells the caller the decoded size *before* anything is allocated, so that memory is
//! reserved against the budget first.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::buffer::Buffer;
use arrow::datatypes::SchemaRef;
use arrow_ipc::reader::{read_dictionary, read_record_batch};
use arrow_ipc::{Endianness, Message, MessageHeader};
use bytes::Bytes;

use crate::error::IngestError;

/// A compressed buffer starts with its decompressed length; this one means "stored uncompressed".
const UNCOMPRESSED: i64 = -1;
/// Bytes of that length prefix.
const PREFIX: i64 = 8;

/// One IPC message as it arrived: its flatbuffer header and its body.
pub struct RawMessage {
    pub header: Bytes,
    pub body: Buffer,
}

/// What a message is, and how many bytes decoding it will allocate, read from its header alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    Schema,
    /// A dictionary batch; `dictionary_bytes` is what all the stream's dictionaries may take while it is
    /// decoded (a delta is appended to a copy of its dictionary, so deltas add up).
    Dictionary {
        dictionary_bytes: u64,
    },
    Batch {
        decoded_bytes: u64,
    },
    /// No IPC message (a header-less Flight message, or `MessageHeader::NONE`).
    Empty,
}

/// What one message carried.
pub enum Payload {
    Schema(SchemaRef),
    Batch(RecordBatch),
    /// No rows: a dictionary (kept for the batches after it), or nothing at all.
    None,
}

/// Decodes one stream's messages, keeping its schema and dictionaries.
pub struct MessageDecoder {
    schema: Option<SchemaRef>,
    dictionaries: HashMap<i64, ArrayRef>,
    /// Memory the dictionaries hold.
    dictionary_bytes: u64,
    /// Most bytes one message may decode to.
    max_decoded_bytes: u64,
}

impl MessageDecoder {
    /// A decoder that refuses any message decoding to more than `max_decoded_bytes` (the memory budget:
    /// a batch larger than all of it could never be taken).
    pub fn new(max_decoded_bytes: u64) -> Self {
        Self { schema: None, dictionaries: HashMap::new(), dictionary_bytes: 0, max_decoded_bytes }
    }

    /// Memory the stream's dictionaries hold now (they live as long as the stream).
    pub fn dictionary_bytes(&self) -> u64 {
        self.dictionary_bytes
    }

    /// The stream's schema, once its schema message was decoded.
    pub fn schema(&self) -> Option<&SchemaRef> {
        self.schema.as_ref()
    }

    /// Reads `message`'s header and checks it against its body; nothing is allocated.
    pub fn check(&self, message: &RawMessage) -> Result<Checked, IngestError> {
        if message.header.is_empty() {
            return Ok(Checked::Empty);
        }
        let header = parse(&message.header)?;
        let checked = match header.header_type() {
            MessageHeader::NONE => Checked::Empty,
            MessageHeader::Schema => Checked::Schema,
            MessageHeader::DictionaryBatch => {
                // Until it is decoded, the old dictionaries stay; a delta is appended to a copy of its own.
                let dictionary = header.header_as_dictionary_batch();
                let copied = match dictionary.filter(|d| d.isDelta()).and_then(|d| self.dictionaries.get(&d.id())) {
                    Some(existing) => existing.get_array_memory_size() as u64,
                    None => 0,
                };
                let decoded = decoded_bytes(&header, &message.body)?;
                Checked::Dictionary { dictionary_bytes: self.dictionary_bytes + copied + decoded }
            }
            MessageHeader::RecordBatch => Checked::Batch { decoded_bytes: decoded_bytes(&header, &message.body)? },
            other => return Err(invalid(format!("unexpected IPC message {}", other.variant_name().unwrap_or("?")))),
        };
        if let Checked::Dictionary { dictionary_bytes: decoded_bytes } | Checked::Batch { decoded_bytes } = checked
            && decoded_bytes > self.max_decoded_bytes
        {
            return Err(IngestError::BatchTooLarge { bytes: decoded_bytes, limit: self.max_decoded_bytes });
        }
        Ok(checked)
    }

    /// Decodes a message that [`check`](Self::check) accepted.
    pub fn decode(&mut self, message: &RawMessage) -> Result<Payload, IngestError> {
        if message.header.is_empty() {
            return Ok(Payload::None);
        }
        let header = parse(&message.header)?;
        let version = header.version();
        match header.header_type() {
            MessageHeader::Schema => {
                let schema = header.header_as_schema().ok_or_else(|| invalid("a schema message without its schema"))?;
                if schema.endianness() != Endianness::Little {
                    return Err(invalid("big-endian data is not supported"));
                }
                if schema.fields().is_none() {
                    return Err(invalid("a schema message without fields"));
                }
                let schema = unwound("schema", || Ok(arrow_ipc::convert::fb_to_schema(schema)))?;
                let schema = Arc::new(schema);
                self.dictionaries.clear();
                self.dictionary_bytes = 0;
                self.schema = Some(schema.clone());
                Ok(Payload::Schema(schema))
            }
            MessageHeader::DictionaryBatch => {
                let schema = self.schema.clone().ok_or_else(|| invalid("a dictionary batch came before the schema"))?;
                let batch =
                    header.header_as_dictionary_batch().ok_or_else(|| invalid("a dictionary without its batch"))?;
                let dictionaries = &mut self.dictionaries;
                unwound("dictionary batch", || read_dictionary(&message.body, batch, &schema, dictionaries, &version))?;
                self.dictionary_bytes = self.dictionaries.values().map(|d| d.get_array_memory_size() as u64).sum();
                Ok(Payload::None)
            }
            MessageHeader::RecordBatch => {
                let schema = self.schema.clone().ok_or_else(|| invalid("a record batch came before the schema"))?;
                let batch =
                    header.header_as_record_batch().ok_or_else(|| invalid("a record batch without its batch"))?;
                let dictionaries = &self.dictionaries;
                unwound("record batch", || {
                    read_record_batch(&message.body, batch, schema, dictionaries, None, &version)
                })
                .map(Payload::Batch)
            }
            _ => Ok(Payload::None),
        }
    }
}

fn parse(header: &[u8]) -> Result<Message<'_>, IngestError> {
    arrow_ipc::root_as_message(header).map_err(|e| invalid(format!("invalid message header: {e}")))
}

fn invalid(message: impl Into<String>) -> IngestError {
    IngestError::InvalidIpc(message.into())
}

/// Runs one arrow-ipc decoding step; its errors and any panic it still has become `invalid_ipc`.
fn unwound<T>(what: &str, decode: impl FnOnce() -> Result<T, arrow::error::ArrowError>) -> Result<T, IngestError> {
    match catch_unwind(AssertUnwindSafe(decode)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(invalid(format!("invalid {what}: {error}"))),
        Err(_) => Err(invalid(format!("malformed {what}"))),
    }
}

/// Checks that every buffer of a batch message lies inside `body`, and returns the bytes its columns
/// take once decoded: the buffers' lengths, or for a compressed batch their declared decompressed
/// lengths (each checked to be a length, not a bomb: the total is compared with the limit by the caller).
fn decoded_bytes(message: &Message, body: &Buffer) -> Result<u64, IngestError> {
    let (batch, compressed) = match message.header_type() {
        MessageHeader::RecordBatch => {
            let batch = message.header_as_record_batch();
            (batch, batch.and_then(|b| b.compression()).is_some())
        }
        _ => {
            let batch = message.header_as_dictionary_batch().and_then(|d| d.data());
            (batch, batch.and_then(|b| b.compression()).is_some())
        }
    };
    let batch = batch.ok_or_else(|| invalid("a batch message without its batch header"))?;
    let body_len = body.len() as i64;
    if !(0..=body_len).contains(&message.bodyLength()) {
        return Err(invalid(format!(
            "the message body has {body_len} bytes but its header says {}",
            message.bodyLength()
        )));
    }
    let mut total: u64 = 0;
    for buffer in batch.buffers().iter().flatten() {
        let (offset, length) = (buffer.offset(), buffer.length());
        let in_body = offset >= 0 && length >= 0 && offset.checked_add(length).is_some_and(|end| end <= body_len);
        if !in_body {
            return Err(invalid(format!(
                "a buffer at {offset}+{length} lies outside the {body_len}-byte message body"
            )));
        }
        let decoded = if !compressed || length == 0 {
            length
        } else if length < PREFIX {
            return Err(invalid(format!("a compressed buffer of {length} bytes has no length prefix")));
        } else {
            let start = offset as usize;
            let prefix: [u8; 8] = body[start..start + 8].try_into().expect("eight bytes");
            match i64::from_le_bytes(prefix) {
                UNCOMPRESSED => length - PREFIX,
                declared if declared >= 0 => declared,
                declared => return Err(invalid(format!("a compressed buffer declares {declared} bytes"))),
            }
        };
        total = total.saturating_add(decoded as u64);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use arrow::array::{DictionaryArray, Int64Array, StringArray};
    use arrow::datatypes::Int32Type;
    use arrow_ipc::CompressionType;
    use arrow_ipc::writer::{CompressionContext, DictionaryTracker, IpcDataGenerator, IpcWriteOptions};

    use super::*;

    fn batch(rows: i64) -> RecordBatch {
        let ids = Int64Array::from_iter_values(0..rows);
        let names = StringArray::from_iter_values((0..rows).map(|i| format!("row {i}")));
        let kinds: DictionaryArray<Int32Type> = (0..rows).map(|i| ["a", "b", "c"][i as usize % 3]).collect();
        RecordBatch::try_from_iter([
            ("id", Arc::new(ids) as ArrayRef),
            ("name", Arc::new(names) as ArrayRef),
            ("kind", Arc::new(kinds) as ArrayRef),
        ])
        .unwrap()
    }

    /// The schema message, the dictionary messages and the batch message, as a writer makes them.
    pub(crate) fn messages(batch: &RecordBatch, compression: Option<CompressionType>) -> Vec<RawMessage> {
        let options = IpcWriteOptions::default().try_with_compression(compression).unwrap();
        stream_messages(std::slice::from_ref(batch), &options)
    }

    /// The schema message, then each batch's dictionary messages and batch message.
    fn stream_messages(batches: &[RecordBatch], options: &IpcWriteOptions) -> Vec<RawMessage> {
        let generator = IpcDataGenerator::default();
        let mut tracker = DictionaryTracker::new(false);
        let schema = generator.schema_to_bytes_with_dictionary_tracker(&batches[0].schema(), &mut tracker, options);
        let mut context = CompressionContext::default();
        let raw = |header: Vec<u8>, body: Vec<u8>| RawMessage { header: header.into(), body: Buffer::from(body) };
        let mut out = vec![raw(schema.ipc_message, Vec::new())];
        for batch in batches {
            let (dictionaries, encoded) = generator.encode(batch, &mut tracker, options, &mut context).unwrap();
            out.extend(dictionaries.into_iter().map(|d| raw(d.ipc_message, d.arrow_data)));
            out.push(raw(encoded.ipc_message, encoded.arrow_data));
        }
        out
    }

    fn decode_all(decoder: &mut MessageDecoder, messages: &[RawMessage]) -> Result<Vec<RecordBatch>, IngestError> {
        let mut batches = Vec::new();
        for message in messages {
            decoder.check(message)?;
            if let Payload::Batch(batch) = decoder.decode(message)? {
                batches.push(batch);
            }
        }
        Ok(batches)
    }

    #[test]
    fn plain_and_compressed_batches_decode_with_their_dictionaries() {
        let sent = batch(1000);
        for compression in [None, Some(CompressionType::ZSTD), Some(CompressionType::LZ4_FRAME)] {
            let decoded = decode_all(&mut MessageDecoder::new(1 << 30), &messages(&sent, compression)).unwrap();
            assert_eq!(decoded, std::slice::from_ref(&sent), "{compression:?}");
        }
    }

    #[test]
    fn the_decoded_size_is_known_before_decoding() {
        let sent = batch(100_000);
        let messages = messages(&sent, Some(CompressionType::ZSTD));
        let last = messages.last().unwrap();
        let Checked::Batch { decoded_bytes } = MessageDecoder::new(1 << 30).check(last).unwrap() else {
            panic!("a batch message")
        };
        // The declared sizes are what decoding allocates: about the batch's own size, far above the body's.
        let actual = sent.get_array_memory_size() as u64;
        assert!(decoded_bytes > 4 * last.body.len() as u64, "{decoded_bytes} vs body {}", last.body.len());
        assert!(decoded_bytes <= actual && decoded_bytes * 2 > actual, "{decoded_bytes} vs {actual}");
    }

    /// The body of the batch message with its first buffer's declared length set to `declared`.
    fn with_declared_length(declared: i64) -> Vec<RawMessage> {
        let mut messages = messages(&batch(1000), Some(CompressionType::ZSTD));
        let last = messages.last_mut().unwrap();
        let header = parse(&last.header).unwrap();
        let first =
            header.header_as_record_batch().unwrap().buffers().unwrap().iter().find(|b| b.length() > 0).unwrap();
        let mut body = last.body.as_slice().to_vec();
        let start = first.offset() as usize;
        body[start..start + 8].copy_from_slice(&declared.to_le_bytes());
        last.body = Buffer::from(body);
        messages
    }

    #[test]
    fn a_compression_bomb_is_refused_before_anything_is_allocated() {
        let bomb = with_declared_length(1 << 40);
        let error = decode_all(&mut MessageDecoder::new(256 << 20), &bomb).unwrap_err();
        assert!(matches!(error, IngestError::BatchTooLarge { limit, .. } if limit == 256 << 20), "{error}");
        let negative = with_declared_length(-7);
        assert!(matches!(decode_all(&mut MessageDecoder::new(1 << 30), &negative), Err(IngestError::InvalidIpc(_))));
        // A declared length that is merely wrong is decoded and refused by arrow-ipc, not trusted.
        let wrong = with_declared_length(3);
        assert!(matches!(decode_all(&mut MessageDecoder::new(1 << 30), &wrong), Err(IngestError::InvalidIpc(_))));
    }

    #[test]
    fn dictionary_deltas_add_up_against_the_limit() {
        let dictionary = |values: Vec<String>| -> RecordBatch {
            let keys = arrow::array::Int32Array::from_iter_values(0..values.len() as i32);
            let array = DictionaryArray::new(keys, Arc::new(StringArray::from(values)));
            RecordBatch::try_from_iter([("kind", Arc::new(array) as ArrayRef)]).unwrap()
        };
        // Each batch's dictionary extends the one before by 20,000 64-byte values: a delta of ~1.3 MB.
        let batches: Vec<RecordBatch> =
            (1..=8).map(|b| dictionary((0..20_000 * b).map(|i| format!("{i:064}")).collect())).collect();
        let options = IpcWriteOptions::default().with_dictionary_handling(arrow_ipc::writer::DictionaryHandling::Delta);
        let messages = stream_messages(&batches, &options);
        // Every message alone is far below 8 MiB; the dictionaries together are not.
        let mut decoder = MessageDecoder::new(8 << 20);
        let error = decode_all(&mut decoder, &messages).unwrap_err();
        assert!(matches!(error, IngestError::BatchTooLarge { limit, .. } if limit == 8 << 20), "{error}");
        assert!(decoder.dictionary_bytes() <= 8 << 20);
        // With room for them, the same stream decodes.
        let decoded = decode_all(&mut MessageDecoder::new(1 << 30), &messages).unwrap();
        assert_eq!(decoded.len(), 8);
    }

    #[test]
    fn buffers_outside_the_body_and_short_bodies_are_refused() {
        let mut messages = messages(&batch(1000), None);
        let mut short = messages.pop().unwrap();
        short.body = short.body.slice_with_length(0, 16);
        let mut decoder = MessageDecoder::new(1 << 30);
        decode_all(&mut decoder, &messages).unwrap();
        let error = decoder.check(&short).unwrap_err();
        assert!(error.to_string().contains("message body"), "{error}");
    }

    #[test]
    fn out_of_order_and_malformed_messages_are_errors() {
        let all = messages(&batch(10), None);
        let mut decoder = MessageDecoder::new(1 << 30);
        let error = decoder.decode(all.last().unwrap()).err().unwrap();
        assert!(error.to_string().contains("before the schema"), "{error}");
        let garbage = RawMessage { header: vec![7; 40].into(), body: Buffer::from(Vec::<u8>::new()) };
        assert!(decoder.check(&garbage).is_err());
        let empty = RawMessage { header: Bytes::new(), body: Buffer::from(Vec::<u8>::new()) };
        assert_eq!(decoder.check(&empty).unwrap(), Checked::Empty);
        assert!(matches!(decoder.decode(&empty), Ok(Payload::None)));
    }
}
