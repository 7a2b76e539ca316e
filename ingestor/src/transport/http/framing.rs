//! Incremental Arrow IPC framing: body bytes in as they arrive, whole messages out, nothing buffered
//! beyond the message being assembled. The messages are checked and decoded by [`crate::ipc`].
//!
//! A stream is a sequence of messages: a continuation marker (`0xFFFFFFFF`, absent in the pre-1.0
//! format), the header's length, the flatbuffer header, then the body whose length the header names; a
//! zero length ends the stream. The IPC file format is the same stream between a preamble (`ARROW1`,
//! zero-padded: to 8 bytes by the spec, to 64 by arrow-rs) and a footer; the footer (an index for random
//! access) is skipped, and only its closing magic is checked to catch truncation. Both lengths are
//! checked against `max_message_bytes` before a byte of the message is buffered.

use arrow::buffer::{Buffer, MutableBuffer};
use bytes::{Buf, Bytes};

use crate::error::IngestError;
use crate::ipc::RawMessage;

const FILE_MAGIC: &[u8; 6] = b"ARROW1";
/// Most zero bytes a file may have between its magic and its first message: writers pad the magic to
/// their alignment, at most 64 bytes.
const MAX_FILE_PADDING: usize = 64 - FILE_MAGIC.len();
const CONTINUATION: [u8; 4] = [0xFF; 4];

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

/// Splits one request body into IPC messages.
pub struct IpcDecoder {
    framing: Framing,
    /// Bytes pushed and not yet consumed.
    input: Bytes,
    max_message_bytes: u64,
    /// Body bytes pushed so far.
    bytes_seen: u64,
    /// Stop before allocating a body buffer until [`admit`](IpcDecoder::admit) is called.
    pause_before_bodies: bool,
}

enum Framing {
    /// Collecting the first bytes to tell a file from a stream.
    Preamble { declared: IpcFormat, seen: Vec<u8> },
    /// After a file's magic: zero padding until the first message, which never starts with a zero byte;
    /// how much so far.
    FilePadding { seen: usize },
    /// Reading messages; `file` once a file preamble was seen.
    Messages { file: bool, stage: Stage },
    /// After a stream's end-of-stream marker: nothing may follow.
    Ended,
    /// After a file's end-of-stream marker: the footer, of which only the last 6 bytes matter, and its
    /// length so far (a footer, a flatbuffer like any message header, is no longer than a message).
    Footer { tail: Vec<u8>, seen: u64 },
}

/// Where the message being read stands.
enum Stage {
    /// The continuation marker and length: 4 or 8 bytes.
    Prefix(Vec<u8>),
    /// The flatbuffer header, `len` bytes.
    Header { len: usize, bytes: Vec<u8> },
    /// The body, `len` bytes, to be buffered once [`IpcDecoder::admit`] allows it.
    Waiting { header: Bytes, len: usize },
    /// A body refused instead of admitted: `remaining` bytes to read past, keeping none.
    Skipping { remaining: usize },
    /// The body, `len` bytes, assembled in an aligned buffer.
    Body { header: Bytes, len: usize, body: MutableBuffer },
}

impl Stage {
    fn start() -> Self {
        Self::Prefix(Vec::with_capacity(8))
    }
}

impl IpcDecoder {
    pub fn new(format: IpcFormat, max_message_bytes: u64) -> Self {
        let framing = match format {
            IpcFormat::Stream => Framing::Messages { file: false, stage: Stage::start() },
            declared => Framing::Preamble { declared, seen: Vec::with_capacity(FILE_MAGIC.len()) },
        };
        Self { framing, input: Bytes::new(), max_message_bytes, bytes_seen: 0, pause_before_bodies: false }
    }

    /// Makes the decoder stop before it buffers a message body that did not arrive in one piece:
    /// [`next_message`](Self::next_message) then returns `None` and [`pending_body`](Self::pending_body)
    /// the body's length, so the caller can take room for it first and then call [`admit`](Self::admit).
    pub fn pausing_before_bodies(mut self) -> Self {
        self.pause_before_bodies = true;
        self
    }

    /// The length of the body waiting for [`admit`](Self::admit), if one is.
    pub fn pending_body(&self) -> Option<u64> {
        match &self.framing {
            Framing::Messages { stage: Stage::Waiting { len, .. }, .. } => Some(*len as u64),
            _ => None,
        }
    }

    /// Reads the waiting body past without keeping it (the request is refused, but its client is still
    /// sending the body and reads the answer only once it has); [`skipping`](Self::skipping) until done.
    pub fn skip_body(&mut self) {
        if let Framing::Messages { stage, .. } = &mut self.framing
            && let Stage::Waiting { len, .. } = stage
        {
            *stage = Stage::Skipping { remaining: *len };
        }
    }

    /// Whether a refused body is still being read past.
    pub fn skipping(&self) -> bool {
        matches!(self.framing, Framing::Messages { stage: Stage::Skipping { .. }, .. })
    }

    /// Lets the waiting body be buffered.
    pub fn admit(&mut self) {
        if let Framing::Messages { stage, .. } = &mut self.framing
            && let Stage::Waiting { header, len } = stage
        {
            let (header, len) = (std::mem::take(header), *len);
            *stage = Stage::Body { header, len, body: MutableBuffer::with_capacity(len) };
        }
    }

    /// Takes the next bytes of the body; call [`next_message`](Self::next_message) until it returns
    /// `None` (and [`admit`](Self::admit) a pending body) before pushing more.
    pub fn push(&mut self, chunk: Bytes) {
        debug_assert!(self.input.is_empty(), "push only after next_message returned None");
        self.bytes_seen += chunk.len() as u64;
        self.input = chunk;
    }

    /// The next complete message in what was pushed, if there is one.
    pub fn next_message(&mut self) -> Result<Option<RawMessage>, IngestError> {
        while !self.input.is_empty() {
            match &mut self.framing {
                Framing::Preamble { declared, seen } => {
                    let take = (FILE_MAGIC.len() - seen.len()).min(self.input.len());
                    seen.extend_from_slice(&self.input[..take]);
                    if seen.len() < FILE_MAGIC.len() {
                        self.input.advance(take);
                        continue;
                    }
                    if seen.as_slice() == FILE_MAGIC {
                        self.input.advance(take);
                        self.framing = Framing::FilePadding { seen: 0 };
                    } else if *declared == IpcFormat::File {
                        return Err(invalid("not an Arrow IPC file: it does not start with ARROW1"));
                    } else {
                        // A stream after all: its first bytes are ordinary message bytes.
                        let mut all = std::mem::take(seen);
                        all.extend_from_slice(&self.input[take..]);
                        self.input = Bytes::from(all);
                        self.framing = Framing::Messages { file: false, stage: Stage::start() };
                    }
                }
                Framing::FilePadding { seen } => {
                    let zeros = self.input.iter().position(|&b| b != 0).unwrap_or(self.input.len());
                    *seen += zeros;
                    if *seen > MAX_FILE_PADDING {
                        return Err(invalid(format!(
                            "more than {MAX_FILE_PADDING} bytes of padding after the IPC file's magic"
                        )));
                    }
                    self.input.advance(zeros);
                    if !self.input.is_empty() {
                        self.framing = Framing::Messages { file: true, stage: Stage::start() };
                    }
                }
                Framing::Ended => return Err(invalid("data after the end-of-stream marker")),
                Framing::Footer { tail, seen } => {
                    *seen += self.input.len() as u64;
                    // The flatbuffer, its 4-byte length and the closing magic.
                    let limit = self.max_message_bytes + 4 + FILE_MAGIC.len() as u64;
                    if *seen > limit {
                        return Err(invalid(format!(
                            "the IPC file's footer is longer than {limit} bytes (limits.max_message_bytes)"
                        )));
                    }
                    keep_tail(tail, &self.input);
                    self.input.clear();
                }
                Framing::Messages { file, stage } => {
                    let file = *file;
                    match advance(stage, &mut self.input, self.max_message_bytes, self.pause_before_bodies)? {
                        Step::More => {}
                        Step::Room => return Ok(None),
                        Step::Message(message) => return Ok(Some(message)),
                        Step::End if file => self.framing = Framing::Footer { tail: Vec::new(), seen: 0 },
                        Step::End => self.framing = Framing::Ended,
                    }
                }
            }
        }
        Ok(None)
    }

    /// Checks that the body ended on a message boundary (and, for files, with the closing magic).
    pub fn finish(&self) -> Result<(), IngestError> {
        match &self.framing {
            Framing::Preamble { seen, .. } if seen.is_empty() => Err(IngestError::EmptyBody),
            Framing::Preamble { .. } => Err(invalid("body too short to be Arrow IPC")),
            Framing::FilePadding { .. } | Framing::Messages { file: true, .. } => {
                Err(invalid("the IPC file ended before its end-of-stream marker"))
            }
            Framing::Messages { file: false, .. } if self.bytes_seen == 0 => Err(IngestError::EmptyBody),
            Framing::Messages { file: false, stage: Stage::Prefix(bytes) } if bytes.is_empty() => Ok(()),
            Framing::Messages { file: false, .. } => Err(invalid("the body ended in the middle of a message")),
            Framing::Ended => Ok(()),
            Framing::Footer { tail, .. } if tail.as_slice() == FILE_MAGIC => Ok(()),
            Framing::Footer { .. } => Err(invalid("the IPC file's footer is truncated")),
        }
    }
}

enum Step {
    /// All input consumed; the message needs more.
    More,
    /// A body waits for [`IpcDecoder::admit`], or a skipped one is done; the input is kept.
    Room,
    Message(RawMessage),
    /// The end-of-stream marker.
    End,
}

/// Reads as much of the current message as `input` holds.
fn advance(stage: &mut Stage, input: &mut Bytes, max_message_bytes: u64, pause: bool) -> Result<Step, IngestError> {
    loop {
        match stage {
            Stage::Prefix(prefix) => {
                // 4 bytes, or 8 when they start with the continuation marker.
                let want = if prefix.len() >= 4 && prefix[..4] == CONTINUATION { 8 } else { 4 };
                let take = (want - prefix.len()).min(input.len());
                prefix.extend_from_slice(&input[..take]);
                input.advance(take);
                if prefix.len() < want {
                    return Ok(Step::More);
                }
                if want == 4 && prefix[..4] == CONTINUATION {
                    continue;
                }
                let len_bytes: [u8; 4] = prefix[want - 4..want].try_into().expect("four bytes");
                let len = i32::from_le_bytes(len_bytes);
                if len == 0 {
                    *stage = Stage::start();
                    return Ok(Step::End);
                }
                if len < 0 {
                    return Err(invalid(format!("a message header length of {len}")));
                }
                if len as u64 > max_message_bytes {
                    // Without the continuation marker (the pre-1.0 format) an absurd length is more
                    // likely not Arrow at all.
                    if want == 4 {
                        return Err(invalid("not an Arrow IPC stream (no message at its start)"));
                    }
                    return Err(IngestError::MessageTooLarge { limit: max_message_bytes });
                }
                *stage = Stage::Header { len: len as usize, bytes: Vec::with_capacity(len as usize) };
            }
            Stage::Header { len, bytes } => {
                let take = (*len - bytes.len()).min(input.len());
                bytes.extend_from_slice(&input[..take]);
                input.advance(take);
                if bytes.len() < *len {
                    return Ok(Step::More);
                }
                let header = Bytes::from(std::mem::take(bytes));
                let message =
                    arrow_ipc::root_as_message(&header).map_err(|e| invalid(format!("invalid message header: {e}")))?;
                let body_len = message.bodyLength();
                if body_len < 0 {
                    return Err(invalid(format!("a message body length of {body_len}")));
                }
                if header.len() as u64 + body_len as u64 > max_message_bytes {
                    return Err(IngestError::MessageTooLarge { limit: max_message_bytes });
                }
                let body_len = body_len as usize;
                if input.len() >= body_len {
                    // The whole body is in this chunk: copied at once into aligned memory of its own.
                    // Shared, the slice would seldom be aligned (arrow-ipc would then copy each column
                    // into an allocation of its own) and would keep the connection's read buffer from
                    // being reused, so every read would fault in fresh pages.
                    let body = Buffer::from_slice_ref(&input[..body_len]);
                    input.advance(body_len);
                    *stage = Stage::start();
                    return Ok(Step::Message(RawMessage { header, body }));
                }
                *stage = if pause {
                    Stage::Waiting { header, len: body_len }
                } else {
                    Stage::Body { header, len: body_len, body: MutableBuffer::with_capacity(body_len) }
                };
            }
            Stage::Waiting { .. } => return Ok(Step::Room),
            Stage::Skipping { remaining } => {
                let take = (*remaining).min(input.len());
                input.advance(take);
                *remaining -= take;
                if *remaining > 0 {
                    return Ok(Step::More);
                }
                *stage = Stage::start();
                return Ok(Step::Room);
            }
            Stage::Body { header, len, body } => {
                let take = (*len - body.len()).min(input.len());
                body.extend_from_slice(&input[..take]);
                input.advance(take);
                if body.len() < *len {
                    return Ok(Step::More);
                }
                let message = RawMessage { header: std::mem::take(header), body: std::mem::take(body).into() };
                *stage = Stage::start();
                return Ok(Step::Message(message));
            }
        }
    }
}

fn invalid(message: impl Into<String>) -> IngestError {
    IngestError::InvalidIpc(message.into())
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

    use arrow::array::{Int32Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow_ipc::writer::{FileWriter, StreamWriter};

    use super::*;
    use crate::ipc::{MessageDecoder, Payload};

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
        let mut messages = MessageDecoder::new(1 << 30);
        let mut rows = 0;
        for piece in bytes.chunks(step) {
            decoder.push(Bytes::copy_from_slice(piece));
            while let Some(message) = decoder.next_message()? {
                messages.check(&message)?;
                if let Payload::Batch(batch) = messages.decode(&message)? {
                    rows += batch.num_rows();
                }
            }
        }
        decoder.finish()?;
        Ok(rows)
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
    fn a_body_that_arrives_whole_is_copied_out_aligned_and_leaves_the_chunk_free() {
        let stream = stream_bytes(&[batch(10)]);
        // The chunk starts one byte into its allocation, so a slice of it could not be aligned.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&stream);
        let chunk = Bytes::from(shifted).slice(1..);
        let mut decoder = IpcDecoder::new(IpcFormat::Stream, 1 << 20);
        decoder.push(chunk.clone());
        let mut bodies = Vec::new();
        while let Some(message) = decoder.next_message().unwrap() {
            bodies.push(message.body);
        }
        let body = bodies.iter().find(|body| !body.is_empty()).expect("the batch's body");
        assert_eq!(body.as_ptr() as usize % 64, 0, "the body is aligned");
        let chunk_bytes = chunk.as_ptr_range();
        assert!(!chunk_bytes.contains(&body.as_ptr()), "the body is a copy, not a slice of the chunk");
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
    fn a_file_padded_or_footed_beyond_any_writer_is_refused_as_it_arrives() {
        // The magic, then zeros without end (a few bytes of a compressed body can decompress to this).
        let mut decoder = IpcDecoder::new(IpcFormat::File, 1 << 20);
        decoder.push(Bytes::from_static(b"ARROW1"));
        assert!(matches!(decoder.next_message(), Ok(None)));
        decoder.push(Bytes::from(vec![0; MAX_FILE_PADDING]));
        assert!(matches!(decoder.next_message(), Ok(None)), "padding to a 64-byte alignment is fine");
        decoder.push(Bytes::from_static(&[0]));
        let error = decoder.next_message().err().expect("refused").to_string();
        assert!(error.contains("padding"), "{error}");
        // A footer can be no longer than a message: 300 one-row batches list 300 blocks in it.
        let file = file_bytes(&vec![batch(1); 300]);
        let footer = u32::from_le_bytes(file[file.len() - 10..file.len() - 6].try_into().unwrap()) as u64;
        let mut decoder = IpcDecoder::new(IpcFormat::File, footer - 1);
        let outcome = file.chunks(4096).try_for_each(|piece| {
            decoder.push(Bytes::copy_from_slice(piece));
            while decoder.next_message()?.is_some() {}
            Ok::<_, IngestError>(())
        });
        let error = outcome.unwrap_err().to_string();
        assert!(error.contains("footer is longer"), "{error}");
        assert_eq!(decode(IpcFormat::File, &file, 4096).unwrap(), 300, "with room for the footer it decodes");
    }

    #[test]
    fn oversized_messages_are_refused_before_they_are_buffered() {
        let bytes = stream_bytes(&[batch(100_000)]);
        let mut decoder = IpcDecoder::new(IpcFormat::Stream, 64 * 1024);
        // The batch's header names its body's length: refused right there, before the body is buffered.
        let mut refused = None;
        'pieces: for (index, piece) in bytes.chunks(16 * 1024).enumerate() {
            decoder.push(Bytes::copy_from_slice(piece));
            loop {
                match decoder.next_message() {
                    Ok(Some(_schema)) => {}
                    Ok(None) => break,
                    Err(error) => {
                        refused = Some((index, error));
                        break 'pieces;
                    }
                }
            }
        }
        let (index, error) = refused.expect("the batch is refused");
        assert!(matches!(error, IngestError::MessageTooLarge { limit: 65536 }), "{error}");
        assert_eq!(index, 0, "refused in the first piece, which holds the batch's header");
    }

    #[test]
    fn a_pausing_decoder_buffers_a_body_only_once_admitted() {
        let bytes = stream_bytes(&[batch(1000)]);
        let batch_body = {
            let mut all = IpcDecoder::new(IpcFormat::Stream, 1 << 20);
            all.push(Bytes::from(bytes.clone()));
            let _schema = all.next_message().unwrap().unwrap();
            all.next_message().unwrap().unwrap().body.len() as u64
        };
        let mut decoder = IpcDecoder::new(IpcFormat::Stream, 1 << 20).pausing_before_bodies();
        let (mut rooms, mut messages) = (Vec::new(), 0);
        for piece in bytes.chunks(100) {
            decoder.push(Bytes::copy_from_slice(piece));
            loop {
                if let Some(len) = decoder.pending_body() {
                    // Until admitted, nothing moves: the same body is pending again.
                    assert!(decoder.next_message().unwrap().is_none());
                    assert_eq!(decoder.pending_body(), Some(len));
                    rooms.push(len);
                    decoder.admit();
                }
                match decoder.next_message().unwrap() {
                    Some(_) => messages += 1,
                    None if decoder.pending_body().is_some() => {}
                    None => break,
                }
            }
        }
        decoder.finish().unwrap();
        assert_eq!(messages, 2, "the schema and the batch");
        assert_eq!(rooms, [batch_body], "room asked once, for the batch's body (the schema has none)");
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
