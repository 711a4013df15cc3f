//! `cargo xtask demo`: the main job, end to end, on the embedded default
//! (the simulated SAN). Three processes: floe-sim-san (the array), a floe
//! agent (the application host) and floe backup (the mover). While the
//! mover reads, the application keeps writing to the origin volumes and
//! the array migrates extents of the frozen snapshots under it.

use crate::util::{self, blake3_prefix, start_agent, start_sim_san};
use anyhow::{bail, Context, Result};
use floe_core::units::{Bytes, DeviceOffset};
use floe_sim_san::control::{Action, Client, Event, Op, Trigger};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

const MIB: u64 = 1 << 20;

fn migrate(target: &str, off: u64, len: u64) -> Action {
    Action::Migrate {
        target: target.into(),
        offset: DeviceOffset(off),
        length: Bytes(len),
    }
}

pub fn run() -> Result<()> {
    util::build_shipped(false)?;
    let bin = util::root().join("target/debug");
    let work = tempfile_dir()?;
    println!("== Floe demo (work directory {})", work.display());
    let luns: Vec<String> = ["lun0=256M", "lun1=256M", "lun2=256M"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let raw: Vec<String> = ["restore0=96M", "restore1=64M"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (_san, ready) = start_sim_san(&bin, &work.join("san"), &luns, &raw)?;
    let control = ready["control"].as_str().context("control")?.to_string();
    let nbd = ready["nbd"].as_str().context("nbd")?.to_string();
    println!("sim-san: NBD on {nbd}, control on {control}; pool LUNs lun0..lun2, raw LUNs restore0, restore1");
    let pool_wwns: Vec<String> = ready["luns"]
        .as_array()
        .context("luns")?
        .iter()
        .filter(|l| l["pool"] == true)
        .filter_map(|l| l["wwn"].as_str().map(str::to_string))
        .collect();
    let mut c = Client::connect(&control)?;
    for (vol, size, seed) in [("vol0", 96 * MIB, 1u64), ("vol1", 64 * MIB, 2)] {
        c.call(Op::CreateVolume {
            name: vol.into(),
            size: Bytes(size),
            max_run_chunks: Some(8),
            luns: Some(vec!["lun0".into(), "lun1".into(), "lun2".into()]),
        })?;
        c.call(Op::Workload {
            target: vol.into(),
            seed,
            writes: 2000,
            max_length: Bytes(MIB),
        })?;
        println!(
            "volume {vol}: {} MiB laid out across lun0..lun2, written",
            size / MIB
        );
    }
    // The array remaps the frozen images while the mover reads them, in
    // every window of the mover's check–read–check.
    c.call(Op::Schedule {
        events: vec![
            Event {
                trigger: Trigger::BeforeQuery(3),
                action: migrate("vol0@*", 0, 8 * MIB),
            },
            Event {
                trigger: Trigger::BeforeRead(40),
                action: migrate("vol0@*", 40 * MIB, 16 * MIB),
            },
            Event {
                trigger: Trigger::AfterRead(90),
                action: migrate("vol1@*", 8 * MIB, 24 * MIB),
            },
            Event {
                trigger: Trigger::AfterRead(120),
                action: migrate("vol1@*", 48 * MIB, 8 * MIB),
            },
        ],
    })?;
    let (_agent, agent_addr) = start_agent(&bin, &control, true)?;
    println!("agent: listening on {agent_addr}");

    // The application keeps writing to the origins during the backup.
    let stop = Arc::new(AtomicBool::new(false));
    let app_writes = Arc::new(AtomicU64::new(0));
    let app = {
        let (stop, n, control) = (stop.clone(), app_writes.clone(), control.clone());
        std::thread::spawn(move || -> Result<()> {
            let mut c = Client::connect(&control)?;
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let (vol, size) = if i.is_multiple_of(2) {
                    ("vol0", 96 * MIB)
                } else {
                    ("vol1", 64 * MIB)
                };
                let off = (i * 7919 * 65536) % (size - MIB);
                c.call(Op::Write {
                    target: vol.into(),
                    offset: DeviceOffset(off),
                    length: Bytes(256 * 1024),
                    seed: i,
                })?;
                n.fetch_add(1, Ordering::SeqCst);
                i += 1;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Ok(())
        })
    };

    let media = work.join("media");
    let catalog = work.join("catalog.db");
    let out = Command::new(bin.join("floe"))
        .arg("--catalog")
        .arg(&catalog)
        .args([
            "backup",
            "--agent",
            &agent_addr,
            "--san",
            &format!("nbd://{nbd}"),
            "--source",
            "array:vol0",
            "--source",
            "array:vol1",
        ])
        .arg("--media")
        .arg(format!("disk:{}", media.display()))
        .args(["--window", "4M", "--json", "--label", "demo"])
        // Least privilege: the mover reads only the pool LUNs, by WWN.
        .args(
            pool_wwns
                .iter()
                .flat_map(|w| ["--allow-device".to_string(), w.clone()]),
        )
        .output()?;
    stop.store(true, Ordering::SeqCst);
    app.join()
        .map_err(|_| anyhow::anyhow!("application thread panicked"))??;
    if !out.status.success() {
        bail!(
            "floe backup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let set = report["set"]["header"]["set"]
        .as_str()
        .context("set id")?
        .to_string();
    let stats = c.call(Op::Stats)?;
    println!(
        "backup: set {set} committed; {} remaps, {} re-reads; {} application writes and {} array migrations happened during it",
        report["remaps"], report["rereads"], app_writes.load(Ordering::SeqCst), stats["events_fired"]
    );

    let mut ok = true;
    println!(
        "\n{:<6} {:<66} {:<66} ",
        "item", "frozen image (snapshot) blake3", "restored LUN blake3"
    );
    for (i, (vol, lun, size)) in [
        ("vol0", "restore0", 96 * MIB),
        ("vol1", "restore1", 64 * MIB),
    ]
    .into_iter()
    .enumerate()
    {
        let out = Command::new(bin.join("floe"))
            .args(["restore", "--media"])
            .arg(format!("disk:{}", media.display()))
            .args(["--set", &set, "--to", &format!("{vol}=nbd://{nbd}/{lun}")])
            .output()?;
        if !out.status.success() {
            bail!(
                "floe restore failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let frozen = c.call(Op::Checksum {
            target: format!("{vol}@*"),
            offset: None,
            length: None,
        })?["blake3"]
            .as_str()
            .context("checksum")?
            .to_string();
        let recorded = report["set"]["items"][i]["trailer"]["blake3"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let lun_path = c
            .call(Op::ListLuns)?
            .as_array()
            .context("luns")?
            .iter()
            .find(|l| l["name"] == lun)
            .and_then(|l| l["path"].as_str().map(str::to_string))
            .context("lun path")?;
        let restored = blake3_prefix(std::path::Path::new(&lun_path), size)?;
        let now = c.call(Op::Checksum {
            target: vol.into(),
            offset: None,
            length: None,
        })?["blake3"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let good = frozen == restored && frozen == recorded && now != frozen;
        ok &= good;
        println!(
            "{vol:<6} {frozen:<66} {restored:<66} {}",
            if good { "MATCH" } else { "MISMATCH" }
        );
        if frozen != recorded {
            println!("       the set recorded {recorded}");
        }
    }
    for vol in ["vol0", "vol1"] {
        c.call(Op::Delete {
            target: format!("{vol}@*"),
        })?;
    }
    let list = Command::new(bin.join("floe"))
        .arg("--catalog")
        .arg(&catalog)
        .arg("list")
        .output()?;
    println!(
        "\nThe catalog (floe list):\n{}",
        String::from_utf8_lossy(&list.stdout).trim_end()
    );
    let items = Command::new(bin.join("floe"))
        .arg("--catalog")
        .arg(&catalog)
        .args(["ls", &set])
        .output()?;
    println!(
        "\nIts items (floe ls {set}):\n{}",
        String::from_utf8_lossy(&items.stdout).trim_end()
    );
    let _ = std::fs::remove_dir_all(&work);
    if !ok {
        bail!("demo failed: restored bytes differ from the frozen image");
    }
    println!("\nThe restored LUNs equal the frozen snapshots byte for byte, although the origins changed and the snapshots' extents moved during the backup.");
    Ok(())
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("floe-demo-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
