//! Media records read back from disk media (set manifests, which are the
//! catalog a lost catalog is rebuilt from, and journals of interrupted
//! sets): any bytes decode or fail cleanly. (Tar archives: `tar_index`;
//! two plugins cannot link into one binary, each exports the plugin symbols.)
#![no_main]
use floe_plugin_disk::{decode_journal, decode_manifest};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let _ = decode_manifest(data, Path::new("set.json"));
    let _ = decode_journal(data, Path::new("journal.json"));
});
