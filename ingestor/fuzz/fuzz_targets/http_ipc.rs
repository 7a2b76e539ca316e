//! An HTTP ingest body: `arrowport::transport::http::framing::IpcDecoder` frames it, `arrowport::ipc::MessageDecoder`
//! checks and decodes each message. Input layout: `src/drive.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(init: arrowport_fuzz::install_panic_hook(), |input: &[u8]| {
    arrowport_fuzz::run(arrowport_fuzz::http_ipc, input);
});
