//! The file mapper and validity indicator shared by the `fiemap` and
//! `btrfs` plugins: walk each source of a frozen image, map every file
//! with FIEMAP, translate file system addresses to device extents, and
//! give each item a config id that changes whenever its map could have.
//!
//! Config id of a regular file: `f:INO:GEN:SIZE:CTIME:DIGEST`, DIGEST a
//! hash of its FIEMAP extent list (defragmenters move extents without
//! changing ctime, generation or size). Other kinds: `n:INO:CTIME`.
//! A file that is gone: `gone:…` (never equal to a real id).

use crate::filemap::{extents_digest, plan_file, FilePiece};
use crate::identity::FsDevice;
use crate::meta::{capture, capture_from, kind_of, XattrSource};
use crate::source::{item_id, list_skipping, parse_source, Listed, Selection};
use crate::sys::{fiemap, generation, FiemapExtent, FIEMAP_FLAG_SYNC};
use crate::watch::{Watched, WriteWatch};
use floe_core::abi::{Mapper, ValidityIndicator};
use floe_core::error::{Error, ErrorKind, Result};
use floe_core::model::*;
use floe_core::units::{BlockSize, Blocks, Bytes, ItemOffset};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Maps keyed by item ids (one entry per file, ~70,000 per backup of a
/// source tree): foldhash, seeded per process, instead of SipHash (which
/// was a twentieth of the agent's CPU hashing paths).
type ItemMap<V> = HashMap<ItemId, V, foldhash::fast::RandomState>;

/// What a file system freezer records per source, for the mapper.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceHandle {
    /// The source's path part (`/srv/data`, `/srv/data/*.log`, …).
    pub spec: String,
    /// Where the frozen version of the source's root can be read (the
    /// root itself for flush-only freezers; a snapshot or clone otherwise).
    pub frozen: PathBuf,
    /// True when the freezer keeps the frozen version whatever the
    /// application does (snapshot, clone); false for flush-only.
    pub snapshot: bool,
    /// The file system type (`ext4`, `xfs`, `btrfs`).
    pub fstype: String,
    /// Paths relative to the root that are the freezer's own (a snapshot
    /// directory), left out of the walk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skip: Vec<String>,
    /// The file system's volume as one item instead of its files (the
    /// freezer holds it frozen until release).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<crate::volume::VolumeMode>,
}

/// The mapper plugin for a file system type.
pub fn mapper_for(fstype: &str) -> Option<&'static str> {
    match fstype {
        "ext4" | "ext3" | "ext2" | "xfs" => Some("fiemap"),
        "btrfs" => Some("btrfs"),
        _ => None,
    }
}

/// Refuse a source whose file system `mapper` does not map.
pub fn check_mapper(h: &SourceHandle, mapper: &str) -> Result<()> {
    match mapper_for(&h.fstype) {
        Some(m) if m == mapper => Ok(()),
        Some(m) => Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "{} is on {}: map it with the {m} plugin, not {mapper}",
                h.frozen.display(),
                h.fstype
            ),
        )),
        None => Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "{} is on {}, which Floe cannot map (supported: ext4, ext3, ext2, xfs, btrfs)",
                h.frozen.display(),
                h.fstype
            ),
        )),
    }
}

/// How file system addresses become device extents.
pub trait Translate: Send + Sync {
    /// The device pieces of `[addr, addr+len)` in the file system's
    /// address space: `(device, device offset, length)`, in order, summing
    /// to `len`.
    fn translate(&self, addr: u64, len: u64) -> Result<Vec<(DeviceId, u64, u64)>>;
    /// What the translation itself depends on (btrfs: a digest of its
    /// chunk map and devices), part of every file's config id.
    fn epoch(&self) -> String {
        String::new()
    }
    /// The block devices its extents are on, to watch for writes
    /// ([`crate::watch`]); `None`: not known (then nothing is vouched for).
    fn watched(&self) -> Option<Vec<Watched>> {
        None
    }
}

/// A file system on one device (ext4, XFS): address = offset on it.
impl Translate for FsDevice {
    fn watched(&self) -> Option<Vec<Watched>> {
        Some(
            self.kernel
                .iter()
                .map(|&(dev, delta)| Watched {
                    device: self.id.clone(),
                    dev,
                    delta,
                })
                .collect(),
        )
    }

    fn translate(&self, addr: u64, len: u64) -> Result<Vec<(DeviceId, u64, u64)>> {
        let at = self.offset.checked_add(addr).ok_or_else(|| {
            Error::new(ErrorKind::InvalidMap, format!("address {addr} overflows"))
        })?;
        Ok(vec![(self.id.clone(), at, len)])
    }
}

/// Builds the translator for a source's file system.
pub type TranslatorFactory = fn(&SourceHandle) -> Result<Box<dyn Translate>>;

/// The regular files mapped, per image (its mapper's, until the mapper
/// is dropped with the image).
static MAPPED_FILES: std::sync::Mutex<BTreeMap<ImageId, ImageFiles>> =
    std::sync::Mutex::new(BTreeMap::new());

fn mapped_files() -> std::sync::MutexGuard<'static, BTreeMap<ImageId, ImageFiles>> {
    MAPPED_FILES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What is kept of each regular file an image's map holds: one record per
/// file, with neither its config id nor its extents cloned (at 70,000
/// files, the clones and a second map of inodes were a tenth of the
/// agent's CPU).
#[derive(Default)]
struct ImageFiles {
    files: ItemMap<MappedFile>,
    /// The devices [`Placed::Data`] extents name, by index.
    devices: Vec<DeviceId>,
    /// Bumped by every [`ImageFiles::record`].
    version: u64,
    /// Some item read from a device has extents not kept here (layered,
    /// or not a regular file): a watch of writes cannot vouch for it.
    unwatched: bool,
}

/// A regular file as mapped.
struct MappedFile {
    /// On ext2/3/4 sources, its (inode number, generation): the validity
    /// indicator of the same plugin opens it by handle instead of looking
    /// its path up again (the mapper opened it by inode number, so its
    /// names were never looked up: the checks would pay that instead).
    inode: Option<(u32, u32)>,
    /// Its extents, to answer a remap with only those that moved.
    placed: Box<[Placed]>,
}

/// A file's extent as mapped, in a few words. Inline and layered extents
/// are not kept: a remap hands them out again whatever they were.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placed {
    Data {
        logical: u64,
        length: u64,
        /// Index into [`ImageFiles::devices`].
        device: usize,
        start: u64,
        count: u64,
        block_size: u32,
    },
    Hole {
        logical: u64,
        length: u64,
    },
    Zero {
        logical: u64,
        length: u64,
    },
}

impl ImageFiles {
    /// `e` as kept, its device added to those known if `add` (else an
    /// extent on a device no kept extent is on is `None`: it moved).
    fn placed(&mut self, e: &MapExtent, add: bool) -> Option<Placed> {
        let (logical, length) = (e.logical.0, e.length.0);
        Some(match &e.kind {
            ExtentKind::Hole => Placed::Hole { logical, length },
            ExtentKind::Zero => Placed::Zero { logical, length },
            ExtentKind::Data(chain) if chain.layers.is_empty() => {
                let p = &chain.physical;
                let device = match self.devices.iter().position(|d| *d == p.device) {
                    Some(k) => k,
                    None if add => {
                        self.devices.push(p.device.clone());
                        self.devices.len() - 1
                    }
                    None => return None,
                };
                Placed::Data {
                    logical,
                    length,
                    device,
                    start: p.start.0,
                    count: p.count.0,
                    block_size: p.block_size.0,
                }
            }
            ExtentKind::Data(_) | ExtentKind::Inline(_) => return None,
        })
    }

    /// Keep a file's map (replacing what was kept of it).
    fn record(&mut self, item: &Item, inode: Option<(u32, u32)>) {
        self.version += 1;
        if item.extents.iter().any(|e| match &e.kind {
            ExtentKind::Data(c) => !c.layers.is_empty(),
            _ => false,
        }) {
            self.unwatched = true;
        }
        let placed = item
            .extents
            .iter()
            .filter_map(|e| self.placed(e, true))
            .collect();
        self.files
            .insert(item.id.clone(), MappedFile { inode, placed });
    }

    /// The extents of `fresh` that are not where the kept map of its item
    /// had them (all of them if none was kept).
    fn moved(&mut self, fresh: &Item) -> Vec<MapExtent> {
        let old = self.files.get(&fresh.id).map(|f| f.placed.clone());
        fresh
            .extents
            .iter()
            .filter(|e| match (&old, self.placed(e, false)) {
                (Some(old), Some(p)) => !old.contains(&p),
                _ => true,
            })
            .cloned()
            .collect()
    }
}

/// File systems whose files are opened by inode number and checked by
/// handle (ext2/3/4: a handle is the inode number and generation).
fn opens_by_inode(fstype: &str) -> bool {
    matches!(fstype, "ext4" | "ext3" | "ext2")
}

/// Inode number and generation of a regular file's config id
/// (`f:INO:GEN:…`), when both fit a 32-bit ext4 handle.
fn inode_of(config: &ConfigId) -> Option<(u32, u32)> {
    let mut f = config.as_str().strip_prefix("f:")?.split(':');
    let ino = f.next()?.parse().ok()?;
    let gen = f.next()?.parse().ok()?;
    Some((ino, gen))
}

/// The mapper.
pub struct FileMapper {
    translators: TranslatorFactory,
    /// A map being handed out in parts.
    parts: Option<Parts>,
    /// Entries per part.
    part_entries: usize,
    /// Images whose files this mapper put in [`MAPPED_FILES`].
    registered: Vec<ImageId>,
    /// Read the metadata of frozen ext2/3/4 file systems from their
    /// devices (plugin option `on_disk`, default on).
    on_disk: bool,
    /// Regular files mapped from the device, and those the device reader
    /// left to the kernel.
    on_disk_counts: (u64, u64),
    /// Watch the devices for writes from the map on (plugin option
    /// `watch_writes`, default on): see [`Mapper::untouched`].
    watch_writes: bool,
    /// Per image mapped while its writes were held, the watch of its
    /// devices (or why there is none).
    watches: HashMap<ImageId, Watching>,
}

/// An image's watch for writes to its mapped extents.
struct Watching {
    watch: std::result::Result<WriteWatch, String>,
    /// Why it vouches for nothing (logged once).
    blind: Option<String>,
    /// The files a write reached through one of their mapped extents.
    touched: std::collections::HashSet<ItemId, foldhash::fast::RandomState>,
    /// The mapped extents, sorted, as of [`ImageFiles::version`].
    index: Option<(u64, ExtentIndex)>,
}

/// Mapped device ranges, to find the files a write overlaps fast:
/// (device index in [`ImageFiles::devices`], first byte, end, file) sorted,
/// with the largest end so far on the same device at each position. A
/// file is its position in the iteration of [`ImageFiles::files`] (which
/// does not change while the map is not: the index is rebuilt when its
/// version moves); [`ExtentIndex::ids`] names the few a write reaches
/// (cloning every id up front cost the first write after the thaw 10–25
/// ms on a 70,000-file tree).
struct ExtentIndex {
    ranges: Vec<(usize, u64, u64, usize)>,
    max_end: Vec<u64>,
}

impl ExtentIndex {
    fn of(kept: &ImageFiles) -> ExtentIndex {
        let mut ranges: Vec<(usize, u64, u64, usize)> = Vec::new();
        for (file, f) in kept.files.values().enumerate() {
            ranges.extend(f.placed.iter().filter_map(|p| match *p {
                Placed::Data {
                    device,
                    start,
                    count,
                    block_size,
                    ..
                } => {
                    let bs = u64::from(block_size);
                    let a = start.saturating_mul(bs);
                    Some((device, a, a.saturating_add(count.saturating_mul(bs)), file))
                }
                Placed::Hole { .. } | Placed::Zero { .. } => None,
            }));
        }
        ranges.sort_unstable();
        let mut max_end = Vec::with_capacity(ranges.len());
        let mut prev: Option<(usize, u64)> = None;
        for &(d, _, end, _) in &ranges {
            let m = match prev {
                Some((pd, pm)) if pd == d => pm.max(end),
                _ => end,
            };
            max_end.push(m);
            prev = Some((d, m));
        }
        ExtentIndex { ranges, max_end }
    }

    /// The ids of `files` (positions [`ExtentIndex::of`] gave them) in
    /// `kept`, unchanged since: one walk of its keys for them all.
    fn ids<'k>(
        kept: &'k ImageFiles,
        files: &std::collections::BTreeSet<usize>,
    ) -> HashMap<usize, &'k ItemId> {
        let Some(&last) = files.last() else {
            return HashMap::new();
        };
        kept.files
            .keys()
            .enumerate()
            .take(last + 1)
            .filter(|(k, _)| files.contains(k))
            .collect()
    }

    /// Every mapped range on `device` that `[a, b)` overlaps: (first
    /// byte, end, file).
    fn overlaps(&self, device: usize, a: u64, b: u64) -> Vec<(u64, u64, usize)> {
        // Ranges of `device` starting before `b`, walked back while the
        // largest end so far still reaches past `a`.
        let lo = self.ranges.partition_point(|r| r.0 < device);
        let hi = self.ranges.partition_point(|r| (r.0, r.1) < (device, b));
        let mut out = Vec::new();
        for j in (lo..hi).rev() {
            if self.max_end[j] <= a {
                break;
            }
            let r = &self.ranges[j];
            if r.2 > a {
                out.push((r.1, r.2, r.3));
            }
        }
        out
    }
}

impl Drop for FileMapper {
    fn drop(&mut self) {
        let mut all = mapped_files();
        for image in &self.registered {
            all.remove(image);
        }
    }
}

fn block_size_for(at: u64, len: u64) -> u32 {
    for bs in [4096u32, 512] {
        if at.is_multiple_of(u64::from(bs)) && len.is_multiple_of(u64::from(bs)) {
            return bs;
        }
    }
    1
}

fn handles(image: &FrozenImage) -> Result<Vec<(SourceHandle, crate::source::SourceSpec)>> {
    image
        .items
        .iter()
        .map(|fi| {
            let h: SourceHandle = serde_json::from_value(fi.handle.clone()).map_err(|e| {
                Error::new(ErrorKind::Plugin, "malformed file system source handle")
                    .item(&fi.id)
                    .source(e)
            })?;
            let spec = parse_source(&h.spec)?;
            Ok((h, spec))
        })
        .collect()
}

/// The frozen path of an item id, and its source.
fn locate<'a>(
    hs: &'a [(SourceHandle, crate::source::SourceSpec)],
    item: &ItemId,
) -> Result<(
    &'a SourceHandle,
    &'a crate::source::SourceSpec,
    String,
    PathBuf,
)> {
    let p = Path::new(item.as_str());
    hs.iter()
        .filter_map(|(h, s)| {
            let rel = p.strip_prefix(&s.root).ok()?;
            let rel = rel.to_string_lossy().to_string();
            let rel = if rel.is_empty() { ".".to_string() } else { rel };
            let path = if rel == "." {
                h.frozen.clone()
            } else {
                h.frozen.join(&rel)
            };
            Some((h, s, rel, path))
        })
        .max_by_key(|(_, s, _, _)| s.root.as_os_str().len())
        .ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                "item is under none of the image's sources",
            )
            .item(item)
        })
}

/// Files reached through their directory's descriptor: the items of one
/// directory (a map's part, a check's batch: in inode order, so several
/// directories take turns) look their directory up once and each file by
/// its name, instead of walking the whole path per file (path walks were
/// a tenth of the agent's CPU on the 70,000-file tree). Like a path
/// lookup, only the last component is never followed if it is a symlink.
#[derive(Default)]
struct DirCache {
    dirs: HashMap<PathBuf, rustix::fd::OwnedFd>,
    /// Per frozen root of an ext2/3/4 source, a descriptor of it to open
    /// its files by inode ([`crate::sys::open_ext4_inode`]); `None`: by
    /// name.
    mounts: HashMap<PathBuf, Option<rustix::fd::OwnedFd>>,
    /// Opening by handle is refused here (no `CAP_DAC_READ_SEARCH`).
    no_handles: bool,
}

/// Directory descriptors a [`DirCache`] keeps open at most.
const DIRS_KEPT: usize = 256;

impl DirCache {
    /// The descriptor of `path`'s directory and its last component
    /// (`None`: a path without both, looked up whole).
    fn at<'a>(
        &mut self,
        path: &'a Path,
    ) -> std::io::Result<Option<(rustix::fd::BorrowedFd<'_>, &'a std::ffi::OsStr)>> {
        use rustix::fd::AsFd;
        use rustix::fs::{Mode, OFlags};
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Ok(None);
        };
        if parent.as_os_str().is_empty() {
            return Ok(None);
        }
        if !self.dirs.contains_key(parent) {
            if self.dirs.len() >= DIRS_KEPT {
                self.dirs.clear();
            }
            let fd = rustix::fs::open(
                parent,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            self.dirs.insert(parent.to_path_buf(), fd);
        }
        Ok(self.dirs.get(parent).map(|fd| (fd.as_fd(), name)))
    }

    /// [`open_file`] through the directory's descriptor.
    fn open(&mut self, path: &Path) -> std::io::Result<std::fs::File> {
        use rustix::fs::{Mode, OFlags};
        let Some((dir, name)) = self.at(path)? else {
            return open_file(path);
        };
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
        let fd = rustix::fs::openat(dir, name, flags | OFlags::NOATIME, Mode::empty())
            .or_else(|_| rustix::fs::openat(dir, name, flags, Mode::empty()))?;
        Ok(std::fs::File::from(fd))
    }

    /// Open a listed regular file of a frozen ext2/3/4 source (`root`, its
    /// frozen root) by its inode number, else by name: (the file, opened
    /// by inode). By inode no directory is searched (looking names up in
    /// directories read cold was a sixth of the agent's CPU on the
    /// 70,000-file tree); the caller checks the inode is the listed one.
    fn open_listed(
        &mut self,
        root: Option<&Path>,
        e: &Listed,
    ) -> std::io::Result<(std::fs::File, bool)> {
        if let (Some(root), Ok(ino)) = (root, u32::try_from(e.ino)) {
            if let Some(mount) = self.mount(root) {
                let opened = open_inode(mount, ino, 0);
                match opened {
                    Ok(fd) => return Ok((std::fs::File::from(fd), true)),
                    Err(err) if handles_refused(&err) => self.no_handles = true,
                    Err(_) => {} // this one by name (and its error, if any)
                }
            }
        }
        self.open(&e.path).map(|f| (f, false))
    }

    /// The descriptor to open files of the file system `root` is on by
    /// handle (`None`: not here).
    fn mount(&mut self, root: &Path) -> Option<rustix::fd::BorrowedFd<'_>> {
        use rustix::fd::AsFd;
        use rustix::fs::{Mode, OFlags};
        if self.no_handles {
            return None;
        }
        let mount = self.mounts.entry(root.to_path_buf()).or_insert_with(|| {
            // Not O_PATH: open_by_handle_at refuses those (EBADF).
            rustix::fs::open(
                root,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .ok()
        });
        mount.as_ref().map(AsFd::as_fd)
    }

    /// `lstat` through the directory's descriptor: (is a regular file,
    /// the config id it has if it is not one).
    fn lstat(&mut self, path: &Path) -> std::io::Result<(bool, ConfigId)> {
        use rustix::fs::{AtFlags, FileType};
        let st = match self.at(path)? {
            Some((dir, name)) => rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?,
            None => rustix::fs::lstat(path)?,
        };
        Ok((
            FileType::from_raw_mode(st.st_mode) == FileType::RegularFile,
            node_config_of(
                st.st_ino,
                st.st_ctime,
                i64::try_from(st.st_ctime_nsec).unwrap_or(0),
            ),
        ))
    }
}

/// [`crate::sys::open_ext4_inode`] to read (not following, not waiting,
/// without touching its access time where allowed).
fn open_inode(
    mount: rustix::fd::BorrowedFd<'_>,
    ino: u32,
    gen: u32,
) -> std::io::Result<rustix::fd::OwnedFd> {
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK;
    crate::sys::open_ext4_inode(mount, ino, gen, flags | libc::O_NOATIME).or_else(|err| {
        match err.raw_os_error() {
            Some(libc::EPERM) => crate::sys::open_ext4_inode(mount, ino, gen, flags),
            _ => Err(err),
        }
    })
}

/// Errors that say opening by handle does not work here at all.
fn handles_refused(err: &std::io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EPERM | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::EBADF)
    )
}

fn open_file(path: &Path) -> std::io::Result<std::fs::File> {
    let mut o = std::fs::OpenOptions::new();
    // O_NONBLOCK: a FIFO put in a regular file's place is not waited on.
    o.read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOATIME | libc::O_CLOEXEC | libc::O_NONBLOCK);
    o.open(path).or_else(|_| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path)
    })
}

/// Decimal digits of `n` after `s`. Config ids are built for every file
/// twice per backup (map and check); through `format!` they were a
/// twentieth of the agent's CPU on the 70,000-file tree.
fn push_u64(s: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b"0123456789"[usize::try_from(n % 10).unwrap_or(0)];
        n /= 10;
        if n == 0 {
            break;
        }
    }
    s.push_str(std::str::from_utf8(&digits[at..]).unwrap_or("0"));
}

/// `SECONDS.NANOSECONDS` (nine digits) of a change time, after `s`.
fn push_ctime(s: &mut String, secs: i64, nsec: i64) {
    if secs < 0 {
        s.push('-');
    }
    push_u64(s, secs.unsigned_abs());
    s.push('.');
    let nsec = u64::try_from(nsec).unwrap_or(0);
    let mut n = String::with_capacity(9);
    push_u64(&mut n, nsec);
    for _ in n.len()..9 {
        s.push('0');
    }
    s.push_str(&n);
}

/// The config id of a regular file from its stat, extents and the
/// translator's epoch: `f:INODE:GENERATION:SIZE:CTIME:DIGEST` + epoch.
fn file_config(
    meta: &std::fs::Metadata,
    gen: Option<u64>,
    ex: &[FiemapExtent],
    epoch: &str,
) -> ConfigId {
    file_config_of(
        &FileFacts {
            ino: meta.ino(),
            generation: gen,
            size: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        },
        ex,
        epoch,
    )
}

/// What a regular file's item and config id are made of besides its
/// extents, whether the kernel said it (`fstat`) or its device did.
struct FileFacts {
    ino: u64,
    generation: Option<u64>,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// [`file_config`] from a file's facts.
fn file_config_of(f: &FileFacts, ex: &[FiemapExtent], epoch: &str) -> ConfigId {
    let mut s = String::with_capacity(80 + epoch.len());
    s.push_str("f:");
    push_u64(&mut s, f.ino);
    s.push(':');
    push_u64(&mut s, f.generation.unwrap_or(0));
    s.push(':');
    push_u64(&mut s, f.size);
    s.push(':');
    push_ctime(&mut s, f.ctime.0, f.ctime.1);
    s.push(':');
    s.push_str(&extents_digest(ex));
    s.push_str(epoch);
    ConfigId::new(s)
}

/// The config id of anything but a regular file: `n:INODE:CTIME`.
fn node_config(meta: &std::fs::Metadata) -> ConfigId {
    node_config_of(meta.ino(), meta.ctime(), meta.ctime_nsec())
}

/// [`node_config`] from an inode number and change time.
fn node_config_of(ino: u64, ctime: i64, ctime_nsec: i64) -> ConfigId {
    let mut s = String::with_capacity(48);
    s.push_str("n:");
    push_u64(&mut s, ino);
    s.push(':');
    push_ctime(&mut s, ctime, ctime_nsec);
    ConfigId::new(s)
}

/// The part of a file's config id that says which version its content is
/// (inode, generation, size, ctime).
fn version_of(config: &ConfigId) -> Option<String> {
    let s = config.as_str();
    s.starts_with("f:")
        .then(|| s.split(':').take(5).collect::<Vec<_>>().join(":"))
}

/// Tests only: run once, for this path, between the stat of an opened
/// entry that was not a regular file and the `lstat` of its path (to swap
/// what is there).
#[cfg(test)]
type Swap = (PathBuf, Box<dyn FnOnce(&Path) + Send>);
#[cfg(test)]
static AFTER_OPEN_STAT: std::sync::Mutex<Option<Swap>> = std::sync::Mutex::new(None);

impl FileMapper {
    /// A mapper translating with `translators`.
    pub fn new(translators: TranslatorFactory) -> FileMapper {
        FileMapper {
            translators,
            parts: None,
            part_entries: PART_ENTRIES,
            registered: Vec::new(),
            on_disk: true,
            on_disk_counts: (0, 0),
            watch_writes: true,
            watches: HashMap::new(),
        }
    }

    /// Regular files the last map took from their device's metadata
    /// ([`crate::ondisk`]), and those it had to map through the kernel
    /// on a file system it read from the device (inline data, encryption,
    /// ext2/3 block maps…).
    pub fn on_disk_counts(&self) -> (u64, u64) {
        self.on_disk_counts
    }

    /// A mapper configured by its plugin config: `part_entries` (entries
    /// per part of the map, default [`PART_ENTRIES`]), `on_disk`
    /// (`false`: map frozen ext2/3/4 files through the kernel only) and
    /// `watch_writes` (`false`: after the thaw, check every file).
    pub fn configured(
        translators: TranslatorFactory,
        config: &serde_json::Value,
    ) -> Result<FileMapper> {
        let mut m = FileMapper::new(translators);
        if let Some(v) = config.get("part_entries") {
            m.part_entries = v
                .as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::Config,
                        format!("part_entries must be a positive number of entries, got {v}"),
                    )
                })?;
        }
        let flag = |name: &str| floe_core::abi::flag_option(config, name, name);
        if let Some(on) = flag("on_disk")? {
            m.on_disk = on;
        }
        if let Some(on) = flag("watch_writes")? {
            m.watch_writes = on;
        }
        Ok(m)
    }

    /// Map one listed entry; `link` is the first name of a file with
    /// several (this entry being another).
    fn map_entry(
        root: &Path,
        e: &Listed,
        tr: &dyn Translate,
        link: Option<&String>,
        sync: bool,
        dirs: &mut DirCache,
        by_inode: Option<&Path>,
    ) -> Result<Option<Item>> {
        let id = item_id(root, &e.rel);
        // The listing's stat, unless the entry turned out not to be what
        // it said.
        let mut listed = e.meta.as_ref();
        if link.is_none() && e.meta.as_ref().map_or(e.regular, |m| m.is_file()) {
            // A regular file is opened once: stat, extended attributes
            // and FIEMAP all through the descriptor.
            let (mut f, by_ino) = dirs
                .open_listed(by_inode, e)
                .map_err(|err| Error::io("open", err).item(&id).path(&e.path))?;
            let mut meta = f
                .metadata()
                .map_err(|err| Error::io("stat", err).item(&id).path(&e.path))?;
            if by_ino && (meta.ino(), meta.dev()) != (e.ino, e.dev) {
                // Not the listed inode (cannot happen while the file
                // system holds still): by name, as the listing saw it.
                f = dirs
                    .open(&e.path)
                    .map_err(|err| Error::io("open", err).item(&id).path(&e.path))?;
                meta = f
                    .metadata()
                    .map_err(|err| Error::io("stat", err).item(&id).path(&e.path))?;
            }
            if meta.is_file() {
                let file = capture_from(root, &e.rel, &e.path, &meta, XattrSource::File(&f))
                    .map_err(|err| Error::io("read metadata", err).item(&id).path(&e.path))?;
                return Self::map_file(&id, &e.path, &f, &meta, file, tr, sync).map(Some);
            }
            // Something else by now: taken as what it is.
            listed = None;
            #[cfg(test)]
            {
                let mut hook = AFTER_OPEN_STAT.lock().unwrap_or_else(|p| p.into_inner());
                if hook.as_ref().is_some_and(|(at, _)| *at == e.path) {
                    if let Some((at, swap)) = hook.take() {
                        swap(&at);
                    }
                }
            }
        }
        let stat;
        let meta = match listed {
            Some(m) => m,
            None => {
                stat = std::fs::symlink_metadata(&e.path)
                    .map_err(|err| Error::io("stat", err).item(&id).path(&e.path))?;
                &stat
            }
        };
        let Some(kind) = kind_of(meta) else {
            return Ok(None); // a socket: made by whoever listens on it
        };
        let mut file = capture(root, &e.rel, &e.path, meta)
            .map_err(|err| Error::io("read metadata", err).item(&id).path(&e.path))?;
        if kind == ItemKind::File {
            if let Some(first) = link {
                file.target = Some(first.clone());
                return Ok(Some(Item {
                    id,
                    kind: ItemKind::HardLink,
                    size: Bytes(0),
                    config: node_config(meta),
                    extents: Vec::new(),
                    meta: Default::default(),
                    file: Some(file),
                }));
            }
            // Not a regular file when opened, one now: never while the
            // image holds still.
            return Err(Error::new(
                ErrorKind::Unstable,
                "the file changed kind while it was being mapped",
            )
            .item(&id)
            .path(&e.path));
        }
        Ok(Some(Item {
            id,
            kind,
            size: Bytes(0),
            config: node_config(meta),
            extents: Vec::new(),
            meta: Default::default(),
            file: Some(file),
        }))
    }

    /// Map a regular file open as `f`: stat, FIEMAP, plan, translate,
    /// inline reads.
    fn map_file(
        id: &ItemId,
        path: &Path,
        f: &std::fs::File,
        meta: &std::fs::Metadata,
        file: FileMeta,
        tr: &dyn Translate,
        sync: bool,
    ) -> Result<Item> {
        let ex = fiemap(f, if sync { FIEMAP_FLAG_SYNC } else { 0 }).map_err(|e| {
            let kind = if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                ErrorKind::Unsupported
            } else {
                ErrorKind::Io
            };
            Error::new(
                kind,
                "FIEMAP failed: the file system cannot say where the file's blocks are",
            )
            .op("fiemap")
            .item(id)
            .path(path)
            .source(e)
        })?;
        let facts = FileFacts {
            ino: meta.ino(),
            generation: generation(f),
            size: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        };
        let read_inline = |logical: u64, length: u64| {
            let mut buf = vec![0u8; usize::try_from(length).unwrap_or(0)];
            std::os::unix::fs::FileExt::read_exact_at(f, &mut buf, logical).map(|()| buf)
        };
        Self::file_item(id, path, &facts, &ex, file, tr, &read_inline)
    }

    /// Map a listed regular file of a frozen ext2/3/4 file system from
    /// its device's metadata (`Unsupported`/malformed: the caller asks the
    /// kernel). The listing's inode must be a regular file in use.
    fn map_on_disk(
        root: &Path,
        e: &Listed,
        tr: &dyn Translate,
        disk: &crate::ondisk::Ext4Disk,
        reader: &mut crate::ondisk::InodeReader,
    ) -> Result<Item> {
        let id = item_id(root, &e.rel);
        let inode = reader.inode(disk, e.ino)?;
        if !inode.is_live_file() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "the listed inode is not a regular file in use",
            ));
        }
        inode.check_mappable()?;
        let ex = disk.extents(&inode)?;
        let xattrs = disk.xattrs(&inode, &mut reader.xattrs)?;
        let ts = |(sec, nsec): (i64, u32)| Timestamp { sec, nsec };
        let file = FileMeta {
            root: root.display().to_string(),
            path: e.rel.clone(),
            mode: u32::from(inode.mode),
            uid: inode.uid,
            gid: inode.gid,
            atime: ts(inode.atime),
            mtime: ts(inode.mtime),
            ctime: ts(inode.ctime),
            rdev: 0,
            target: None,
            xattrs,
            holes: Vec::new(),
        };
        let facts = FileFacts {
            ino: e.ino,
            generation: Some(u64::from(inode.generation)),
            size: inode.size,
            mtime: (inode.mtime.0, i64::from(inode.mtime.1)),
            ctime: (inode.ctime.0, i64::from(inode.ctime.1)),
        };
        let no_inline = |_: u64, _: u64| -> std::io::Result<Vec<u8>> {
            Err(std::io::Error::other("no inline data on the device path"))
        };
        Self::file_item(&id, &e.path, &facts, &ex, file, tr, &no_inline)
    }

    /// A regular file's item from its facts and FIEMAP extents: plan,
    /// translate, inline bytes through `read_inline(offset, length)`.
    fn file_item(
        id: &ItemId,
        path: &Path,
        facts: &FileFacts,
        ex: &[FiemapExtent],
        mut file: FileMeta,
        tr: &dyn Translate,
        read_inline: &dyn Fn(u64, u64) -> std::io::Result<Vec<u8>>,
    ) -> Result<Item> {
        let size = facts.size;
        let plan = plan_file(size, ex).map_err(|e| {
            Error::new(ErrorKind::Unstable, e.to_string())
                .item(id)
                .path(path)
        })?;
        let mut extents = Vec::with_capacity(plan.len());
        for piece in plan {
            match piece {
                FilePiece::Hole { logical, length } => {
                    file.holes.push([logical, length]);
                    extents.push(MapExtent {
                        logical: ItemOffset(logical),
                        length: Bytes(length),
                        kind: ExtentKind::Hole,
                    });
                }
                FilePiece::Zero { logical, length } => extents.push(MapExtent {
                    logical: ItemOffset(logical),
                    length: Bytes(length),
                    kind: ExtentKind::Zero,
                }),
                FilePiece::Inline { logical, length } => {
                    let buf = read_inline(logical, length)
                        .map_err(|e| Error::io("read inline data", e).item(id).path(path))?;
                    extents.push(MapExtent {
                        logical: ItemOffset(logical),
                        length: Bytes(length),
                        kind: ExtentKind::Inline(buf),
                    });
                }
                FilePiece::Data {
                    logical,
                    length,
                    physical,
                } => {
                    let mut at = logical;
                    for (device, dev_off, len) in tr.translate(physical, length)? {
                        let bs = block_size_for(dev_off, len);
                        extents.push(MapExtent {
                            logical: ItemOffset(at),
                            length: Bytes(len),
                            // The file layer is the item itself (its id and
                            // this extent's logical offset): not repeated
                            // in each of 70,000 maps.
                            kind: ExtentKind::Data(ExtentChain {
                                layers: Vec::new(),
                                physical: PhysicalExtent {
                                    device,
                                    start: Blocks(dev_off / u64::from(bs)),
                                    count: Blocks(len / u64::from(bs)),
                                    block_size: BlockSize(bs),
                                },
                            }),
                        });
                        at += len;
                    }
                }
            }
        }
        let ts = |(sec, nsec): (i64, i64)| Timestamp {
            sec,
            nsec: u32::try_from(nsec).unwrap_or(0),
        };
        file.mtime = ts(facts.mtime);
        file.ctime = ts(facts.ctime);
        let config = file_config_of(facts, ex, &tr.epoch());
        Ok(Item {
            id: id.clone(),
            kind: ItemKind::File,
            size: Bytes(size),
            config,
            extents,
            meta: Default::default(),
            file: Some(file),
        })
    }
}

/// An entry mapped: (its item, whether it is on an ext2/3/4 source:
/// opened by inode, and checked so; whether it was mapped from the
/// device's metadata — `None`: not tried, `Some(false)`: tried and left
/// to the kernel).
type Mapped = (Result<Option<Item>>, bool, Option<bool>);

/// Entries mapped per part of the map: the mover starts reading the first
/// part while the agent maps the next.
pub const PART_ENTRIES: usize = 4096;

/// Threads mapping a part: on a cold file system most of their time is
/// waiting for inode blocks (over a SAN, each read's latency), so more
/// than the cores (8 against 2 took the first part of the 70,000-file
/// tree at 0.2 ms per read from 0.31 to 0.25 s; no difference on a local
/// loop device).
const MAP_THREADS: usize = 8;

/// Entries mapped through the kernel per mapping thread, at least.
const KERNEL_ENTRIES_PER_THREAD: usize = 64;

/// A map being produced part by part: what the walks found and what is
/// left to map.
struct Parts {
    /// One translator per source (None: its file system is not mappable;
    /// its failure is in `first`).
    translators: Vec<Box<dyn Translate>>,
    /// Each source's root.
    roots: Vec<PathBuf>,
    /// Each source's frozen root and its device, where its files are
    /// opened by inode number (ext2/3/4).
    by_inode: Vec<Option<(PathBuf, u64)>>,
    /// Each source's device, where its files' metadata is read from it
    /// (ext2/3/4 whose writes its freezer holds).
    disks: Vec<Option<std::sync::Arc<crate::ondisk::Ext4Disk>>>,
    /// Entries left to map, in inode order: (source, entry, first name of
    /// a file with several, for its other names).
    todo: std::collections::VecDeque<(usize, Listed, Option<String>)>,
    /// Volumes and walk failures, handed out with the first part.
    first: Option<(Vec<Item>, Vec<ItemFailure>)>,
}

impl FileMapper {
    /// The image's watch with the writes queued since the last look taken
    /// in (the files they reached added to its `touched`); `None` while
    /// it vouches for nothing: the map is not whole yet, there is no
    /// watch, or it may have missed a write (for good).
    fn look(&mut self, image: &FrozenImage) -> Option<&mut Watching> {
        // Not before the whole map is made (its extents are not all known).
        if self.parts.is_some() {
            return None;
        }
        let w = self.watches.get_mut(&image.id)?;
        if w.blind.is_some() {
            return None;
        }
        let watch = w.watch.as_mut().ok()?;
        let blind = match watch.writes() {
            Ok(writes) if writes.is_empty() => None,
            Ok(writes) => {
                let all = mapped_files();
                let empty = ImageFiles::default();
                let kept = all.get(&image.id).unwrap_or(&empty);
                if kept.unwatched {
                    Some("some extents are not the watch's to vouch for".to_string())
                } else {
                    if w.index.as_ref().is_none_or(|(v, _)| *v != kept.version) {
                        w.index = Some((kept.version, ExtentIndex::of(kept)));
                    }
                    let index = &w.index.as_ref().expect("built above").1;
                    let mut hits = Vec::new();
                    for &(k, a, b) in &writes {
                        let device = &watch.devices()[k].device;
                        let Some(d) = kept.devices.iter().position(|x| x == device) else {
                            continue;
                        };
                        hits.extend(
                            index
                                .overlaps(d, a, b)
                                .into_iter()
                                .map(|(s, e, file)| (device, a, b, s, e, file)),
                        );
                    }
                    let ids = ExtentIndex::ids(kept, &hits.iter().map(|h| h.5).collect());
                    for (device, a, b, s, e, file) in hits {
                        let Some(&file) = ids.get(&file) else {
                            continue;
                        };
                        if w.touched.is_empty() {
                            floe_core::log_line!(
                                "floe agent: the watch of writes saw a write to bytes {a}..{b} of {device} reach the mapped extent {s}..{e} of {file}: the files writes reach are checked from now on, the others stay vouched for"
                            );
                        }
                        if !w.touched.contains(file) {
                            w.touched.insert(file.clone());
                        }
                    }
                    None
                }
            }
            Err(why) => Some(why),
        };
        if let Some(why) = blind {
            floe_core::log_line!(
                "floe agent: the watch of writes stops vouching for the map ({why}): files are checked one by one from now on"
            );
            w.blind = Some(why);
            return None;
        }
        Some(w)
    }

    /// Start watching the devices of every source walked, before any
    /// file's extents are mapped (its writes are held meanwhile).
    fn watch(parts: &Parts) -> std::result::Result<WriteWatch, String> {
        let read_whole = parts
            .first
            .as_ref()
            .is_some_and(|(items, _)| !items.is_empty());
        if read_whole {
            return Err("a volume is read whole".into());
        }
        let mut devices = Vec::new();
        for tr in &parts.translators {
            devices.extend(
                tr.watched()
                    .ok_or("this file system's devices are not known to the watch")?,
            );
        }
        WriteWatch::start(devices)
    }

    /// Walk every source of `image` (the part that cannot be split).
    fn walk_all(&self, image: &FrozenImage) -> Result<Parts> {
        let hs = handles(image)?;
        let mut parts = Parts {
            translators: Vec::new(),
            roots: Vec::new(),
            by_inode: Vec::new(),
            disks: Vec::new(),
            todo: std::collections::VecDeque::new(),
            first: None,
        };
        let (mut items, mut failures) = (Vec::new(), Vec::new());
        // An entry two sources (or two paths of one) share is mapped once.
        // (A lone tree lists each entry once: nothing to look up.)
        let mut seen: std::collections::HashSet<ItemId, foldhash::fast::RandomState> =
            Default::default();
        let lone_tree =
            hs.len() == 1 && hs.iter().all(|(_, s)| matches!(s.select, Selection::Tree));
        for (h, spec) in &hs {
            let tr = match (self.translators)(h) {
                Ok(t) => t,
                Err(e) => {
                    // A file system this mapper cannot map: the source
                    // fails, the other sources of the set go on.
                    failures.push(ItemFailure {
                        item: item_id(&spec.root, "."),
                        error: e.to_string(),
                    });
                    continue;
                }
            };
            if let Some(mode) = h.volume {
                // A volume is all or nothing: the backup fails.
                items.push(crate::volume::map_volume(h, mode, tr.as_ref())?);
                continue;
            }
            let w = list_skipping(spec, &h.frozen, &h.skip);
            failures.extend(w.failures);
            let source = parts.translators.len();
            parts.translators.push(tr);
            parts.roots.push(spec.root.clone());
            let by_inode = opens_by_inode(&h.fstype)
                .then(|| std::fs::metadata(&h.frozen).ok())
                .flatten()
                .map(|m| (h.frozen.clone(), m.dev()));
            // Its metadata from its device while its writes are held
            // (frozen); else (or when the device cannot be read) through
            // the kernel.
            let disk = by_inode
                .as_ref()
                .filter(|_| self.on_disk && image.writes_held)
                .and_then(|(dir, dev)| match crate::ondisk::Ext4Disk::open(*dev)
                    .and_then(|d| d.acls_as_mounted(dir))
                {
                    Ok(d) => Some(std::sync::Arc::new(d)),
                    Err(e) => {
                        floe_core::log_line!(
                            "floe agent: fiemap: {}: metadata through the kernel, not from the device: {e}",
                            h.frozen.display()
                        );
                        None
                    }
                });
            parts.by_inode.push(by_inode);
            parts.disks.push(disk);
            for e in w.listed {
                if lone_tree || seen.insert(item_id(&spec.root, &e.rel)) {
                    parts.todo.push_back((source, e, None));
                }
            }
        }
        // Parts in inode order: on ext4 and XFS an inode's number says
        // its group, and its data mostly lives in that group, so each part
        // covers one region of the disk (the mover sorts within a part)
        // and its inode blocks are read in order. The names of a file
        // with several come next to each other, in walk order (a path's
        // components compare as a walk in name order meets them): the
        // first is the one mapped, the others link to it.
        parts
            .todo
            .make_contiguous()
            .sort_by(|(_, a, _), (_, b, _)| {
                (a.dev, a.ino)
                    .cmp(&(b.dev, b.ino))
                    .then_with(|| Path::new(&a.rel).cmp(Path::new(&b.rel)))
            });
        let mut first: Option<(u64, u64, &String)> = None;
        for (_, e, link) in parts.todo.iter_mut() {
            let directory = e.meta.as_deref().is_some_and(std::fs::Metadata::is_dir);
            match first {
                Some((dev, ino, name)) if (dev, ino) == (e.dev, e.ino) && !directory => {
                    *link = Some(name.clone());
                }
                _ => first = (!directory).then_some((e.dev, e.ino, &e.rel)),
            }
        }
        parts.first = Some((items, failures));
        Ok(parts)
    }

    /// Map the next `part_entries` entries: stat, xattrs and FIEMAP on
    /// [`MAP_THREADS`] threads.
    fn map_next(&mut self, image: &FrozenImage) -> Result<MapPart> {
        if self.parts.is_none() {
            self.on_disk_counts = (0, 0);
            let parts = self.walk_all(image)?;
            // Only once nothing can be in flight to what is mapped: its
            // writes are held while it is mapped (FIFREEZE), or its files
            // are a snapshot's or clones (copy on write: a write to the
            // live files goes elsewhere; the snapshot was made after every
            // write to them had landed).
            let quiet = image.writes_held
                || handles(image)
                    .is_ok_and(|hs| !hs.is_empty() && hs.iter().all(|(h, _)| h.snapshot));
            if self.watch_writes && quiet && !self.watches.contains_key(&image.id) {
                let watch = Self::watch(&parts);
                if let Err(why) = &watch {
                    floe_core::log_line!(
                        "floe agent: writes to the mapped extents are not watched ({why}): after the thaw every file is checked"
                    );
                }
                self.watches.insert(
                    image.id.clone(),
                    Watching {
                        watch,
                        blind: None,
                        touched: Default::default(),
                        index: None,
                    },
                );
            }
            self.parts = Some(parts);
        } else {
            floe_core::media::pausepoint("map-part");
        }
        let parts = self.parts.as_mut().expect("walked above");
        let (mut items, mut failures) = parts.first.take().unwrap_or_default();
        let n = parts.todo.len().min(self.part_entries);
        let todo: Vec<(usize, Listed, Option<String>)> = parts.todo.drain(..n).collect();
        let later = parts.todo.len();
        // A device whose journal is no longer written back (thawed under
        // the map) is not read from again.
        for disk in &mut parts.disks {
            if disk.as_ref().is_some_and(|d| d.still_flushed().is_err()) {
                *disk = None;
            }
        }
        let (translators, roots, by_inode) = (&parts.translators, &parts.roots, &parts.by_inode);
        let disks = &parts.disks;
        // Where an entry is: its root, translator, and the frozen root of
        // its file system when its files are opened by inode (ext2/3/4).
        let place = |(source, e, _): &(usize, Listed, Option<String>)| {
            let frozen = by_inode[*source]
                .as_ref()
                .filter(|(_, dev)| *dev == e.dev)
                .map(|(frozen, _)| frozen.as_path());
            (&roots[*source], translators[*source].as_ref(), frozen)
        };
        // First, on this thread, the regular files of file systems read
        // from their devices: decoding, with a read per 1,024 inodes —
        // nothing worth waiting for on several threads.
        let mut reader = crate::ondisk::InodeReader::default();
        let mut done: Vec<Option<Mapped>> = Vec::with_capacity(todo.len());
        let mut kernel: Vec<(usize, Option<bool>)> = Vec::new();
        for (k, entry) in todo.iter().enumerate() {
            let (source, e, link) = entry;
            let (root, tr, frozen) = place(entry);
            let regular = link.is_none() && e.meta.as_ref().map_or(e.regular, |m| m.is_file());
            let disk = disks[*source]
                .as_deref()
                .filter(|_| frozen.is_some() && regular);
            let tried = match disk.map(|d| Self::map_on_disk(root, e, tr, d, &mut reader)) {
                Some(Ok(item)) => {
                    done.push(Some((Ok(Some(item)), true, Some(true))));
                    continue;
                }
                Some(Err(_)) => Some(false),
                None => None,
            };
            done.push(None);
            kernel.push((k, tried));
        }
        // Then everything else through the kernel: on up to MAP_THREADS
        // threads, one per KERNEL_ENTRIES_PER_THREAD entries (a thread's
        // start and end cost the allocator a scan of what it leaves).
        let threads = kernel
            .len()
            .div_ceil(KERNEL_ENTRIES_PER_THREAD)
            .clamp(1, MAP_THREADS);
        let chunk = kernel.len().div_ceil(threads).max(1);
        let todo = &todo;
        let map_kernel = |part: &[(usize, Option<bool>)]| -> Vec<(usize, Mapped)> {
            let mut dirs = DirCache::default();
            part.iter()
                .map(|&(k, tried)| {
                    let (_, e, link) = &todo[k];
                    let (root, tr, frozen) = place(&todo[k]);
                    let item = Self::map_entry(root, e, tr, link.as_ref(), true, &mut dirs, frozen);
                    (k, (item, frozen.is_some(), tried))
                })
                .collect()
        };
        let mapped: Vec<Vec<(usize, Mapped)>> = if threads == 1 {
            vec![map_kernel(&kernel)]
        } else {
            std::thread::scope(|sc| {
                // A mapping thread that panicked loses nothing silently:
                // the map fails.
                let handles: Vec<_> = kernel
                    .chunks(chunk)
                    .map(|part| sc.spawn(move || map_kernel(part)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .map_err(|_| Error::new(ErrorKind::Plugin, "a mapping thread panicked"))
                    })
                    .collect::<Result<Vec<_>>>()
            })?
        };
        for (k, m) in mapped.into_iter().flatten() {
            done[k] = Some(m);
        }
        let mut all = mapped_files();
        let kept = all.entry(image.id.clone()).or_default();
        // Room for every entry still to map, once: grown by doubling, the
        // kept files were rehashed into fresh memory again and again (a
        // twentieth of the agent's CPU on the 70,000-file tree).
        let left = todo.len() + later;
        if kept.files.capacity() - kept.files.len() < left {
            kept.files.reserve(left);
        }
        let mut recorded = false;
        for (k, m) in done.into_iter().enumerate() {
            let Some((r, ext, on_disk)) = m else {
                return Err(Error::new(
                    ErrorKind::Plugin,
                    "an entry of the map's part was not mapped",
                ));
            };
            match on_disk {
                Some(true) => self.on_disk_counts.0 += 1,
                Some(false) => self.on_disk_counts.1 += 1,
                None => {}
            }
            match r {
                Ok(Some(item)) => {
                    if item.kind == ItemKind::File {
                        kept.record(&item, inode_of(&item.config).filter(|_| ext));
                        recorded = true;
                    } else if item
                        .extents
                        .iter()
                        .any(|e| matches!(e.kind, ExtentKind::Data(_)))
                    {
                        kept.unwatched = true;
                    }
                    items.push(item);
                }
                Ok(None) => {}
                Err(err) => failures.push(ItemFailure {
                    item: item_id(&roots[todo[k].0], &todo[k].1.rel),
                    error: err.to_string(),
                }),
            }
        }
        if recorded && !self.registered.contains(&image.id) {
            self.registered.push(image.id.clone());
        }
        drop(all);
        let more = self.parts.as_ref().is_some_and(|p| !p.todo.is_empty());
        if !more {
            let (disk, kernel) = self.on_disk_counts;
            if disk + kernel > 0 {
                let files = if disk == 1 { "file" } else { "files" };
                floe_core::log_line!(
                    "floe agent: fiemap: {disk} {files} mapped from their device's metadata, {kernel} through the kernel"
                );
            }
            self.parts = None;
        }
        Ok(MapPart {
            map: ImageMap {
                image: image.id.clone(),
                items,
                failures,
            },
            more,
        })
    }
}

impl Mapper for FileMapper {
    fn map(&mut self, image: &FrozenImage) -> Result<ImageMap> {
        // The whole map: every part, from a fresh walk.
        self.parts = None;
        let mut all = ImageMap {
            image: image.id.clone(),
            items: Vec::new(),
            failures: Vec::new(),
        };
        loop {
            let part = self.map_next(image)?;
            all.items.extend(part.map.items);
            all.failures.extend(part.map.failures);
            if !part.more {
                return Ok(all);
            }
        }
    }

    fn map_part(&mut self, image: &FrozenImage) -> Result<MapPart> {
        self.map_next(image).inspect_err(|_| self.parts = None)
    }

    fn untouched(&mut self, image: &FrozenImage) -> Result<bool> {
        Ok(self.look(image).is_some_and(|w| w.touched.is_empty()))
    }

    fn touched(&mut self, image: &FrozenImage, items: &[ItemId]) -> Result<Option<Vec<bool>>> {
        Ok(self
            .look(image)
            .map(|w| items.iter().map(|i| w.touched.contains(i)).collect()))
    }

    fn remap(&mut self, image: &FrozenImage, item: &ItemId, since: &ConfigId) -> Result<Remap> {
        let hs = handles(image)?;
        let (h, spec, rel, path) = locate(&hs, item)?;
        if h.volume.is_some() {
            let now = crate::volume::volume_config(&h.frozen);
            if &now == since {
                return Ok(Remap {
                    item: item.clone(),
                    config: now,
                    extents: Vec::new(),
                    after_freeze: false,
                    size: None,
                    file: None,
                });
            }
            return Err(Error::new(
                ErrorKind::Unstable,
                "the file system was thawed before its volume was read: the image would not be of one point in time (raise fsflush.freeze_timeout)",
            )
            .item(item));
        }
        let meta = std::fs::symlink_metadata(&path).map_err(|e| {
            Error::new(
                ErrorKind::NotFound,
                format!("the file vanished after the frozen point: {e}"),
            )
            .item(item)
            .path(&path)
        })?;
        if !meta.is_file() {
            return Err(Error::new(
                ErrorKind::Unstable,
                "the file was replaced by something else after the frozen point",
            )
            .item(item)
            .path(&path));
        }
        let tr = (self.translators)(h)?;
        let f = open_file(&path).map_err(|e| Error::io("open", e).item(item).path(&path))?;
        let meta = f
            .metadata()
            .map_err(|e| Error::io("stat", e).item(item).path(&path))?;
        let file = capture_from(&spec.root, &rel, &path, &meta, XattrSource::File(&f))
            .map_err(|e| Error::io("read metadata", e).item(item).path(&path))?;
        let fresh = Self::map_file(item, &path, &f, &meta, file, tr.as_ref(), true)?;
        // Kept from now on as just mapped (and checked as the inode just
        // mapped); what moved, against what was kept.
        let moved = {
            let mut all = mapped_files();
            let kept = all.entry(image.id.clone()).or_default();
            let moved = kept.moved(&fresh);
            kept.record(
                &fresh,
                inode_of(&fresh.config).filter(|_| opens_by_inode(&h.fstype)),
            );
            moved
        };
        if !self.registered.contains(&image.id) {
            self.registered.push(image.id.clone());
        }
        let same_version =
            version_of(since).is_some() && version_of(since) == version_of(&fresh.config);
        if same_version {
            // Same content, moved blocks (defrag, balance): only the
            // extents that differ.
            return Ok(Remap {
                item: item.clone(),
                config: fresh.config,
                extents: moved,
                after_freeze: false,
                size: None,
                file: None,
            });
        }
        if h.snapshot {
            return Err(Error::new(
                ErrorKind::Unstable,
                "the frozen copy of the file changed: the snapshot is not holding",
            )
            .item(item)
            .path(&path));
        }
        // Flush-only: the old version is gone; the newer one, whole.
        Ok(Remap {
            item: item.clone(),
            config: fresh.config,
            extents: fresh.extents,
            after_freeze: true,
            size: Some(fresh.size),
            file: fresh.file,
        })
    }
}

/// The validity indicator: recomputes config ids from the file system.
pub struct FileValidity {
    translators: TranslatorFactory,
}

impl FileValidity {
    /// A validity indicator whose config ids agree with a [`FileMapper`]
    /// using the same translators.
    pub fn new(translators: TranslatorFactory) -> FileValidity {
        FileValidity { translators }
    }

    fn one(
        translators: TranslatorFactory,
        hs: &[(SourceHandle, crate::source::SourceSpec)],
        epochs: &mut HashMap<PathBuf, String>,
        dirs: &mut DirCache,
        item: &ItemId,
        inode: Option<(u32, u32)>,
    ) -> Result<ConfigId> {
        let (h, _, _, path) = locate(hs, item)?;
        if h.volume.is_some() {
            return Ok(crate::volume::volume_config(&h.frozen));
        }
        let mut epoch = |h: &SourceHandle| -> Result<String> {
            Ok(match epochs.get(&h.frozen) {
                Some(e) => e.clone(),
                None => {
                    let e = (translators)(h)?.epoch();
                    epochs.insert(h.frozen.clone(), e.clone());
                    e
                }
            })
        };
        // A file the mapper opened by inode: the same inode, by handle
        // (its generation checked by the file system). Another file put
        // at its path since does not change what was read of this one;
        // an inode deleted (or deleted and reused) is gone.
        if let Some((ino, gen)) = inode {
            if let Some(mount) = dirs.mount(&h.frozen) {
                match open_inode(mount, ino, gen) {
                    Ok(fd) => {
                        let f = std::fs::File::from(fd);
                        let meta = f.metadata().map_err(|e| Error::io("stat", e).item(item))?;
                        let ex = fiemap(&f, 0)
                            .map_err(|e| Error::io("fiemap", e).item(item).path(&path))?;
                        // A handle's generation (unless 0, "any") is the
                        // inode's: the file system refused any other.
                        let gen = match gen {
                            0 => generation(&f),
                            g => Some(u64::from(g)),
                        };
                        return Ok(file_config(&meta, gen, &ex, &epoch(h)?));
                    }
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ESTALE | libc::ENOENT)) => {
                        return Ok(ConfigId::new(format!("gone:{e}")));
                    }
                    Err(e) if handles_refused(&e) => dirs.no_handles = true,
                    Err(_) => {} // by path
                }
            }
        }
        match dirs.lstat(&path) {
            Ok((true, _)) => {}
            Ok((false, node)) => return Ok(node),
            Err(e) => return Ok(ConfigId::new(format!("gone:{e}"))),
        }
        let f = match dirs.open(&path) {
            Ok(f) => f,
            Err(e) => return Ok(ConfigId::new(format!("gone:{e}"))),
        };
        let meta = f.metadata().map_err(|e| Error::io("stat", e).item(item))?;
        let ex = fiemap(&f, 0).map_err(|e| Error::io("fiemap", e).item(item).path(&path))?;
        Ok(file_config(&meta, generation(&f), &ex, &epoch(h)?))
    }
}

/// Threads a batch of config checks is spread over.
const CHECK_THREADS: usize = 4;
/// Checks a thread is given at least (fewer are not worth a thread).
const CHECK_MIN_PER_THREAD: usize = 64;

/// The inodes the mapper registered for `items` of `image`, in order.
fn registered_inodes(image: &ImageId, items: &[ItemId]) -> Vec<Option<(u32, u32)>> {
    let all = mapped_files();
    let Some(kept) = all.get(image) else {
        return vec![None; items.len()];
    };
    items
        .iter()
        .map(|i| kept.files.get(i).and_then(|f| f.inode))
        .collect()
}

impl ValidityIndicator for FileValidity {
    fn config_id(&mut self, image: &FrozenImage, item: &ItemId) -> Result<ConfigId> {
        self.config_ids(image, std::slice::from_ref(item))?
            .pop()
            .ok_or_else(|| Error::new(ErrorKind::Plugin, "no config id").item(item))
    }
    fn config_ids(&mut self, image: &FrozenImage, items: &[ItemId]) -> Result<Vec<ConfigId>> {
        let hs = std::sync::Arc::new(handles(image)?);
        let inodes = registered_inodes(&image.id, items);
        let translators = self.translators;
        let check = move |hs: &[(SourceHandle, crate::source::SourceSpec)],
                          mut epochs: HashMap<PathBuf, String>,
                          items: &[ItemId],
                          inodes: &[Option<(u32, u32)>]|
              -> Vec<Result<ConfigId>> {
            let mut dirs = DirCache::default();
            items
                .iter()
                .zip(inodes)
                .map(|(i, inode)| Self::one(translators, hs, &mut epochs, &mut dirs, i, *inode))
                .collect()
        };
        // A batch's files are looked at on a few threads: each look is a
        // kernel's inode set-up and FIEMAP (and, on a SAN, a read of an
        // inode that waits), and the mover waits for the batch's answer.
        // This thread takes the first share, the pool's threads the rest.
        let per = items
            .len()
            .div_ceil(CHECK_THREADS)
            .max(CHECK_MIN_PER_THREAD);
        if items.len() <= per {
            return check(&hs, HashMap::new(), items, &inodes)
                .into_iter()
                .collect();
        }
        // Each source's translator epoch once, not once per share (btrfs
        // reads its chunk tree for it); one that fails is left to the
        // shares, which fail its items.
        let epochs: HashMap<PathBuf, String> = hs
            .iter()
            .filter(|(h, _)| h.volume.is_none())
            .filter_map(|(h, _)| Some((h.frozen.clone(), translators(h).ok()?.epoch())))
            .collect();
        let mut shares = Vec::new();
        for (k, (i, n)) in items
            .chunks(per)
            .zip(inodes.chunks(per))
            .enumerate()
            .skip(1)
        {
            let (tx, rx) = std::sync::mpsc::channel();
            let (hs, e, i, n) = (hs.clone(), epochs.clone(), i.to_vec(), n.to_vec());
            check_pool().run(Box::new(move || {
                let _ = tx.send(check(&hs, e, &i, &n));
            }));
            shares.push((k, rx));
        }
        let mut results = check(&hs, epochs, &items[..per], &inodes[..per]);
        for (k, rx) in shares {
            match rx.recv() {
                Ok(r) => results.extend(r),
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::Plugin,
                        format!("the check thread of share {k} of the batch panicked"),
                    ))
                }
            }
        }
        results.into_iter().collect()
    }
}

/// A check share's work.
type CheckJob = Box<dyn FnOnce() + Send>;

/// Threads that run shares of config checks, for the life of the process:
/// threads made and ended per batch cost their allocator's clean-up each
/// time (a hundred batches per 70,000-file backup).
struct CheckPool {
    jobs: std::sync::Mutex<std::sync::mpsc::Sender<CheckJob>>,
}

impl CheckPool {
    fn new() -> CheckPool {
        let (tx, rx) = std::sync::mpsc::channel::<CheckJob>();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        for _ in 1..CHECK_THREADS {
            let rx = rx.clone();
            // A pool that cannot grow runs its shares on the caller's
            // thread (see `run`).
            let _ = std::thread::Builder::new()
                .name("floe-check".into())
                .spawn(move || loop {
                    let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    };
                    // A panic drops the share's answer (the caller names it).
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                });
        }
        CheckPool {
            jobs: std::sync::Mutex::new(tx),
        }
    }

    /// Run `job` on a pool thread (on this one if the pool has none).
    fn run(&self, job: CheckJob) {
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job);
        if let Err(std::sync::mpsc::SendError(job)) = sent {
            job();
        }
    }
}

fn check_pool() -> &'static CheckPool {
    static POOL: std::sync::OnceLock<CheckPool> = std::sync::OnceLock::new();
    POOL.get_or_init(CheckPool::new)
}

/// Define and export a file mapper plugin: its name and the translator of
/// file system addresses to device extents (the only things the `fiemap`
/// and `btrfs` plugins differ in).
#[macro_export]
macro_rules! file_mapper_plugin {
    ($plugin:ident, $name:expr, $translator:path) => {
        /// The plugin.
        pub struct $plugin;

        impl floe_core::abi::Plugin for $plugin {
            fn info() -> floe_core::abi::PluginInfo {
                floe_core::abi::PluginInfo {
                    name: $name.into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    interfaces: vec![
                        floe_core::abi::Interface::Mapper,
                        floe_core::abi::Interface::Validity,
                    ],
                    sequential_media: false,
                    path_order: false,
                }
            }
            fn mapper(
                config: &serde_json::Value,
            ) -> floe_core::error::Result<Box<dyn floe_core::abi::Mapper>> {
                Ok(Box::new($crate::mapper::FileMapper::configured(
                    $translator,
                    config,
                )?))
            }
            fn validity(
                _config: &serde_json::Value,
            ) -> floe_core::error::Result<Box<dyn floe_core::abi::ValidityIndicator>> {
                Ok(Box::new($crate::mapper::FileValidity::new($translator)))
            }
        }

        floe_core::export_plugin!($plugin);
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn digits_are_to_string_s(n in any::<u64>()) {
            let mut s = String::from("x");
            push_u64(&mut s, n);
            prop_assert_eq!(s, format!("x{n}"));
        }
    }

    /// A translator nothing is mapped with.
    fn no_translator(_: &SourceHandle) -> Result<Box<dyn Translate>> {
        Ok(Box::new(NoBlocks))
    }

    #[test]
    fn plugin_options_are_checked_and_named_when_wrong() {
        let m = |c: serde_json::Value| FileMapper::configured(no_translator, &c);
        let ok = m(serde_json::json!({"part_entries": "100", "on_disk": "false"})).unwrap();
        assert_eq!((ok.part_entries, ok.on_disk), (100, false));
        let ok = m(serde_json::json!({"on_disk": true})).unwrap();
        assert!(ok.on_disk && ok.part_entries == PART_ENTRIES);
        for (bad, says) in [
            (
                serde_json::json!({"part_entries": 0}),
                "part_entries must be",
            ),
            (
                serde_json::json!({"on_disk": "maybe"}),
                "on_disk must be true or false, got \"maybe\"",
            ),
        ] {
            let err = m(bad).err().expect("a wrong option was taken");
            assert_eq!(err.kind(), ErrorKind::Config);
            assert!(err.to_string().contains(says), "{err}");
        }
    }

    #[test]
    fn the_inode_of_a_file_config_is_its_number_and_generation() {
        let c = |s: &str| ConfigId::new(s);
        assert_eq!(
            inode_of(&c("f:12:3405691582:5000:1.000000001:ab")),
            Some((12, 3405691582))
        );
        // Not a regular file's, or numbers a 32-bit handle cannot carry.
        assert_eq!(inode_of(&c("n:12:1.5")), None);
        assert_eq!(inode_of(&c("f:4294967296:1:0:0.0:x")), None);
        assert_eq!(inode_of(&c("f:12")), None);
        assert_eq!(inode_of(&c("gone:No such file")), None);
    }

    /// A translator for entries that never get as far as their blocks.
    struct NoBlocks;
    impl Translate for NoBlocks {
        fn translate(&self, _: u64, _: u64) -> Result<Vec<(DeviceId, u64, u64)>> {
            Err(Error::new(ErrorKind::InvalidMap, "no blocks in this test"))
        }
    }

    /// Map an entry opened by name, without a sync.
    fn map_by_name(root: &Path, e: &Listed) -> Result<Option<Item>> {
        FileMapper::map_entry(
            root,
            e,
            &NoBlocks,
            None,
            false,
            &mut DirCache::default(),
            None,
        )
    }

    /// An entry the listing saw as a regular file, by its directory entry.
    fn listed_regular(root: &Path, rel: &str) -> Listed {
        let path = root.join(rel);
        Listed {
            rel: rel.into(),
            ino: 0,
            dev: 0,
            meta: None,
            regular: true,
            path,
        }
    }

    #[test]
    fn an_entry_that_is_no_longer_a_file_is_taken_as_what_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // Listed as a file; a directory by the time it is mapped.
        std::fs::create_dir(root.join("was-file")).unwrap();
        let e = listed_regular(root, "was-file");
        let item = map_by_name(root, &e).unwrap().unwrap();
        assert_eq!(item.kind, ItemKind::Directory);
        assert_eq!(item.id, item_id(root, "was-file"));
    }

    #[test]
    fn a_file_that_changes_kind_twice_while_mapped_fails_as_unstable() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        // A directory when opened and stat'ed through its descriptor, a
        // regular file again when its path is looked at: neither what was
        // opened nor what is there now can be trusted as the frozen one.
        std::fs::create_dir(root.join("f")).unwrap();
        *AFTER_OPEN_STAT.lock().unwrap() = Some((
            root.join("f"),
            Box::new(|p: &Path| {
                std::fs::remove_dir(p).unwrap();
                std::fs::write(p, b"a file again").unwrap();
            }),
        ));
        let e = listed_regular(&root, "f");
        let r = map_by_name(&root, &e);
        let hook_left = AFTER_OPEN_STAT.lock().unwrap().take().is_some();
        assert!(!hook_left, "the swap did not run");
        let err = r.expect_err("a file that changed kind twice was mapped");
        assert_eq!(err.kind(), ErrorKind::Unstable, "{err}");
        let text = err.to_string();
        assert!(
            text.contains("changed kind while it was being mapped"),
            "{text}"
        );
        assert!(
            text.contains(&root.join("f").display().to_string()),
            "{text}"
        );
    }

    #[test]
    fn files_through_their_directory_are_the_files_at_their_paths() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(a.join("f"), b"in a").unwrap();
        std::fs::write(b.join("f"), b"in b").unwrap();
        std::os::unix::fs::symlink("f", a.join("link")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            a.join("fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let mut dirs = DirCache::default();
        for p in [a.join("f"), b.join("f"), a.join("f")] {
            let mut got = String::new();
            std::io::Read::read_to_string(&mut dirs.open(&p).unwrap(), &mut got).unwrap();
            assert_eq!(got, std::fs::read_to_string(&p).unwrap(), "{}", p.display());
            assert!(dirs.lstat(&p).unwrap().0);
        }
        // The link itself, never what it names; a FIFO without waiting.
        let link = a.join("link");
        assert!(dirs.open(&link).is_err(), "a symlink was followed");
        let (file, id) = dirs.lstat(&link).unwrap();
        assert!(!file);
        assert_eq!(id, node_config(&std::fs::symlink_metadata(&link).unwrap()));
        let fifo = a.join("fifo");
        let (file, id) = dirs.lstat(&fifo).unwrap();
        assert!(!file);
        assert_eq!(id, node_config(&std::fs::symlink_metadata(&fifo).unwrap()));
        assert!(dirs.lstat(&a.join("gone")).is_err());
    }

    #[test]
    fn config_ids_are_what_format_made_them() {
        // The ids were `format!`ed before; a set's recorded ids must keep
        // comparing equal to the ids checks compute now.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"bytes").unwrap();
        let meta = std::fs::metadata(&f).unwrap();
        let ex = [FiemapExtent::new(0, 4096, 4096, 0)];
        let ctime = format!("{}.{:09}", meta.ctime(), meta.ctime_nsec());
        assert_eq!(
            file_config(&meta, Some(7), &ex, "@e").as_str(),
            format!(
                "f:{}:7:{}:{ctime}:{}@e",
                meta.ino(),
                meta.len(),
                extents_digest(&ex)
            )
        );
        assert_eq!(
            node_config(&meta).as_str(),
            format!("n:{}:{ctime}", meta.ino())
        );
    }

    #[test]
    fn a_write_is_charged_to_every_file_whose_mapped_extent_it_overlaps() {
        use floe_core::model::{ExtentChain, PhysicalExtent};
        use floe_core::units::{BlockSize, Blocks, ItemOffset};
        // (device, first block, blocks) of 4 KiB, at logical 0, 1 MiB, …
        let file = |id: &str, extents: &[(&str, u64, u64)]| Item {
            id: ItemId::new(id),
            kind: ItemKind::File,
            size: Bytes(0),
            config: ConfigId::new("f:1"),
            extents: extents
                .iter()
                .zip(0u64..)
                .map(|(&(device, start, count), k)| MapExtent {
                    logical: ItemOffset(k << 20),
                    length: Bytes(count * 4096),
                    kind: ExtentKind::Data(ExtentChain {
                        layers: Vec::new(),
                        physical: PhysicalExtent {
                            device: DeviceId::new(device),
                            start: Blocks(start),
                            count: Blocks(count),
                            block_size: BlockSize(4096),
                        },
                    }),
                })
                .collect(),
            meta: Default::default(),
            file: None,
        };
        let mut kept = ImageFiles::default();
        kept.record(&file("/a", &[("d0", 10, 100), ("d1", 0, 4)]), None);
        kept.record(&file("/b", &[("d0", 50, 2)]), None); // inside /a's (shared)
        kept.record(&file("/c", &[("d0", 200, 1)]), None);
        let index = ExtentIndex::of(&kept);
        let d0 = kept
            .devices
            .iter()
            .position(|d| d.as_str() == "d0")
            .unwrap();
        let d1 = kept
            .devices
            .iter()
            .position(|d| d.as_str() == "d1")
            .unwrap();
        let hit = |d: usize, a: u64, b: u64| -> Vec<String> {
            let files = index.overlaps(d, a, b);
            let ids = ExtentIndex::ids(&kept, &files.iter().map(|f| f.2).collect());
            let mut v: Vec<String> = files
                .iter()
                .map(|(_, _, f)| ids[f].as_str().to_string())
                .collect();
            v.sort();
            v
        };
        let k = 4096;
        // Before, between and after the extents: nothing.
        assert!(hit(d0, 0, 10 * k).is_empty());
        assert!(hit(d0, 110 * k, 200 * k).is_empty());
        assert!(hit(d0, 201 * k, 1 << 40).is_empty());
        // The last byte of /a, the first of /c.
        assert_eq!(hit(d0, 110 * k - 1, 110 * k), vec!["/a"]);
        assert_eq!(hit(d0, 200 * k, 200 * k + 1), vec!["/c"]);
        // A block both /a and /b map; one write across /a and /c.
        assert_eq!(hit(d0, 51 * k, 52 * k), vec!["/a", "/b"]);
        assert_eq!(hit(d0, 100 * k, 300 * k), vec!["/a", "/c"]);
        // The other device: only what is on it.
        assert_eq!(hit(d1, 0, k), vec!["/a"]);
        assert!(hit(d1, 4 * k, 8 * k).is_empty());
    }

    #[test]
    fn a_remap_hands_out_only_the_extents_not_where_the_kept_map_had_them() {
        use floe_core::model::{ExtentChain, PhysicalExtent};
        use floe_core::units::{BlockSize, Blocks, ItemOffset};
        let data = |logical: u64, device: &str, start: u64| MapExtent {
            logical: ItemOffset(logical),
            length: Bytes(4096),
            kind: ExtentKind::Data(ExtentChain {
                layers: Vec::new(),
                physical: PhysicalExtent {
                    device: DeviceId::new(device),
                    start: Blocks(start),
                    count: Blocks(1),
                    block_size: BlockSize(4096),
                },
            }),
        };
        let hole = MapExtent {
            logical: ItemOffset(4096),
            length: Bytes(4096),
            kind: ExtentKind::Hole,
        };
        let inline = MapExtent {
            logical: ItemOffset(16384),
            length: Bytes(3),
            kind: ExtentKind::Inline(vec![1, 2, 3]),
        };
        let item = |extents: Vec<MapExtent>| Item {
            id: ItemId::new("/srv/f"),
            kind: ItemKind::File,
            size: Bytes(16387),
            config: ConfigId::new("f:1"),
            extents,
            meta: Default::default(),
            file: None,
        };
        let mut kept = ImageFiles::default();
        let first = item(vec![
            data(0, "disk-a", 10),
            hole.clone(),
            data(8192, "disk-a", 12),
            data(12288, "disk-b", 12),
            inline.clone(),
        ]);
        // Nothing kept yet: all of it.
        assert_eq!(kept.moved(&first), first.extents);
        kept.record(&first, Some((12, 7)));
        assert_eq!(kept.files[&first.id].inode, Some((12, 7)));
        // The same map: only the inline bytes, which are not kept.
        assert_eq!(kept.moved(&first), vec![inline.clone()]);
        // One extent moved within its device, one to a device never seen,
        // one to the other device at the same block.
        let fresh = item(vec![
            data(0, "disk-a", 10),
            hole.clone(),
            data(8192, "disk-a", 99),
            data(12288, "disk-a", 12),
            inline.clone(),
        ]);
        assert_eq!(
            kept.moved(&fresh),
            vec![
                data(8192, "disk-a", 99),
                data(12288, "disk-a", 12),
                inline.clone()
            ]
        );
        let elsewhere = item(vec![data(0, "disk-c", 10), hole.clone()]);
        assert_eq!(kept.moved(&elsewhere), vec![data(0, "disk-c", 10)]);
        // A remap keeps what it handed out: the next compares with that.
        kept.record(&fresh, None);
        assert_eq!(kept.files[&first.id].inode, None);
        assert_eq!(kept.moved(&fresh), vec![inline]);
        assert_eq!(kept.files.len(), 1);
    }
}
