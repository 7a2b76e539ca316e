//! The Arrow rules both sides apply: which IPC buffer compression a setting means, and how the
//! decoded size of a batch is measured.

use arrow_array::RecordBatch;
use arrow_ipc::CompressionType;
use arrow_ipc::writer::IpcWriteOptions;
use arrowport_config::{Compression, CompressionAlgorithm};

/// IPC write options with `compression`'s algorithm as buffer compression (`zstd` → ZSTD, `lz4` →
/// LZ4_FRAME).
///
/// `level` is not applied here: arrow-ipc 58 compresses zstd at zstd's default level (3) and has no
/// way to choose another.
pub fn ipc_write_options(compression: &Compression) -> IpcWriteOptions {
    let codec = match compression.algorithm {
        CompressionAlgorithm::Zstd => Some(CompressionType::ZSTD),
        CompressionAlgorithm::Lz4 => Some(CompressionType::LZ4_FRAME),
        CompressionAlgorithm::None => None,
    };
    IpcWriteOptions::default().try_with_compression(codec).expect("the default IPC options (V5) support compression")
}

/// Bytes of Arrow memory a batch's arrays cover (their slices, not the buffers they share).
pub fn decoded_size(batch: &RecordBatch) -> u64 {
    batch
        .columns()
        .iter()
        .map(|array| array.to_data().get_slice_memory_size().unwrap_or_else(|_| array.get_array_memory_size()))
        .sum::<usize>() as u64
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, Int64Array};
    use arrow_ipc::writer::{CompressionContext, DictionaryTracker, IpcDataGenerator};

    use super::*;

    /// The codec a batch encoded with `algorithm` names in its IPC message header.
    fn codec_written(algorithm: CompressionAlgorithm) -> Option<CompressionType> {
        let column: ArrayRef = Arc::new(Int64Array::from_iter_values(0..100));
        let batch = RecordBatch::try_from_iter([("x", column)]).unwrap();
        let (_, encoded) = IpcDataGenerator::default()
            .encode(
                &batch,
                &mut DictionaryTracker::new(false),
                &ipc_write_options(&Compression { algorithm, level: None }),
                &mut CompressionContext::default(),
            )
            .unwrap();
        let message = arrow_ipc::root_as_message(&encoded.ipc_message).unwrap();
        message.header_as_record_batch().unwrap().compression().map(|compression| compression.codec())
    }

    #[test]
    fn each_algorithm_maps_to_its_codec() {
        assert_eq!(codec_written(CompressionAlgorithm::Zstd), Some(CompressionType::ZSTD));
        assert_eq!(codec_written(CompressionAlgorithm::Lz4), Some(CompressionType::LZ4_FRAME));
        assert_eq!(codec_written(CompressionAlgorithm::None), None);
    }

    #[test]
    fn a_slice_counts_only_its_rows() {
        let column: ArrayRef = Arc::new(Int64Array::from_iter_values(0..100));
        let batch = RecordBatch::try_from_iter([("x", column)]).unwrap();
        assert_eq!(decoded_size(&batch), 800);
        assert_eq!(decoded_size(&batch.slice(10, 10)), 80);
    }
}
