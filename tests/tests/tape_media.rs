//! Tape media on sim-san's virtual tape library: the library follows the
//! Linux `st` driver's semantics; sets are pax archives on tape that GNU
//! tar extracts from a tape file read out with `dd`; a set spans three
//! cartridges and round-trips; one file restores by positioning (rewind,
//! fsf, fsr) without reading the tape; write-protected cartridges and a
//! full library fail clearly and record nothing.

use floe_core::tape::{errno, errno_of, MtOp, TapeDrive, VtlDrive};
use floe_tests::hostfs::{compare_trees, floe_backup_to, set_of, tree_host, AgentProcess, LoopFs};
use floe_tests::{floe_cmd, have, skip, VtlProcess};
use std::process::Command;

const K: u64 = 1024;

fn drive_stats(vtl: &VtlProcess) -> serde_json::Value {
    vtl.inventory()["drives"][0]["stats"].clone()
}

#[test]
fn the_virtual_library_follows_st_semantics() {
    let vtl = VtlProcess::start(1, 2, 64 * K, 16 * K);
    // No cartridge: ENOMEDIUM, as st says.
    let e = VtlDrive::open(&vtl.device(0), true)
        .err()
        .expect("empty drive");
    assert_eq!(errno_of(&e), Some(errno::ENOMEDIUM), "{e}");
    assert_eq!(vtl.change(0, &["next"]).unwrap().trim(), "FL0001");
    let mut d = VtlDrive::open(&vtl.device(0), true).unwrap();
    // A second opener is refused while the drive is open.
    let busy = VtlDrive::open(&vtl.device(0), false).err().expect("busy");
    assert_eq!(errno_of(&busy), Some(errno::EBUSY));
    let s = d.status().unwrap();
    assert!(s.bot && s.eod && s.online && !s.write_protected, "{s:?}");

    // Fixed-block mode: writes are whole blocks.
    d.op(MtOp::SetBlk(4096)).unwrap();
    assert_eq!(
        errno_of(&d.write(&[1u8; 100]).unwrap_err()),
        Some(errno::EINVAL)
    );
    assert_eq!(d.write(&[1u8; 8192]).unwrap(), 8192); // two records
    d.op(MtOp::Weof(1)).unwrap();
    assert_eq!(d.write(&[2u8; 4096]).unwrap(), 4096);
    d.op(MtOp::Weof(1)).unwrap();
    let s = d.status().unwrap();
    assert_eq!((s.file_number, s.block_number, s.eod), (2, 0, true));

    // Reading: records, then 0 at the filemark, then the next file; at the
    // end of data 0 once, then EIO.
    d.op(MtOp::Rewind).unwrap();
    d.op(MtOp::SetBlk(0)).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    assert_eq!(d.read(&mut buf).unwrap(), 4096);
    assert_eq!(d.read(&mut buf).unwrap(), 4096);
    assert_eq!(d.read(&mut buf).unwrap(), 0);
    assert!(d.status().unwrap().eof);
    assert_eq!(d.read(&mut buf).unwrap(), 4096);
    assert_eq!(buf[0], 2);
    assert_eq!(d.read(&mut buf).unwrap(), 0);
    assert_eq!(d.read(&mut buf).unwrap(), 0);
    assert!(d.status().unwrap().eod);
    assert_eq!(errno_of(&d.read(&mut buf).unwrap_err()), Some(errno::EIO));

    // Spacing: fsf, bsf, fsr, bsr; past the end is EIO.
    d.op(MtOp::Rewind).unwrap();
    d.op(MtOp::Fsf(1)).unwrap();
    assert_eq!(d.status().unwrap().file_number, 1);
    d.op(MtOp::Rewind).unwrap();
    d.op(MtOp::Fsr(1)).unwrap();
    assert_eq!(d.status().unwrap().block_number, 1);
    d.op(MtOp::Bsr(1)).unwrap();
    assert!(d.status().unwrap().bot);
    assert_eq!(errno_of(&d.op(MtOp::Fsf(5)).unwrap_err()), Some(errno::EIO));

    // Writing in the middle destroys what follows.
    d.op(MtOp::Rewind).unwrap();
    d.op(MtOp::Fsf(1)).unwrap();
    d.op(MtOp::SetBlk(4096)).unwrap();
    d.write(&[3u8; 4096]).unwrap();
    d.op(MtOp::Weof(1)).unwrap();
    d.op(MtOp::Eom).unwrap();
    assert_eq!(d.status().unwrap().file_number, 2);

    // Early warning: the write reaching it completes, the next fails with
    // ENOSPC, later ones go on until the physical end, which is ENOSPC.
    let mut wrote = 0;
    let ew = loop {
        match d.write(&[4u8; 4096]) {
            Ok(n) => wrote += n,
            Err(e) => break e,
        }
    };
    assert_eq!(errno_of(&ew), Some(errno::ENOSPC), "{ew}");
    assert!(d.status().unwrap().eot);
    assert!(wrote > 0);
    d.write(&[5u8; 4096])
        .expect("writing past the early warning is allowed");
    let end = loop {
        if let Err(e) = d.write(&[6u8; 4096]) {
            break e;
        }
    };
    assert_eq!(errno_of(&end), Some(errno::ENOSPC));
    assert!(end.to_string().contains("physical end of medium"), "{end}");
    drop(d);

    // Write protection: EROFS on open for writing; reading is fine.
    vtl.change(0, &["unload"]).unwrap();
    vtl.change(0, &["protect", "FL0002", "on"]).unwrap();
    vtl.change(0, &["load", "FL0002"]).unwrap();
    let e = VtlDrive::open(&vtl.device(0), true)
        .err()
        .expect("protected");
    assert_eq!(errno_of(&e), Some(errno::EROFS), "{e}");
    let mut r = VtlDrive::open(&vtl.device(0), false).unwrap();
    assert!(r.status().unwrap().write_protected);
}

fn tape_spec(vtl: &VtlProcess, record: u64) -> Vec<String> {
    vec![
        "--media-opt".into(),
        format!("record_size={record}"),
        "--media-opt".into(),
        format!("changer={}", vtl.changer(0)),
    ]
}

/// Back up the whole tree of `src` through `agent` to the tape `media`
/// with `args` (device arguments come first); the set id.
fn backup_tree(src: &LoopFs, agent: &AgentProcess, media: &str, args: &[String]) -> String {
    let mut all = src.device_args();
    all.extend_from_slice(args);
    let (code, out, err) = floe_backup_to(
        &agent.addr,
        &[format!("fsflush:{}", src.mnt.display())],
        media,
        &all,
    );
    assert_eq!(code, 0, "backup failed:\n{out}\n{err}");
    set_of(&out)
}

#[test]
fn a_set_spanning_three_cartridges_round_trips_and_one_file_restores_by_positioning() {
    let name = "a_set_spanning_three_cartridges_round_trips_and_one_file_restores_by_positioning";
    let Some((src, agent, facts)) = tree_host(name, 256, 400, 5, &[]) else {
        return;
    };
    // Cartridges that hold a little over a third of the tree each.
    let capacity = (facts.bytes * 2 / 5).max(2 << 20);
    let vtl = VtlProcess::start(1, 5, capacity, 128 * K);
    let media = format!("tape:{}", vtl.device(0));
    let opts = tape_spec(&vtl, 64 * K);
    let cat = src.dir.path().join("catalog.db");
    let mut args = opts.clone();
    args.extend(["--catalog".to_string(), cat.display().to_string()]);
    let set = backup_tree(&src, &agent, &media, &args);
    let inv = vtl.inventory();
    assert_eq!(
        inv["drives"][0]["loaded"], "FL0003",
        "three cartridges used: {inv}"
    );

    // The catalog names each item's cartridge, file and record.
    let show = floe_cmd()
        .args(["show", &set, "--catalog"])
        .arg(&cat)
        .output()
        .unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&show.stdout).expect("show JSON");
    let items = shown["record"]["items"].as_array().unwrap().clone();
    let on = |label: &str| {
        items
            .iter()
            .filter(|i| {
                i["position"]["medium"] == label
                    && i["header"]["kind"] == "file"
                    && i["trailer"]["length"].as_u64() > Some(20_000)
            })
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(
        !on("FL0001").is_empty() && !on("FL0003").is_empty(),
        "{items:?}"
    );
    let middle = on("FL0002");
    assert!(!middle.is_empty(), "no file on the middle cartridge");
    let pick = &middle[middle.len() / 2];
    let locator = pick["position"]["locator"].as_str().unwrap();
    assert!(locator.starts_with("file=1,record="), "{locator}");
    let path = pick["header"]["file"]["path"].as_str().unwrap().to_string();

    // The whole set restores exactly.
    let to = src.dir.path().join("restored");
    let mut restore = floe_cmd();
    restore
        .args(["restore", "--media", &media])
        .args(&opts)
        .args(["--set", &set, "--to-dir"])
        .arg(&to);
    let r = restore.output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let diffs = compare_trees(&src.mnt, &to);
    assert!(diffs.is_empty(), "{:#?}", &diffs[..diffs.len().min(20)]);
    let whole = drive_stats(&vtl)["bytes_read"].as_u64().unwrap();

    // One file from the middle cartridge: positioned, not read through.
    let before = drive_stats(&vtl);
    let one = src.dir.path().join("one");
    let r = floe_cmd()
        .args(["restore", "--media", &media])
        .args(&opts)
        .args(["--set", &set, "--path", &path, "--to-dir"])
        .arg(&one)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let restored = std::fs::read(one.join(&path)).expect("the one file");
    assert_eq!(
        restored,
        std::fs::read(src.mnt.join(&path)).unwrap(),
        "{path}"
    );
    let after = drive_stats(&vtl);
    let read = after["bytes_read"].as_u64().unwrap() - before["bytes_read"].as_u64().unwrap();
    eprintln!(
        "one file: {read} bytes of tape read; the whole set: {whole}; tree {} bytes on cartridges of {capacity}",
        facts.bytes
    );
    assert!(
        read < whole / 10,
        "restoring one {}-byte file read {read} bytes of tape (a whole restore read {whole})",
        pick["trailer"]["length"]
    );
    assert!(after["positionings"].as_u64() > before["positionings"].as_u64());

    // Verify re-reads every item; the catalog rebuilds from the cartridges.
    let v = floe_cmd()
        .args(["verify", "--media", &media])
        .args(&opts)
        .args(["--set", &set])
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    let catalog = src.dir.path().join("rebuilt.db");
    let rb = floe_cmd()
        .env("FLOE_CATALOG", &catalog)
        .args(["catalog", "rebuild", "--media", &media])
        .args(&opts)
        .args(["--media-opt", "cartridges=FL0001,FL0002,FL0003"])
        .output()
        .unwrap();
    assert!(
        rb.status.success(),
        "{}",
        String::from_utf8_lossy(&rb.stderr)
    );
    let listed = floe_cmd()
        .env("FLOE_CATALOG", &catalog)
        .args(["show", &set])
        .output()
        .unwrap();
    let relisted: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("rebuilt show");
    assert_eq!(relisted["record"]["items"], shown["record"]["items"]);
}

#[test]
fn gnu_tar_extracts_a_tape_file_read_out_with_dd() {
    let name = "gnu_tar_extracts_a_tape_file_read_out_with_dd";
    if !have("tar") || !have("dd") {
        return skip(name, "GNU tar or dd is missing");
    }
    let Some((src, agent, _)) = tree_host(name, 256, 150, 5, &[]) else {
        return;
    };
    let vtl = VtlProcess::start(1, 1, 256 << 20, 4 << 20);
    let media = format!("tape:{}", vtl.device(0));
    let cat = src.dir.path().join("catalog.db");
    let mut args = tape_spec(&vtl, 256 * K);
    args.extend(["--catalog".to_string(), cat.display().to_string()]);
    let set = backup_tree(&src, &agent, &media, &args);
    // Tape file 1 is the set's archive (file 0 is Floe's label).
    let x = src.dir.path().join("x");
    std::fs::create_dir_all(&x).unwrap();
    let tarfile = src.dir.path().join("file1.tar");
    let sh = format!(
        "{} vtl read --library {} --drive 0 --file 1 | dd of={} bs=256k iflag=fullblock status=none",
        floe_tests::build_dir().join("floe-sim-san").display(),
        vtl.addr,
        tarfile.display()
    );
    let st = Command::new("sh").arg("-c").arg(&sh).status().unwrap();
    assert!(st.success());
    assert_eq!(
        std::fs::metadata(&tarfile).unwrap().len() % (256 * K),
        0,
        "whole records"
    );
    let t = Command::new("tar")
        .args([
            "-x",
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "-p",
            "-f",
        ])
        .arg(&tarfile)
        .arg("-C")
        .arg(&x)
        .output()
        .unwrap();
    // Without a warning: Floe's own fields are pax comments.
    assert!(
        t.status.success() && t.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&t.stderr)
    );
    let root = x.join(&set).join(src.mnt.strip_prefix("/").unwrap());
    let diffs = compare_trees(&src.mnt, &root);
    assert!(diffs.is_empty(), "{:#?}", &diffs[..diffs.len().min(20)]);
    // A second set appends after the first; pruning to one forgets the
    // older in the catalog and says it stays on tape.
    std::thread::sleep(std::time::Duration::from_millis(1100)); // a distinct set id
    backup_tree(&src, &agent, &media, &args);
    let p = floe_cmd()
        .args(["prune", "--media", &media])
        .args(tape_spec(&vtl, 256 * K))
        .args(["--keep-last", "1", "--catalog"])
        .arg(&cat)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&p.stdout);
    assert!(
        p.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&p.stderr)
    );
    assert!(
        text.contains(&format!("forget  {set}")) && text.contains("stay on"),
        "{text}"
    );
}

#[test]
fn write_protected_and_full_cartridges_fail_clearly_and_record_nothing() {
    let name = "write_protected_and_full_cartridges_fail_clearly_and_record_nothing";
    let Some((src, agent, facts)) = tree_host(name, 256, 150, 5, &[]) else {
        return;
    };
    let source = [format!("fsflush:{}", src.mnt.display())];

    // A write-protected cartridge is refused, naming why.
    let vtl = VtlProcess::start(1, 1, 256 << 20, 1 << 20);
    vtl.change(0, &["protect", "FL0001", "on"]).unwrap();
    vtl.change(0, &["next"]).unwrap();
    let media = format!("tape:{}", vtl.device(0));
    let mut args = src.device_args();
    args.extend(tape_spec(&vtl, 64 * K));
    let catalog = src.dir.path().join("catalog.db");
    let run = |media: &str, args: &[String]| {
        let mut c = floe_cmd();
        c.env("FLOE_CATALOG", &catalog)
            .args([
                "backup",
                "--agent",
                &agent.addr,
                "--source",
                &source[0],
                "--media",
                media,
            ])
            .args(args);
        c.output().unwrap()
    };
    let o = run(&media, &args);
    assert_ne!(o.status.code(), Some(0));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("write-protected"), "{err}");

    // One small cartridge and nothing after it: the medium ends mid-set.
    let small = VtlProcess::start(1, 1, (facts.bytes / 3).max(1 << 20), 64 * K);
    let media = format!("tape:{}", small.device(0));
    let mut args = src.device_args();
    args.extend(tape_spec(&small, 64 * K));
    let o = run(&media, &args);
    assert_ne!(o.status.code(), Some(0));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("FL0001 is full") && err.contains("no further cartridge"),
        "{err}"
    );
    // Nothing is recorded as complete: not in the catalog, not on tape.
    let list = floe_cmd()
        .env("FLOE_CATALOG", &catalog)
        .args(["list"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains("fsflush"),
        "{}",
        String::from_utf8_lossy(&list.stdout)
    );
    let listed = floe_cmd()
        .args(["list", "--media", &media])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&listed.stdout).to_string()
        + &String::from_utf8_lossy(&listed.stderr);
    assert!(
        !text.contains(&format!("fsflush:{}", src.mnt.display())),
        "{text}"
    );
}

/// Retention on tape: `floe prune` forgets sets in the catalog, and
/// recycles a cartridge (writes its label again, ending its data) only
/// when every set on it is forgotten. A set that had a piece on a recycled
/// cartridge is gone, even where its index file survives on another.
#[test]
fn prune_recycles_a_cartridge_only_when_every_set_on_it_is_forgotten() {
    let name = "prune_recycles_a_cartridge_only_when_every_set_on_it_is_forgotten";
    let Some((src, agent, facts)) = tree_host(name, 256, 150, 9, &[]) else {
        return;
    };
    // How much tape one set takes, on a roomy library first.
    let roomy = VtlProcess::start(1, 1, 1 << 30, 64 * K);
    let mut probe_args = tape_spec(&roomy, 64 * K);
    probe_args.extend([
        "--catalog".to_string(),
        src.dir.path().join("probe.db").display().to_string(),
    ]);
    backup_tree(
        &src,
        &agent,
        &format!("tape:{}", roomy.device(0)),
        &probe_args,
    );
    let size = drive_stats(&roomy)["bytes_written"].as_u64().unwrap();
    assert!(
        size > facts.bytes,
        "{size} bytes of tape for {} of files",
        facts.bytes
    );
    drop(roomy);
    // Five cartridges of 80 % of a set: set 1 spans FL0001 → FL0002, set 2
    // FL0002 → FL0003.
    let vtl = VtlProcess::start(1, 5, size * 8 / 10, 64 * K);
    let media = format!("tape:{}", vtl.device(0));
    let opts = tape_spec(&vtl, 64 * K);
    let cat = src.dir.path().join("catalog.db");
    let mut args = opts.clone();
    args.extend(["--catalog".to_string(), cat.display().to_string()]);
    let set1 = backup_tree(&src, &agent, &media, &args);
    std::thread::sleep(std::time::Duration::from_millis(1100)); // distinct set ids
    let set2 = backup_tree(&src, &agent, &media, &args);
    assert_eq!(
        vtl.inventory()["drives"][0]["loaded"],
        "FL0003",
        "{}",
        vtl.inventory()
    );
    let prune = |keep: &str, dry: bool| {
        let mut c = floe_cmd();
        c.args(["prune", "--media", &media])
            .args(&opts)
            .args(["--keep-last", keep, "--catalog"])
            .arg(&cat);
        if dry {
            c.arg("--dry-run");
        }
        let p = c.output().unwrap();
        let text = String::from_utf8_lossy(&p.stdout).to_string();
        assert!(
            p.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&p.stderr)
        );
        text
    };
    let listed = |cartridges: &str| -> Vec<String> {
        let db = src
            .dir
            .path()
            .join(format!("rebuilt-{}.db", cartridges.len()));
        let _ = std::fs::remove_file(&db);
        let rb = floe_cmd()
            .env("FLOE_CATALOG", &db)
            .args(["catalog", "rebuild", "--media", &media])
            .args(&opts)
            .args(["--media-opt", &format!("cartridges={cartridges}")])
            .output()
            .unwrap();
        assert!(
            rb.status.success(),
            "{}",
            String::from_utf8_lossy(&rb.stderr)
        );
        let l = floe_cmd()
            .env("FLOE_CATALOG", &db)
            .args(["list", "--json"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&l.stdout).expect("list JSON");
        let mut ids: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["header"]["set"].as_str().unwrap_or_default().to_string())
            .collect();
        ids.sort();
        ids
    };
    let all = "FL0001,FL0002,FL0003";
    assert_eq!(listed(all), vec![set1.clone(), set2.clone()]);

    // Keep the last: set 1 is forgotten; FL0001 holds only set 1 and is
    // recycled, FL0002 also holds set 2 and is not. A dry run says so and
    // touches nothing.
    let dry = prune("1", true);
    assert!(
        dry.contains("would recycle FL0001") && !dry.contains("FL0002"),
        "{dry}"
    );
    assert_eq!(listed(all), vec![set1.clone(), set2.clone()]);
    let text = prune("1", false);
    assert!(text.contains(&format!("forget  {set1}")), "{text}");
    assert!(text.contains("recycled FL0001"), "{text}");
    assert!(
        !text.contains("recycled FL0002") && !text.contains("recycled FL0003"),
        "{text}"
    );
    // Set 1's index file is still on FL0002, but its first piece was
    // written over: it is gone from the media, set 2 is whole.
    assert_eq!(listed(all), vec![set2.clone()]);

    // The next set on fresh cartridges.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    vtl.change(0, &["load", "FL0004"]).unwrap();
    let set3 = backup_tree(&src, &agent, &media, &args);
    assert_eq!(vtl.inventory()["drives"][0]["loaded"], "FL0005");
    let every = "FL0001,FL0002,FL0003,FL0004,FL0005";
    assert_eq!(listed(every), vec![set2.clone(), set3.clone()]);

    // Keep the last again: set 2 is forgotten; FL0002 (set 1's dead tail
    // and set 2) and FL0003 (set 2) are recycled; FL0001 (empty since its
    // recycling) and FL0004/5 (set 3) are not.
    let text = prune("1", false);
    assert!(
        text.contains("recycled FL0002") && text.contains("recycled FL0003"),
        "{text}"
    );
    for c in ["FL0001", "FL0004", "FL0005"] {
        assert!(!text.contains(&format!("recycled {c}")), "{c}: {text}");
    }
    assert_eq!(listed(every), vec![set3.clone()]);

    // Recycled cartridges take new sets after their labels: a set spanning
    // FL0001 → FL0002 restores exactly.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    vtl.change(0, &["load", "FL0001"]).unwrap();
    let set4 = backup_tree(&src, &agent, &media, &args);
    assert_eq!(vtl.inventory()["drives"][0]["loaded"], "FL0002");
    assert_eq!(listed(every), vec![set3, set4.clone()]);
    let to = src.dir.path().join("restored-4");
    floe_tests::hostfs::restore_tree_and_compare(&media, &opts, &set4, &to, &src.mnt);
}
