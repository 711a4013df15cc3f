//! Media records read back from disk media (set manifests, which are the
//! catalog a lost catalog is rebuilt from, and journals of interrupted
//! sets, tar archives and their index): any bytes decode or fail cleanly.
#![no_main]
use floe_plugin_disk::{decode_journal, decode_manifest};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let _ = decode_manifest(data, Path::new("set.json"));
    let _ = decode_journal(data, Path::new("journal.json"));
    let _ = floe_plugin_tar::read_index(&mut std::io::Cursor::new(data), Path::new("set.tar"));
});
