//! `cargo xtask bench`: the mover beside `dd iflag=direct` and `nbdcopy`,
//! on the same bytes, in one run. Each tool runs several rounds,
//! interleaved, with the page cache dropped before each (when root); the
//! best round of each is compared. Ratios, not absolute numbers, are the
//! result: these machines are shared and noisy.

use crate::util::{self, start_agent, start_sim_san};
use anyhow::{bail, Context, Result};
use floe_core::units::{Bytes, DeviceOffset};
use floe_sim_san::control::{Client, Op};
use std::process::{Command, Stdio};
use std::time::Instant;

const MIB: u64 = 1 << 20;

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
}

fn timed(name: &str, cmd: &mut Command) -> Result<f64> {
    drop_caches();
    let t = Instant::now();
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("run {name}"))?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("{name} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(secs)
}

/// The words of an option's value (`--floe-opts "--window 8M"`).
fn words(value: Option<&String>, option: &str) -> Result<Vec<String>> {
    Ok(value
        .with_context(|| format!("{option} \"OPTIONS\""))?
        .split_whitespace()
        .map(String::from)
        .collect())
}

pub fn run(args: &[String]) -> Result<()> {
    let mut size_mib = 2048u64;
    let mut rounds = 7usize;
    let mut floe_opts: Vec<String> = Vec::new();
    let mut agent_opts: Vec<String> = Vec::new();
    let mut case = "all".to_string();
    let mut files = 70_000usize;
    let mut latency_us = 1000u64;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--size-mib" => size_mib = it.next().context("--size-mib N")?.parse()?,
            "--rounds" => rounds = it.next().context("--rounds N")?.parse()?,
            "--case" => case = it.next().context("--case volume|tree|tree-san|all")?.clone(),
            "--latency-us" => latency_us = it.next().context("--latency-us N")?.parse()?,
            "--files" => files = it.next().context("--files N")?.parse()?,
            "--floe-opts" => floe_opts = words(it.next(), "--floe-opts")?,
            "--agent-opts" => agent_opts = words(it.next(), "--agent-opts")?,
            other => bail!(
                "unknown bench option {other} (--case volume|tree|tree-san|all, --size-mib N, --rounds N, --files N, --latency-us N, --floe-opts \"...\" (volume case: the mover's), --agent-opts \"...\" (tree cases: the agent's, e.g. --plugin-opt fiemap.on_disk=false))"
            ),
        }
    }
    // The tree case: a whole balanced design unless told, each tool right
    // after each other equally often (what one leaves behind — restic's
    // gigabytes of freed memory, which this VM's host takes back — falls
    // on every tool alike; with 3 rotated rounds it fell on one of Floe's
    // runs in every round but one).
    let tree_rounds = if args.iter().any(|a| a == "--rounds") {
        rounds
    } else {
        crate::treebench::DESIGN_ROUNDS
    };
    if case == "tree" {
        util::build_shipped(true)?;
        return crate::treebench::run(
            &util::root().join("target/release"),
            tree_rounds,
            files,
            crate::treebench::Storage::Loop,
            &agent_opts,
        );
    }
    if case == "tree-san" {
        // tar and restic read 70,000 files a request at a time: a round
        // takes minutes, so one round unless told.
        util::build_shipped(true)?;
        let rounds = if args.iter().any(|a| a == "--rounds") {
            rounds
        } else {
            1
        };
        return crate::treebench::run(
            &util::root().join("target/release"),
            rounds.min(3),
            files,
            crate::treebench::Storage::San { latency_us },
            &agent_opts,
        );
    }
    util::ensure_packages(&[("nbdcopy", "libnbd-bin")])?;
    util::build_shipped(true)?;
    let bin = util::root().join("target/release");
    let work = util::root().join("target/bench-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let size = size_mib * MIB;
    let (_san, ready) =
        start_sim_san(&bin, &work.join("san"), &[format!("lun0={size_mib}M")], &[])?;
    let control = ready["control"].as_str().context("control")?.to_string();
    let nbd = ready["nbd"].as_str().context("nbd")?.to_string();
    let mut c = Client::connect(&control)?;
    // One volume filling the LUN, laid out in order, so every tool reads
    // exactly the same bytes; random data, written through the array.
    c.call(Op::CreateVolume {
        name: "bench".into(),
        size: Bytes(size),
        max_run_chunks: Some(size / (64 * 1024)),
        luns: None,
    })?;
    let mut off = 0;
    while off < size {
        let n = (64 * MIB).min(size - off);
        c.call(Op::Write {
            target: "bench".into(),
            offset: DeviceOffset(off),
            length: Bytes(n),
            seed: off,
        })?;
        off += n;
    }
    let luns = c.call(Op::ListLuns)?;
    let lun = &luns[0];
    let path = lun["path"].as_str().context("path")?.to_string();
    let wwn = lun["wwn"].as_str().context("wwn")?.to_string();
    let (_agent, agent) = start_agent(&bin, &control, false)?;
    let floe = bin.join("floe");
    let mut times: [Vec<f64>; 4] = Default::default();
    let names = [
        "dd iflag=direct bs=4M (local file)",
        "floe mover, local O_DIRECT",
        "nbdcopy (sim-san NBD)",
        "floe mover, sim-san NBD",
    ];
    for round in 0..rounds {
        let runs: [Box<dyn Fn() -> Result<f64>>; 4] = [
            Box::new(|| {
                timed(
                    "dd",
                    Command::new("dd").arg(format!("if={path}")).args([
                        "of=/dev/null",
                        "bs=4M",
                        "iflag=direct",
                    ]),
                )
            }),
            Box::new(|| {
                timed(
                    "floe local",
                    Command::new(&floe)
                        .args([
                            "backup",
                            "--agent",
                            &agent,
                            "--source",
                            "array:bench",
                            "--media",
                            "null:",
                            "--allow-device",
                            &wwn,
                            "--device",
                            &format!("{wwn}={path}"),
                        ])
                        .args(&floe_opts),
                )
            }),
            Box::new(|| {
                timed(
                    "nbdcopy",
                    Command::new("nbdcopy").args([&format!("nbd://{nbd}/lun0"), "null:"]),
                )
            }),
            Box::new(|| {
                timed(
                    "floe nbd",
                    Command::new(&floe)
                        .args([
                            "backup",
                            "--agent",
                            &agent,
                            "--source",
                            "array:bench",
                            "--media",
                            "null:",
                            "--allow-device",
                            &wwn,
                            "--san",
                            &format!("nbd://{nbd}"),
                        ])
                        .args(&floe_opts),
                )
            }),
        ];
        for (i, r) in runs.iter().enumerate() {
            let s = r()?;
            times[i].push(s);
            eprintln!(
                "round {round}: {:<36} {:>8.1} MB/s",
                names[i],
                size as f64 / s / 1e6
            );
        }
    }
    // The median round of each tool: the disk of these VMs is served from
    // the host's cache at wildly varying speed, and a best-of picks outliers.
    let median = |v: &Vec<f64>| {
        let mut v = v.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mbs: Vec<f64> = times
        .iter()
        .map(|t| size as f64 / median(t) / 1e6)
        .collect();
    println!(
        "\nvolume of {size_mib} MiB, median of {rounds} interleaved rounds, page cache dropped before each run"
    );
    for (n, m) in names.iter().zip(&mbs) {
        println!("  {n:<36} {m:>8.1} MB/s");
    }
    // Each round's tools ran back to back: the per-round ratio is less
    // exposed to the host's drifts than the ratio of medians.
    let per_round = |a: usize, b: usize| {
        let r: Vec<f64> = times[a]
            .iter()
            .zip(&times[b])
            .map(|(ta, tb)| ta / tb)
            .collect();
        median(&r)
    };
    let (local, nbd) = (per_round(0, 1), per_round(2, 3));
    println!(
        "  ratio floe local / dd        {:.2} of medians, {local:.2} median per round  (target >= 0.9)",
        mbs[1] / mbs[0]
    );
    println!(
        "  ratio floe nbd / nbdcopy     {:.2} of medians, {nbd:.2} median per round  (target >= 0.8)",
        mbs[3] / mbs[2]
    );
    let json = serde_json::json!({
        "size_bytes": size, "rounds": rounds,
        "dd_mbs": mbs[0], "floe_local_mbs": mbs[1], "nbdcopy_mbs": mbs[2], "floe_nbd_mbs": mbs[3],
        "ratio_local": mbs[1] / mbs[0], "ratio_nbd": mbs[3] / mbs[2],
        "ratio_local_per_round": local, "ratio_nbd_per_round": nbd,
    });
    std::fs::create_dir_all(util::root().join("target/bench"))?;
    std::fs::write(
        util::root().join("target/bench/volume.json"),
        serde_json::to_vec_pretty(&json)?,
    )?;
    restore_bench(&floe, &agent, &wwn, &work, size, rounds)?;
    drop(_agent);
    drop(_san);
    let _ = std::fs::remove_dir_all(&work);
    if case == "all" {
        crate::treebench::run(
            &bin,
            tree_rounds,
            files,
            crate::treebench::Storage::Loop,
            &agent_opts,
        )?;
    }
    Ok(())
}

/// Restore: floe from disk media beside a raw `dd` write of the same bytes,
/// and floe from tar media beside `tar -xf` of the same archive.
fn restore_bench(
    floe: &std::path::Path,
    agent: &str,
    wwn: &str,
    work: &std::path::Path,
    size: u64,
    rounds: usize,
) -> Result<()> {
    let backup_to = |media: &str| -> Result<String> {
        let out = Command::new(floe)
            .args(["--catalog"])
            .arg(work.join("catalog.db"))
            .args([
                "backup",
                "--agent",
                agent,
                "--source",
                "array:bench",
                "--allow-device",
                wwn,
            ])
            .args([
                "--device",
                &format!("{wwn}={}", work.join("san/lun0.lun").display()),
                "--media",
                media,
                "--json",
            ])
            .output()?;
        if !out.status.success() {
            bail!(
                "backup to {media} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["set"]["header"]["set"]
            .as_str()
            .context("set id")?
            .to_string())
    };
    let disk = format!("disk:{}", work.join("media-disk").display());
    let tar = format!("tar:{}", work.join("media-tar").display());
    let disk_set = backup_to(&disk)?;
    let tar_set = backup_to(&tar)?;
    let item_file = work
        .join("media-disk")
        .join(&disk_set)
        .join("items/000000.img");
    let archive = work.join("media-tar").join(format!("{tar_set}.tar"));
    let target = work.join("restore.img");
    let tar_dest = work.join("restore-tar");
    let names = [
        "dd of=… bs=4M conv=fsync (raw write)",
        "floe restore from disk media",
        "tar -xf (+ sync)",
        "floe restore from tar media",
    ];
    let mut times: [Vec<f64>; 4] = Default::default();
    let fresh = |p: &std::path::Path| {
        let _ = std::fs::remove_file(p);
        let _ = std::fs::remove_dir_all(p);
    };
    for round in 0..rounds {
        for i in 0..4 {
            fresh(&target);
            fresh(&tar_dest);
            std::fs::create_dir_all(&tar_dest)?;
            let to = format!("bench={}", target.display());
            let s = match i {
                0 => timed(
                    "dd",
                    Command::new("dd")
                        .arg(format!("if={}", item_file.display()))
                        .arg(format!("of={}", target.display()))
                        .args(["bs=4M", "conv=fsync"]),
                )?,
                1 => timed(
                    "floe restore disk",
                    Command::new(floe)
                        .args(["restore", "--media", &disk, "--set", &disk_set, "--to", &to]),
                )?,
                2 => timed(
                    "tar -xf",
                    Command::new("sh").arg("-c").arg(format!(
                        "tar -xf '{}' -C '{}' && sync",
                        archive.display(),
                        tar_dest.display()
                    )),
                )?,
                _ => timed(
                    "floe restore tar",
                    Command::new(floe)
                        .args(["restore", "--media", &tar, "--set", &tar_set, "--to", &to]),
                )?,
            };
            times[i].push(s);
            eprintln!(
                "round {round}: {:<40} {:>8.1} MB/s",
                names[i],
                size as f64 / s / 1e6
            );
        }
    }
    fresh(&target);
    fresh(&tar_dest);
    let median = |v: &Vec<f64>| {
        let mut v = v.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mbs: Vec<f64> = times
        .iter()
        .map(|t| size as f64 / median(t) / 1e6)
        .collect();
    println!("\nrestore of the same volume, median of {rounds} interleaved rounds");
    for (n, m) in names.iter().zip(&mbs) {
        println!("  {n:<40} {m:>8.1} MB/s");
    }
    println!(
        "  ratio floe restore (disk) / raw dd write  {:.2}  (target >= 0.9)",
        mbs[1] / mbs[0]
    );
    println!(
        "  ratio floe restore (tar) / tar -xf        {:.2}",
        mbs[3] / mbs[2]
    );
    Ok(())
}
