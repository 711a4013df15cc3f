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
}

fn read(dir: &Path, f: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(f))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The device of `dev` (an `st_dev`), from sysfs.
pub fn fs_device(dev: u64) -> Result<FsDevice> {
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
        .or_else(|| read(&disk, "loop/backing_file").map(|f| format!("file:{f}")))
        .ok_or_else(|| {
            Error::new(
                ErrorKind::UnknownDevice,
                format!(
                    "{name} has no stable identity (no WWN, serial or loop backing file in sysfs)"
                ),
            )
        })?;
    Ok(FsDevice {
        id: DeviceId::new(id),
        offset,
        name,
    })
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
