//! Tar media: finding and decoding a set's index in an archive from the
//! media — any bytes decode or fail cleanly, never a panic or a runaway.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let _ = floe_plugin_tar::read_index(&mut std::io::Cursor::new(data), Path::new("set.tar"));
    let _ = floe_plugin_tar::decode_index(data, Path::new("floe-index.json"));
    let _ = floe_plugin_tar::decode_journal(data, Path::new("set.tar.journal"));
});
