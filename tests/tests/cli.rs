//! The `floe` and `floe-sim-san` binaries as an operator runs them: separate
//! processes, exit codes, messages, and media that fail.

use floe_tests::{build_dir, floe_bin, floe_cmd, is_root, skip, SimSanProcess};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn floe(args: &[&str]) -> Output {
    floe_cmd().args(args).output().expect("run floe")
}

fn agent_spec(san: &SimSanProcess) -> String {
    format!(
        "exec:{} agent --stdio --allow-source 'array:vol*' --plugin-opt array.control={}",
        floe_bin().display(),
        san.control
    )
}

/// `floe backup` of vol0 over a stdio agent to `media`, with `extra`
/// arguments (a report format among them, or none: the human report).
fn backup_with(san: &SimSanProcess, media: &str, extra: &[&str]) -> Output {
    let agent = agent_spec(san);
    let nbd = format!("nbd://{}", san.nbd);
    let mut args = vec![
        "backup",
        "--agent",
        &agent,
        "--san",
        &nbd,
        "--source",
        "array:vol0",
        "--media",
        media,
        "--allow-any-device",
    ];
    args.extend_from_slice(extra);
    floe(&args)
}

/// [`backup_with`] the JSON report.
fn backup(san: &SimSanProcess, media: &str, extra: &[&str]) -> Output {
    backup_with(san, media, &[&["--json"], extra].concat())
}

fn setup(san: &SimSanProcess, size: u64) {
    san.ctl(&format!(
        r#"{{"op":"create_volume","name":"vol0","size":{size},"max_run_chunks":4}}"#
    ));
    san.ctl(r#"{"op":"workload","target":"vol0","seed":8,"writes":400,"max_length":262144}"#);
}

#[test]
fn every_command_explains_itself_with_an_example() {
    for cmd in ["agent", "backup", "restore", "list", "plugins", "sim-san"] {
        let out = floe(&[cmd, "--help"]);
        assert!(out.status.success(), "{cmd} --help");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Example"),
            "floe {cmd} --help has no example:\n{text}"
        );
    }
    let out = Command::new(build_dir().join("floe-sim-san"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("Example"));
}

#[test]
fn backup_over_a_stdio_agent_then_list_and_restore_to_a_new_lun() {
    let san = SimSanProcess::start(&["lun0=64M", "lun1=64M"], &["restore0=64M"]);
    setup(&san, 16 << 20);
    let want = san.ctl(r#"{"op":"checksum","target":"vol0"}"#)["blake3"]
        .as_str()
        .unwrap()
        .to_string();
    let media_dir = tempfile::tempdir().unwrap();
    let media = format!("disk:{}", media_dir.path().display());
    let out = backup(&san, &media, &["--window", "1M", "--parallel", "3"]);
    assert!(
        out.status.success(),
        "backup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let set = report["set"]["header"]["set"].as_str().unwrap().to_string();
    assert_eq!(
        report["set"]["items"][0]["trailer"]["blake3"].as_str(),
        Some(want.as_str())
    );

    // One line for the set: when, how much, from where; not its items.
    let out = floe(&["list", "--media", &media]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let committed = floe_core::retention::utc(report["set"]["committed_at"].as_u64().unwrap());
    let items = report["set"]["items"].as_array().unwrap().len();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(
        lines[0].starts_with(&format!("{set}  {committed} UTC  {items} items  ")),
        "{text}"
    );
    assert!(
        lines[0].contains(" sources array:") && !lines[0].contains("blake3"),
        "{text}"
    );

    let target = format!("vol0=nbd://{}/restore0", san.nbd);
    let out = floe(&[
        "restore",
        "--media",
        &media,
        "--set",
        &set,
        "--to",
        &target,
        "--dry-run",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("would restore vol0"));
    let out = floe(&["restore", "--media", &media, "--set", &set, "--to", &target]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // restore0 is a LUN, not a volume: read its backing file.
    let restored = san.ctl(r#"{"op":"list_luns"}"#);
    let path = restored
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "restore0")
        .unwrap()["path"]
        .as_str()
        .unwrap()
        .to_string();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(blake3::hash(&bytes[..16 << 20]).to_hex().to_string(), want);

    // The summary report: the set's items counted, not listed; the human
    // report says what moved and where the time went.
    let items = report["set"]["items"].as_array().unwrap().len();
    let out = backup_with(&san, &media, &["--json=summary"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["set"]["items"].as_u64(), Some(items as u64));
    assert!(summary["set"]["header"]["set"]
        .as_str()
        .is_some_and(|s| s != set));
    assert!(summary["bytes_read"].as_u64().unwrap() >= 16 << 20);
    assert!(summary["seconds"]["move"].as_f64().unwrap() > 0.0);
    let out = backup_with(&san, &media, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && text.contains("committed")
            && text.contains("bytes from devices")
            && text.contains("move "),
        "{text}"
    );
    let out = backup_with(&san, &media, &["--json=everything"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("everything"));
}

#[test]
fn a_read_error_exits_non_zero_and_records_nothing() {
    let san = SimSanProcess::start(&["lun0=32M"], &[]);
    setup(&san, 4 << 20);
    let map = san.ctl(r#"{"op":"map","target":"vol0"}"#);
    let e = &map["extents"][0];
    let off = e["lun_offset"].as_u64().unwrap() + e["length"].as_u64().unwrap() / 2 / 4096 * 4096;
    san.ctl(&format!(
        r#"{{"op":"inject_error","lun":"lun0","offset":{off},"length":4096}}"#
    ));
    let media_dir = tempfile::tempdir().unwrap();
    let media = format!("disk:{}", media_dir.path().display());
    let out = backup(&san, &media, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[read_failed]")
            && err.contains("item vol0")
            && err.contains(e["wwn"].as_str().unwrap()),
        "{err}"
    );
    assert!(err.contains("nothing was recorded as complete"), "{err}");
    let out = floe(&["list", "--media", &media]);
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Restoring a set that does not exist fails and leaves no target behind.
    let target = media_dir.path().join("never.img");
    let out = floe(&[
        "restore",
        "--media",
        &media,
        "--set",
        "nosuch",
        "--to",
        &format!("vol0={}", target.display()),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no set nosuch"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!target.exists());
}

/// A tmpfs mounted for a test and unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(dir: &Path, opts: &str) -> Option<Mount> {
        std::fs::create_dir_all(dir).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs", dir.to_str()?])
            .status()
            .ok()?
            .success();
        ok.then(|| Mount(dir.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_media_option_the_plugin_does_not_take_is_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    for (media, opt, says) in [
        (
            "disk",
            "compress=zstd",
            "disk media has no option \"compress\"",
        ),
        ("tar", "compres=zstd", "tar media has no option \"compres\""),
        (
            "tar",
            "compress=lz4",
            "compress \"lz4\" is not none or zstd",
        ),
        (
            "tar",
            "compress_level=40",
            "compress_level \"40\" is not a zstd level",
        ),
    ] {
        let spec = format!("{media}:{}", d.path().display());
        let out = floe(&["verify", "--media", &spec, "--media-opt", opt]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{media} {opt}: {err}");
        assert!(err.contains(says), "{media} {opt}: {err}");
    }
    // What the plugins take is taken.
    let spec = format!("tar:{}", d.path().display());
    let out = floe(&["verify", "--media", &spec, "--media-opt", "compress=zstd"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn full_and_read_only_media_fail_clearly_and_record_nothing() {
    if !is_root() {
        return skip(
            "full_and_read_only_media_fail_clearly_and_record_nothing",
            "needs root to mount a small and a read-only tmpfs",
        );
    }
    let san = SimSanProcess::start(&["lun0=64M"], &[]);
    setup(&san, 16 << 20);
    let scratch = tempfile::tempdir().unwrap();

    let Some(full) = Mount::tmpfs(&scratch.path().join("full"), "size=4m") else {
        return skip(
            "full_and_read_only_media_fail_clearly_and_record_nothing",
            "mount -t tmpfs failed",
        );
    };
    let media = format!("disk:{}", full.0.display());
    let out = backup(&san, &media, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[media_full]") && err.contains("item vol0"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&full.0).unwrap().count(),
        0,
        "the partial set was removed"
    );

    // The same for tar media, whose archive is written with O_DIRECT on
    // a thread of its own (the first write that finds no room is
    // reported, the partial archive and its journal removed), plain and
    // compressed (the volume's random bytes do not shrink to fit).
    for opts in [&[][..], &["--media-opt", "compress=zstd"][..]] {
        let out = backup(&san, &format!("tar:{}", full.0.display()), opts);
        assert_eq!(out.status.code(), Some(1), "{opts:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("[media_full]"), "{opts:?}: {err}");
        assert_eq!(
            std::fs::read_dir(&full.0).unwrap().count(),
            0,
            "{opts:?}: the partial archive was removed"
        );
    }

    let ro = Mount::tmpfs(&scratch.path().join("ro"), "ro,size=4m").expect("read-only tmpfs");
    let out = backup(&san, &format!("disk:{}", ro.0.display()), &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[media_read_only]"), "{err}");
    drop(full);
    drop(ro);
}
