//! What the fuzz targets feed the decoders, and the seeds they start from: one copy, shared by the fuzz
//! crate (`src/lib.rs`) and the ingester's regression test (`ingestor/tests/fuzz_regressions.rs`, which
//! includes this file with `#[path]`). Only the crates the ingester itself depends on are used here.
//!
//! - `http_ipc`: an HTTP request body, framed by `arrowport::transport::http::framing::IpcDecoder` and decoded by
//!   `arrowport::ipc::MessageDecoder`, as the HTTP ingest path does. The input's first three bytes are
//!   not body: byte 0 picks the declared format (`% 3`: stream, file, undeclared) and bytes 1–2 (u16,
//!   little-endian) the size of the pieces the body arrives in (0: all at once).
//! - `flight_message`: a DoPut stream, as `FlightData` protobufs, each prefixed by its varint length
//!   (prost's length-delimited encoding); each one's IPC message goes through one `MessageDecoder`, as
//!   the Flight ingest path does.
//!
//! Errors are expected answers; a panic, abort, allocation above the limits or hang is a bug. Both
//! drivers stop at the first error, as the server does.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, DictionaryArray, Float64Array, Int64Array, ListBuilder, RecordBatch, StringArray,
    StringBuilder, StructArray, TimestampMicrosecondArray,
};
use arrow::buffer::Buffer;
use arrow::datatypes::{DataType, Field, Int8Type, Int32Type};
use arrow::ipc::CompressionType;
use arrow::ipc::writer::{DictionaryHandling as WriterDictionaryHandling, FileWriter, IpcWriteOptions, StreamWriter};
use arrow_flight::FlightData;
use arrow_flight::encode::{DictionaryHandling, FlightDataEncoderBuilder};
use arrowport::error::IngestError;
use arrowport::ipc::{MessageDecoder, Payload, RawMessage};
use arrowport::transport::http::framing::{IpcDecoder, IpcFormat};
use bytes::Bytes;
use futures::TryStreamExt;
use prost::Message;

/// Most bytes one IPC message may have (the HTTP framing's limit): small, so that a length that would
/// make the decoder buffer gigabytes shows as an error.
pub const MAX_MESSAGE_BYTES: u64 = 1 << 20;
/// Most bytes one message may decode to (the memory budget's role): small for the same reason.
pub const MAX_DECODED_BYTES: u64 = 16 << 20;

/// A fuzz target: one input through the decoders.
pub type Target = fn(&[u8]) -> Outcome;

/// What decoding one input gave.
#[derive(Debug, Default)]
pub struct Outcome {
    /// IPC messages decoded.
    pub messages: usize,
    /// Rows in the record batches decoded.
    pub rows: usize,
    /// The error that ended decoding, if any.
    pub error: Option<String>,
}

impl Outcome {
    /// Checks and decodes one message, as the server does; every batch that comes out must be valid.
    fn take(&mut self, decoder: &mut MessageDecoder, message: &RawMessage) -> Result<(), IngestError> {
        decoder.check(message)?;
        if let Payload::Batch(batch) = decoder.decode(message)? {
            // A batch the decoder accepts goes to DuckDB through the C data interface: it must be valid.
            let rows = batch.num_rows();
            if let Err(error) = StructArray::from(batch).into_data().validate_full() {
                panic!("the decoder accepted an invalid record batch: {error}");
            }
            self.rows += rows;
        }
        self.messages += 1;
        Ok(())
    }

    fn ended(mut self, result: Result<(), IngestError>) -> Self {
        self.error = result.err().map(|error| error.to_string());
        self
    }
}

/// The first bytes of an `http_ipc` input, which say how its body is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpSetup {
    pub format: IpcFormat,
    /// Bytes per piece pushed into the decoder; 0: the whole body at once.
    pub chunk: u16,
}

impl HttpSetup {
    const LEN: usize = 3;

    /// The setup and the body, or `None` for an input too short to have a setup.
    pub fn parse(input: &[u8]) -> Option<(Self, &[u8])> {
        let (setup, body) = input.split_first_chunk::<{ Self::LEN }>()?;
        let format = match setup[0] % 3 {
            0 => IpcFormat::Stream,
            1 => IpcFormat::File,
            _ => IpcFormat::Detect,
        };
        Some((Self { format, chunk: u16::from_le_bytes([setup[1], setup[2]]) }, body))
    }

    /// An `http_ipc` input: this setup, then `body`.
    pub fn input(self, body: &[u8]) -> Vec<u8> {
        let format = match self.format {
            IpcFormat::Stream => 0,
            IpcFormat::File => 1,
            IpcFormat::Detect => 2,
        };
        let mut input = vec![format];
        input.extend_from_slice(&self.chunk.to_le_bytes());
        input.extend_from_slice(body);
        input
    }
}

/// The `http_ipc` target: an HTTP body through `IpcDecoder` and `MessageDecoder`.
pub fn http_ipc(input: &[u8]) -> Outcome {
    let Some((setup, body)) = HttpSetup::parse(input) else {
        return Outcome::default();
    };
    let mut outcome = Outcome::default();
    let result = (|| {
        let mut framing = IpcDecoder::new(setup.format, MAX_MESSAGE_BYTES);
        let mut decoder = MessageDecoder::new(MAX_DECODED_BYTES);
        let chunk = if setup.chunk == 0 { body.len().max(1) } else { usize::from(setup.chunk) };
        for piece in body.chunks(chunk) {
            framing.push(Bytes::copy_from_slice(piece));
            while let Some(message) = framing.next_message()? {
                outcome.take(&mut decoder, &message)?;
            }
        }
        framing.finish()
    })();
    outcome.ended(result)
}

/// The `flight_message` target: length-delimited `FlightData` messages through one `MessageDecoder`.
pub fn flight_message(input: &[u8]) -> Outcome {
    let mut outcome = Outcome::default();
    let result = (|| {
        // Decoded from `Bytes`, as the server does: header and body share the input, unaligned.
        let mut rest = Bytes::copy_from_slice(input);
        let mut decoder = MessageDecoder::new(MAX_DECODED_BYTES);
        while !rest.is_empty() {
            let data = FlightData::decode_length_delimited(&mut rest)
                .map_err(|e| IngestError::InvalidIpc(format!("not a FlightData message: {e}")))?;
            let message = RawMessage { header: data.data_header.clone(), body: Buffer::from(data.data_body.clone()) };
            outcome.take(&mut decoder, &message)?;
        }
        Ok(())
    })();
    outcome.ended(result)
}

/// A valid input for a target, and the rows it carries.
pub struct Seed {
    pub name: String,
    pub input: Vec<u8>,
    pub rows: usize,
}

/// Rows per batch of each seed stream: small streams (quick to mutate) and a few hundred rows.
const SEED_SHAPES: [(&str, &[usize]); 2] = [("small", &[4, 6]), ("rows", &[300, 200])];
const COMPRESSIONS: [(&str, Option<CompressionType>); 3] =
    [("plain", None), ("zstd", Some(CompressionType::ZSTD)), ("lz4", Some(CompressionType::LZ4_FRAME))];

const KINDS: [&str; 4] = ["alpha", "beta", "gamma", "delta"];

/// A batch with dictionary-encoded, string, list, struct (with a nested dictionary), boolean and
/// timestamp columns. Its dictionaries depend only on `rows` (at least 4), so batches of one stream share
/// them (the IPC file format cannot replace a dictionary).
pub fn seed_batch(rows: usize, first_id: i64) -> RecordBatch {
    let ids = Int64Array::from_iter_values((0..rows as i64).map(|i| first_id + i));
    let names =
        StringArray::from_iter((0..rows).map(|i| (i % 7 != 3).then(|| format!("row {i}, ü {}", "x".repeat(i % 5)))));
    let kinds: DictionaryArray<Int32Type> = (0..rows).map(|i| KINDS[i % KINDS.len()]).collect();
    let mut tags = ListBuilder::new(StringBuilder::new());
    for i in 0..rows {
        if i % 6 == 5 {
            tags.append_null();
        } else {
            (0..i % 4).for_each(|t| tags.values().append_value(format!("tag{t}")));
            tags.append(true);
        }
    }
    let x = Float64Array::from_iter_values((0..rows).map(|i| i as f64 / 4.0));
    let side: DictionaryArray<Int8Type> = (0..rows).map(|i| ["left", "right"][i % 2]).collect();
    let point = StructArray::from(vec![
        (Arc::new(Field::new("x", DataType::Float64, false)), Arc::new(x) as ArrayRef),
        (Arc::new(Field::new("side", side.data_type().clone(), false)), Arc::new(side) as ArrayRef),
    ]);
    let flags = BooleanArray::from_iter((0..rows).map(|i| (i % 9 != 0).then_some(i % 2 == 0)));
    let at =
        TimestampMicrosecondArray::from_iter_values((0..rows as i64).map(|i| 1_700_000_000_000_000 + i * 1_000_000))
            .with_timezone("UTC");
    // Every column nullable, whether this batch has nulls or not: one schema for every batch.
    RecordBatch::try_from_iter_with_nullable([
        ("id", Arc::new(ids) as ArrayRef, true),
        ("name", Arc::new(names) as ArrayRef, true),
        ("kind", Arc::new(kinds) as ArrayRef, true),
        ("tags", Arc::new(tags.finish()) as ArrayRef, true),
        ("point", Arc::new(point) as ArrayRef, true),
        ("flag", Arc::new(flags) as ArrayRef, true),
        ("at", Arc::new(at) as ArrayRef, true),
    ])
    .expect("a valid seed batch")
}

fn seed_batches(rows: &[usize]) -> Vec<RecordBatch> {
    let mut first_id = 0;
    rows.iter()
        .map(|&n| {
            let batch = seed_batch(n, first_id);
            first_id += n as i64;
            batch
        })
        .collect()
}

/// Batches whose dictionary grows from one to the next (a prefix of the next), so that a writer that
/// sends deltas (`DictionaryHandling::Delta`, pyarrow's `emit_dictionary_deltas`) sends only new values.
fn growing_dictionary_batches() -> Vec<RecordBatch> {
    (2..=KINDS.len())
        .map(|distinct| {
            let ids = Int64Array::from_iter_values(0..8);
            let kinds: DictionaryArray<Int32Type> = (0..8).map(|i| KINDS[i % distinct]).collect();
            RecordBatch::try_from_iter([("id", Arc::new(ids) as ArrayRef), ("kind", Arc::new(kinds) as ArrayRef)])
                .expect("a valid seed batch")
        })
        .collect()
}

fn write_options(compression: Option<CompressionType>) -> IpcWriteOptions {
    IpcWriteOptions::default().try_with_compression(compression).expect("arrow-ipc built with zstd and lz4")
}

fn stream_bytes(batches: &[RecordBatch], options: IpcWriteOptions) -> Vec<u8> {
    let mut writer = StreamWriter::try_new_with_options(Vec::new(), &batches[0].schema(), options).expect("a writer");
    batches.iter().for_each(|batch| writer.write(batch).expect("a seed batch written"));
    writer.into_inner().expect("a finished stream")
}

fn file_bytes(batches: &[RecordBatch], options: IpcWriteOptions) -> Vec<u8> {
    let mut writer = FileWriter::try_new_with_options(Vec::new(), &batches[0].schema(), options).expect("a writer");
    batches.iter().for_each(|batch| writer.write(batch).expect("a seed batch written"));
    writer.into_inner().expect("a finished file")
}

fn total_rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(RecordBatch::num_rows).sum()
}

/// Seeds for `http_ipc`: streams and files, plain and compressed, declared and detected, sent whole and
/// in pieces; and streams with delta dictionaries.
pub fn http_seeds() -> Vec<Seed> {
    let mut seeds = Vec::new();
    for (shape, rows) in SEED_SHAPES {
        let batches = seed_batches(rows);
        for (index, (compression_name, compression)) in COMPRESSIONS.into_iter().enumerate() {
            let chunk = [0, 7, 1000][index];
            let stream = stream_bytes(&batches, write_options(compression));
            let file = file_bytes(&batches, write_options(compression));
            for (kind, format, body) in [
                ("stream", IpcFormat::Stream, &stream),
                ("stream-detected", IpcFormat::Detect, &stream),
                ("file", IpcFormat::File, &file),
                ("file-detected", IpcFormat::Detect, &file),
            ] {
                seeds.push(Seed {
                    name: format!("{kind}-{compression_name}-{shape}"),
                    input: HttpSetup { format, chunk }.input(body),
                    rows: total_rows(&batches),
                });
            }
        }
    }
    let batches = growing_dictionary_batches();
    for (compression_name, compression) in &COMPRESSIONS[..2] {
        let options = write_options(*compression).with_dictionary_handling(WriterDictionaryHandling::Delta);
        seeds.push(Seed {
            name: format!("stream-deltas-{compression_name}"),
            input: HttpSetup { format: IpcFormat::Stream, chunk: 5 }.input(&stream_bytes(&batches, options)),
            rows: total_rows(&batches),
        });
    }
    seeds
}

/// Seeds for `flight_message`: what a DoPut client sends (arrow-flight's encoder, dictionaries as
/// dictionary messages resent with each batch), plain and compressed; and delta dictionaries.
pub fn flight_seeds() -> Vec<Seed> {
    let mut seeds = Vec::new();
    for (shape, rows) in SEED_SHAPES {
        let batches = seed_batches(rows);
        for (compression_name, compression) in COMPRESSIONS {
            let encoder = FlightDataEncoderBuilder::new()
                .with_options(write_options(compression))
                .with_dictionary_handling(DictionaryHandling::Resend)
                .build(futures::stream::iter(batches.clone().into_iter().map(Ok)));
            let messages: Vec<FlightData> = futures::executor::block_on(encoder.try_collect()).expect("encoded");
            let input = messages.iter().flat_map(|message| message.encode_length_delimited_to_vec()).collect();
            seeds.push(Seed { name: format!("doput-{compression_name}-{shape}"), input, rows: total_rows(&batches) });
        }
    }
    // arrow-flight's encoder never sends delta dictionaries, but pyarrow can: the IPC stream's messages,
    // each as the FlightData that carries it.
    let batches = growing_dictionary_batches();
    let options = write_options(None).with_dictionary_handling(WriterDictionaryHandling::Delta);
    let mut framing = IpcDecoder::new(IpcFormat::Stream, MAX_MESSAGE_BYTES);
    framing.push(Bytes::from(stream_bytes(&batches, options)));
    let mut input = Vec::new();
    while let Some(message) = framing.next_message().expect("a valid stream") {
        let body = Bytes::copy_from_slice(message.body.as_slice());
        let data = FlightData { data_header: message.header, data_body: body, ..FlightData::default() };
        input.extend(data.encode_length_delimited_to_vec());
    }
    seeds.push(Seed { name: "doput-deltas".into(), input, rows: total_rows(&batches) });
    seeds
}
