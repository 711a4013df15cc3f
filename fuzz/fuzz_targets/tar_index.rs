//! Tar media: finding (by its locator, or by walking) and decoding a set's index in an archive from the
//! media, a GNU sparse map, the journal, and a compressed archive's seek
//! table — any bytes decode or fail
//! cleanly, never a panic or a runaway.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let _ = floe_plugin_tar::read_index(&mut std::io::Cursor::new(data), Path::new("set.tar"));
    let _ = floe_core::pax::decode_index(data);
    let _ = floe_core::pax::read_locator(data);
    let _ = floe_core::pax::parse_sparse_map(&mut std::io::Cursor::new(data), 1 << 40);
    let _ = floe_plugin_tar::decode_journal(data, Path::new("set.tar.journal"));
    // As a compressed archive's reader takes its seek table: the footer
    // says how long the table is, the frames fill what precedes it.
    let _ = floe_plugin_tar::zst::decode_seek_table(data, floe_core::units::Bytes(0));
    if let Some(footer) = data.len().checked_sub(9).map(|at| &data[at..]) {
        if let Ok(n) = floe_plugin_tar::zst::seek_table_len(footer) {
            if let Some(start) = data.len().checked_sub(n) {
                let _ = floe_plugin_tar::zst::decode_seek_table(
                    &data[start..],
                    floe_core::units::Bytes(start as u64),
                );
            }
        }
    }
});
