//! Shared helpers: running commands, installing packages, processes.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Run a command, failing on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let st = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

/// The packages of a Floe installation: binaries and every plugin.
pub const SHIPPED: &[&str] = &[
    "floe",
    "floe-sim-san",
    "floe-plugin-array",
    "floe-plugin-btrfs",
    "floe-plugin-btrfs-snapshot",
    "floe-plugin-fiemap",
    "floe-plugin-fsflush",
    "floe-plugin-disk",
    "floe-plugin-lvm",
    "floe-plugin-null",
    "floe-plugin-reflink",
    "floe-plugin-tar",
    "floe-plugin-tape",
    "floe-plugin-restic",
];

/// Build the shipped packages (`release` or debug).
pub fn build_shipped(release: bool) -> Result<()> {
    let mut args = vec!["build"];
    if release {
        args.push("--release");
    }
    for p in SHIPPED {
        args.extend(["-p", p]);
    }
    cargo(&args)
}

/// Run cargo in the workspace.
pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).args(args).current_dir(root()))
}

/// Is `cmd` on PATH?
pub fn have(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .chain(["/usr/sbin".into(), "/sbin".into()])
                .any(|d| d.join(cmd).is_file())
        })
        .unwrap_or(false)
}

/// Is `cargo SUB` available (a `cargo-SUB` on PATH or in ~/.cargo/bin)?
pub fn have_cargo_subcommand(sub: &str) -> bool {
    let bin = format!("cargo-{sub}");
    have(&bin)
        || std::env::var_os("HOME")
            .is_some_and(|h| Path::new(&h).join(".cargo/bin").join(&bin).is_file())
        || std::env::var_os("CARGO_HOME")
            .is_some_and(|h| Path::new(&h).join("bin").join(&bin).is_file())
}

/// Install the Debian packages that provide missing commands.
pub fn ensure_packages(needs: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = needs
        .iter()
        .filter(|(c, _)| !have(c))
        .map(|(_, p)| *p)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !have("apt-get") {
        eprintln!(
            "xtask: cannot install {missing:?}: no apt-get; tests needing them will skip loudly"
        );
        return Ok(());
    }
    eprintln!("xtask: installing {missing:?}");
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// A child process killed (by its own pid) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start floe-sim-san from `bin`; the process and its ready line.
pub fn start_sim_san(
    bin: &Path,
    dir: &Path,
    luns: &[String],
    raw_luns: &[String],
) -> Result<(Proc, serde_json::Value)> {
    let mut cmd = Command::new(bin.join("floe-sim-san"));
    cmd.args(["serve", "--dir"]).arg(dir).args([
        "--nbd",
        "127.0.0.1:0",
        "--control",
        "127.0.0.1:0",
    ]);
    for l in luns {
        cmd.args(["--lun", l]);
    }
    for l in raw_luns {
        cmd.args(["--raw-lun", l]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("start floe-sim-san")?;
    let out = child.stdout.take().context("stdout")?;
    let proc = Proc(child);
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    let ready: serde_json::Value = serde_json::from_str(&line).context("sim-san ready line")?;
    Ok((proc, ready))
}

/// Start a floe agent listening on loopback; the process and its address.
pub fn start_agent(bin: &Path, control: &str, keep: bool) -> Result<(Proc, String)> {
    let mut child = Command::new(bin.join("floe"))
        .args([
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--allow-source",
            "array:*",
            "--plugin-opt",
        ])
        .arg(format!("array.control={control}"))
        .arg("--plugin-opt")
        .arg(format!("array.keep={keep}"))
        .stderr(Stdio::piped())
        .spawn()
        .context("start floe agent")?;
    let err = child.stderr.take().context("stderr")?;
    let proc = Proc(child);
    let mut r = BufReader::new(err);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            bail!("the agent exited before it listened");
        }
        if line.contains("listening on") {
            break;
        }
        eprint!("[agent] {line}");
    }
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .context("agent address")?
        .to_string();
    // Keep draining its stderr so it never blocks on a full pipe.
    std::thread::spawn(move || {
        for l in r.lines().map_while(Result::ok) {
            eprintln!("[agent] {l}");
        }
    });
    Ok((proc, addr))
}

/// BLAKE3 of the first `len` bytes of a file.
pub fn blake3_prefix(path: &Path, len: u64) -> Result<String> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut r = f.take(len);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().to_hex().to_string())
}
