//! The mover's NBD negotiation against a hostile server.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::{Read, Result, Write};

struct Server<'a>(&'a [u8]);

impl Read for Server<'_> {
    fn read(&mut self, b: &mut [u8]) -> Result<usize> {
        self.0.read(b)
    }
}

impl Write for Server<'_> {
    fn write(&mut self, b: &[u8]) -> Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = floe_core::nbd_client::negotiate(&mut Server(data), "lun0");
});
