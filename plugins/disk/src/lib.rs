//! Floe plugin `disk`: backup sets as directories on a file system.
//!
//! Layout (spec: `docs/formats/disk-media.md`):
//! ```text
//! DIR/<set-id>/set.json          the manifest: magic, version, SetRecord
//! DIR/<set-id>/items/<n>.img     item n's bytes (sparse where zero)
//! DIR/.<set-id>.partial/         a set being written (never listed)
//! ```
//! A set becomes visible only by the rename of its complete, fsynced
//! directory; the manifest is written last inside it. A crash or an error
//! leaves at most a `.partial` directory, which is never read as a set.
//!
//! Config: `dir` (the media directory).

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
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Manifest magic.
pub const MAGIC: &str = "floe-disk-set";
/// Manifest format version.
pub const VERSION: u32 = 1;
/// Zero runs of at least this many aligned bytes are left as holes.
const SPARSE_BLOCK: usize = 64 * 1024;

/// The journal of a set being written.
const JOURNAL: &str = "journal.jsonl";
/// Journal format version (append-only JSON lines).
pub const JOURNAL_VERSION: u32 = 2;
/// Journal magic.
pub const JOURNAL_MAGIC: &str = "floe-disk-journal";

/// What a partial set says about itself: enough to resume it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    /// [`JOURNAL_MAGIC`].
    pub magic: String,
    /// [`JOURNAL_VERSION`].
    pub version: u32,
    /// The set's header.
    pub header: SetHeader,
    /// Items durable so far, in order.
    pub items: Vec<ItemRecord>,
    /// Items that could not be backed up, so far.
    #[serde(default)]
    pub failures: Vec<ItemFailure>,
}

/// The journal's first line.
#[derive(Serialize, Deserialize)]
struct JournalHead {
    magic: String,
    version: u32,
    header: SetHeader,
}

/// Every later line: one durable item, or one failure.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum JournalLine {
    Item(Box<ItemRecord>),
    Failure(ItemFailure),
}

/// Decode and check a journal: a head line, then item and failure lines.
/// A last line without its newline was torn by a crash and is ignored.
pub fn decode_journal(bytes: &[u8], path: &Path) -> Result<Journal> {
    let bad = |what: String| Error::new(ErrorKind::Media, what).path(path);
    let mut lines = complete_lines(bytes).ok_or_else(|| bad("empty or torn set journal".into()))?;
    let head: JournalHead = lines
        .next()
        .and_then(|l| serde_json::from_slice(l).ok())
        .ok_or_else(|| bad("malformed set journal head".into()))?;
    if head.magic != JOURNAL_MAGIC || head.version != JOURNAL_VERSION {
        return Err(bad(format!(
            "not a Floe disk journal of version {JOURNAL_VERSION}: {:?} version {}",
            head.magic, head.version
        )));
    }
    let mut j = Journal {
        magic: head.magic,
        version: head.version,
        header: head.header,
        items: Vec::new(),
        failures: Vec::new(),
    };
    for (n, l) in lines.enumerate() {
        match serde_json::from_slice::<JournalLine>(l) {
            Ok(JournalLine::Item(it)) => {
                let it = *it;
                let i = j.items.len();
                if it.position.locator != item_file(i) {
                    return Err(bad(format!(
                        "journal item {i} points at {:?}",
                        it.position.locator
                    )));
                }
                j.items.push(it);
            }
            Ok(JournalLine::Failure(f)) => j.failures.push(f),
            Err(e) => return Err(bad(format!("malformed set journal line {}", n + 2)).source(e)),
        }
    }
    Ok(j)
}

/// The manifest file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MAGIC`].
    pub magic: String,
    /// [`VERSION`].
    pub version: u32,
    /// The set.
    pub record: SetRecord,
}

/// Decode and check a manifest.
pub fn decode_manifest(bytes: &[u8], path: &Path) -> Result<SetRecord> {
    let m: Manifest = serde_json::from_slice(bytes).map_err(|e| {
        Error::new(ErrorKind::Media, "malformed set manifest")
            .path(path)
            .source(e)
    })?;
    if m.magic != MAGIC {
        return Err(Error::new(
            ErrorKind::Media,
            format!("not a Floe disk set: magic {:?}", m.magic),
        )
        .path(path));
    }
    if m.version != VERSION {
        return Err(Error::new(
            ErrorKind::Media,
            format!(
                "disk set format version {} is not supported (this build reads {VERSION})",
                m.version
            ),
        )
        .path(path));
    }
    for (i, it) in m.record.items.iter().enumerate() {
        if it.position.locator != item_file(i) {
            return Err(Error::new(
                ErrorKind::Media,
                format!(
                    "item {} points at {:?}, expected {:?}",
                    it.header.item,
                    it.position.locator,
                    item_file(i)
                ),
            )
            .path(path));
        }
    }
    Ok(m.record)
}

fn item_file(i: usize) -> String {
    format!("items/{i:06}.img")
}

use floe_core::media::{
    complete_lines, failpoint, fsync_dir, json_line, media_io_error as media_err, no_set_error,
};

fn media_dir(config: &serde_json::Value) -> Result<PathBuf> {
    floe_core::abi::known_options(config, "disk media", &["dir"])?;
    config
        .get("dir")
        .and_then(|v| v.as_str())
        .map(PathBuf::from)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                "disk media needs a directory (disk:/path)",
            )
        })
}

struct Open {
    header: ItemHeader,
    file: File,
    path: PathBuf,
    pos: u64,
}

/// Writes sets.
pub struct DiskWriter {
    dir: PathBuf,
    set: Option<(SetHeader, PathBuf)>,
    items: Vec<ItemRecord>,
    failures: Vec<ItemFailure>,
    current: Option<Open>,
    /// Items ended since the journal was last written, their bytes, and when.
    unjournaled: (usize, u64, std::time::Instant),
    /// Journal lines waiting for the next checkpoint.
    pending: Vec<u8>,
}

/// The journal is written (and what it names made durable) after a volume,
/// and otherwise once this many items, bytes or seconds have gone by: a
/// tree of 70,000 small files is not fsynced 70,000 times, and a resume
/// redoes at most this much.
const CHECKPOINT_ITEMS: usize = 1024;
const CHECKPOINT_BYTES: u64 = 64 << 20;
const CHECKPOINT_SECS: u64 = 1;

impl DiskWriter {
    /// A writer to `dir`.
    pub fn new(dir: PathBuf) -> DiskWriter {
        DiskWriter {
            dir,
            set: None,
            items: Vec::new(),
            failures: Vec::new(),
            current: None,
            unjournaled: (0, 0, std::time::Instant::now()),
            pending: Vec::new(),
        }
    }

    /// Make every item ended so far durable (one `syncfs` of the media's
    /// file system), then name them in the journal.
    fn checkpoint(&mut self) -> Result<()> {
        let partial = self.partial()?.clone();
        let d = File::open(&partial).map_err(|e| media_err("open set directory", &partial, e))?;
        rustix::fs::syncfs(&d).map_err(|e| media_err("syncfs", &partial, e.into()))?;
        self.append_journal()?;
        self.unjournaled = (0, 0, std::time::Instant::now());
        Ok(())
    }

    /// Start the journal of the set: its head line (and, on resume, the
    /// lines of what is durable already), written to a temporary file,
    /// fsynced and renamed into place.
    fn write_journal(&self) -> Result<()> {
        let (header, partial) = self
            .set
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::Media, "no set begun"))?;
        let mut bytes = json_line(&JournalHead {
            magic: JOURNAL_MAGIC.into(),
            version: JOURNAL_VERSION,
            header: header.clone(),
        })?;
        for it in &self.items {
            bytes.extend(json_line(&JournalLine::Item(Box::new(it.clone())))?);
        }
        for f in &self.failures {
            bytes.extend(json_line(&JournalLine::Failure(f.clone()))?);
        }
        let tmp = partial.join(format!("{JOURNAL}.tmp"));
        let f = File::create(&tmp).map_err(|e| media_err("create journal", &tmp, e))?;
        f.write_all_at(&bytes, 0)
            .and_then(|()| f.sync_all())
            .map_err(|e| media_err("write journal", &tmp, e))?;
        let path = partial.join(JOURNAL);
        std::fs::rename(&tmp, &path).map_err(|e| media_err("rename journal", &path, e))?;
        fsync_dir(partial)
    }

    /// Append the pending lines to the journal and make them durable.
    fn append_journal(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let path = self.partial()?.join(JOURNAL);
        let mut f = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| media_err("open journal", &path, e))?;
        std::io::Write::write_all(&mut f, &self.pending)
            .and_then(|()| f.sync_data())
            .map_err(|e| media_err("append to journal", &path, e))?;
        self.pending.clear();
        Ok(())
    }

    fn partial(&self) -> Result<&PathBuf> {
        self.set
            .as_ref()
            .map(|(_, p)| p)
            .ok_or_else(|| Error::new(ErrorKind::Media, "no set begun"))
    }
}

impl MediaWriter for DiskWriter {
    fn begin_set(&mut self, header: &SetHeader) -> Result<()> {
        if header.set.as_str().is_empty()
            || header.set.as_str().contains('/')
            || header.set.as_str().starts_with('.')
        {
            return Err(Error::new(
                ErrorKind::Config,
                format!("bad set id {:?}", header.set),
            ));
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| media_err("create media directory", &self.dir, e))?;
        if self.dir.join(header.set.as_str()).exists() {
            return Err(Error::new(
                ErrorKind::Media,
                format!("set {} exists on this media", header.set),
            )
            .path(&self.dir));
        }
        let partial = self.dir.join(format!(".{}.partial", header.set));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(partial.join("items"))
            .map_err(|e| media_err("create set directory", &partial, e))?;
        self.set = Some((header.clone(), partial));
        self.items.clear();
        self.failures.clear();
        self.pending.clear();
        self.write_journal()
    }

    fn resume_set(&mut self, set: &SetId) -> Result<SetRecord> {
        if set.as_str().is_empty() || set.as_str().contains('/') || set.as_str().starts_with('.') {
            return Err(Error::new(ErrorKind::Config, format!("bad set id {set:?}")));
        }
        if self.dir.join(set.as_str()).exists() {
            return Err(Error::new(
                ErrorKind::Media,
                format!("set {set} is already committed: nothing to resume"),
            ));
        }
        let partial = self.dir.join(format!(".{set}.partial"));
        let jpath = partial.join(JOURNAL);
        let journal = match std::fs::read(&jpath) {
            Ok(bytes) => decode_journal(&bytes, &jpath)?,
            // Died inside commit, after the manifest replaced the journal
            // and before the rename: the manifest lists every item.
            Err(e) => {
                let mpath = partial.join("set.json");
                let bytes = std::fs::read(&mpath).map_err(|_| {
                    Error::new(
                        ErrorKind::NotFound,
                        format!("no interrupted set {set} on media {}", self.dir.display()),
                    )
                    .path(&jpath)
                    .source(e)
                })?;
                let record = decode_manifest(&bytes, &mpath)?;
                Journal {
                    magic: JOURNAL_MAGIC.into(),
                    version: JOURNAL_VERSION,
                    header: record.header,
                    items: record.items,
                    failures: record.failures,
                }
            }
        };
        // Items after the journal's last durable one are leftovers of the
        // item being written when the writer died.
        let items_dir = partial.join("items");
        for e in std::fs::read_dir(&items_dir)
            .map_err(|e| media_err("list items", &items_dir, e))?
            .flatten()
        {
            let name = format!("items/{}", e.file_name().to_string_lossy());
            if !journal.items.iter().any(|i| i.position.locator == name) {
                std::fs::remove_file(e.path())
                    .map_err(|err| media_err("remove unfinished item", &e.path(), err))?;
            }
        }
        for it in &journal.items {
            let p = partial.join(&it.position.locator);
            let len = std::fs::metadata(&p)
                .map_err(|e| media_err("stat item", &p, e))?
                .len();
            if len != it.trailer.length.0 {
                return Err(Error::new(
                    ErrorKind::Media,
                    format!(
                        "journaled item {} holds {len} bytes, not {}",
                        it.header.item, it.trailer.length
                    ),
                )
                .path(p));
            }
        }
        self.set = Some((journal.header.clone(), partial));
        self.items = journal.items.clone();
        self.failures = journal.failures.clone();
        self.current = None;
        self.unjournaled = (0, 0, std::time::Instant::now());
        self.pending.clear();
        // A fresh journal of exactly what is durable (drops a torn line).
        self.write_journal()?;
        Ok(SetRecord {
            header: journal.header,
            items: journal.items,
            failures: journal.failures,
            committed_at: 0,
        })
    }

    fn begin_item(&mut self, header: &ItemHeader) -> Result<()> {
        let path = self.partial()?.join(item_file(self.items.len()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| media_err("create item file", &path, e))?;
        self.current = Some(Open {
            header: header.clone(),
            file,
            path,
            pos: 0,
        });
        Ok(())
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        let cur = self
            .current
            .as_mut()
            .ok_or_else(|| Error::new(ErrorKind::Media, "write outside an item"))?;
        let mut off = 0usize;
        while off < data.len() {
            let n = SPARSE_BLOCK.min(data.len() - off);
            let piece = &data[off..off + n];
            let at = cur.pos + off as u64;
            let aligned = at.is_multiple_of(SPARSE_BLOCK as u64) && n == SPARSE_BLOCK;
            if !(aligned && piece.iter().all(|&b| b == 0)) {
                cur.file.write_all_at(piece, at).map_err(|e| {
                    media_err("write item", &cur.path, e)
                        .range(floe_core::units::DeviceOffset(at), Bytes(n as u64))
                })?;
            }
            off += n;
        }
        cur.pos += data.len() as u64;
        Ok(())
    }

    fn end_item(&mut self, trailer: &ItemTrailer) -> Result<MediaPosition> {
        let cur = self
            .current
            .take()
            .ok_or_else(|| Error::new(ErrorKind::Media, "end_item outside an item"))?;
        if trailer.length.0 != cur.pos {
            return Err(Error::new(
                ErrorKind::Media,
                format!(
                    "item {} trailer says {} bytes, {} were written",
                    cur.header.item, trailer.length, cur.pos
                ),
            ));
        }
        cur.file
            .set_len(cur.pos)
            .map_err(|e| media_err("truncate item", &cur.path, e))?;
        let volume = cur.header.kind == floe_core::model::ItemKind::Volume;
        let position = MediaPosition {
            medium: self.dir.display().to_string(),
            locator: item_file(self.items.len()),
        };
        let record = ItemRecord {
            header: cur.header,
            trailer: trailer.clone(),
            position: position.clone(),
        };
        self.pending
            .extend(json_line(&JournalLine::Item(Box::new(record.clone())))?);
        self.items.push(record);
        // The journal names items only once they are durable.
        self.unjournaled.0 += 1;
        self.unjournaled.1 += trailer.length.0;
        if volume
            || self.unjournaled.0 >= CHECKPOINT_ITEMS
            || self.unjournaled.1 >= CHECKPOINT_BYTES
            || self.unjournaled.2.elapsed().as_secs() >= CHECKPOINT_SECS
        {
            self.checkpoint()?;
        }
        Ok(position)
    }

    fn fail_item(&mut self, failure: &ItemFailure) -> Result<()> {
        if self.current.is_some() {
            return Err(Error::new(ErrorKind::Media, "fail_item inside an item"));
        }
        self.partial()?;
        if !self.failures.iter().any(|f| f.item == failure.item) {
            self.failures.push(failure.clone());
            self.pending
                .extend(json_line(&JournalLine::Failure(failure.clone()))?);
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<Committed> {
        if self.current.is_some() {
            return Err(Error::new(
                ErrorKind::Media,
                "commit with an item still open",
            ));
        }
        let (header, partial) = self
            .set
            .take()
            .ok_or_else(|| Error::new(ErrorKind::Media, "commit without a set"))?;
        let record = SetRecord {
            header,
            items: std::mem::take(&mut self.items),
            failures: std::mem::take(&mut self.failures),
            committed_at: now_secs(),
        };
        // Items since the last checkpoint become durable with everything
        // else before the manifest is written.
        let d = File::open(&partial).map_err(|e| media_err("open set directory", &partial, e))?;
        rustix::fs::syncfs(&d).map_err(|e| media_err("syncfs", &partial, e.into()))?;
        let manifest = Manifest {
            magic: MAGIC.into(),
            version: VERSION,
            record: record.clone(),
        };
        let bytes = serde_json::to_vec(&manifest)
            .map_err(|e| Error::new(ErrorKind::Media, "cannot encode manifest").source(e))?;
        let mpath = partial.join("set.json");
        let fail = |e: Error, partial: &Path| {
            let _ = std::fs::remove_dir_all(partial);
            e
        };
        let f = File::create(&mpath)
            .map_err(|e| fail(media_err("create manifest", &mpath, e), &partial))?;
        f.write_all_at(&bytes, 0)
            .and_then(|()| f.sync_all())
            .map_err(|e| fail(media_err("write manifest", &mpath, e), &partial))?;
        // The manifest is durable; only now may the journal go (a resume in
        // between finds one or the other, never neither).
        let _ = std::fs::remove_file(partial.join(JOURNAL));
        fsync_dir(&partial.join("items")).map_err(|e| fail(e, &partial))?;
        fsync_dir(&partial).map_err(|e| fail(e, &partial))?;
        let fin = self.dir.join(record.header.set.as_str());
        failpoint("disk-commit-before-rename");
        std::fs::rename(&partial, &fin)
            .map_err(|e| fail(media_err("rename set into place", &fin, e), &partial))?;
        fsync_dir(&self.dir)?;
        Ok(Committed::of(&record))
    }

    fn abort(&mut self) -> Result<()> {
        self.current = None;
        self.items.clear();
        if let Some((_, partial)) = self.set.take() {
            std::fs::remove_dir_all(&partial)
                .map_err(|e| media_err("remove partial set", &partial, e))?;
        }
        Ok(())
    }

    fn delete_set(&mut self, set: &SetId) -> Result<()> {
        if set.as_str().is_empty() || set.as_str().contains('/') || set.as_str().starts_with('.') {
            return Err(Error::new(ErrorKind::Config, format!("bad set id {set:?}")));
        }
        let dir = self.dir.join(set.as_str());
        if !dir.join("set.json").exists() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("no set {set} on media {}", self.dir.display()),
            ));
        }
        // Rename out of sight first: the set vanishes whole, then its
        // bytes are freed.
        let doomed = self.dir.join(format!(".{set}.deleting"));
        std::fs::rename(&dir, &doomed).map_err(|e| media_err("hide set", &dir, e))?;
        fsync_dir(&self.dir)?;
        std::fs::remove_dir_all(&doomed).map_err(|e| media_err("delete set", &doomed, e))
    }
}

/// Reads sets.
pub struct DiskReader {
    dir: PathBuf,
    open: Option<(File, PathBuf, u64, u64)>,
    /// The last set's record and an index of its items (a set of 70,000
    /// files is opened item by item).
    cached: Option<floe_core::media::SetIndex>,
}

impl DiskReader {
    /// A reader of `dir`.
    pub fn new(dir: PathBuf) -> DiskReader {
        DiskReader {
            dir,
            open: None,
            cached: None,
        }
    }

    fn load(&self, set: &SetId) -> Result<SetRecord> {
        if set.as_str().contains('/') || set.as_str().starts_with('.') {
            return Err(Error::new(ErrorKind::NotFound, format!("no set {set}")));
        }
        let path = self.dir.join(set.as_str()).join("set.json");
        let bytes = std::fs::read(&path).map_err(|e| no_set_error(set, &self.dir, &path, e))?;
        decode_manifest(&bytes, &path)
    }
}

impl MediaReader for DiskReader {
    fn list_sets(&mut self) -> Result<Vec<SetRecord>> {
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| media_err("list media directory", &self.dir, e))?;
        let mut sets = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') || !e.path().join("set.json").exists() {
                continue;
            }
            sets.push(self.load(&SetId::new(name))?);
        }
        sets.sort_by(|a, b| (a.committed_at, &a.header.set).cmp(&(b.committed_at, &b.header.set)));
        Ok(sets)
    }

    fn open_item(&mut self, set: &SetId, item: &ItemId) -> Result<ItemRecord> {
        if self.cached.as_ref().is_none_or(|c| c.set() != set) {
            let record = self.load(set)?;
            self.cached = Some(floe_core::media::SetIndex::new(record));
        }
        let rec = self.cached.as_ref().expect("loaded above").item(item)?;
        let path = self.dir.join(set.as_str()).join(&rec.position.locator);
        let f = File::open(&path).map_err(|e| media_err("open item", &path, e))?;
        let len = f
            .metadata()
            .map_err(|e| media_err("stat item", &path, e))?
            .len();
        if len != rec.trailer.length.0 {
            return Err(Error::new(
                ErrorKind::ChecksumMismatch,
                format!(
                    "item file holds {len} bytes, the set recorded {}",
                    rec.trailer.length
                ),
            )
            .item(item)
            .path(&path));
        }
        self.open = Some((f, path, 0, rec.trailer.length.0));
        Ok(rec)
    }

    fn read(&mut self, max: usize) -> Result<Vec<u8>> {
        let (f, path, pos, len) = self
            .open
            .as_mut()
            .ok_or_else(|| Error::new(ErrorKind::Media, "no item open"))?;
        let n = usize::try_from((*len - *pos).min(max as u64)).unwrap_or(max);
        let mut buf = vec![0u8; n];
        let mut got = 0;
        while got < n {
            match f.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(
                        Error::new(ErrorKind::Media, "item file ended early").path(path.as_path())
                    )
                }
                Ok(k) => got += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(media_err("read item", path, e)),
            }
        }
        *pos += n as u64;
        Ok(buf)
    }
}

/// The plugin.
pub struct DiskPlugin;

impl Plugin for DiskPlugin {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "disk".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            interfaces: vec![Interface::MediaWriter, Interface::MediaReader],
            sequential_media: false,
            path_order: false,
        }
    }
    fn media_writer(config: &serde_json::Value) -> Result<Box<dyn MediaWriter>> {
        Ok(Box::new(DiskWriter::new(media_dir(config)?)))
    }
    fn media_reader(config: &serde_json::Value) -> Result<Box<dyn MediaReader>> {
        Ok(Box::new(DiskReader::new(media_dir(config)?)))
    }
}

floe_core::export_plugin!(DiskPlugin);

#[cfg(test)]
mod tests {
    use super::*;
    use floe_core::units::Bytes;
    use proptest::prelude::*;

    #[test]
    fn journal_lines_decode_a_torn_last_line_is_ignored_a_bad_middle_one_refused() {
        let head = SetHeader {
            set: SetId::new("s"),
            label: String::new(),
            agent: "h".into(),
            sources: vec![],
            image: ImageId::new("i"),
            frozen_at: 0,
            started_at: 0,
        };
        let mut b = json_line(&JournalHead {
            magic: JOURNAL_MAGIC.into(),
            version: JOURNAL_VERSION,
            header: head,
        })
        .unwrap();
        b.extend(
            json_line(&JournalLine::Failure(ItemFailure {
                item: ItemId::new("/x"),
                error: "gone".into(),
            }))
            .unwrap(),
        );
        let j = decode_journal(&b, Path::new("j")).unwrap();
        assert_eq!(j.failures.len(), 1);
        let mut torn = b.clone();
        torn.extend_from_slice(br#"{"item":{"header":"#);
        assert_eq!(
            decode_journal(&torn, Path::new("j"))
                .unwrap()
                .failures
                .len(),
            1
        );
        let mut bad = b.clone();
        bad.extend_from_slice(b"garbage\n");
        bad.extend(
            json_line(&JournalLine::Failure(ItemFailure {
                item: ItemId::new("/y"),
                error: "e".into(),
            }))
            .unwrap(),
        );
        let e = decode_journal(&bad, Path::new("j")).unwrap_err();
        assert!(
            e.to_string().contains("malformed set journal line 3"),
            "{e}"
        );
    }

    fn header(set: &str) -> SetHeader {
        SetHeader {
            set: SetId::new(set),
            label: "t".into(),
            agent: "h".into(),
            sources: vec!["array:v".into()],
            image: ImageId::new("i"),
            frozen_at: 1,
            started_at: 2,
        }
    }

    fn item(name: &str, size: u64) -> ItemHeader {
        ItemHeader {
            item: ItemId::new(name),
            kind: ItemKind::Volume,
            size: Bytes(size),
            config: ConfigId::new("c"),
            meta: Default::default(),
            holes: Vec::new(),
            file: None,
        }
    }

    fn trailer(data: &[u8]) -> ItemTrailer {
        ItemTrailer {
            length: Bytes(data.len() as u64),
            blake3: blake3::hash(data).to_hex().to_string(),
            config: ConfigId::new("c"),
            remaps: 0,
            captured_after_freeze: false,
        }
    }

    #[test]
    fn set_round_trips_and_is_invisible_until_commit() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = DiskWriter::new(dir.path().to_path_buf());
        let mut data = vec![0u8; 300_000];
        data[70_000..70_100].fill(7);
        w.begin_set(&header("s1")).unwrap();
        w.begin_item(&item("v", data.len() as u64)).unwrap();
        w.write(&data[..100_000]).unwrap();
        w.write(&data[100_000..]).unwrap();
        w.end_item(&trailer(&data)).unwrap();
        let mut r = DiskReader::new(dir.path().to_path_buf());
        assert!(
            r.list_sets().unwrap().is_empty(),
            "an uncommitted set must not be listed"
        );
        w.commit().unwrap();
        let sets = r.list_sets().unwrap();
        assert_eq!(sets.len(), 1);
        let rec = r.open_item(&SetId::new("s1"), &ItemId::new("v")).unwrap();
        assert_eq!(rec.trailer, trailer(&data));
        let mut back = Vec::new();
        loop {
            let c = r.read(65_536).unwrap();
            if c.is_empty() {
                break;
            }
            back.extend(c);
        }
        assert_eq!(back, data);
    }

    #[test]
    fn abort_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = DiskWriter::new(dir.path().to_path_buf());
        w.begin_set(&header("s2")).unwrap();
        w.begin_item(&item("v", 10)).unwrap();
        w.write(b"0123456789").unwrap();
        w.abort().unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let e = DiskReader::new(dir.path().to_path_buf())
            .open_item(&SetId::new("s2"), &ItemId::new("v"))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }

    #[test]
    fn manifest_with_wrong_magic_or_version_is_refused() {
        let p = Path::new("set.json");
        let e = decode_manifest(br#"{"magic":"x","version":1,"record":{"header":{"set":"a","label":"","agent":"","sources":[],"image":"i","frozen_at":0,"started_at":0},"items":[],"committed_at":0}}"#, p).unwrap_err();
        assert!(e.to_string().contains("not a Floe disk set"), "{e}");
        let e = decode_manifest(br#"{"magic":"floe-disk-set","version":9,"record":{"header":{"set":"a","label":"","agent":"","sources":[],"image":"i","frozen_at":0,"started_at":0},"items":[],"committed_at":0}}"#, p).unwrap_err();
        assert!(e.to_string().contains("version 9 is not supported"), "{e}");
    }

    #[test]
    fn a_set_whose_writer_died_resumes_with_its_durable_items() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = DiskWriter::new(dir.path().to_path_buf());
        w.begin_set(&header("s3")).unwrap();
        w.begin_item(&item("a", 5)).unwrap();
        w.write(b"AAAAA").unwrap();
        w.end_item(&trailer(b"AAAAA")).unwrap();
        w.begin_item(&item("b", 5)).unwrap();
        w.write(b"BB").unwrap();
        drop(w); // the writer dies inside item b
        let mut r = DiskReader::new(dir.path().to_path_buf());
        assert!(r.list_sets().unwrap().is_empty());
        let mut w = DiskWriter::new(dir.path().to_path_buf());
        let rec = w.resume_set(&SetId::new("s3")).unwrap();
        assert_eq!(rec.items.len(), 1);
        assert_eq!(rec.items[0].header.item, ItemId::new("a"));
        w.begin_item(&item("b", 5)).unwrap();
        w.write(b"BBBBB").unwrap();
        w.end_item(&trailer(b"BBBBB")).unwrap();
        let done = w.commit().unwrap();
        assert_eq!(done.items, 2);
        assert_eq!(r.list_sets().unwrap()[0].items.len(), 2);
        r.open_item(&SetId::new("s3"), &ItemId::new("b")).unwrap();
        assert_eq!(r.read(100).unwrap(), b"BBBBB");
        assert!(!dir.path().join("s3").join(JOURNAL).exists());
        let e = DiskWriter::new(dir.path().to_path_buf())
            .resume_set(&SetId::new("s3"))
            .unwrap_err();
        assert!(e.to_string().contains("already committed"), "{e}");
    }

    proptest! {
        #[test]
        fn journal_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_journal(&bytes, Path::new("x"));
        }

        #[test]
        fn manifest_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_manifest(&bytes, Path::new("x"));
        }
    }
}
