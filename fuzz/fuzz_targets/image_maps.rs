//! Image maps and remaps from an agent: validation and remap application
//! never panic, and whatever apply_remap accepts is a valid map.
#![no_main]
use floe_core::map::{apply_remap, validate_item};
use floe_core::model::{Item, Remap};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((item, remap)) = serde_json::from_slice::<(Item, Remap)>(data) else {
        if let Ok(item) = serde_json::from_slice::<Item>(data) {
            let _ = validate_item(&item);
        }
        return;
    };
    if validate_item(&item).is_ok() {
        if let Ok(out) = apply_remap(&item, &remap) {
            assert!(validate_item(&out).is_ok());
        }
    }
});
