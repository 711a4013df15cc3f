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
use crate::source::{item_id, parse_source, walk_skipping, Entry};
use crate::sys::{fiemap, generation, FiemapExtent, FIEMAP_FLAG_SYNC};
use floe_core::abi::{Mapper, ValidityIndicator};
use floe_core::error::{Error, ErrorKind, Result};
use floe_core::model::*;
use floe_core::units::{BlockSize, Blocks, Bytes, ItemOffset};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

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
}

/// A file system on one device (ext4, XFS): address = offset on it.
impl Translate for FsDevice {
    fn translate(&self, addr: u64, len: u64) -> Result<Vec<(DeviceId, u64, u64)>> {
        let at = self.offset.checked_add(addr).ok_or_else(|| {
            Error::new(ErrorKind::InvalidMap, format!("address {addr} overflows"))
        })?;
        Ok(vec![(self.id.clone(), at, len)])
    }
}

/// Builds the translator for a source's file system.
pub type TranslatorFactory = fn(&SourceHandle) -> Result<Box<dyn Translate>>;

/// The mapper.
pub struct FileMapper {
    translators: TranslatorFactory,
    /// The last map of each regular file, to answer remaps with only the
    /// extents that changed.
    cache: HashMap<ItemId, (ConfigId, Vec<MapExtent>)>,
    /// A map being handed out in parts.
    parts: Option<Parts>,
    /// Entries per part.
    part_entries: usize,
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

fn ctime(meta: &std::fs::Metadata) -> String {
    format!("{}.{:09}", meta.ctime(), meta.ctime_nsec())
}

/// The config id of a regular file from its stat, extents and the
/// translator's epoch.
fn file_config(
    meta: &std::fs::Metadata,
    gen: Option<u64>,
    ex: &[FiemapExtent],
    epoch: &str,
) -> ConfigId {
    ConfigId::new(format!(
        "f:{}:{}:{}:{}:{}{epoch}",
        meta.ino(),
        gen.unwrap_or(0),
        meta.len(),
        ctime(meta),
        extents_digest(ex)
    ))
}

fn node_config(meta: &std::fs::Metadata) -> ConfigId {
    ConfigId::new(format!("n:{}:{}", meta.ino(), ctime(meta)))
}

/// The part of a file's config id that says which version its content is
/// (inode, generation, size, ctime).
fn version_of(config: &ConfigId) -> Option<String> {
    let s = config.as_str();
    s.starts_with("f:")
        .then(|| s.split(':').take(5).collect::<Vec<_>>().join(":"))
}

impl FileMapper {
    /// A mapper translating with `translators`.
    pub fn new(translators: TranslatorFactory) -> FileMapper {
        FileMapper {
            translators,
            cache: HashMap::new(),
            parts: None,
            part_entries: PART_ENTRIES,
        }
    }

    /// A mapper configured by its plugin config: `part_entries` (entries
    /// per part of the map, default [`PART_ENTRIES`]).
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
        Ok(m)
    }

    /// Map one walked entry; `link` is the first name of a file seen
    /// under another name before.
    fn map_entry(
        root: &Path,
        e: &Entry,
        tr: &dyn Translate,
        link: Option<&String>,
        sync: bool,
    ) -> Result<Option<Item>> {
        let id = item_id(root, &e.rel);
        let Some(kind) = kind_of(&e.meta) else {
            return Ok(None); // a socket: made by whoever listens on it
        };
        if kind == ItemKind::File && link.is_none() {
            // Open once: extended attributes, stat and FIEMAP all through
            // the descriptor.
            let f =
                open_file(&e.path).map_err(|err| Error::io("open", err).item(&id).path(&e.path))?;
            let file = capture_from(root, &e.rel, &e.path, &e.meta, XattrSource::File(&f))
                .map_err(|err| Error::io("read metadata", err).item(&id).path(&e.path))?;
            return Self::map_file(&id, &e.path, &f, file, tr, sync).map(Some);
        }
        let mut file = capture(root, &e.rel, &e.path, &e.meta)
            .map_err(|err| Error::io("read metadata", err).item(&id).path(&e.path))?;
        if kind == ItemKind::File {
            if let Some(first) = link {
                file.target = Some(first.clone());
                return Ok(Some(Item {
                    id,
                    kind: ItemKind::HardLink,
                    size: Bytes(0),
                    config: node_config(&e.meta),
                    extents: Vec::new(),
                    meta: Default::default(),
                    file: Some(file),
                }));
            }
        }
        Ok(Some(Item {
            id,
            kind,
            size: Bytes(0),
            config: node_config(&e.meta),
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
        mut file: FileMeta,
        tr: &dyn Translate,
        sync: bool,
    ) -> Result<Item> {
        let meta = f
            .metadata()
            .map_err(|e| Error::io("stat", e).item(id).path(path))?;
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
        let gen = generation(f);
        let size = meta.len();
        let plan = plan_file(size, &ex).map_err(|e| {
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
                    let mut buf = vec![0u8; usize::try_from(length).unwrap_or(0)];
                    std::os::unix::fs::FileExt::read_exact_at(f, &mut buf, logical)
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
        file.mtime = Timestamp {
            sec: meta.mtime(),
            nsec: u32::try_from(meta.mtime_nsec()).unwrap_or(0),
        };
        file.ctime = Timestamp {
            sec: meta.ctime(),
            nsec: u32::try_from(meta.ctime_nsec()).unwrap_or(0),
        };
        let config = file_config(&meta, gen, &ex, &tr.epoch());
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

/// Entries mapped per part of the map: the mover starts reading the first
/// part while the agent maps the next.
pub const PART_ENTRIES: usize = 4096;

/// A map being produced part by part: what the walks found and what is
/// left to map.
struct Parts {
    /// One translator per source (None: its file system is not mappable;
    /// its failure is in `first`).
    translators: Vec<Box<dyn Translate>>,
    /// Each source's root.
    roots: Vec<PathBuf>,
    /// Entries left to map, in walk order: (source, entry, first name of a
    /// hard-linked file seen before).
    todo: std::collections::VecDeque<(usize, Entry, Option<String>)>,
    /// Volumes and walk failures, handed out with the first part.
    first: Option<(Vec<Item>, Vec<ItemFailure>)>,
}

impl FileMapper {
    /// Walk every source of `image` (the part that cannot be split).
    fn walk_all(&self, image: &FrozenImage) -> Result<Parts> {
        let hs = handles(image)?;
        let mut parts = Parts {
            translators: Vec::new(),
            roots: Vec::new(),
            todo: std::collections::VecDeque::new(),
            first: None,
        };
        let (mut items, mut failures) = (Vec::new(), Vec::new());
        let mut seen = std::collections::HashSet::new();
        let mut links = HashMap::new();
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
            let w = walk_skipping(spec, &h.frozen, &h.skip);
            failures.extend(w.failures);
            let source = parts.translators.len();
            parts.translators.push(tr);
            parts.roots.push(spec.root.clone());
            // In walk order: which entries to map, and the first name of
            // every file with several.
            for e in w.entries {
                if !seen.insert(item_id(&spec.root, &e.rel)) {
                    continue;
                }
                let mut link = None;
                if e.meta.is_file() && e.meta.nlink() > 1 {
                    let key = (e.meta.dev(), e.meta.ino());
                    match links.get(&key) {
                        Some(first) => link = Some(String::clone(first)),
                        None => {
                            links.insert(key, e.rel.clone());
                        }
                    }
                }
                parts.todo.push_back((source, e, link));
            }
        }
        // Parts in inode order: on ext4 and XFS an inode's number says
        // its group, and its data mostly lives in that group, so each part
        // covers one region of the disk (the mover sorts within a part)
        // and its inode blocks are read in order.
        parts
            .todo
            .make_contiguous()
            .sort_by_key(|(_, e, _)| (e.meta.dev(), e.meta.ino()));
        parts.first = Some((items, failures));
        Ok(parts)
    }

    /// Map the next `part_entries` entries: stat, xattrs and FIEMAP on
    /// several threads (on a cold file system most of it is waiting for
    /// inode blocks).
    fn map_next(&mut self, image: &FrozenImage) -> Result<MapPart> {
        if self.parts.is_none() {
            self.parts = Some(self.walk_all(image)?);
        } else {
            floe_core::media::pausepoint("map-part");
        }
        let parts = self.parts.as_mut().expect("walked above");
        let (mut items, mut failures) = parts.first.take().unwrap_or_default();
        let n = parts.todo.len().min(self.part_entries);
        let todo: Vec<(usize, Entry, Option<String>)> = parts.todo.drain(..n).collect();
        let threads = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .clamp(2, 8);
        let chunk = todo.len().div_ceil(threads).max(1);
        let (translators, roots) = (&parts.translators, &parts.roots);
        let mapped: Vec<Vec<(ItemId, Result<Option<Item>>)>> = std::thread::scope(|sc| {
            // A mapping thread that panicked loses nothing silently: the
            // map fails.
            let handles: Vec<_> = todo
                .chunks(chunk)
                .map(|part| {
                    sc.spawn(move || {
                        part.iter()
                            .map(|(source, e, link)| {
                                let root = &roots[*source];
                                let tr = translators[*source].as_ref();
                                (
                                    item_id(root, &e.rel),
                                    Self::map_entry(root, e, tr, link.as_ref(), true),
                                )
                            })
                            .collect()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| Error::new(ErrorKind::Plugin, "a mapping thread panicked"))
                })
                .collect::<Result<Vec<_>>>()
        })?;
        for (id, r) in mapped.into_iter().flatten() {
            match r {
                Ok(Some(item)) => {
                    if item.kind == ItemKind::File {
                        self.cache
                            .insert(item.id.clone(), (item.config.clone(), item.extents.clone()));
                    }
                    items.push(item);
                }
                Ok(None) => {}
                Err(err) => failures.push(ItemFailure {
                    item: id,
                    error: err.to_string(),
                }),
            }
        }
        let more = self.parts.as_ref().is_some_and(|p| !p.todo.is_empty());
        if !more {
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
        let old = self.cache.get(item).cloned();
        let f = open_file(&path).map_err(|e| Error::io("open", e).item(item).path(&path))?;
        let file = capture_from(&spec.root, &rel, &path, &meta, XattrSource::File(&f))
            .map_err(|e| Error::io("read metadata", e).item(item).path(&path))?;
        let fresh = Self::map_file(item, &path, &f, file, tr.as_ref(), true)?;
        self.cache
            .insert(item.clone(), (fresh.config.clone(), fresh.extents.clone()));
        let same_version =
            version_of(since).is_some() && version_of(since) == version_of(&fresh.config);
        if same_version {
            // Same content, moved blocks (defrag, balance): only the
            // extents that differ.
            let extents = match old {
                Some((_, old)) => fresh
                    .extents
                    .iter()
                    .filter(|e| !old.contains(e))
                    .cloned()
                    .collect(),
                None => fresh.extents.clone(),
            };
            return Ok(Remap {
                item: item.clone(),
                config: fresh.config,
                extents,
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
        &self,
        hs: &[(SourceHandle, crate::source::SourceSpec)],
        epochs: &mut HashMap<PathBuf, String>,
        item: &ItemId,
    ) -> Result<ConfigId> {
        let (h, _, _, path) = locate(hs, item)?;
        if h.volume.is_some() {
            return Ok(crate::volume::volume_config(&h.frozen));
        }
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) => return Ok(ConfigId::new(format!("gone:{e}"))),
        };
        if !meta.is_file() {
            return Ok(node_config(&meta));
        }
        let f = match open_file(&path) {
            Ok(f) => f,
            Err(e) => return Ok(ConfigId::new(format!("gone:{e}"))),
        };
        let meta = f.metadata().map_err(|e| Error::io("stat", e).item(item))?;
        let ex = fiemap(&f, 0).map_err(|e| Error::io("fiemap", e).item(item).path(&path))?;
        let epoch = match epochs.get(&h.frozen) {
            Some(e) => e.clone(),
            None => {
                let e = (self.translators)(h)?.epoch();
                epochs.insert(h.frozen.clone(), e.clone());
                e
            }
        };
        Ok(file_config(&meta, generation(&f), &ex, &epoch))
    }
}

impl ValidityIndicator for FileValidity {
    fn config_id(&mut self, image: &FrozenImage, item: &ItemId) -> Result<ConfigId> {
        self.one(&handles(image)?, &mut HashMap::new(), item)
    }
    fn config_ids(&mut self, image: &FrozenImage, items: &[ItemId]) -> Result<Vec<ConfigId>> {
        let hs = handles(image)?;
        let mut epochs = HashMap::new();
        items
            .iter()
            .map(|i| self.one(&hs, &mut epochs, i))
            .collect()
    }
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
