//! Off-host backup of real file systems: ext4 and XFS (btrfs in
//! `btrfs.rs`) on loop devices, made and mounted for real; an agent
//! process freezes them with FIFREEZE (`fsflush`) and maps them with
//! FIEMAP (`fiemap`); the mover reads a second, read-only loop device over
//! the same image with O_DIRECT; the set is restored to a fresh file
//! system of the same kind and compared exactly.

use floe_tests::hostfs::{compare_trees, floe_backup, make_tree, set_of, AgentProcess, LoopFs};
use floe_tests::{floe_cmd, skip};

fn round_trip(name: &str, fstype: &str, mkfs: &[&str], opts: &str) {
    let mut src = match LoopFs::new(fstype, 1, 512, mkfs, opts) {
        Ok(f) => f,
        Err(why) => return skip(name, &why),
    };
    let facts = make_tree(&src.mnt, 2500, 7);
    assert!(facts.files > 2500 && facts.bytes > 10 << 20, "{facts:?}");
    src.mover_view().expect("read-only view");
    let allow = format!("fsflush:{}*", src.mnt.display());
    let agent = AgentProcess::start(&["--allow-source", &allow], &[]);
    let media = src.dir.path().join("media");
    let (code, out, err) = floe_backup(
        &agent.addr,
        &[format!("fsflush:{}", src.mnt.display())],
        &media,
        &src.device_args(),
    );
    assert_eq!(code, 0, "backup failed:\n{out}\n{err}");
    let set = set_of(&out);
    assert!(out.contains("0 remaps"), "{out}");

    let dst = LoopFs::new(fstype, 1, 512, mkfs, opts).expect("second file system");
    let to = dst.mnt.join("restored");
    let r = floe_cmd()
        .args(["restore", "--media"])
        .arg(format!("disk:{}", media.display()))
        .args(["--set", &set, "--to-dir"])
        .arg(&to)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let diffs = compare_trees(&src.mnt, &to);
    assert!(diffs.is_empty(), "{} differences, first: {:#?}", diffs.len(), &diffs[..diffs.len().min(20)]);
    // The comparison is not blind: one changed mode and one changed byte
    // are both named.
    std::fs::set_permissions(to.join("links/target.txt"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::write(to.join("special/xattrs"), b"with attributez").unwrap();
    let diffs = compare_trees(&src.mnt, &to);
    assert!(diffs.iter().any(|d| d.contains("links/target.txt: mode")), "{diffs:?}");
    assert!(diffs.iter().any(|d| d.contains("special/xattrs: bytes")), "{diffs:?}");
}

#[test]
fn ext4_tree_with_inline_data_round_trips_exactly() {
    round_trip(
        "ext4_tree_with_inline_data_round_trips_exactly",
        "ext4",
        &["-O", "inline_data", "-b", "4096"],
        "",
    );
}

#[test]
fn xfs_tree_round_trips_exactly() {
    round_trip("xfs_tree_round_trips_exactly", "xfs", &[], "");
}
