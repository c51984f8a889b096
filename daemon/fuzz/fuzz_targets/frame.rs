//! Any bytes on the socket: framing and decoding must return a value or an
//! error, never panic, and never allocate what the frame only claims to hold.
#![no_main]
use autozyme_protocol::{read_frame, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let mut stream = bytes;
    // Every frame in the stream, as a connection reads them, until one fails.
    while let Ok(Some(_)) = read_frame::<_, Request>(&mut stream) {}
});
