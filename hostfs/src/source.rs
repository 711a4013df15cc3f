//! File system sources: what a source string selects, and the walk that
//! enumerates it. Source syntax (after the freezer's name, `fsflush:`):
//!
//! - `/srv/data` — a directory: the tree under it (a mount point: the
//!   whole file system). The walk does not cross into other file systems.
//! - `/srv/data/db.sqlite` — one file (any non-directory).
//! - `/srv/data/logs/*.log` — a glob (`*`, `?`), one component at a time.
//! - `/srv/data?from=/srv/data/.backup-list` — the paths listed in a file
//!   (one per line, absolute or relative to the root; `#` comments), each
//!   of which must lie under the root.
//!
//! Roots must be absolute and canonical (no `.`, `..` or symlinks on the
//! way), so an allow-list pattern means what it says.

use floe_core::error::{Error, ErrorKind, Result};
use floe_core::model::{ItemFailure, ItemId};
use floe_core::pattern::glob_match;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// What a source selects under its root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    /// Everything under the root.
    Tree,
    /// These paths (relative to the root) and, for directories, their trees.
    Paths(Vec<String>),
    /// Paths matching a glob relative to the root.
    Glob(String),
    /// Paths listed in a file.
    List(PathBuf),
}

/// A parsed source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceSpec {
    /// The root: a directory every selected path lies under.
    pub root: PathBuf,
    /// What is selected.
    pub select: Selection,
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

fn config(msg: String) -> Error {
    Error::new(ErrorKind::Config, msg)
}

/// A path that is absolute and has no `.`/`..` components.
fn plain_absolute(p: &Path) -> bool {
    p.is_absolute()
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

/// Refuse a root that is not where it says it is.
fn check_canonical(p: &Path) -> Result<()> {
    let real = std::fs::canonicalize(p).map_err(|e| {
        Error::new(
            ErrorKind::NotFound,
            format!("source {} cannot be resolved", p.display()),
        )
        .path(p)
        .source(e)
    })?;
    if real != p {
        return Err(config(format!(
            "source {} is not canonical: it resolves to {} (name the real path)",
            p.display(),
            real.display()
        ))
        .path(p));
    }
    Ok(())
}

/// Parse the path part of a file system source.
pub fn parse_source(text: &str) -> Result<SourceSpec> {
    let (path, list) = match text.split_once("?from=") {
        Some((p, l)) => (p, Some(PathBuf::from(l))),
        None => (text, None),
    };
    let p = PathBuf::from(path);
    let odd_segment = path
        .split('/')
        .skip(1)
        .any(|seg| seg.is_empty() || seg == "." || seg == "..");
    if !plain_absolute(&p) || (odd_segment && path != "/") {
        return Err(config(format!(
            "source path {path:?} must be absolute, without `.`, `..` or a trailing `/`"
        )));
    }
    if let Some(list) = list {
        check_canonical(&p)?;
        if !plain_absolute(&list) || !list.starts_with(&p) {
            return Err(config(format!(
                "list file {} must be an absolute path under the source root {}",
                list.display(),
                p.display()
            )));
        }
        return Ok(SourceSpec {
            root: p,
            select: Selection::List(list),
        });
    }
    if has_glob(path) {
        let mut root = PathBuf::from("/");
        let mut rest = Vec::new();
        for c in p.components().skip(1) {
            let s = c.as_os_str().to_string_lossy().to_string();
            if rest.is_empty() && !has_glob(&s) {
                root.push(&s);
            } else {
                rest.push(s);
            }
        }
        check_canonical(&root)?;
        return Ok(SourceSpec {
            root,
            select: Selection::Glob(rest.join("/")),
        });
    }
    check_canonical(&p)?;
    let meta = std::fs::symlink_metadata(&p).map_err(|e| Error::io("stat source", e).path(&p))?;
    if meta.is_dir() {
        Ok(SourceSpec {
            root: p,
            select: Selection::Tree,
        })
    } else {
        let parent = p.parent().unwrap_or(Path::new("/")).to_path_buf();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        Ok(SourceSpec {
            root: parent,
            select: Selection::Paths(vec![name]),
        })
    }
}

/// One thing found by a walk.
#[derive(Debug)]
pub struct Entry {
    /// Relative to the root, `/`-separated; `.` is the root itself.
    pub rel: String,
    /// Where it is read (under the frozen view of the root).
    pub path: PathBuf,
    /// Its `lstat`.
    pub meta: std::fs::Metadata,
}

/// One thing found by a listing ([`list_skipping`]): named, numbered,
/// and stat'ed only if it is a directory.
#[derive(Debug)]
pub struct Listed {
    /// Relative to the root, `/`-separated; `.` is the root itself.
    pub rel: String,
    /// Where it is read (under the frozen view of the root).
    pub path: PathBuf,
    /// Its inode number (the directory entry's, or its `lstat`'s).
    pub ino: u64,
    /// The device of its file system.
    pub dev: u64,
    /// Its `lstat`, for directories and the paths a source names; `None`
    /// for everything else (whoever maps it stats it). Boxed: few entries
    /// have one, and a `Metadata` (176 bytes) in place made every entry
    /// 256 bytes where 80 do (18 MB for the 70,000-file tree, copied as
    /// the listing grows and moved by the sort into inode order).
    pub meta: Option<Box<std::fs::Metadata>>,
    /// Its directory entry says it is a regular file (so it can be opened
    /// to be stat'ed: opening a device node could rewind a tape).
    pub regular: bool,
}

/// What a walk found, and what it could not take.
#[derive(Debug, Default)]
pub struct Walk {
    /// Entries, parents before children, in name order.
    pub entries: Vec<Entry>,
    /// A listing's entries instead, in no particular order (directories
    /// are listed several at a time).
    pub listed: Vec<Listed>,
    /// Paths that could not be taken, each with why.
    pub failures: Vec<ItemFailure>,
    /// Relative paths left out (a freezer's own snapshot directory).
    pub skip: Vec<String>,
    /// A listing: only directories are stat'ed.
    lazy: bool,
    /// A listing's directories still to list.
    to_list: Vec<(String, PathBuf)>,
}

/// The item id of a path: the original absolute path.
pub fn item_id(root: &Path, rel: &str) -> ItemId {
    let root = root.to_string_lossy();
    if rel == "." {
        return ItemId::new(root.into_owned());
    }
    // `root.join(rel)`, without a PathBuf and a formatter per item.
    let mut id = String::with_capacity(root.len() + 1 + rel.len());
    id.push_str(&root);
    if !id.ends_with('/') {
        id.push('/');
    }
    id.push_str(rel);
    ItemId::new(id)
}

impl Walk {
    fn fail(&mut self, root: &Path, rel: &str, error: String) {
        self.failures.push(ItemFailure {
            item: item_id(root, rel),
            error,
        });
    }

    fn add(&mut self, root: &Path, frozen: &Path, rel: String, recurse: bool, dev: u64) {
        if self.skip.contains(&rel) {
            return;
        }
        let path = if rel == "." {
            frozen.to_path_buf()
        } else {
            frozen.join(&rel)
        };
        match std::fs::symlink_metadata(&path) {
            Ok(meta) => self.add_known(root, rel, path, meta, recurse, dev),
            Err(e) => self.fail(root, &rel, format!("cannot stat {}: {e}", path.display())),
        }
    }

    /// Add an entry whose `lstat` is in hand, then (a directory on the
    /// same file system, when recursing) its children. Children are
    /// stat'ed through the directory's open descriptor (`fstatat`), not
    /// by a full path each: one path component to look up instead of
    /// all of them, for each of a tree's files.
    fn add_known(
        &mut self,
        root: &Path,
        rel: String,
        path: PathBuf,
        meta: std::fs::Metadata,
        recurse: bool,
        dev: u64,
    ) {
        let descend = recurse && meta.is_dir() && meta.dev() == dev;
        if self.lazy {
            self.listed.push(Listed {
                rel: rel.clone(),
                path: path.clone(),
                ino: meta.ino(),
                dev: meta.dev(),
                regular: meta.is_file(),
                meta: Some(Box::new(meta)),
            });
        } else {
            self.entries.push(Entry {
                rel: rel.clone(),
                path: path.clone(),
                meta,
            });
        }
        if !descend {
            return;
        }
        if self.lazy {
            // Listed later, several directories at a time.
            self.to_list.push((rel, path));
            return;
        }
        let rd = match std::fs::read_dir(&path) {
            Ok(rd) => rd,
            Err(e) => return self.fail(root, &rel, format!("cannot list {}: {e}", path.display())),
        };
        let mut children: Vec<(String, std::io::Result<std::fs::Metadata>)> = Vec::new();
        for ent in rd {
            match ent {
                Ok(ent) => match ent.file_name().into_string() {
                    // lstat through the directory's descriptor.
                    Ok(n) => children.push((n, ent.metadata())),
                    Err(raw) => self.fail(
                        root,
                        &rel,
                        format!(
                            "name {:?} in {} is not UTF-8; Floe cannot record it",
                            raw,
                            path.display()
                        ),
                    ),
                },
                Err(e) => self.fail(root, &rel, format!("cannot list {}: {e}", path.display())),
            }
        }
        children.sort_by(|a, b| a.0.cmp(&b.0));
        for (n, meta) in children {
            let child_path = path.join(&n);
            let child = if rel == "." { n } else { format!("{rel}/{n}") };
            if self.skip.contains(&child) {
                continue;
            }
            match meta {
                Ok(m) => self.add_known(root, child, child_path, m, true, dev),
                Err(e) => {
                    let msg = format!("cannot stat {}: {e}", child_path.display());
                    self.fail(root, &child, msg);
                }
            }
        }
    }
}

/// Threads listing directories at once: over a SAN each directory is a
/// few reads' latency (its inode, its blocks), so a listing waits on
/// several at a time.
const LISTING_THREADS: usize = 8;

/// What listing one directory found: its children, the directories among
/// them to list next, what could not be taken.
#[derive(Default)]
struct Listing {
    listed: Vec<Listed>,
    dirs: Vec<(String, PathBuf)>,
    failures: Vec<ItemFailure>,
}

/// Tests only: listing a directory of this relative path panics.
#[cfg(test)]
static PANIC_LISTING: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// List one directory: children that are not directories by their
/// directory entry (name, inode number, type: no `lstat`); directories
/// `lstat`ed through the directory's descriptor (to descend only on the
/// same file system).
fn list_dir(root: &Path, rel: &str, path: &Path, dev: u64, skip: &[String], out: &mut Listing) {
    use std::os::unix::fs::DirEntryExt;
    #[cfg(test)]
    if PANIC_LISTING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .as_deref()
        == Some(rel)
    {
        // Half a listing, then the panic: none of it may be kept.
        out.dirs.push((format!("{rel}/half"), path.join("half")));
        panic!("injected panic listing {rel}");
    }
    let fail = |out: &mut Listing, rel: &str, error: String| {
        out.failures.push(ItemFailure {
            item: item_id(root, rel),
            error,
        });
    };
    let rd = match std::fs::read_dir(path) {
        Ok(rd) => rd,
        Err(e) => return fail(out, rel, format!("cannot list {}: {e}", path.display())),
    };
    for ent in rd {
        let ent = match ent {
            Ok(ent) => ent,
            Err(e) => {
                fail(out, rel, format!("cannot list {}: {e}", path.display()));
                continue;
            }
        };
        let n = match ent.file_name().into_string() {
            Ok(n) => n,
            Err(raw) => {
                let msg = format!(
                    "name {:?} in {} is not UTF-8; Floe cannot record it",
                    raw,
                    path.display()
                );
                fail(out, rel, msg);
                continue;
            }
        };
        let child = if rel == "." {
            n.clone()
        } else {
            format!("{rel}/{n}")
        };
        if skip.contains(&child) {
            continue;
        }
        let child_path = path.join(&n);
        match ent.file_type() {
            Ok(t) if !t.is_dir() => out.listed.push(Listed {
                rel: child,
                path: child_path,
                ino: ent.ino(),
                dev,
                meta: None,
                regular: t.is_file(),
            }),
            _ => match ent.metadata() {
                Ok(m) => {
                    if m.is_dir() && m.dev() == dev {
                        out.dirs.push((child.clone(), child_path.clone()));
                    }
                    out.listed.push(Listed {
                        rel: child,
                        path: child_path,
                        ino: m.ino(),
                        dev: m.dev(),
                        regular: m.is_file(),
                        meta: Some(Box::new(m)),
                    });
                }
                Err(e) => {
                    let msg = format!("cannot stat {}: {e}", child_path.display());
                    fail(out, &child, msg);
                }
            },
        }
    }
}

/// List every directory in `w.to_list` and below, on
/// [`LISTING_THREADS`] threads taking directories from one queue.
fn list_all(w: &mut Walk, root: &Path, dev: u64) {
    use std::sync::{Condvar, Mutex};
    struct Queue {
        dirs: Vec<(String, PathBuf)>,
        /// Directories being listed (their children may add more).
        busy: usize,
    }
    let queue = Mutex::new(Queue {
        dirs: std::mem::take(&mut w.to_list),
        busy: 0,
    });
    let wake = Condvar::new();
    let skip = &w.skip;
    let found: Vec<Listing> = std::thread::scope(|sc| {
        let workers: Vec<_> = (0..LISTING_THREADS)
            .map(|_| {
                sc.spawn(|| {
                    let mut out = Listing::default();
                    let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
                    loop {
                        if let Some((rel, path)) = q.dirs.pop() {
                            q.busy += 1;
                            drop(q);
                            let mut here = Listing::default();
                            let listed =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    list_dir(root, &rel, &path, dev, skip, &mut here);
                                }));
                            if listed.is_err() {
                                // Never lost silently: the directory fails.
                                here.dirs.clear();
                                here.failures.push(ItemFailure {
                                    item: item_id(root, &rel),
                                    error: format!(
                                        "listing {} panicked: its contents are missing",
                                        path.display()
                                    ),
                                });
                            }
                            out.listed.append(&mut here.listed);
                            out.failures.append(&mut here.failures);
                            q = queue.lock().unwrap_or_else(|p| p.into_inner());
                            q.busy -= 1;
                            q.dirs.append(&mut here.dirs);
                            wake.notify_all();
                        } else if q.busy == 0 {
                            return out;
                        } else {
                            q = wake.wait(q).unwrap_or_else(|p| p.into_inner());
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| Listing {
                    failures: vec![ItemFailure {
                        item: item_id(root, "."),
                        error: "a listing thread failed: part of the source is missing".into(),
                    }],
                    ..Listing::default()
                })
            })
            .collect()
    });
    for mut l in found {
        w.listed.append(&mut l.listed);
        w.failures.append(&mut l.failures);
    }
}

/// A relative path under the root, or why not.
fn relative_under(root: &Path, line: &str) -> std::result::Result<String, String> {
    let p = Path::new(line);
    let rel = if p.is_absolute() {
        p.strip_prefix(root)
            .map_err(|_| format!("{line} is outside the source {}", root.display()))?
            .to_path_buf()
    } else {
        p.to_path_buf()
    };
    if !rel
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(format!("{line} is outside the source {}", root.display()));
    }
    let s = rel.to_string_lossy().trim_end_matches('/').to_string();
    Ok(if s.is_empty() { ".".into() } else { s })
}

/// Does a path under `frozen` go through a symlink on its way (which could
/// lead outside the source)?
fn through_symlink(frozen: &Path, rel: &str) -> Option<String> {
    let mut at = frozen.to_path_buf();
    let parts: Vec<&str> = rel
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect();
    for part in parts.iter().take(parts.len().saturating_sub(1)) {
        at.push(part);
        if std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
            return Some(at.display().to_string());
        }
    }
    None
}

/// Enumerate a source, reading under `frozen` (the root itself, or where a
/// snapshot of it is mounted).
pub fn walk(spec: &SourceSpec, frozen: &Path) -> Walk {
    walk_skipping(spec, frozen, &[])
}

/// [`walk`], leaving out these relative paths.
pub fn walk_skipping(spec: &SourceSpec, frozen: &Path, skip: &[String]) -> Walk {
    let mut w = Walk {
        skip: skip.to_vec(),
        ..Walk::default()
    };
    let _ = walk_into(&mut w, spec, frozen);
    w
}

/// [`walk_skipping`] into [`Walk::listed`], stat'ing only directories
/// (and the paths a source names): a file's name, inode number and type
/// come from its directory's entries, so a tree is listed with one
/// `getdents` per directory and a mapper stats its files later, in inode
/// order, on several threads (on the 70,000-file tree the walk's `lstat`s
/// were most of the wait before the first part of the map). Directories
/// are listed several at a time, so [`Walk::listed`] is in no particular
/// order.
pub fn list_skipping(spec: &SourceSpec, frozen: &Path, skip: &[String]) -> Walk {
    let mut w = Walk {
        skip: skip.to_vec(),
        lazy: true,
        ..Walk::default()
    };
    if let Some(dev) = walk_into(&mut w, spec, frozen) {
        list_all(&mut w, &spec.root, dev);
    }
    w
}

/// Walk (or start a listing of) what `spec` selects; the device of its
/// file system (`None`: the root could not be stat'ed, a failure).
fn walk_into(w: &mut Walk, spec: &SourceSpec, frozen: &Path) -> Option<u64> {
    let root = &spec.root;
    let dev = match std::fs::metadata(frozen) {
        Ok(m) => m.dev(),
        Err(e) => {
            w.fail(root, ".", format!("cannot stat {}: {e}", frozen.display()));
            return None;
        }
    };
    let paths: Vec<String> = match &spec.select {
        Selection::Tree => {
            w.add(root, frozen, ".".into(), true, dev);
            return Some(dev);
        }
        Selection::Paths(p) => p.clone(),
        Selection::Glob(g) => expand_glob(frozen, g),
        Selection::List(list) => match std::fs::read_to_string(list) {
            Ok(text) => {
                let mut out = Vec::new();
                for line in text.lines().map(str::trim) {
                    if line.is_empty() || line.starts_with('#') {
                        continue;
                    }
                    match relative_under(root, line) {
                        Ok(rel) => out.push(rel),
                        Err(e) => w.failures.push(ItemFailure {
                            item: ItemId::new(line),
                            error: e,
                        }),
                    }
                }
                out
            }
            Err(e) => {
                w.fail(
                    root,
                    ".",
                    format!("cannot read list file {}: {e}", list.display()),
                );
                return Some(dev);
            }
        },
    };
    let mut seen = std::collections::BTreeSet::new();
    for rel in paths {
        if !seen.insert(rel.clone()) {
            continue;
        }
        if let Some(link) = through_symlink(frozen, &rel) {
            w.fail(
                root,
                &rel,
                format!("{rel} goes through the symlink {link}, which may lead outside the source"),
            );
            continue;
        }
        w.add(root, frozen, rel, true, dev);
    }
    Some(dev)
}

/// Expand a relative glob under `base`, one component at a time, in name
/// order. Only directories are descended.
fn expand_glob(base: &Path, glob: &str) -> Vec<String> {
    let mut found = vec![String::new()];
    for part in glob.split('/').filter(|s| !s.is_empty()) {
        let mut next = Vec::new();
        for rel in &found {
            let dir = if rel.is_empty() {
                base.to_path_buf()
            } else {
                base.join(rel)
            };
            if !has_glob(part) {
                if std::fs::symlink_metadata(dir.join(part)).is_ok() {
                    next.push(join(rel, part));
                }
                continue;
            }
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut names: Vec<String> = rd
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| (part.starts_with('.') || !n.starts_with('.')) && glob_match(part, n))
                .collect();
            names.sort();
            next.extend(names.iter().map(|n| join(rel, n)));
        }
        found = next;
    }
    found.retain(|s| !s.is_empty());
    found
}

fn join(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_string()
    } else {
        format!("{a}/{b}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_and_refuse_what_is_not_plain() {
        let d = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(d.path()).unwrap();
        std::fs::write(root.join("a.log"), b"x").unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        let r = root.display().to_string();
        assert_eq!(parse_source(&r).unwrap().select, Selection::Tree);
        assert_eq!(
            parse_source(&format!("{r}/a.log")).unwrap(),
            SourceSpec {
                root: root.clone(),
                select: Selection::Paths(vec!["a.log".into()])
            }
        );
        assert_eq!(
            parse_source(&format!("{r}/*.log")).unwrap(),
            SourceSpec {
                root: root.clone(),
                select: Selection::Glob("*.log".into())
            }
        );
        for bad in [
            "relative/path".to_string(),
            format!("{r}/../x"),
            format!("{r}/./sub"),
            format!("{r}/sub/"),
        ] {
            let e = parse_source(&bad).unwrap_err();
            assert!(e.to_string().contains("absolute"), "{bad}: {e}");
        }
        std::os::unix::fs::symlink(root.join("sub"), root.join("link")).unwrap();
        let e = parse_source(&format!("{r}/link")).unwrap_err();
        assert!(e.to_string().contains("not canonical"), "{e}");
        let e = parse_source(&format!("{r}?from=/etc/passwd")).unwrap_err();
        assert!(e.to_string().contains("under the source root"), "{e}");
    }

    #[test]
    fn walks_trees_globs_and_lists_and_names_what_it_cannot_take() {
        let d = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(d.path()).unwrap();
        std::fs::create_dir_all(root.join("logs/old")).unwrap();
        std::fs::write(root.join("logs/a.log"), b"a").unwrap();
        std::fs::write(root.join("logs/b.txt"), b"b").unwrap();
        std::fs::write(root.join("logs/old/c.log"), b"c").unwrap();
        std::os::unix::fs::symlink("/etc", root.join("etc")).unwrap();
        let r = root.display().to_string();

        let spec = parse_source(&r).unwrap();
        let w = walk(&spec, &root);
        let rels: Vec<&str> = w.entries.iter().map(|e| e.rel.as_str()).collect();
        assert_eq!(
            rels,
            [
                ".",
                "etc",
                "logs",
                "logs/a.log",
                "logs/b.txt",
                "logs/old",
                "logs/old/c.log"
            ]
        );

        let spec = parse_source(&format!("{r}/logs/*.log")).unwrap();
        let w = walk(&spec, &root.join("logs"));
        let rels: Vec<&str> = w.entries.iter().map(|e| e.rel.as_str()).collect();
        assert_eq!(rels, ["a.log"]);

        std::fs::write(
            root.join("list"),
            format!("# wanted\nlogs/a.log\n{r}/logs/old\n/etc/shadow\netc/passwd\nlogs/../../x\nmissing\n"),
        )
        .unwrap();
        let spec = parse_source(&format!("{r}?from={r}/list")).unwrap();
        let w = walk(&spec, &root);
        let rels: Vec<&str> = w.entries.iter().map(|e| e.rel.as_str()).collect();
        assert_eq!(rels, ["logs/a.log", "logs/old", "logs/old/c.log"]);
        let errs: Vec<&str> = w.failures.iter().map(|f| f.error.as_str()).collect();
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(
            errs[0].contains("/etc/shadow is outside the source"),
            "{errs:?}"
        );
        assert!(
            errs[1].contains("logs/../../x is outside the source"),
            "{errs:?}"
        );
        assert!(errs[2].contains("goes through the symlink"), "{errs:?}");
        assert!(
            errs[3].contains("cannot stat") && errs[3].contains("missing"),
            "{errs:?}"
        );
    }

    #[test]
    fn a_listing_finds_what_a_walk_finds_and_stats_only_directories() {
        use std::os::unix::ffi::OsStrExt;
        let d = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(d.path()).unwrap();
        for k in 0..30 {
            let dir = root.join(format!("d{k}/sub{}", k % 3));
            std::fs::create_dir_all(&dir).unwrap();
            for f in 0..5 {
                std::fs::write(dir.join(format!("f{f}")), format!("{k}/{f}")).unwrap();
            }
        }
        std::fs::hard_link(root.join("d1/sub1/f0"), root.join("d2/again")).unwrap();
        std::os::unix::fs::symlink("d1", root.join("link")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("d3/fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        std::fs::create_dir_all(root.join("skipped/deep")).unwrap();
        std::fs::write(root.join("skipped/deep/x"), b"x").unwrap();
        let bad = std::ffi::OsStr::from_bytes(b"not-utf8-\xff");
        std::fs::write(root.join("d4").join(bad), b"?").unwrap();
        let spec = parse_source(&root.display().to_string()).unwrap();
        let skip = vec!["skipped".to_string()];

        let walked = walk_skipping(&spec, &root, &skip);
        let listed = list_skipping(&spec, &root, &skip);
        let mut want: Vec<(String, u64, u64, bool)> = walked
            .entries
            .iter()
            .map(|e| (e.rel.clone(), e.meta.ino(), e.meta.dev(), e.meta.is_file()))
            .collect();
        let mut got: Vec<(String, u64, u64, bool)> = listed
            .listed
            .iter()
            .map(|e| (e.rel.clone(), e.ino, e.dev, e.regular))
            .collect();
        want.sort();
        got.sort();
        assert_eq!(got, want);
        assert_eq!(got.len(), 1 + 30 + 30 + 150 + 1 + 1 + 1);
        for e in &listed.listed {
            let dir = std::fs::symlink_metadata(&e.path).unwrap().is_dir();
            assert_eq!(e.meta.is_some(), dir, "{}: stat'ed iff a directory", e.rel);
        }
        let errs = |w: &Walk| {
            let mut v: Vec<String> = w.failures.iter().map(|f| f.error.clone()).collect();
            v.sort();
            v
        };
        assert_eq!(errs(&listed), errs(&walked));
        assert_eq!(listed.failures.len(), 1, "{:?}", listed.failures);
        assert!(listed.failures[0].error.contains("not UTF-8"));
    }

    #[test]
    fn a_listing_that_panics_fails_its_directory_and_keeps_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(d.path()).unwrap();
        for dir in ["a/inner", "b"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        for f in ["a/f", "a/inner/g", "b/h", "top"] {
            std::fs::write(root.join(f), f).unwrap();
        }
        let spec = parse_source(&root.display().to_string()).unwrap();
        *PANIC_LISTING.lock().unwrap() = Some("a".into());
        let listed = list_skipping(&spec, &root, &[]);
        *PANIC_LISTING.lock().unwrap() = None;
        let mut rels: Vec<&str> = listed.listed.iter().map(|e| e.rel.as_str()).collect();
        rels.sort_unstable();
        // `a` itself was listed by its parent; nothing from inside it.
        assert_eq!(rels, vec![".", "a", "b", "b/h", "top"]);
        assert_eq!(listed.failures.len(), 1, "{:?}", listed.failures);
        let f = &listed.failures[0];
        assert_eq!(f.item, item_id(&root, "a"));
        assert!(
            f.error.contains(&format!(
                "listing {} panicked: its contents are missing",
                root.join("a").display()
            )),
            "{}",
            f.error
        );
    }
}
