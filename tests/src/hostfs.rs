//! Real file systems for the host-side tests: images on loop devices,
//! made with the real mkfs tools and mounted; a realistic tree; an exact
//! comparison of two trees (kind, bytes, mode, owner, times, links,
//! xattrs and ACLs, device numbers, sparseness); an agent process.
//!
//! Everything is undone on drop: mounts first, then only the loop devices
//! this harness attached.

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Attach a loop device (read-only if asked); its path.
pub fn attach(img: &Path, read_only: bool) -> Result<String, String> {
    let mut c = Command::new("losetup");
    c.args(["-f", "--show"]);
    if read_only {
        c.arg("-r");
    }
    run(c.arg(img))
}

/// A file system on loop devices over image files, mounted.
pub struct LoopFs {
    /// The image files (one per device).
    pub images: Vec<PathBuf>,
    /// The read-write loop devices the file system is on.
    pub devs: Vec<String>,
    /// Read-only loop devices over the same images: the mover's view.
    pub ro: Vec<String>,
    /// Where it is mounted.
    pub mnt: PathBuf,
    /// `ext4`, `xfs`, `btrfs`.
    pub fstype: String,
    mounted: bool,
    /// Scratch space (images, mount point).
    pub dir: tempfile::TempDir,
}

/// What a test needs to make file systems here, or why it cannot.
pub fn fs_prerequisites(fstype: &str) -> Result<(), String> {
    if !crate::is_root() {
        return Err("needs root (loop devices, mount)".into());
    }
    let mkfs = format!("mkfs.{fstype}");
    for tool in ["losetup", "mount", "umount", mkfs.as_str()] {
        if !crate::have(tool) {
            return Err(format!("needs {tool}"));
        }
    }
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !fs
        .lines()
        .any(|l| l.split_whitespace().last() == Some(fstype))
    {
        // The module may load on first mount; try that instead of refusing.
        let _ = Command::new("modprobe").arg(fstype).status();
    }
    Ok(())
}

impl LoopFs {
    /// Make `fstype` over `n` images of `mib` MiB each and mount it.
    pub fn new(
        fstype: &str,
        n: usize,
        mib: u64,
        mkfs: &[&str],
        opts: &str,
    ) -> Result<LoopFs, String> {
        fs_prerequisites(fstype)?;
        let dir = tempfile::Builder::new()
            .prefix("floe-fs-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let mut fs = LoopFs {
            images: Vec::new(),
            devs: Vec::new(),
            ro: Vec::new(),
            mnt: dir.path().join("mnt"),
            fstype: fstype.into(),
            mounted: false,
            dir,
        };
        std::fs::create_dir(&fs.mnt).map_err(|e| e.to_string())?;
        for i in 0..n {
            let img = fs.dir.path().join(format!("disk{i}.img"));
            let f = std::fs::File::create(&img).map_err(|e| e.to_string())?;
            f.set_len(mib << 20).map_err(|e| e.to_string())?;
            fs.devs.push(attach(&img, false)?);
            fs.images.push(img);
        }
        let mut c = Command::new(format!("mkfs.{fstype}"));
        match fstype {
            "ext4" => c.args(["-q", "-F"]),
            "xfs" => c.args(["-q", "-f"]),
            "btrfs" => c.args(["-q", "-f"]),
            _ => &mut c,
        };
        run(c.args(mkfs).args(&fs.devs))?;
        let mut o: Vec<String> = opts
            .split(',')
            .filter(|x| !x.is_empty())
            .map(String::from)
            .collect();
        if fstype == "btrfs" {
            // No udev here to scan devices: name them all.
            o.extend(fs.devs[1..].iter().map(|d| format!("device={d}")));
        }
        let mut m = Command::new("mount");
        if !o.is_empty() {
            m.args(["-o", &o.join(",")]);
        }
        run(m.arg(&fs.devs[0]).arg(&fs.mnt))?;
        fs.mounted = true;
        Ok(fs)
    }

    /// One disk image with an MBR partition table whose only partition
    /// starts at sector 2048 (1 MiB), the file system made in it; the
    /// kernel's partition device comes from `losetup -P`, or, where the
    /// kernel reads no MBR, from `addpart` (BLKPG, as `partx -a`).
    pub fn new_partitioned(fstype: &str, mib: u64) -> Result<LoopFs, String> {
        fs_prerequisites(fstype)?;
        let sectors = u32::try_from((mib << 20) / 512 - 2048).map_err(|e| e.to_string())?;
        let dir = tempfile::Builder::new()
            .prefix("floe-fs-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let img = dir.path().join("disk0.img");
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::create(&img).map_err(|e| e.to_string())?;
            f.set_len(mib << 20).map_err(|e| e.to_string())?;
            let mut mbr = [0u8; 512];
            mbr[446 + 4] = 0x83;
            mbr[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
            mbr[446 + 12..446 + 16].copy_from_slice(&sectors.to_le_bytes());
            mbr[510] = 0x55;
            mbr[511] = 0xAA;
            f.write_all_at(&mbr, 0).map_err(|e| e.to_string())?;
        }
        let dev = run(Command::new("losetup")
            .args(["-f", "--show", "-P"])
            .arg(&img))?;
        let mut fs = LoopFs {
            images: vec![img],
            devs: vec![dev.clone()],
            ro: Vec::new(),
            mnt: dir.path().join("mnt"),
            fstype: fstype.into(),
            mounted: false,
            dir,
        };
        let part = format!("{dev}p1");
        let is_block = |p: &str| {
            use std::os::unix::fs::FileTypeExt;
            std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
        };
        for _ in 0..50 {
            if is_block(&part) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        if !is_block(&part) {
            // A kernel built without MBR support (CONFIG_MSDOS_PARTITION
            // off, as on the development VMs) reads no table: the
            // partition is added from userspace as `partx -a` does, with
            // BLKPG_ADD_PARTITION — the same block device, sysfs `start`
            // and whole-disk arithmetic as a partition the kernel found.
            if !crate::have("addpart") {
                return Err(format!(
                    "the kernel made no partition device {part} from the image's MBR (no MBR support: CONFIG_MSDOS_PARTITION is off) and addpart (util-linux) is missing"
                ));
            }
            // `fs` detaches the loop device when dropped, which removes
            // the partition.
            run(Command::new("addpart")
                .arg(&dev)
                .arg("1")
                .arg("2048")
                .arg(sectors.to_string()))?;
            for _ in 0..50 {
                if is_block(&part) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            if !is_block(&part) {
                return Err(format!(
                    "no partition device {part}: the kernel read no MBR and `addpart {dev} 1 2048 {sectors}` made none"
                ));
            }
        }
        std::fs::create_dir(&fs.mnt).map_err(|e| e.to_string())?;
        let mut c = Command::new(format!("mkfs.{fstype}"));
        if fstype == "ext4" {
            c.args(["-q", "-F"]);
        } else {
            c.args(["-q", "-f"]);
        }
        run(c.arg(&part))?;
        run(Command::new("mount").arg(&part).arg(&fs.mnt))?;
        fs.mounted = true;
        Ok(fs)
    }

    /// Attach the mover's read-only views of every device.
    pub fn mover_view(&mut self) -> Result<(), String> {
        for img in &self.images.clone() {
            self.ro.push(attach(img, true)?);
        }
        Ok(())
    }

    /// `--device ID=PATH` arguments for the mover (loop identities).
    pub fn device_args(&self) -> Vec<String> {
        self.images
            .iter()
            .zip(&self.ro)
            .flat_map(|(img, ro)| {
                [
                    "--device".to_string(),
                    format!("file:{}={ro}", img.display()),
                ]
            })
            .chain(self.images.iter().flat_map(|img| {
                [
                    "--allow-device".to_string(),
                    format!("file:{}", img.display()),
                ]
            }))
            .collect()
    }

    /// The mover's arguments for a btrfs file system: each read-only view
    /// named by its btrfs device UUID (which the mover checks in the
    /// superblock).
    pub fn btrfs_device_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (dev, ro) in self.devs.iter().zip(&self.ro) {
            let uuid =
                run(Command::new("blkid").args(["-p", "-s", "UUID_SUB", "-o", "value", dev]))
                    .expect("blkid UUID_SUB");
            out.extend([
                "--device".to_string(),
                format!("btrfs-dev:{uuid}={ro}"),
                "--allow-device".to_string(),
                format!("btrfs-dev:{uuid}"),
            ]);
        }
        out
    }

    /// Sync and drop caches of this file system's data (a cold start).
    pub fn sync(&self) {
        let _ = Command::new("sync").arg("-f").arg(&self.mnt).status();
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted {
            // Never leave a file system frozen, whatever a test did.
            let _ = Command::new("fsfreeze")
                .arg("-u")
                .arg(&self.mnt)
                .stderr(Stdio::null())
                .status();
            for _ in 0..20 {
                if Command::new("umount")
                    .arg(&self.mnt)
                    .status()
                    .is_ok_and(|s| s.success())
                {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
        for d in self.ro.iter().chain(&self.devs) {
            let _ = Command::new("losetup").args(["-d", d]).status();
        }
    }
}

/// A small deterministic generator.
pub struct Rng(u64);

impl Rng {
    /// Seeded.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

fn set_times(p: &Path, sec: i64, nsec: u32) {
    let t = rustix::fs::Timespec {
        tv_sec: sec,
        tv_nsec: nsec.into(),
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .expect("utimensat");
}

/// What a realistic tree holds, for assertions.
#[derive(Debug, Default)]
pub struct TreeFacts {
    /// Regular files.
    pub files: usize,
    /// Bytes in them.
    pub bytes: u64,
}

/// Build a realistic tree under `root`: `files` files in nested
/// directories (tiny, small and large), fragmented files, sparse files,
/// hard links, symlinks (relative, absolute, dangling), xattrs and an ACL,
/// a FIFO, a device node, odd modes, owners and nanosecond times.
pub fn make_tree(root: &Path, files: usize, seed: u64) -> TreeFacts {
    let mut rng = Rng::new(seed);
    let mut facts = TreeFacts::default();
    let write = |p: &Path, data: &[u8], facts: &mut TreeFacts| {
        std::fs::write(p, data).expect("write");
        facts.files += 1;
        facts.bytes += data.len() as u64;
    };
    for i in 0..files {
        let d = root.join(format!("src/mod{:02}/sub{}", i % 37, i % 5));
        std::fs::create_dir_all(&d).expect("mkdir");
        let size = match rng.next_u64() % 100 {
            0..=29 => (rng.next_u64() % 120) as usize, // tiny (inline on ext4 with inline_data)
            30..=84 => 200 + (rng.next_u64() % 16_000) as usize, // source-file sized
            85..=97 => 20_000 + (rng.next_u64() % 200_000) as usize,
            _ => 1_000_000 + (rng.next_u64() % 3_000_000) as usize,
        };
        let data = rng.bytes(size);
        write(&d.join(format!("file{i}.rs")), &data, &mut facts);
    }
    // Fragmented: two files grown alternately, synced each step.
    let frag = root.join("frag");
    std::fs::create_dir_all(&frag).unwrap();
    {
        use std::io::Write;
        let mut a = std::fs::File::create(frag.join("a.bin")).unwrap();
        let mut b = std::fs::File::create(frag.join("b.bin")).unwrap();
        for _ in 0..64 {
            a.write_all(&rng.bytes(8192)).unwrap();
            a.sync_all().unwrap();
            b.write_all(&rng.bytes(8192)).unwrap();
            b.sync_all().unwrap();
        }
        facts.files += 2;
        facts.bytes += 2 * 64 * 8192;
    }
    // Sparse: data islands in a large hole, and a file that is all hole.
    let sp = root.join("sparse");
    std::fs::create_dir_all(&sp).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(sp.join("islands.img")).unwrap();
        f.set_len(64 << 20).unwrap();
        for k in 0..5u64 {
            f.write_all_at(&rng.bytes(10_000), k * (12 << 20) + 4096 * k)
                .unwrap();
        }
        let g = std::fs::File::create(sp.join("empty-but-big.img")).unwrap();
        g.set_len(8 << 20).unwrap();
        facts.files += 2;
    }
    // Links.
    let l = root.join("links");
    std::fs::create_dir_all(&l).unwrap();
    write(&l.join("target.txt"), b"the target\n", &mut facts);
    std::fs::hard_link(l.join("target.txt"), l.join("hard1")).unwrap();
    std::fs::create_dir_all(root.join("links/deeper")).unwrap();
    std::fs::hard_link(l.join("target.txt"), l.join("deeper/hard2")).unwrap();
    std::os::unix::fs::symlink("target.txt", l.join("rel-link")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", l.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("no/such/file", l.join("dangling")).unwrap();
    // Special files, modes, owners, attributes.
    let s = root.join("special");
    std::fs::create_dir_all(s.join("empty-dir")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        s.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o640),
        0,
    )
    .unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        s.join("null-dev"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    write(&s.join("setuid"), b"#!/bin/sh\n", &mut facts);
    std::fs::set_permissions(
        s.join("setuid"),
        std::os::unix::fs::PermissionsExt::from_mode(0o4755),
    )
    .unwrap();
    std::fs::create_dir_all(s.join("sticky")).unwrap();
    std::fs::set_permissions(
        s.join("sticky"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
    write(&s.join("owned"), b"owned by someone else", &mut facts);
    rustix::fs::chownat(
        rustix::fs::CWD,
        s.join("owned"),
        Some(rustix::fs::Uid::from_raw(1234)),
        Some(rustix::fs::Gid::from_raw(5678)),
        rustix::fs::AtFlags::empty(),
    )
    .unwrap();
    write(&s.join("xattrs"), b"with attributes", &mut facts);
    rustix::fs::lsetxattr(
        s.join("xattrs"),
        "user.floe.test",
        b"value \x00 with a nul",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    if crate::have("setfacl") {
        let _ = Command::new("setfacl")
            .args(["-m", "u:1234:rw,g:5678:r"])
            .arg(s.join("xattrs"))
            .status();
        let _ = Command::new("setfacl")
            .args(["-d", "-m", "u:1234:rwx"])
            .arg(s.join("sticky"))
            .status();
    }
    write(&s.join("empty"), b"", &mut facts);
    // Nanosecond times everywhere (directories last).
    let mut all = Vec::new();
    collect(root, &mut all);
    for (k, p) in all.iter().rev().enumerate() {
        set_times(
            p,
            1_600_000_000 + k as i64 * 7,
            (k as u32 * 7919) % 1_000_000_000,
        );
    }
    facts
}

fn collect(p: &Path, out: &mut Vec<PathBuf>) {
    out.push(p.to_path_buf());
    if std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()) {
        let mut names: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        names.sort();
        for n in names {
            collect(&n, out);
        }
    }
}

fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut names = vec![0u8; 65536];
    let Ok(n) = rustix::fs::llistxattr(p, &mut names) else {
        return out;
    };
    for name in names[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let name = String::from_utf8_lossy(name).to_string();
        let mut v = vec![0u8; 65536];
        if let Ok(k) = rustix::fs::lgetxattr(p, name.as_str(), &mut v) {
            out.insert(name, v[..k].to_vec());
        }
    }
    out
}

/// Every difference between the tree at `a` and the one at `b`: kind,
/// mode, owner, mtime (ns), size, bytes, symlink target, device number,
/// xattrs (ACLs), hard-link structure, sparseness. Empty when equal.
/// `floe restore --to-dir` of `set` from the media `spec` (with media
/// `opts`) into `to`, which must then hold exactly `tree`.
pub fn restore_tree_and_compare(spec: &str, opts: &[String], set: &str, to: &Path, tree: &Path) {
    let r = crate::floe_cmd()
        .args(["restore", "--media", spec])
        .args(opts)
        .args(["--set", set, "--to-dir"])
        .arg(to)
        .output()
        .expect("run floe restore");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let diffs = compare_trees(tree, to);
    assert!(diffs.is_empty(), "{:#?}", &diffs[..diffs.len().min(20)]);
}

pub fn compare_trees(a: &Path, b: &Path) -> Vec<String> {
    let (mut pa, mut pb) = (Vec::new(), Vec::new());
    collect(a, &mut pa);
    collect(b, &mut pb);
    let rel = |base: &Path, p: &PathBuf| p.strip_prefix(base).unwrap().to_path_buf();
    let ra: Vec<PathBuf> = pa.iter().map(|p| rel(a, p)).collect();
    let rb: Vec<PathBuf> = pb.iter().map(|p| rel(b, p)).collect();
    let mut diffs = Vec::new();
    if ra != rb {
        let sa: std::collections::BTreeSet<_> = ra.iter().collect();
        let sb: std::collections::BTreeSet<_> = rb.iter().collect();
        for m in sa.difference(&sb).take(10) {
            diffs.push(format!("{}: missing from the restore", m.display()));
        }
        for m in sb.difference(&sa).take(10) {
            diffs.push(format!("{}: extra in the restore", m.display()));
        }
    }
    let mut links_a: HashMap<u64, PathBuf> = HashMap::new();
    let mut links_b: HashMap<u64, PathBuf> = HashMap::new();
    for r in ra.iter().filter(|r| rb.contains(r)) {
        let (x, y) = (a.join(r), b.join(r));
        let (ma, mb) = (
            std::fs::symlink_metadata(&x).unwrap(),
            std::fs::symlink_metadata(&y).unwrap(),
        );
        let name = r.display().to_string();
        let mut d = |what: &str, l: String, rr: String| {
            if l != rr {
                diffs.push(format!("{name}: {what} {l} != {rr}"));
            }
        };
        d(
            "type",
            format!("{:?}", ma.file_type()),
            format!("{:?}", mb.file_type()),
        );
        d(
            "mode",
            format!("{:o}", ma.mode()),
            format!("{:o}", mb.mode()),
        );
        d(
            "owner",
            format!("{}:{}", ma.uid(), ma.gid()),
            format!("{}:{}", mb.uid(), mb.gid()),
        );
        d(
            "mtime",
            format!("{}.{:09}", ma.mtime(), ma.mtime_nsec()),
            format!("{}.{:09}", mb.mtime(), mb.mtime_nsec()),
        );
        d(
            "xattrs",
            format!("{:?}", xattrs(&x)),
            format!("{:?}", xattrs(&y)),
        );
        let t = ma.file_type();
        if t.is_symlink() {
            d(
                "target",
                format!("{:?}", std::fs::read_link(&x).ok()),
                format!("{:?}", std::fs::read_link(&y).ok()),
            );
        }
        if t.is_char_device() || t.is_block_device() {
            d("rdev", ma.rdev().to_string(), mb.rdev().to_string());
        }
        if t.is_file() {
            d("size", ma.len().to_string(), mb.len().to_string());
            d("nlink", ma.nlink().to_string(), mb.nlink().to_string());
            if ma.nlink() > 1 {
                let fa = links_a.entry(ma.ino()).or_insert_with(|| r.clone()).clone();
                let fb = links_b.entry(mb.ino()).or_insert_with(|| r.clone()).clone();
                d(
                    "hard link group",
                    fa.display().to_string(),
                    fb.display().to_string(),
                );
            }
            let ha = blake3::hash(&std::fs::read(&x).unwrap());
            let hb = blake3::hash(&std::fs::read(&y).unwrap());
            d(
                "bytes (blake3)",
                ha.to_hex().to_string(),
                hb.to_hex().to_string(),
            );
            let sparse_a = ma.blocks() * 512 < ma.len();
            let sparse_b = mb.blocks() * 512 < mb.len();
            if sparse_a && !sparse_b {
                diffs.push(format!(
                    "{name}: sparse in the source, fully allocated in the restore"
                ));
            }
        }
    }
    diffs
}

/// An agent process of the build tree, ended (by pid) on drop.
pub struct AgentProcess {
    /// The process.
    pub child: Child,
    /// Where it listens.
    pub addr: String,
    /// Its stderr, line by line, after the listening line.
    pub stderr: std::sync::mpsc::Receiver<String>,
}

impl AgentProcess {
    /// `floe agent --listen 127.0.0.1:0` with these extra arguments and
    /// environment.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> AgentProcess {
        Self::start_under(&[], args, env)
    }

    /// [`AgentProcess::start`] run by `wrapper` (a command that runs the
    /// command line after it: `setpriv … --`); none: directly.
    pub fn start_under(wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> AgentProcess {
        let floe = crate::floe_cmd();
        let mut c = match wrapper.split_first() {
            None => crate::floe_cmd(),
            Some((first, rest)) => {
                let mut c = std::process::Command::new(first);
                c.args(rest).arg(floe.get_program());
                for (k, v) in floe.get_envs() {
                    if let Some(v) = v {
                        c.env(k, v);
                    }
                }
                c
            }
        };
        c.args(["agent", "--listen", "127.0.0.1:0", "--image-lease", "0"])
            .args(args)
            .stderr(Stdio::piped());
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c.spawn().expect("start floe agent");
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let first = lines.next().and_then(|l| l.ok()).unwrap_or_default();
        let addr = first
            .trim()
            .rsplit(' ')
            .next()
            .unwrap_or_default()
            .to_string();
        assert!(first.contains("listening"), "agent did not start: {first}");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        AgentProcess {
            child,
            addr,
            stderr: rx,
        }
    }

    /// Wait for a stderr line containing `what`.
    pub fn wait_for(&self, what: &str, timeout: std::time::Duration) -> Option<String> {
        let end = std::time::Instant::now() + timeout;
        while let Some(left) = end.checked_duration_since(std::time::Instant::now()) {
            match self.stderr.recv_timeout(left) {
                Ok(l) if l.contains(what) => return Some(l),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill(); // our own child, by pid
        let _ = self.child.wait();
    }
}

/// Run `floe backup` against an agent; (exit code, stdout, stderr).
pub fn floe_backup(
    agent: &str,
    sources: &[String],
    media: &Path,
    extra: &[String],
) -> (i32, String, String) {
    floe_backup_to(agent, sources, &format!("disk:{}", media.display()), extra)
}

/// Run `floe backup` against an agent onto media `PLUGIN:SPEC`; (exit
/// code, stdout, stderr).
pub fn floe_backup_to(
    agent: &str,
    sources: &[String],
    media: &str,
    extra: &[String],
) -> (i32, String, String) {
    let mut c = crate::floe_cmd();
    c.args(["backup", "--agent", agent]);
    for s in sources {
        c.args(["--source", s]);
    }
    c.arg("--media").arg(media).args(extra);
    let out = c.output().expect("run floe backup");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The set id a `floe backup` printed.
pub fn set_of(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("set ")
                .and_then(|r| r.split_whitespace().next())
        })
        .unwrap_or_default()
        .to_string()
}

/// Two hosts on one machine: two network namespaces joined by a veth
/// pair, `a` (10.232.N.1) and `b` (10.232.N.2). Both see the same block
/// devices (network namespaces do not separate them). Removed on drop.
pub struct NetPair {
    /// Namespace names.
    pub a: String,
    /// See `a`.
    pub b: String,
    /// Address in `a`.
    pub ip_a: String,
    /// Address in `b`.
    pub ip_b: String,
}

impl NetPair {
    /// Create the pair, or say why not.
    pub fn create() -> Result<NetPair, String> {
        if !crate::is_root() || !crate::have("ip") {
            return Err("needs root and ip (iproute2) for network namespaces".into());
        }
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let id = std::process::id() % 10_000;
        let (a, b) = (format!("floea{id}x{k}"), format!("floeb{id}x{k}"));
        let net = (id * 7 + k) % 250;
        let pair = NetPair {
            a: a.clone(),
            b: b.clone(),
            ip_a: format!("10.232.{net}.1"),
            ip_b: format!("10.232.{net}.2"),
        };
        let (va, vb) = (format!("fwa{id}x{k}"), format!("fwb{id}x{k}"));
        let ip = |args: &[&str]| run(Command::new("ip").args(args)).map(|_| ());
        ip(&["netns", "add", &a])?;
        ip(&["netns", "add", &b])?;
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        ip(&["link", "set", &va, "netns", &a])?;
        ip(&["link", "set", &vb, "netns", &b])?;
        for (ns, dev, addr) in [(&a, &va, &pair.ip_a), (&b, &vb, &pair.ip_b)] {
            ip(&[
                "netns",
                "exec",
                ns,
                "ip",
                "addr",
                "add",
                &format!("{addr}/30"),
                "dev",
                dev,
            ])?;
            ip(&["netns", "exec", ns, "ip", "link", "set", dev, "up"])?;
            ip(&["netns", "exec", ns, "ip", "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }

    /// A `floe` command run inside namespace `ns`.
    pub fn floe_in(&self, ns: &str) -> Command {
        let probe = crate::floe_cmd();
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(crate::floe_bin());
        for (k, v) in probe.get_envs() {
            if let Some(v) = v {
                c.env(k, v);
            }
        }
        c
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end in it, and so the pair.
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

impl AgentProcess {
    /// An agent from a prepared command (`floe agent --listen …` inside a
    /// namespace, say).
    pub fn from_command(mut c: Command) -> AgentProcess {
        let mut child = c.stderr(Stdio::piped()).spawn().expect("start floe agent");
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let first = lines.next().and_then(|l| l.ok()).unwrap_or_default();
        assert!(first.contains("listening"), "agent did not start: {first}");
        let addr = first
            .trim()
            .rsplit(' ')
            .next()
            .unwrap_or_default()
            .to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        AgentProcess {
            child,
            addr,
            stderr: rx,
        }
    }
}

/// An ext4 file system of `mib` MiB on a loop device holding a realistic
/// tree (`make_tree(files, seed)`), synced, with a read-only view for the
/// mover, and an agent allowed to back it up with `fsflush` (plus
/// `agent_args`). `None`, after a loud skip naming what is missing, where
/// this machine cannot make one.
pub fn tree_host(
    test: &str,
    mib: u64,
    files: usize,
    seed: u64,
    agent_args: &[&str],
) -> Option<(LoopFs, AgentProcess, TreeFacts)> {
    let mut src = match LoopFs::new("ext4", 1, mib, &[], "") {
        Ok(f) => f,
        Err(why) => {
            crate::skip(test, &why);
            return None;
        }
    };
    let facts = make_tree(&src.mnt, files, seed);
    src.sync();
    src.mover_view().expect("read-only view");
    let allow = format!("fsflush:{}*", src.mnt.display());
    let mut args = vec!["--allow-source", allow.as_str()];
    args.extend_from_slice(agent_args);
    let agent = AgentProcess::start(&args, &[]);
    Some((src, agent, facts))
}
