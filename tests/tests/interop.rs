//! Real NBD clients against sim-san: the bytes they read equal the LUN's
//! backing file. Skips loudly when the client tools are not installed
//! (`cargo xtask test` installs them).

use floe_tests::{have, skip, Lab};
use std::process::Command;

const MIB: u64 = 1 << 20;

fn lab_with_data() -> (Lab, std::path::PathBuf) {
    let lab = Lab::start(9, &[("lun0", 16 * MIB), ("lun1", 8 * MIB)], false);
    // Non-sparse data all over lun0 (nbdcopy may skip holes).
    let mut data = vec![0u8; usize::try_from(16 * MIB).unwrap()];
    floe_sim_san::array::Rng::new(42).fill(&mut data);
    lab.san.array.nbd_write(0, 0, &data).unwrap();
    let path = lab.san.array.lun_path("lun0").unwrap();
    (lab, path)
}

#[test]
fn nbdinfo_lists_real_export_names_and_sizes() {
    if !have("nbdinfo") {
        return skip(
            "nbdinfo_lists_real_export_names_and_sizes",
            "nbdinfo (Debian libnbd-bin) is not installed",
        );
    }
    let (lab, _) = lab_with_data();
    let out = Command::new("nbdinfo")
        .args(["--list", "--json", &format!("nbd://{}", lab.san.nbd_addr)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let exports = v["exports"].as_array().unwrap();
    let names: Vec<&str> = exports
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["lun0", "lun1"]);
    assert_eq!(exports[1]["export-size"].as_u64(), Some(8 * MIB));
    // One export, asked for by name: its description is the LUN's WWN.
    let out = Command::new("nbdinfo")
        .args(["--json", &format!("nbd://{}/lun0", lab.san.nbd_addr)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let wwn = &lab.san.array.luns()[0].wwn;
    assert_eq!(
        v["exports"][0]["description"].as_str(),
        Some(wwn.as_str()),
        "{v}"
    );
    assert_eq!(v["exports"][0]["export-size"].as_u64(), Some(16 * MIB));
}

#[test]
fn nbdcopy_reads_exactly_the_backing_file() {
    if !have("nbdcopy") {
        return skip(
            "nbdcopy_reads_exactly_the_backing_file",
            "nbdcopy (Debian libnbd-bin) is not installed",
        );
    }
    let (lab, backing) = lab_with_data();
    let out_path = lab.dir.path().join("copy.img");
    // By WWN, as the mover addresses LUNs.
    let wwn = lab.san.array.luns()[0].wwn.clone();
    let st = Command::new("nbdcopy")
        .args([
            &format!("nbd://{}/{wwn}", lab.san.nbd_addr),
            out_path.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let got = std::fs::read(&out_path).unwrap();
    let want = std::fs::read(&backing).unwrap();
    floe_tests::assert_same_bytes(&got, &want, "nbdcopy of lun0");
}

#[test]
fn qemu_img_converts_an_export() {
    if !have("qemu-img") {
        return skip(
            "qemu_img_converts_an_export",
            "qemu-img (Debian qemu-utils) is not installed",
        );
    }
    let (lab, backing) = lab_with_data();
    let out_path = lab.dir.path().join("qemu.img");
    let st = Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &format!("nbd://{}/lun0", lab.san.nbd_addr),
            out_path.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    floe_tests::assert_same_bytes(
        &std::fs::read(&out_path).unwrap(),
        &std::fs::read(&backing).unwrap(),
        "qemu-img convert",
    );
}

#[test]
fn an_unknown_export_is_refused_by_name() {
    if !have("nbdinfo") {
        return skip(
            "an_unknown_export_is_refused_by_name",
            "nbdinfo (Debian libnbd-bin) is not installed",
        );
    }
    let (lab, _) = lab_with_data();
    let out = Command::new("nbdinfo")
        .arg(format!("nbd://{}/nosuch", lab.san.nbd_addr))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nosuch") && err.contains("No such file"),
        "{err}"
    );
}
