//! Tape media and the virtual tape library: a cartridge's label record, a
//! set index file, a VTL protocol frame, a cartridge file's header and
//! entry stream — any bytes decode or fail cleanly, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = floe_plugin_tape::decode_label(data);
    let _ = floe_plugin_tape::decode_index(data);
    let _ = floe_core::tape::read_frame(&mut std::io::Cursor::new(data));
    let _ = floe_sim_san::vtl::CartHeader::decode(data);
    let mut cart = vec![0u8; 4096];
    cart.extend_from_slice(data);
    let len = cart.len() as u64;
    let _ = floe_sim_san::vtl::scan_entries(&mut std::io::Cursor::new(cart), len);
});
