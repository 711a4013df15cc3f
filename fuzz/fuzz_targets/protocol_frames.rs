//! Agent ↔ mover frames: any bytes from a peer decode to messages or to a
//! protocol error, never a panic or an unbounded allocation.
#![no_main]
use floe_core::protocol::{read_message, Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    while let Ok(Some(_)) = read_message::<Request>(&mut r, 1 << 20) {}
    let mut r = data;
    while let Ok(Some(_)) = read_message::<Response>(&mut r, 1 << 20) {}
});
