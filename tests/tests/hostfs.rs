//! Off-host backup of real file systems: ext4 and XFS (btrfs in
//! `btrfs.rs`) on loop devices, made and mounted for real; an agent
//! process freezes them with FIFREEZE (`fsflush`) and maps them with
//! FIEMAP (`fiemap`); the mover reads a second, read-only loop device over
//! the same image with O_DIRECT; the set is restored to a fresh file
//! system of the same kind and compared exactly.

use floe_tests::hostfs::{
    compare_trees, floe_backup, floe_backup_to, make_tree, set_of, AgentProcess, LoopFs,
};
use floe_tests::{floe_cmd, skip};

fn round_trip(name: &str, fstype: &str, devices: usize, mkfs: &[&str], opts: &str) {
    let mut src = match LoopFs::new(fstype, devices, 512, mkfs, opts) {
        Ok(f) => f,
        Err(why) => return skip(name, &why),
    };
    let facts = make_tree(&src.mnt, 2500, 7);
    assert!(facts.files > 2500 && facts.bytes > 10 << 20, "{facts:?}");
    if fstype == "btrfs" {
        // Compressible files: stored encoded, carried by the agent.
        let c = src.mnt.join("compressible");
        std::fs::create_dir_all(&c).unwrap();
        for i in 0..20 {
            let text = format!("line {i} of a very compressible log file\n").repeat(4000 + i * 100);
            std::fs::write(c.join(format!("log{i}.txt")), text).unwrap();
        }
    }
    src.sync();
    src.mover_view().expect("read-only view");
    let allow = format!("fsflush:{}*", src.mnt.display());
    // Small parts: the map of ~2,600 files comes in several, the mover
    // reading the first while the agent maps the rest.
    let agent = AgentProcess::start(
        &[
            "--allow-source",
            &allow,
            "--plugin-opt",
            "fiemap.part_entries=400",
            "--plugin-opt",
            "btrfs.part_entries=400",
        ],
        &[],
    );
    let media = src.dir.path().join("media");
    let devices = if fstype == "btrfs" {
        src.btrfs_device_args()
    } else {
        src.device_args()
    };
    let (code, out, err) = floe_backup(
        &agent.addr,
        &[format!("fsflush:{}", src.mnt.display())],
        &media,
        &devices,
    );
    assert_eq!(code, 0, "backup failed:\n{out}\n{err}");
    let set = set_of(&out);
    assert!(out.contains("0 remaps"), "{out}");
    let parts: u32 = out
        .split("map in ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(parts >= 6, "the map came in {parts} part(s):\n{out}");

    let dst = LoopFs::new(fstype, 1, 512, &[], "").expect("second file system");
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
    assert!(
        diffs.is_empty(),
        "{} differences, first: {:#?}",
        diffs.len(),
        &diffs[..diffs.len().min(20)]
    );
    // The comparison is not blind: one changed mode and one changed byte
    // are both named.
    std::fs::set_permissions(
        to.join("links/target.txt"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(to.join("special/xattrs"), b"with attributez").unwrap();
    let diffs = compare_trees(&src.mnt, &to);
    assert!(
        diffs.iter().any(|d| d.contains("links/target.txt: mode")),
        "{diffs:?}"
    );
    assert!(
        diffs.iter().any(|d| d.contains("special/xattrs: bytes")),
        "{diffs:?}"
    );
}

#[test]
fn ext4_tree_with_inline_data_round_trips_exactly() {
    round_trip(
        "ext4_tree_with_inline_data_round_trips_exactly",
        "ext4",
        1,
        &["-O", "inline_data", "-b", "4096"],
        "",
    );
}

#[test]
fn xfs_tree_round_trips_exactly() {
    round_trip("xfs_tree_round_trips_exactly", "xfs", 1, &[], "");
}

#[test]
fn btrfs_single_device_tree_with_compressed_and_inline_files_round_trips_exactly() {
    round_trip(
        "btrfs_single_device_tree_with_compressed_and_inline_files_round_trips_exactly",
        "btrfs",
        1,
        &[],
        "compress=zstd",
    );
}

#[test]
fn btrfs_on_two_devices_raid0_data_raid1_metadata_round_trips_exactly() {
    round_trip(
        "btrfs_on_two_devices_raid0_data_raid1_metadata_round_trips_exactly",
        "btrfs",
        2,
        &["-d", "raid0", "-m", "raid1"],
        "compress=zstd",
    );
}

use floe_core::abi::MediaWriter;
use floe_core::model::*;

/// A media writer that runs a hook when the first item reaches it:
/// the application's writes land while the mover is mid-set.
pub struct Meddling {
    pub inner: Box<dyn MediaWriter>,
    pub hook: Option<Box<dyn FnOnce() + Send>>,
    /// Run as the set is committed to media (before the image is released).
    pub at_commit: Option<Box<dyn FnOnce() + Send>>,
}

impl MediaWriter for Meddling {
    fn begin_set(&mut self, h: &SetHeader) -> floe_core::Result<()> {
        self.inner.begin_set(h)
    }
    fn resume_set(&mut self, s: &SetId) -> floe_core::Result<SetRecord> {
        self.inner.resume_set(s)
    }
    fn begin_item(&mut self, h: &ItemHeader) -> floe_core::Result<()> {
        if let Some(hook) = self.hook.take() {
            hook();
        }
        self.inner.begin_item(h)
    }
    fn write(&mut self, d: &[u8]) -> floe_core::Result<()> {
        self.inner.write(d)
    }
    fn end_item(&mut self, t: &ItemTrailer) -> floe_core::Result<MediaPosition> {
        self.inner.end_item(t)
    }
    fn fail_item(&mut self, f: &ItemFailure) -> floe_core::Result<()> {
        self.inner.fail_item(f)
    }
    fn commit(&mut self) -> floe_core::Result<floe_core::model::Committed> {
        if let Some(f) = self.at_commit.take() {
            f();
        }
        self.inner.commit()
    }
    fn abort(&mut self) -> floe_core::Result<()> {
        self.inner.abort()
    }
    fn delete_set(&mut self, s: &SetId) -> floe_core::Result<()> {
        self.inner.delete_set(s)
    }
    fn recycle(&mut self, f: &[SetId], dry_run: bool) -> floe_core::Result<Vec<String>> {
        self.inner.recycle(f, dry_run)
    }
}

/// Back up `sources` through `agent` with an in-process mover (1 MiB
/// windows) whose media run `hook` when the first item arrives.
pub fn backup_meddled(
    fs: &LoopFs,
    agent: &AgentProcess,
    sources: &[String],
    media_dir: &std::path::Path,
    hook: Box<dyn FnOnce() + Send>,
) -> floe_core::Result<floe_core::mover::BackupReport> {
    let args = if fs.fstype == "btrfs" {
        fs.btrfs_device_args()
    } else {
        fs.device_args()
    };
    backup_meddled_devices(&args, agent, sources, media_dir, hook)
}

/// [`backup_meddled`] reading the devices that `--device ID=PATH`
/// arguments name.
pub fn backup_meddled_devices(
    args: &[String],
    agent: &AgentProcess,
    sources: &[String],
    media_dir: &std::path::Path,
    hook: Box<dyn FnOnce() + Send>,
) -> floe_core::Result<floe_core::mover::BackupReport> {
    let mut media = Meddling {
        inner: floe_tests::Lab::disk_writer(media_dir),
        hook: Some(hook),
        at_commit: None,
    };
    backup_through(args, agent, sources, &mut media)
}

/// Back up `sources` to `media`, reading the devices that `--device
/// ID=PATH` arguments name.
pub fn backup_through(
    args: &[String],
    agent: &AgentProcess,
    sources: &[String],
    media: &mut dyn MediaWriter,
) -> floe_core::Result<floe_core::mover::BackupReport> {
    use floe_core::agent::AgentClient;
    use floe_core::device::{DeviceResolver, Location};
    use floe_core::model::DeviceId;
    use floe_core::mover::{backup, MoverOptions};
    let table: std::collections::HashMap<DeviceId, Location> = args
        .chunks(2)
        .filter(|a| a[0] == "--device")
        .map(|a| {
            let (id, path) = a[1].split_once('=').unwrap();
            (DeviceId::new(id), Location::Path(path.into()))
        })
        .collect();
    let resolver = DeviceResolver::new(table, None);
    let mut client = AgentClient::connect_tcp(&agent.addr)?;
    let opts = MoverOptions {
        window: floe_core::units::Bytes(1 << 20),
        parallel: 2,
        ..Default::default()
    };
    backup(&mut client, sources, &resolver, media, &opts, &mut |_| {})
}

/// `floe restore --to-dir` of `set` from disk media in `media` into `to`,
/// which must then hold the same tree as `tree` (bytes and metadata).
fn restore_and_compare(
    media: &std::path::Path,
    set: &str,
    to: &std::path::Path,
    tree: &std::path::Path,
) {
    let spec = format!("disk:{}", media.display());
    floe_tests::hostfs::restore_tree_and_compare(&spec, &[], set, to, tree);
}

/// `floe restore` of `set` from disk media in `media` into `to`; it must
/// succeed.
pub fn restore_from_disk(
    media: &std::path::Path,
    set: &floe_core::model::SetId,
    to: &std::path::Path,
) {
    let r = floe_cmd()
        .args(["restore", "--media"])
        .arg(format!("disk:{}", media.display()))
        .args(["--set", set.as_str(), "--to-dir"])
        .arg(to)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
}

mod invalidation {
    use super::*;
    use floe_tests::hostfs::Rng;
    use std::collections::HashMap;
    use std::process::Command;

    /// The application keeps writing while the backup runs: overwrites in
    /// place, appends, a deleted file, a defragmenter moving extents, and
    /// fstrim. Flush-only keeps no old version, so every file restores as
    /// its frozen bytes or, whole, as a later version flagged as captured
    /// after the freeze — never a mix, never stale blocks.
    ///
    /// Twice: with the watch of writes off, every file is checked after
    /// the thaw (the remaps and the vanished file are certain); with it on
    /// (the default), a file is looked at only once a write reached its
    /// mapped extents — a file rewritten in place on ext4 or XFS, a block
    /// trimmed or reused — and one whose old blocks nothing touched is
    /// read there, its frozen bytes (a defragmented file, on btrfs a
    /// rewritten one, even the deleted one).
    fn writes_and_defrag(name: &str, fstype: &str, defrag: &'static str) {
        for watch in [false, true] {
            writes_and_defrag_watched(name, fstype, defrag, watch);
        }
    }

    fn writes_and_defrag_watched(name: &str, fstype: &str, defrag: &'static str, watch: bool) {
        let mut fs = match LoopFs::new(fstype, 1, 512, &[], "") {
            Ok(f) => f,
            Err(why) => return skip(name, &why),
        };
        if !floe_tests::have(if defrag == "btrfs" { "btrfs" } else { defrag })
            || !floe_tests::have("fstrim")
        {
            return skip(name, &format!("needs {defrag} and fstrim"));
        }
        let mut rng = Rng::new(11);
        // First in walk order: bulk the reader works through while the
        // application writes; last: the files it writes to.
        let bulk = fs.mnt.join("aa");
        std::fs::create_dir_all(&bulk).unwrap();
        for i in 0..120 {
            std::fs::write(bulk.join(format!("b{i:03}")), rng.bytes(200_000)).unwrap();
        }
        let zz = fs.mnt.join("zz");
        std::fs::create_dir_all(&zz).unwrap();
        let mut frozen: HashMap<String, Vec<u8>> = HashMap::new();
        for i in 0..12 {
            let n = format!("zz/over{i:02}");
            let d = rng.bytes(150_000);
            std::fs::write(fs.mnt.join(&n), &d).unwrap();
            frozen.insert(n, d);
            let n = format!("zz/app{i:02}");
            let d = rng.bytes(50_000);
            std::fs::write(fs.mnt.join(&n), &d).unwrap();
            frozen.insert(n, d);
        }
        // A large file written in many interleaved pieces (fragmented), for
        // the defragmenter, read in several windows.
        {
            use std::io::Write;
            let mut a = std::fs::File::create(zz.join("frag-a")).unwrap();
            let mut b = std::fs::File::create(zz.join("frag-b")).unwrap();
            let (mut da, mut db) = (Vec::new(), Vec::new());
            for _ in 0..200 {
                let x = rng.bytes(16384);
                a.write_all(&x).unwrap();
                a.sync_all().unwrap();
                da.extend_from_slice(&x);
                let y = rng.bytes(16384);
                b.write_all(&y).unwrap();
                b.sync_all().unwrap();
                db.extend_from_slice(&y);
            }
            frozen.insert("zz/frag-a".into(), da);
            frozen.insert("zz/frag-b".into(), db);
        }
        let gone_bytes = rng.bytes(70_000);
        std::fs::write(zz.join("gone"), &gone_bytes).unwrap();
        fs.sync();
        fs.mover_view().unwrap();
        let allow = format!("fsflush:{}", fs.mnt.display());
        // The map in parts: the application's writes start (held by the
        // freeze) while the agent still maps.
        let agent = AgentProcess::start(
            &[
                "--allow-source",
                &allow,
                "--plugin-opt",
                "fiemap.part_entries=40",
                "--plugin-opt",
                "btrfs.part_entries=40",
                "--plugin-opt",
                &format!("fiemap.watch_writes={watch}"),
                "--plugin-opt",
                &format!("btrfs.watch_writes={watch}"),
            ],
            &[],
        );

        let mnt = fs.mnt.clone();
        let later: std::sync::Arc<std::sync::Mutex<HashMap<String, Vec<u8>>>> = Default::default();
        let later2 = later.clone();
        let hook = move || {
            let mut rng = Rng::new(99);
            let mut l = later2.lock().unwrap();
            for i in 0..12 {
                use std::io::Write;
                use std::os::unix::fs::FileExt;
                let n = format!("zz/over{i:02}");
                let d = rng.bytes(150_000);
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(mnt.join(&n))
                    .unwrap();
                f.write_all_at(&d, 0).unwrap();
                l.insert(n, d);
                let n = format!("zz/app{i:02}");
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(mnt.join(&n))
                    .unwrap();
                let extra = rng.bytes(30_000);
                f.write_all(&extra).unwrap();
                let mut whole = std::fs::read(mnt.join(&n)).unwrap();
                whole.truncate(80_000);
                l.insert(n, whole);
            }
            let mut cmds: Vec<Command> = Vec::new();
            if defrag == "btrfs" {
                let mut c = Command::new("btrfs");
                c.args(["filesystem", "defragment", "-f"])
                    .arg(mnt.join("zz/frag-a"))
                    .arg(mnt.join("zz/frag-b"));
                cmds.push(c);
                // Relocate every data chunk: all logical addresses move.
                let mut c = Command::new("btrfs");
                c.args(["balance", "start", "--full-balance", "-d"])
                    .arg(&mnt);
                cmds.push(c);
            } else {
                let mut c = Command::new(defrag);
                c.arg("-v")
                    .arg(mnt.join("zz/frag-a"))
                    .arg(mnt.join("zz/frag-b"));
                cmds.push(c);
            }
            for mut c in cmds {
                let st = c.output().unwrap();
                assert!(
                    st.status.success(),
                    "{c:?}: {}",
                    String::from_utf8_lossy(&st.stderr)
                );
            }
            std::fs::remove_file(mnt.join("zz/gone")).unwrap();
            let _ = Command::new("fstrim").arg(&mnt).status();
            let _ = Command::new("sync").arg("-f").arg(&mnt).status();
        };
        let media_dir = fs.dir.path().join("media");
        let report = backup_meddled(
            &fs,
            &agent,
            std::slice::from_ref(&allow),
            &media_dir,
            Box::new(hook),
        )
        .expect("backup under writes");
        assert!(report.map_parts >= 3, "map in {} part(s)", report.map_parts);
        // The file deleted after the freeze is the set's one failure —
        // unless the watch vouched for its blocks: then it is read there.
        let gone = format!("{}/zz/gone", fs.mnt.display());
        let gone_read = report.set.failures.is_empty() && watch;
        if gone_read {
            frozen.insert("zz/gone".into(), gone_bytes.clone());
        } else {
            assert_eq!(report.set.failures.len(), 1, "{:?}", report.set.failures);
            assert_eq!(report.set.failures[0].item.as_str(), gone);
            assert!(
                report.set.failures[0]
                    .error
                    .contains("vanished after the frozen point"),
                "{:?}",
                report.set.failures
            );
        }

        let out = fs.dir.path().join("out");
        restore_from_disk(&media_dir, &report.set.header.set, &out);
        let later = later.lock().unwrap();
        let mut after = 0;
        for (n, old) in &frozen {
            let got = std::fs::read(out.join(n)).unwrap();
            let id = format!("{}/{n}", fs.mnt.display());
            let rec = report
                .set
                .items
                .iter()
                .find(|i| i.header.item.as_str() == id)
                .unwrap();
            if &got == old {
                assert!(
                    !rec.trailer.captured_after_freeze,
                    "{n}: frozen bytes flagged as later"
                );
            } else {
                let new = later
                    .get(n)
                    .unwrap_or_else(|| panic!("{n}: neither frozen nor a later version"));
                assert!(&got == new, "{n}: restored bytes are neither the frozen nor the later version (a mix or stale blocks)");
                assert!(
                    rec.trailer.captured_after_freeze,
                    "{n}: a later version not flagged"
                );
                after += 1;
            }
        }
        if watch {
            // What the watch vouched for restored above as frozen or whole
            // later versions; which files it looked at is the kernel's
            // timing (and on btrfs a rewrite never reaches a mapped
            // extent).
            return;
        }
        assert!(
            after > 0,
            "no file was read after the application wrote it: the test did not test"
        );
        // The defragmenter moved the fragmented files' extents without
        // changing a byte: remapped (only the moved extents), not flagged.
        for n in ["zz/frag-a", "zz/frag-b"] {
            let id = format!("{}/{n}", fs.mnt.display());
            let rec = report
                .set
                .items
                .iter()
                .find(|i| i.header.item.as_str() == id)
                .unwrap();
            assert!(
                rec.trailer.remaps > 0,
                "{n}: {defrag} moved nothing the mover noticed"
            );
            assert!(!rec.trailer.captured_after_freeze, "{n}");
        }
        assert!(
            report.remaps > 0 && report.rereads > 0,
            "remaps {} rereads {}",
            report.remaps,
            report.rereads
        );
    }

    #[test]
    fn ext4_under_writes_e4defrag_and_fstrim_restores_frozen_or_whole_later_versions() {
        writes_and_defrag(
            "ext4_under_writes_e4defrag_and_fstrim_restores_frozen_or_whole_later_versions",
            "ext4",
            "e4defrag",
        );
    }

    #[test]
    fn btrfs_under_writes_defragment_balance_and_fstrim_restores_frozen_or_whole_later_versions() {
        writes_and_defrag(
            "btrfs_under_writes_defragment_balance_and_fstrim_restores_frozen_or_whole_later_versions",
            "btrfs",
            "btrfs",
        );
    }

    #[test]
    fn xfs_under_writes_xfs_fsr_and_fstrim_restores_frozen_or_whole_later_versions() {
        writes_and_defrag(
            "xfs_under_writes_xfs_fsr_and_fstrim_restores_frozen_or_whole_later_versions",
            "xfs",
            "xfs_fsr",
        );
    }

    /// With `fsflush.hold_writes=backup` the application's writes wait for
    /// the whole backup, not just the map: every file restores as its
    /// frozen bytes, nothing is remapped or flagged as later, the writes
    /// were still waiting when the set was committed, and they land once
    /// the image is released.
    #[test]
    fn ext4_with_writes_held_for_the_backup_restores_the_frozen_tree() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let name = "ext4_with_writes_held_for_the_backup_restores_the_frozen_tree";
        let mut fs = match LoopFs::new("ext4", 1, 256, &[], "") {
            Ok(f) => f,
            Err(why) => return skip(name, &why),
        };
        let mut rng = Rng::new(5);
        let mut frozen = HashMap::new();
        for i in 0..60 {
            let n = format!("f{i:02}");
            let d = rng.bytes(50_000 + i * 1000);
            std::fs::write(fs.mnt.join(&n), &d).unwrap();
            frozen.insert(n, d);
        }
        fs.sync();
        fs.mover_view().unwrap();
        let allow = format!("fsflush:{}", fs.mnt.display());
        let agent = AgentProcess::start(
            &[
                "--allow-source",
                &allow,
                "--plugin-opt",
                "fsflush.hold_writes=backup",
                "--plugin-opt",
                "fiemap.part_entries=10",
            ],
            &[],
        );
        // The application: overwrites, appends and a delete, from the
        // first item the mover writes to media on.
        let landed = Arc::new(AtomicBool::new(false));
        let writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>> = Arc::default();
        let (mnt, landed2, writer2) = (fs.mnt.clone(), landed.clone(), writer.clone());
        let hook = move || {
            let t = std::thread::spawn(move || {
                use std::io::Write;
                use std::os::unix::fs::FileExt;
                let mut rng = Rng::new(77);
                for i in 0..10 {
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(mnt.join(format!("f{i:02}")))
                        .unwrap();
                    f.write_all_at(&rng.bytes(40_000), 0).unwrap();
                    landed2.store(true, Ordering::SeqCst);
                    let mut f = std::fs::OpenOptions::new()
                        .append(true)
                        .open(mnt.join(format!("f{:02}", 10 + i)))
                        .unwrap();
                    f.write_all(&rng.bytes(20_000)).unwrap();
                }
                std::fs::remove_file(mnt.join("f59")).unwrap();
                let _ = Command::new("sync").arg("-f").arg(&mnt).status();
            });
            *writer2.lock().unwrap() = Some(t);
        };
        let held_at_commit = Arc::new(AtomicBool::new(false));
        let (landed3, held3) = (landed.clone(), held_at_commit.clone());
        let media_dir = fs.dir.path().join("media");
        let mut media = Meddling {
            inner: floe_tests::Lab::disk_writer(&media_dir),
            hook: Some(Box::new(hook)),
            at_commit: Some(Box::new(move || {
                held3.store(!landed3.load(Ordering::SeqCst), Ordering::SeqCst);
            })),
        };
        let report = backup_through(
            &fs.device_args(),
            &agent,
            std::slice::from_ref(&allow),
            &mut media,
        )
        .expect("backup with writes held");
        assert!(
            held_at_commit.load(Ordering::SeqCst),
            "an application write landed before the set was committed"
        );
        // Released: the application's writes go on.
        let t = writer.lock().unwrap().take().expect("the application ran");
        let waited = std::time::Instant::now();
        while !t.is_finished() && waited.elapsed() < std::time::Duration::from_secs(10) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(t.is_finished(), "writes still held 10 s after the release");
        t.join().unwrap();
        assert!(
            agent
                .wait_for("writes held", std::time::Duration::from_secs(5))
                .is_some(),
            "the agent did not log how long writes were held"
        );
        assert!(report.map_parts >= 3, "map in {} part(s)", report.map_parts);
        assert_eq!(
            (report.remaps, report.rereads),
            (0, 0),
            "something was remapped while writes were held"
        );
        assert!(report.set.failures.is_empty(), "{:?}", report.set.failures);
        assert!(
            report
                .set
                .items
                .iter()
                .all(|i| !i.trailer.captured_after_freeze),
            "an item was flagged as later"
        );
        let out = fs.dir.path().join("out");
        restore_from_disk(&media_dir, &report.set.header.set, &out);
        for (n, want) in &frozen {
            let got = std::fs::read(out.join(n)).unwrap();
            floe_tests::assert_same_bytes(&got, want, n);
        }
        // The application's writes are on the file system now.
        assert_ne!(&std::fs::read(fs.mnt.join("f00")).unwrap(), &frozen["f00"]);
        assert!(!fs.mnt.join("f59").exists());
    }
}

/// Whether the agent vouches for `item`'s map without looking at the
/// file: a check with an id the item never had comes back as given and
/// valid; a look answers with the item's real config id, not valid.
fn vouched_for(
    client: &mut floe_core::agent::AgentClient,
    image: &FrozenImage,
    item: &Item,
) -> bool {
    let stale = ConfigId::new("not-the-config-id");
    let (current, valid) = client.check(&image.id, &item.id, &stale).unwrap();
    if valid {
        assert_eq!(current, stale, "valid, yet answered with another id");
    } else {
        assert_eq!(current, item.config, "looked at, yet not the real id");
    }
    valid
}

mod freeze_guard {
    use super::*;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    /// Start a writer that blocks while the file system is frozen.
    fn probe(fs: &LoopFs) -> std::process::Child {
        Command::new("touch")
            .arg(fs.mnt.join(format!("probe-{}", std::process::id())))
            .spawn()
            .unwrap()
    }

    fn wait_exit(c: &mut std::process::Child, within: Duration) -> Option<Duration> {
        let t = Instant::now();
        while t.elapsed() < within {
            if c.try_wait().unwrap().is_some() {
                return Some(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Freeze `allow` through `agent` and take the whole map, part by part:
    /// the connection, the image and every item.
    fn map_whole(
        agent: &AgentProcess,
        allow: &str,
    ) -> (
        floe_core::agent::AgentClient,
        floe_core::model::FrozenImage,
        Vec<floe_core::model::Item>,
    ) {
        let mut client = floe_core::agent::AgentClient::connect_tcp(&agent.addr).unwrap();
        let (image, first, mut more) = client.freeze_in_parts(&[allow.to_string()], true).unwrap();
        let mut items = first.items;
        while more {
            let part = client.map_more(&image.id).unwrap();
            items.extend(part.map.items);
            more = part.more;
        }
        (client, image, items)
    }

    /// An ext4 file system of `files` small files and an agent that maps
    /// it in parts of 5 entries, pausing `pause_ms` before each after the
    /// first (the file system frozen meanwhile); its source.
    fn slowly_mapping_agent(
        name: &str,
        files: u8,
        pause_ms: u32,
    ) -> Option<(LoopFs, AgentProcess, String)> {
        slowly_mapping_agent_under(name, files, pause_ms, &[])
    }

    /// [`slowly_mapping_agent`] run by `wrapper`.
    fn slowly_mapping_agent_under(
        name: &str,
        files: u8,
        pause_ms: u32,
        wrapper: &[&str],
    ) -> Option<(LoopFs, AgentProcess, String)> {
        slowly_mapping_agent_with(name, files, pause_ms, wrapper, &[])
    }

    /// [`slowly_mapping_agent_under`] with more agent arguments. The
    /// watch of writes is off (these tests are about the freeze and the
    /// checks of each file; the watch would vouch for files no write
    /// reached): `fiemap.watch_writes=true` in `more_args` turns it on.
    fn slowly_mapping_agent_with(
        name: &str,
        files: u8,
        pause_ms: u32,
        wrapper: &[&str],
        more_args: &[&str],
    ) -> Option<(LoopFs, AgentProcess, String)> {
        let pause = format!("map-part:{pause_ms}");
        agent_paused_at(name, files, &pause, wrapper, more_args)
    }

    /// [`slowly_mapping_agent_with`], the agent pausing where `pause`
    /// (`FLOE_PAUSEPOINT`) says.
    fn agent_paused_at(
        name: &str,
        files: u8,
        pause: &str,
        wrapper: &[&str],
        more_args: &[&str],
    ) -> Option<(LoopFs, AgentProcess, String)> {
        let fs = match LoopFs::new("ext4", 1, 128, &[], "") {
            Ok(f) => f,
            Err(why) => {
                skip(name, &why);
                return None;
            }
        };
        for i in 0..files {
            std::fs::write(fs.mnt.join(format!("f{i:02}")), vec![i; 5000]).unwrap();
        }
        let allow = format!("fsflush:{}", fs.mnt.display());
        let mut args = vec![
            "--allow-source",
            &allow,
            "--plugin-opt",
            "fiemap.part_entries=5",
            "--plugin-opt",
            "fiemap.watch_writes=false",
        ];
        args.extend_from_slice(more_args);
        let agent = AgentProcess::start_under(wrapper, &args, &[("FLOE_PAUSEPOINT", pause)]);
        Some((fs, agent, allow))
    }

    /// A mover that gives up while the agent still maps the rest of the
    /// map (in parts, under FIFREEZE) — by releasing the image, or by
    /// vanishing — leaves the file system thawed at once, not when the
    /// map would have been done.
    #[test]
    fn a_mover_leaving_mid_map_leaves_the_file_system_thawed() {
        let name = "a_mover_leaving_mid_map_leaves_the_file_system_thawed";
        // 8+ parts of 5 entries, 500 ms each after the first: 4 s frozen
        // if nobody stops it.
        let Some((fs, agent, allow)) = slowly_mapping_agent(name, 40, 500) else {
            return;
        };
        for leave in ["release", "vanish"] {
            let mut client = floe_core::agent::AgentClient::connect_tcp(&agent.addr).unwrap();
            let (image, first, more) = client
                .freeze_in_parts(std::slice::from_ref(&allow), true)
                .unwrap();
            assert!(more, "{leave}: the map came whole");
            assert!(
                first.items.len() <= 6,
                "{leave}: {} items",
                first.items.len()
            );
            let mut writer = probe(&fs);
            assert!(
                wait_exit(&mut writer, Duration::from_millis(300)).is_none(),
                "{leave}: the file system is not frozen while the map is made"
            );
            let t = Instant::now();
            match leave {
                "release" => client.release(&image.id).unwrap(),
                _ => drop(client),
            }
            wait_exit(&mut writer, Duration::from_secs(3))
                .unwrap_or_else(|| panic!("{leave}: still frozen 3 s after the mover left"));
            assert!(
                t.elapsed() < Duration::from_millis(1500),
                "{leave}: thawed only {:?} after the mover left",
                t.elapsed()
            );
        }
    }

    /// While FIFREEZE still holds writes from before the map, nothing read
    /// can differ from the map: config checks are answered without a look
    /// (the agent's CPU). From the moment the thaw may begin, every check
    /// looks again.
    #[test]
    fn checks_trust_the_freeze_only_while_it_holds() {
        let name = "checks_trust_the_freeze_only_while_it_holds";
        let Some((_fs, agent, allow)) = slowly_mapping_agent(name, 20, 400) else {
            return;
        };
        let mut client = floe_core::agent::AgentClient::connect_tcp(&agent.addr).unwrap();
        let (image, first, more) = client
            .freeze_in_parts(std::slice::from_ref(&allow), true)
            .unwrap();
        assert!(more);
        let item = first
            .items
            .iter()
            .find(|i| i.kind == ItemKind::File)
            .expect("a file in the first part")
            .clone();
        let stale = ConfigId::new("not-the-config-id");
        // Frozen, mapping the rest: answered as asked.
        assert!(
            vouched_for(&mut client, &image, &item),
            "looked at instead of vouched for"
        );
        let current = client
            .check_many(&image.id, vec![(item.id.clone(), stale.clone())])
            .unwrap();
        assert_eq!(current, vec![stale.clone()]);
        assert!(client.held(&image.id).unwrap(), "frozen, yet not held");
        // The rest of the map; the file system thaws before the last part.
        while client.map_more(&image.id).unwrap().more {}
        assert!(!client.held(&image.id).unwrap(), "thawed, yet held");
        assert!(
            !vouched_for(&mut client, &image, &item),
            "a check after the thaw trusted the freeze"
        );
        client.release(&image.id).unwrap();
    }

    /// After the thaw (flush-only, the default), the mapper's watch of the
    /// device vouches for the map while no write reaches a mapped extent:
    /// checks are answered without a look while the file system is only
    /// written elsewhere (the thaw's own superblock write, a new file).
    /// From the first write into a mapped file's blocks, `held` is no for
    /// good and that file is looked at; the others stay vouched for.
    #[test]
    fn after_the_thaw_only_the_files_a_write_reached_are_looked_at() {
        let name = "after_the_thaw_only_the_files_a_write_reached_are_looked_at";
        let Some((fs, agent, allow)) = slowly_mapping_agent_with(
            name,
            20,
            0,
            &[],
            &["--plugin-opt", "fiemap.watch_writes=true"],
        ) else {
            return;
        };
        let (mut client, image, items) = map_whole(&agent, &allow);
        let item = items
            .iter()
            .find(|i| i.id.as_str().ends_with("/f07"))
            .expect("f07 mapped")
            .clone();
        assert!(
            item.extents
                .iter()
                .any(|e| matches!(e.kind, floe_core::model::ExtentKind::Data(_))),
            "f07 has no extent on the device: {:?}",
            item.extents
        );
        let stale = ConfigId::new("not-the-config-id");
        // Thawed; nothing written since but the thaw's own metadata.
        assert!(
            client.held(&image.id).unwrap(),
            "thawed, nothing written, yet not vouched for"
        );
        assert!(
            vouched_for(&mut client, &image, &item),
            "looked at instead of vouched for"
        );
        // A new file, written through to the device: other blocks.
        {
            use std::io::Write;
            let mut f = std::fs::File::create(fs.mnt.join("new")).unwrap();
            f.write_all(&vec![9u8; 200_000]).unwrap();
            f.sync_all().unwrap();
        }
        fs.sync();
        assert!(
            client.held(&image.id).unwrap(),
            "a write elsewhere ended the trust"
        );
        // f07 rewritten in place and written back: a mapped extent.
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(fs.mnt.join("f07"))
                .unwrap();
            f.write_all_at(&[0xAB; 4096], 0).unwrap();
            f.sync_all().unwrap();
        }
        assert!(
            !client.held(&image.id).unwrap(),
            "a write into a mapped extent, yet vouched for"
        );
        let (current, valid) = client.check(&image.id, &item.id, &item.config).unwrap();
        assert!(!valid && current != item.config, "{current}");
        let changed = current;
        // For good; a file no write reached is still answered as asked,
        // alone or beside the one written.
        assert!(!client.held(&image.id).unwrap());
        let other = items
            .iter()
            .find(|i| i.id.as_str().ends_with("/f03"))
            .expect("f03 mapped");
        let (current, valid) = client.check(&image.id, &other.id, &stale).unwrap();
        assert!(valid && current == stale, "{current}");
        let current = client
            .check_many(
                &image.id,
                vec![
                    (other.id.clone(), stale.clone()),
                    (item.id.clone(), item.config.clone()),
                ],
            )
            .unwrap();
        assert_eq!(current, vec![stale.clone(), changed]);
        let line = agent
            .wait_for("reach the mapped extent", Duration::from_secs(5))
            .expect("the agent did not log the write that reached a mapped file");
        assert!(line.contains("/f07"), "{line}");
        client.release(&image.id).unwrap();
    }

    /// On btrfs a file rewritten in place is written elsewhere (copy on
    /// write): the mapped extents keep the frozen bytes and the watch
    /// keeps vouching; a `nodatacow` file rewritten in place is written
    /// over its mapped extent, and the watch stops.
    #[test]
    fn on_btrfs_a_copy_on_write_rewrite_keeps_the_map_vouched_for_a_nodatacow_one_does_not() {
        let name =
            "on_btrfs_a_copy_on_write_rewrite_keeps_the_map_vouched_for_a_nodatacow_one_does_not";
        if !floe_tests::have("chattr") {
            return skip(name, "chattr (e2fsprogs) is missing");
        }
        // No discard: a freed extent is not trimmed under the test.
        let fs = match LoopFs::new("btrfs", 1, 256, &[], "nodiscard") {
            Ok(f) => f,
            Err(why) => return skip(name, &why),
        };
        std::fs::write(fs.mnt.join("cow"), vec![1u8; 65536]).unwrap();
        std::fs::File::create(fs.mnt.join("nocow")).unwrap();
        let st = Command::new("chattr")
            .arg("+C")
            .arg(fs.mnt.join("nocow"))
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        std::fs::write(fs.mnt.join("nocow"), vec![2u8; 65536]).unwrap();
        fs.sync();
        let allow = format!("fsflush:{}", fs.mnt.display());
        let agent = AgentProcess::start(&["--allow-source", &allow], &[]);
        let (mut client, image, items) = map_whole(&agent, &allow);
        for n in ["cow", "nocow"] {
            let item = items
                .iter()
                .find(|i| i.id.as_str().ends_with(&format!("/{n}")))
                .unwrap_or_else(|| panic!("{n} mapped"));
            assert!(
                item.extents
                    .iter()
                    .any(|e| matches!(e.kind, floe_core::model::ExtentKind::Data(_))),
                "{n} has no extent on the device: {:?}",
                item.extents
            );
        }
        assert!(client.held(&image.id).unwrap(), "thawed, nothing written");
        let rewrite = |n: &str| {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(fs.mnt.join(n))
                .unwrap();
            f.write_all_at(&[0xCD; 65536], 0).unwrap();
            f.sync_all().unwrap();
        };
        rewrite("cow");
        assert!(
            client.held(&image.id).unwrap(),
            "a copy-on-write rewrite ended the trust"
        );
        rewrite("nocow");
        assert!(
            !client.held(&image.id).unwrap(),
            "a nodatacow rewrite in place, yet vouched for"
        );
        let line = agent
            .wait_for("reach the mapped extent", Duration::from_secs(5))
            .expect("the agent did not log the write that ended the trust");
        assert!(line.contains("/nocow"), "{line}");
        client.release(&image.id).unwrap();
    }

    /// `held` asked while the agent lets the freeze go waits for the
    /// answer after it: not "no" during the thaw, only for the watch to
    /// vouch for the map right after (a mover told no once checks every
    /// file from then on).
    #[test]
    fn held_asked_during_the_thaw_waits_for_the_answer_after_it() {
        let name = "held_asked_during_the_thaw_waits_for_the_answer_after_it";
        let fs = match LoopFs::new("ext4", 1, 128, &[], "") {
            Ok(f) => f,
            Err(why) => return skip(name, &why),
        };
        for i in 0..20u8 {
            std::fs::write(fs.mnt.join(format!("f{i:02}")), vec![i; 5000]).unwrap();
        }
        let allow = format!("fsflush:{}", fs.mnt.display());
        let agent = AgentProcess::start(
            &[
                "--allow-source",
                &allow,
                "--plugin-opt",
                "fiemap.part_entries=5",
            ],
            &[("FLOE_PAUSEPOINT", "settle:1500")],
        );
        let mut client = floe_core::agent::AgentClient::connect_tcp(&agent.addr).unwrap();
        let (image, _, more) = client
            .freeze_in_parts(std::slice::from_ref(&allow), true)
            .unwrap();
        assert!(more, "the map came whole");
        agent
            .wait_for("pausepoint settle", Duration::from_secs(10))
            .expect("the agent never settled the freeze");
        let t = Instant::now();
        assert!(client.held(&image.id).unwrap(), "told no during the thaw");
        assert!(
            t.elapsed() > Duration::from_millis(500),
            "answered after {:?}, before the thaw was settled",
            t.elapsed()
        );
        while client.map_more(&image.id).unwrap().more {}
        assert!(client.held(&image.id).unwrap());
        client.release(&image.id).unwrap();
        drop(fs);
    }

    /// A watched file system of 8 files mapped whole by an agent paused
    /// where `pause` says (`FLOE_PAUSEPOINT`), the watch vouching for the
    /// map after the thaw: the file system, the agent, a client holding
    /// the image, and one of its files' items.
    fn watched_map(
        name: &str,
        pause: &str,
    ) -> Option<(
        LoopFs,
        AgentProcess,
        floe_core::agent::AgentClient,
        floe_core::model::FrozenImage,
        floe_core::model::Item,
    )> {
        if !floe_tests::have("dd") {
            skip(name, "dd is missing");
            return None;
        }
        let (fs, agent, allow) = agent_paused_at(
            name,
            8,
            pause,
            &[],
            &["--plugin-opt", "fiemap.watch_writes=true"],
        )?;
        let (mut client, image, items) = map_whole(&agent, &allow);
        let item = items
            .into_iter()
            .find(|i| i.kind == ItemKind::File)
            .expect("a file");
        assert!(client.held(&image.id).unwrap(), "thawed, nothing written");
        Some((fs, agent, client, image, item))
    }

    /// A watch that may have missed a write vouches for nothing: a flood
    /// of writes elsewhere, more than its rings hold between two drains
    /// (the drain thread held up here), ends the trust as a write into a
    /// mapped file would.
    #[test]
    fn a_watch_that_may_have_missed_a_write_vouches_for_nothing() {
        let name = "a_watch_that_may_have_missed_a_write_vouches_for_nothing";
        let Some((fs, agent, mut client, image, item)) = watched_map(name, "watch-drain:60000")
        else {
            return;
        };
        // 6,144 writes of 4 KiB, each its own bio (O_DIRECT), to a new
        // file: about 400 KiB of records against 128 KiB per CPU.
        let st = Command::new("dd")
            .args(["if=/dev/zero", "bs=4k", "count=6144", "oflag=direct"])
            .arg(format!("of={}", fs.mnt.join("flood").display()))
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        assert!(
            !client.held(&image.id).unwrap(),
            "a watch that cannot have kept every record still vouches"
        );
        assert!(
            !vouched_for(&mut client, &image, &item),
            "vouched for instead of looked at"
        );
        let line = agent
            .wait_for("stops vouching for the map", Duration::from_secs(5))
            .expect("the agent did not log why it checks every file");
        assert!(
            line.contains("more writes than the watch holds")
                || line.contains("dropped or throttled")
                || line.contains("recorded"),
            "{line}"
        );
        client.release(&image.id).unwrap();
    }

    /// A busy host keeps the watch: thousands of writes elsewhere (to a
    /// new file), more than a ring holds, queued while nobody asks the
    /// agent anything, are drained in the background; the map stays
    /// vouched for and no file is looked at.
    #[test]
    fn writes_elsewhere_beyond_a_ring_s_worth_keep_the_map_vouched_for() {
        let name = "writes_elsewhere_beyond_a_ring_s_worth_keep_the_map_vouched_for";
        let Some((fs, agent, mut client, image, item)) = watched_map(name, "map-part:0") else {
            return;
        };
        // 6,000 writes of 4 KiB, each its own bio (O_DIRECT), as a busy
        // application queues them: 100 at a time, 50 ms apart — ~600 KiB
        // of records against 128 KiB per CPU, the agent not asked.
        let flood = fs.mnt.join("busy");
        for k in 0..60 {
            let st = Command::new("dd")
                .args([
                    "if=/dev/zero",
                    "bs=4k",
                    "count=100",
                    "oflag=direct",
                    "conv=notrunc",
                ])
                .arg(format!("seek={}", k * 100))
                .arg(format!("of={}", flood.display()))
                .output()
                .unwrap();
            assert!(
                st.status.success(),
                "{}",
                String::from_utf8_lossy(&st.stderr)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(std::fs::metadata(&flood).unwrap().len(), 6000 * 4096);
        assert!(
            client.held(&image.id).unwrap(),
            "writes to another file ended the watch's trust"
        );
        // Vouched for: a check is answered without a look (the stale id
        // given is echoed back as valid).
        assert!(
            vouched_for(&mut client, &image, &item),
            "looked at instead of vouched for"
        );
        assert!(
            agent
                .wait_for("stops vouching for the map", Duration::from_millis(500))
                .is_none(),
            "the agent stopped trusting its watch"
        );
        client.release(&image.id).unwrap();
    }

    /// `hold_writes=backup`: past the map, checks are answered without a
    /// look while the file system stays frozen; once the freeze bound has
    /// thawed it, they look again (the rest of a set would be read as
    /// without the option).
    #[test]
    fn writes_held_for_the_backup_are_trusted_until_the_bound_thaws_them() {
        let name = "writes_held_for_the_backup_are_trusted_until_the_bound_thaws_them";
        let Some((fs, agent, allow)) = slowly_mapping_agent_with(
            name,
            12,
            0,
            &[],
            &[
                "--plugin-opt",
                "fsflush.hold_writes=backup",
                "--plugin-opt",
                "fsflush.freeze_timeout=3",
            ],
        ) else {
            return;
        };
        let frozen_at = Instant::now();
        let (mut client, image, items) = map_whole(&agent, &allow);
        let item = items
            .iter()
            .find(|i| i.kind == ItemKind::File)
            .expect("a file")
            .clone();
        let mut writer = probe(&fs);
        assert!(
            wait_exit(&mut writer, Duration::from_millis(300)).is_none(),
            "the file system thawed after the map"
        );
        let stale = ConfigId::new("not-the-config-id");
        assert!(
            vouched_for(&mut client, &image, &item),
            "looked at instead of vouched for"
        );
        let current = client
            .check_many(&image.id, vec![(item.id.clone(), stale.clone())])
            .unwrap();
        assert_eq!(current, vec![stale.clone()]);
        assert!(client.held(&image.id).unwrap(), "frozen, yet not held");
        wait_exit(&mut writer, Duration::from_secs(8)).expect("still frozen 8 s past a 3 s bound");
        assert!(
            frozen_at.elapsed() > Duration::from_millis(2500),
            "thawed after {:?}, before the bound",
            frozen_at.elapsed()
        );
        assert!(
            !client.held(&image.id).unwrap(),
            "thawed by the bound, yet held"
        );
        assert!(
            !vouched_for(&mut client, &image, &item),
            "a check after the bound trusted the freeze"
        );
        let current = client
            .check_many(&image.id, vec![(item.id.clone(), stale.clone())])
            .unwrap();
        assert_eq!(current, vec![item.config.clone()]);
        assert!(
            agent
                .wait_for("let go before the release", Duration::from_secs(5))
                .is_some(),
            "the agent did not log that writes were let go early"
        );
        client.release(&image.id).unwrap();
    }

    /// `hold_writes=backup`: a file system thawed by something else than
    /// Floe (an admin's `fsfreeze -u`) ends the trust at the next check —
    /// the guard has not fired, the probe finds it thawed.
    #[test]
    fn writes_held_for_the_backup_stop_being_trusted_when_something_else_thaws() {
        let name = "writes_held_for_the_backup_stop_being_trusted_when_something_else_thaws";
        if !floe_tests::have("fsfreeze") {
            return skip(name, "fsfreeze (util-linux) is missing");
        }
        let Some((fs, agent, allow)) = slowly_mapping_agent_with(
            name,
            12,
            0,
            &[],
            &["--plugin-opt", "fsflush.hold_writes=backup"],
        ) else {
            return;
        };
        let (mut client, image, items) = map_whole(&agent, &allow);
        let item = items
            .iter()
            .find(|i| i.kind == ItemKind::File)
            .expect("a file")
            .clone();
        assert!(
            vouched_for(&mut client, &image, &item),
            "looked at instead of vouched for"
        );
        let st = Command::new("fsfreeze")
            .arg("-u")
            .arg(&fs.mnt)
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        assert!(
            !client.held(&image.id).unwrap(),
            "thawed by an admin, yet held"
        );
        assert!(
            !vouched_for(&mut client, &image, &item),
            "a check after someone thawed trusted the freeze"
        );
        assert!(
            agent
                .wait_for("let go before the release", Duration::from_secs(5))
                .is_some(),
            "the agent did not log that writes were let go early"
        );
        // The probe undid its own freeze: writes go through.
        let mut writer = probe(&fs);
        wait_exit(&mut writer, Duration::from_secs(3)).expect("frozen again after the probe");
        client.release(&image.id).unwrap();
    }

    /// Files of ext4 are mapped by inode number (no name looked up in a
    /// cold directory) and checked after the thaw by handle: the inode
    /// that was mapped, with its generation, wherever its name went.
    #[test]
    fn checks_after_the_thaw_look_at_the_inode_that_was_mapped() {
        checks_after_the_thaw(
            "checks_after_the_thaw_look_at_the_inode_that_was_mapped",
            &[],
            true,
        );
    }

    /// Without `CAP_DAC_READ_SEARCH` (no opening by handle) the agent maps
    /// and checks every file by name, with the same outcomes but for a
    /// renamed file: gone from its path.
    #[test]
    fn without_open_by_handle_files_are_mapped_and_checked_by_name() {
        let name = "without_open_by_handle_files_are_mapped_and_checked_by_name";
        if std::process::Command::new("setpriv")
            .arg("--version")
            .output()
            .is_err()
        {
            return skip(name, "setpriv (util-linux) is missing");
        }
        checks_after_the_thaw(
            name,
            &[
                "setpriv",
                "--bounding-set=-dac_read_search",
                "--inh-caps=-dac_read_search",
                "--",
            ],
            false,
        );
    }

    /// A batch large enough to be checked on several threads comes back
    /// in the order asked, each answer the one a check of that file alone
    /// gives: the files changed after the thaw differ, the others not.
    #[test]
    fn a_large_batch_of_checks_comes_back_in_order() {
        let name = "a_large_batch_of_checks_comes_back_in_order";
        let Some((fs, agent, allow)) = slowly_mapping_agent_with(name, 200, 0, &[], &[]) else {
            return;
        };
        let (mut client, image, mut items) = map_whole(&agent, &allow);
        items.retain(|i| i.kind == ItemKind::File);
        assert_eq!(items.len(), 200);
        // Thawed: every seventh file grows.
        let changed = |k: usize| k % 7 == 3;
        for (k, i) in items.iter().enumerate().filter(|(k, _)| changed(*k)) {
            let path = i.id.as_str();
            std::io::Write::write_all(
                &mut std::fs::OpenOptions::new().append(true).open(path).unwrap(),
                b"more",
            )
            .unwrap_or_else(|e| panic!("{k} {path}: {e}"));
        }
        let asked: Vec<_> = items
            .iter()
            .map(|i| (i.id.clone(), i.config.clone()))
            .collect();
        let current = client.check_many(&image.id, asked).unwrap();
        assert_eq!(current.len(), items.len());
        for (k, (i, c)) in items.iter().zip(&current).enumerate() {
            assert_eq!(*c != i.config, changed(k), "{k}: {} {c}", i.id);
            let (alone, _) = client.check(&image.id, &i.id, &i.config).unwrap();
            assert_eq!(&alone, c, "{k}: {}", i.id);
        }
        client.release(&image.id).unwrap();
        drop(fs);
    }

    /// Map six files, change five of them after the thaw, check them all;
    /// `by_inode`: the agent can open files by handle.
    fn checks_after_the_thaw(name: &str, wrapper: &[&str], by_inode: bool) {
        let Some((fs, agent, allow)) = slowly_mapping_agent_under(name, 6, 0, wrapper) else {
            return;
        };
        let (mut client, image, items) = map_whole(&agent, &allow);
        let mapped = |n: &str| {
            let item = items
                .iter()
                .find(|i| i.id.as_str().ends_with(&format!("/{n}")))
                .unwrap_or_else(|| panic!("{n} mapped"));
            (item.id.clone(), item.config.clone())
        };
        let inode = |c: &ConfigId| c.as_str().split(':').nth(1).unwrap().to_string();
        // Thawed now. f00 untouched, f01 appended to, f02 removed, f03
        // renamed over by a new file (its inode deleted), f04 renamed.
        let m = &fs.mnt;
        std::io::Write::write_all(
            &mut std::fs::OpenOptions::new()
                .append(true)
                .open(m.join("f01"))
                .unwrap(),
            b"more",
        )
        .unwrap();
        std::fs::remove_file(m.join("f02")).unwrap();
        std::fs::write(m.join("new"), b"new").unwrap();
        std::fs::rename(m.join("new"), m.join("f03")).unwrap();
        std::fs::rename(m.join("f04"), m.join("f04.moved")).unwrap();
        let check = |client: &mut floe_core::agent::AgentClient, n: &str| {
            let (id, config) = mapped(n);
            let (current, valid) = client.check(&image.id, &id, &config).unwrap();
            (config, current, valid)
        };
        let (config, current, valid) = check(&mut client, "f00");
        assert!(valid && current == config, "{current}");
        let (config, current, valid) = check(&mut client, "f01");
        assert!(
            !valid && inode(&current) == inode(&config),
            "{config} {current}"
        );
        let (_, current, valid) = check(&mut client, "f02");
        assert!(!valid && current.as_str().starts_with("gone:"), "{current}");
        // Renamed over: by handle the mapped inode is gone; by name the
        // path holds another inode.
        let (config, current, valid) = check(&mut client, "f03");
        if by_inode {
            assert!(!valid && current.as_str().starts_with("gone:"), "{current}");
        } else {
            assert!(
                !valid && current.as_str().starts_with("f:") && inode(&current) != inode(&config),
                "{config} {current}"
            );
        }
        // By path f04 is gone; by handle its inode is there, changed by
        // the rename (its ctime).
        let (config, current, valid) = check(&mut client, "f04");
        if by_inode {
            assert!(
                !valid && current.as_str().starts_with("f:") && inode(&current) == inode(&config),
                "{config} {current}"
            );
        } else {
            assert!(!valid && current.as_str().starts_with("gone:"), "{current}");
        }
        // f05 untouched, asked among others.
        let (id, config) = mapped("f05");
        let (id0, config0) = mapped("f00");
        let current = client
            .check_many(
                &image.id,
                vec![(id, config.clone()), (id0, config0.clone())],
            )
            .unwrap();
        assert_eq!(current, vec![config, config0]);
        client.release(&image.id).unwrap();
    }

    fn frozen_agent(
        name: &str,
        bound: &str,
        pause: &str,
    ) -> Option<(LoopFs, AgentProcess, std::process::Child)> {
        let mut fs = match LoopFs::new("ext4", 1, 128, &[], "") {
            Ok(f) => f,
            Err(why) => {
                skip(name, &why);
                return None;
            }
        };
        std::fs::write(fs.mnt.join("data"), vec![7u8; 100_000]).unwrap();
        fs.mover_view().unwrap();
        let allow = format!("fsflush:{}", fs.mnt.display());
        let agent = AgentProcess::start(
            &[
                "--allow-source",
                &allow,
                "--plugin-opt",
                &format!("fsflush.freeze_timeout={bound}"),
            ],
            &[("FLOE_PAUSEPOINT", pause)],
        );
        let mut mover = floe_cmd();
        mover
            .args([
                "backup",
                "--agent",
                &agent.addr,
                "--source",
                &allow,
                "--media",
            ])
            .arg(format!("disk:{}", fs.dir.path().join("media").display()))
            .args(fs.device_args())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mover = mover.spawn().unwrap();
        assert!(
            agent
                .wait_for("pausepoint fsflush-frozen", Duration::from_secs(20))
                .is_some(),
            "the agent never froze"
        );
        Some((fs, agent, mover))
    }

    #[test]
    fn an_agent_killed_while_the_file_system_is_frozen_leaves_it_thawed() {
        let name = "an_agent_killed_while_the_file_system_is_frozen_leaves_it_thawed";
        let Some((fs, mut agent, mover)) = frozen_agent(name, "120", "fsflush-frozen") else {
            return;
        };
        let mut w = probe(&fs);
        assert!(
            wait_exit(&mut w, Duration::from_millis(700)).is_none(),
            "writes are not held: the file system is not frozen"
        );
        agent.child.kill().unwrap(); // SIGKILL, our own child
        agent.child.wait().unwrap();
        // The bound is 120 s: only the guard seeing its agent die can thaw
        // this fast.
        let took = wait_exit(&mut w, Duration::from_secs(10))
            .expect("the file system stayed frozen after the agent was killed");
        assert!(w.wait().unwrap().success());
        eprintln!("thawed {took:?} after the agent was killed");
        let out = mover.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("nothing was recorded as complete"));
    }

    #[test]
    fn a_stuck_agent_is_thawed_at_the_freeze_bound() {
        let name = "a_stuck_agent_is_thawed_at_the_freeze_bound";
        let Some((fs, agent, mover)) = frozen_agent(name, "2", "fsflush-frozen") else {
            return;
        };
        let mut w = probe(&fs);
        let t = Instant::now();
        assert!(
            wait_exit(&mut w, Duration::from_millis(700)).is_none(),
            "not frozen"
        );
        let took = wait_exit(&mut w, Duration::from_secs(15))
            .expect("the bound did not thaw the file system");
        let total = t.elapsed();
        assert!(
            total >= Duration::from_millis(1000) && total < Duration::from_secs(8),
            "thawed after {total:?} ({took:?}), bound 2 s"
        );
        // The agent is still alive, stuck; the writer went through anyway.
        assert!(std::process::Command::new("kill")
            .args(["-0", &agent.child.id().to_string()])
            .status()
            .unwrap()
            .success());
        drop(agent);
        let _ = mover.wait_with_output();
    }

    #[test]
    fn a_map_captured_after_the_bound_thawed_is_refused() {
        let name = "a_map_captured_after_the_bound_thawed_is_refused";
        // Bound 1 s; the agent is held 2.5 s inside the freeze, then maps.
        let Some((_fs, _agent, mover)) = frozen_agent(name, "1", "fsflush-frozen:2500") else {
            return;
        };
        let out = mover.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("freeze bound of 1 s ran out before the map was captured"),
            "{err}"
        );
    }
}

mod bad_input {
    use super::*;
    use std::process::Command;

    struct Tmpfs(tempfile::TempDir);
    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0.path()).status();
        }
    }

    /// One set, four kinds of trouble: a listed path outside its source, a
    /// listed file that does not exist, a file system on a device the mover
    /// cannot see, a file system no mapper supports. Each is one clear
    /// failure; everything else is backed up and restores; the set is
    /// committed as partial and `floe backup` exits 3.
    #[test]
    fn each_bad_input_fails_its_items_and_the_rest_of_the_set_completes() {
        let name = "each_bad_input_fails_its_items_and_the_rest_of_the_set_completes";
        let mut good = match LoopFs::new("ext4", 1, 128, &[], "") {
            Ok(f) => f,
            Err(why) => return skip(name, &why),
        };
        let unseen =
            LoopFs::new("xfs", 1, 300, &[], "").or_else(|_| LoopFs::new("ext4", 1, 128, &[], ""));
        let Ok(unseen) = unseen else {
            return skip(name, "a second file system");
        };
        let tmp = Tmpfs(tempfile::tempdir().unwrap());
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "tmpfs"])
            .arg(tmp.0.path())
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::write(tmp.0.path().join("t"), b"on tmpfs").unwrap();
        let g = &good.mnt.clone();
        std::fs::create_dir_all(g.join("keep")).unwrap();
        std::fs::write(g.join("keep/a"), vec![1u8; 50_000]).unwrap();
        std::fs::write(g.join("keep/b"), vec![2u8; 5_000]).unwrap();
        std::fs::write(
            g.join("list"),
            format!(
                "keep\n/etc/passwd\nkeep/not-there\n{}/keep/b\n",
                g.display()
            ),
        )
        .unwrap();
        std::fs::write(unseen.mnt.join("u"), vec![3u8; 40_000]).unwrap();
        good.mover_view().unwrap();
        let sources = vec![
            format!("fsflush:{}?from={}/list", g.display(), g.display()),
            format!("fsflush:{}", unseen.mnt.display()),
            format!("fsflush:{}", tmp.0.path().display()),
        ];
        let agent = AgentProcess::start(&["--allow-source", "fsflush:/tmp/*"], &[]);
        let media = good.dir.path().join("media");
        let mut extra = good.device_args();
        extra.extend([
            "--allow-device".to_string(),
            format!("file:{}", unseen.images[0].display()),
        ]);
        let (code, out, err) = floe_backup(&agent.addr, &sources, &media, &extra);
        assert_eq!(
            code, 3,
            "a partial set must not look like success:\n{out}\n{err}"
        );
        assert!(out.contains("PARTIAL"), "{out}");
        let named = |what: &str| {
            err.lines()
                .any(|l| l.contains("not backed up") && l.contains(what))
        };
        assert!(named("/etc/passwd is outside the source"), "{err}");
        assert!(named("keep/not-there"), "{err}");
        assert!(
            named(&format!("{}/u", unseen.mnt.display())) && named("unknown device"),
            "{err}"
        );
        assert!(named("on tmpfs, which Floe cannot map"), "{err}");
        assert!(
            err.contains("is PARTIAL: 4 item(s) could not be backed up"),
            "{err}"
        );

        // The listing of the media says so too.
        let set = set_of(&out);
        let listed = floe_cmd()
            .args(["list", "--media"])
            .arg(format!("disk:{}", media.display()))
            .output()
            .unwrap();
        let listed = String::from_utf8_lossy(&listed.stdout);
        assert!(
            listed.starts_with(&set) && listed.contains("  partial: 4 not backed up  "),
            "{listed}"
        );

        // What the set holds restores exactly.
        let to = good.dir.path().join("out");
        let r = floe_cmd()
            .args(["restore", "--media"])
            .arg(format!("disk:{}", media.display()))
            .args(["--set", &set, "--to-dir"])
            .arg(&to)
            .output()
            .unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let base = to.join(g.strip_prefix("/").unwrap());
        assert_eq!(
            std::fs::read(base.join("keep/a")).unwrap(),
            vec![1u8; 50_000]
        );
        assert_eq!(
            std::fs::read(base.join("keep/b")).unwrap(),
            vec![2u8; 5_000]
        );
    }
}

mod two_hosts {
    use super::*;
    use floe_tests::hostfs::NetPair;

    /// The agent on the application host (its own network namespace), the
    /// mover on the backup host (another), joined by a veth pair. Only the
    /// map crosses the network; the mover reads the disk through its own
    /// read-only path (a second loop device on the image) with O_DIRECT.
    #[test]
    fn agent_and_mover_on_two_hosts_joined_by_veth() {
        let name = "agent_and_mover_on_two_hosts_joined_by_veth";
        let net = match NetPair::create() {
            Ok(n) => n,
            Err(why) => return skip(name, &why),
        };
        let mut fs = match LoopFs::new("ext4", 1, 256, &[], "") {
            Ok(f) => f,
            Err(why) => return skip(name, &why),
        };
        let facts = make_tree(&fs.mnt, 800, 3);
        fs.mover_view().unwrap();
        let allow = format!("fsflush:{}", fs.mnt.display());
        let mut a = net.floe_in(&net.a);
        a.args([
            "agent",
            "--listen",
            &format!("{}:0", net.ip_a),
            "--allow-source",
            &allow,
        ]);
        let agent = AgentProcess::from_command(a);
        assert!(agent.addr.starts_with(&net.ip_a), "{}", agent.addr);
        let media = fs.dir.path().join("media");
        let out = net
            .floe_in(&net.b)
            .args([
                "backup",
                "--agent",
                &agent.addr,
                "--source",
                &allow,
                "--json",
                "--media",
            ])
            .arg(format!("disk:{}", media.display()))
            .args(fs.device_args())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let set = report["set"]["header"]["set"].as_str().unwrap().to_string();
        // The mover read the file data from the disk, the agent sent a map.
        let read = report["bytes_read"].as_u64().unwrap();
        assert!(
            read >= facts.bytes / 2,
            "the mover read {read} bytes of {}",
            facts.bytes
        );
        let to = fs.dir.path().join("restored");
        restore_and_compare(&media, &set, &to, &fs.mnt);
    }
}

/// While the file systems are flushed and frozen, the trees' directories
/// are read ahead (so the listing under the freeze finds them cached):
/// every directory of the tree once, none through a symlink, and not with
/// `fsflush.read_ahead=false`; the backup is the same either way.
#[test]
fn a_tree_s_directories_are_read_ahead_while_the_file_system_is_flushed() {
    let name = "a_tree_s_directories_are_read_ahead_while_the_file_system_is_flushed";
    let mut src = match LoopFs::new("ext4", 1, 64, &[], "") {
        Ok(f) => f,
        Err(why) => return skip(name, &why),
    };
    let mut dirs = 1;
    for a in 0..5 {
        for b in 0..4 {
            let d = src.mnt.join(format!("a{a}/b{b}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("f"), format!("{a}{b}")).unwrap();
            dirs += 1;
        }
        dirs += 1;
    }
    // lost+found is a directory of the tree too.
    dirs += 1;
    std::os::unix::fs::symlink(src.mnt.join("a0"), src.mnt.join("to-a0")).unwrap();
    src.sync();
    src.mover_view().expect("read-only view");
    let allow = format!("fsflush:{}", src.mnt.display());
    // The agent waits between the flush and the freeze, so the read ahead
    // finishes before it is stopped.
    for (opts, want) in [
        (vec![], Some(format!("({dirs} directories read ahead)"))),
        (vec!["--plugin-opt", "fsflush.read_ahead=false"], None),
    ] {
        let mut args = vec!["--allow-source", allow.as_str()];
        args.extend(opts);
        let agent = AgentProcess::start(&args, &[("FLOE_PAUSEPOINT", "fsflush-flushed:500")]);
        let media = src.dir.path().join(format!("media-{}", want.is_some()));
        let (code, out, err) = floe_backup(
            &agent.addr,
            std::slice::from_ref(&allow),
            &media,
            &src.device_args(),
        );
        assert_eq!(code, 0, "{out}\n{err}");
        let held = agent
            .wait_for("writes held", std::time::Duration::from_secs(10))
            .expect("no line saying how long writes were held");
        match &want {
            Some(w) => assert!(held.contains(w), "{held}"),
            None => assert!(!held.contains("read ahead"), "{held}"),
        }
        let to = src.dir.path().join(format!("restored-{}", want.is_some()));
        restore_and_compare(&media, &set_of(&out), &to, &src.mnt);
    }
}

/// The agent logs how it mapped files and how long it held writes, and a
/// log nobody reads any more (its stderr a pipe whose reader went away)
/// stops no backup: a log line that cannot be written is dropped, not a
/// panic in the plugin thawing the file system.
#[test]
fn an_agent_logs_how_long_writes_were_held_and_backs_up_when_its_log_is_gone() {
    let name = "an_agent_logs_how_long_writes_were_held_and_backs_up_when_its_log_is_gone";
    let mut src = match LoopFs::new("ext4", 1, 64, &[], "") {
        Ok(f) => f,
        Err(why) => return skip(name, &why),
    };
    std::fs::write(src.mnt.join("f"), b"some bytes").unwrap();
    src.sync();
    src.mover_view().expect("read-only view");
    let allow = format!("fsflush:{}*", src.mnt.display());
    let mut agent = AgentProcess::start(&["--allow-source", &allow], &[]);
    let backup = |round: usize| {
        let media = src.dir.path().join(format!("media{round}"));
        let (code, out, err) = floe_backup(
            &agent.addr,
            &[format!("fsflush:{}", src.mnt.display())],
            &media,
            &src.device_args(),
        );
        assert_eq!(code, 0, "backup {round} failed:\n{out}\n{err}");
    };
    backup(0);
    // The one file came from the device's metadata (the file system was
    // frozen), and the log says so before the thaw.
    let mapped = agent
        .wait_for("fiemap:", std::time::Duration::from_secs(10))
        .expect("no line saying how files were mapped");
    assert!(
        mapped.contains("1 file mapped from their device's metadata, 0 through the kernel"),
        "{mapped}"
    );
    let held = agent
        .wait_for("writes held", std::time::Duration::from_secs(10))
        .expect("no line saying how long writes were held");
    assert!(
        held.contains(" s on ") && held.contains(&src.mnt.display().to_string()),
        "{held}"
    );
    // Nobody reads the log from here: the reader stops at the next line
    // and closes the pipe; the round after writes into a closed pipe.
    agent.stderr = std::sync::mpsc::channel().1;
    for round in 1..=2 {
        backup(round);
    }
}

/// A file system in a partition: extents are offset by the partition's
/// start (from sysfs) on the whole disk, which is what the mover reads.
#[test]
fn a_file_system_in_a_partition_maps_to_the_whole_disk() {
    let name = "a_file_system_in_a_partition_maps_to_the_whole_disk";
    let mut fs = match LoopFs::new_partitioned("ext4", 128) {
        Ok(f) => f,
        Err(why) => return skip(name, &why),
    };
    make_tree(&fs.mnt, 200, 5);
    fs.mover_view().unwrap();
    let allow = format!("fsflush:{}", fs.mnt.display());
    let agent = AgentProcess::start(&["--allow-source", &allow], &[]);
    let media = fs.dir.path().join("media");
    let (code, out, err) = floe_backup(
        &agent.addr,
        std::slice::from_ref(&allow),
        &media,
        &fs.device_args(),
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let to = fs.dir.path().join("restored");
    restore_and_compare(&media, &set_of(&out), &to, &fs.mnt);
}

/// The watch of writes on a file system in a partition: a write into a
/// file's blocks is traced at the partition's or the disk's sectors, and
/// either lands on the file's mapped extent (whose device is the whole
/// disk, its offsets past the partition's start).
#[test]
fn a_write_in_a_partition_reaches_the_mapped_extent_on_its_disk() {
    let name = "a_write_in_a_partition_reaches_the_mapped_extent_on_its_disk";
    let fs = match LoopFs::new_partitioned("ext4", 128) {
        Ok(f) => f,
        Err(why) => return skip(name, &why),
    };
    let mut rng = floe_tests::hostfs::Rng::new(8);
    for i in 0..6 {
        std::fs::write(fs.mnt.join(format!("f{i}")), rng.bytes(65536)).unwrap();
    }
    fs.sync();
    let allow = format!("fsflush:{}", fs.mnt.display());
    let agent = AgentProcess::start(&["--allow-source", &allow], &[]);
    let mut client = floe_core::agent::AgentClient::connect_tcp(&agent.addr).unwrap();
    let (image, first, mut more) = client
        .freeze_in_parts(std::slice::from_ref(&allow), true)
        .unwrap();
    let mut items = first.items;
    while more {
        let part = client.map_more(&image.id).unwrap();
        items.extend(part.map.items);
        more = part.more;
    }
    let file = |n: &str| {
        items
            .iter()
            .find(|i| i.id.as_str().ends_with(&format!("/{n}")))
            .unwrap_or_else(|| panic!("{n} mapped"))
            .clone()
    };
    assert!(client.held(&image.id).unwrap(), "thawed, nothing written");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(fs.mnt.join("f3"))
            .unwrap();
        f.write_all_at(&[0x5A; 8192], 4096).unwrap();
        f.sync_all().unwrap();
    }
    assert!(
        !client.held(&image.id).unwrap(),
        "a write into f3's blocks was not placed on its mapped extent"
    );
    let f3 = file("f3");
    let stale = ConfigId::new("not-the-config-id");
    let (current, valid) = client.check(&image.id, &f3.id, &f3.config).unwrap();
    assert!(!valid && current != f3.config, "{current}");
    let f1 = file("f1");
    let (current, valid) = client.check(&image.id, &f1.id, &stale).unwrap();
    assert!(valid && current == stale, "{current}");
    let line = agent
        .wait_for("reach the mapped extent", std::time::Duration::from_secs(5))
        .expect("the agent did not log the write");
    assert!(line.contains("/f3"), "{line}");
    client.release(&image.id).unwrap();
}

mod snapshots {
    use super::*;
    use std::process::Command;

    /// A snapshot's files are watched too: after the map, a check of a
    /// file no write reached is answered without a look, whatever the
    /// application rewrites in the live tree (copy on write: elsewhere);
    /// a write onto a snapshot file's mapped blocks (here straight to the
    /// device) makes that file, and only it, be looked at.
    #[test]
    fn a_snapshot_s_files_are_looked_at_only_once_a_write_reached_their_blocks() {
        let name = "a_snapshot_s_files_are_looked_at_only_once_a_write_reached_their_blocks";
        if !floe_tests::have("dd") {
            return skip(name, "dd is missing");
        }
        let fs = match LoopFs::new("btrfs", 1, 256, &[], "nodiscard") {
            Ok(f) => f,
            Err(why) => return skip(name, &why),
        };
        let mut rng = floe_tests::hostfs::Rng::new(3);
        for i in 0..6 {
            std::fs::write(fs.mnt.join(format!("f{i}")), rng.bytes(65536)).unwrap();
        }
        fs.sync();
        let source = format!("btrfs-snapshot:{}", fs.mnt.display());
        let agent = AgentProcess::start(&["--allow-source", &source], &[]);
        let mut client = floe_core::agent::AgentClient::connect_tcp(&agent.addr).unwrap();
        let (image, first, mut more) = client
            .freeze_in_parts(std::slice::from_ref(&source), true)
            .unwrap();
        let mut items = first.items;
        while more {
            let part = client.map_more(&image.id).unwrap();
            items.extend(part.map.items);
            more = part.more;
        }
        let file = |n: &str| {
            items
                .iter()
                .find(|i| i.id.as_str().ends_with(&format!("/{n}")))
                .unwrap_or_else(|| panic!("{n} mapped"))
                .clone()
        };
        let stale = ConfigId::new("not-the-config-id");
        let trusted = |client: &mut floe_core::agent::AgentClient, n: &str| {
            let (current, valid) = client.check(&image.id, &file(n).id, &stale).unwrap();
            assert_eq!(valid, current == stale);
            valid
        };
        assert!(trusted(&mut client, "f1"), "nothing written, yet looked at");
        // The live f1 rewritten: copy on write, the snapshot's blocks stay.
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(fs.mnt.join("f1"))
                .unwrap();
            f.write_all_at(&[0xEE; 65536], 0).unwrap();
            f.sync_all().unwrap();
        }
        assert!(
            trusted(&mut client, "f1"),
            "a rewrite elsewhere ended the trust"
        );
        // A block of the snapshot's f2, overwritten on the device.
        let f2 = file("f2");
        let at = f2
            .extents
            .iter()
            .find_map(|e| match &e.kind {
                floe_core::model::ExtentKind::Data(c) => {
                    Some(c.physical.start.0 * u64::from(c.physical.block_size.0))
                }
                _ => None,
            })
            .expect("f2 has an extent on the device");
        let st = Command::new("dd")
            .args([
                "if=/dev/zero",
                "bs=4096",
                "count=1",
                "oflag=direct",
                "conv=notrunc",
            ])
            .arg(format!("of={}", fs.devs[0]))
            .arg(format!("seek={}", at / 4096))
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        let (current, valid) = client.check(&image.id, &f2.id, &stale).unwrap();
        assert!(
            !valid && current == f2.config,
            "f2 not looked at: {current}"
        );
        assert!(
            trusted(&mut client, "f3"),
            "a write to f2 ended the trust in f3"
        );
        client.release(&image.id).unwrap();
    }

    /// A freezer that keeps the frozen version (a read-only btrfs
    /// snapshot, reflink clones on XFS or btrfs): whatever the application
    /// writes, deletes or defragments while the mover reads, the restore
    /// equals the tree as it was at the freeze, nothing is flagged as
    /// captured later, and the freezer's own copy is gone afterwards.
    fn frozen_copy_holds(name: &str, fstype: &str, freezer: &str, own_dir: &str) {
        let mut fs = match LoopFs::new(fstype, 1, 512, &[], "") {
            Ok(f) => f,
            Err(why) => return skip(name, &why),
        };
        let bulk = fs.mnt.join("aa");
        std::fs::create_dir_all(&bulk).unwrap();
        let mut rng = floe_tests::hostfs::Rng::new(5);
        for i in 0..60 {
            std::fs::write(bulk.join(format!("b{i:03}")), rng.bytes(200_000)).unwrap();
        }
        make_tree(&fs.mnt, 600, 9);
        fs.sync();
        // The reference: the tree as it is now, copied aside.
        let reference = tempfile::tempdir().unwrap();
        let cp = Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", fs.mnt.display()))
            .arg(reference.path())
            .status()
            .unwrap();
        assert!(cp.success());
        fs.mover_view().unwrap();
        let source = format!("{freezer}:{}", fs.mnt.display());
        let agent = AgentProcess::start(&["--allow-source", &source], &[]);
        let mnt = fs.mnt.clone();
        let fstype2 = fstype.to_string();
        let hook = move || {
            let mut rng = floe_tests::hostfs::Rng::new(77);
            for e in std::fs::read_dir(mnt.join("src/mod03/sub3"))
                .unwrap()
                .flatten()
            {
                std::fs::write(e.path(), rng.bytes(5000)).unwrap();
            }
            std::fs::remove_file(mnt.join("links/target.txt")).unwrap();
            std::fs::remove_dir_all(mnt.join("special/empty-dir")).unwrap();
            std::fs::write(mnt.join("new-file"), b"after the freeze").unwrap();
            let mut c = if fstype2 == "btrfs" {
                let mut c = Command::new("btrfs");
                c.args(["balance", "start", "--full-balance", "-d"])
                    .arg(&mnt);
                c
            } else {
                let mut c = Command::new("xfs_fsr");
                c.arg(&mnt);
                c
            };
            let st = c.output().unwrap();
            assert!(
                st.status.success(),
                "{c:?}: {}",
                String::from_utf8_lossy(&st.stderr)
            );
        };
        let media = fs.dir.path().join("media");
        let report = backup_meddled(
            &fs,
            &agent,
            std::slice::from_ref(&source),
            &media,
            Box::new(hook),
        )
        .expect("backup from a frozen copy");
        assert!(report.set.failures.is_empty(), "{:?}", report.set.failures);
        assert!(report
            .set
            .items
            .iter()
            .all(|i| !i.trailer.captured_after_freeze));
        assert!(
            !fs.mnt.join(own_dir).exists(),
            "the freezer's copy was not removed"
        );
        let to = fs.dir.path().join("restored");
        restore_from_disk(&media, &report.set.header.set, &to);
        let diffs = compare_trees(reference.path(), &to);
        assert!(diffs.is_empty(), "{:#?}", &diffs[..diffs.len().min(20)]);
    }

    /// An agent killed while it held an image leaves its snapshot or its
    /// clones behind; the next freeze beside them removes them — only
    /// those of agents that are gone.
    #[test]
    fn copies_left_by_a_dead_agent_are_reaped_by_the_next_freeze() {
        let name = "copies_left_by_a_dead_agent_are_reaped_by_the_next_freeze";
        let mut fs = match LoopFs::new("btrfs", 1, 512, &[], "") {
            Ok(f) => f,
            Err(why) => return skip(name, &why),
        };
        make_tree(&fs.mnt, 50, 4);
        let mut gone = Command::new("true").spawn().unwrap();
        let dead = gone.id();
        gone.wait().unwrap();
        // What a killed agent leaves: a read-only snapshot, and immutable
        // reflink clones.
        let snaps = fs.mnt.join(".floe-snapshots");
        std::fs::create_dir_all(&snaps).unwrap();
        let left_snap = snaps.join(format!("btrfs-snapshot-100-{dead}"));
        let st = Command::new("btrfs")
            .args(["subvolume", "snapshot", "-r"])
            .arg(&fs.mnt)
            .arg(&left_snap)
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        let clones = fs.mnt.join(".floe-clones");
        let left_clone = clones.join(format!("reflink-100-{dead}")).join("0");
        std::fs::create_dir_all(&left_clone).unwrap();
        let cp = Command::new("cp")
            .args(["--reflink=always"])
            .arg(fs.mnt.join("links/target.txt"))
            .arg(left_clone.join("target.txt"))
            .status()
            .unwrap();
        assert!(cp.success());
        assert!(Command::new("chattr")
            .arg("+i")
            .arg(left_clone.join("target.txt"))
            .status()
            .unwrap()
            .success());
        fs.sync();
        fs.mover_view().unwrap();
        for (freezer, left, dir) in [
            ("btrfs-snapshot", left_snap.clone(), snaps.clone()),
            (
                "reflink",
                left_clone.parent().unwrap().to_path_buf(),
                clones.clone(),
            ),
        ] {
            let source = format!("{freezer}:{}", fs.mnt.display());
            let agent = AgentProcess::start(&["--allow-source", &source], &[]);
            let media = fs.dir.path().join(format!("media-{freezer}"));
            let (code, out, err) = floe_backup(
                &agent.addr,
                std::slice::from_ref(&source),
                &media,
                &fs.btrfs_device_args(),
            );
            assert_eq!(code, 0, "{freezer}: {out}\n{err}");
            assert!(!left.exists(), "{freezer} left {} in place", left.display());
            assert!(
                agent
                    .wait_for(
                        "left by an agent that died",
                        std::time::Duration::from_secs(5)
                    )
                    .is_some(),
                "{freezer}: the agent did not say what it removed"
            );
            assert!(
                !dir.exists(),
                "{freezer}: {} not removed once empty",
                dir.display()
            );
        }
    }

    #[test]
    fn btrfs_snapshot_backs_up_the_frozen_tree_whatever_the_application_does() {
        frozen_copy_holds(
            "btrfs_snapshot_backs_up_the_frozen_tree_whatever_the_application_does",
            "btrfs",
            "btrfs-snapshot",
            ".floe-snapshots",
        );
    }

    #[test]
    fn reflink_clones_on_xfs_back_up_the_frozen_tree_whatever_the_application_and_xfs_fsr_do() {
        frozen_copy_holds(
            "reflink_clones_on_xfs_back_up_the_frozen_tree_whatever_the_application_and_xfs_fsr_do",
            "xfs",
            "reflink",
            ".floe-clones",
        );
    }

    #[test]
    fn reflink_clones_on_btrfs_back_up_the_frozen_tree_whatever_the_application_and_balance_do() {
        frozen_copy_holds(
            "reflink_clones_on_btrfs_back_up_the_frozen_tree_whatever_the_application_and_balance_do",
            "btrfs",
            "reflink",
            ".floe-clones",
        );
    }
}

mod lvm {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// Two PVs on loop devices, a VG whose LVs are written by the real
    /// LVM tools (`vgcfgrestore`: no device-mapper needed), LVM's own
    /// files kept in a scratch `LVM_SYSTEM_DIR`.
    struct Vg {
        name: String,
        sysdir: tempfile::TempDir,
        images: Vec<PathBuf>,
        devs: Vec<String>,
        ro: Vec<String>,
    }

    impl Drop for Vg {
        fn drop(&mut self) {
            for d in self.ro.iter().chain(&self.devs) {
                let _ = Command::new("losetup").args(["-d", d]).status();
            }
        }
    }

    impl Vg {
        fn lvm(&self, args: &[&str]) -> String {
            lvm_in(self.sysdir.path(), args)
        }

        fn create(dir: &Path) -> Result<Vg, String> {
            if !floe_tests::is_root() || !floe_tests::have("vgcfgrestore") {
                return Err("needs root and lvm2 (pvcreate, vgcreate, vgcfgrestore)".into());
            }
            let sysdir = tempfile::tempdir().unwrap();
            std::fs::write(
                sysdir.path().join("lvm.conf"),
                "backup {\n backup = 0\n archive = 0\n}\ndevices {\n obtain_device_list_from_udev = 0\n}\nglobal {\n activation = 0\n}\n",
            )
            .unwrap();
            let mut vg = Vg {
                name: {
                    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                    let k = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    format!("floe{}x{k}", std::process::id())
                },
                sysdir,
                images: Vec::new(),
                devs: Vec::new(),
                ro: Vec::new(),
            };
            for i in 0..2 {
                let img = dir.join(format!("pv{i}.img"));
                std::fs::File::create(&img)
                    .unwrap()
                    .set_len(64 << 20)
                    .unwrap();
                vg.devs.push(floe_tests::hostfs::attach(&img, false)?);
                vg.images.push(img);
            }
            // LVM sees only these devices, not the mover's read-only views
            // of the same images (which it would take for duplicate PVs).
            let accept: Vec<String> = vg.devs.iter().map(|d| format!("\"a|^{d}$|\"")).collect();
            std::fs::write(
                vg.sysdir.path().join("lvm.conf"),
                format!(
                    "backup {{\n backup = 0\n archive = 0\n}}\ndevices {{\n obtain_device_list_from_udev = 0\n filter = [ {}, \"r|.*|\" ]\n}}\nglobal {{\n activation = 0\n}}\n",
                    accept.join(", ")
                ),
            )
            .unwrap();
            let mut a = vec!["pvcreate", "-q"];
            a.extend(vg.devs.iter().map(String::as_str));
            vg.lvm(&a);
            let mut a = vec!["vgcreate", "-q", vg.name.as_str()];
            let devs = vg.devs.clone();
            a.extend(devs.iter().map(String::as_str));
            vg.lvm(&a);
            Ok(vg)
        }

        fn set_lvs(&self, lvs: &str) {
            set_lvs(self.sysdir.path(), &self.name, lvs);
        }

        /// Attach the mover's read-only views of the PVs; its
        /// `--device`/`--allow-device` arguments for them.
        fn mover_devices(&mut self) -> Vec<String> {
            for img in self.images.clone() {
                self.ro
                    .push(floe_tests::hostfs::attach(&img, true).unwrap());
            }
            let mut devices = Vec::new();
            for (uuid, ro) in self.pv_uuids().iter().zip(&self.ro) {
                devices.extend([
                    "--device".to_string(),
                    format!("lvm-pv:{uuid}={ro}"),
                    "--allow-device".to_string(),
                    format!("lvm-pv:{uuid}"),
                ]);
            }
            devices
        }

        /// An agent serving this VG's LVs, with LVM's files in our scratch.
        fn agent(&self) -> AgentProcess {
            let sys = self.sysdir.path().to_str().unwrap().to_string();
            AgentProcess::start(
                &["--allow-source", &format!("lvm:{}/*", self.name)],
                &[("LVM_SYSTEM_DIR", &sys), ("LVM_SUPPRESS_FD_WARNINGS", "1")],
            )
        }

        fn pv_uuids(&self) -> Vec<String> {
            self.devs
                .iter()
                .map(|d| {
                    self.lvm(&["pvs", "--noheadings", "-o", "pv_uuid", d])
                        .trim()
                        .to_string()
                })
                .collect()
        }
    }

    /// An item's record and bytes, read back from disk media.
    fn read_item(media: &Path, set: &SetId, item: &str) -> (ItemRecord, Vec<u8>) {
        let mut r = floe_tests::Lab::disk_reader(media);
        let rec = r.open_item(set, &ItemId::new(item)).unwrap();
        let mut bytes = Vec::new();
        loop {
            let c = r.read(1 << 20).unwrap();
            if c.is_empty() {
                return (rec, bytes);
            }
            bytes.extend(c);
        }
    }

    /// Run an lvm2 command with LVM's files in `sysdir`.
    fn lvm_in(sysdir: &Path, args: &[&str]) -> String {
        let out = Command::new(args[0])
            .args(&args[1..])
            .env("LVM_SYSTEM_DIR", sysdir)
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Give VG `name` these LVs (the text of `logical_volumes`) through
    /// vgcfgbackup/vgcfgrestore, which also raises its seqno.
    fn set_lvs(sysdir: &Path, name: &str, lvs: &str) {
        let f = sysdir.join("vg.txt");
        let f = f.to_str().unwrap();
        lvm_in(sysdir, &["vgcfgbackup", "-f", f, name]);
        let text = std::fs::read_to_string(f).unwrap();
        let text = match text.find("\tlogical_volumes {") {
            // The section runs to the VG's closing brace: replace it.
            Some(i) => format!("{}{}\n}}\n", &text[..i], lvs),
            None => {
                let end = text.rfind("\n}").unwrap();
                format!("{}\n{}\n}}\n", &text[..end], lvs)
            }
        };
        std::fs::write(f, text).unwrap();
        lvm_in(sysdir, &["vgcfgrestore", "--force", "-f", f, name]);
    }

    /// A segment: start extent, extent count, stripe size (sectors), and
    /// (PV index, first PV extent) per stripe.
    type Seg<'a> = (u64, u64, u64, &'a [(usize, u64)]);

    fn lv(name: &str, segs: &[Seg<'_>]) -> String {
        let mut s = format!(
            "\t\t{name} {{\n\t\t\tid = \"{}\"\n\t\t\tstatus = [\"READ\", \"WRITE\", \"VISIBLE\"]\n\t\t\tflags = []\n\t\t\tsegment_count = {}\n",
            format!("abcdef-ghij-klmn-opqr-stuv-wxyz-{name:0>6}").chars().take(38).collect::<String>(),
            segs.len()
        );
        for (k, (start, count, stripe_size, stripes)) in segs.iter().enumerate() {
            let st: Vec<String> = stripes
                .iter()
                .map(|(pv, e)| format!("\"pv{pv}\", {e}"))
                .collect();
            s += &format!(
                "\t\t\tsegment{} {{\n\t\t\t\tstart_extent = {start}\n\t\t\t\textent_count = {count}\n\t\t\t\ttype = \"striped\"\n\t\t\t\tstripe_count = {}\n{}\t\t\t\tstripes = [{}]\n\t\t\t}}\n",
                k + 1,
                stripes.len(),
                if stripes.len() > 1 { format!("\t\t\t\tstripe_size = {stripe_size}\n") } else { String::new() },
                st.join(", ")
            );
        }
        s + "\t\t}\n"
    }

    /// The LV's bytes as LVM itself lays them out (`lvs --segments`),
    /// read from the PV images.
    fn expected(vg: &Vg, lv_name: &str) -> Vec<u8> {
        let out = vg.lvm(&[
            "lvs",
            "--noheadings",
            "--segments",
            "--units",
            "s",
            "--nosuffix",
            "--separator",
            "|",
            "-o",
            "seg_start_pe,seg_size_pe,stripes,stripesize,seg_pe_ranges",
            &format!("{}/{lv_name}", vg.name),
        ]);
        let ext = 4u64 << 20;
        let pe_start = 1u64 << 20;
        let mut bytes = Vec::new();
        for line in out.lines().filter(|l| !l.trim().is_empty()) {
            let f: Vec<&str> = line.trim().split('|').collect();
            let count: u64 = f[1].parse().unwrap();
            let stripes: u64 = f[2].parse().unwrap();
            let chunk: u64 = f[3].trim().parse::<u64>().unwrap_or(0) * 512;
            let ranges: Vec<(usize, u64)> = f[4]
                .split_whitespace()
                .map(|r| {
                    let (dev, span) = r.rsplit_once(':').unwrap();
                    let i = vg.devs.iter().position(|d| d == dev).unwrap();
                    (i, span.split('-').next().unwrap().parse().unwrap())
                })
                .collect();
            let read = |pv: usize, off: u64, len: u64| {
                use std::os::unix::fs::FileExt;
                let mut b = vec![0u8; len as usize];
                std::fs::File::open(&vg.images[pv])
                    .unwrap()
                    .read_exact_at(&mut b, off)
                    .unwrap();
                b
            };
            if stripes == 1 {
                let (pv, first) = ranges[0];
                bytes.extend(read(pv, pe_start + first * ext, count * ext));
            } else {
                let total = count * ext;
                let mut off = 0;
                while off < total {
                    let row = off / (chunk * stripes);
                    let col = ((off / chunk) % stripes) as usize;
                    let (pv, first) = ranges[col];
                    bytes.extend(read(pv, pe_start + first * ext + row * chunk, chunk));
                    off += chunk;
                }
            }
        }
        bytes
    }

    fn fill(vg: &Vg, seed: u64) {
        use std::os::unix::fs::FileExt;
        let mut rng = floe_tests::hostfs::Rng::new(seed);
        for img in &vg.images {
            let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
            f.write_all_at(&rng.bytes(60 << 20), 1 << 20).unwrap();
        }
    }

    /// A linear LV across both PVs and a striped one, laid out by the real
    /// LVM tools, backed up off-host from the PVs and restored: bytes
    /// equal LVM's own view of them.
    #[test]
    fn linear_and_striped_lvs_map_to_their_pv_extents() {
        let name = "linear_and_striped_lvs_map_to_their_pv_extents";
        let dir = tempfile::tempdir().unwrap();
        let mut vg = match Vg::create(dir.path()) {
            Ok(v) => v,
            Err(why) => return skip(name, &why),
        };
        let lvs = format!(
            "\tlogical_volumes {{\n{}{}\t}}",
            lv("lin", &[(0, 3, 0, &[(0, 2)]), (3, 2, 0, &[(1, 0)])]),
            lv("str", &[(0, 4, 128, &[(0, 6), (1, 6)])])
        );
        vg.set_lvs(&lvs);
        fill(&vg, 1);
        let devices = vg.mover_devices();
        let agent = vg.agent();
        let media = dir.path().join("media");
        let sources = [
            format!("lvm:{}/lin", vg.name),
            format!("lvm:{}/str", vg.name),
        ];
        let (code, out, err) = floe_backup(&agent.addr, &sources, &media, &devices);
        assert_eq!(code, 0, "{out}\n{err}");
        for lv_name in ["lin", "str"] {
            let target = dir.path().join(format!("{lv_name}.img"));
            let r = floe_cmd()
                .args(["restore", "--media"])
                .arg(format!("disk:{}", media.display()))
                .args(["--set", &set_of(&out), "--to"])
                .arg(format!("{}/{lv_name}={}", vg.name, target.display()))
                .output()
                .unwrap();
            assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
            let got = std::fs::read(&target).unwrap();
            let want = expected(&vg, lv_name);
            assert_eq!(got.len(), want.len(), "{lv_name}");
            assert!(
                got == want,
                "{lv_name}: restored bytes differ from LVM's layout"
            );
        }
        // A PV named in the map that is the wrong device is refused.
        let swapped: Vec<String> = devices
            .iter()
            .map(|a| {
                a.replace(&format!("={}", vg.ro[0]), "=TMP")
                    .replace(&format!("={}", vg.ro[1]), &format!("={}", vg.ro[0]))
                    .replace("=TMP", &format!("={}", vg.ro[1]))
            })
            .collect();
        let (code, _, err) =
            floe_backup(&agent.addr, &sources[..1], &dir.path().join("m2"), &swapped);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains("not the LVM physical volume the map names"),
            "{err}"
        );
    }

    /// The VG's metadata changes while the mover reads (here a tag added
    /// with `vgchange`: moving extents needs device-mapper, which these
    /// machines lack): its seqno goes up, the mover's check after the read
    /// sees it, remaps and reads again; the bytes are the LV's.
    #[test]
    fn a_vg_change_mid_backup_is_caught_by_the_seqno_and_remapped() {
        let name = "a_vg_change_mid_backup_is_caught_by_the_seqno_and_remapped";
        let dir = tempfile::tempdir().unwrap();
        let mut vg = match Vg::create(dir.path()) {
            Ok(v) => v,
            Err(why) => return skip(name, &why),
        };
        vg.set_lvs(&format!(
            "\tlogical_volumes {{\n{}\t}}",
            lv("data", &[(0, 2, 0, &[(0, 1)]), (2, 2, 0, &[(1, 3)])])
        ));
        fill(&vg, 2);
        let want = expected(&vg, "data");
        let devices = vg.mover_devices();
        let agent = vg.agent();
        let (sysdir, vg_name) = (vg.sysdir.path().to_path_buf(), vg.name.clone());
        let hook = move || {
            lvm_in(&sysdir, &["vgchange", "--addtag", "floe-test", &vg_name]);
        };
        let media = dir.path().join("media");
        let source = format!("lvm:{}/data", vg.name);
        let report = backup_meddled_devices(&devices, &agent, &[source], &media, Box::new(hook))
            .expect("backup across a VG change");
        assert!(
            report.remaps > 0 && report.rereads > 0,
            "remaps {} rereads {}",
            report.remaps,
            report.rereads
        );
        let (rec, bytes) = read_item(&media, &report.set.header.set, &format!("{}/data", vg.name));
        assert_eq!(rec.trailer.length.0 as usize, want.len());
        assert!(bytes == want, "the backup is not the LV's data");
    }

    /// `lvm:VG/LV?snapshot`: a classic LVM snapshot is the frozen image
    /// while the application keeps writing to the origin (every write
    /// copies a chunk into the snapshot's exception store, which the
    /// mover's check sees). Needs device-mapper to make and activate LVs.
    #[test]
    fn an_lvm_snapshot_is_the_frozen_image_while_the_origin_is_written() {
        let name = "an_lvm_snapshot_is_the_frozen_image_while_the_origin_is_written";
        let dm = std::fs::read_to_string("/proc/misc")
            .unwrap_or_default()
            .contains("device-mapper");
        if !dm {
            return skip(
                name,
                "needs device-mapper (the kernel has no device-mapper driver: /proc/misc lists none): LVs cannot be activated and no LVM snapshot can be made on this machine",
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let mut vg = match Vg::create(dir.path()) {
            Ok(v) => v,
            Err(why) => return skip(name, &why),
        };
        // With device-mapper, the real tools make and activate the LV.
        std::fs::write(
            vg.sysdir.path().join("lvm.conf"),
            std::fs::read_to_string(vg.sysdir.path().join("lvm.conf"))
                .unwrap()
                .replace("activation = 0", "activation = 1"),
        )
        .unwrap();
        vg.lvm(&["lvcreate", "-q", "-L", "16M", "-n", "data", &vg.name]);
        let lv_dev = format!("/dev/{}/data", vg.name);
        let mut rng = floe_tests::hostfs::Rng::new(3);
        let frozen = rng.bytes(16 << 20);
        std::fs::write(&lv_dev, &frozen).unwrap();
        let devices = vg.mover_devices();
        let agent = vg.agent();
        let dev = lv_dev.clone();
        let hook = move || {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
            f.write_all_at(&vec![0x5Au8; 8 << 20], 4 << 20).unwrap();
            f.sync_all().unwrap();
        };
        let media = dir.path().join("media");
        let source = format!("lvm:{}/data?snapshot", vg.name);
        let report = backup_meddled_devices(&devices, &agent, &[source], &media, Box::new(hook))
            .expect("backup of a snapshot");
        let (_, bytes) = read_item(&media, &report.set.header.set, &format!("{}/data", vg.name));
        assert!(
            bytes == frozen,
            "the backup is not the snapshot's frozen image"
        );
        let _ = Command::new("vgremove")
            .args(["-f", &vg.name])
            .env("LVM_SYSTEM_DIR", vg.sysdir.path())
            .status();
    }
}

/// A disk without a WWN, serial or backing file is named by its file
/// system's UUID; the mover checks that UUID in the superblock before it
/// reads, and refuses another file system.
#[test]
fn a_device_named_by_its_file_system_uuid_is_checked_in_its_superblock() {
    use floe_core::device::{DeviceResolver, Location};
    let name = "a_device_named_by_its_file_system_uuid_is_checked_in_its_superblock";
    if !floe_tests::have("mkfs.ext4") || !floe_tests::have("blkid") {
        return skip(name, "needs mkfs.ext4 and blkid");
    }
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("fs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    assert!(std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&img)
        .status()
        .unwrap()
        .success());
    let uuid = String::from_utf8(
        std::process::Command::new("blkid")
            .args(["-p", "-s", "UUID", "-o", "value"])
            .arg(&img)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    let resolve = |id: &str| {
        let table = [(DeviceId::new(id), Location::Path(img.clone()))]
            .into_iter()
            .collect();
        DeviceResolver::new(table, None)
            .resolve(&DeviceId::new(id))
            .map(|_| ())
    };
    resolve(&format!("fs-uuid:{uuid}")).expect("the right file system");
    let e = resolve("fs-uuid:00000000-1111-2222-3333-444444444444").unwrap_err();
    assert!(
        e.to_string().contains(&format!(
            "is file system {uuid}, not the file system the map names"
        )),
        "{e}"
    );
}

/// A file system as a volume image: held frozen while the mover reads it,
/// only its allocated blocks read (free space is a hole), restored to an
/// image file that `fsck` passes and that mounts to the same tree.
#[test]
fn a_frozen_file_system_backs_up_as_a_volume_of_its_allocated_blocks() {
    use std::process::Command;
    let name = "a_frozen_file_system_backs_up_as_a_volume_of_its_allocated_blocks";
    for fstype in ["ext4", "xfs"] {
        let mut src = match LoopFs::new(fstype, 1, 512, &[], "") {
            Ok(f) => f,
            Err(why) => return skip(name, &why),
        };
        let facts = make_tree(&src.mnt, 300, 13);
        src.sync();
        src.mover_view().unwrap();
        let allow = format!("fsflush:{}*", src.mnt.display());
        let agent = AgentProcess::start(
            &[
                "--allow-source",
                &allow,
                "--plugin-opt",
                "fsflush.freeze_timeout=300",
            ],
            &[],
        );
        let media = src.dir.path().join("media");
        let source = format!("fsflush:{}?volume=allocated", src.mnt.display());
        let (code, out, err) = floe_backup(
            &agent.addr,
            std::slice::from_ref(&source),
            &media,
            &src.device_args(),
        );
        assert_eq!(code, 0, "{fstype}: backup failed:\n{out}\n{err}");
        let set = set_of(&out);

        // The set holds one volume item, of which only the allocated part
        // was read.
        let img = src.dir.path().join("restored.img");
        let item = src.mnt.display().to_string();
        let r = floe_cmd()
            .args(["restore", "--media"])
            .arg(format!("disk:{}", media.display()))
            .args(["--set", &set, "--to"])
            .arg(format!("{item}={}", img.display()))
            .output()
            .unwrap();
        assert!(
            r.status.success(),
            "{fstype}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        let size = std::fs::metadata(&img).unwrap().len();
        assert_eq!(size, 512 << 20, "{fstype}: the whole device");
        let manifest = std::fs::read_to_string(media.join(&set).join("set.json")).unwrap();
        let rec: serde_json::Value = serde_json::from_str(&manifest).unwrap();
        let allocated: u64 = rec["record"]["items"][0]["header"]["meta"]["allocated_bytes"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("allocated_bytes");
        assert!(
            allocated < size / 2 && allocated > facts.bytes / 2,
            "{fstype}: {allocated} bytes allocated of {size} ({} bytes of files)",
            facts.bytes
        );

        // The image mounts to the same tree, and fsck passes (XFS after
        // that first mount replayed the log a frozen XFS leaves).
        let at = src.dir.path().join("restored-mnt");
        std::fs::create_dir_all(&at).unwrap();
        let opts = if fstype == "xfs" {
            "loop,nouuid"
        } else {
            "loop,ro"
        };
        let m = Command::new("mount")
            .args(["-o", opts])
            .arg(&img)
            .arg(&at)
            .output()
            .unwrap();
        assert!(m.status.success(), "{}", String::from_utf8_lossy(&m.stderr));
        let diffs = compare_trees(&src.mnt, &at);
        let _ = Command::new("umount").arg(&at).status();
        assert!(
            diffs.is_empty(),
            "{fstype}: {:#?}",
            &diffs[..diffs.len().min(20)]
        );
        let fsck = if fstype == "ext4" {
            Command::new("e2fsck")
                .args(["-fn"])
                .arg(&img)
                .output()
                .unwrap()
        } else {
            Command::new("xfs_repair")
                .args(["-n", "-f"])
                .arg(&img)
                .output()
                .unwrap()
        };
        assert!(
            fsck.status.success(),
            "{fstype}: fsck of the restored image: {}{}",
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );

        // On tar media the volume is a sparse entry: the archive holds its
        // allocated blocks, and GNU tar extracts a sparse image equal to
        // what `floe restore` makes of it.
        let tar_media = src.dir.path().join("tar-media");
        let (code, out, err) = floe_backup_to(
            &agent.addr,
            std::slice::from_ref(&source),
            &format!("tar:{}", tar_media.display()),
            &src.device_args(),
        );
        assert_eq!(code, 0, "{fstype}: tar backup failed:\n{out}\n{err}");
        let tset = set_of(&out);
        let archive = tar_media.join(format!("{tset}.tar"));
        let archive_len = std::fs::metadata(&archive).unwrap().len();
        assert!(
            archive_len < allocated + (16 << 20),
            "{fstype}: archive of {archive_len} bytes for {allocated} allocated"
        );
        let by_floe = src.dir.path().join("from-tar.img");
        let r = floe_cmd()
            .args(["restore", "--media"])
            .arg(format!("tar:{}", tar_media.display()))
            .args(["--set", &tset, "--to"])
            .arg(format!("{item}={}", by_floe.display()))
            .output()
            .unwrap();
        assert!(
            r.status.success(),
            "{fstype}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        let x = src.dir.path().join("gnu-tar-x");
        std::fs::create_dir_all(&x).unwrap();
        let t = Command::new("tar")
            .args(["-x", "-S", "-f"])
            .arg(&archive)
            .arg("-C")
            .arg(&x)
            .output()
            .unwrap();
        assert!(
            t.status.success() && t.stderr.is_empty(),
            "{fstype}: {}",
            String::from_utf8_lossy(&t.stderr)
        );
        let by_tar = walk_files(&x)
            .into_iter()
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.len() == size))
            .unwrap_or_else(|| panic!("{fstype}: GNU tar extracted no {size}-byte image"));
        let cmp = Command::new("cmp")
            .arg(&by_floe)
            .arg(&by_tar)
            .output()
            .unwrap();
        assert!(
            cmp.status.success(),
            "{fstype}: GNU tar's image differs from floe's: {}",
            String::from_utf8_lossy(&cmp.stdout)
        );
        let on_disk =
            std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&by_tar).unwrap()) * 512;
        assert!(
            on_disk < size / 2,
            "{fstype}: GNU tar's image is not sparse ({on_disk} bytes)"
        );

        // Thawed after the backup: writes go through.
        std::fs::write(src.mnt.join("after.txt"), b"written after the backup").unwrap();
    }
}

/// Every regular file under `dir`.
fn walk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                todo.push(e.path());
            } else if ft.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

/// A volume's config id holds only while its file system stays frozen:
/// once thawed, every check sees a new id (and leaves it thawed).
#[test]
fn a_volume_config_id_changes_once_the_file_system_thaws() {
    use floe_hostfs::volume::volume_config;
    use std::process::Command;
    let name = "a_volume_config_id_changes_once_the_file_system_thaws";
    let fs = match LoopFs::new("ext4", 1, 64, &[], "") {
        Ok(f) => f,
        Err(why) => return skip(name, &why),
    };
    assert!(Command::new("fsfreeze")
        .arg("-f")
        .arg(&fs.mnt)
        .status()
        .unwrap()
        .success());
    let frozen = volume_config(&fs.mnt);
    assert_eq!(frozen, volume_config(&fs.mnt));
    assert!(Command::new("fsfreeze")
        .arg("-u")
        .arg(&fs.mnt)
        .status()
        .unwrap()
        .success());
    let a = volume_config(&fs.mnt);
    let b = volume_config(&fs.mnt);
    assert!(a != frozen && b != frozen && a != b, "{frozen} {a} {b}");
    // The probe left it thawed: writes go through.
    std::fs::write(fs.mnt.join("w"), b"ok").unwrap();
}
