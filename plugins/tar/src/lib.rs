//! Floe plugin `tar`: each backup set is one POSIX pax archive (`SET.tar`)
//! that GNU tar lists and extracts without Floe. Spec:
//! `docs/formats/tar-media.md`.
//!
//! Layout of `DIR/<set>.tar`:
//! - per item, a pax extended header (`path`, `size`, and Floe's vendor
//!   keywords `FLOE.item`, `FLOE.kind`, `FLOE.config`, `FLOE.meta.*`), a
//!   ustar header, the item's bytes padded to 512;
//! - last, the set's index: an entry `<set>/floe-index.json` (pax keyword
//!   `FLOE.index=1`) holding the set record — checksums, config ids, and
//!   where each item's bytes start;
//! - two zero blocks, then zeros to a whole record (default 256 KiB).
//!
//! A set is written as `.<set>.tar.partial`, fsynced, and renamed into
//! place: only complete archives have the `.tar` name.
//!
//! Config: `dir`; `record_size` (bytes, a multiple of 512; default 262144).

use floe_core::abi::{Interface, MediaReader, MediaWriter, Plugin, PluginInfo};
use floe_core::error::{Error, ErrorKind, Result};
use floe_core::model::*;
use floe_core::units::Bytes;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Block size of tar.
pub const BLOCK: u64 = 512;
/// Index magic.
pub const INDEX_MAGIC: &str = "floe-tar-index";
/// Index format version.
pub const VERSION: u32 = 1;
const DEFAULT_RECORD: u64 = 256 * 1024;

/// The index entry's contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// [`INDEX_MAGIC`].
    pub magic: String,
    /// [`VERSION`].
    pub version: u32,
    /// The set.
    pub record: SetRecord,
}

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
}

const JOURNAL_MAGIC: &str = "floe-tar-journal";

/// Journal format version (append-only JSON lines).
pub const JOURNAL_VERSION: u32 = 2;

/// The journal's first line.
#[derive(Serialize, Deserialize)]
struct JournalHead {
    magic: String,
    version: u32,
    header: SetHeader,
}

/// Every later line: a durable item and where the archive ends after it,
/// or a failure.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum JournalLine {
    Item { record: Box<ItemRecord>, end: u64 },
    Failure(ItemFailure),
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
    if head.magic != JOURNAL_MAGIC || head.version != JOURNAL_VERSION {
        return Err(bad(format!(
            "not a Floe tar journal of version {JOURNAL_VERSION}: {:?} version {}",
            head.magic, head.version
        )));
    }
    let mut j = Journal {
        magic: head.magic,
        version: head.version,
        header: head.header,
        items: Vec::new(),
        end: 0,
        failures: Vec::new(),
    };
    for (n, l) in lines.enumerate() {
        match serde_json::from_slice::<JournalLine>(l) {
            Ok(JournalLine::Item { record, end }) => {
                if end < j.end || !end.is_multiple_of(BLOCK) {
                    return Err(bad(format!(
                        "tar journal line {} ends the archive at {end}",
                        n + 2
                    )));
                }
                j.end = end;
                j.items.push(*record);
            }
            Ok(JournalLine::Failure(f)) => j.failures.push(f),
            Err(e) => return Err(bad(format!("malformed tar journal line {}", n + 2)).source(e)),
        }
    }
    Ok(j)
}

use floe_core::media::{
    checked_set_name as set_name, complete_lines, fsync_dir, json_line, media_io_error as media_err,
};

fn octal(field: &mut [u8], v: u64) {
    // width-1 octal digits, then NUL
    let w = field.len() - 1;
    let s = format!("{v:0w$o}");
    field[..w].copy_from_slice(&s.as_bytes()[s.len() - w..]);
    field[w] = 0;
}

/// One ustar header block.
fn ustar(name: &str, size: u64, typeflag: u8, mtime: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    let n = name.as_bytes();
    let take = n.len().min(100);
    h[..take].copy_from_slice(&n[..take]);
    octal(&mut h[100..108], 0o644);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    // Sizes of 8 GiB and more do not fit the field: the pax `size`
    // keyword carries them, and the field says 0.
    octal(
        &mut h[124..136],
        if size < 0o77777777777 { size } else { 0 },
    );
    octal(&mut h[136..148], mtime);
    h[156] = typeflag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[265..269].copy_from_slice(b"root");
    h[297..301].copy_from_slice(b"root");
    h[148..156].copy_from_slice(b"        ");
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

/// One pax record: "LEN key=value\n", LEN counting itself.
fn pax_record(key: &str, value: &str) -> String {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    loop {
        let candidate = len.to_string().len() + body.len();
        if candidate == len {
            return format!("{len}{body}");
        }
        len = candidate;
    }
}

fn padding(n: u64) -> u64 {
    (BLOCK - n % BLOCK) % BLOCK
}

/// A pax header + ustar header for an entry of `size` bytes.
fn entry_headers(name: &str, size: u64, mtime: u64, keywords: &[(String, String)]) -> Vec<u8> {
    let mut recs = String::new();
    recs.push_str(&pax_record("path", name));
    recs.push_str(&pax_record("size", &size.to_string()));
    for (k, v) in keywords {
        recs.push_str(&pax_record(k, v));
    }
    let mut out = Vec::new();
    let short: String = name
        .chars()
        .rev()
        .take(80)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    out.extend_from_slice(&ustar(
        &format!("PaxHeaders/{short}"),
        recs.len() as u64,
        b'x',
        mtime,
    ));
    out.extend_from_slice(recs.as_bytes());
    out.resize(
        out.len() + usize::try_from(padding(recs.len() as u64)).unwrap_or(0),
        0,
    );
    out.extend_from_slice(&ustar(name, size, b'0', mtime));
    out
}

struct Writing {
    header: SetHeader,
    path: PathBuf,
    file: File,
    pos: u64,
    items: Vec<ItemRecord>,
    failures: Vec<ItemFailure>,
    current: Option<(ItemHeader, u64, u64)>, // header, data start, bytes written
    /// Items ended since the journal was last written, and when it was.
    unjournaled: (usize, std::time::Instant),
    /// Journal lines waiting for the next checkpoint.
    pending: Vec<u8>,
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

/// Make the archive durable up to `w.pos`, then record that in the journal
/// (temporary file, fsync, rename): the journal never names bytes that
/// are not on the media.
/// Was the item just ended a volume? (Volumes are journaled at once.)
fn trailer_is_volume(items: &[ItemRecord]) -> bool {
    items
        .last()
        .is_some_and(|i| i.header.kind == ItemKind::Volume)
}

/// Start the journal: its head line and the lines of what is durable
/// already (on resume); temporary file, fsync, rename, fsync the directory.
fn write_journal(dir: &Path, w: &Writing) -> Result<()> {
    w.file
        .sync_data()
        .map_err(|e| media_err("fsync archive", &w.path, e))?;
    let mut bytes = json_line(&JournalHead {
        magic: JOURNAL_MAGIC.into(),
        version: JOURNAL_VERSION,
        header: w.header.clone(),
    })?;
    // On resume the archive was cut at `pos`: the last item ends there.
    for (k, it) in w.items.iter().enumerate() {
        let end = if k + 1 == w.items.len() { w.pos } else { 0 };
        bytes.extend(json_line(&JournalLine::Item {
            record: Box::new(it.clone()),
            end,
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

/// Make the archive durable up to `w.pos`, then append the pending lines
/// to the journal: it never names bytes that are not on the media.
fn checkpoint(dir: &Path, w: &mut Writing) -> Result<()> {
    w.file
        .sync_data()
        .map_err(|e| media_err("fsync archive", &w.path, e))?;
    if !w.pending.is_empty() {
        let path = journal_path(dir, &w.header.set);
        let mut f = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| media_err("open journal", &path, e))?;
        f.write_all(&w.pending)
            .and_then(|()| f.sync_data())
            .map_err(|e| media_err("append to journal", &path, e))?;
        w.pending.clear();
    }
    w.unjournaled = (0, std::time::Instant::now());
    Ok(())
}

fn put(w: &mut Writing, bytes: &[u8]) -> Result<()> {
    w.file
        .write_all(bytes)
        .map_err(|e| media_err("write archive", &w.path, e))?;
    w.pos += bytes.len() as u64;
    Ok(())
}

impl MediaWriter for TarWriter {
    fn begin_set(&mut self, header: &SetHeader) -> Result<()> {
        let name = set_name(&header.set)?;
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| media_err("create media directory", &self.dir, e))?;
        if self.dir.join(format!("{name}.tar")).exists() {
            return Err(Error::new(
                ErrorKind::Media,
                format!("set {name} exists on this media"),
            ));
        }
        let path = self.dir.join(format!(".{name}.tar.partial"));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| media_err("create archive", &path, e))?;
        let w = Writing {
            header: header.clone(),
            path,
            file,
            pos: 0,
            items: Vec::new(),
            failures: Vec::new(),
            current: None,
            unjournaled: (0, std::time::Instant::now()),
            pending: Vec::new(),
        };
        write_journal(&self.dir, &w)?;
        self.set = Some(w);
        Ok(())
    }

    fn resume_set(&mut self, set: &SetId) -> Result<SetRecord> {
        let name = set_name(set)?;
        if self.dir.join(format!("{name}.tar")).exists() {
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
        let path = self.dir.join(format!(".{name}.tar.partial"));
        let mut file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| media_err("open partial archive", &path, e))?;
        let len = file
            .metadata()
            .map_err(|e| media_err("stat partial archive", &path, e))?
            .len();
        if len < j.end {
            return Err(Error::new(
                ErrorKind::Media,
                format!(
                    "partial archive holds {len} bytes, its journal says {}",
                    j.end
                ),
            )
            .path(&path));
        }
        // Whatever follows the last durable item is the item being written
        // when the writer died: cut it off and go on from there.
        file.set_len(j.end)
            .map_err(|e| media_err("truncate partial archive", &path, e))?;
        file.seek(SeekFrom::Start(j.end))
            .map_err(|e| media_err("seek partial archive", &path, e))?;
        let record = SetRecord {
            header: j.header.clone(),
            items: j.items.clone(),
            failures: j.failures.clone(),
            committed_at: 0,
        };
        self.set = Some(Writing {
            header: j.header,
            path,
            file,
            pos: j.end,
            items: j.items,
            failures: j.failures,
            current: None,
            unjournaled: (0, std::time::Instant::now()),
            pending: Vec::new(),
        });
        // A fresh journal of exactly what is durable (drops a torn line).
        let dir = self.dir.clone();
        write_journal(&dir, self.w()?)?;
        Ok(record)
    }

    fn begin_item(&mut self, header: &ItemHeader) -> Result<()> {
        let w = self.w()?;
        let name = format!(
            "{}/{}",
            w.header.set,
            header.item.as_str().trim_start_matches('/')
        );
        let mut kw = vec![
            ("FLOE.item".to_string(), header.item.to_string()),
            (
                "FLOE.kind".to_string(),
                format!("{:?}", header.kind).to_lowercase(),
            ),
            ("FLOE.config".to_string(), header.config.to_string()),
        ];
        for (k, v) in &header.meta {
            kw.push((format!("FLOE.meta.{k}"), v.clone()));
        }
        let h = entry_headers(&name, header.size.0, w.header.frozen_at, &kw);
        put(w, &h)?;
        let start = w.pos;
        w.current = Some((header.clone(), start, 0));
        Ok(())
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        let w = self.w()?;
        let Some((h, _, done)) = w.current.as_mut() else {
            return Err(Error::new(ErrorKind::Media, "write outside an item"));
        };
        if *done + data.len() as u64 > h.size.0 {
            return Err(Error::new(
                ErrorKind::Media,
                format!("item {} is longer than its header said", h.item),
            ));
        }
        *done += data.len() as u64;
        put(w, data)
    }

    fn end_item(&mut self, trailer: &ItemTrailer) -> Result<MediaPosition> {
        let medium = self.dir.display().to_string();
        let w = self.w()?;
        let (h, start, done) = w
            .current
            .take()
            .ok_or_else(|| Error::new(ErrorKind::Media, "end_item outside an item"))?;
        if done != h.size.0 || trailer.length.0 != done {
            return Err(Error::new(
                ErrorKind::Media,
                format!(
                    "item {} is {} bytes, its header said {}",
                    h.item, done, h.size
                ),
            ));
        }
        let pad = vec![0u8; usize::try_from(padding(done)).unwrap_or(0)];
        put(w, &pad)?;
        let position = MediaPosition {
            medium,
            locator: format!("{}.tar@{start}", w.header.set),
        };
        let record = ItemRecord {
            header: h,
            trailer: trailer.clone(),
            position: position.clone(),
        };
        let line = json_line(&JournalLine::Item {
            record: Box::new(record.clone()),
            end: w.pos,
        })?;
        w.pending.extend(line);
        w.items.push(record);
        let volume = trailer_is_volume(&w.items);
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
            w.pending.extend(line);
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<SetRecord> {
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
        let record = SetRecord {
            header: w.header.clone(),
            items: std::mem::take(&mut w.items),
            failures: std::mem::take(&mut w.failures),
            committed_at: now_secs(),
        };
        let index = serde_json::to_vec(&Index {
            magic: INDEX_MAGIC.into(),
            version: VERSION,
            record: record.clone(),
        })
        .map_err(|e| Error::new(ErrorKind::Media, "cannot encode index").source(e))?;
        let result = (|| {
            let name = format!("{}/floe-index.json", w.header.set);
            let h = entry_headers(
                &name,
                index.len() as u64,
                record.committed_at,
                &[("FLOE.index".into(), "1".into())],
            );
            put(&mut w, &h)?;
            put(&mut w, &index)?;
            let pad =
                vec![0u8; usize::try_from(padding(index.len() as u64) + 2 * BLOCK).unwrap_or(0)];
            put(&mut w, &pad)?;
            let rest = (record_size - w.pos % record_size) % record_size;
            put(&mut w, &vec![0u8; usize::try_from(rest).unwrap_or(0)])?;
            w.file
                .sync_all()
                .map_err(|e| media_err("fsync archive", &w.path, e))?;
            let fin = dir.join(format!("{}.tar", w.header.set));
            std::fs::rename(&w.path, &fin)
                .map_err(|e| media_err("rename archive into place", &fin, e))?;
            let _ = std::fs::remove_file(journal_path(&dir, &w.header.set));
            fsync_dir(&dir)
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&w.path);
            return Err(e);
        }
        Ok(record)
    }

    fn abort(&mut self) -> Result<()> {
        if let Some(w) = self.set.take() {
            let _ = std::fs::remove_file(journal_path(&self.dir, &w.header.set));
            std::fs::remove_file(&w.path)
                .map_err(|e| media_err("remove partial archive", &w.path, e))?;
        }
        Ok(())
    }

    fn delete_set(&mut self, set: &SetId) -> Result<()> {
        let name = set_name(set)?;
        let path = self.dir.join(format!("{name}.tar"));
        if !path.exists() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("no set {set} on media {}", self.dir.display()),
            ));
        }
        std::fs::remove_file(&path).map_err(|e| media_err("delete archive", &path, e))
    }
}

/// Parse the numeric field of a ustar header.
fn parse_octal(f: &[u8]) -> Option<u64> {
    let s: String = f
        .iter()
        .take_while(|&&b| b != 0 && b != b' ')
        .map(|&b| b as char)
        .collect();
    let s = s.trim();
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

/// Parse pax records into key/value pairs.
fn parse_pax(data: &[u8]) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let sp = rest.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return None;
        }
        let rec = std::str::from_utf8(&rest[sp + 1..len - 1]).ok()?;
        let (k, v) = rec.split_once('=')?;
        out.push((k.to_string(), v.to_string()));
        rest = &rest[len..];
    }
    Some(out)
}

/// Find and decode a set's index by walking the archive's headers.
pub fn read_index(r: &mut (impl Read + Seek), path: &Path) -> Result<SetRecord> {
    let bad = |msg: String| Error::new(ErrorKind::Media, msg).path(path);
    let mut pos = 0u64;
    let mut pax: Vec<(String, String)> = Vec::new();
    loop {
        let mut h = [0u8; 512];
        r.seek(SeekFrom::Start(pos))
            .map_err(|e| media_err("seek archive", path, e))?;
        if r.read_exact(&mut h).is_err() {
            return Err(bad("archive ends before its Floe index".into()));
        }
        if h.iter().all(|&b| b == 0) {
            return Err(bad(
                "archive has no Floe index: not a complete Floe set".into()
            ));
        }
        let stored: u64 = parse_octal(&h[148..156])
            .ok_or_else(|| bad(format!("bad header checksum at {pos}")))?;
        let mut hh = h;
        hh[148..156].copy_from_slice(b"        ");
        let sum: u64 = hh.iter().map(|&b| u64::from(b)).sum();
        if sum != stored {
            return Err(bad(format!("header at byte {pos} fails its checksum")));
        }
        let mut size =
            parse_octal(&h[124..136]).ok_or_else(|| bad(format!("bad size at {pos}")))?;
        if let Some((_, v)) = pax.iter().find(|(k, _)| k == "size") {
            size = v
                .parse()
                .map_err(|_| bad(format!("bad pax size at {pos}")))?;
        }
        let data_at = pos + BLOCK;
        let typeflag = h[156];
        if typeflag == b'x' {
            if size > 1 << 20 {
                return Err(bad(format!("pax header of {size} bytes at {pos}")));
            }
            let mut d = vec![0u8; usize::try_from(size).unwrap_or(0)];
            r.read_exact(&mut d)
                .map_err(|e| media_err("read archive", path, e))?;
            pax = parse_pax(&d).ok_or_else(|| bad(format!("malformed pax records at {pos}")))?;
        } else {
            if pax.iter().any(|(k, v)| k == "FLOE.index" && v == "1") {
                if size > 64 << 20 {
                    return Err(bad(format!("index of {size} bytes")));
                }
                let mut d = vec![0u8; usize::try_from(size).unwrap_or(0)];
                r.read_exact(&mut d)
                    .map_err(|e| media_err("read archive", path, e))?;
                return decode_index(&d, path);
            }
            pax.clear();
        }
        pos = data_at
            .checked_add(size)
            .and_then(|p| p.checked_add(padding(size)))
            .ok_or_else(|| bad(format!("entry at {pos} overflows")))?;
    }
}

/// Decode and check an index.
pub fn decode_index(bytes: &[u8], path: &Path) -> Result<SetRecord> {
    let i: Index = serde_json::from_slice(bytes).map_err(|e| {
        Error::new(ErrorKind::Media, "malformed Floe index")
            .path(path)
            .source(e)
    })?;
    if i.magic != INDEX_MAGIC || i.version != VERSION {
        return Err(Error::new(
            ErrorKind::Media,
            format!("not a Floe tar index of version {VERSION}"),
        )
        .path(path));
    }
    Ok(i.record)
}

/// Reads sets from pax archives.
pub struct TarReader {
    dir: PathBuf,
    open: Option<(File, PathBuf, u64)>,
    /// The last set's index, by item (a set of 70,000 files is opened
    /// item by item).
    cached: Option<(SetId, SetRecord, std::collections::HashMap<ItemId, usize>)>,
}

impl MediaReader for TarReader {
    fn list_sets(&mut self) -> Result<Vec<SetRecord>> {
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| media_err("list media directory", &self.dir, e))?;
        let mut sets = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') || !name.ends_with(".tar") {
                continue;
            }
            let path = e.path();
            let mut f = File::open(&path).map_err(|err| media_err("open archive", &path, err))?;
            sets.push(read_index(&mut f, &path)?);
        }
        sets.sort_by(|a, b| (a.committed_at, &a.header.set).cmp(&(b.committed_at, &b.header.set)));
        Ok(sets)
    }

    fn open_item(&mut self, set: &SetId, item: &ItemId) -> Result<ItemRecord> {
        let name = set_name(set)?;
        let path = self.dir.join(format!("{name}.tar"));
        let mut f = File::open(&path).map_err(|e| {
            Error::new(
                ErrorKind::NotFound,
                format!("no set {set} on media {}", self.dir.display()),
            )
            .path(&path)
            .source(e)
        })?;
        if self.cached.as_ref().is_none_or(|(s, _, _)| s != set) {
            let record = read_index(&mut f, &path)?;
            let index = record
                .items
                .iter()
                .enumerate()
                .map(|(i, r)| (r.header.item.clone(), i))
                .collect();
            self.cached = Some((set.clone(), record, index));
        }
        let (_, record, index) = self.cached.as_ref().expect("loaded above");
        let rec = index
            .get(item)
            .map(|&i| record.items[i].clone())
            .ok_or_else(|| {
                Error::new(ErrorKind::NotFound, format!("set {set} has no item {item}")).item(item)
            })?;
        let start: u64 = rec
            .position
            .locator
            .rsplit_once('@')
            .and_then(|(_, o)| o.parse().ok())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Media,
                    format!("bad locator {:?}", rec.position.locator),
                )
                .path(&path)
            })?;
        f.seek(SeekFrom::Start(start))
            .map_err(|e| media_err("seek archive", &path, e))?;
        self.open = Some((f, path, rec.trailer.length.0));
        Ok(rec)
    }

    fn read(&mut self, max: usize) -> Result<Vec<u8>> {
        let (f, path, left) = self
            .open
            .as_mut()
            .ok_or_else(|| Error::new(ErrorKind::Media, "no item open"))?;
        let n = usize::try_from((*left).min(max as u64)).unwrap_or(max);
        let mut buf = vec![0u8; n];
        f.read_exact(&mut buf)
            .map_err(|e| media_err("read archive", path, e))?;
        *left -= n as u64;
        Ok(buf)
    }
}

fn config_of(config: &serde_json::Value) -> Result<(PathBuf, u64)> {
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
        }
    }
    fn media_writer(config: &serde_json::Value) -> Result<Box<dyn MediaWriter>> {
        let (dir, record) = config_of(config)?;
        Ok(Box::new(TarWriter {
            dir,
            record,
            set: None,
        }))
    }
    fn media_reader(config: &serde_json::Value) -> Result<Box<dyn MediaReader>> {
        let (dir, _) = config_of(config)?;
        Ok(Box::new(TarReader {
            dir,
            open: None,
            cached: None,
        }))
    }
}

floe_core::export_plugin!(TarPlugin);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pax_records_count_their_own_length() {
        for (k, v) in [
            ("path", "a"),
            ("size", "123456789012"),
            ("FLOE.meta.x", &"y".repeat(120)[..]),
        ] {
            let r = pax_record(k, v);
            let n: usize = r.split(' ').next().unwrap().parse().unwrap();
            assert_eq!(n, r.len(), "{r:?}");
            assert_eq!(
                parse_pax(r.as_bytes()).unwrap(),
                vec![(k.to_string(), v.to_string())]
            );
        }
    }

    #[test]
    fn headers_checksum() {
        let h = ustar("s/vol0", 1 << 20, b'0', 1);
        let stored = parse_octal(&h[148..156]).unwrap();
        let mut hh = h;
        hh[148..156].copy_from_slice(b"        ");
        assert_eq!(stored, hh.iter().map(|&b| u64::from(b)).sum::<u64>());
        assert_eq!(parse_octal(&h[124..136]), Some(1 << 20));
    }

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
        let d = tempfile::tempdir().unwrap();
        let cfg = serde_json::json!({"dir": d.path(), "record_size": 1024});
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
        assert_eq!(
            std::fs::metadata(d.path().join("s.tar")).unwrap().len() % 1024,
            0
        );
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

        #[test]
        fn pax_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_pax(&bytes);
        }
    }
}
