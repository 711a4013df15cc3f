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
use crate::model::{FileMeta, ItemAt, ItemKind, ItemRecord, SetRecord};
use crate::units::Bytes;
use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

/// What to restore and how.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct TreeOptions {
    /// Restore only these paths (relative to the source root, or item
    /// ids) and what is under them (repeatable; default: everything).
    #[cfg_attr(feature = "cli", arg(long = "path", value_name = "PATH"))]
    pub paths: Vec<String>,
    /// Do not restore owners (default: restore them when running as root).
    #[cfg_attr(feature = "cli", arg(long))]
    pub no_owners: bool,
    /// Make restored file data durable every SIZE bytes as the restore
    /// goes: a sync of the destination's file system in the background,
    /// so the disk writes while later files are made instead of all at
    /// the end (0: one sync at the end only). Through an agent, the agent
    /// syncs its destination so.
    #[cfg_attr(
        feature = "cli",
        arg(long, value_name = "SIZE", default_value_t = DEFAULT_SYNC_EVERY)
    )]
    pub sync_every: Bytes,
}

/// [`TreeOptions::sync_every`] unless told: measured on the 70,000-file
/// bench tree (1.5 GB), 64–256 MiB all cut the restore's time by about
/// a tenth against one sync at the end; 128 MiB did best.
pub const DEFAULT_SYNC_EVERY: Bytes = Bytes(128 << 20);

impl Default for TreeOptions {
    fn default() -> TreeOptions {
        TreeOptions {
            paths: Vec::new(),
            no_owners: false,
            sync_every: DEFAULT_SYNC_EVERY,
        }
    }
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

/// A file being restored: its bytes come in chunks (from a media reader,
/// or over the wire through the agent); holes are left unwritten and the
/// whole is checked against the record at the end.
pub struct FileWriter {
    out: std::fs::File,
    path: PathBuf,
    hasher: blake3::Hasher,
    pos: u64,
    written: u64,
    /// The end of the last bytes written (the length, unless a hole ends
    /// the file).
    data_end: u64,
    holes: Vec<[u64; 2]>,
    /// A block device: written whole, never truncated, synced at the end.
    device: bool,
}

impl FileWriter {
    /// Create (replacing) the file at `path`.
    pub fn create(path: &Path, holes: &[[u64; 2]]) -> Result<FileWriter> {
        // Whatever is at the path (a file, a planted symlink) is replaced,
        // never written through.
        let open = || {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
        };
        let out = match open() {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                std::fs::remove_file(path).map_err(|e| io("replace", path, e))?;
                open()
            }
            r => r,
        }
        .map_err(|e| io("create", path, e))?;
        Ok(FileWriter::over(out, path, holes, false))
    }

    fn over(out: std::fs::File, path: &Path, holes: &[[u64; 2]], device: bool) -> FileWriter {
        FileWriter {
            out,
            path: path.to_path_buf(),
            hasher: blake3::Hasher::new(),
            pos: 0,
            written: 0,
            data_end: 0,
            holes: holes.to_vec(),
            device,
        }
    }

    /// Open the target of a volume of `size` bytes with `holes`: an
    /// existing block device at least that large (written whole, zeros
    /// included, and synced), or an image file (created or emptied, its
    /// holes left sparse). A symlink is refused, never followed.
    pub fn volume(path: &Path, size: u64, holes: &[[u64; 2]]) -> Result<FileWriter> {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        let meta = std::fs::symlink_metadata(path).ok();
        if meta.as_ref().is_some_and(|m| m.file_type().is_symlink()) {
            return Err(Error::new(
                ErrorKind::Denied,
                "the volume's target is a symlink: refused",
            )
            .path(path));
        }
        let device = meta
            .as_ref()
            .is_some_and(|m| m.file_type().is_block_device());
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create(!device)
            .truncate(!device)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| io("open the volume target", path, e))?;
        if device {
            let have = crate::sys::block_device_size(&out)
                .map_err(|e| io("size (BLKGETSIZE64)", path, e))?;
            if have < size {
                return Err(Error::new(
                    ErrorKind::WriteFailed,
                    format!("the device holds {have} bytes, the volume needs {size}"),
                )
                .path(path));
            }
        }
        let holes = if device { &[][..] } else { holes };
        Ok(FileWriter::over(out, path, holes, device))
    }

    /// The next bytes of the file.
    pub fn push(&mut self, chunk: &[u8]) -> Result<()> {
        let path = &self.path;
        self.hasher.update(chunk);
        // Write the parts of the chunk that are not holes.
        let (lo, hi) = (self.pos, self.pos + chunk.len() as u64);
        let mut at = lo;
        for h in self.holes.iter().filter(|h| h[0] < hi && h[0] + h[1] > lo) {
            let (hs, he) = (h[0].max(lo), (h[0] + h[1]).min(hi));
            if hs > at {
                let s = usize::try_from(at - lo).unwrap_or(0);
                let e = usize::try_from(hs - lo).unwrap_or(0);
                self.out
                    .write_all_at(&chunk[s..e], at)
                    .map_err(|e| io("write", path, e))?;
                self.written += (e - s) as u64;
                self.data_end = hs;
            }
            at = at.max(he);
        }
        if at < hi {
            let s = usize::try_from(at - lo).unwrap_or(0);
            self.out
                .write_all_at(&chunk[s..], at)
                .map_err(|e| io("write", path, e))?;
            self.written += (chunk.len() - s) as u64;
            self.data_end = hi;
        }
        self.pos = hi;
        Ok(())
    }

    /// All bytes are in: set the length and check them against the
    /// record; the bytes written (holes not counted).
    pub fn finish(self, rec: &ItemRecord) -> Result<u64> {
        self.finish_file(rec).map(|(n, _)| n)
    }

    /// [`FileWriter::finish`], handing back the open file (to set its
    /// metadata without a path lookup).
    pub fn finish_file(self, rec: &ItemRecord) -> Result<(u64, std::fs::File)> {
        let path = &self.path;
        if self.data_end != self.pos && !self.device {
            // A hole ends the file: its length is not written yet.
            self.out
                .set_len(self.pos)
                .map_err(|e| io("set the length of", path, e))?;
        }
        if self.device {
            self.out.sync_all().map_err(|e| io("sync", path, e))?;
        }
        let sum = self.hasher.finalize().to_hex().to_string();
        if self.pos != rec.trailer.length.0 || sum != rec.trailer.blake3 {
            return Err(Error::new(
                ErrorKind::ChecksumMismatch,
                format!(
                    "restored {} bytes with BLAKE3 {sum}, the set recorded {} bytes with {}",
                    self.pos, rec.trailer.length, rec.trailer.blake3
                ),
            )
            .item(&rec.header.item)
            .path(path));
        }
        Ok((self.written, self.out))
    }
}

/// Write one file's bytes from the open media item.
fn write_file(
    reader: &mut dyn MediaReader,
    path: &Path,
    rec: &ItemRecord,
    holes: &[[u64; 2]],
) -> Result<(u64, std::fs::File)> {
    let mut w = FileWriter::create(path, holes)?;
    loop {
        let chunk = reader.read_chunk(4 << 20)?;
        if chunk.is_empty() {
            break;
        }
        w.push(&chunk)?;
    }
    w.finish_file(rec)
}

/// Make a planned item (its parent directory exists) and give it its
/// metadata, except a directory's (set last) and a hard link's (its
/// inode's is set through its first name).
fn make(
    reader: &mut dyn MediaReader,
    set: &SetRecord,
    step: &TreeStep,
    owners: bool,
) -> Result<u64> {
    let h = &step.item.header;
    let f = h.file.as_ref().ok_or_else(|| {
        Error::new(ErrorKind::Media, "a file item without file metadata").item(&h.item)
    })?;
    if h.kind == ItemKind::File {
        // Straight to where the set's record says (no lookup in the media's
        // index per file); the bytes are checked against that record.
        reader.open_at(&set.header.set, &ItemAt::of(&step.item))?;
        let (n, file) = write_file(reader, &step.dest, &step.item, &f.holes).inspect_err(|_| {
            // Bytes that are not the set's (wrong, or cut short) never
            // stay behind looking like the file.
            let _ = std::fs::remove_file(&step.dest);
        })?;
        crate::fsmeta::apply_meta_fd(&file, &step.dest, f, owners)?;
        return Ok(n);
    }
    let n = make_node(step)?;
    match h.kind {
        ItemKind::Directory | ItemKind::HardLink => {}
        kind => crate::fsmeta::apply_meta(&step.dest, kind, f, owners)?,
    }
    Ok(n)
}

/// Every directory the steps need to exist before their items are made:
/// the parents of every step, parents before children.
fn parents(steps: &[TreeStep]) -> BTreeSet<PathBuf> {
    let mut dirs = BTreeSet::new();
    let mut last: Option<&Path> = None;
    for s in steps {
        // Runs of steps share a parent (a directory's entries lie
        // together): one lookup per run.
        let parent = s.dest.parent();
        if parent.is_some() && parent == last {
            continue;
        }
        last = parent;
        let mut p = parent;
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            if !dirs.insert(d.to_path_buf()) {
                break;
            }
            p = d.parent();
        }
    }
    dirs
}

fn make_parent(p: &Path) -> Result<()> {
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io("create directory", parent, e))?;
    }
    Ok(())
}

/// Where a hard link's first name was restored: at the same depth below
/// the same base as the link.
fn hard_link_source(step: &TreeStep) -> Result<PathBuf> {
    let h = &step.item.header;
    let f = h.file.as_ref().ok_or_else(|| {
        Error::new(ErrorKind::Media, "a hard link without file metadata").item(&h.item)
    })?;
    let t = f.target.as_deref().ok_or_else(|| {
        Error::new(ErrorKind::Media, "link without a target on media").item(&h.item)
    })?;
    let rel = safe_rel(t).ok_or_else(|| {
        Error::new(
            ErrorKind::Media,
            format!("hard link target {t:?} is outside the destination"),
        )
        .item(&h.item)
    })?;
    let depth = Path::new(&f.path).components().count();
    let mut base = step.dest.clone();
    for _ in 0..depth {
        base.pop();
    }
    Ok(base.join(rel))
}

/// Make an item that has no bytes: a directory, link, FIFO or node.
fn make_node(step: &TreeStep) -> Result<u64> {
    let h = &step.item.header;
    let f = h.file.as_ref().ok_or_else(|| {
        Error::new(ErrorKind::Media, "a file item without file metadata").item(&h.item)
    })?;
    let p = &step.dest;
    make_parent(p)?;
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
            // A symlink where a directory goes is replaced, never followed
            // (its target's metadata is not ours to set).
            if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()) {
                std::fs::remove_file(p).map_err(|e| io("replace symlink", p, e))?;
            }
            std::fs::create_dir_all(p).map_err(|e| io("create directory", p, e))?;
        }
        ItemKind::File => {
            return Err(Error::new(ErrorKind::Media, "a file needs its bytes").item(&h.item))
        }
        ItemKind::Symlink => {
            let _ = std::fs::remove_file(p);
            std::os::unix::fs::symlink(target()?, p).map_err(|e| io("create symlink", p, e))?;
        }
        ItemKind::HardLink => {
            let first = hard_link_source(step)?;
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
    // Parent directories first, once (not a mkdir per file). A symlink
    // where one goes is replaced, never followed.
    for d in parents(steps) {
        match std::fs::create_dir(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if std::fs::symlink_metadata(&d).is_ok_and(|m| m.file_type().is_symlink()) {
                    std::fs::remove_file(&d).map_err(|e| io("replace symlink", &d, e))?;
                    std::fs::create_dir(&d).map_err(|e| io("create directory", &d, e))?;
                }
            }
            Err(e) => return Err(io("create directory", &d, e)),
        }
    }
    let one = |reader: &mut dyn MediaReader, step: &TreeStep| -> Result<u64> {
        make(reader, set, step, owners)
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
    const RUN: usize = 64;
    let next = AtomicUsize::new(0);
    let sync_at = sync_point(steps);
    let flusher = Flusher::new(sync_at.as_deref(), opts.sync_every);
    // A run's outcomes go back together (one wake-up of the recording
    // thread per run, not per item).
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Vec<Result<u64>>)>();
    std::thread::scope(|sc| {
        let nudge = flusher.as_ref().map(|f| f.start(sc));
        for reader in readers.iter_mut() {
            let (tx, next, rest, one) = (tx.clone(), &next, &rest, &one);
            let (nudge, flusher) = (nudge.clone(), flusher.as_ref());
            // Runs of consecutive items per worker: each reader then reads
            // its own stretch of the media (an archive's items lie in
            // order), not every other item of the same stretch.
            sc.spawn(move || loop {
                let from = next.fetch_add(RUN, Ordering::Relaxed);
                let Some(run) = rest.get(from..rest.len().min(from + RUN)) else {
                    return;
                };
                let done: Vec<Result<u64>> =
                    run.iter().map(|step| one(reader.as_mut(), step)).collect();
                if let Some((f, nudge)) = flusher.zip(nudge.as_ref()) {
                    f.wrote(done.iter().flatten().sum(), nudge);
                }
                if tx.send((from, done)).is_err() {
                    return;
                }
            });
        }
        drop((tx, nudge));
        for (from, done) in rx {
            for (k, r) in done.into_iter().enumerate() {
                record(&mut report, rest[from + k], r);
            }
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
    // Everything written becomes durable (one syncfs of the destination's
    // file system, not one fsync per file), and so did what the flusher
    // synced on the way.
    if let Some(f) = &flusher {
        f.failed()?;
    }
    if let Some(at) = &sync_at {
        if let Ok(d) = std::fs::File::open(at) {
            rustix::fs::syncfs(&d).map_err(|e| io("sync", at, e))?;
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

/// Where the destination's file system is synced from: the first step's
/// directory (a tree's root is its first step), else its parent.
fn sync_point(steps: &[TreeStep]) -> Option<PathBuf> {
    let first = steps.first()?;
    Some(if first.dest.is_dir() {
        first.dest.clone()
    } else {
        first
            .dest
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    })
}

/// Makes restored data durable as a restore goes: once workers have
/// written [`TreeOptions::sync_every`] bytes more, a thread of its own
/// syncs the destination's file system (`syncfs`), so the disk writes
/// while later files are made. The first failure is kept and fails the
/// restore at its end (a later `syncfs` on the same descriptor would not
/// report it again).
struct Flusher {
    dir: std::fs::File,
    path: PathBuf,
    every: u64,
    since: std::sync::atomic::AtomicU64,
    failed: std::sync::Mutex<Option<std::io::Error>>,
}

impl Flusher {
    /// None when told to sync only at the end, or when the destination
    /// cannot be opened (the final sync then does without it too).
    fn new(at: Option<&Path>, every: Bytes) -> Option<Flusher> {
        let path = at.filter(|_| every.0 > 0)?;
        let dir = std::fs::File::open(path).ok()?;
        Some(Flusher {
            dir,
            path: path.to_path_buf(),
            every: every.0,
            since: std::sync::atomic::AtomicU64::new(0),
            failed: std::sync::Mutex::new(None),
        })
    }

    /// Its thread, syncing once per nudge until every sender is gone.
    fn start<'s>(&'s self, sc: &'s std::thread::Scope<'s, '_>) -> std::sync::mpsc::SyncSender<()> {
        let (nudge, nudges) = std::sync::mpsc::sync_channel::<()>(1);
        sc.spawn(move || self.serve(&nudges));
        nudge
    }

    /// [`Flusher::start`] on a thread of its own (a restore through the
    /// agent lives across requests): the nudge and the thread, which
    /// ends once the nudge is dropped.
    fn start_owned(
        self: &std::sync::Arc<Self>,
    ) -> std::io::Result<(std::sync::mpsc::SyncSender<()>, std::thread::JoinHandle<()>)> {
        let (nudge, nudges) = std::sync::mpsc::sync_channel::<()>(1);
        let me = std::sync::Arc::clone(self);
        let thread = std::thread::Builder::new()
            .name("floe-restore-sync".into())
            .spawn(move || me.serve(&nudges))?;
        Ok((nudge, thread))
    }

    /// Sync once per nudge, keeping the first failure.
    fn serve(&self, nudges: &std::sync::mpsc::Receiver<()>) {
        for () in nudges {
            let synced = if crate::media::errpoint("restore-sync") {
                Err(rustix::io::Errno::IO)
            } else {
                rustix::fs::syncfs(&self.dir)
            };
            if let Err(e) = synced {
                let mut failed = self
                    .failed
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                failed.get_or_insert(e.into());
            }
        }
    }

    /// `n` more bytes written: nudge the thread when enough are.
    fn wrote(&self, n: u64, nudge: &std::sync::mpsc::SyncSender<()>) {
        use std::sync::atomic::Ordering;
        let since = self.since.fetch_add(n, Ordering::Relaxed) + n;
        if since >= self.every {
            // The sync covers everything written so far. Full: one is
            // already pending, which covers these bytes too.
            self.since.fetch_sub(since, Ordering::Relaxed);
            let _ = nudge.try_send(());
        }
    }

    /// The first background sync's failure, if any.
    fn failed(&self) -> Result<()> {
        let mut failed = self
            .failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match failed.take() {
            Some(e) => Err(io("sync", &self.path, e)),
            None => Ok(()),
        }
    }
}

/// Restore through the agent, on the agent's side: one session per
/// connection. The mover sends each planned item (and a file's bytes);
/// the session makes it under a destination the agent allows
/// (`--allow-restore`), never through a symlink and never outside it.
pub struct RestoreSession {
    root: PathBuf,
    owners: bool,
    file: Option<(FileWriter, TreeStep)>,
    dirs: Vec<TreeStep>,
    items: u64,
    bytes: u64,
    /// Syncs the destination as the restore goes (none: at the end only).
    flusher: Option<SessionFlusher>,
}

/// A restore session's [`Flusher`], its nudge and its thread.
struct SessionFlusher {
    flusher: std::sync::Arc<Flusher>,
    nudge: std::sync::mpsc::SyncSender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl SessionFlusher {
    /// Stop the thread (after its pending sync); its first failure.
    fn stop(self) -> Result<()> {
        drop(self.nudge);
        if self.thread.join().is_err() {
            return Err(Error::new(
                ErrorKind::Io,
                "the restore's sync thread panicked",
            ));
        }
        self.flusher.failed()
    }
}

impl RestoreSession {
    /// Begin restoring under `dest`, which must lie under one of `allow`.
    /// Its file system is synced every `sync_every` bytes of file data
    /// as the session goes (0: only at its end).
    pub fn begin(
        dest: &str,
        allow: &[String],
        no_owners: bool,
        sync_every: Bytes,
    ) -> Result<RestoreSession> {
        let denied = |why: String| Error::new(ErrorKind::Denied, why).op("restore");
        let d = Path::new(dest);
        if !d.is_absolute() || d.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(denied(format!(
                "restore destination {dest:?} must be absolute, without `..`"
            )));
        }
        let allowed: Vec<PathBuf> = allow
            .iter()
            .filter_map(|a| std::fs::canonicalize(a).ok())
            .collect();
        // The nearest existing ancestor decides (what is created below it
        // cannot be a symlink yet).
        let mut existing = d.to_path_buf();
        while !existing.exists() {
            if !existing.pop() {
                break;
            }
        }
        let canon = std::fs::canonicalize(&existing).map_err(|e| io("resolve", &existing, e))?;
        if !allowed.iter().any(|a| canon.starts_with(a)) {
            return Err(denied(format!(
                "restore destination {dest} is not under this agent's --allow-restore directories ({})",
                allow.join(", ")
            )));
        }
        let root = canon.join(d.strip_prefix(&existing).unwrap_or(Path::new("")));
        std::fs::create_dir_all(&root).map_err(|e| io("create directory", &root, e))?;
        let flusher = match Flusher::new(Some(&root), sync_every) {
            Some(f) => {
                let flusher = std::sync::Arc::new(f);
                let (nudge, thread) = flusher
                    .start_owned()
                    .map_err(|e| io("start the sync thread", &root, e))?;
                Some(SessionFlusher {
                    flusher,
                    nudge,
                    thread,
                })
            }
            None => None,
        };
        Ok(RestoreSession {
            root,
            owners: !no_owners && rustix::process::geteuid().is_root(),
            file: None,
            dirs: Vec::new(),
            items: 0,
            bytes: 0,
            flusher,
        })
    }

    /// The destination, resolved.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `path` lies under the root, and no directory on the way there is a
    /// symlink (a restored symlink must not carry later items elsewhere).
    fn check(&self, path: &Path) -> Result<()> {
        let bad = |why: &str| {
            Error::new(ErrorKind::Denied, format!("{}: {why}", path.display())).op("restore")
        };
        let rel = path
            .strip_prefix(&self.root)
            .map_err(|_| bad("outside the destination"))?;
        if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(bad("not a plain path below the destination"));
        }
        let mut at = self.root.clone();
        let comps: Vec<_> = rel.components().collect();
        for c in comps.iter().take(comps.len().saturating_sub(1)) {
            at.push(c);
            match std::fs::symlink_metadata(&at) {
                Ok(m) if m.file_type().is_symlink() || !m.is_dir() => {
                    return Err(bad(
                        "a directory on the way is a symlink or not a directory",
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Make an item at `dest`. A file is opened and waits for its bytes.
    pub fn item(&mut self, dest: &str, record: ItemRecord) -> Result<u64> {
        if self.file.is_some() {
            return Err(Error::new(ErrorKind::Protocol, "a file is still open"));
        }
        let step = TreeStep {
            dest: PathBuf::from(dest),
            item: record,
        };
        self.check(&step.dest)?;
        let h = &step.item.header;
        if h.kind == ItemKind::Volume {
            let w = FileWriter::volume(&step.dest, h.size.0, h.holes())?;
            self.file = Some((w, step));
            return Ok(0);
        }
        let f = h.file.clone().ok_or_else(|| {
            Error::new(ErrorKind::Media, "a file item without file metadata").item(&h.item)
        })?;
        match h.kind {
            ItemKind::File => {
                make_parent(&step.dest)?;
                self.file = Some((FileWriter::create(&step.dest, &f.holes)?, step));
                return Ok(0);
            }
            ItemKind::HardLink => self.check(&hard_link_source(&step)?)?,
            _ => {}
        }
        make_node(&step)?;
        match h.kind {
            ItemKind::Directory => self.dirs.push(step),
            ItemKind::HardLink => {}
            kind => crate::fsmeta::apply_meta(&step.dest, kind, &f, self.owners)?,
        }
        self.items += 1;
        Ok(0)
    }

    /// The open file's next bytes.
    pub fn data(&mut self, bytes: &[u8]) -> Result<u64> {
        let (w, _) = self
            .file
            .as_mut()
            .ok_or_else(|| Error::new(ErrorKind::Protocol, "no file open"))?;
        if let Err(e) = w.push(bytes) {
            if let Some((w, step)) = self.file.take() {
                if !w.device {
                    let _ = std::fs::remove_file(&step.dest);
                }
            }
            return Err(e);
        }
        if let Some(f) = &self.flusher {
            f.flusher.wrote(bytes.len() as u64, &f.nudge);
        }
        Ok(w.written)
    }

    /// The open file is complete: check it, set its metadata.
    pub fn end_item(&mut self) -> Result<u64> {
        let (w, step) = self
            .file
            .take()
            .ok_or_else(|| Error::new(ErrorKind::Protocol, "no file open"))?;
        let device = w.device;
        let n = w.finish(&step.item).inspect_err(|_| {
            // A file that is not what the set recorded is not left behind
            // (a device stays: it is not ours to remove).
            if !device {
                let _ = std::fs::remove_file(&step.dest);
            }
        })?;
        if let Some(f) = step.item.header.file.as_ref() {
            crate::fsmeta::apply_meta(&step.dest, ItemKind::File, f, self.owners)?;
        }
        self.items += 1;
        self.bytes += n;
        Ok(n)
    }

    /// Everything is made: sync, then directories' metadata, deepest
    /// first. The failures are directories whose metadata failed.
    pub fn finish(mut self) -> Result<TreeReport> {
        // The syncs on the way first: a failure of theirs is reported
        // once, to them.
        let synced = self.flusher.take().map_or(Ok(()), SessionFlusher::stop);
        if let Ok(d) = std::fs::File::open(&self.root) {
            rustix::fs::syncfs(&d).map_err(|e| io("sync", &self.root, e))?;
        }
        synced?;
        self.dirs
            .sort_by_key(|s| std::cmp::Reverse(s.dest.components().count()));
        let mut failures = Vec::new();
        for step in &self.dirs {
            let f = step.item.header.file.as_ref().expect("checked at item");
            if let Err(e) =
                crate::fsmeta::apply_meta(&step.dest, ItemKind::Directory, f, self.owners)
            {
                failures.push((step.item.header.item.to_string(), e.to_string()));
            }
        }
        Ok(TreeReport {
            items: usize::try_from(self.items).unwrap_or(usize::MAX) + self.dirs.len(),
            bytes: self.bytes,
            failures,
        })
    }
}

/// Restore through the agent, on the mover's side: read each planned item
/// from the media and send it to the agent, which makes it on its host
/// under `dest`. Hard links go after every file; the agent sets
/// directories' metadata last.
pub fn restore_tree_via_agent(
    agent: &mut crate::agent::AgentClient,
    reader: &mut dyn MediaReader,
    set: &SetRecord,
    dest: &Path,
    opts: &TreeOptions,
    progress: &mut dyn FnMut(&TreeStep),
) -> Result<TreeReport> {
    let root = agent.restore_begin(&dest.to_string_lossy(), opts.no_owners, opts.sync_every)?;
    let steps = plan_tree(set, Path::new(&root), opts)?;
    let (links, rest): (Vec<&TreeStep>, Vec<&TreeStep>) = steps
        .iter()
        .partition(|s| s.item.header.kind == ItemKind::HardLink);
    let mut report = TreeReport::default();
    for step in rest.into_iter().chain(links) {
        let h = &step.item.header;
        let dest = step.dest.to_string_lossy().to_string();
        let r = (|| -> Result<u64> {
            if h.kind != ItemKind::File {
                return agent.restore_item(&dest, &step.item);
            }
            reader.open_at(&set.header.set, &ItemAt::of(&step.item))?;
            send_item(agent, reader, &dest, &step.item)
        })();
        progress(step);
        match r {
            Ok(n) => {
                report.bytes += n;
            }
            Err(e) => report.failures.push((h.item.to_string(), e.to_string())),
        }
    }
    let done = agent.restore_finish()?;
    report.items = done.items;
    report.bytes = done.bytes;
    report.failures.extend(done.failures);
    Ok(report)
}

/// Restore one volume through the agent to `target` on its host (an image
/// file, or an existing block device at least as large), under one of the
/// agent's `--allow-restore` directories; checked against its BLAKE3 there.
/// The bytes written.
pub fn restore_volume_via_agent(
    agent: &mut crate::agent::AgentClient,
    reader: &mut dyn MediaReader,
    set: &crate::model::SetId,
    item: &crate::model::ItemId,
    target: &Path,
) -> Result<u64> {
    let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
        return Err(Error::new(
            ErrorKind::Config,
            format!("{} is not a path to restore a volume to", target.display()),
        ));
    };
    let rec = reader.open_item(set, item)?;
    if rec.header.kind != ItemKind::Volume {
        return Err(Error::new(
            ErrorKind::Config,
            "only volumes restore to a target path; files restore with --to-dir",
        )
        .item(item));
    }
    let root = agent.restore_begin(&parent.to_string_lossy(), true, DEFAULT_SYNC_EVERY)?;
    let dest = Path::new(&root).join(name).to_string_lossy().to_string();
    let n = send_item(agent, reader, &dest, &rec)?;
    agent.restore_finish()?;
    Ok(n)
}

/// Send the item open on `reader` (`rec`) to the agent, to be made at
/// `dest`: its record, its bytes, its end (where the agent checks them).
/// The bytes the agent wrote.
fn send_item(
    agent: &mut crate::agent::AgentClient,
    reader: &mut dyn MediaReader,
    dest: &str,
    rec: &ItemRecord,
) -> Result<u64> {
    agent.restore_item(dest, rec)?;
    let sent = (|| -> Result<()> {
        loop {
            let chunk = reader.read_chunk(1 << 20)?;
            if chunk.is_empty() {
                return Ok(());
            }
            agent.restore_data(&chunk)?;
        }
    })();
    // Closing checks the bytes; after a failure it closes the item (the
    // agent removes a file) so the next item can begin.
    let end = agent.restore_item_end();
    sent?;
    end
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;

    #[test]
    fn the_flusher_is_nudged_once_per_sync_every_bytes() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            Flusher::new(Some(dir.path()), Bytes(0)).is_none(),
            "0: at the end only"
        );
        assert!(Flusher::new(None, Bytes(100)).is_none());
        let f = Flusher::new(Some(dir.path()), Bytes(100)).unwrap();
        let (nudge, nudges) = std::sync::mpsc::sync_channel::<()>(1);
        f.wrote(60, &nudge);
        assert!(nudges.try_recv().is_err(), "60 of 100 bytes: no sync yet");
        f.wrote(60, &nudge);
        assert!(nudges.try_recv().is_ok(), "120 bytes: a sync");
        f.wrote(30, &nudge);
        assert!(nudges.try_recv().is_err(), "30 more: none");
        f.wrote(500, &nudge);
        f.wrote(500, &nudge);
        assert!(nudges.try_recv().is_ok(), "a pending sync covers both");
        assert!(nudges.try_recv().is_err());
        f.failed().unwrap();
    }

    fn rec(root: &str, path: &str, kind: ItemKind) -> ItemRecord {
        ItemRecord {
            header: ItemHeader {
                item: ItemId::new(format!("{root}/{path}")),
                kind,
                size: Bytes(0),
                config: ConfigId::new("c"),
                meta: Default::default(),
                holes: Vec::new(),
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
