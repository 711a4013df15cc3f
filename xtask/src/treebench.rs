//! `cargo xtask bench --case tree`: a cold tree of 70,000 files
//! (`../shared/bench/make-tree.py`, a source-tree-like mix) on ext4 on a
//! loop device, backed up by Floe (agent: fsflush + fiemap; mover: reads
//! a read-only loop device over the image with O_DIRECT, the loop device
//! itself in direct-I/O mode) to disk media in
//! the open format (plugin `tar`: one pax archive per set on the disk),
//! beside `tar -cf` and `restic backup` of the same tree to the same disk,
//! and Floe again with writes held for the whole backup
//! (`fsflush.hold_writes=backup`: a second agent) and to compressed tar
//! media (`compress=zstd`), rounds interleaved (the five runs in a
//! balanced order, each right after each other equally often over the
//! default 10 rounds), page cache dropped before each run. Then restore
//! (3 rounds at most): `floe restore --to-dir` from both archives beside
//! `tar -xf`.
//!
//! `--case tree-san --latency-us N`: the same tree on a sim-san LUN that
//! answers every read after N µs, seen by the host (and by the mover)
//! through nbdfuse and loop devices — storage where each read waits, as
//! the brief's was; backup only, one round unless told.
//!
//! Reported: wall time; CPU seconds of the agent (the application host's
//! cost) and of tar/restic; bytes the agent read from storage and bytes it
//! wrote to the mover (`/proc/PID/io`).

use crate::util::{self, Proc};
use anyhow::{bail, Context, Result};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
}

/// (user+system CPU seconds, read_bytes, wchar) of a process.
fn proc_stats(pid: u32) -> Result<(f64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the command: state is 3rd field overall → index 0 here;
    // utime is field 14 → index 11, stime 15 → 12.
    let ticks = f.get(11).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))?;
    let get = |k: &str| {
        io.lines()
            .find_map(|l| {
                l.strip_prefix(k)
                    .map(|v| v.trim().parse::<u64>().unwrap_or(0))
            })
            .unwrap_or(0)
    };
    Ok((ticks / 100.0, get("read_bytes:"), get("wchar:")))
}

/// Run `script` under bash, timing it; (wall seconds, children CPU seconds).
fn timed_shell(script: &str, env: &[(&str, &str)]) -> Result<(f64, f64)> {
    drop_caches();
    let mut c = Command::new("bash");
    c.arg("-c")
        .arg(format!("set -e; {script} >/dev/null; times"));
    for (k, v) in env {
        c.env(k, v);
    }
    let t = Instant::now();
    let out = c.stderr(Stdio::piped()).output()?;
    let wall = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("{script} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    // `times`: shell user/sys, then children user/sys ("0m1.234s 0m0.567s").
    let text = String::from_utf8_lossy(&out.stdout);
    let secs = |t: &str| -> f64 {
        let (m, s) = t
            .trim_end_matches('s')
            .split_once('m')
            .unwrap_or(("0", "0"));
        m.parse::<f64>().unwrap_or(0.0) * 60.0 + s.parse::<f64>().unwrap_or(0.0)
    };
    let cpu = text
        .lines()
        .last()
        .map(|l| l.split_whitespace().map(secs).sum())
        .unwrap_or(0.0);
    Ok((wall, cpu))
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

/// Where the tree's file system lives.
#[derive(Clone, Copy, Debug)]
pub enum Storage {
    /// An image file on this machine's disk, behind a loop device; the
    /// mover reads a second, read-only loop device over the same image.
    Loop,
    /// A raw LUN of the SAN simulator answering each read after this many
    /// microseconds, seen through nbdfuse and loop devices (kernel block
    /// devices whose every request crosses NBD): one the host mounts, a
    /// read-only one the mover reads.
    San {
        /// Delay of every read request, microseconds.
        latency_us: u64,
    },
}

/// A mounted file system on loop devices (umounted and detached when
/// dropped), and what else it stands on (dropped after: the FUSE file,
/// then the simulator).
struct Mount {
    loops: Vec<String>,
    mnt: PathBuf,
    fuse: Option<(Proc, PathBuf)>,
    _san: Option<Proc>,
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        for l in &self.loops {
            let _ = Command::new("losetup").args(["-d", l]).status();
        }
        if let Some((_, dir)) = &self.fuse {
            // Detaching a loop device is asynchronous: retry until the
            // FUSE file is no longer busy.
            for _ in 0..50 {
                if Command::new("umount")
                    .arg(dir)
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
                {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

/// Attach `file` to a loop device (read-only with `ro`).
fn attach(file: &Path, extra: &[&str]) -> Result<String> {
    sh(Command::new("losetup")
        .args(["-f", "--show"])
        .args(extra)
        .arg(file))
}

/// Make ext4 on `file` and the bench tree in it (mounted at `mnt` while
/// it is made, unmounted after); the tree's data bytes.
fn make_tree(file: &Path, mnt: &Path, script: &Path, files: usize) -> Result<u64> {
    sh(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(file))?;
    let dev = attach(file, &[])?;
    sh(Command::new("mount").arg(&dev).arg(mnt))?;
    let tree = mnt.join("tree");
    eprintln!("bench tree: making {files} files with {}", script.display());
    let made = sh(Command::new("python3")
        .arg(script)
        .arg(&tree)
        .args(["--files", &files.to_string()]))
    .and_then(|_| sh(Command::new("du").args(["-sb"]).arg(&tree)));
    let _ = Command::new("umount").arg(mnt).status();
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    Ok(made?
        .split_whitespace()
        .next()
        .and_then(|x| x.parse().ok())
        .unwrap_or(0))
}

/// The tree's file system mounted at `mnt` as `storage` says; the mount,
/// the device identity the agent reports for it, where the mover reads
/// that device, and the data bytes of the tree.
fn mount_tree(
    storage: Storage,
    bin: &Path,
    work: &Path,
    script: &Path,
    files: usize,
) -> Result<(Mount, String, String, u64)> {
    let mnt = work.join("mnt");
    match storage {
        Storage::Loop => {
            let img = work.join("tree.img");
            std::fs::File::create(&img)?.set_len(6 << 30)?;
            let data = make_tree(&img, &mnt, script, files)?;
            let dev = attach(&img, &[])?;
            let mut m = Mount {
                loops: vec![dev.clone()],
                mnt: mnt.clone(),
                fuse: None,
                _san: None,
            };
            sh(Command::new("mount").arg(&dev).arg(&mnt))?;
            // The mover's path to the "SAN": direct I/O from the loop
            // device to the image, as an HBA's DMA, not through this
            // host's page cache (a buffered loop device copies every
            // block once more in its worker: 1.5 s of the 2 cores on
            // this tree, charged to neither tool).
            let ro = attach(&img, &["--direct-io=on", "-r"])?;
            m.loops.push(ro.clone());
            Ok((m, format!("file:{}", img.display()), ro, data))
        }
        Storage::San { latency_us } => {
            util::ensure_packages(&[("nbdfuse", "libnbd-bin")])?;
            let (san, ready) =
                util::start_sim_san(bin, &work.join("san"), &[], &["tree=4G".to_string()])?;
            let control = ready["control"].as_str().context("control")?.to_string();
            let nbd = ready["nbd"].as_str().context("nbd")?.to_string();
            let mut c = floe_sim_san::control::Client::connect(&control)?;
            let luns = c.call(floe_sim_san::control::Op::ListLuns)?;
            let lun = luns
                .as_array()
                .and_then(|l| l.iter().find(|l| l["name"] == "tree"))
                .context("the tree LUN")?;
            let path = PathBuf::from(lun["path"].as_str().context("LUN path")?);
            let size = lun["size"].as_u64().context("LUN size")?;
            // Built straight in the LUN's file (fast), then seen only
            // through the SAN.
            let data = make_tree(&path, &mnt, script, files)?;
            let fuse_dir = work.join("fuse");
            std::fs::create_dir_all(&fuse_dir)?;
            let fuse = Proc(
                Command::new("nbdfuse")
                    .arg(&fuse_dir)
                    .arg(format!("nbd://{nbd}/tree"))
                    .spawn()
                    .context("start nbdfuse")?,
            );
            let file = fuse_dir.join("nbd");
            for _ in 0..100 {
                if file.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let mut m = Mount {
                loops: Vec::new(),
                mnt: mnt.clone(),
                fuse: Some((fuse, fuse_dir)),
                _san: Some(san),
            };
            let dev = attach(&file, &["--direct-io=on"])?;
            m.loops.push(dev.clone());
            sh(Command::new("mount").arg(&dev).arg(&mnt))?;
            c.call(floe_sim_san::control::Op::InjectLatency {
                lun: "tree".into(),
                offset: floe_core::units::DeviceOffset(0),
                length: floe_core::units::Bytes(size),
                millis: 0,
                micros: latency_us,
            })?;
            // The mover's own read-only path to the same LUN: a loop
            // device over the FUSE file (the host's device is known by
            // its backing file; the NBD export by its WWN, which the mover
            // would rightly refuse as another device).
            let ro = attach(&file, &["--direct-io=on", "-r"])?;
            m.loops.push(ro.clone());
            Ok((m, format!("file:{}", file.display()), ro, data))
        }
    }
}

/// Tools in a round of the tree case (tar, restic, and Floe three ways).
pub const TOOLS: usize = 5;
/// Rounds of a whole [`round_order`] design for [`TOOLS`].
pub const DESIGN_ROUNDS: usize = if TOOLS % 2 == 1 { 2 * TOOLS } else { TOOLS };

/// The order of `n` tools in round `round`: a Williams design (rows of
/// the sequence 0, 1, n−1, 2, n−2, … shifted by one each row; for odd
/// `n` each row also run backwards, in the next round), so each tool
/// follows each other about equally often. A plain rotation keeps
/// neighbours: the tool after restic — whose gigabytes of freed memory
/// this VM's host takes back, to be faulted in again by whoever runs
/// next — was the same one in four rounds of five.
fn round_order(round: usize, n: usize) -> Vec<usize> {
    let base = (0..n).map(|k| {
        if k % 2 == 1 {
            k.div_ceil(2)
        } else {
            (n - k / 2) % n
        }
    });
    let (shift, backwards) = if n % 2 == 1 {
        (round / 2, round % 2 == 1)
    } else {
        (round, false)
    };
    let mut row: Vec<usize> = base.map(|x| (x + shift) % n).collect();
    if backwards {
        row.reverse();
    }
    row
}

#[cfg(test)]
mod tests {
    use super::round_order;

    #[test]
    fn each_tool_follows_each_other_equally_over_a_whole_design() {
        for n in 2..8 {
            let rounds = if n % 2 == 1 { 2 * n } else { n };
            let mut after = vec![vec![0; n]; n];
            for r in 0..rounds {
                let row = round_order(r, n);
                let mut sorted = row.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "round {r} of {n}");
                for w in row.windows(2) {
                    after[w[0]][w[1]] += 1;
                }
            }
            let want = if n % 2 == 1 { 2 } else { 1 };
            for (a, row) in after.iter().enumerate() {
                for (b, &c) in row.iter().enumerate() {
                    assert_eq!(c, if a == b { 0 } else { want }, "{b} after {a}, n {n}");
                }
            }
        }
    }
}

/// The tree case.
/// A `floe agent` serving the tree, with what its log says about held
/// writes (one line per backup).
struct FloeAgent {
    proc: Proc,
    addr: String,
    held: std::sync::mpsc::Receiver<f64>,
}

impl FloeAgent {
    fn start(bin: &Path, source: &str, opts: &[String]) -> Result<FloeAgent> {
        let mut child = Command::new(bin.join("floe"))
            .args(["agent", "--listen", "127.0.0.1:0", "--allow-source", source])
            .args(opts)
            .stderr(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        let mut log = std::io::BufReader::new(child.stderr.take().context("stderr")?);
        let proc = Proc(child);
        log.read_line(&mut line)?;
        // The rest of the agent's log: how long it held writes, per backup.
        let (held_tx, held) = std::sync::mpsc::channel::<f64>();
        std::thread::spawn(move || {
            for l in log.lines().map_while(std::result::Result::ok) {
                let secs = l
                    .split("writes held ")
                    .nth(1)
                    .and_then(|r| r.split(' ').next())
                    .and_then(|n| n.parse().ok());
                if let Some(secs) = secs {
                    let _ = held_tx.send(secs);
                }
            }
        });
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .unwrap_or_default()
            .to_string();
        Ok(FloeAgent { proc, addr, held })
    }
}

/// Floe's figures, one entry per round.
#[derive(Default)]
struct FloeRuns {
    t: Vec<f64>,
    cpu: Vec<f64>,
    agent_read: Vec<f64>,
    agent_sent: Vec<f64>,
    mover_read: Vec<f64>,
    phases: [Vec<f64>; 4],
    held: Vec<f64>,
    /// Bytes of the set's archive on the media.
    media: Vec<f64>,
}

/// Bytes of the files under `path` (a restic repository, an archive).
fn bytes_under(path: &Path) -> f64 {
    let mut n = 0u64;
    let mut todo = vec![path.to_path_buf()];
    while let Some(p) = todo.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.is_dir() {
            todo.extend(
                std::fs::read_dir(&p)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path()),
            );
        } else {
            n += m.len();
        }
    }
    n as f64
}

impl FloeRuns {
    /// Back the tree up through `agent` (cold cache) to tar media in
    /// `out/media` with `media_opts`; the set's id.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        bin: &Path,
        out: &Path,
        media: &str,
        media_opts: &[&str],
        agent: &FloeAgent,
        source: &str,
        id: &str,
        device: &str,
    ) -> Result<String> {
        drop_caches();
        let pid = agent.proc.0.id();
        let before = proc_stats(pid)?;
        let start = Instant::now();
        let o = Command::new(bin.join("floe"))
            .arg("--catalog")
            .arg(out.join("catalog.db"))
            .args([
                "backup",
                "--agent",
                &agent.addr,
                "--source",
                source,
                "--json=summary",
                "--media",
            ])
            .arg(format!("tar:{}", out.join(media).display()))
            .args(media_opts.iter().flat_map(|o| ["--media-opt", o]))
            .args(["--device", &format!("{id}={device}"), "--allow-device", id])
            .output()?;
        if !o.status.success() {
            bail!("floe backup failed: {}", String::from_utf8_lossy(&o.stderr));
        }
        let _ = Command::new("sync").arg("-f").arg(out).status();
        let w = start.elapsed().as_secs_f64();
        let after = proc_stats(pid)?;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
        self.t.push(w);
        self.cpu.push(after.0 - before.0);
        self.agent_read.push((after.1 - before.1) as f64);
        // Socket sends are not in /proc/PID/io's wchar: the mover counts
        // what it received from the agent.
        self.agent_sent
            .push(v["bytes_from_agent"].as_f64().unwrap_or(0.0));
        self.mover_read
            .push(v["bytes_read"].as_f64().unwrap_or(0.0));
        let set = v["set"]["header"]["set"].as_str().unwrap_or_default();
        self.media.push(
            ["tar", "tar.zst"]
                .iter()
                .map(|x| bytes_under(&out.join(media).join(format!("{set}.{x}"))))
                .sum(),
        );
        if let Ok(secs) = agent.held.recv_timeout(std::time::Duration::from_secs(5)) {
            self.held.push(secs);
        }
        for (k, phase) in ["map", "move", "media_commit", "catalog"]
            .iter()
            .enumerate()
        {
            self.phases[k].push(v["seconds"][phase].as_f64().unwrap_or(0.0));
        }
        Ok(v["set"]["header"]["set"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    fn phases_json(&self) -> serde_json::Value {
        serde_json::json!({"map": median(&self.phases[0]), "move": median(&self.phases[1]),
            "media_commit": median(&self.phases[2]), "catalog": median(&self.phases[3])})
    }

    fn report(&self, what: &str, tar: f64, restic: f64, tar_cpu: f64, data: u64) {
        let floe = median(&self.t);
        println!("  {what}");
        println!(
            "                     {floe:>7.2} s   agent CPU {:>6.2} s, agent read {:.0} B, agent→mover {:.0} B, mover read {:.0} B",
            median(&self.cpu),
            median(&self.agent_read),
            median(&self.agent_sent),
            median(&self.mover_read)
        );
        println!(
            "    phases: freeze+map {:.2} s, move {:.2} s, media commit {:.2} s, catalog {:.2} s",
            median(&self.phases[0]),
            median(&self.phases[1]),
            median(&self.phases[2]),
            median(&self.phases[3])
        );
        println!(
            "    writes held on the host (agent's log): {:.2} s; archive {:.0} B",
            median(&self.held),
            median(&self.media)
        );
        println!("    floe / tar          {:.3}  (target <= 0.2)", floe / tar);
        println!(
            "    floe / restic       {:.3}  (target <= 0.15)",
            floe / restic
        );
        println!(
            "    agent CPU / tar CPU {:.3}  (target <= 0.1)",
            median(&self.cpu) / tar_cpu.max(1e-9)
        );
        println!(
            "    agent→mover / data  {:.4}  (target <= 0.01)",
            median(&self.agent_sent) / data as f64
        );
    }
}

pub fn run(
    bin: &Path,
    rounds: usize,
    files: usize,
    storage: Storage,
    agent_opts: &[String],
) -> Result<()> {
    util::ensure_packages(&[
        ("mkfs.ext4", "e2fsprogs"),
        ("restic", "restic"),
        ("python3", "python3"),
    ])?;
    let script = util::root()
        .parent()
        .context("workspace parent")?
        .join("shared/bench/make-tree.py");
    if !script.exists() {
        bail!(
            "{} is missing: the tree bench needs ../shared beside the repository",
            script.display()
        );
    }
    let work = util::root().join("target/bench-tree");
    let _ = Command::new("umount")
        .arg(work.join("mnt"))
        .stderr(Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("mnt"))?;
    // Whatever ends the run (a failed tool, a full disk), the work
    // directory goes — after the mount below is undone (dropped first).
    struct RemoveOnDrop(PathBuf);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _work = RemoveOnDrop(work.clone());
    let (m, id, device, data) = mount_tree(storage, bin, &work, &script, files)?;
    let mnt = m.mnt.clone();
    let tree = mnt.join("tree");
    let source = format!("fsflush:{}", tree.display());
    let agent = FloeAgent::start(bin, &source, agent_opts)?;
    // Writes held for the whole backup: checks answered by a FIFREEZE
    // probe instead of a look at each file.
    let mut hold_opts = agent_opts.to_vec();
    hold_opts.extend(["--plugin-opt".into(), "fsflush.hold_writes=backup".into()]);
    let hold_agent = FloeAgent::start(bin, &source, &hold_opts)?;
    let out = work.join("out");
    let restic_env = [("RESTIC_PASSWORD", "floe-bench")];
    let mut t: [Vec<f64>; 2] = Default::default();
    let mut cpu: [Vec<f64>; 2] = Default::default();
    let mut stored: [Vec<f64>; 2] = Default::default();
    let (mut floe, mut hold, mut zst) = (
        FloeRuns::default(),
        FloeRuns::default(),
        FloeRuns::default(),
    );
    let (mut set, mut zset) = (String::new(), String::new());
    const ZSTD: &[&str] = &["compress=zstd"];
    for round in 0..rounds {
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out)?;
        // Each round in its own order (see `round_order`): what a run
        // leaves behind (freed memory the VM's host takes back, dirty
        // pages) falls on each tool alike.
        for tool in round_order(round, TOOLS) {
            match tool {
                0 => {
                    let (w, c) = timed_shell(
                        &format!(
                            "tar -cf '{}/tree.tar' -C '{}' tree && sync -f '{}'",
                            out.display(),
                            mnt.display(),
                            out.display()
                        ),
                        &[],
                    )?;
                    t[0].push(w);
                    cpu[0].push(c);
                    stored[0].push(bytes_under(&out.join("tree.tar")));
                }
                1 => {
                    let repo = out.join("restic");
                    sh(Command::new("restic")
                        .args(["init", "-q", "-r"])
                        .arg(&repo)
                        .env("RESTIC_PASSWORD", "floe-bench"))?;
                    let (w, c) = timed_shell(
                        &format!(
                            "restic -q -r '{}' backup '{}' && sync -f '{}'",
                            repo.display(),
                            tree.display(),
                            out.display()
                        ),
                        &restic_env,
                    )?;
                    t[1].push(w);
                    cpu[1].push(c);
                    stored[1].push(bytes_under(&repo));
                    let _ = std::fs::remove_dir_all(&repo);
                }
                2 => set = floe.run(bin, &out, "floe", &[], &agent, &source, &id, &device)?,
                3 => {
                    hold.run(bin, &out, "floe", &[], &hold_agent, &source, &id, &device)?;
                }
                _ => {
                    zset = zst.run(bin, &out, "floe-zstd", ZSTD, &agent, &source, &id, &device)?;
                }
            }
        }
        eprintln!(
            "round {round}: tar {:.1} s, restic {:.1} s, floe {:.1} s (agent CPU {:.2} s, read {} B, sent {} B), floe with writes held {:.1} s (agent CPU {:.2} s), floe to zstd media {:.1} s",
            t[0][round], t[1][round], floe.t[round], floe.cpu[round], floe.agent_read[round], floe.agent_sent[round], hold.t[round], hold.cpu[round], zst.t[round]
        );
    }
    // Restore: the last round's set and archive, to fresh directories on
    // the same disk (not with the tree on the SAN: restore does not read
    // the source's storage).
    let mut rt: [Vec<f64>; 3] = Default::default();
    // At most 3 restore rounds: each leaves three copies of the tree
    // (4.5 GB) until the end, and 5 of them filled this VM's disk.
    let restores = if matches!(storage, Storage::Loop) {
        rounds.min(3)
    } else {
        0
    };
    // Each round into new directories, nothing deleted until the end:
    // ext4 passes over inodes freed in the last minute when it allocates,
    // so a restore right after removing the previous one's 70,000 files
    // paid for that search (a fifth of its CPU) and the ratio swung by a
    // third from run to run.
    // `floe restore` of a set from tar media in `out/MEDIA` to `out/DEST`.
    let floe_restore = |media: &str, set: &str, dest: &str| {
        timed_shell(
            &format!(
                "'{}' --catalog '{}' restore --media tar:'{}' --set '{set}' --to-dir '{}' && sync -f '{}'",
                bin.join("floe").display(),
                out.join("catalog.db").display(),
                out.join(media).display(),
                out.join(dest).display(),
                out.display()
            ),
            &[],
        )
    };
    for round in 0..restores {
        rt[0].push(floe_restore("floe", &set, &format!("restore-floe-{round}"))?.0);
        let dest = out.join(format!("restore-tar-{round}"));
        std::fs::create_dir_all(&dest)?;
        let (w, _) = timed_shell(
            &format!(
                "tar -xf '{}/tree.tar' -C '{}' && sync -f '{}'",
                out.display(),
                dest.display(),
                out.display()
            ),
            &[],
        )?;
        rt[1].push(w);
        rt[2].push(floe_restore("floe-zstd", &zset, &format!("restore-floe-zstd-{round}"))?.0);
    }
    let (tar, restic) = (median(&t[0]), median(&t[1]));
    let on = match storage {
        Storage::Loop => "ext4 on a loop device".to_string(),
        Storage::San { latency_us } => format!(
            "ext4 on a sim-san LUN answering each read after {} ms (through nbdfuse + loop devices)",
            latency_us as f64 / 1000.0
        ),
    };
    println!("\nfile tree: {files} files, {data} bytes, {on}, cold cache, median of {rounds} interleaved rounds (balanced order)");
    println!(
        "  tar -cf            {tar:>7.2} s   CPU {:>6.2} s   archive {:.0} B",
        median(&cpu[0]),
        median(&stored[0])
    );
    println!(
        "  restic backup      {restic:>7.2} s   CPU {:>6.2} s   repository {:.0} B",
        median(&cpu[1]),
        median(&stored[1])
    );
    let tar_cpu = median(&cpu[0]);
    floe.report("floe backup", tar, restic, tar_cpu, data);
    hold.report(
        "floe backup, writes held for the backup (fsflush.hold_writes=backup)",
        tar,
        restic,
        tar_cpu,
        data,
    );
    zst.report(
        "floe backup to compressed media (tar media, compress=zstd; restic compresses too)",
        tar,
        restic,
        tar_cpu,
        data,
    );
    let (restore_floe, restore_tar, restore_zst) = if restores > 0 {
        (median(&rt[0]), median(&rt[1]), median(&rt[2]))
    } else {
        (f64::NAN, f64::NAN, f64::NAN)
    };
    if restores > 0 {
        println!(
            "  restore: floe --to-dir {restore_floe:.2} s, tar -xf {restore_tar:.2} s, ratio {:.2} (target <= 1.0); from compressed media {restore_zst:.2} s, ratio {:.2}",
            restore_floe / restore_tar,
            restore_zst / restore_tar
        );
    }
    let latency_us = match storage {
        Storage::Loop => None,
        Storage::San { latency_us } => Some(latency_us),
    };
    let json = serde_json::json!({
        "storage": on, "san_latency_us": latency_us,
        "files": files, "data_bytes": data, "rounds": rounds,
        "tar_s": tar, "restic_s": restic, "floe_s": median(&floe.t),
        "tar_cpu_s": tar_cpu, "restic_cpu_s": median(&cpu[1]), "agent_cpu_s": median(&floe.cpu),
        "tar_archive_bytes": median(&stored[0]), "restic_repository_bytes": median(&stored[1]),
        "floe_archive_bytes": median(&floe.media),
        "agent_read_bytes": median(&floe.agent_read), "agent_sent_bytes": median(&floe.agent_sent),
        "mover_read_bytes": median(&floe.mover_read), "writes_held_s": median(&floe.held),
        "restore_floe_s": restore_floe, "restore_tar_s": restore_tar,
        "floe_phases_s": floe.phases_json(),
        "hold_writes_backup": {
            "floe_s": median(&hold.t), "agent_cpu_s": median(&hold.cpu),
            "agent_sent_bytes": median(&hold.agent_sent), "writes_held_s": median(&hold.held),
            "floe_phases_s": hold.phases_json(),
        },
        "compress_zstd": {
            "floe_s": median(&zst.t), "agent_cpu_s": median(&zst.cpu),
            "archive_bytes": median(&zst.media), "restore_s": restore_zst,
            "floe_phases_s": zst.phases_json(),
        },
    });
    std::fs::create_dir_all(util::root().join("target/bench"))?;
    let name = if restores > 0 {
        "tree.json"
    } else {
        "tree-san.json"
    };
    std::fs::write(
        util::root().join("target/bench").join(name),
        serde_json::to_vec_pretty(&json)?,
    )?;
    drop(agent);
    drop(hold_agent);
    drop(m);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
