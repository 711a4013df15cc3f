//! sim-san's control API: any request line is answered, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn array() -> &'static floe_sim_san::array::Array {
    static A: OnceLock<(tempfile_dir::Dir, floe_sim_san::array::Array)> = OnceLock::new();
    &A.get_or_init(|| {
        let d = tempfile_dir::Dir::new();
        let a = floe_sim_san::array::Array::new(&d.0, 1).expect("array");
        a.create_lun("lun0", floe_core::units::Bytes(1 << 20)).expect("lun");
        (d, a)
    })
    .1
}

mod tempfile_dir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Dir {
            let p = std::env::temp_dir().join(format!("floe-fuzz-{}", std::process::id()));
            std::fs::create_dir_all(&p).expect("dir");
            Dir(p)
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(line) = std::str::from_utf8(data) {
        let _ = floe_sim_san::control::handle_line(array(), line);
    }
});
