//! A file's metadata as [`FileMeta`]: mode, owner, times, device number,
//! symlink target, extended attributes (ACLs included, as
//! `system.posix_acl_*`).

use floe_core::model::{FileMeta, ItemKind, Timestamp};
use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// The item kind of a file type; `None` for sockets (not backed up: they
/// are made by the program that listens on them).
pub fn kind_of(meta: &std::fs::Metadata) -> Option<ItemKind> {
    let t = meta.file_type();
    Some(if t.is_dir() {
        ItemKind::Directory
    } else if t.is_symlink() {
        ItemKind::Symlink
    } else if t.is_file() {
        ItemKind::File
    } else if t.is_fifo() {
        ItemKind::Fifo
    } else if t.is_char_device() {
        ItemKind::CharDevice
    } else if t.is_block_device() {
        ItemKind::BlockDevice
    } else {
        return None;
    })
}

fn ts(sec: i64, nsec: i64) -> Timestamp {
    Timestamp {
        sec,
        nsec: u32::try_from(nsec).unwrap_or(0),
    }
}

/// Hex of bytes.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Where extended attributes are read from: a path (not following a
/// symlink), or a file already open (no path lookup per call).
#[derive(Clone, Copy)]
pub enum XattrSource<'a> {
    /// `l*xattr` on a path.
    Path(&'a Path),
    /// `f*xattr` on an open file.
    File(&'a std::fs::File),
}

impl XattrSource<'_> {
    fn list(self, names: &mut [u8]) -> rustix::io::Result<usize> {
        match self {
            XattrSource::Path(p) => rustix::fs::llistxattr(p, names),
            XattrSource::File(f) => rustix::fs::flistxattr(f, names),
        }
    }

    fn get(self, name: &str, value: &mut [u8]) -> rustix::io::Result<usize> {
        match self {
            XattrSource::Path(p) => rustix::fs::lgetxattr(p, name, value),
            XattrSource::File(f) => rustix::fs::fgetxattr(f, name, value),
        }
    }
}

/// Extended attributes of `path` (not following a symlink).
pub fn xattrs(path: &Path) -> std::io::Result<BTreeMap<String, String>> {
    xattrs_of(XattrSource::Path(path))
}

/// Extended attributes, from a path or an open file.
pub fn xattrs_of(from: XattrSource<'_>) -> std::io::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut names = vec![0u8; 4096];
    let n = loop {
        match from.list(&mut names) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) => names.resize(names.len() * 4, 0),
            Err(rustix::io::Errno::NOTSUP) => return Ok(out),
            Err(e) => return Err(e.into()),
        }
    };
    for name in names[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        // XFS shows its on-disk form of the POSIX ACLs as trusted xattrs
        // beside `system.posix_acl_*`; the latter are what is restored.
        if name == "trusted.SGI_ACL_FILE" || name == "trusted.SGI_ACL_DEFAULT" {
            continue;
        }
        let mut val = vec![0u8; 1024];
        let len = loop {
            match from.get(name, &mut val) {
                Ok(n) => break n,
                Err(rustix::io::Errno::RANGE) => val.resize(val.len() * 8, 0),
                Err(rustix::io::Errno::NODATA) => break usize::MAX,
                Err(e) => return Err(e.into()),
            }
        };
        if len != usize::MAX {
            out.insert(name.to_string(), hex(&val[..len]));
        }
    }
    Ok(out)
}

/// Capture what a restore needs (without holes: the map adds those).
pub fn capture(
    root: &Path,
    rel: &str,
    path: &Path,
    meta: &std::fs::Metadata,
) -> std::io::Result<FileMeta> {
    capture_from(root, rel, path, meta, XattrSource::Path(path))
}

/// [`capture`], reading extended attributes from `xattrs` (a regular
/// file's open descriptor saves a path lookup per attribute call).
pub fn capture_from(
    root: &Path,
    rel: &str,
    path: &Path,
    meta: &std::fs::Metadata,
    xattrs: XattrSource<'_>,
) -> std::io::Result<FileMeta> {
    let target = if meta.file_type().is_symlink() {
        Some(
            std::fs::read_link(path)?
                .into_os_string()
                .into_string()
                .map_err(|_| std::io::Error::other("symlink target is not UTF-8"))?,
        )
    } else {
        None
    };
    let t = meta.file_type();
    Ok(FileMeta {
        root: root.display().to_string(),
        path: rel.to_string(),
        mode: meta.mode(),
        uid: meta.uid(),
        gid: meta.gid(),
        atime: ts(meta.atime(), meta.atime_nsec()),
        mtime: ts(meta.mtime(), meta.mtime_nsec()),
        ctime: ts(meta.ctime(), meta.ctime_nsec()),
        rdev: if t.is_char_device() || t.is_block_device() {
            meta.rdev()
        } else {
            0
        },
        target,
        xattrs: xattrs_of(xattrs)?,
        holes: Vec::new(),
    })
}
