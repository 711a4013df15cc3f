//! `cargo xtask`: the project's own commands.
//!
//! - `cargo xtask demo`  — build, start sim-san + agent + mover as separate
//!   processes, back up two volumes while the application writes and the
//!   array migrates extents, restore to new LUNs, compare checksums.
//! - `cargo xtask test`  — everything CI runs (installs the NBD tools).
//! - `cargo xtask dist`  — a relocatable tarball with the binary and plugins.
//! - `cargo xtask bench` — the mover beside dd and nbdcopy on the same bytes.

mod bench;
mod demo;
mod treebench;
mod util;

use anyhow::{bail, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("demo") => demo::run(),
        Some("test") => test(&args[1..]),
        Some("dist") => dist().map(|_| ()),
        Some("bench") => bench::run(&args[1..]),
        Some("fuzz") => fuzz(args.get(1).map_or(Ok(60), |s| s.parse())?),
        _ => bail!("usage: cargo xtask <demo|test|dist|bench|fuzz [SECONDS]>"),
    }
}

/// Build everything, then run every test in the workspace.
fn test(extra: &[String]) -> Result<()> {
    util::ensure_packages(&[
        ("nbdinfo", "libnbd-bin"),
        ("nbdcopy", "libnbd-bin"),
        ("nbdfuse", "libnbd-bin"),
        ("nbdkit", "nbdkit"),
        ("qemu-img", "qemu-utils"),
        ("sshd", "openssh-server"),
        ("ssh", "openssh-client"),
        ("ssh-keygen", "openssh-client"),
        ("ip", "iproute2"),
        ("losetup", "mount"),
        // Real file systems on loop devices (issue 3's tests).
        ("mkfs.ext4", "e2fsprogs"),
        ("e4defrag", "e2fsprogs"),
        ("mkfs.xfs", "xfsprogs"),
        ("xfs_fsr", "xfsprogs"),
        ("mkfs.btrfs", "btrfs-progs"),
        ("setfacl", "acl"),
        ("fstrim", "util-linux"),
        ("blkid", "util-linux"),
        ("fsfreeze", "util-linux"),
        ("pvcreate", "lvm2"),
        // Media (issue 4's tests): GNU tar and Debian's restic read what
        // Floe writes, without Floe.
        ("tar", "tar"),
        ("restic", "restic"),
        // GNU tar reads a compressed set (`compress=zstd`) through it.
        ("zstd", "zstd"),
    ])?;
    util::cargo(&["build", "--workspace", "--all-targets"])?;
    // A short fuzz run of every decoder that takes bytes from a peer, then
    // the tests (whose summary closes the output).
    fuzz(
        std::env::var("FLOE_FUZZ_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10),
    )?;
    let mut args = vec!["test", "--workspace", "--no-fail-fast"];
    args.extend(extra.iter().map(String::as_str));
    run_tests(&args)
}

/// Run cargo test, passing its output through, and close with one summary
/// line over every test binary (cargo's last line is often a doc-test
/// binary with nothing in it).
fn run_tests(args: &[&str]) -> Result<()> {
    use std::io::BufRead;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut child = std::process::Command::new(cargo)
        .args(args)
        .current_dir(util::root())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let out = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in std::io::BufReader::new(out).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let num = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .strip_suffix(word)
                            .map(str::trim)
                            .and_then(|n| n.rsplit(' ').next()?.parse().ok())
                    })
                    .unwrap_or(0)
            };
            passed += num(" passed");
            failed += num(" failed");
            ignored += num(" ignored");
        }
    }
    let status = child.wait()?;
    println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    Ok(())
}

/// The fuzz targets (fuzz/fuzz_targets).
const FUZZ_TARGETS: &[&str] = &[
    "protocol_frames",
    "image_maps",
    "media_records",
    "nbd_negotiation",
    "control_requests",
    "tar_index",
    "tape_records",
];

/// Run every fuzz target for `seconds`, with the committed seeds. cargo-fuzz
/// wants nightly; these machines have stable only, so RUSTC_BOOTSTRAP lets
/// stable rustc take libFuzzer's -Z flags (no sanitizer: `-s none`).
fn fuzz(seconds: u64) -> Result<()> {
    if !util::have_cargo_subcommand("fuzz") {
        eprintln!("xtask: installing cargo-fuzz");
        util::cargo(&["install", "cargo-fuzz", "--locked"])?;
    }
    let dir = util::root().join("fuzz");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Targets that need scratch files make them under TMPDIR: one of ours,
    // removed after the run.
    let scratch = dir.join("target/tmp");
    std::fs::create_dir_all(&scratch)?;
    for t in FUZZ_TARGETS {
        let corpus = dir.join("target/corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        let mut cmd = std::process::Command::new(&cargo);
        cmd.current_dir(&dir)
            .env("RUSTC_BOOTSTRAP", "1")
            .env("TMPDIR", &scratch)
            .args(["fuzz", "run", t, "-s", "none"])
            .arg(&corpus);
        let seeds = dir.join("seeds").join(t);
        if seeds.exists() {
            cmd.arg(&seeds);
        }
        cmd.arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-rss_limit_mb=2048");
        eprintln!("xtask: fuzzing {t} for {seconds} s");
        let out = cmd.output()?;
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            eprintln!("{log}");
            bail!("fuzz target {t} failed to build or found a crash (artifacts in fuzz/artifacts/{t})");
        }
        if let Some(last) = log.lines().rev().find(|l| l.starts_with("Done")) {
            eprintln!("xtask: {t}: {last}");
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    println!(
        "fuzz: {} targets ran {seconds} s each without a crash",
        FUZZ_TARGETS.len()
    );
    Ok(())
}

/// Build a release tarball: bin/floe, bin/floe-sim-san, lib/floe/plugins.
fn dist() -> Result<std::path::PathBuf> {
    util::build_shipped(true)?;
    let root = util::root();
    let version = env!("CARGO_PKG_VERSION");
    let name = format!("floe-{version}-{}-linux", std::env::consts::ARCH);
    let stage = root.join("target/dist").join(&name);
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(stage.join("bin"))?;
    std::fs::create_dir_all(stage.join("lib/floe/plugins"))?;
    let rel = root.join("target/release");
    for b in ["floe", "floe-sim-san"] {
        std::fs::copy(rel.join(b), stage.join("bin").join(b))?;
    }
    for p in ["array", "disk", "null", "tar"] {
        let f = format!("libfloe_plugin_{p}.so");
        std::fs::copy(rel.join(&f), stage.join("lib/floe/plugins").join(&f))?;
    }
    std::fs::copy(root.join("README.md"), stage.join("README.md"))?;
    let tarball = root.join("target/dist").join(format!("{name}.tar.gz"));
    util::run(
        std::process::Command::new("tar")
            .arg("-czf")
            .arg(&tarball)
            .arg("-C")
            .arg(root.join("target/dist"))
            .arg(&name),
    )?;
    // Prove it runs from wherever it is unpacked.
    let check = std::env::temp_dir().join(format!("floe-dist-check-{}", std::process::id()));
    std::fs::create_dir_all(&check)?;
    util::run(
        std::process::Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&check),
    )?;
    let out = std::process::Command::new(check.join(&name).join("bin/floe"))
        .arg("plugins")
        .env_remove("FLOE_PLUGIN_DIR")
        .output()?;
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    std::fs::remove_dir_all(&check)?;
    for p in ["array", "disk", "null"] {
        if !listed.contains(&format!("lib/floe/plugins/libfloe_plugin_{p}.so")) {
            bail!("the unpacked tarball does not find plugin {p}:\n{listed}");
        }
    }
    println!("{}", tarball.display());
    Ok(tarball)
}
