//! Input files: recognise the format, open a reader that yields record batches one at a time (no file
//! is read whole), and line up the columns of an upload's files.

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::Path;
use std::sync::Arc;

use arrow::array::{RecordBatch, RecordBatchOptions, RecordBatchReader};
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::ipc::reader::{FileReader, StreamReader};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::Error;

/// Rows per batch read from CSV, JSON and Parquet unless `--batch-rows` says otherwise.
pub const DEFAULT_BATCH_ROWS: usize = 65_536;
/// Records CSV and JSON column types are inferred from (a later value of another type fails the read).
const INFER_RECORDS: usize = 10_000;

/// The formats `ingest` reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    IpcStream,
    IpcFile,
    Parquet,
    Csv,
    JsonLines,
}

impl Format {
    /// Binary formats by their first bytes (whatever the name), text formats by extension.
    fn detect(path: &Path, head: &[u8]) -> Option<Self> {
        if head.starts_with(b"ARROW1") {
            return Some(Self::IpcFile);
        }
        if head.starts_with(b"PAR1") {
            return Some(Self::Parquet);
        }
        // Every IPC stream message starts with the continuation marker (since Arrow 0.15).
        if head.starts_with(&[0xff; 4]) {
            return Some(Self::IpcStream);
        }
        let extension = path.extension()?.to_str()?.to_ascii_lowercase();
        match extension.as_str() {
            "csv" => Some(Self::Csv),
            "json" | "jsonl" | "ndjson" => Some(Self::JsonLines),
            _ => None,
        }
    }
}

/// One FILE argument, opened.
pub struct Source {
    /// The argument as given (`stdin` for `-`), for messages.
    pub name: String,
    reader: Box<dyn RecordBatchReader + Send>,
    /// Where each of the upload's columns is in this source's batches (`None`: in the same place).
    columns: Option<Vec<usize>>,
}

impl Source {
    /// Opens `path` (`-`: an Arrow IPC stream on stdin). CSV, JSON and Parquet are read `batch_rows`
    /// rows at a time; Arrow IPC batches come as they were written.
    pub fn open(path: &Path, batch_rows: usize) -> Result<Self, Error> {
        let name = if path == Path::new("-") { "stdin".to_owned() } else { path.display().to_string() };
        let failed = |message: String| Error::Input { file: name.clone(), message };
        let reader = if path == Path::new("-") {
            let stdin = BufReader::new(std::io::stdin());
            Box::new(StreamReader::try_new(stdin, None).map_err(|e| failed(e.to_string()))?) as Box<_>
        } else {
            let mut file = File::open(path).map_err(|e| failed(e.to_string()))?;
            let mut head = Vec::with_capacity(8);
            (&mut file).take(8).read_to_end(&mut head).map_err(|e| failed(e.to_string()))?;
            file.rewind().map_err(|e| failed(e.to_string()))?;
            let format = Format::detect(path, &head).ok_or_else(|| Error::UnknownFormat { file: name.clone() })?;
            open_file(file, format, batch_rows).map_err(failed)?
        };
        Ok(Self { name, reader, columns: None })
    }

    pub fn schema(&self) -> SchemaRef {
        self.reader.schema()
    }

    /// The next batch, carried over to `schema`, the upload's (see [`align`]).
    pub fn next_batch(&mut self, schema: &SchemaRef) -> Result<Option<RecordBatch>, Error> {
        let failed = |error: ArrowError| Error::Input { file: self.name.clone(), message: error.to_string() };
        let Some(batch) = self.reader.next().transpose().map_err(failed)? else {
            return Ok(None);
        };
        let columns = match &self.columns {
            Some(order) => order.iter().map(|&index| batch.column(index).clone()).collect(),
            None => batch.columns().to_vec(),
        };
        let options = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
        let batch = RecordBatch::try_new_with_options(schema.clone(), columns, &options).map_err(failed)?;
        Ok(Some(batch))
    }
}

fn open_file(mut file: File, format: Format, batch_rows: usize) -> Result<Box<dyn RecordBatchReader + Send>, String> {
    let message = |error: ArrowError| error.to_string();
    Ok(match format {
        Format::IpcStream => Box::new(StreamReader::try_new(BufReader::new(file), None).map_err(message)?),
        Format::IpcFile => Box::new(FileReader::try_new(BufReader::new(file), None).map_err(message)?),
        Format::Parquet => Box::new(
            ParquetRecordBatchReaderBuilder::try_new(file)
                .and_then(|builder| builder.with_batch_size(batch_rows).build())
                .map_err(|error| error.to_string())?,
        ),
        Format::Csv => {
            let format = arrow::csv::reader::Format::default().with_header(true);
            let (schema, _) = format.infer_schema(&mut file, Some(INFER_RECORDS)).map_err(message)?;
            file.rewind().map_err(|error| error.to_string())?;
            Box::new(
                arrow::csv::ReaderBuilder::new(Arc::new(schema))
                    .with_format(format)
                    .with_batch_size(batch_rows)
                    .build(file)
                    .map_err(message)?,
            )
        }
        Format::JsonLines => {
            let mut lines = BufReader::new(file);
            // Reads up to INFER_RECORDS lines, then rewinds.
            let (schema, _) = arrow::json::reader::infer_json_schema_from_seekable(&mut lines, Some(INFER_RECORDS))
                .map_err(message)?;
            Box::new(
                arrow::json::ReaderBuilder::new(Arc::new(schema))
                    .with_batch_size(batch_rows)
                    .build(lines)
                    .map_err(message)?,
            )
        }
    })
}

/// The schema an upload is sent with: the first file's columns, nullable where any file's column is.
/// Every file must have columns of the same names and types; their order may differ (JSON objects have
/// none), and each source is set to yield them in the first file's order.
pub fn align(sources: &mut [Source]) -> Result<SchemaRef, Error> {
    let first = sources[0].schema();
    let mut fields: Vec<Field> = first.fields().iter().map(|field| field.as_ref().clone()).collect();
    let first_name = sources[0].name.clone();
    for source in &mut sources[1..] {
        let schema = source.schema();
        let differs = |difference: String| Error::SchemaDiffers {
            file: source.name.clone(),
            first: first_name.clone(),
            difference,
        };
        if let Some(extra) = schema.fields().iter().find(|other| first.field_with_name(other.name()).is_err()) {
            return Err(differs(format!("it has a column `{}` that {first_name} lacks", extra.name())));
        }
        let mut columns = Vec::with_capacity(fields.len());
        for field in &mut fields {
            let Ok(index) = schema.index_of(field.name()) else {
                return Err(differs(format!("it lacks the column `{}`", field.name())));
            };
            let other = schema.field(index);
            if other.data_type() != field.data_type() {
                return Err(differs(format!(
                    "its column `{}` is {} where {first_name} has {}",
                    field.name(),
                    other.data_type(),
                    field.data_type()
                )));
            }
            if other.is_nullable() {
                field.set_nullable(true);
            }
            columns.push(index);
        }
        source.columns = Some(columns);
    }
    Ok(Arc::new(Schema::new(fields)))
}
