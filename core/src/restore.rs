//! Restore of file items to a directory: files with their bytes (holes
//! left sparse), directories, symlinks, hard links, FIFOs and device
//! nodes, then their metadata — owner, extended attributes (ACLs), mode,
//! times; directories' last, deepest first, so writing inside them does
//! not disturb their times.
//!
//! Media are not trusted: a path that would land outside the destination
//! (absolute, `..`) is refused. Every file's bytes are checked against
//! the recorded BLAKE3 as they are written.

use crate::abi::MediaReader;
use crate::error::{Error, ErrorKind, Result};
use crate::model::{FileMeta, ItemKind, ItemRecord, SetRecord};
use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

/// What to restore and how.
#[derive(Clone, Debug, Default)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct TreeOptions {
    /// Restore only these paths (relative to the source root, or item
    /// ids) and what is under them (repeatable; default: everything).
    #[cfg_attr(feature = "cli", arg(long = "path", value_name = "PATH"))]
    pub paths: Vec<String>,
    /// Do not restore owners (default: restore them when running as root).
    #[cfg_attr(feature = "cli", arg(long))]
    pub no_owners: bool,
}

/// What a tree restore did.
#[derive(Clone, Debug, Default)]
pub struct TreeReport {
    /// Items made.
    pub items: usize,
    /// Bytes of file content written (holes not counted).
    pub bytes: u64,
    /// Items that could not be restored, and why.
    pub failures: Vec<(String, String)>,
}

/// One planned step of a tree restore (pure: `--dry-run` prints these).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeStep {
    /// Where it goes.
    pub dest: PathBuf,
    /// The item.
    pub item: ItemRecord,
}

fn safe_rel(rel: &str) -> Option<PathBuf> {
    let p = Path::new(rel);
    if rel == "." {
        return Some(PathBuf::new());
    }
    p.components()
        .all(|c| matches!(c, Component::Normal(_)))
        .then(|| p.to_path_buf())
}

/// Plan where each file item of `set` goes under `dest`. With several
/// source roots in the set, each root gets its own subdirectory (its path
/// without the leading `/`).
pub fn plan_tree(set: &SetRecord, dest: &Path, opts: &TreeOptions) -> Result<Vec<TreeStep>> {
    let roots: BTreeSet<&str> = set
        .items
        .iter()
        .filter_map(|i| i.header.file.as_ref().map(|f| f.root.as_str()))
        .collect();
    let several = roots.len() > 1;
    let wanted = |i: &ItemRecord, f: &FileMeta| {
        opts.paths.is_empty()
            || opts.paths.iter().any(|p| {
                let p = p.trim_end_matches('/');
                f.path == p
                    || f.path.starts_with(&format!("{p}/"))
                    || i.header.item.as_str() == p
                    || i.header.item.as_str().starts_with(&format!("{p}/"))
            })
    };
    let mut out = Vec::new();
    for i in &set.items {
        let Some(f) = &i.header.file else {
            continue; // volumes restore to devices, not here
        };
        if !wanted(i, f) {
            continue;
        }
        let rel = safe_rel(&f.path).ok_or_else(|| {
            Error::new(
                ErrorKind::Media,
                format!(
                    "item path {:?} would land outside the destination: refused",
                    f.path
                ),
            )
            .item(&i.header.item)
        })?;
        let base = if several {
            dest.join(f.root.trim_start_matches('/'))
        } else {
            dest.to_path_buf()
        };
        out.push(TreeStep {
            dest: if rel.as_os_str().is_empty() {
                base
            } else {
                base.join(rel)
            },
            item: i.clone(),
        });
    }
    if !opts.paths.is_empty() && out.is_empty() {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "set {} holds nothing under {}",
                set.header.set,
                opts.paths.join(", ")
            ),
        ));
    }
    Ok(out)
}

use crate::fsmeta::io;

/// Write one file's bytes from the open media item, leaving its holes
/// unwritten, and check them against the record.
fn write_file(
    reader: &mut dyn MediaReader,
    path: &Path,
    rec: &ItemRecord,
    holes: &[[u64; 2]],
) -> Result<u64> {
    let _ = std::fs::remove_file(path);
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| io("create", path, e))?;
    let mut hasher = blake3::Hasher::new();
    let mut pos = 0u64;
    let mut written = 0u64;
    loop {
        let chunk = reader.read(4 << 20)?;
        if chunk.is_empty() {
            break;
        }
        hasher.update(&chunk);
        // Write the parts of the chunk that are not holes.
        let (lo, hi) = (pos, pos + chunk.len() as u64);
        let mut at = lo;
        for h in holes.iter().filter(|h| h[0] < hi && h[0] + h[1] > lo) {
            let (hs, he) = (h[0].max(lo), (h[0] + h[1]).min(hi));
            if hs > at {
                let s = usize::try_from(at - lo).unwrap_or(0);
                let e = usize::try_from(hs - lo).unwrap_or(0);
                out.write_all_at(&chunk[s..e], at)
                    .map_err(|e| io("write", path, e))?;
                written += (e - s) as u64;
            }
            at = at.max(he);
        }
        if at < hi {
            let s = usize::try_from(at - lo).unwrap_or(0);
            out.write_all_at(&chunk[s..], at)
                .map_err(|e| io("write", path, e))?;
            written += (chunk.len() - s) as u64;
        }
        pos = hi;
    }
    out.set_len(pos)
        .map_err(|e| io("set the length of", path, e))?;
    let sum = hasher.finalize().to_hex().to_string();
    if pos != rec.trailer.length.0 || sum != rec.trailer.blake3 {
        return Err(Error::new(
            ErrorKind::ChecksumMismatch,
            format!(
                "restored {pos} bytes with BLAKE3 {sum}, the set recorded {} bytes with {}",
                rec.trailer.length, rec.trailer.blake3
            ),
        )
        .item(&rec.header.item)
        .path(path));
    }
    Ok(written)
}

fn make(reader: &mut dyn MediaReader, set: &SetRecord, step: &TreeStep) -> Result<u64> {
    let h = &step.item.header;
    let f = h.file.as_ref().expect("planned items have file metadata");
    let p = &step.dest;
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io("create directory", parent, e))?;
    }
    let node = |ft: rustix::fs::FileType, dev: u64| {
        let _ = std::fs::remove_file(p);
        rustix::fs::mknodat(
            rustix::fs::CWD,
            p,
            ft,
            rustix::fs::Mode::from_raw_mode(f.mode & 0o7777),
            dev,
        )
        .map_err(|e| io("make node", p, e))
    };
    let target = || {
        f.target.clone().ok_or_else(|| {
            Error::new(ErrorKind::Media, "link without a target on media").item(&h.item)
        })
    };
    match h.kind {
        ItemKind::Directory => {
            std::fs::create_dir_all(p).map_err(|e| io("create directory", p, e))?;
        }
        ItemKind::File => {
            let rec = reader.open_item(&set.header.set, &h.item)?;
            return write_file(reader, p, &rec, &f.holes);
        }
        ItemKind::Symlink => {
            let _ = std::fs::remove_file(p);
            std::os::unix::fs::symlink(target()?, p).map_err(|e| io("create symlink", p, e))?;
        }
        ItemKind::HardLink => {
            let t = target()?;
            let rel = safe_rel(&t).ok_or_else(|| {
                Error::new(
                    ErrorKind::Media,
                    format!("hard link target {t:?} is outside the destination"),
                )
                .item(&h.item)
            })?;
            // The first name sits at the same depth below the same base.
            let depth = Path::new(&f.path).components().count();
            let mut base = p.clone();
            for _ in 0..depth {
                base.pop();
            }
            let first = base.join(rel);
            let _ = std::fs::remove_file(p);
            std::fs::hard_link(&first, p).map_err(|e| io("create hard link", p, e))?;
            return Ok(0);
        }
        ItemKind::Fifo => node(rustix::fs::FileType::Fifo, 0)?,
        ItemKind::CharDevice => node(rustix::fs::FileType::CharacterDevice, f.rdev)?,
        ItemKind::BlockDevice => node(rustix::fs::FileType::BlockDevice, f.rdev)?,
        ItemKind::Volume => {}
    }
    Ok(0)
}

/// Restore the planned steps. Files are made by as many workers as
/// `readers` (each its own media reader: they read different items at
/// once); hard links follow once every file exists; directories get their
/// metadata last.
pub fn restore_tree(
    readers: &mut [Box<dyn MediaReader>],
    set: &SetRecord,
    steps: &[TreeStep],
    opts: &TreeOptions,
    progress: &mut dyn FnMut(&TreeStep),
) -> Result<TreeReport> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let owners = !opts.no_owners && rustix::process::geteuid().is_root();
    let mut report = TreeReport::default();
    if readers.is_empty() {
        return Err(Error::new(
            ErrorKind::Config,
            "restore needs a media reader",
        ));
    }
    // Hard links after every file they may name (media order is read
    // order, not walk order).
    let (links, rest): (Vec<&TreeStep>, Vec<&TreeStep>) = steps
        .iter()
        .partition(|s| s.item.header.kind == ItemKind::HardLink);
    let one = |reader: &mut dyn MediaReader, step: &TreeStep| -> Result<u64> {
        let h = &step.item.header;
        let n = make(reader, set, step)?;
        let f = h.file.as_ref().expect("planned");
        match h.kind {
            ItemKind::Directory | ItemKind::HardLink => {} // later / shared inode
            kind => crate::fsmeta::apply_meta(&step.dest, kind, f, owners)?,
        }
        Ok(n)
    };
    let mut record = |report: &mut TreeReport, step: &TreeStep, r: Result<u64>| {
        progress(step);
        match r {
            Ok(n) => {
                report.items += 1;
                report.bytes += n;
            }
            Err(e) => report
                .failures
                .push((step.item.header.item.to_string(), e.to_string())),
        }
    };
    let next = AtomicUsize::new(0);
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Result<u64>)>();
    std::thread::scope(|sc| {
        for reader in readers.iter_mut() {
            let (tx, next, rest, one) = (tx.clone(), &next, &rest, &one);
            sc.spawn(move || loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(step) = rest.get(k) else { return };
                if tx.send((k, one(reader.as_mut(), step))).is_err() {
                    return;
                }
            });
        }
        drop(tx);
        for (k, r) in rx {
            record(&mut report, rest[k], r);
        }
    });
    for step in links {
        let r = one(readers[0].as_mut(), step);
        record(&mut report, step, r);
    }
    let dirs: Vec<&TreeStep> = steps
        .iter()
        .filter(|s| s.item.header.kind == ItemKind::Directory)
        .collect();
    // Everything written becomes durable at once (one syncfs of the
    // destination's file system, not one fsync per file).
    if let Some(first) = steps.first() {
        let at = if first.dest.is_dir() {
            first.dest.clone()
        } else {
            first
                .dest
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default()
        };
        if let Ok(d) = std::fs::File::open(&at) {
            rustix::fs::syncfs(&d).map_err(|e| io("sync", &at, e))?;
        }
    }
    // Directories last, deepest first.
    let mut dirs = dirs;
    dirs.sort_by_key(|s| std::cmp::Reverse(s.dest.components().count()));
    for step in dirs {
        let f = step.item.header.file.as_ref().expect("planned");
        if let Err(e) = crate::fsmeta::apply_meta(&step.dest, ItemKind::Directory, f, owners) {
            report
                .failures
                .push((step.item.header.item.to_string(), e.to_string()));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use crate::units::Bytes;

    fn rec(root: &str, path: &str, kind: ItemKind) -> ItemRecord {
        ItemRecord {
            header: ItemHeader {
                item: ItemId::new(format!("{root}/{path}")),
                kind,
                size: Bytes(0),
                config: ConfigId::new("c"),
                meta: Default::default(),
                file: Some(FileMeta {
                    root: root.into(),
                    path: path.into(),
                    ..Default::default()
                }),
            },
            trailer: ItemTrailer {
                length: Bytes(0),
                blake3: String::new(),
                config: ConfigId::new("c"),
                remaps: 0,
                captured_after_freeze: false,
            },
            position: MediaPosition {
                medium: "m".into(),
                locator: "l".into(),
            },
        }
    }

    fn set(items: Vec<ItemRecord>) -> SetRecord {
        SetRecord {
            header: SetHeader {
                set: SetId::new("s"),
                label: String::new(),
                agent: "h".into(),
                sources: vec![],
                image: ImageId::new("i"),
                frozen_at: 0,
                started_at: 0,
            },
            items,
            failures: vec![],
            committed_at: 0,
        }
    }

    #[test]
    fn plans_paths_under_the_destination_and_refuses_escapes() {
        let s = set(vec![
            rec("/srv", ".", ItemKind::Directory),
            rec("/srv", "a/b", ItemKind::File),
            rec("/srv", "c", ItemKind::File),
        ]);
        let steps = plan_tree(&s, Path::new("/r"), &TreeOptions::default()).unwrap();
        let dests: Vec<_> = steps.iter().map(|s| s.dest.display().to_string()).collect();
        assert_eq!(dests, ["/r", "/r/a/b", "/r/c"]);
        let only = TreeOptions {
            paths: vec!["a".into()],
            ..Default::default()
        };
        let steps = plan_tree(&s, Path::new("/r"), &only).unwrap();
        assert_eq!(steps.len(), 1);
        let e = plan_tree(
            &set(vec![rec("/srv", "../etc/passwd", ItemKind::File)]),
            Path::new("/r"),
            &TreeOptions::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("outside the destination"), "{e}");
        let two = set(vec![
            rec("/a", "x", ItemKind::File),
            rec("/b", "x", ItemKind::File),
        ]);
        let dests: Vec<_> = plan_tree(&two, Path::new("/r"), &TreeOptions::default())
            .unwrap()
            .iter()
            .map(|s| s.dest.display().to_string())
            .collect();
        assert_eq!(dests, ["/r/a/x", "/r/b/x"]);
    }
}
