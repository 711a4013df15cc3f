//! Floe plugin `tar`: each backup set is one POSIX pax archive (`SET.tar`)
//! that GNU tar lists and extracts without Floe. Spec:
//! `docs/formats/tar-media.md`.
//!
//! Layout of `DIR/<set>.tar`:
//! - per item, a pax extended header (`path`, `size`, and Floe's fields
//!   as `comment` records, `FLOE.item=…`, `FLOE.kind=…`, `FLOE.config=…`,
//!   `FLOE.meta.*=…`, which tar ignores silently), a ustar header, the
//!   item's bytes padded to 512;
//! - last, the set's index: an entry `<set>/floe-index.json` (marked by
//!   the record `comment=FLOE.index=1`) holding the set record — checksums, config ids, and
//!   where each item's bytes start;
//! - two zero blocks, then zeros to a whole record (default 256 KiB).
//!
//! A set is written as `.<set>.tar.partial`, fsynced, and renamed into
//! place: only complete archives have the `.tar` name.
//!
//! Config: `dir`; `record_size` (bytes, a multiple of 512; default 262144);
//! `direct` (default true: archives are written with O_DIRECT where the
//! file system takes it, see `out.rs`; false: through the page cache);
//! `compress` (`none`, the default, or `zstd`: the set is `<set>.tar.zst`,
//! the same archive in independent zstd frames with a seek table, see
//! `zst.rs`) and `compress_level` (zstd's level, default 1).

/// mimalloc instead of glibc's malloc inside this plugin (a cdylib has its
/// own allocator): writing and reading a set allocate per item (headers,
/// records, the index); glibc's malloc, realloc and free in the `tar`
/// plugin were a tenth of the mover's CPU on the 70,000-file tree.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use floe_core::abi::{Interface, MediaReader, MediaWriter, Plugin, PluginInfo};
use floe_core::error::{Error, ErrorKind, Result};
use floe_core::model::*;
use floe_core::units::Bytes;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use floe_core::media::SetIndex;

mod out;
use out::ArchiveOut;
pub mod zst;
use zst::{FrameSizes, ZstOut};

use floe_core::pax::{
    archive_end_located, index_entry_head, index_entry_padding, index_json_around, item_entry,
    EntryReader, EntryStream,
};
pub use floe_core::pax::{Index, BLOCK, INDEX_MAGIC, INDEX_VERSION as VERSION};
const DEFAULT_RECORD: u64 = 256 * 1024;
/// Read buffer of a restore: a tree's small items come from it without
/// a read each.
const READ_BUFFER: usize = 256 * 1024;
/// Largest index entry a locator may point at (a set of millions of items
/// stays well below).
const MAX_INDEX: u64 = 4 << 30;

/// What a partial archive's journal says: enough to resume it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    /// `floe-tar-journal`.
    pub magic: String,
    /// [`VERSION`].
    pub version: u32,
    /// The set's header.
    pub header: SetHeader,
    /// Items whose bytes are durable in the archive.
    pub items: Vec<ItemRecord>,
    /// Where the archive ends after the last of them.
    pub end: u64,
    /// Items that could not be backed up, so far.
    #[serde(default)]
    pub failures: Vec<ItemFailure>,
    /// A compressed archive's compression (`zstd`), none for a plain one.
    #[serde(default)]
    pub compress: Option<String>,
    /// A compressed archive's frames up to `end` (its first bytes).
    #[serde(default)]
    pub frames: Vec<FrameSizes>,
}

const JOURNAL_MAGIC: &str = "floe-tar-journal";

/// Journal format version (append-only JSON lines) of a plain archive.
pub const JOURNAL_VERSION: u32 = 2;
/// Journal format version of a compressed archive (its head names the
/// compression; `frames` lines carry the seek table as it grows).
pub const JOURNAL_VERSION_COMPRESSED: u32 = 3;

/// The journal's first line.
#[derive(Serialize, Deserialize)]
struct JournalHead {
    magic: String,
    version: u32,
    header: SetHeader,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    compress: Option<String>,
}

/// Every later line: a durable item and where the archive ends after it,
/// a failure, or (compressed archives) the frames made durable since the
/// last such line and where the archive ends after them.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum JournalLine {
    Item { record: Box<ItemRecord>, end: u64 },
    Failure(ItemFailure),
    Frames { end: u64, table: Vec<FrameSizes> },
}

/// Decode and check a journal: a head line, then item and failure lines.
/// A last line without its newline was torn by a crash and is ignored.
pub fn decode_journal(bytes: &[u8], path: &Path) -> Result<Journal> {
    let bad = |what: String| Error::new(ErrorKind::Media, what).path(path);
    let mut lines = complete_lines(bytes).ok_or_else(|| bad("empty or torn tar journal".into()))?;
    let head: JournalHead = lines
        .next()
        .and_then(|l| serde_json::from_slice(l).ok())
        .ok_or_else(|| bad("malformed tar journal head".into()))?;
    let compressed = match (head.version, head.compress.as_deref()) {
        (JOURNAL_VERSION, None) => false,
        (JOURNAL_VERSION_COMPRESSED, Some("zstd")) => true,
        _ => {
            return Err(bad(format!(
                "not a Floe tar journal of version {JOURNAL_VERSION} or \
                 {JOURNAL_VERSION_COMPRESSED} (zstd): {:?} version {} compress {:?}",
                head.magic, head.version, head.compress
            )))
        }
    };
    if head.magic != JOURNAL_MAGIC {
        return Err(bad(format!("not a Floe tar journal: {:?}", head.magic)));
    }
    let mut j = Journal {
        magic: head.magic,
        version: head.version,
        header: head.header,
        items: Vec::new(),
        end: 0,
        failures: Vec::new(),
        compress: head.compress,
        frames: Vec::new(),
    };
    // Compressed: only what a `frames` line covers is durable (its items
    // and the frames end at the same byte); item lines after the last one
    // were torn off with it.
    let (mut item_end, mut framed, mut frames_end) = (0, 0, 0u64);
    for (n, l) in lines.enumerate() {
        let at = |end: u64| {
            bad(format!(
                "tar journal line {} ends the archive at {end}",
                n + 2
            ))
        };
        match serde_json::from_slice::<JournalLine>(l) {
            Ok(JournalLine::Item { record, end }) => {
                if end < item_end || !end.is_multiple_of(BLOCK) {
                    return Err(at(end));
                }
                item_end = end;
                j.items.push(*record);
            }
            Ok(JournalLine::Failure(f)) => j.failures.push(f),
            Ok(JournalLine::Frames { end, table }) if compressed => {
                j.frames.extend(table);
                let sum: u64 = j.frames.iter().map(|[_, d]| u64::from(*d)).sum();
                if end < item_end || sum != end || j.frames.iter().any(|[c, d]| *c == 0 || *d == 0)
                {
                    return Err(at(end));
                }
                (framed, frames_end) = (j.items.len(), end);
            }
            Ok(JournalLine::Frames { .. }) => {
                return Err(bad(format!(
                    "tar journal line {}: frames in a plain archive's journal",
                    n + 2
                )))
            }
            Err(e) => return Err(bad(format!("malformed tar journal line {}", n + 2)).source(e)),
        }
    }
    if compressed {
        j.items.truncate(framed);
        j.end = frames_end;
    } else {
        j.end = item_end;
    }
    Ok(j)
}

use floe_core::media::{
    checked_set_name as set_name, complete_lines, errpoint, fsync_dir, json_line,
    media_io_error as media_err, no_set_error,
};

/// Where an archive's bytes go: straight to the file, or through zstd
/// frames.
enum Sink {
    Plain(ArchiveOut),
    Zst(ZstOut),
}

impl Sink {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Plain(o) => o.put(bytes),
            Sink::Zst(o) => o.put(bytes),
        }
    }

    fn hand_over(&mut self) -> std::io::Result<Option<out::Handed>> {
        match self {
            Sink::Plain(o) => o.hand_over(),
            Sink::Zst(o) => o.hand_over(),
        }
    }

    fn finish(&mut self, len: u64) -> std::io::Result<()> {
        match self {
            Sink::Plain(o) => o.finish(len),
            Sink::Zst(o) => o.finish(len),
        }
    }

    fn file(&self) -> &File {
        match self {
            Sink::Plain(o) => o.file(),
            Sink::Zst(o) => o.file(),
        }
    }

    /// The compression, as the journal names it.
    fn compress(&self) -> Option<String> {
        matches!(self, Sink::Zst(_)).then(|| "zstd".to_string())
    }

    /// The archive's file name's ending once committed.
    fn suffix(&self) -> &'static str {
        match self {
            Sink::Plain(_) => "tar",
            Sink::Zst(_) => "tar.zst",
        }
    }
}

/// The file names a set's committed archive may have.
fn archive_names(dir: &Path, name: &str) -> [PathBuf; 2] {
    [
        dir.join(format!("{name}.tar")),
        dir.join(format!("{name}.tar.zst")),
    ]
}

struct Writing {
    header: SetHeader,
    path: PathBuf,
    /// The archive's bytes on their way (`pos` counts what was put).
    out: Sink,
    /// Frames of a compressed archive already named by the journal.
    journaled_frames: usize,
    /// Makes the archive durable and appends journal lines behind the
    /// writer (started once the journal exists).
    syncer: Option<Syncer>,
    pos: u64,
    /// Items ended so far.
    items: usize,
    /// The headers of the items written at commit (hard links and
    /// directories); every other record lives only in `encoded` and the
    /// journal (70,000 records kept a second time here were a tenth of
    /// the mover's memory).
    held: Vec<ItemHeader>,
    failures: Vec<ItemFailure>,
    /// The item being written.
    current: Option<Current>,
    /// Items ended since the journal was last written, and when it was.
    unjournaled: (usize, std::time::Instant),
    /// Journal lines waiting for the next checkpoint.
    pending: Vec<u8>,
    /// Every item record's JSON, comma-separated: encoded once, for its
    /// journal line and for the index.
    encoded: Encoded,
}

/// The item being written: its header (and the JSON it came as), where
/// its data area starts, and the stream that stores its bytes.
struct Current {
    header: ItemHeader,
    json: String,
    start: u64,
    stream: EntryStream,
}

/// An item record's JSON from its parts, each serde's compact JSON: the
/// bytes serde writes for the [`ItemRecord`] (its fields in order), with
/// the header as it came (not encoded a second time).
fn record_json(header: &str, trailer: &ItemTrailer, position: &MediaPosition) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(header.len() + 320);
    out.extend_from_slice(b"{\"header\":");
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(b",\"trailer\":");
    serde_json::to_writer(&mut out, trailer)
        .and_then(|()| {
            out.extend_from_slice(b",\"position\":");
            serde_json::to_writer(&mut out, position)
        })
        .map_err(|e| Error::new(ErrorKind::Media, "cannot encode item record").source(e))?;
    out.push(b'}');
    Ok(out)
}

/// The journal line of an item whose record is encoded already: what
/// serde writes for `JournalLine::Item` (`{"item":{"record":…,"end":…}}`)
/// and a newline.
fn item_line(record: &[u8], end: u64) -> Vec<u8> {
    let mut line = Vec::with_capacity(record.len() + 48);
    line.extend_from_slice(b"{\"item\":{\"record\":");
    line.extend_from_slice(record);
    line.extend_from_slice(format!(",\"end\":{end}}}}}\n").as_bytes());
    line
}

/// Encode an item record (for the journal and the index).
fn encode_record(record: &ItemRecord) -> Result<Box<serde_json::value::RawValue>> {
    serde_json::value::to_raw_value(record)
        .map_err(|e| Error::new(ErrorKind::Media, "cannot encode item record").source(e))
}

/// Every item record's JSON, comma-separated, in pieces: grown without
/// copying and written into the index from where it is (a 70,000-file
/// set's records are 50 MB; growing one buffer by doubling and copying it
/// into the index entry twice cost the commit 0.4 s of page faults).
#[derive(Default)]
struct Encoded {
    pieces: Vec<Vec<u8>>,
    len: usize,
}

impl Encoded {
    /// Size of a piece (a record larger than this gets a piece of its own).
    const PIECE: usize = 1 << 20;

    /// Add an encoded record to the index's items.
    fn add(&mut self, bytes: &[u8]) {
        let comma = usize::from(self.len > 0);
        let need = comma + bytes.len();
        let piece = match self.pieces.last_mut() {
            Some(p) if p.len() + need <= p.capacity() => p,
            _ => {
                self.pieces.push(Vec::with_capacity(Self::PIECE.max(need)));
                self.pieces.last_mut().expect("a piece was just added")
            }
        };
        if comma == 1 {
            piece.push(b',');
        }
        piece.extend_from_slice(bytes);
        self.len += need;
    }
}

/// The journal is written after a volume, and otherwise once this many
/// items or seconds have gone by (a tree of small files is not fsynced
/// once per file).
const CHECKPOINT_ITEMS: usize = 1024;
const CHECKPOINT_SECS: u64 = 1;

/// Writes sets as pax archives.
pub struct TarWriter {
    dir: PathBuf,
    record: u64,
    /// Write archives with O_DIRECT where the file system takes it.
    direct: bool,
    /// Compress new archives with zstd at this level.
    compress: Option<i32>,
    set: Option<Writing>,
}

impl TarWriter {
    fn w(&mut self) -> Result<&mut Writing> {
        self.set
            .as_mut()
            .ok_or_else(|| Error::new(ErrorKind::Media, "no set begun"))
    }
}

fn journal_path(dir: &Path, set: &SetId) -> PathBuf {
    dir.join(format!(".{set}.tar.journal"))
}

/// Start the journal: its head line and the lines of what is durable
/// already (`records`, on resume); temporary file, fsync, rename, fsync
/// the directory. The journal never names bytes that are not on the media.
fn write_journal(dir: &Path, w: &Writing, records: &[ItemRecord]) -> Result<()> {
    w.out
        .file()
        .sync_data()
        .map_err(|e| media_err("fsync archive", &w.path, e))?;
    let compress = w.out.compress();
    let mut bytes = json_line(&JournalHead {
        magic: JOURNAL_MAGIC.into(),
        version: if compress.is_some() {
            JOURNAL_VERSION_COMPRESSED
        } else {
            JOURNAL_VERSION
        },
        header: w.header.clone(),
        compress,
    })?;
    // On resume the archive was cut at `pos`: the last item ends there.
    for (k, it) in records.iter().enumerate() {
        let end = if k + 1 == records.len() { w.pos } else { 0 };
        bytes.extend(json_line(&JournalLine::Item {
            record: Box::new(it.clone()),
            end,
        })?);
    }
    if let Sink::Zst(o) = &w.out {
        bytes.extend(json_line(&JournalLine::Frames {
            end: w.pos,
            table: o.frames().to_vec(),
        })?);
    }
    for f in &w.failures {
        bytes.extend(json_line(&JournalLine::Failure(f.clone()))?);
    }
    let path = journal_path(dir, &w.header.set);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &bytes)
        .and_then(|()| File::open(&tmp).and_then(|f| f.sync_all()))
        .map_err(|e| media_err("write journal", &tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| media_err("rename journal", &path, e))?;
    fsync_dir(dir)
}

/// Makes the archive durable and then appends journal lines, on a thread
/// of its own: the writer hands the lines of the items it has written
/// (all their bytes handed to the kernel or to the archive's write
/// thread, see [`ArchiveOut::hand_over`]) and goes on, so a tree of small
/// files never waits for the device. Each batch of lines is appended only
/// after the writes it waits for are done and an fsync of the archive
/// that began after that, so the journal never names bytes that are not
/// on the media.
struct Syncer {
    /// Lines, and the writes of the archive to wait for before its fsync.
    lines: Option<std::sync::mpsc::Sender<(Vec<u8>, Option<out::Handed>)>>,
    /// Buffers of lines appended already, emptied, back for the next
    /// checkpoint (fresh ones cost page faults on every checkpoint).
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Syncer {
    fn start(w: &Writing, journal: PathBuf) -> Result<Syncer> {
        let archive = w
            .out
            .file()
            .try_clone()
            .map_err(|e| media_err("open archive for fsync", &w.path, e))?;
        let path = w.path.clone();
        let (tx, rx) = std::sync::mpsc::channel::<(Vec<u8>, Option<out::Handed>)>();
        let (back, spare) = std::sync::mpsc::channel::<Vec<u8>>();
        let thread = std::thread::Builder::new()
            .name("floe-tar-sync".into())
            .spawn(move || {
                let mut log: Option<File> = None;
                while let Ok((mut lines, mut handed)) = rx.recv() {
                    // Whatever queued meanwhile rides on the same fsync
                    // (after the writes the last of it waits for).
                    while let Ok((mut more, later)) = rx.try_recv() {
                        lines.extend_from_slice(&more);
                        more.clear();
                        let _ = back.send(more);
                        handed = later.or(handed);
                    }
                    if let Some(h) = &handed {
                        h.wait().map_err(|e| media_err("write archive", &path, e))?;
                    }
                    let synced = if errpoint("tar-sync") {
                        Err(std::io::Error::from_raw_os_error(5)) // EIO
                    } else {
                        archive.sync_data()
                    };
                    synced.map_err(|e| media_err("fsync archive", &path, e))?;
                    if lines.is_empty() {
                        continue;
                    }
                    let f = match &mut log {
                        Some(f) => f,
                        None => log.insert(
                            OpenOptions::new()
                                .append(true)
                                .open(&journal)
                                .map_err(|e| media_err("open journal", &journal, e))?,
                        ),
                    };
                    f.write_all(&lines)
                        .and_then(|()| f.sync_data())
                        .map_err(|e| media_err("append to journal", &journal, e))?;
                    lines.clear();
                    let _ = back.send(lines);
                }
                Ok(())
            })
            .map_err(|e| media_err("start the archive's fsync thread", &w.path, e))?;
        Ok(Syncer {
            lines: Some(tx),
            spare,
            thread: Some(thread),
        })
    }

    /// Hand over lines, to be appended once `handed` is written and the
    /// archive fsynced; the error of a syncer that stopped.
    fn send(&mut self, lines: Vec<u8>, handed: Option<out::Handed>) -> Result<()> {
        let sent = self
            .lines
            .as_ref()
            .is_some_and(|tx| tx.send((lines, handed)).is_ok());
        if sent {
            Ok(())
        } else {
            self.stop()
        }
    }

    /// Wait until everything handed over is durable and journaled.
    fn stop(&mut self) -> Result<()> {
        drop(self.lines.take());
        match self.thread.take().map(std::thread::JoinHandle::join) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(_)) => Err(Error::new(
                ErrorKind::Media,
                "the archive's fsync thread panicked",
            )),
        }
    }
}

impl Drop for Syncer {
    /// A writer dropped without commit or abort (its set stays resumable)
    /// leaves the journal as complete as what it handed over.
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Record the items written so far in the journal once the archive holds
/// them durably (behind the writer, see [`Syncer`]).
fn checkpoint(dir: &Path, w: &mut Writing) -> Result<()> {
    let handed = w
        .out
        .hand_over()
        .map_err(|e| media_err("write archive", &w.path, e))?;
    if let Sink::Zst(o) = &w.out {
        // Every byte put is in whole frames now: the frames line after the
        // items' lines says where the resumable archive ends.
        let line = json_line(&JournalLine::Frames {
            end: w.pos,
            table: o.frames()[w.journaled_frames..].to_vec(),
        })?;
        w.pending.extend_from_slice(&line);
        w.journaled_frames = o.frames().len();
    }
    let syncer = match &mut w.syncer {
        Some(s) => s,
        None => w
            .syncer
            .insert(Syncer::start(w, journal_path(dir, &w.header.set))?),
    };
    let spare = syncer.spare.try_recv().unwrap_or_default();
    let lines = std::mem::replace(&mut w.pending, spare);
    syncer.send(lines, handed)?;
    w.unjournaled = (0, std::time::Instant::now());
    Ok(())
}

/// Append bytes to the archive.
fn put(w: &mut Writing, bytes: &[u8]) -> Result<()> {
    w.out
        .put(bytes)
        .map_err(|e| media_err("write archive", &w.path, e))?;
    w.pos += bytes.len() as u64;
    Ok(())
}

impl MediaWriter for TarWriter {
    fn begin_set(&mut self, header: &SetHeader) -> Result<()> {
        let name = set_name(&header.set)?;
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| media_err("create media directory", &self.dir, e))?;
        if archive_names(&self.dir, name).iter().any(|p| p.exists()) {
            return Err(Error::new(
                ErrorKind::Media,
                format!("set {name} exists on this media"),
            ));
        }
        let (path, out) = match self.compress {
            None => {
                let path = self.dir.join(format!(".{name}.tar.partial"));
                let out = ArchiveOut::create(&path, self.direct).map(Sink::Plain);
                (path, out)
            }
            Some(level) => {
                let path = self.dir.join(format!(".{name}.tar.zst.partial"));
                let out = ZstOut::create(&path, self.direct, level).map(Sink::Zst);
                (path, out)
            }
        };
        let out = out.map_err(|e| media_err("create archive", &path, e))?;
        let w = Writing {
            header: header.clone(),
            path,
            out,
            journaled_frames: 0,
            syncer: None,
            pos: 0,
            items: 0,
            held: Vec::new(),
            failures: Vec::new(),
            current: None,
            unjournaled: (0, std::time::Instant::now()),
            pending: Vec::new(),
            encoded: Encoded::default(),
        };
        write_journal(&self.dir, &w, &[])?;
        self.set = Some(w);
        Ok(())
    }

    fn resume_set(&mut self, set: &SetId) -> Result<SetRecord> {
        let name = set_name(set)?;
        if archive_names(&self.dir, name).iter().any(|p| p.exists()) {
            return Err(Error::new(
                ErrorKind::Media,
                format!("set {set} is already committed: nothing to resume"),
            ));
        }
        let jpath = journal_path(&self.dir, set);
        let bytes = std::fs::read(&jpath).map_err(|e| {
            Error::new(
                ErrorKind::NotFound,
                format!("no interrupted set {set} on media {}", self.dir.display()),
            )
            .path(&jpath)
            .source(e)
        })?;
        let j = decode_journal(&bytes, &jpath)?;
        // The journal decides the archive's form (a compressed set goes on
        // compressed whatever this writer's `compress` says).
        let compressed = j.compress.is_some();
        let path = self.dir.join(if compressed {
            format!(".{name}.tar.zst.partial")
        } else {
            format!(".{name}.tar.partial")
        });
        let len = std::fs::metadata(&path)
            .map_err(|e| media_err("open partial archive", &path, e))?
            .len();
        let durable = if compressed {
            zst::compressed_len(&j.frames)
        } else {
            j.end
        };
        if len < durable {
            return Err(Error::new(
                ErrorKind::Media,
                format!("partial archive holds {len} bytes, its journal says {durable}"),
            )
            .path(&path));
        }
        // Whatever follows the last durable item is the item being written
        // when the writer died: cut it off and go on from there.
        let out = if compressed {
            let level = self.compress.unwrap_or(DEFAULT_LEVEL);
            ZstOut::resume(&path, j.frames.clone(), self.direct, level).map(Sink::Zst)
        } else {
            ArchiveOut::resume(&path, j.end, self.direct).map(Sink::Plain)
        }
        .map_err(|e| media_err("open partial archive to go on", &path, e))?;
        let record = SetRecord {
            header: j.header.clone(),
            items: j.items.clone(),
            failures: j.failures.clone(),
            committed_at: 0,
        };
        let mut encoded = Encoded::default();
        for it in &j.items {
            encoded.add(encode_record(it)?.get().as_bytes());
        }
        self.set = Some(Writing {
            header: j.header,
            path,
            journaled_frames: j.frames.len(),
            out,
            syncer: None,
            pos: j.end,
            items: j.items.len(),
            held: j
                .items
                .iter()
                .filter(|i| floe_core::pax::written_last(i.header.kind))
                .map(|i| i.header.clone())
                .collect(),
            failures: j.failures,
            current: None,
            unjournaled: (0, std::time::Instant::now()),
            pending: Vec::new(),
            encoded,
        });
        // A fresh journal of exactly what is durable (drops a torn line).
        let dir = self.dir.clone();
        write_journal(&dir, self.w()?, &j.items)?;
        Ok(record)
    }

    fn begin_item(&mut self, header: &ItemHeader) -> Result<()> {
        let json = serde_json::to_string(header)
            .map_err(|e| Error::new(ErrorKind::Media, "cannot encode item header").source(e))?;
        self.begin_item_from(header.clone(), &json)
    }

    fn begin_item_from(&mut self, header: ItemHeader, json: &str) -> Result<()> {
        let w = self.w()?;
        if w.current.is_some() {
            return Err(Error::new(ErrorKind::Media, "begin_item inside an item"));
        }
        let entry = item_entry(&w.header.set, &header, w.header.frozen_at)?;
        let stream = EntryStream::new(header.item.as_str(), &entry);
        // Hard links and directories are written at commit: GNU tar links
        // to a path it has already extracted, and sets a directory's times
        // once no more members go into it.
        let start = if floe_core::pax::written_last(header.kind) {
            w.pos
        } else {
            put(w, &entry.head)?;
            w.pos - (entry.head.len() - entry.data_at) as u64
        };
        w.current = Some(Current {
            header,
            json: json.to_owned(),
            start,
            stream,
        });
        Ok(())
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        let w = self.w()?;
        let Some(mut c) = w.current.take() else {
            return Err(Error::new(ErrorKind::Media, "write outside an item"));
        };
        let r = c.stream.feed(data, &mut |b| put(w, b));
        w.current = Some(c);
        r
    }

    fn end_item(&mut self, trailer: &ItemTrailer) -> Result<MediaPosition> {
        let medium = self.dir.display().to_string();
        let w = self.w()?;
        let Current {
            header: h,
            json,
            start,
            stream,
        } = w
            .current
            .take()
            .ok_or_else(|| Error::new(ErrorKind::Media, "end_item outside an item"))?;
        let pad = stream.finish()?;
        if trailer.length != h.size {
            return Err(Error::new(
                ErrorKind::Media,
                format!(
                    "item {}: trailer says {} bytes, its header said {}",
                    h.item, trailer.length, h.size
                ),
            ));
        }
        put(w, &pad)?;
        let position = MediaPosition {
            medium,
            locator: format!("{}.tar@{start}", w.header.set),
        };
        let enc = record_json(&json, trailer, &position)?;
        w.pending.extend_from_slice(&item_line(&enc, w.pos));
        w.encoded.add(&enc);
        w.items += 1;
        let volume = h.kind == ItemKind::Volume;
        if floe_core::pax::written_last(h.kind) {
            w.held.push(h);
        }
        w.unjournaled.0 += 1;
        if volume
            || w.unjournaled.0 >= CHECKPOINT_ITEMS
            || w.unjournaled.1.elapsed().as_secs() >= CHECKPOINT_SECS
        {
            let dir = self.dir.clone();
            checkpoint(&dir, self.w()?)?;
        }
        Ok(position)
    }

    fn fail_item(&mut self, failure: &ItemFailure) -> Result<()> {
        let w = self.w()?;
        if w.current.is_some() {
            return Err(Error::new(ErrorKind::Media, "fail_item inside an item"));
        }
        if !w.failures.iter().any(|f| f.item == failure.item) {
            w.failures.push(failure.clone());
            let line = json_line(&JournalLine::Failure(failure.clone()))?;
            w.pending.extend_from_slice(&line);
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<Committed> {
        let record_size = self.record;
        let dir = self.dir.clone();
        let mut w = self
            .set
            .take()
            .ok_or_else(|| Error::new(ErrorKind::Media, "commit without a set"))?;
        if w.current.is_some() {
            return Err(Error::new(
                ErrorKind::Media,
                "commit with an item still open",
            ));
        }
        // The index's head and tail; its items are the records encoded as
        // they ended.
        let record = SetRecord {
            header: w.header.clone(),
            items: Vec::new(),
            failures: std::mem::take(&mut w.failures),
            committed_at: now_secs(),
        };
        let held = std::mem::take(&mut w.held);
        let result = (|| {
            if let Some(mut s) = w.syncer.take() {
                s.stop()?;
            }
            // Hard links and directories last, then the index, then the
            // end of the archive.
            for h in floe_core::pax::last_entries(&held) {
                let e = item_entry(&w.header.set, &h, w.header.frozen_at)?;
                put(&mut w, &e.head)?;
            }
            // The index from the records encoded as they ended, written
            // from where they are.
            let (json_head, json_tail) =
                index_json_around(&record.header, &record.failures, record.committed_at)?;
            let encoded = std::mem::take(&mut w.encoded);
            let json_len = (json_head.len() + encoded.len + json_tail.len()) as u64;
            let index_at = w.pos;
            put(
                &mut w,
                &index_entry_head(&record.header.set, record.committed_at, json_len),
            )?;
            put(&mut w, &json_head)?;
            for piece in &encoded.pieces {
                put(&mut w, piece)?;
            }
            // Freed with the rest, off this thread.
            w.encoded = encoded;
            put(&mut w, &json_tail)?;
            put(&mut w, &vec![0; index_entry_padding(json_len)])?;
            let end = archive_end_located(w.pos, record_size, index_at, w.pos - index_at);
            put(&mut w, &end)?;
            let len = w.pos;
            w.out
                .finish(len)
                .and_then(|()| w.out.file().sync_all())
                .map_err(|e| media_err("fsync archive", &w.path, e))?;
            let fin = dir.join(format!("{}.{}", w.header.set, w.out.suffix()));
            std::fs::rename(&w.path, &fin)
                .map_err(|e| media_err("rename archive into place", &fin, e))?;
            let _ = std::fs::remove_file(journal_path(&dir, &w.header.set));
            fsync_dir(&dir)
        })();
        if let Err(e) = result {
            // As an abort: nothing of the set stays (a journal without its
            // archive would offer a resume that cannot be).
            let _ = std::fs::remove_file(&w.path);
            let _ = std::fs::remove_file(journal_path(&dir, &w.header.set));
            return Err(e);
        }
        let committed = Committed {
            committed_at: record.committed_at,
            items: w.items as u64,
            positions: Vec::new(),
        };
        floe_core::media::drop_later((record, held, w));
        Ok(committed)
    }

    fn abort(&mut self) -> Result<()> {
        if let Some(mut w) = self.set.take() {
            if let Some(mut s) = w.syncer.take() {
                let _ = s.stop();
            }
            let _ = std::fs::remove_file(journal_path(&self.dir, &w.header.set));
            std::fs::remove_file(&w.path)
                .map_err(|e| media_err("remove partial archive", &w.path, e))?;
        }
        Ok(())
    }

    fn delete_set(&mut self, set: &SetId) -> Result<()> {
        let name = set_name(set)?;
        let Some(path) = archive_names(&self.dir, name)
            .into_iter()
            .find(|p| p.exists())
        else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("no set {set} on media {}", self.dir.display()),
            ));
        };
        std::fs::remove_file(&path).map_err(|e| media_err("delete archive", &path, e))
    }
}

/// Find and decode a set's index by walking the archive's headers
/// (seeking over data).
pub fn read_index(r: &mut (impl Read + Seek), path: &Path) -> Result<SetRecord> {
    // The last block locates the index entry; archives without one are
    // walked header by header.
    let len = r
        .seek(SeekFrom::End(0))
        .map_err(|e| media_err("seek archive", path, e))?;
    if len >= 2 * BLOCK {
        let mut last = [0u8; 512];
        r.seek(SeekFrom::Start(len - BLOCK))
            .and_then(|_| r.read_exact(&mut last))
            .map_err(|e| media_err("read archive", path, e))?;
        if let Some((at, n)) = floe_core::pax::read_locator(&last).filter(|(at, n)| {
            at.checked_add(*n).is_some_and(|e| e <= len - BLOCK) && *n <= MAX_INDEX
        }) {
            let mut entry = vec![0u8; usize::try_from(n).unwrap_or(0)];
            r.seek(SeekFrom::Start(at))
                .and_then(|_| r.read_exact(&mut entry))
                .map_err(|e| media_err("read archive index", path, e))?;
            let located =
                floe_core::pax::find_index(&mut std::io::Cursor::new(entry), &mut seek_over);
            // A locator that points at anything but an index is ignored:
            // the walk below is the authority.
            if let Ok(record) = located {
                return Ok(record);
            }
        }
    }
    r.seek(SeekFrom::Start(0))
        .map_err(|e| media_err("seek archive", path, e))?;
    floe_core::pax::find_index(r, &mut seek_over).map_err(|e| e.path(path))
}

/// Skip `n` bytes of entry data by seeking.
fn seek_over<S: Seek>(s: &mut S, n: u64) -> std::io::Result<()> {
    let off = i64::try_from(n).map_err(std::io::Error::other)?;
    s.seek(SeekFrom::Current(off)).map(|_| ())
}

/// An archive open for reading: a plain one through a buffer, a
/// compressed one through its frames (read in the archive's offsets).
pub enum Source {
    Plain(std::io::BufReader<File>),
    Zst(zst::ZstReader),
}

impl Source {
    /// Open the archive at `path` (`.tar.zst`: compressed).
    pub fn open(path: &Path) -> std::io::Result<Source> {
        let f = File::open(path)?;
        if path.extension().is_some_and(|e| e == "zst") {
            let ix = zst::FrameIndex::read(&f).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("compressed archive: {e}"),
                )
            })?;
            Ok(Source::Zst(zst::ZstReader::new(f, Arc::new(ix))?))
        } else {
            Ok(Source::Plain(std::io::BufReader::with_capacity(
                READ_BUFFER,
                f,
            )))
        }
    }

    fn file(&self) -> &File {
        match self {
            Source::Plain(b) => b.get_ref(),
            Source::Zst(z) => z.file(),
        }
    }

    /// Move to the archive's offset `to` (within a plain archive's buffer,
    /// without a read).
    fn go_to(&mut self, to: u64) -> std::io::Result<()> {
        match self {
            Source::Plain(f) => {
                let here = f.stream_position()?;
                match i64::try_from(to).ok().zip(i64::try_from(here).ok()) {
                    Some((s, h)) => f.seek_relative(s - h),
                    None => f.seek(SeekFrom::Start(to)).map(|_| ()),
                }
            }
            Source::Zst(z) => z.seek(SeekFrom::Start(to)).map(|_| ()),
        }
    }
}

impl Read for Source {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Source::Plain(f) => f.read(buf),
            Source::Zst(z) => z.read(buf),
        }
    }
}

impl Seek for Source {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        match self {
            Source::Plain(f) => f.seek(to),
            Source::Zst(z) => z.seek(to),
        }
    }
}

/// Reads sets from pax archives.
pub struct TarReader {
    dir: PathBuf,
    open: Option<(EntryReader<Source>, PathBuf)>,
    /// The archive last read, between items: a tree's items are read one
    /// after another from one open, buffered file.
    idle: Option<(Source, PathBuf)>,
    /// The last set's index, by item (a set of 70,000 files is opened
    /// item by item).
    cached: Option<Arc<SetIndex>>,
}

/// An archive's identity (path, device, inode, size, mtime, ctime): one
/// rewritten or replaced is parsed again. (Each item's bytes are checked
/// against its BLAKE3 on restore besides.)
type ArchiveKey = (PathBuf, u64, u64, u64, (i64, i64), (i64, i64));

/// Parsed indexes, shared by every reader of this process: a tree restore
/// opens a reader per worker after listing the sets, and a 70,000-item
/// index is ~40 MB of JSON — parsed once, not once per reader and once
/// more for the listing.
static INDEXES: Mutex<Vec<(ArchiveKey, Arc<SetIndex>)>> = Mutex::new(Vec::new());
/// Indexes kept (the most recently parsed).
const INDEXES_KEPT: usize = 2;

/// The index of the archive open as `f`, parsed or shared.
fn shared_index(f: &mut Source, path: &Path) -> Result<Arc<SetIndex>> {
    use std::os::unix::fs::MetadataExt;
    let m = f
        .file()
        .metadata()
        .map_err(|e| media_err("stat archive", path, e))?;
    let key = (
        path.to_path_buf(),
        m.dev(),
        m.ino(),
        m.len(),
        (m.mtime(), m.mtime_nsec()),
        (m.ctime(), m.ctime_nsec()),
    );
    // Held while parsing: readers opening at once wait for one parse.
    let mut kept = INDEXES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, ix)) = kept.iter().find(|(k, _)| *k == key) {
        return Ok(ix.clone());
    }
    let ix = Arc::new(SetIndex::new(read_index(f, path)?));
    kept.push((key, ix.clone()));
    if kept.len() > INDEXES_KEPT {
        kept.remove(0);
    }
    Ok(ix)
}

impl TarReader {
    /// The archive of `set`, buffered: the one read last when it is that
    /// one (a tree's items come one after another from it), else opened.
    fn archive(&mut self, set: &SetId) -> Result<(Source, PathBuf)> {
        let name = set_name(set)?;
        let names = archive_names(&self.dir, name);
        if let Some((entry, p)) = self.open.take() {
            self.idle = Some((entry.into_inner(), p));
        }
        if let Some((f, p)) = self.idle.take() {
            if names.contains(&p) {
                return Ok((f, p));
            }
        }
        // A plain archive unless only a compressed one is there.
        let [plain, zst] = names;
        let path = if !plain.exists() && zst.exists() {
            zst
        } else {
            plain
        };
        let f = Source::open(&path).map_err(|e| no_set_error(set, &self.dir, &path, e))?;
        Ok((f, path))
    }

    /// Start reading the entry whose data `at` locates (`SET.tar@OFFSET`).
    fn enter(&mut self, mut f: Source, path: PathBuf, at: &ItemAt) -> Result<()> {
        let start: u64 = at
            .position
            .locator
            .rsplit_once('@')
            .and_then(|(_, o)| o.parse().ok())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Media,
                    format!("bad locator {:?}", at.position.locator),
                )
                .path(&path)
                .item(&at.item)
            })?;
        let (size, sparse) = if at.kind.has_bytes() {
            (at.size.0, !at.holes.is_empty())
        } else {
            (0, false)
        };
        // Within the buffer (the next item, or the one after), no read.
        f.go_to(start)
            .map_err(|e| media_err("seek archive", &path, e))?;
        let entry = EntryReader::new(f, size, sparse).map_err(|e| e.path(&path).item(&at.item))?;
        self.open = Some((entry, path));
        Ok(())
    }
}

impl MediaReader for TarReader {
    fn list_sets(&mut self) -> Result<Vec<SetRecord>> {
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| media_err("list media directory", &self.dir, e))?;
        let mut sets = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') || !(name.ends_with(".tar") || name.ends_with(".tar.zst")) {
                continue;
            }
            let path = e.path();
            let mut f = Source::open(&path).map_err(|err| media_err("open archive", &path, err))?;
            sets.push(shared_index(&mut f, &path)?.record.clone());
        }
        sets.sort_by(|a, b| (a.committed_at, &a.header.set).cmp(&(b.committed_at, &b.header.set)));
        Ok(sets)
    }

    fn open_item(&mut self, set: &SetId, item: &ItemId) -> Result<ItemRecord> {
        let (f, path) = self.archive(set)?;
        if self.cached.as_ref().is_none_or(|c| c.set() != set) {
            // The index through a handle of its own (the buffered one's
            // position is left alone).
            let mut raw = Source::open(&path).map_err(|e| media_err("open archive", &path, e))?;
            let ix = shared_index(&mut raw, &path)?;
            if ix.set() != set {
                return Err(Error::new(
                    ErrorKind::Media,
                    format!(
                        "archive {} holds set {}, not {set}",
                        path.display(),
                        ix.set()
                    ),
                )
                .path(&path));
            }
            self.cached = Some(ix);
        }
        let rec = self.cached.as_ref().expect("loaded above").item(item)?;
        self.enter(f, path, &ItemAt::of(&rec))?;
        Ok(rec)
    }

    fn open_at(&mut self, set: &SetId, at: &ItemAt) -> Result<()> {
        let (f, path) = self.archive(set)?;
        self.enter(f, path, at)
    }

    fn read(&mut self, max: usize) -> Result<Vec<u8>> {
        let (entry, path) = self
            .open
            .as_mut()
            .ok_or_else(|| Error::new(ErrorKind::Media, "no item open"))?;
        entry.read(max).map_err(|e| e.path(path.as_path()))
    }
}

/// zstd's level when `compress=zstd` names none: its fastest positive
/// level (the bench tree's half-random data compresses no better at 3).
const DEFAULT_LEVEL: i32 = 1;

/// The `compress` and `compress_level` options: the zstd level to write
/// new archives at, none for plain archives.
fn compress_of(config: &serde_json::Value) -> Result<Option<i32>> {
    let level = match config.get("compress_level") {
        None => None,
        Some(v) => Some(
            v.as_i64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                .and_then(|l| i32::try_from(l).ok())
                .filter(|l| zstd::compression_level_range().contains(l))
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::Config,
                        format!(
                            "tar media option compress_level {v} is not a zstd level ({:?})",
                            zstd::compression_level_range()
                        ),
                    )
                })?,
        ),
    };
    match config.get("compress").map(|v| v.as_str()) {
        None | Some(Some("none")) => match level {
            None => Ok(None),
            Some(_) => Err(Error::new(
                ErrorKind::Config,
                "tar media option compress_level needs compress=zstd",
            )),
        },
        Some(Some("zstd")) => Ok(Some(level.unwrap_or(DEFAULT_LEVEL))),
        Some(_) => Err(Error::new(
            ErrorKind::Config,
            format!(
                "tar media option compress {} is not none or zstd",
                config["compress"]
            ),
        )),
    }
}

/// Every option of tar media (the reader takes the writer's too: the same
/// `--media-opt`s serve backup and restore).
const OPTIONS: &[&str] = &["dir", "record_size", "direct", "compress", "compress_level"];

fn config_of(config: &serde_json::Value) -> Result<(PathBuf, u64)> {
    floe_core::abi::known_options(config, "tar media", OPTIONS)?;
    let dir = config
        .get("dir")
        .and_then(|v| v.as_str())
        .map(PathBuf::from)
        .ok_or_else(|| Error::new(ErrorKind::Config, "tar media needs a directory (tar:/path)"))?;
    let record = match config.get("record_size") {
        None => DEFAULT_RECORD,
        Some(v) => v
            .as_u64()
            .or_else(|| {
                v.as_str()
                    .and_then(|s| s.parse::<Bytes>().ok().map(|b| b.0))
            })
            .filter(|r| *r >= BLOCK && r % BLOCK == 0)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    format!("record_size {v} is not a positive multiple of 512"),
                )
            })?,
    };
    Ok((dir, record))
}

/// The plugin.
pub struct TarPlugin;

impl Plugin for TarPlugin {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "tar".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            interfaces: vec![Interface::MediaWriter, Interface::MediaReader],
            sequential_media: false,
            path_order: false,
        }
    }
    fn media_writer(config: &serde_json::Value) -> Result<Box<dyn MediaWriter>> {
        let (dir, record) = config_of(config)?;
        let direct = floe_core::abi::flag_option(config, "direct", "tar media option direct")?
            .unwrap_or(true);
        Ok(Box::new(TarWriter {
            dir,
            record,
            direct,
            compress: compress_of(config)?,
            set: None,
        }))
    }
    fn media_reader(config: &serde_json::Value) -> Result<Box<dyn MediaReader>> {
        let (dir, _) = config_of(config)?;
        // A set's own name says whether it is compressed; the writer's
        // options are checked all the same.
        compress_of(config)?;
        Ok(Box::new(TarReader {
            idle: None,
            dir,
            open: None,
            cached: None,
        }))
    }
}

floe_core::export_plugin!(TarPlugin);

#[cfg(test)]
mod tests {
    use super::out::{COPY_MAX, STAGE, WRITE_BUFFER};
    use super::*;
    use proptest::prelude::*;

    fn header(set: &str) -> SetHeader {
        SetHeader {
            set: SetId::new(set),
            label: String::new(),
            agent: "h".into(),
            sources: vec![],
            image: ImageId::new("i"),
            frozen_at: 1,
            started_at: 1,
        }
    }

    fn item(name: &str, data: &[u8]) -> (ItemHeader, ItemTrailer) {
        (
            ItemHeader {
                item: ItemId::new(name),
                kind: ItemKind::Volume,
                size: Bytes(data.len() as u64),
                config: ConfigId::new("c"),
                meta: Default::default(),
                holes: Vec::new(),
                file: None,
            },
            ItemTrailer {
                length: Bytes(data.len() as u64),
                blake3: blake3::hash(data).to_hex().to_string(),
                config: ConfigId::new("c"),
                remaps: 0,
                captured_after_freeze: false,
            },
        )
    }

    #[test]
    fn an_archive_whose_writer_died_resumes_after_its_last_durable_item() {
        for compress in ["none", "zstd"] {
            a_writer_dies_and_resumes(compress);
        }
    }

    fn a_writer_dies_and_resumes(compress: &str) {
        let d = tempfile::tempdir().unwrap();
        let cfg = serde_json::json!({"dir": d.path(), "record_size": 1024, "compress": compress});
        let mut w = TarPlugin::media_writer(&cfg).unwrap();
        w.begin_set(&header("s")).unwrap();
        let (h, t) = item("a", b"AAAAAAA");
        w.begin_item(&h).unwrap();
        w.write(b"AAAAAAA").unwrap();
        w.end_item(&t).unwrap();
        let (h, _) = item("b", &[b'B'; 700]);
        w.begin_item(&h).unwrap();
        w.write(&[b'B'; 300]).unwrap();
        drop(w); // dies inside item b
        let mut w = TarPlugin::media_writer(&cfg).unwrap();
        let rec = w.resume_set(&SetId::new("s")).unwrap();
        assert_eq!(rec.items.len(), 1);
        let (h, t) = item("b", &[b'B'; 700]);
        w.begin_item(&h).unwrap();
        w.write(&[b'B'; 700]).unwrap();
        w.end_item(&t).unwrap();
        w.commit().unwrap();
        let mut r = TarPlugin::media_reader(&cfg).unwrap();
        r.open_item(&SetId::new("s"), &ItemId::new("b")).unwrap();
        assert_eq!(r.read(10_000).unwrap(), vec![b'B'; 700]);
        r.open_item(&SetId::new("s"), &ItemId::new("a")).unwrap();
        assert_eq!(r.read(10_000).unwrap(), b"AAAAAAA");
        assert!(!journal_path(d.path(), &SetId::new("s")).exists());
        let archive = match compress {
            "zstd" => {
                assert!(!d.path().join("s.tar").exists());
                let mut plain = Vec::new();
                Source::open(&d.path().join("s.tar.zst"))
                    .unwrap()
                    .read_to_end(&mut plain)
                    .unwrap();
                plain
            }
            _ => std::fs::read(d.path().join("s.tar")).unwrap(),
        };
        assert_eq!(archive.len() % 1024, 0, "{compress}");
        assert_eq!(r.list_sets().unwrap().len(), 1, "{compress}");
    }

    #[test]
    fn a_compressed_set_resumes_only_from_frames_its_journal_names() {
        let d = tempfile::tempdir().unwrap();
        let cfg = serde_json::json!({"dir": d.path(), "compress": "zstd"});
        let mut w = TarPlugin::media_writer(&cfg).unwrap();
        w.begin_set(&header("s")).unwrap();
        for name in ["a", "b"] {
            // Volumes: a checkpoint (and a frames line) after each.
            let (h, t) = item(name, &[name.as_bytes()[0]; 5000]);
            w.begin_item(&h).unwrap();
            w.write(&[name.as_bytes()[0]; 5000]).unwrap();
            w.end_item(&t).unwrap();
        }
        drop(w);
        let jpath = journal_path(d.path(), &SetId::new("s"));
        let journal = std::fs::read(&jpath).unwrap();
        let j = decode_journal(&journal, &jpath).unwrap();
        assert_eq!((j.items.len(), j.version), (2, JOURNAL_VERSION_COMPRESSED));
        let end: u64 = j.frames.iter().map(|[_, d]| u64::from(*d)).sum();
        assert_eq!(j.end, end);
        // A crash tore the last checkpoint's frames line off: its item is
        // not durable, whatever its own line says.
        let text = String::from_utf8(journal.clone()).unwrap();
        let cut = text.rfind("{\"frames\"").unwrap();
        std::fs::write(&jpath, &text[..cut]).unwrap();
        let torn = decode_journal(&std::fs::read(&jpath).unwrap(), &jpath).unwrap();
        assert_eq!(torn.items.len(), 1);
        assert!(torn.end < j.end && torn.frames.len() < j.frames.len());
        let mut w = TarPlugin::media_writer(&cfg).unwrap();
        let rec = w.resume_set(&SetId::new("s")).unwrap();
        assert_eq!(rec.items.len(), 1);
        let (h, t) = item("b", &[b'b'; 5000]);
        w.begin_item(&h).unwrap();
        w.write(&[b'b'; 5000]).unwrap();
        w.end_item(&t).unwrap();
        w.commit().unwrap();
        let mut r = TarPlugin::media_reader(&cfg).unwrap();
        for name in ["a", "b"] {
            r.open_item(&SetId::new("s"), &ItemId::new(name)).unwrap();
            assert_eq!(r.read(10_000).unwrap(), vec![name.as_bytes()[0]; 5000]);
        }
        // Frames in a plain archive's journal, or a compressed journal
        // that does not say so: refused, naming the line.
        let plain = json_line(&JournalHead {
            magic: JOURNAL_MAGIC.into(),
            version: JOURNAL_VERSION,
            header: header("p"),
            compress: None,
        })
        .unwrap();
        let mut bad = plain.clone();
        bad.extend_from_slice(b"{\"frames\":{\"end\":5,\"table\":[[3,5]]}}\n");
        let e = decode_journal(&bad, &jpath).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        let mut bad = text.lines().next().unwrap().replace("zstd", "lz4");
        bad.push('\n');
        let e = decode_journal(bad.as_bytes(), &jpath).unwrap_err();
        assert!(e.to_string().contains("version"), "{e}");
        // Options that make no sense are refused by name.
        for (k, v) in [("compress", "lz4"), ("compress_level", "99")] {
            let cfg = serde_json::json!({"dir": d.path(), "compress": "zstd", k: v});
            let e = TarPlugin::media_writer(&cfg).err().unwrap();
            assert!(e.to_string().contains(k), "{e}");
        }
    }

    /// A writer on a fresh directory with set `s` begun.
    fn set_begun() -> (tempfile::TempDir, serde_json::Value, Box<dyn MediaWriter>) {
        let d = tempfile::tempdir().unwrap();
        let cfg = serde_json::json!({"dir": d.path()});
        let mut w = TarPlugin::media_writer(&cfg).unwrap();
        w.begin_set(&header("s")).unwrap();
        (d, cfg, w)
    }

    #[test]
    fn a_journal_that_cannot_be_written_fails_the_set() {
        let (d, _, mut w) = set_begun();
        // The journal goes: the next checkpoint (a volume's, at once)
        // cannot append to it.
        std::fs::remove_file(journal_path(d.path(), &SetId::new("s"))).unwrap();
        let (h, t) = item("a", b"AAAAAAA");
        w.begin_item(&h).unwrap();
        w.write(b"AAAAAAA").unwrap();
        // The fsync thread works behind the writer: its failure shows at
        // the next checkpoint or, at the latest, at commit.
        let err = match w.end_item(&t) {
            Err(e) => e,
            Ok(_) => w.commit().expect_err("a set whose journal failed commits"),
        };
        assert_eq!(err.kind(), ErrorKind::Media, "{err}");
        assert!(err.to_string().contains("journal"), "{err}");
        assert!(!d.path().join("s.tar").exists());
    }

    #[test]
    fn many_small_items_and_large_ones_land_in_order_through_the_write_buffer() {
        for compress in ["none", "zstd"] {
            many_items_land_in_order(compress);
        }
    }

    fn many_items_land_in_order(compress: &str) {
        let d = tempfile::tempdir().unwrap();
        let cfg = serde_json::json!({"dir": d.path(), "compress": compress});
        let mut w = TarPlugin::media_writer(&cfg).unwrap();
        w.begin_set(&header("s")).unwrap();
        // Sizes across the copy bound and the buffer's size, written in
        // pieces of several sizes; more items than a checkpoint holds.
        let sizes = [
            0usize,
            1,
            511,
            512,
            4097,
            COPY_MAX,
            COPY_MAX + 1,
            WRITE_BUFFER - 3,
            WRITE_BUFFER + 5,
            3 * WRITE_BUFFER,
            STAGE - 1,
            STAGE + 4097,
        ];
        let items: Vec<(String, Vec<u8>)> = (0..CHECKPOINT_ITEMS + 40)
            .map(|k| {
                let n = if k % 97 == 0 {
                    sizes[(k / 97) % sizes.len()]
                } else {
                    k % 700
                };
                let data: Vec<u8> = (0..n)
                    .map(|i| u8::try_from((i * 31 + k) % 251).unwrap())
                    .collect();
                (format!("i{k}"), data)
            })
            .collect();
        for (k, (name, data)) in items.iter().enumerate() {
            let (h, t) = item(name, data);
            w.begin_item(&h).unwrap();
            for piece in data.chunks([1usize, 7000, COPY_MAX + 9, 1 << 20][k % 4]) {
                w.write(piece).unwrap();
            }
            w.end_item(&t).unwrap();
        }
        let done = w.commit().unwrap();
        assert_eq!(done.items, items.len() as u64);
        let mut r = TarPlugin::media_reader(&cfg).unwrap();
        let record = r.list_sets().unwrap().remove(0);
        for (k, (name, data)) in items.iter().enumerate().rev() {
            // Looked up in the index, or straight where the record says.
            if k % 2 == 0 {
                r.open_item(&SetId::new("s"), &ItemId::new(name)).unwrap();
            } else {
                r.open_at(&SetId::new("s"), &ItemAt::of(&record.items[k]))
                    .unwrap();
            }
            let mut got = Vec::new();
            loop {
                let b = r.read(1 << 20).unwrap();
                if b.is_empty() {
                    break;
                }
                got.extend(b);
            }
            assert!(
                got == *data,
                "item {name}: {} bytes back, {} written",
                got.len(),
                data.len()
            );
        }
    }

    #[test]
    fn records_and_journal_lines_built_from_parts_are_serde_s_bytes() {
        let (mut h, mut t) = item("/srv/a \"q\"/é\u{1}\\f", b"data");
        h.kind = ItemKind::File;
        h.holes = vec![[0, 4096]];
        h.meta.insert("k".into(), "v\n".into());
        h.file = Some(floe_core::model::FileMeta {
            root: "/srv".into(),
            path: "a \"q\"/é\u{1}\\f".into(),
            mode: 0o100644,
            uid: 1000,
            gid: 100,
            atime: floe_core::model::Timestamp { sec: -3, nsec: 7 },
            mtime: floe_core::model::Timestamp {
                sec: 1_795_000_000,
                nsec: 999_999_999,
            },
            ctime: floe_core::model::Timestamp { sec: 0, nsec: 0 },
            rdev: 0,
            target: Some("t".into()),
            xattrs: [("user.x".to_string(), "00ff".to_string())].into(),
            holes: vec![[8192, 4096]],
        });
        t.remaps = 3;
        t.captured_after_freeze = true;
        let position = MediaPosition {
            medium: "/backup/\"m\"".into(),
            locator: "s.tar@1536".into(),
        };
        let record = ItemRecord {
            header: h.clone(),
            trailer: t.clone(),
            position: position.clone(),
        };
        let header_json = serde_json::to_string(&h).unwrap();
        let built = record_json(&header_json, &t, &position).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&built),
            serde_json::to_string(&record).unwrap()
        );
        let line = json_line(&JournalLine::Item {
            record: Box::new(record),
            end: 123_456_789_000,
        })
        .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&item_line(&built, 123_456_789_000)),
            String::from_utf8_lossy(&line)
        );
    }

    #[test]
    fn an_index_of_many_pieces_is_byte_for_byte_what_serde_writes_for_the_set() {
        let (d, cfg, mut w) = set_begun();
        // Records of several MiB in all (several pieces), one larger than
        // a piece by itself, and a failure: the index written piece by
        // piece must be exactly the entry encoded from the whole record.
        let n = 4000;
        for k in 0..n {
            let data = vec![u8::try_from(k % 251).unwrap(); k % 300];
            let (mut h, t) = item(&format!("dir/{k:0>400}"), &data);
            if k == 17 {
                h.meta
                    .insert("big".into(), "x".repeat(Encoded::PIECE + 4321));
            }
            w.begin_item(&h).unwrap();
            w.write(&data).unwrap();
            w.end_item(&t).unwrap();
        }
        w.fail_item(&ItemFailure {
            item: ItemId::new("gone"),
            error: "vanished".into(),
        })
        .unwrap();
        w.commit().unwrap();
        let record = TarPlugin::media_reader(&cfg)
            .unwrap()
            .list_sets()
            .unwrap()
            .remove(0);
        assert_eq!(record.items.len(), n);
        assert_eq!(record.failures.len(), 1);
        assert_eq!(
            record.items[17].header.meta["big"].len(),
            Encoded::PIECE + 4321
        );
        let want = floe_core::pax::index_entry(&record).unwrap();
        assert!(want.len() > 3 * Encoded::PIECE, "{} bytes", want.len());
        let archive = std::fs::read(d.path().join("s.tar")).unwrap();
        let at = archive
            .windows(512)
            .position(|b| b == &want[..512])
            .expect("the index entry's first block is in the archive");
        assert!(archive[at..].starts_with(&want), "the index entry differs");
    }

    #[test]
    fn readers_share_a_parsed_index_and_a_rewritten_archive_is_parsed_again() {
        let d = tempfile::tempdir().unwrap();
        let cfg = serde_json::json!({"dir": d.path()});
        let write = |data: &[u8]| {
            let mut w = TarPlugin::media_writer(&cfg).unwrap();
            w.begin_set(&header("s")).unwrap();
            let (h, t) = item("a", data);
            w.begin_item(&h).unwrap();
            w.write(data).unwrap();
            w.end_item(&t).unwrap();
            w.commit().unwrap();
        };
        let read = || {
            let mut r = TarPlugin::media_reader(&cfg).unwrap();
            r.open_item(&SetId::new("s"), &ItemId::new("a")).unwrap();
            r.read(1 << 20).unwrap()
        };
        write(b"first version");
        assert_eq!(read(), b"first version");
        assert_eq!(read(), b"first version");
        // The same set name written again (another archive in its place):
        // the shared index must not answer for it.
        std::fs::remove_file(d.path().join("s.tar")).unwrap();
        write(b"second, longer version");
        assert_eq!(read(), b"second, longer version");
        let mut r = TarPlugin::media_reader(&cfg).unwrap();
        let sets = r.list_sets().unwrap();
        assert_eq!(sets.len(), 1);
        assert_eq!(sets[0].items[0].trailer.length, Bytes(22));
    }

    #[test]
    fn the_index_is_found_by_its_locator_and_without_it_by_walking() {
        let d = tempfile::tempdir().unwrap();
        let cfg = serde_json::json!({"dir": d.path(), "record_size": 1024});
        let mut w = TarPlugin::media_writer(&cfg).unwrap();
        w.begin_set(&header("s")).unwrap();
        let items: Vec<(String, Vec<u8>)> = (0..40u8)
            .map(|k| (format!("i{k}"), vec![k; usize::from(k) * 97]))
            .collect();
        for (name, data) in &items {
            let (h, t) = item(name, data);
            w.begin_item(&h).unwrap();
            w.write(data).unwrap();
            w.end_item(&t).unwrap();
        }
        w.commit().unwrap();
        let path = d.path().join("s.tar");
        let bytes = std::fs::read(&path).unwrap();
        let (at, len) = floe_core::pax::read_locator(&bytes[bytes.len() - 512..]).unwrap();
        let tail = &bytes[usize::try_from(at + len).unwrap()..bytes.len() - 512];
        assert!(
            tail.iter().all(|&b| b == 0),
            "zeros between index and locator"
        );
        let by_locator = read_index(&mut std::io::Cursor::new(&bytes), &path).unwrap();
        assert_eq!(by_locator.items.len(), 40);
        // An archive without the locator (written before it) is walked.
        let mut old = bytes.clone();
        let n = old.len();
        old[n - 512..].fill(0);
        let walked = read_index(&mut std::io::Cursor::new(&old), &path).unwrap();
        assert_eq!(walked, by_locator);
        // A locator pointing elsewhere is ignored, not trusted.
        let mut wrong = bytes.clone();
        wrong[n - 512..].copy_from_slice(&floe_core::pax::locator(0, 512));
        assert_eq!(
            read_index(&mut std::io::Cursor::new(&wrong), &path).unwrap(),
            by_locator
        );
        // Items come back in any order from one reader (one open file).
        let mut r = TarPlugin::media_reader(&cfg).unwrap();
        for k in [5usize, 6, 39, 0, 7, 6] {
            r.open_item(&SetId::new("s"), &ItemId::new(&items[k].0))
                .unwrap();
            assert_eq!(r.read(1 << 20).unwrap(), items[k].1, "item {k}");
        }
    }

    proptest! {
        #[test]
        fn journal_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_journal(&bytes, Path::new("j"));
        }

        #[test]
        fn the_index_reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = read_index(&mut std::io::Cursor::new(bytes), Path::new("x.tar"));
        }

    }
}
