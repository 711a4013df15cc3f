//! Applying a file's recorded metadata ([`FileMeta`]) to a path: shared by
//! restore to a directory and by freezers that make private copies.

use crate::error::{Error, ErrorKind, Result};
use crate::model::{FileMeta, ItemKind, Timestamp};
use std::path::Path;

/// Decode the hex of an xattr value.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// A write-side error naming the operation and path.
pub(crate) fn io(op: &str, p: &Path, e: impl Into<std::io::Error>) -> Error {
    Error::new(
        ErrorKind::WriteFailed,
        format!("cannot {op} {}", p.display()),
    )
    .op(op)
    .path(p)
    .source(e.into())
}

fn ts(t: Timestamp) -> rustix::fs::Timespec {
    rustix::fs::Timespec {
        tv_sec: t.sec,
        tv_nsec: t.nsec.into(),
    }
}

/// Give `path` what `f` records: owner (when `owners`), extended
/// attributes (ACLs included), mode (not for symlinks), times — in that
/// order, since a chown clears set-id bits and a chmod adjusts an ACL's
/// mask. Never follows a symlink.
pub fn apply_meta(path: &Path, kind: ItemKind, f: &FileMeta, owners: bool) -> Result<()> {
    apply(Target::Path(path, kind), path, f, owners)
}

/// [`apply_meta`] through an open regular file: no path lookups (a tree
/// restore sets the metadata of every file it just wrote).
pub fn apply_meta_fd(file: &std::fs::File, path: &Path, f: &FileMeta, owners: bool) -> Result<()> {
    apply(Target::Fd(file), path, f, owners)
}

enum Target<'a> {
    Path(&'a Path, ItemKind),
    Fd(&'a std::fs::File),
}

fn apply(target: Target<'_>, path: &Path, f: &FileMeta, owners: bool) -> Result<()> {
    use rustix::fs::{AtFlags, CWD};
    let nofollow = AtFlags::SYMLINK_NOFOLLOW;
    if owners {
        let (uid, gid) = (
            Some(rustix::fs::Uid::from_raw(f.uid)),
            Some(rustix::fs::Gid::from_raw(f.gid)),
        );
        match target {
            Target::Path(p, _) => rustix::fs::chownat(CWD, p, uid, gid, nofollow),
            Target::Fd(fd) => rustix::fs::fchown(fd, uid, gid),
        }
        .map_err(|e| io("chown", path, e))?;
    }
    for (name, value) in &f.xattrs {
        let v = unhex(value).ok_or_else(|| {
            Error::new(
                ErrorKind::Media,
                format!("xattr {name} is not hex on media"),
            )
            .path(path)
        })?;
        let flags = rustix::fs::XattrFlags::empty();
        match target {
            Target::Path(p, _) => rustix::fs::lsetxattr(p, name.as_str(), &v, flags),
            Target::Fd(fd) => rustix::fs::fsetxattr(fd, name.as_str(), &v, flags),
        }
        .map_err(|e| io(&format!("set xattr {name} on"), path, e))?;
    }
    let mode = rustix::fs::Mode::from_raw_mode(f.mode & 0o7777);
    match target {
        Target::Path(_, ItemKind::Symlink) => Ok(()),
        Target::Path(p, _) => rustix::fs::chmodat(CWD, p, mode, AtFlags::empty()),
        Target::Fd(fd) => rustix::fs::fchmod(fd, mode),
    }
    .map_err(|e| io("chmod", path, e))?;
    let times = rustix::fs::Timestamps {
        last_access: ts(f.atime),
        last_modification: ts(f.mtime),
    };
    match target {
        Target::Path(p, _) => rustix::fs::utimensat(CWD, p, &times, nofollow),
        Target::Fd(fd) => rustix::fs::futimens(fd, &times),
    }
    .map_err(|e| io("set times of", path, e))?;
    Ok(())
}
