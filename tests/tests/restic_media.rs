//! Restic repository media: Floe writes a set as a restic snapshot through
//! rustic_core; Debian's `restic` checks it with `--read-data` and restores
//! the tree without Floe; `floe restore` restores it exactly; a second
//! backup of a mostly unchanged tree adds little (deduplication); a reader
//! error fails the set and leaves no snapshot.

use floe_tests::hostfs::{compare_trees, floe_backup_to, set_of, tree_host};
use floe_tests::{floe_cmd, have, skip};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

fn restic(repo: &Path, pw: &Path, args: &[&str]) -> std::process::Output {
    Command::new("restic")
        .arg("-r")
        .arg(repo)
        .arg("--password-file")
        .arg(pw)
        .arg("--no-cache")
        .args(args)
        .output()
        .expect("run restic")
}

fn du(p: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(p).unwrap().flatten() {
        let m = e.metadata().unwrap();
        n += if m.is_dir() { du(&e.path()) } else { m.len() };
    }
    n
}

#[test]
fn restic_checks_and_restores_a_floe_snapshot_and_dedups_the_next() {
    let name = "restic_checks_and_restores_a_floe_snapshot_and_dedups_the_next";
    if !have("restic") {
        return skip(name, "Debian's restic is not installed");
    }
    let Some((src, agent, facts)) = tree_host(name, 256, 500, 9, &[]) else {
        return;
    };
    let repo = src.dir.path().join("repo");
    let pw = src.dir.path().join("pw");
    std::fs::write(&pw, "correct horse battery staple\n").unwrap();
    let media = format!("restic:{}", repo.display());
    let mut args = src.device_args();
    args.extend([
        "--media-opt".into(),
        format!("password_file={}", pw.display()),
    ]);
    let source = [format!("fsflush:{}", src.mnt.display())];
    let (code, out, err) = floe_backup_to(&agent.addr, &source, &media, &args);
    assert_eq!(code, 0, "backup failed:\n{out}\n{err}");
    let set = set_of(&out);

    // Debian's restic, without Floe: the repository checks clean with
    // every pack read, and the snapshot restores the tree.
    let c = restic(&repo, &pw, &["check", "--read-data"]);
    assert!(
        c.status.success(),
        "restic check: {}{}",
        String::from_utf8_lossy(&c.stdout),
        String::from_utf8_lossy(&c.stderr)
    );
    let snaps = restic(
        &repo,
        &pw,
        &["snapshots", "--json", "--tag", &format!("floe-set={set}")],
    );
    let snaps: serde_json::Value = serde_json::from_slice(&snaps.stdout).expect("snapshots JSON");
    assert_eq!(snaps.as_array().map(Vec::len), Some(1), "{snaps}");
    let target = src.dir.path().join("by-restic");
    let r = restic(
        &repo,
        &pw,
        &["restore", "latest", "--target", target.to_str().unwrap()],
    );
    assert!(
        r.status.success(),
        "restic restore: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let restored = target.join(src.mnt.strip_prefix("/").unwrap());
    // Hard links are in the set's record, not restic links, and Debian's
    // restic 0.14 has no sparse restore: restic restores every other path
    // exactly, and those with the right bytes.
    let linked = |d: &str| {
        let p = d.split(':').next().unwrap_or_default();
        std::fs::symlink_metadata(src.mnt.join(p)).is_ok_and(|m| m.is_file() && m.nlink() > 1)
    };
    let diffs: Vec<String> = compare_trees(&src.mnt, &restored)
        .into_iter()
        .filter(|d| {
            !linked(d) && !d.ends_with("sparse in the source, fully allocated in the restore")
        })
        .collect();
    assert!(diffs.is_empty(), "{:#?}", &diffs[..diffs.len().min(20)]);
    // Floe restores it exactly, hard links included, and verifies it.
    let to = src.dir.path().join("by-floe");
    let mut cmd = floe_cmd();
    cmd.args(["restore", "--media", &media, "--media-opt"])
        .arg(format!("password_file={}", pw.display()))
        .args(["--set", &set, "--to-dir"])
        .arg(&to);
    let r = cmd.output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let diffs = compare_trees(&src.mnt, &to);
    assert!(diffs.is_empty(), "{:#?}", &diffs[..diffs.len().min(20)]);

    // A second backup of the tree with one file changed adds little.
    let before = du(&repo);
    std::fs::write(src.mnt.join("changed.txt"), b"one new small file\n").unwrap();
    src.sync();
    let (code, out, err) = floe_backup_to(&agent.addr, &source, &media, &args);
    assert_eq!(code, 0, "second backup failed:\n{out}\n{err}");
    let added = du(&repo) - before;
    assert!(
        added * 20 < before,
        "the second backup added {added} bytes to a {before}-byte repository ({} bytes of data)",
        facts.bytes
    );
    let snaps = restic(&repo, &pw, &["snapshots", "--json", "--tag", "floe"]);
    let snaps: serde_json::Value = serde_json::from_slice(&snaps.stdout).unwrap();
    assert_eq!(snaps.as_array().map(Vec::len), Some(2));
}

#[test]
fn a_reader_error_fails_the_set_and_leaves_no_snapshot() {
    let name = "a_reader_error_fails_the_set_and_leaves_no_snapshot";
    if !have("restic") {
        return skip(name, "Debian's restic is not installed");
    }
    let Some((src, agent, _)) = tree_host(name, 128, 60, 3, &[]) else {
        return;
    };
    let repo = src.dir.path().join("repo");
    let pw = src.dir.path().join("pw");
    std::fs::write(&pw, "pw\n").unwrap();
    let media = format!("restic:{}", repo.display());
    let catalog = src.dir.path().join("catalog.db");
    let out = floe_cmd()
        .env("FLOE_ERRPOINT", "restic-read")
        .args(["backup", "--agent", &agent.addr, "--source"])
        .arg(format!("fsflush:{}", src.mnt.display()))
        .args(["--media", &media, "--media-opt"])
        .arg(format!("password_file={}", pw.display()))
        .arg("--catalog")
        .arg(&catalog)
        .args(src.device_args())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("restic did not store all of"), "{err}");
    // No snapshot, nothing in the catalog; the repository is sound.
    let s = restic(&repo, &pw, &["snapshots", "--json"]);
    let snaps: serde_json::Value = serde_json::from_slice(&s.stdout).unwrap_or_default();
    assert_eq!(snaps.as_array().map(Vec::len).unwrap_or(0), 0, "{snaps}");
    let c = restic(&repo, &pw, &["check"]);
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    let list = floe_cmd()
        .args(["list", "--catalog"])
        .arg(&catalog)
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&list.stdout).contains("fsflush"));
}
