//! Floe plugin `restic`: each backup set is one snapshot in a restic
//! repository (deduplicated, compressed, encrypted), written through
//! `rustic_core` and readable by Debian's `restic` without Floe. Spec:
//! `docs/formats/restic-media.md`.
//!
//! The mover's items become the snapshot's entries as they arrive: a
//! custom `ReadSource` whose entries come over a channel, each file's
//! bytes through a bounded pipe fed by `MediaWriter::write` — nothing is
//! staged. rustic builds directory trees as entries come, so the plugin
//! asks the mover for path order (`PluginInfo::path_order`). rustic only
//! logs a reader error and drops the file: the plugin counts every item's
//! bytes itself and fails the set (deleting the snapshot) when any item
//! was not read whole.
//!
//! Layout of a snapshot: file items at their own absolute paths (so
//! `restic restore --target /` puts them back), volume items under
//! `/floe-volumes/`, and last the set's record at
//! `/~floe-<set>/floe-index.json`. Tags `floe` and `floe-set=<set>`; host =
//! the agent's; time = the frozen point.
//!
//! Config: `dir` (the repository, created when it does not exist);
//! `password` or `password_file` (else `RESTIC_PASSWORD`,
//! `RESTIC_PASSWORD_FILE`).

use floe_core::abi::{Interface, MediaReader, MediaWriter, Plugin, PluginInfo};
use floe_core::error::{Error, ErrorKind, Result};
use floe_core::model::*;
use rustic_backend::BackendOptions;
use rustic_core::repofile::{Metadata, Node, NodeType, SnapshotFile};
use rustic_core::{
    BackupOptions, ConfigOptions, Credentials, IndexedFullStatus, KeyOptions, ParentOptions,
    ReadSource, ReadSourceEntry, Repository, RepositoryOptions, RusticResult, SnapshotOptions,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

/// Index magic (the set's record inside the snapshot).
pub const INDEX_MAGIC: &str = "floe-restic-index";
/// Index version.
pub const VERSION: u32 = 1;
/// Where volume items go in a snapshot.
pub const VOLUMES: &str = "/floe-volumes";

/// The set's record as stored in the snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// [`INDEX_MAGIC`].
    pub magic: String,
    /// [`VERSION`].
    pub version: u32,
    /// The set; item positions are `path=<path in the snapshot>`.
    pub record: SetRecord,
}

/// Decode and check an index file's bytes.
pub fn decode_index(bytes: &[u8]) -> Result<SetRecord> {
    let i: Index = serde_json::from_slice(bytes).map_err(|e| {
        Error::new(
            ErrorKind::Media,
            "malformed Floe index in a restic snapshot",
        )
        .source(e)
    })?;
    if i.magic != INDEX_MAGIC || i.version != VERSION {
        return Err(Error::new(
            ErrorKind::Media,
            format!("not a Floe restic index of version {VERSION}"),
        ));
    }
    Ok(i.record)
}

/// The path of the set's record inside its snapshot.
pub fn index_path(set: &SetId) -> String {
    format!("/~floe-{set}/floe-index.json")
}

/// The path of an item inside the snapshot.
pub fn snapshot_path(h: &ItemHeader) -> String {
    match (&h.file, h.kind) {
        (Some(_), k) if k != ItemKind::Volume => h.item.as_str().to_string(),
        _ => format!("{VOLUMES}/{}", h.item.as_str().trim_start_matches('/')),
    }
}

fn rerr(what: &str) -> impl FnOnce(Box<rustic_core::RusticError>) -> Error + '_ {
    move |e| {
        Error::new(
            ErrorKind::Media,
            format!("restic repository: {what}: {}", e.display_log()),
        )
    }
}

#[derive(Clone, Debug)]
struct Config {
    repo: PathBuf,
    password: String,
    /// Where an item larger than the in-memory spool waits for rustic.
    spool: PathBuf,
}

fn config_of(c: &serde_json::Value) -> Result<Config> {
    floe_core::abi::known_options(
        c,
        "restic media",
        &[
            "dir",
            "repository",
            "password",
            "password_file",
            "spool_dir",
        ],
    )?;
    let s = |k: &str| c.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let repo = s("dir")
        .or_else(|| s("repository"))
        .map(PathBuf::from)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                "restic media needs a repository (restic:/path)",
            )
        })?;
    let file = s("password_file").or_else(|| std::env::var("RESTIC_PASSWORD_FILE").ok());
    let password = match (s("password").or_else(|| std::env::var("RESTIC_PASSWORD").ok()), file) {
        (Some(p), _) => p,
        (None, Some(f)) => std::fs::read_to_string(&f)
            .map_err(|e| Error::new(ErrorKind::Config, format!("cannot read the restic password file {f}")).source(e))?
            .trim_end_matches(['\n', '\r'])
            .to_string(),
        (None, None) => {
            return Err(Error::new(
                ErrorKind::Config,
                "restic media needs a password: --media-opt password_file=FILE (or RESTIC_PASSWORD_FILE)",
            ))
        }
    };
    let spool = s("spool_dir").map_or_else(
        || {
            let name = repo
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            repo.with_file_name(format!(".{name}.floe-spool"))
        },
        PathBuf::from,
    );
    Ok(Config {
        repo,
        password,
        spool,
    })
}

fn open_repo(cfg: &Config, create: bool) -> Result<Repository<rustic_core::OpenStatus>> {
    let path = cfg
        .repo
        .to_str()
        .ok_or_else(|| Error::new(ErrorKind::Config, "repository path is not UTF-8"))?;
    let backends = BackendOptions::default()
        .repository(path)
        .to_backends()
        .map_err(rerr("backend"))?;
    let opts = RepositoryOptions::default().no_cache(true);
    let repo = Repository::new(&opts, &backends).map_err(rerr("open"))?;
    let creds = Credentials::password(&cfg.password);
    if create && !cfg.repo.join("config").exists() {
        return repo
            .init(&creds, &KeyOptions::default(), &ConfigOptions::default())
            .map_err(rerr("init"));
    }
    if !cfg.repo.join("config").exists() {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("no restic repository at {}", cfg.repo.display()),
        ));
    }
    repo.open(&creds).map_err(rerr("open (wrong password?)"))
}

/// What the plugin knows of one item's bytes on their way to rustic.
#[derive(Default)]
struct Track {
    item: String,
    expected: u64,
    read: AtomicU64,
    /// The reader saw the end after all bytes.
    finished: AtomicBool,
}

/// Bytes of one item kept in memory before the rest goes to a spool file.
const SPOOL_MEM: u64 = 64 << 20;

enum Seg {
    Mem(Vec<u8>),
    File { at: u64, len: u64 },
}

#[derive(Default)]
struct SpoolState {
    segs: std::collections::VecDeque<Seg>,
    mem: u64,
    file: Option<Arc<std::fs::File>>,
    file_len: u64,
    done: bool,
    err: Option<String>,
}

/// One item's bytes on their way to rustic. rustic's tree builder holds
/// an entry back until it has seen the next one, so the item being written
/// is not read before the mover begins the next: its bytes are spooled —
/// in memory up to [`SPOOL_MEM`], then in an unlinked file in the spool
/// directory — and the writer never waits on the reader.
#[derive(Default)]
struct Spool {
    state: Mutex<SpoolState>,
    ready: std::sync::Condvar,
    dir: PathBuf,
}

impl Spool {
    fn lock(&self) -> std::sync::MutexGuard<'_, SpoolState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn push(&self, data: &[u8]) -> Result<()> {
        let mut st = self.lock();
        if st.mem + data.len() as u64 <= SPOOL_MEM {
            st.mem += data.len() as u64;
            st.segs.push_back(Seg::Mem(data.to_vec()));
        } else {
            if st.file.is_none() {
                std::fs::create_dir_all(&self.dir).map_err(|e| {
                    floe_core::media::media_io_error("create spool directory", &self.dir, e)
                })?;
                let path = self
                    .dir
                    .join(format!("spool-{}-{}", std::process::id(), now_secs()));
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(|e| floe_core::media::media_io_error("create spool file", &path, e))?;
                let _ = std::fs::remove_file(&path);
                st.file = Some(Arc::new(f));
            }
            let at = st.file_len;
            let f = st
                .file
                .clone()
                .ok_or_else(|| Error::new(ErrorKind::Media, "no spool file"))?;
            std::os::unix::fs::FileExt::write_all_at(f.as_ref(), data, at)
                .map_err(|e| floe_core::media::media_io_error("write spool file", &self.dir, e))?;
            st.file_len += data.len() as u64;
            st.segs.push_back(Seg::File {
                at,
                len: data.len() as u64,
            });
        }
        drop(st);
        self.ready.notify_all();
        Ok(())
    }

    fn finish(&self, err: Option<String>) {
        let mut st = self.lock();
        st.done = true;
        st.err = err;
        drop(st);
        self.ready.notify_all();
    }
}

/// The reading end of a [`Spool`], as rustic opens it.
struct Pipe {
    spool: Arc<Spool>,
    track: Arc<Track>,
}

impl Read for Pipe {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.track.read.load(Ordering::SeqCst) > 0 && floe_core::media::errpoint("restic-read") {
            return Err(std::io::Error::other(
                "injected read error (FLOE_ERRPOINT=restic-read)",
            ));
        }
        let mut st = self.spool.lock();
        while st.segs.is_empty() && !st.done {
            st = self
                .spool
                .ready
                .wait(st)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        if let Some(e) = &st.err {
            return Err(std::io::Error::other(e.clone()));
        }
        let Some(seg) = st.segs.front_mut() else {
            if self.track.read.load(Ordering::SeqCst) == self.track.expected {
                self.track.finished.store(true, Ordering::SeqCst);
            }
            return Ok(0);
        };
        let n = match seg {
            Seg::Mem(b) => {
                let n = out.len().min(b.len());
                out[..n].copy_from_slice(&b[..n]);
                b.drain(..n);
                let empty = b.is_empty();
                st.mem -= n as u64;
                if empty {
                    st.segs.pop_front();
                }
                n
            }
            Seg::File { at, len } => {
                let n = usize::try_from((*len).min(out.len() as u64)).unwrap_or(0);
                let (pos, f) = (*at, st.file.clone());
                let f = f.ok_or_else(|| std::io::Error::other("no spool file"))?;
                std::os::unix::fs::FileExt::read_exact_at(f.as_ref(), &mut out[..n], pos)?;
                if let Some(Seg::File { at, len }) = st.segs.front_mut() {
                    *at += n as u64;
                    *len -= n as u64;
                    if *len == 0 {
                        st.segs.pop_front();
                    }
                }
                n
            }
        };
        self.track.read.fetch_add(n as u64, Ordering::SeqCst);
        Ok(n)
    }
}

type Entry = ReadSourceEntry<Pipe>;

/// The `ReadSource` rustic archives: entries as the mover sends them.
struct Source {
    rx: Mutex<Option<Receiver<Entry>>>,
}

struct Entries(Option<Receiver<Entry>>);

impl Iterator for Entries {
    type Item = RusticResult<Entry>;
    fn next(&mut self) -> Option<Self::Item> {
        self.0.as_ref()?.recv().ok().map(Ok)
    }
}

impl ReadSource for Source {
    type Open = Pipe;
    type Iter = Entries;
    fn size(&self) -> RusticResult<Option<u64>> {
        Ok(None)
    }
    fn entries(&self) -> Self::Iter {
        Entries(self.rx.lock().ok().and_then(|mut g| g.take()))
    }
}

/// Go's `os.FileMode` of a Unix `st_mode` (restic stores modes so).
pub fn go_mode(mode: u32) -> u32 {
    let mut g = mode & 0o777;
    g |= match mode & 0o170_000 {
        0o040_000 => 1 << 31,               // dir
        0o120_000 => 1 << 27,               // symlink
        0o060_000 => 1 << 26,               // block device
        0o020_000 => (1 << 26) | (1 << 21), // char device
        0o010_000 => 1 << 25,               // named pipe
        0o140_000 => 1 << 24,               // socket
        _ => 0,
    };
    if mode & 0o4000 != 0 {
        g |= 1 << 23;
    }
    if mode & 0o2000 != 0 {
        g |= 1 << 22;
    }
    if mode & 0o1000 != 0 {
        g |= 1 << 20;
    }
    g
}

fn ts(t: Timestamp) -> Option<rustic_core::jiff::Timestamp> {
    rustic_core::jiff::Timestamp::new(t.sec, i32::try_from(t.nsec).unwrap_or(0)).ok()
}

/// The restic node of an item.
fn node_of(h: &ItemHeader, name: &str, frozen_at: u64) -> Result<Node> {
    let f = h.file.clone().unwrap_or_default();
    let volume = h.kind == ItemKind::Volume || h.file.is_none();
    let unix_mode = if volume { 0o100_600 } else { f.mode };
    let node_type = match h.kind {
        ItemKind::Volume | ItemKind::File | ItemKind::HardLink => NodeType::File,
        ItemKind::Directory => NodeType::Dir,
        ItemKind::Symlink => NodeType::from_link(Path::new(f.target.as_deref().unwrap_or(""))),
        ItemKind::Fifo => NodeType::Fifo,
        ItemKind::CharDevice => NodeType::Chardev { device: f.rdev },
        ItemKind::BlockDevice => NodeType::Dev { device: f.rdev },
    };
    let mut xattrs = Vec::new();
    for (k, v) in &f.xattrs {
        let bytes = floe_core::fsmeta::unhex(v).ok_or_else(|| {
            Error::new(ErrorKind::InvalidMap, format!("xattr {k} is not hex")).item(&h.item)
        })?;
        xattrs
            .push(serde_json::json!({"name": k, "value": floe_core::protocol::b64_encode(&bytes)}));
    }
    let frozen = Timestamp {
        sec: i64::try_from(frozen_at).unwrap_or(0),
        nsec: 0,
    };
    let meta = Metadata {
        mode: Some(go_mode(unix_mode)),
        mtime: ts(if volume { frozen } else { f.mtime }),
        atime: ts(if volume { frozen } else { f.atime }),
        ctime: ts(if volume { frozen } else { f.ctime }),
        uid: Some(f.uid),
        gid: Some(f.gid),
        user: None,
        group: None,
        inode: 0,
        device_id: 0,
        size: if h.kind.has_bytes() { h.size.0 } else { 0 },
        links: 1,
        extended_attributes: serde_json::from_value(serde_json::Value::Array(xattrs))
            .map_err(|e| Error::new(ErrorKind::Media, "encode xattrs for restic").source(e))?,
    };
    Ok(Node::new_node(std::ffi::OsStr::new(name), node_type, meta))
}

struct Writing {
    header: SetHeader,
    entries: Option<SyncSender<Entry>>,
    archive: Option<std::thread::JoinHandle<Result<SnapshotFile>>>,
    committed: Arc<AtomicBool>,
    tracks: Arc<Mutex<Vec<Arc<Track>>>>,
    items: Vec<ItemRecord>,
    failures: Vec<ItemFailure>,
    current: Option<(ItemHeader, String, Option<Arc<Spool>>, u64)>,
    last_path: Option<PathBuf>,
}

/// Writes sets as restic snapshots.
pub struct ResticWriter {
    cfg: Config,
    set: Option<Writing>,
}

impl ResticWriter {
    fn w(&mut self) -> Result<&mut Writing> {
        self.set
            .as_mut()
            .ok_or_else(|| Error::new(ErrorKind::Media, "no set begun"))
    }

    /// Hand an entry to rustic, in path order.
    fn send(&mut self, path: &str, node: Node, open: Option<Pipe>) -> Result<()> {
        let w = self.w()?;
        let p = PathBuf::from(path);
        if w.last_path.as_ref().is_some_and(|l| *l >= p) {
            return Err(Error::new(
                ErrorKind::Media,
                format!(
                    "restic media takes items in path order: {path} came after {}",
                    w.last_path
                        .as_ref()
                        .map(|l| l.display().to_string())
                        .unwrap_or_default()
                ),
            ));
        }
        w.last_path = Some(p.clone());
        let tx = w
            .entries
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::Media, "the set is closed"))?;
        if tx
            .send(ReadSourceEntry {
                path: p,
                node,
                open,
            })
            .is_err()
        {
            return Err(self.archive_failure());
        }
        Ok(())
    }

    /// The archive thread stopped: why.
    fn archive_failure(&mut self) -> Error {
        let Some(w) = self.set.as_mut() else {
            return Error::new(ErrorKind::Media, "no set begun");
        };
        w.entries = None;
        match w.archive.take().map(std::thread::JoinHandle::join) {
            Some(Ok(Err(e))) => e,
            Some(Err(_)) => Error::new(ErrorKind::Media, "the restic archiver panicked"),
            _ => Error::new(ErrorKind::Media, "the restic archiver stopped reading"),
        }
    }
}

fn source_paths(header: &SetHeader) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = header
        .sources
        .iter()
        .map(|s| {
            let p = s.split_once(':').map_or(s.as_str(), |(_, p)| p);
            let p = p.split('?').next().unwrap_or(p);
            if p.starts_with('/') {
                PathBuf::from(p)
            } else {
                PathBuf::from(format!("{VOLUMES}/{p}"))
            }
        })
        .collect();
    if paths.is_empty() {
        paths.push(PathBuf::from("/"));
    }
    paths
}

impl MediaWriter for ResticWriter {
    fn begin_set(&mut self, header: &SetHeader) -> Result<()> {
        floe_core::media::checked_set_name(&header.set)?;
        // Open (or create) now, so a wrong password fails before any read.
        drop(open_repo(&self.cfg, true)?);
        let (tx, rx) = sync_channel::<Entry>(64);
        let committed = Arc::new(AtomicBool::new(false));
        let tracks: Arc<Mutex<Vec<Arc<Track>>>> = Arc::default();
        let cfg = self.cfg.clone();
        let h = header.clone();
        let (c2, t2) = (committed.clone(), tracks.clone());
        let archive = std::thread::spawn(move || -> Result<SnapshotFile> {
            let repo = open_repo(&cfg, false)?
                .to_indexed_ids()
                .map_err(rerr("read index"))?;
            let time =
                rustic_core::jiff::Timestamp::from_second(i64::try_from(h.frozen_at).unwrap_or(0))
                    .map(|t| t.to_zoned(rustic_core::jiff::tz::TimeZone::UTC))
                    .ok();
            let mut snap_opts = SnapshotOptions::default()
                .host(h.agent.clone())
                .label(h.set.to_string())
                .add_tags(&format!("floe,floe-set={}", h.set))
                .map_err(rerr("tags"))?;
            if let Some(t) = time {
                snap_opts = snap_opts.time(t);
            }
            let snap = snap_opts.to_snapshot().map_err(rerr("snapshot"))?;
            // Every byte comes from the mover: no parent snapshot's
            // metadata may stand in for reading it.
            let opts = BackupOptions::default()
                .no_scan(true)
                .parent_opts(ParentOptions::default().force(true));
            let src = Source {
                rx: Mutex::new(Some(rx)),
            };
            let snap = repo
                .archive(&opts, &src, snap, &source_paths(&h))
                .map_err(rerr("backup"))?;
            // rustic drops a file whose reader failed, with a warning only:
            // check every item was read whole, else the set fails.
            let short: Vec<String> = t2
                .lock()
                .map(|t| {
                    t.iter()
                        .filter(|t| !t.finished.load(Ordering::SeqCst))
                        .map(|t| {
                            format!(
                                "{} ({} of {} bytes)",
                                t.item,
                                t.read.load(Ordering::SeqCst),
                                t.expected
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            if !c2.load(Ordering::SeqCst) || !short.is_empty() {
                let _ = repo.delete_snapshots(&[snap.id]);
                return Err(Error::new(
                    ErrorKind::Media,
                    if short.is_empty() {
                        "the set was aborted; its snapshot is removed".to_string()
                    } else {
                        format!(
                            "restic did not store all of: {}; the snapshot is removed",
                            short.join(", ")
                        )
                    },
                ));
            }
            Ok(snap)
        });
        self.set = Some(Writing {
            header: header.clone(),
            entries: Some(tx),
            archive: Some(archive),
            committed,
            tracks,
            items: Vec::new(),
            failures: Vec::new(),
            current: None,
            last_path: None,
        });
        Ok(())
    }

    fn resume_set(&mut self, set: &SetId) -> Result<SetRecord> {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("restic media cannot resume set {set}: back up again (unchanged data is deduplicated)"),
        ))
    }

    fn begin_item(&mut self, header: &ItemHeader) -> Result<()> {
        let frozen = self.w()?.header.frozen_at;
        if self.w()?.current.is_some() {
            return Err(Error::new(ErrorKind::Media, "begin_item inside an item"));
        }
        let path = snapshot_path(header);
        let name = Path::new(&path)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("root")
            .to_string();
        let node = node_of(header, &name, frozen)?;
        if header.kind == ItemKind::HardLink {
            // restic has no hard-link entries of its own making here: the
            // link is in the set's record, and `floe restore` makes it.
            self.w()?.current = Some((header.clone(), path, None, 0));
            return Ok(());
        }
        let (pipe, tx) = if header.kind.has_bytes() {
            let spool = Arc::new(Spool {
                dir: self.cfg.spool.clone(),
                ..Default::default()
            });
            let track = Arc::new(Track {
                item: header.item.to_string(),
                expected: header.size.0,
                ..Default::default()
            });
            self.w()?
                .tracks
                .lock()
                .map_err(|_| Error::new(ErrorKind::Media, "tracks poisoned"))?
                .push(track.clone());
            (
                Some(Pipe {
                    spool: spool.clone(),
                    track,
                }),
                Some(spool),
            )
        } else {
            (None, None)
        };
        self.send(&path, node, pipe)?;
        self.w()?.current = Some((header.clone(), path, tx, 0));
        Ok(())
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        let w = self.w()?;
        let Some((h, _, tx, done)) = w.current.as_mut() else {
            return Err(Error::new(ErrorKind::Media, "write outside an item"));
        };
        if *done + data.len() as u64 > h.size.0 {
            return Err(Error::new(
                ErrorKind::Media,
                format!("item {} is longer than its header said", h.item),
            ));
        }
        *done += data.len() as u64;
        let Some(tx) = tx.as_ref() else {
            return Err(Error::new(
                ErrorKind::Media,
                format!("item {} carries no bytes", h.item),
            ));
        };
        tx.push(data)
    }

    fn end_item(&mut self, trailer: &ItemTrailer) -> Result<MediaPosition> {
        let medium = self.cfg.repo.display().to_string();
        let w = self.w()?;
        let (h, path, tx, done) = w
            .current
            .take()
            .ok_or_else(|| Error::new(ErrorKind::Media, "end_item outside an item"))?;
        if let Some(sp) = tx {
            sp.finish(None); // the item's end, for its reader
        }
        if h.kind.has_bytes() && (done != h.size.0 || trailer.length != h.size) {
            return Err(Error::new(
                ErrorKind::Media,
                format!(
                    "item {} is {done} bytes, its header said {}",
                    h.item, h.size
                ),
            ));
        }
        let position = MediaPosition {
            medium,
            locator: format!("path={path}"),
        };
        w.items.push(ItemRecord {
            header: h,
            trailer: trailer.clone(),
            position: position.clone(),
        });
        Ok(position)
    }

    fn fail_item(&mut self, failure: &ItemFailure) -> Result<()> {
        let w = self.w()?;
        if !w.failures.iter().any(|f| f.item == failure.item) {
            w.failures.push(failure.clone());
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<Committed> {
        let spool_dir = self.cfg.spool.clone();
        let w = self.w()?;
        if w.current.is_some() {
            return Err(Error::new(
                ErrorKind::Media,
                "commit with an item still open",
            ));
        }
        let record = SetRecord {
            header: w.header.clone(),
            items: w.items.clone(),
            failures: w.failures.clone(),
            committed_at: now_secs(),
        };
        let index = serde_json::to_vec(&Index {
            magic: INDEX_MAGIC.into(),
            version: VERSION,
            record: record.clone(),
        })
        .map_err(|e| Error::new(ErrorKind::Media, "encode index").source(e))?;
        let ih = ItemHeader {
            item: ItemId::new(index_path(&record.header.set)),
            kind: ItemKind::Volume,
            size: floe_core::units::Bytes(index.len() as u64),
            config: ConfigId::new("index"),
            meta: Default::default(),
            holes: Vec::new(),
            file: None,
        };
        let node = node_of(&ih, "floe-index.json", record.header.frozen_at)?;
        let spool = Arc::new(Spool {
            dir: spool_dir,
            ..Default::default()
        });
        spool.push(&index)?;
        spool.finish(None);
        let track = Arc::new(Track {
            item: "the set's index".into(),
            expected: index.len() as u64,
            ..Default::default()
        });
        w.tracks
            .lock()
            .map_err(|_| Error::new(ErrorKind::Media, "tracks poisoned"))?
            .push(track.clone());
        self.send(
            &index_path(&record.header.set),
            node,
            Some(Pipe { spool, track }),
        )?;
        let mut w = self
            .set
            .take()
            .ok_or_else(|| Error::new(ErrorKind::Media, "no set"))?;
        w.committed.store(true, Ordering::SeqCst);
        w.entries = None; // the end of the entries: rustic saves the snapshot
        let r = w.archive.take().map(std::thread::JoinHandle::join);
        let _ = std::fs::remove_dir(&self.cfg.spool); // only when empty
        match r {
            Some(Ok(Ok(_snap))) => Ok(Committed::of(&record)),
            Some(Ok(Err(e))) => Err(e),
            _ => Err(Error::new(ErrorKind::Media, "the restic archiver panicked")),
        }
    }

    fn abort(&mut self) -> Result<()> {
        if let Some(mut w) = self.set.take() {
            if let Some((_, _, Some(sp), _)) = w.current.take() {
                sp.finish(Some("the backup was aborted".into()));
            }
            w.entries = None;
            if let Some(a) = w.archive.take() {
                // Not committed: the thread removes the snapshot it made.
                let _ = a.join();
            }
        }
        Ok(())
    }

    fn delete_set(&mut self, set: &SetId) -> Result<()> {
        let repo = open_repo(&self.cfg, false)?;
        let tag = format!("floe-set={set}");
        let snaps = repo
            .get_matching_snapshots(|s| s.tags.contains(&tag))
            .map_err(rerr("list snapshots"))?;
        if snaps.is_empty() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("no set {set} in {}", self.cfg.repo.display()),
            ));
        }
        let ids: Vec<_> = snaps.iter().map(|s| s.id).collect();
        // The data stays until `restic prune` (or rustic's) removes what
        // no snapshot references.
        repo.delete_snapshots(&ids).map_err(rerr("forget snapshot"))
    }
}

/// Reads sets from a restic repository.
pub struct ResticReader {
    cfg: Config,
    repo: Option<Repository<IndexedFullStatus>>,
    sets: HashMap<SetId, (SnapshotFile, floe_core::media::SetIndex)>,
    open: Option<(rustic_core::vfs::OpenFile, usize, usize)>,
}

impl ResticReader {
    fn repo(&mut self) -> Result<&Repository<IndexedFullStatus>> {
        if self.repo.is_none() {
            self.repo = Some(
                open_repo(&self.cfg, false)?
                    .to_indexed()
                    .map_err(rerr("read index"))?,
            );
        }
        self.repo
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::Media, "no repository"))
    }

    fn read_all(
        repo: &Repository<IndexedFullStatus>,
        snap: &SnapshotFile,
        path: &str,
    ) -> Result<Vec<u8>> {
        let node = repo
            .node_from_snapshot_and_path(snap, path)
            .map_err(rerr(path))?;
        let f = repo.open_file(&node).map_err(rerr(path))?;
        let len = usize::try_from(node.meta.size).unwrap_or(0);
        if len > 256 << 20 {
            return Err(Error::new(
                ErrorKind::Media,
                format!("index of {len} bytes"),
            ));
        }
        let b = repo.read_file_at(&f, 0, len).map_err(rerr(path))?;
        Ok(b.to_vec())
    }

    fn load(&mut self) -> Result<()> {
        let repo = self.repo()?;
        let snaps = repo
            .get_matching_snapshots(|s| s.tags.contains("floe"))
            .map_err(rerr("list snapshots"))?;
        let mut sets = HashMap::new();
        for s in snaps {
            let Some(set) = s.tags.iter().find_map(|t| t.strip_prefix("floe-set=")) else {
                continue;
            };
            let set = SetId::new(set);
            let bytes = Self::read_all(repo, &s, &index_path(&set))?;
            let record = decode_index(&bytes)?;
            sets.insert(set, (s, floe_core::media::SetIndex::new(record)));
        }
        self.sets = sets;
        Ok(())
    }
}

impl MediaReader for ResticReader {
    fn list_sets(&mut self) -> Result<Vec<SetRecord>> {
        self.load()?;
        let mut out: Vec<SetRecord> = self.sets.values().map(|(_, i)| i.record.clone()).collect();
        out.sort_by(|a, b| (a.committed_at, &a.header.set).cmp(&(b.committed_at, &b.header.set)));
        Ok(out)
    }

    fn open_item(&mut self, set: &SetId, item: &ItemId) -> Result<ItemRecord> {
        if !self.sets.contains_key(set) {
            self.load()?;
        }
        let (snap, index) = self.sets.get(set).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("no set {set} in {}", self.cfg.repo.display()),
            )
        })?;
        let rec = index.item(item)?;
        if !rec.header.kind.has_bytes() {
            self.open = None;
            return Ok(rec);
        }
        let path = rec
            .position
            .locator
            .strip_prefix("path=")
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Media,
                    format!("bad restic locator {:?}", rec.position.locator),
                )
            })?
            .to_string();
        let snap = snap.clone();
        let repo = self
            .repo
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::Media, "no repository"))?;
        let node = repo
            .node_from_snapshot_and_path(&snap, &path)
            .map_err(rerr(&path))?;
        if node.meta.size != rec.header.size.0 {
            return Err(Error::new(
                ErrorKind::Media,
                format!(
                    "{path} holds {} bytes in the snapshot, the set says {}",
                    node.meta.size, rec.header.size
                ),
            )
            .item(item));
        }
        let f = repo.open_file(&node).map_err(rerr(&path))?;
        self.open = Some((f, 0, usize::try_from(node.meta.size).unwrap_or(0)));
        Ok(rec)
    }

    fn read(&mut self, max: usize) -> Result<Vec<u8>> {
        let Some((f, pos, len)) = self.open.as_mut() else {
            return Ok(Vec::new());
        };
        let n = max.min(*len - *pos);
        if n == 0 {
            return Ok(Vec::new());
        }
        let repo = self
            .repo
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::Media, "no repository"))?;
        let b = repo.read_file_at(f, *pos, n).map_err(rerr("read file"))?;
        if b.is_empty() {
            return Err(Error::new(
                ErrorKind::Media,
                format!("restic file ends at {pos} of {len}"),
            ));
        }
        *pos += b.len();
        Ok(b.to_vec())
    }
}

/// The plugin.
pub struct ResticPlugin;

impl Plugin for ResticPlugin {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "restic".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            interfaces: vec![Interface::MediaWriter, Interface::MediaReader],
            sequential_media: false,
            path_order: true,
        }
    }
    fn media_writer(config: &serde_json::Value) -> Result<Box<dyn MediaWriter>> {
        Ok(Box::new(ResticWriter {
            cfg: config_of(config)?,
            set: None,
        }))
    }
    fn media_reader(config: &serde_json::Value) -> Result<Box<dyn MediaReader>> {
        Ok(Box::new(ResticReader {
            cfg: config_of(config)?,
            repo: None,
            sets: HashMap::new(),
            open: None,
        }))
    }
}

floe_core::export_plugin!(ResticPlugin);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_map_to_go() {
        assert_eq!(go_mode(0o100_644), 0o644);
        assert_eq!(go_mode(0o040_755), (1 << 31) | 0o755);
        assert_eq!(go_mode(0o104_755), (1 << 23) | 0o755);
        assert_eq!(go_mode(0o120_777), (1 << 27) | 0o777);
        assert!(decode_index(b"{}").is_err());
    }
}
