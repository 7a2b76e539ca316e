//! A Flight DoPut stream: length-delimited `FlightData` protobufs, each one's IPC message checked and
//! decoded by one `arrowport::ipc::MessageDecoder`. Input layout: `src/drive.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(init: arrowport_fuzz::install_panic_hook(), |input: &[u8]| {
    arrowport_fuzz::run(arrowport_fuzz::flight_message, input);
});
