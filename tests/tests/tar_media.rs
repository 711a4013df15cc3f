//! Tar media: a set is one pax archive that GNU tar extracts without Floe,
//! byte-identical to the frozen image; Floe restores and verifies it too.

use floe_core::abi::Interface;
use floe_core::agent::AgentClient;
use floe_core::mover::{backup, restore_item, verify_set, MoverOptions};
use floe_core::units::Bytes;
use floe_sim_san::control::Op;
use floe_tests::{assert_same_bytes, have, plugins, skip, Lab};
use std::process::Command;

const MIB: u64 = 1 << 20;

#[test]
fn gnu_tar_extracts_a_floe_set_byte_identical() {
    let lab = Lab::start(4, &[("lun0", 64 * MIB)], false);
    for (i, v) in ["vol0", "vol1"].iter().enumerate() {
        lab.call(Op::CreateVolume {
            name: (*v).into(),
            size: Bytes(3 * MIB),
            max_run_chunks: Some(4),
            luns: None,
        });
        lab.call(Op::Workload {
            target: (*v).into(),
            seed: i as u64,
            writes: 80,
            max_length: Bytes(256 * 1024),
        });
    }
    let frozen: Vec<Vec<u8>> = ["vol0", "vol1"]
        .iter()
        .map(|v| lab.read_target(v))
        .collect();
    let media = lab.dir.path().join("tapeish");
    let cfg = serde_json::json!({"dir": media, "record_size": "64K"});
    let registry = plugins();
    let tar = registry
        .require("tar", Interface::MediaWriter)
        .expect("tar plugin");
    let mut writer = tar.media_writer(&cfg).unwrap();
    let mut agent = AgentClient::connect_tcp(&lab.agent_addr).unwrap();
    let report = backup(
        &mut agent,
        &["array:vol0".into(), "array:vol1".into()],
        &lab.resolver(),
        writer.as_mut(),
        &MoverOptions::default(),
        &mut |_| {},
    )
    .expect("backup to tar media");
    let set = report.set.header.set.clone();
    let archive = media.join(format!("{set}.tar"));
    let len = std::fs::metadata(&archive).unwrap().len();
    assert_eq!(len % (64 * 1024), 0, "whole records");

    // Floe reads it back, and verifies it.
    let mut reader = tar.media_reader(&cfg).unwrap();
    assert_eq!(reader.list_sets().unwrap().len(), 1);
    for (i, v) in ["vol0", "vol1"].iter().enumerate() {
        let out = lab.dir.path().join(format!("{v}.img"));
        let mut target = floe_core::device::open_target(out.to_str().unwrap()).unwrap();
        restore_item(
            reader.as_mut(),
            &set,
            &floe_core::model::ItemId::new(*v),
            target.as_mut(),
            &mut |_| {},
        )
        .unwrap();
        assert_same_bytes(&std::fs::read(&out).unwrap(), &frozen[i], v);
    }
    assert!(verify_set(reader.as_mut(), &set)
        .unwrap()
        .iter()
        .all(|o| o.damage.is_none()));

    // GNU tar, without Floe.
    if !have("tar") {
        return skip(
            "gnu_tar_extracts_a_floe_set_byte_identical (GNU tar part)",
            "tar is not installed",
        );
    }
    let dest = lab.dir.path().join("extracted");
    std::fs::create_dir_all(&dest).unwrap();
    let out = Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&dest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "GNU tar failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not a word: Floe's own fields are comments, which tar ignores.
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (i, v) in ["vol0", "vol1"].iter().enumerate() {
        assert_same_bytes(
            &std::fs::read(dest.join(set.as_str()).join(v)).unwrap(),
            &frozen[i],
            v,
        );
    }
    let index = std::fs::read_to_string(dest.join(set.as_str()).join("floe-index.json")).unwrap();
    assert!(
        index.contains(&report.set.items[0].trailer.blake3),
        "the index carries the checksums"
    );
    // tar -t lists exactly the items and the index.
    let out = Command::new("tar")
        .arg("-tf")
        .arg(&archive)
        .output()
        .unwrap();
    let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        names,
        vec![
            format!("{set}/vol0"),
            format!("{set}/vol1"),
            format!("{set}/floe-index.json")
        ]
    );

    // A flipped byte: verify names the item.
    let mut bytes = std::fs::read(&archive).unwrap();
    let at = report.set.items[1]
        .position
        .locator
        .rsplit_once('@')
        .unwrap()
        .1
        .parse::<usize>()
        .unwrap()
        + 1000;
    bytes[at] ^= 1;
    std::fs::write(&archive, &bytes).unwrap();
    let outcomes = verify_set(reader.as_mut(), &set).unwrap();
    assert!(outcomes[0].damage.is_none());
    assert!(
        outcomes[1]
            .damage
            .as_deref()
            .is_some_and(|d| d.contains("BLAKE3")),
        "{:?}",
        outcomes[1]
    );
}

/// A real file tree (ext4 on a loop device: sparse and fragmented files,
/// hard links, symlinks, xattrs and ACLs, a FIFO, a device node, foreign
/// owners, nanosecond times) backed up to tar media, plain and compressed
/// (`compress=zstd`): GNU tar, without Floe, extracts exactly the tree —
/// and so does `floe restore --to-dir`.
#[test]
fn gnu_tar_extracts_a_file_tree_set_with_its_metadata() {
    use floe_tests::hostfs::{floe_backup_to, restore_tree_and_compare, set_of, tree_host};
    let name = "gnu_tar_extracts_a_file_tree_set_with_its_metadata";
    if !have("tar") {
        return skip(name, "GNU tar is not installed");
    }
    let Some((src, agent, facts)) = tree_host(name, 256, 600, 11, &[]) else {
        return;
    };
    assert!(facts.files > 600, "{facts:?}");
    for compress in ["none", "zstd"] {
        let media = src.dir.path().join(format!("tar-media-{compress}"));
        let spec = format!("tar:{}", media.display());
        let mut extra = src.device_args();
        extra.extend(["--media-opt".into(), format!("compress={compress}")]);
        let (code, out, err) = floe_backup_to(
            &agent.addr,
            &[format!("fsflush:{}", src.mnt.display())],
            &spec,
            &extra,
        );
        assert_eq!(code, 0, "backup ({compress}) failed:\n{out}\n{err}");
        let set = set_of(&out);
        let archive = match compress {
            "zstd" => media.join(format!("{set}.tar.zst")),
            _ => media.join(format!("{set}.tar")),
        };
        assert!(archive.exists(), "{}", archive.display());
        if compress == "zstd" {
            let plain = src.dir.path().join("tar-media-none");
            let plain_len: u64 = std::fs::read_dir(&plain)
                .unwrap()
                .flatten()
                .map(|e| e.metadata().unwrap().len())
                .sum();
            let len = std::fs::metadata(&archive).unwrap().len();
            assert!(len < plain_len, "compressed {len} B, plain {plain_len} B");
        }
        if compress == "zstd" && !have("zstd") {
            skip(
                &format!("{name} (GNU tar reading the zstd archive)"),
                "zstd is not installed",
            );
        } else {
            gnu_tar_extracts_the_tree(&src, &set, &archive);
        }

        // Floe restores the same tree from the same archive.
        let to = src.dir.path().join(format!("by-floe-{compress}"));
        restore_tree_and_compare(&spec, &[], &set, &to, &src.mnt);
        // And verifies it.
        let v = floe_tests::floe_cmd()
            .args(["verify", "--media", &spec, "--set", &set])
            .output()
            .unwrap();
        assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
        if compress == "zstd" {
            // A damaged frame: verify fails and names what it could not
            // read; nothing is passed off as the item's bytes.
            let mut bytes = std::fs::read(&archive).unwrap();
            let at = bytes.len() / 3;
            bytes[at] ^= 0x55;
            std::fs::write(&archive, &bytes).unwrap();
            let v = floe_tests::floe_cmd()
                .args(["verify", "--media", &spec, "--set", &set])
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&v.stdout),
                String::from_utf8_lossy(&v.stderr)
            );
            assert!(!v.status.success(), "verify passed a damaged frame: {text}");
            assert!(text.contains("frame"), "{text}");
        }
    }
}

/// GNU tar extracts `archive` (plain or zstd, by its name) exactly as the
/// tree it holds, without a word on stderr.
fn gnu_tar_extracts_the_tree(
    src: &floe_tests::hostfs::LoopFs,
    set: &str,
    archive: &std::path::Path,
) {
    use floe_tests::hostfs::compare_trees;
    // GNU tar lists sparse members by their real names and sizes, and
    // extracts the tree with owners, modes, times, links and xattrs.
    let x = src.dir.path().join("by-gnu-tar");
    let _ = std::fs::remove_dir_all(&x);
    std::fs::create_dir_all(&x).unwrap();
    let t = Command::new("tar")
        .args([
            "-x",
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "-p",
            "-f",
        ])
        .arg(archive)
        .arg("-C")
        .arg(&x)
        .output()
        .unwrap();
    assert!(
        t.status.success(),
        "tar -x: {}",
        String::from_utf8_lossy(&t.stderr)
    );
    assert!(
        t.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&t.stderr)
    );
    let root = x.join(set).join(src.mnt.strip_prefix("/").unwrap());
    let diffs = compare_trees(&src.mnt, &root);
    assert!(
        diffs.is_empty(),
        "{} differences, first: {:#?}",
        diffs.len(),
        &diffs[..diffs.len().min(20)]
    );
    let listing = Command::new("tar")
        .arg("-tvf")
        .arg(archive)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        !listing.contains("GNUSparseFile"),
        "sparse names leak: {listing}"
    );
    assert!(listing.contains("floe-index.json"), "{listing}");
}

#[test]
fn a_tree_restore_goes_where_the_catalog_says_and_wrong_bytes_fail_their_file_only() {
    use floe_core::catalog::Catalog;
    use floe_core::model::{ItemKind, SetId};
    use floe_tests::hostfs::{compare_trees, set_of, tree_host};
    let name = "a_tree_restore_goes_where_the_catalog_says_and_wrong_bytes_fail_their_file_only";
    let Some((src, agent, _)) = tree_host(name, 128, 300, 23, &[]) else {
        return;
    };
    let media = src.dir.path().join("tar-media");
    let spec = format!("tar:{}", media.display());
    let catalog = src.dir.path().join("catalog.db");
    let floe = || {
        let mut c = floe_tests::floe_cmd();
        c.env("FLOE_CATALOG", &catalog);
        c
    };
    let out = floe()
        .args(["backup", "--agent", &agent.addr, "--source"])
        .arg(format!("fsflush:{}", src.mnt.display()))
        .args(["--media", &spec])
        .args(src.device_args())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let set = set_of(&String::from_utf8_lossy(&out.stdout));
    // Restore to `to`, syncing every `sync_every` bytes, failing at
    // `errpoint`.
    let restore_with = |to: &std::path::Path, sync_every: Option<&str>, errpoint: Option<&str>| {
        let mut c = floe();
        if let Some(point) = errpoint {
            c.env("FLOE_ERRPOINT", point);
        }
        c.args(["restore", "--media", &spec, "--set", &set]);
        if let Some(n) = sync_every {
            c.args(["--sync-every", n]);
        }
        c.arg("--to-dir").arg(to).output().unwrap()
    };
    let restore = |to: &std::path::Path| restore_with(to, None, None);
    // By the catalog's record, straight to each file's bytes.
    let good = src.dir.path().join("good");
    let r = restore(&good);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let diffs = compare_trees(&src.mnt, &good);
    assert!(diffs.is_empty(), "{:#?}", &diffs[..diffs.len().min(20)]);

    // Made durable as it goes (a sync every 16 KiB of file data): the
    // same tree; a sync that fails on the way fails the restore, named.
    let synced = src.dir.path().join("synced");
    let r = restore_with(&synced, Some("16K"), None);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let diffs = compare_trees(&src.mnt, &synced);
    assert!(diffs.is_empty(), "{:#?}", &diffs[..diffs.len().min(20)]);
    let unsynced = src.dir.path().join("unsynced");
    let r = restore_with(&unsynced, Some("16K"), Some("restore-sync"));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success(), "a failed sync was not reported: {err}");
    assert!(err.contains("sync") && err.contains("unsynced"), "{err}");

    // A catalog that points one file at another's bytes: that file fails
    // its checksum and is not left behind; every other file is restored.
    let mut cat = Catalog::open(&catalog).unwrap();
    let mut e = cat.set(&SetId::new(set.clone())).unwrap();
    let files: Vec<usize> = (0..e.record.items.len())
        .filter(|&k| {
            let h = &e.record.items[k].header;
            h.kind == ItemKind::File && h.size.0 > 4096 && h.holes().is_empty()
        })
        .collect();
    let (a, b) = (files[0], files[files.len() / 2]);
    assert_ne!(
        e.record.items[a].trailer.blake3,
        e.record.items[b].trailer.blake3
    );
    e.record.items[a].position = e.record.items[b].position.clone();
    let victim = e.record.items[a].header.file.clone().unwrap().path;
    cat.record(&e.media, &e.record).unwrap();
    drop(cat);
    let bad = src.dir.path().join("bad");
    let r = restore(&bad);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success(), "a wrong position was restored: {err}");
    assert!(err.contains(&victim) && err.contains("checksum"), "{err}");
    assert!(
        !bad.join(&victim).exists(),
        "the wrong bytes stayed as {victim}"
    );
    let diffs = compare_trees(&src.mnt, &bad);
    assert!(
        diffs.iter().all(|d| d.contains(&victim)),
        "more than {victim} differs: {:#?}",
        &diffs[..diffs.len().min(20)]
    );
    assert!(!diffs.is_empty());

    // A catalog that cannot be read: the media's own index, said so.
    std::fs::write(&catalog, vec![0x5a; 64 * 1024]).unwrap();
    let unread = src.dir.path().join("unread");
    let r = restore(&unread);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    assert!(err.contains("could not be read"), "{err}");
    let diffs = compare_trees(&src.mnt, &unread);
    assert!(diffs.is_empty(), "{:#?}", &diffs[..diffs.len().min(20)]);
}
