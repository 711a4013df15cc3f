//! Which device a file system is on, by a stable identity the mover can
//! check on the device itself, and where the file system starts on it.
//!
//! Order (there is no `/dev/disk/by-id` without udev): the disk's WWN
//! (`/sys/block/X/device/wwid` or `wwid`), its serial (`device/serial`),
//! and for a loop device its backing file (`file:/path`). A partition adds
//! its start (`/sys/dev/block/M:m/start`, 512-byte sectors).

use floe_core::error::{Error, ErrorKind, Result};
use floe_core::model::DeviceId;
use std::path::{Path, PathBuf};

/// A file system's device: its identity and the byte offset of the file
/// system on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsDevice {
    /// The disk's identity.
    pub id: DeviceId,
    /// Where the file system starts on the disk.
    pub offset: u64,
    /// The kernel's name for it (`loop3p1`), for messages.
    pub name: String,
    /// Its block device numbers (the partition's, then its disk's) and
    /// the byte address in `id`'s space of each one's sector 0: where a
    /// write traced on either lands ([`crate::watch`]).
    pub kernel: Vec<(u64, i128)>,
}

fn read(dir: &Path, f: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(f))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The sysfs directory of `dev` (an `st_dev`) and the kernel's name for
/// it (`loop3p1`: its node is `/dev/loop3p1`).
pub fn sysfs_block(dev: u64) -> Result<(PathBuf, String)> {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let link = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let sys = std::fs::canonicalize(&link).map_err(|e| {
        Error::new(
            ErrorKind::UnknownDevice,
            format!(
                "device {major}:{minor} is not a block device (a network or virtual file system?)"
            ),
        )
        .path(&link)
        .source(e)
    })?;
    let name = sys
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    Ok((sys, name))
}

/// The device of `dev` (an `st_dev`), from sysfs.
pub fn fs_device(dev: u64) -> Result<FsDevice> {
    let (sys, name) = sysfs_block(dev)?;
    let (disk, offset) = if sys.join("partition").exists() {
        let start: u64 = read(&sys, "start")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::UnknownDevice,
                    format!("partition {name} has no start"),
                )
            })?;
        (sys.parent().unwrap_or(&sys).to_path_buf(), start * 512)
    } else {
        (sys.clone(), 0)
    };
    let id = read(&disk, "device/wwid")
        .or_else(|| read(&disk, "wwid"))
        .or_else(|| read(&disk, "device/serial").map(|s| format!("serial:{s}")))
        .or_else(|| read(&disk, "loop/backing_file").map(|f| format!("file:{f}")));
    let (id, offset) = match id {
        Some(id) => (id, offset),
        // Last: the file system's own UUID, which names the file system
        // device itself (the partition), so no offset applies.
        None => {
            let dev = PathBuf::from("/dev").join(&name);
            let mut head = vec![0u8; 4096];
            let got = std::fs::File::open(&dev)
                .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0));
            match got.ok().and_then(|()| fs_uuid(&head)) {
                Some(u) => (format!("fs-uuid:{u}"), 0),
                None => {
                    return Err(Error::new(
                        ErrorKind::UnknownDevice,
                        format!(
                            "{name} has no stable identity (no WWN, serial, loop backing file or file system UUID)"
                        ),
                    ))
                }
            }
        }
    };
    Ok(FsDevice {
        id: DeviceId::new(id),
        offset,
        name,
        // `offset`: where the file system starts in `id`'s space.
        kernel: kernel_devices(dev, i128::from(offset)),
    })
}

/// The block device `dev` (an `st_rdev`) whose sector 0 is at byte `base`
/// of some identity's space, and, for a partition, its disk (whose sector
/// 0 is the partition's start before that): where a write traced on
/// either lands in the identity's space.
pub fn kernel_devices(dev: u64, base: i128) -> Vec<(u64, i128)> {
    let mut out = vec![(dev, base)];
    let Ok((sys, _)) = sysfs_block(dev) else {
        return out;
    };
    if !sys.join("partition").exists() {
        return out;
    }
    let start = read(&sys, "start").and_then(|s| s.parse::<u64>().ok());
    let whole = sys
        .parent()
        .and_then(|disk| read(disk, "dev"))
        .and_then(|d| {
            let (ma, mi) = d.split_once(':')?;
            Some(libc::makedev(ma.parse().ok()?, mi.parse().ok()?))
        });
    if let (Some(start), Some(whole)) = (start, whole) {
        out.push((whole, base - i128::from(start) * 512));
    }
    out
}

/// The mount a path is on, from `/proc/self/mountinfo`: (mount point,
/// file system type, `st_dev` of the path). The longest mount point above
/// the path with the same `st_dev` (btrfs gives each subvolume an anonymous
/// device number that mountinfo does not show), else the longest above it.
pub fn mount_of(path: &Path) -> Result<(PathBuf, String, u64)> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path)
        .map_err(|e| Error::io("stat", e).path(path))?
        .dev();
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("read mountinfo", e))?;
    let mut same: Option<(PathBuf, String)> = None;
    let mut any: Option<(PathBuf, String)> = None;
    let longer = |best: &Option<(PathBuf, String)>, mp: &Path| {
        best.as_ref()
            .is_none_or(|(b, _)| mp.as_os_str().len() >= b.as_os_str().len())
    };
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        if f.len() < sep + 2 || f.len() < 5 {
            continue;
        }
        let mp = PathBuf::from(f[4].replace("\\040", " "));
        if !path.starts_with(&mp) {
            continue;
        }
        let fstype = f[sep + 1].to_string();
        if std::fs::metadata(&mp).is_ok_and(|m| m.dev() == dev) && longer(&same, &mp) {
            same = Some((mp.clone(), fstype.clone()));
        }
        if longer(&any, &mp) {
            any = Some((mp, fstype));
        }
    }
    let (mp, fstype) = same.or(any).ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!("no mount holds {}", path.display()),
        )
    })?;
    Ok((mp, fstype, dev))
}

/// The UUID of the ext2/3/4 or XFS file system whose first 4 KiB are
/// `head` (ext: magic 0xEF53 at 1024+56, UUID at 1024+104; XFS: `XFSB` at
/// 0, UUID at 32), formatted 8-4-4-4-12. Pure.
pub fn fs_uuid(head: &[u8]) -> Option<String> {
    let u = if head.get(0..4) == Some(b"XFSB") {
        head.get(32..48)?
    } else if head.get(1024 + 56..1024 + 58) == Some(&[0x53, 0xEF]) {
        head.get(1024 + 104..1024 + 120)?
    } else {
        return None;
    };
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    Some(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

#[cfg(test)]
mod tests {
    use super::fs_uuid;
    use std::process::Command;

    /// The UUIDs read from real mkfs output agree with blkid's.
    #[test]
    fn file_system_uuids_are_read_from_real_superblocks() {
        for (mkfs, size) in [("mkfs.ext4", 16u64 << 20), ("mkfs.xfs", 300 << 20)] {
            if Command::new(mkfs).arg("-V").output().is_err()
                || Command::new("blkid").arg("-V").output().is_err()
            {
                eprintln!("SKIPPED file_system_uuids_are_read_from_real_superblocks: needs {mkfs} and blkid");
                continue;
            }
            let d = tempfile::tempdir().unwrap();
            let img = d.path().join("fs.img");
            std::fs::File::create(&img).unwrap().set_len(size).unwrap();
            let force = if mkfs == "mkfs.xfs" { "-f" } else { "-F" };
            assert!(Command::new(mkfs)
                .args(["-q", force])
                .arg(&img)
                .status()
                .unwrap()
                .success());
            let want = String::from_utf8(
                Command::new("blkid")
                    .args(["-p", "-s", "UUID", "-o", "value"])
                    .arg(&img)
                    .output()
                    .unwrap()
                    .stdout,
            )
            .unwrap();
            let head = std::fs::read(&img).unwrap();
            assert_eq!(
                fs_uuid(&head[..4096]).as_deref(),
                Some(want.trim()),
                "{mkfs}"
            );
        }
        assert_eq!(fs_uuid(&[0u8; 4096]), None);
    }
}
