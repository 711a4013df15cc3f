//! Private copies of a source made with `FICLONE` (reflinks: XFS, btrfs):
//! the copy shares the original's blocks until the application rewrites
//! them, so it keeps the frozen version at no cost. Every cloned file is
//! made immutable (`chattr +i`), which keeps defragmenters (`xfs_fsr`,
//! `btrfs filesystem defragment`) and everyone else off it; release undoes
//! that and removes the copy.

use crate::meta::capture;
use crate::source::{walk_skipping, SourceSpec};
use floe_core::error::{Error, ErrorKind, Result};
use floe_core::fsmeta::apply_meta;
use floe_core::model::ItemKind;
use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

fn io(op: &str, p: &Path, e: impl Into<std::io::Error>) -> Error {
    Error::new(ErrorKind::Io, format!("cannot {op} {}", p.display()))
        .op(op)
        .path(p)
        .source(e.into())
}

/// Run `f` and put `dir`'s access and modification times back afterwards
/// (so making a freezer's own directory leaves no trace in them).
pub fn keeping_times<T>(dir: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let m = std::fs::metadata(dir).map_err(|e| io("stat", dir, e))?;
    let r = f();
    let ts = |s: i64, n: i64| rustix::fs::Timespec {
        tv_sec: s,
        tv_nsec: n,
    };
    let _ = rustix::fs::utimensat(
        rustix::fs::CWD,
        dir,
        &rustix::fs::Timestamps {
            last_access: ts(m.atime(), m.atime_nsec()),
            last_modification: ts(m.mtime(), m.mtime_nsec()),
        },
        rustix::fs::AtFlags::empty(),
    );
    r
}

/// Clone what `spec` selects under its root into `dest` (which must not
/// exist), keeping names, hard links, metadata; then make every cloned
/// file immutable.
pub fn clone_tree(spec: &SourceSpec, dest: &Path, skip: &[String]) -> Result<()> {
    let w = walk_skipping(spec, &spec.root, skip);
    std::fs::create_dir_all(dest).map_err(|e| io("create", dest, e))?;
    let mut first: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut made: Vec<(PathBuf, ItemKind, floe_core::model::FileMeta)> = Vec::new();
    for e in &w.entries {
        let to = if e.rel == "." {
            dest.to_path_buf()
        } else {
            dest.join(&e.rel)
        };
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|err| io("create", parent, err))?;
        }
        let meta = capture(&spec.root, &e.rel, &e.path, &e.meta)
            .map_err(|err| io("read metadata of", &e.path, err))?;
        let t = e.meta.file_type();
        let kind = if t.is_dir() {
            std::fs::create_dir_all(&to).map_err(|err| io("create", &to, err))?;
            ItemKind::Directory
        } else if t.is_symlink() {
            std::os::unix::fs::symlink(meta.target.clone().unwrap_or_default(), &to)
                .map_err(|err| io("create symlink", &to, err))?;
            ItemKind::Symlink
        } else if t.is_file() {
            let key = (e.meta.dev(), e.meta.ino());
            if let Some(f) = first.get(&key).filter(|_| e.meta.nlink() > 1) {
                std::fs::hard_link(f, &to).map_err(|err| io("link", &to, err))?;
                continue;
            }
            let src = std::fs::File::open(&e.path).map_err(|err| io("open", &e.path, err))?;
            let dst = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&to)
                .map_err(|err| io("create", &to, err))?;
            rustix::fs::ioctl_ficlone(&dst, &src).map_err(|err| {
                Error::new(ErrorKind::Unsupported, format!("FICLONE of {} failed: the file system cannot share blocks (reflink needs XFS with reflink=1, or btrfs)", e.path.display()))
                    .source(std::io::Error::from(err))
            })?;
            first.insert(key, to.clone());
            ItemKind::File
        } else {
            let (ft, kind) = if t.is_fifo() {
                (rustix::fs::FileType::Fifo, ItemKind::Fifo)
            } else if t.is_char_device() {
                (rustix::fs::FileType::CharacterDevice, ItemKind::CharDevice)
            } else if t.is_block_device() {
                (rustix::fs::FileType::BlockDevice, ItemKind::BlockDevice)
            } else {
                continue; // sockets
            };
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &to,
                ft,
                rustix::fs::Mode::from_raw_mode(meta.mode & 0o7777),
                meta.rdev,
            )
            .map_err(|err| io("make node", &to, err))?;
            kind
        };
        made.push((to, kind, meta));
    }
    // Metadata, then immutability; directories last, deepest first.
    for (p, kind, m) in made.iter().filter(|(_, k, _)| *k != ItemKind::Directory) {
        apply_meta(p, *kind, m, true)?;
        if *kind == ItemKind::File {
            set_immutable(p, true)?;
        }
    }
    let mut dirs: Vec<_> = made
        .iter()
        .filter(|(_, k, _)| *k == ItemKind::Directory)
        .collect();
    dirs.sort_by_key(|(p, _, _)| std::cmp::Reverse(p.components().count()));
    for (p, kind, m) in dirs {
        apply_meta(p, *kind, m, true)?;
    }
    Ok(())
}

fn set_immutable(p: &Path, on: bool) -> Result<()> {
    let f = std::fs::File::open(p).map_err(|e| io("open", p, e))?;
    let mut flags = rustix::fs::ioctl_getflags(&f).map_err(|e| io("read flags of", p, e))?;
    flags.set(rustix::fs::IFlags::IMMUTABLE, on);
    rustix::fs::ioctl_setflags(&f, flags).map_err(|e| io("set flags of", p, e))
}

/// Undo [`clone_tree`]: clear the immutable flags and remove `dest`.
pub fn remove_clone(dest: &Path) -> Result<()> {
    fn unlock(p: &Path) {
        if let Ok(m) = std::fs::symlink_metadata(p) {
            if m.is_file() {
                let _ = set_immutable(p, false);
            } else if m.is_dir() {
                for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                    unlock(&e.path());
                }
            }
        }
    }
    unlock(dest);
    std::fs::remove_dir_all(dest).map_err(|e| io("remove", dest, e))
}

/// Frozen copies an agent left behind when it died (killed while it held
/// an image): the entries of `dir` named `<prefix>-<secs>-<pid>[-<n>]`
/// whose agent process is gone. A live `floe` process's copies, and this
/// process's own, are never named. Freezers reap these before they make a
/// new copy beside them.
pub fn leftovers(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let me = std::process::id();
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|r| r.split('-').nth(1))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != me && !floe_alive(pid) {
            out.push(e.path());
        }
    }
    out.sort();
    out
}

/// Is `pid` a running `floe` process? (A reused pid of another program
/// does not keep a dead agent's copy alive.)
fn floe_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim().starts_with("floe"))
}

#[cfg(test)]
mod leftover_tests {
    use super::*;

    #[test]
    fn only_copies_of_dead_agents_are_leftovers() {
        let d = tempfile::tempdir().unwrap();
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = dead.id();
        dead.wait().unwrap();
        let me = std::process::id();
        for n in [
            format!("reflink-100-{dead_pid}"),
            format!("reflink-100-{dead_pid}-2"),
            format!("reflink-100-{me}"),
            "reflink-notanumber".to_string(),
            format!("other-100-{dead_pid}"),
        ] {
            std::fs::create_dir(d.path().join(n)).unwrap();
        }
        let got: Vec<String> = leftovers(d.path(), "reflink")
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
            .collect();
        assert_eq!(
            got,
            [
                format!("reflink-100-{dead_pid}"),
                format!("reflink-100-{dead_pid}-2")
            ]
        );
    }
}
