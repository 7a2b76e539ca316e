//! Incremental Arrow IPC decoding: bytes in as they arrive, record batches out, nothing buffered whole.
//!
//! The IPC file format is the stream format between a preamble (`ARROW1`, zero-padded: to 8 bytes by
//! the spec, to 64 by arrow-rs) and a footer, so both are decoded with arrow-ipc's push
//! [`StreamDecoder`]; the file's footer (an index for random access) is skipped, and only its closing
//! magic is checked to catch truncation.

use arrow::array::RecordBatch;
use arrow::buffer::Buffer;
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use arrow_ipc::reader::StreamDecoder;
use bytes::Bytes;

use crate::error::IngestError;

const FILE_MAGIC: &[u8; 6] = b"ARROW1";

/// Which IPC format a request declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpcFormat {
    Stream,
    File,
    /// Not declared: recognise a file by its magic, otherwise read a stream.
    Detect,
}

impl IpcFormat {
    /// Maps a `Content-Type` header (parameters ignored) to a format.
    pub fn from_content_type(content_type: Option<&str>) -> Result<Self, IngestError> {
        let Some(raw) = content_type else {
            return Ok(Self::Detect);
        };
        let essence = raw.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        match essence.as_str() {
            "application/vnd.apache.arrow.stream" => Ok(Self::Stream),
            "application/vnd.apache.arrow.file" => Ok(Self::File),
            "" | "application/octet-stream" => Ok(Self::Detect),
            _ => Err(IngestError::UnsupportedMediaType(raw.to_owned())),
        }
    }
}

/// Push decoder for one request body.
pub struct IpcDecoder {
    decoder: StreamDecoder,
    framing: Framing,
    /// Bytes consumed since the last record batch came out: the size of the message being assembled.
    pending: u64,
    max_message_bytes: u64,
    /// Body bytes pushed so far.
    bytes_seen: u64,
}

enum Framing {
    /// Collecting the first bytes to tell a file from a stream.
    Preamble { declared: IpcFormat, seen: Vec<u8> },
    /// After a file's magic: zero padding until the first message, which never starts with a zero byte.
    FilePadding,
    /// Reading messages; `file` once a file preamble was seen.
    Messages { file: bool },
    /// After a file's end-of-stream marker: the footer, of which only the last 6 bytes matter.
    Footer { tail: Vec<u8> },
}

impl IpcDecoder {
    pub fn new(format: IpcFormat, max_message_bytes: u64) -> Self {
        let framing = match format {
            IpcFormat::Stream => Framing::Messages { file: false },
            declared => Framing::Preamble { declared, seen: Vec::with_capacity(FILE_MAGIC.len()) },
        };
        Self { decoder: StreamDecoder::new(), framing, pending: 0, max_message_bytes, bytes_seen: 0 }
    }

    /// The stream's schema, once its first message has arrived.
    pub fn schema(&self) -> Option<SchemaRef> {
        self.decoder.schema()
    }

    /// Feeds the next bytes of the body, appending every completed record batch to `out`.
    pub fn push(&mut self, chunk: Bytes, out: &mut Vec<RecordBatch>) -> Result<(), IngestError> {
        self.bytes_seen += chunk.len() as u64;
        self.feed(chunk, out)
    }

    fn feed(&mut self, chunk: Bytes, out: &mut Vec<RecordBatch>) -> Result<(), IngestError> {
        let chunk = match &mut self.framing {
            Framing::Preamble { declared, seen } => {
                let take = (FILE_MAGIC.len() - seen.len()).min(chunk.len());
                seen.extend_from_slice(&chunk[..take]);
                if seen.len() < FILE_MAGIC.len() {
                    return Ok(());
                }
                if seen.as_slice() == FILE_MAGIC {
                    self.framing = Framing::FilePadding;
                    return self.feed(chunk.slice(take..), out);
                } else if *declared == IpcFormat::File {
                    return Err(IngestError::InvalidIpc("not an Arrow IPC file: it does not start with ARROW1".into()));
                }
                // A stream after all: its first bytes are ordinary message bytes.
                let mut all = std::mem::take(seen);
                all.extend_from_slice(&chunk[take..]);
                self.framing = Framing::Messages { file: false };
                Bytes::from(all)
            }
            Framing::FilePadding => {
                let Some(start) = chunk.iter().position(|&b| b != 0) else {
                    return Ok(());
                };
                self.framing = Framing::Messages { file: true };
                chunk.slice(start..)
            }
            Framing::Footer { tail } => {
                keep_tail(tail, &chunk);
                return Ok(());
            }
            Framing::Messages { .. } => chunk,
        };
        self.decode(chunk, out)
    }

    fn decode(&mut self, chunk: Bytes, out: &mut Vec<RecordBatch>) -> Result<(), IngestError> {
        let is_file = matches!(self.framing, Framing::Messages { file: true });
        let mut buffer = Buffer::from(chunk);
        while !buffer.is_empty() {
            let before = buffer.len();
            let decoded = self.decoder.decode(&mut buffer);
            self.pending += (before - buffer.len()) as u64;
            match decoded {
                Ok(Some(batch)) => {
                    self.pending = 0;
                    out.push(batch);
                }
                Ok(None) => {}
                Err(error) if is_after_end_of_stream(&error) => {
                    if !is_file {
                        return Err(IngestError::InvalidIpc("data after the end-of-stream marker".into()));
                    }
                    let mut tail = Vec::with_capacity(FILE_MAGIC.len());
                    keep_tail(&mut tail, &buffer);
                    self.framing = Framing::Footer { tail };
                    return Ok(());
                }
                Err(error) => return Err(IngestError::InvalidIpc(error.to_string())),
            }
            if self.pending > self.max_message_bytes {
                return Err(IngestError::MessageTooLarge { limit: self.max_message_bytes });
            }
        }
        Ok(())
    }

    /// Checks that the body ended on a message boundary (and, for files, with the closing magic).
    pub fn finish(&mut self) -> Result<(), IngestError> {
        match &self.framing {
            Framing::Preamble { seen, .. } if seen.is_empty() => Err(IngestError::EmptyBody),
            Framing::Preamble { .. } => Err(IngestError::InvalidIpc("body too short to be Arrow IPC".into())),
            Framing::FilePadding | Framing::Messages { file: true } => {
                Err(IngestError::InvalidIpc("the IPC file ended before its end-of-stream marker".into()))
            }
            Framing::Messages { file: false } if self.bytes_seen == 0 => Err(IngestError::EmptyBody),
            Framing::Messages { file: false } => self
                .decoder
                .finish()
                .map_err(|_| IngestError::InvalidIpc("the body ended in the middle of a message".into())),
            Framing::Footer { tail } if tail.as_slice() == FILE_MAGIC => Ok(()),
            Framing::Footer { .. } => Err(IngestError::InvalidIpc("the IPC file's footer is truncated".into())),
        }
    }
}

/// arrow-ipc reports bytes after the end-of-stream marker this way (pinned by a test below).
fn is_after_end_of_stream(error: &ArrowError) -> bool {
    matches!(error, ArrowError::IpcError(message) if message == "Unexpected EOS")
}

/// Keeps the last `FILE_MAGIC.len()` bytes seen.
fn keep_tail(tail: &mut Vec<u8>, bytes: &[u8]) {
    tail.extend_from_slice(&bytes[bytes.len().saturating_sub(FILE_MAGIC.len())..]);
    let excess = tail.len().saturating_sub(FILE_MAGIC.len());
    tail.drain(..excess);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int32Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow_ipc::writer::{FileWriter, StreamWriter};

    use super::*;

    fn batch(n: i32) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int32, false),
            Field::new("name", DataType::Utf8, true),
        ]));
        let ids = Int32Array::from_iter_values(0..n);
        let names = StringArray::from_iter((0..n).map(|i| Some(format!("row {i}"))));
        RecordBatch::try_new(schema, vec![Arc::new(ids), Arc::new(names)]).unwrap()
    }

    fn stream_bytes(batches: &[RecordBatch]) -> Vec<u8> {
        let mut writer = StreamWriter::try_new(Vec::new(), &batches[0].schema()).unwrap();
        batches.iter().for_each(|b| writer.write(b).unwrap());
        writer.into_inner().unwrap()
    }

    fn file_bytes(batches: &[RecordBatch]) -> Vec<u8> {
        let mut writer = FileWriter::try_new(Vec::new(), &batches[0].schema()).unwrap();
        batches.iter().for_each(|b| writer.write(b).unwrap());
        writer.into_inner().unwrap()
    }

    /// Feeds `bytes` in pieces of `step` bytes; returns the decoded rows or the error.
    fn decode(format: IpcFormat, bytes: &[u8], step: usize) -> Result<usize, IngestError> {
        let mut decoder = IpcDecoder::new(format, 1 << 20);
        let mut out = Vec::new();
        for piece in bytes.chunks(step) {
            decoder.push(Bytes::copy_from_slice(piece), &mut out)?;
        }
        decoder.finish()?;
        Ok(out.iter().map(RecordBatch::num_rows).sum())
    }

    #[test]
    fn stream_and_file_decode_in_any_piece_size() {
        let batches = [batch(10), batch(5)];
        for step in [1, 3, 7, 64, 100_000] {
            assert_eq!(decode(IpcFormat::Stream, &stream_bytes(&batches), step).unwrap(), 15);
            assert_eq!(decode(IpcFormat::Detect, &stream_bytes(&batches), step).unwrap(), 15);
            assert_eq!(decode(IpcFormat::File, &file_bytes(&batches), step).unwrap(), 15);
            assert_eq!(decode(IpcFormat::Detect, &file_bytes(&batches), step).unwrap(), 15);
        }
    }

    #[test]
    fn truncation_is_detected_everywhere() {
        let stream = stream_bytes(&[batch(10)]);
        let file = file_bytes(&[batch(10)]);
        // Cut inside the schema, inside the batch, and (for the file) inside the footer.
        for cut in [3, 40, stream.len() - 20] {
            assert!(matches!(decode(IpcFormat::Stream, &stream[..cut], 16), Err(IngestError::InvalidIpc(_))));
        }
        for cut in [3, 40, file.len() - 100, file.len() - 2] {
            assert!(matches!(decode(IpcFormat::File, &file[..cut], 16), Err(IngestError::InvalidIpc(_))), "{cut}");
        }
    }

    #[test]
    fn garbage_and_empty_bodies_are_refused() {
        assert!(matches!(decode(IpcFormat::Stream, b"hello, this is not arrow", 8), Err(IngestError::InvalidIpc(_))));
        assert!(matches!(decode(IpcFormat::File, b"PARQUET1xxxxxxx", 8), Err(IngestError::InvalidIpc(_))));
        assert!(matches!(decode(IpcFormat::Stream, b"", 8), Err(IngestError::EmptyBody)));
        let mut trailing = stream_bytes(&[batch(1)]);
        trailing.extend_from_slice(b"junk");
        assert!(matches!(decode(IpcFormat::Stream, &trailing, 8), Err(IngestError::InvalidIpc(_))));
    }

    #[test]
    fn oversized_messages_are_refused_before_they_are_buffered() {
        let bytes = stream_bytes(&[batch(100_000)]);
        let mut decoder = IpcDecoder::new(IpcFormat::Stream, 64 * 1024);
        let mut out = Vec::new();
        let result = bytes.chunks(16 * 1024).try_for_each(|p| decoder.push(Bytes::copy_from_slice(p), &mut out));
        assert!(matches!(result, Err(IngestError::MessageTooLarge { limit: 65536 })));
    }

    #[test]
    fn content_types() {
        use IpcFormat::*;
        assert_eq!(IpcFormat::from_content_type(Some("application/vnd.apache.arrow.stream")).unwrap(), Stream);
        assert_eq!(IpcFormat::from_content_type(Some("Application/Vnd.Apache.Arrow.File; x=y")).unwrap(), File);
        assert_eq!(IpcFormat::from_content_type(None).unwrap(), Detect);
        assert!(matches!(
            IpcFormat::from_content_type(Some("application/json")),
            Err(IngestError::UnsupportedMediaType(_))
        ));
    }
}
