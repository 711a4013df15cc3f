//! Floe plugin `tape`: each backup set is a POSIX pax archive (the same
//! entries as the `tar` media, `floe_core::pax`) written as one tape file
//! of fixed-size records, followed by a small tape file holding the set's
//! index. Sets span cartridges at the early warning; restore positions
//! with rewind / forward-space-file / forward-space-record instead of
//! reading from the start. Spec: `docs/formats/tape-media.md`.
//!
//! Drives: `/dev/nstN` through the Linux `st` driver (ioctls in [`sys`]),
//! or a drive of sim-san's virtual tape library, `vtl://HOST:PORT/N` —
//! one `TapeDrive` trait for both.
//!
//! Config: `device`; `record_size` (default 256 KiB, a multiple of 512, at
//! most 4 MiB); `changer` (a command: the plugin runs `CHANGER next` to
//! load the next cartridge — its last line of output, if any, is the
//! cartridge's barcode — and `CHANGER load LABEL` to load a given one;
//! without it a terminal prompt asks an operator); `label` (for a blank
//! first cartridge when no barcode is known); `cartridges` (labels a
//! reader scans when listing sets, comma-separated).

/// mimalloc instead of glibc's malloc inside this plugin (a cdylib has its
/// own allocator): writing and reading a set allocate per item (headers,
/// records, the index); glibc's malloc, realloc and free in the `tar`
/// plugin were a tenth of the mover's CPU on the 70,000-file tree.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod sys;

use floe_core::abi::{Interface, MediaReader, MediaWriter, Plugin, PluginInfo};
use floe_core::error::{Error, ErrorKind, Result};
use floe_core::model::*;
use floe_core::pax::{
    archive_end, index_entry, is_sparse, item_entry, last_entries, written_last, EntryReader,
    EntryStream,
};
use floe_core::tape::{errno, errno_of, MtOp, TapeDrive, VtlDrive};
use floe_core::units::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Read;

/// Default record (tape block) size.
pub const DEFAULT_RECORD: u64 = 256 * 1024;
/// Largest record size accepted (and the read buffer).
pub const MAX_RECORD: u64 = 4 << 20;
/// Label magic.
pub const LABEL_MAGIC: &str = "floe-tape-label";
/// Set index file magic.
pub const INDEX_MAGIC: &str = "floe-tape-set";
/// Format version of labels and index files.
pub const VERSION: u32 = 1;

/// The record at the start of every Floe cartridge (tape file 0).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Label {
    /// [`LABEL_MAGIC`].
    pub magic: String,
    /// [`VERSION`].
    pub version: u32,
    /// The cartridge's label (its barcode when the changer told us).
    pub label: String,
    /// When it was labelled.
    pub created: u64,
    /// Times it was recycled (labelled again, ending its data): a set whose
    /// piece names an older generation of the cartridge is gone.
    #[serde(default)]
    pub generation: u32,
}

/// One stretch of a set's archive on one cartridge: one tape file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    /// The cartridge.
    pub label: String,
    /// Its tape file number.
    pub file: u64,
    /// Archive offset of the piece's first byte.
    pub offset: u64,
    /// Bytes of archive in the piece (whole records).
    pub length: u64,
    /// The cartridge's generation when the piece was written.
    #[serde(default)]
    pub generation: u32,
}

/// The tape file after a set's archive: where every piece is, and the set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapeIndex {
    /// [`INDEX_MAGIC`].
    pub magic: String,
    /// [`VERSION`].
    pub version: u32,
    /// Record size of the archive's tape files.
    pub record_size: u64,
    /// The archive's pieces, in order.
    pub pieces: Vec<Piece>,
    /// The set, with each item's cartridge, file and record.
    pub record: SetRecord,
}

/// Decode a label record (zero-padded JSON).
pub fn decode_label(rec: &[u8]) -> Option<Label> {
    let end = rec.iter().position(|&b| b == 0).unwrap_or(rec.len());
    serde_json::from_slice::<Label>(&rec[..end])
        .ok()
        .filter(|l| l.magic == LABEL_MAGIC && l.version == VERSION)
}

/// Decode a set index file's bytes (zero-padded JSON).
pub fn decode_index(bytes: &[u8]) -> Result<TapeIndex> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let i: TapeIndex = serde_json::from_slice(&bytes[..end])
        .map_err(|e| Error::new(ErrorKind::Media, "malformed tape set index").source(e))?;
    if i.magic != INDEX_MAGIC || i.version != VERSION {
        return Err(Error::new(
            ErrorKind::Media,
            format!("not a Floe tape set index of version {VERSION}"),
        ));
    }
    let mut at = 0;
    for p in &i.pieces {
        if p.offset != at || p.length % i.record_size.max(1) != 0 {
            return Err(Error::new(
                ErrorKind::Media,
                format!("tape set index: piece on {} does not follow on", p.label),
            ));
        }
        at += p.length;
    }
    Ok(i)
}

/// `at=D` of a locator: the archive offset of an item's data.
fn locator_offset(loc: &str) -> Option<u64> {
    loc.split(',')
        .find_map(|p| p.strip_prefix("at=")?.parse().ok())
}

fn pad_to(mut v: Vec<u8>, record: u64) -> Vec<u8> {
    let r = usize::try_from(record).unwrap_or(512);
    let n = v.len().div_ceil(r).max(1) * r;
    v.resize(n, 0);
    v
}

#[derive(Clone, Debug)]
struct Config {
    device: String,
    record: u64,
    changer: Option<String>,
    label: Option<String>,
    cartridges: Vec<String>,
}

fn config_of(c: &serde_json::Value) -> Result<Config> {
    floe_core::abi::known_options(
        c,
        "tape media",
        &[
            "device",
            "dir",
            "record_size",
            "changer",
            "label",
            "cartridges",
        ],
    )?;
    let s = |k: &str| c.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let device = s("device").or_else(|| s("dir")).ok_or_else(|| {
        Error::new(
            ErrorKind::Config,
            "tape media needs a device (tape:/dev/nst0 or tape:vtl://HOST:PORT/0)",
        )
    })?;
    let record = match c.get("record_size") {
        None => DEFAULT_RECORD,
        Some(v) => v
            .as_u64()
            .or_else(|| {
                v.as_str()
                    .and_then(|s| s.parse::<Bytes>().ok().map(|b| b.0))
            })
            .filter(|r| *r >= 512 && r % 512 == 0 && *r <= MAX_RECORD)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    format!("record_size {v} is not a multiple of 512 up to {MAX_RECORD}"),
                )
            })?,
    };
    Ok(Config {
        device,
        record,
        changer: s("changer").filter(|c| !c.is_empty()),
        label: s("label"),
        cartridges: s("cartridges")
            .map(|l| {
                l.split(',')
                    .filter(|x| !x.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default(),
    })
}

fn open_drive(device: &str, write: bool) -> Result<Box<dyn TapeDrive>> {
    if device.starts_with("vtl://") {
        Ok(Box::new(VtlDrive::open(device, write)?))
    } else {
        Ok(Box::new(sys::StDrive::open(device, write)?))
    }
}

/// Run `CHANGER VERB` through the shell, the drive in `FLOE_TAPE_DEVICE`.
fn run_changer(ch: &str, device: &str, verb: &str) -> Result<std::process::Output> {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{ch} {verb}"))
        .env("FLOE_TAPE_DEVICE", device)
        .output()
        .map_err(|e| {
            Error::new(ErrorKind::Media, format!("cannot run the changer {ch:?}")).source(e)
        })
}

/// Run the changer (`next`, or `load LABEL`), or ask an operator at a
/// terminal. Returns the barcode the changer printed, if any.
fn change(cfg: &Config, verb: &str, why: &str) -> Result<Option<String>> {
    if let Some(ch) = &cfg.changer {
        let out = run_changer(ch, &cfg.device, verb)?;
        if !out.status.success() {
            let kind = if verb == "next" {
                ErrorKind::MediaFull
            } else {
                ErrorKind::Media
            };
            return Err(Error::new(
                kind,
                format!(
                    "{why}; the changer `{ch} {verb}` failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        return Ok(text
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .map(str::to_string));
    }
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        let what = verb
            .strip_prefix("load ")
            .map_or("the next cartridge".to_string(), |l| {
                format!("cartridge {l}")
            });
        eprintln!(
            "floe: {why}. Insert {what} into {} and press Enter.",
            cfg.device
        );
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| Error::new(ErrorKind::Media, "no answer at the terminal").source(e))?;
        return Ok(None);
    }
    Err(Error::new(
        if verb == "next" {
            ErrorKind::MediaFull
        } else {
            ErrorKind::Media
        },
        format!("{why}, and no changer is configured (tape.changer) nor a terminal to ask at"),
    ))
}

/// Every cartridge of the library, by the changer's `list`.
fn changer_list(cfg: &Config) -> Result<Vec<String>> {
    let Some(ch) = &cfg.changer else {
        return Ok(Vec::new());
    };
    let out = run_changer(ch, &cfg.device, "list")?;
    if !out.status.success() {
        return Err(Error::new(
            ErrorKind::Media,
            format!(
                "the changer `{ch} list` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// Read the record at the tape's start: the label, `Ok(None)` on a blank
/// cartridge.
fn read_label(drive: &mut dyn TapeDrive) -> Result<Option<std::result::Result<Label, usize>>> {
    drive.op(MtOp::Rewind)?;
    drive.op(MtOp::SetBlk(0))?;
    let mut buf = vec![0u8; usize::try_from(MAX_RECORD).unwrap_or(1 << 22)];
    match drive.read(&mut buf) {
        Ok(0) => Ok(None),
        Ok(n) => Ok(Some(decode_label(&buf[..n]).ok_or(n))),
        Err(e) if errno_of(&e) == Some(errno::EIO) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Write a Floe label as the tape's first file (at its beginning: what
/// followed is gone).
fn write_label(drive: &mut dyn TapeDrive, label: &str, generation: u32, record: u64) -> Result<()> {
    let rec = pad_to(
        serde_json::to_vec(&Label {
            magic: LABEL_MAGIC.into(),
            version: VERSION,
            label: label.to_string(),
            created: now_secs(),
            generation,
        })
        .map_err(|e| Error::new(ErrorKind::Media, "encode label").source(e))?,
        record,
    );
    drive.op(MtOp::Rewind)?;
    drive.op(MtOp::SetBlk(u32::try_from(record).unwrap_or(0)))?;
    drive.write(&rec)?;
    drive.op(MtOp::Weof(1))
}

struct Writing {
    header: SetHeader,
    /// Archive bytes put so far (written or buffered).
    pos: u64,
    /// The record being filled.
    rec: Vec<u8>,
    pieces: Vec<Piece>,
    items: Vec<ItemRecord>,
    failures: Vec<ItemFailure>,
    current: Option<(ItemHeader, u64, EntryStream)>,
}

/// Writes sets to tape.
pub struct TapeWriter {
    cfg: Config,
    drive: Option<Box<dyn TapeDrive>>,
    label: String,
    /// The loaded cartridge's generation.
    generation: u32,
    set: Option<Writing>,
    /// Cartridges labelled by this writer (for generated labels).
    labelled: u32,
}

impl TapeWriter {
    /// Open the drive with a cartridge for writing, positioned at its end
    /// of data (labelling a blank one).
    fn mount(&mut self, barcode: Option<String>) -> Result<()> {
        let mut barcode = barcode;
        let mut drive = match open_drive(&self.cfg.device, true) {
            Err(e) if errno_of(&e) == Some(errno::ENOMEDIUM) => {
                barcode = change(&self.cfg, "next", &format!("no cartridge in {}", self.cfg.device))?;
                open_drive(&self.cfg.device, true)?
            }
            Err(e) if errno_of(&e) == Some(errno::EROFS) => {
                return Err(Error::new(
                    ErrorKind::Media,
                    format!(
                        "the cartridge in {} is write-protected: refusing to write (slide its tab or load another)",
                        self.cfg.device
                    ),
                )
                .source(e))
            }
            r => r?,
        };
        match read_label(drive.as_mut())? {
            Some(Ok(l)) => {
                drive.op(MtOp::Eom)?;
                self.label = l.label;
                self.generation = l.generation;
            }
            Some(Err(n)) => {
                return Err(Error::new(
                    ErrorKind::Media,
                    format!(
                        "the cartridge in {} starts with a {n}-byte record that is not a Floe label: refusing to write over data Floe did not write",
                        self.cfg.device
                    ),
                ))
            }
            None => {
                self.labelled += 1;
                let label = barcode
                    .or_else(|| self.cfg.label.clone().filter(|_| self.labelled == 1))
                    .unwrap_or_else(|| format!("FLOE{:06}{:02}", now_secs() % 1_000_000, self.labelled));
                write_label(drive.as_mut(), &label, 0, self.cfg.record)?;
                self.label = label;
                self.generation = 0;
            }
        }
        drive.op(MtOp::SetBlk(u32::try_from(self.cfg.record).unwrap_or(0)))?;
        self.drive = Some(drive);
        Ok(())
    }

    fn drive(&mut self) -> Result<&mut Box<dyn TapeDrive>> {
        self.drive
            .as_mut()
            .ok_or_else(|| Error::new(ErrorKind::Media, "no tape drive open"))
    }

    /// Recycle cartridge `label`: load it, check its label, and write the
    /// label again (generation `generation`) at the beginning of the tape,
    /// which ends its data there: its sets are gone, it takes new ones.
    fn relabel(&mut self, label: &str, generation: u32) -> Result<()> {
        self.drive = None;
        if self.cfg.changer.is_some() {
            change(
                &self.cfg,
                &format!("load {label}"),
                &format!("cartridge {label} is to be recycled"),
            )?;
        }
        let mut drive = open_drive(&self.cfg.device, true).map_err(|e| {
            if errno_of(&e) == Some(errno::EROFS) {
                Error::new(
                    ErrorKind::Media,
                    format!("cartridge {label} is write-protected: it cannot be recycled"),
                )
                .source(e)
            } else {
                e
            }
        })?;
        match read_label(drive.as_mut())? {
            Some(Ok(l)) if l.label == label => {}
            _ => {
                return Err(Error::new(
                    ErrorKind::Media,
                    format!(
                        "the cartridge in {} is not {label}: not recycling it",
                        self.cfg.device
                    ),
                ))
            }
        }
        write_label(drive.as_mut(), label, generation, self.cfg.record)
    }

    /// Close the current piece and go on on the next cartridge.
    fn span(&mut self) -> Result<()> {
        let full = self.label.clone();
        self.drive()?.op(MtOp::Weof(1))?;
        self.drive = None; // close(2)
        let barcode = change(
            &self.cfg,
            "next",
            &format!("cartridge {full} is full (early warning)"),
        )?;
        self.mount(barcode)?;
        self.start_piece()
    }

    fn start_piece(&mut self) -> Result<()> {
        let file = u64::try_from(self.drive()?.status()?.file_number).unwrap_or(0);
        let (label, generation) = (self.label.clone(), self.generation);
        let w = self.w()?;
        let offset = w.pieces.iter().map(|p| p.length).sum();
        w.pieces.push(Piece {
            label,
            file,
            offset,
            length: 0,
            generation,
        });
        Ok(())
    }

    fn w(&mut self) -> Result<&mut Writing> {
        self.set
            .as_mut()
            .ok_or_else(|| Error::new(ErrorKind::Media, "no set begun"))
    }

    /// Write one whole record, spanning to the next cartridge at the early
    /// warning or end of medium.
    fn write_record(&mut self, rec: &[u8], count: bool) -> Result<()> {
        let mut spanned = false;
        loop {
            match self.drive()?.write(rec) {
                Ok(n) if n == rec.len() => break,
                Ok(n) => {
                    return Err(Error::new(
                        ErrorKind::Media,
                        format!(
                            "tape {}: short write of {n} of {} bytes",
                            self.cfg.device,
                            rec.len()
                        ),
                    ))
                }
                Err(e) if errno_of(&e) == Some(errno::ENOSPC) => {
                    if spanned {
                        return Err(Error::new(
                            ErrorKind::MediaFull,
                            format!(
                                "a {}-byte record does not fit on the fresh cartridge {}",
                                rec.len(),
                                self.label
                            ),
                        )
                        .source(e));
                    }
                    self.span().map_err(|s| {
                        Error::new(s.kind(), format!("end of medium while writing: {s}"))
                    })?;
                    spanned = true;
                }
                Err(e) => return Err(e),
            }
        }
        if count {
            if let Some(p) = self.w()?.pieces.last_mut() {
                p.length += rec.len() as u64;
            }
        }
        Ok(())
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        let record = usize::try_from(self.cfg.record).unwrap_or(512);
        let mut rest = bytes;
        while !rest.is_empty() {
            let w = self.w()?;
            let take = (record - w.rec.len()).min(rest.len());
            w.rec.extend_from_slice(&rest[..take]);
            w.pos += take as u64;
            rest = &rest[take..];
            if w.rec.len() == record {
                let full = std::mem::take(&mut w.rec);
                self.write_record(&full, true)?;
                self.w()?.rec = full;
                self.w()?.rec.clear();
            }
        }
        Ok(())
    }
}

impl MediaWriter for TapeWriter {
    fn begin_set(&mut self, header: &SetHeader) -> Result<()> {
        floe_core::media::checked_set_name(&header.set)?;
        if self.set.is_some() {
            return Err(Error::new(
                ErrorKind::Media,
                "a set is already being written",
            ));
        }
        if self.drive.is_none() {
            self.mount(None)?;
        }
        self.set = Some(Writing {
            header: header.clone(),
            pos: 0,
            rec: Vec::with_capacity(usize::try_from(self.cfg.record).unwrap_or(0)),
            pieces: Vec::new(),
            items: Vec::new(),
            failures: Vec::new(),
            current: None,
        });
        if self.drive()?.status()?.eot {
            // Already past the early warning: start on the next cartridge.
            self.drive()?.op(MtOp::Eom)?;
            self.drive = None;
            let b = change(
                &self.cfg,
                "next",
                &format!("cartridge {} is past its early warning", self.label),
            )?;
            self.mount(b)?;
        }
        self.start_piece()
    }

    fn resume_set(&mut self, set: &SetId) -> Result<SetRecord> {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("tape media cannot resume set {set}: its partial tape file stays unreferenced; run a new backup"),
        ))
    }

    fn begin_item(&mut self, header: &ItemHeader) -> Result<()> {
        let w = self.w()?;
        if w.current.is_some() {
            return Err(Error::new(ErrorKind::Media, "begin_item inside an item"));
        }
        let entry = item_entry(&w.header.set, header, w.header.frozen_at)?;
        let stream = EntryStream::new(header.item.as_str(), &entry);
        let start = if written_last(header.kind) {
            w.pos
        } else {
            let start = w.pos + entry.data_at as u64;
            self.put(&entry.head)?;
            start
        };
        self.w()?.current = Some((header.clone(), start, stream));
        Ok(())
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        let w = self.w()?;
        let Some((h, start, mut stream)) = w.current.take() else {
            return Err(Error::new(ErrorKind::Media, "write outside an item"));
        };
        let mut out = Vec::with_capacity(data.len());
        let r = stream.feed(data, &mut |b| {
            out.extend_from_slice(b);
            Ok(())
        });
        self.w()?.current = Some((h, start, stream));
        r?;
        self.put(&out)
    }

    fn end_item(&mut self, trailer: &ItemTrailer) -> Result<MediaPosition> {
        let label = self.label.clone();
        let w = self.w()?;
        let (h, start, stream) = w
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
        let position = MediaPosition {
            medium: label,
            locator: format!("at={start}"),
        };
        w.items.push(ItemRecord {
            header: h,
            trailer: trailer.clone(),
            position: position.clone(),
        });
        self.put(&pad)?;
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
        let w = self.w()?;
        if w.current.is_some() {
            return Err(Error::new(
                ErrorKind::Media,
                "commit with an item still open",
            ));
        }
        let mut record = SetRecord {
            header: w.header.clone(),
            items: w.items.clone(),
            failures: w.failures.clone(),
            committed_at: now_secs(),
        };
        let (set, frozen) = (w.header.set.clone(), w.header.frozen_at);
        for h in last_entries(record.items.iter().map(|i| &i.header)) {
            let e = item_entry(&set, &h, frozen)?;
            self.put(&e.head)?;
        }
        self.put(&index_entry(&record)?)?;
        let pos = self.w()?.pos;
        self.put(&archive_end(pos, self.cfg.record))?;
        debug_assert!(self.w()?.rec.is_empty());
        // The filemark makes the archive durable (st flushes at WEOF).
        self.drive()?.op(MtOp::Weof(1))?;
        // Where each item landed: cartridge, tape file and record.
        let pieces = self.w()?.pieces.clone();
        for it in &mut record.items {
            let at = locator_offset(&it.position.locator).unwrap_or(0);
            if let Some(p) = pieces.iter().rev().find(|p| p.offset <= at) {
                it.position = MediaPosition {
                    medium: p.label.clone(),
                    locator: format!(
                        "file={},record={},at={at}",
                        p.file,
                        (at - p.offset) / self.cfg.record
                    ),
                };
            }
        }
        let index = TapeIndex {
            magic: INDEX_MAGIC.into(),
            version: VERSION,
            record_size: self.cfg.record,
            pieces,
            record: record.clone(),
        };
        let bytes = pad_to(
            serde_json::to_vec(&index)
                .map_err(|e| Error::new(ErrorKind::Media, "encode tape index").source(e))?,
            self.cfg.record,
        );
        // The index file goes whole onto one cartridge: if the medium ends
        // inside it, it is written again on the next (a reader ignores the
        // torn one).
        let mut attempts = 0;
        'index: loop {
            attempts += 1;
            for rec in bytes.chunks(usize::try_from(self.cfg.record).unwrap_or(512)) {
                match self.drive()?.write(rec) {
                    Ok(_) => {}
                    Err(e) if errno_of(&e) == Some(errno::ENOSPC) && attempts == 1 => {
                        self.drive()?.op(MtOp::Weof(1))?;
                        self.drive = None;
                        let b = change(
                            &self.cfg,
                            "next",
                            &format!("cartridge {} is full", self.label),
                        )?;
                        self.mount(b)?;
                        continue 'index;
                    }
                    Err(e) => return Err(e),
                }
            }
            break;
        }
        self.drive()?.op(MtOp::Weof(1))?;
        self.set = None;
        // Positions are known only now (cartridge, tape file, record).
        Ok(Committed {
            positions: record.items.iter().map(|i| i.position.clone()).collect(),
            ..Committed::of(&record)
        })
    }

    fn abort(&mut self) -> Result<()> {
        if self.set.take().is_some() {
            if let Some(d) = self.drive.as_mut() {
                // Close the partial archive file: it stays unreferenced.
                d.op(MtOp::Weof(1))?;
            }
        }
        Ok(())
    }

    fn delete_set(&mut self, set: &SetId) -> Result<()> {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("a set on tape ({set}) cannot be deleted alone: tape is recycled a whole cartridge at a time"),
        ))
    }

    fn recycle(&mut self, forgotten: &[SetId], dry_run: bool) -> Result<Vec<String>> {
        if self.set.is_some() {
            return Err(Error::new(
                ErrorKind::Media,
                "cannot recycle while a set is written",
            ));
        }
        self.drive = None;
        let survey = {
            let mut reader = TapeReader {
                cfg: self.cfg.clone(),
                stream: None,
                open: None,
                sets: HashMap::new(),
            };
            reader.survey()?
            // the reader (and its drive) closes here
        };
        let mut freed = Vec::new();
        for (label, generation) in &survey.cartridges {
            let holding = survey.holding(label);
            // Only a cartridge with sets, every one of them forgotten.
            if holding.is_empty() || !holding.iter().all(|s| forgotten.contains(s)) {
                continue;
            }
            if !dry_run {
                self.relabel(label, generation + 1)?;
            }
            freed.push(label.clone());
        }
        Ok(freed)
    }
}

/// Reads the archive of one set from tape, across its pieces.
struct ArchiveStream {
    cfg: Config,
    drive: Option<Box<dyn TapeDrive>>,
    label: Option<String>,
    /// The loaded cartridge's generation.
    generation: u32,
    pieces: Vec<Piece>,
    record_size: u64,
    /// Piece being read and the index (in it) of the next record the
    /// drive returns.
    piece: usize,
    next_record: u64,
    buf: Vec<u8>,
    buf_pos: usize,
}

impl ArchiveStream {
    fn drive(&mut self) -> std::io::Result<&mut Box<dyn TapeDrive>> {
        self.drive
            .as_mut()
            .ok_or_else(|| std::io::Error::other("no tape drive open"))
    }

    /// Have cartridge `label` in the drive, opened for reading.
    fn load(&mut self, label: &str) -> Result<()> {
        if self.label.as_deref() == Some(label) && self.drive.is_some() {
            return Ok(());
        }
        self.drive = None;
        if self.label.is_some() || self.cfg.changer.is_some() {
            change(
                &self.cfg,
                &format!("load {label}"),
                &format!("the set continues on cartridge {label}"),
            )?;
        }
        let mut d = open_drive(&self.cfg.device, false)?;
        match read_label(d.as_mut())? {
            Some(Ok(l)) if l.label == label => self.generation = l.generation,
            other => {
                return Err(Error::new(
                    ErrorKind::Media,
                    format!(
                        "wanted cartridge {label} in {}, found {}",
                        self.cfg.device,
                        match other {
                            Some(Ok(l)) => l.label,
                            Some(Err(_)) => "a cartridge Floe did not label".into(),
                            None => "a blank cartridge".into(),
                        }
                    ),
                ))
            }
        }
        self.label = Some(label.to_string());
        self.drive = Some(d);
        Ok(())
    }

    /// Position so that the next byte read is archive byte `at`.
    fn seek(&mut self, at: u64) -> Result<()> {
        let p = self
            .pieces
            .iter()
            .rposition(|p| p.offset <= at && at < p.offset + p.length)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Media,
                    format!("archive offset {at} is in no piece"),
                )
            })?;
        let piece = self.pieces[p].clone();
        let rec = (at - piece.offset) / self.record_size;
        let within = usize::try_from((at - piece.offset) % self.record_size).unwrap_or(0);
        let here = self.drive.is_some()
            && self.label.as_deref() == Some(piece.label.as_str())
            && self.piece == p;
        if here && rec + 1 == self.next_record && !self.buf.is_empty() {
            self.buf_pos = within;
            return Ok(());
        }
        if here && rec >= self.next_record {
            let skip = rec - self.next_record;
            if skip > 0 {
                self.drive.as_mut().map_or(Ok(()), |d| {
                    d.op(MtOp::Fsr(u32::try_from(skip).unwrap_or(u32::MAX)))
                })?;
            }
        } else {
            self.load(&piece.label)?;
            let d = self
                .drive
                .as_mut()
                .ok_or_else(|| Error::new(ErrorKind::Media, "no drive"))?;
            d.op(MtOp::Rewind)?;
            d.op(MtOp::SetBlk(0))?;
            d.op(MtOp::Fsf(u32::try_from(piece.file).unwrap_or(u32::MAX)))?;
            if rec > 0 {
                d.op(MtOp::Fsr(u32::try_from(rec).unwrap_or(u32::MAX)))?;
            }
        }
        self.piece = p;
        self.next_record = rec;
        self.fill()
            .map_err(|e| Error::new(ErrorKind::Media, "read tape").source(e))?;
        if self.buf.is_empty() {
            return Err(Error::new(
                ErrorKind::Media,
                format!("archive offset {at}: no record there"),
            ));
        }
        self.buf_pos = within;
        Ok(())
    }

    /// Read the next record of the archive (moving to the next piece at a
    /// filemark); empty at the archive's end.
    fn fill(&mut self) -> std::io::Result<()> {
        let mut b = vec![0u8; usize::try_from(MAX_RECORD).unwrap_or(1 << 22)];
        loop {
            let n = self.drive()?.read(&mut b).map_err(std::io::Error::other)?;
            if n > 0 {
                b.truncate(n);
                self.buf = b;
                self.buf_pos = 0;
                self.next_record += 1;
                return Ok(());
            }
            // A filemark: the piece ends; the archive goes on in the next.
            if self.piece + 1 >= self.pieces.len() {
                self.buf.clear();
                self.buf_pos = 0;
                return Ok(());
            }
            self.piece += 1;
            let p = self.pieces[self.piece].clone();
            self.load(&p.label).map_err(std::io::Error::other)?;
            let d = self.drive()?;
            d.op(MtOp::Rewind).map_err(std::io::Error::other)?;
            d.op(MtOp::SetBlk(0)).map_err(std::io::Error::other)?;
            d.op(MtOp::Fsf(u32::try_from(p.file).unwrap_or(u32::MAX)))
                .map_err(std::io::Error::other)?;
            self.next_record = 0;
        }
    }
}

impl Read for ArchiveStream {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.buf_pos >= self.buf.len() {
            self.fill()?;
            if self.buf.is_empty() {
                return Ok(0);
            }
        }
        let n = out.len().min(self.buf.len() - self.buf_pos);
        out[..n].copy_from_slice(&self.buf[self.buf_pos..self.buf_pos + n]);
        self.buf_pos += n;
        Ok(n)
    }
}

/// Reads sets from tape.
pub struct TapeReader {
    cfg: Config,
    /// The drive, label and position, between items.
    stream: Option<ArchiveStream>,
    open: Option<EntryReader<ArchiveStream>>,
    sets: HashMap<SetId, (TapeIndex, floe_core::media::SetIndex)>,
}

impl TapeReader {
    fn take_stream(&mut self) -> ArchiveStream {
        if let Some(e) = self.open.take() {
            return e.into_inner();
        }
        self.stream.take().unwrap_or_else(|| ArchiveStream {
            cfg: self.cfg.clone(),
            drive: None,
            label: None,
            generation: 0,
            pieces: Vec::new(),
            record_size: self.cfg.record,
            piece: 0,
            next_record: 0,
            buf: Vec::new(),
            buf_pos: 0,
        })
    }

    /// Read every set index on the cartridge in the drive (or `label`).
    fn scan(&mut self, label: Option<&str>) -> Result<Vec<TapeIndex>> {
        let mut s = self.take_stream();
        let r = (|| {
            if let Some(l) = label {
                s.load(l)?;
            } else if s.drive.is_none() {
                let mut d = open_drive(&self.cfg.device, false)?;
                match read_label(d.as_mut())? {
                    Some(Ok(l)) => {
                        s.label = Some(l.label);
                        s.generation = l.generation;
                    }
                    _ => {
                        return Err(Error::new(
                            ErrorKind::Media,
                            format!("the cartridge in {} has no Floe label", self.cfg.device),
                        ))
                    }
                }
                s.drive = Some(d);
            }
            let d = s
                .drive
                .as_mut()
                .ok_or_else(|| Error::new(ErrorKind::Media, "no drive"))?;
            s.buf.clear();
            s.next_record = u64::MAX; // position unknown after a scan
            d.op(MtOp::Rewind)?;
            d.op(MtOp::SetBlk(0))?;
            d.op(MtOp::Fsf(1))?;
            let mut found = Vec::new();
            let mut b = vec![0u8; usize::try_from(MAX_RECORD).unwrap_or(1 << 22)];
            loop {
                let n = match d.read(&mut b) {
                    Ok(n) => n,
                    Err(e) if errno_of(&e) == Some(errno::EIO) => break,
                    Err(e) => return Err(e),
                };
                if n == 0 {
                    if d.status()?.eod {
                        break;
                    }
                    continue; // an empty file
                }
                if b[..n].starts_with(format!("{{\"magic\":\"{INDEX_MAGIC}\"").as_bytes()) {
                    let mut bytes = b[..n].to_vec();
                    loop {
                        let m = d.read(&mut b)?;
                        if m == 0 {
                            break;
                        }
                        bytes.extend_from_slice(&b[..m]);
                    }
                    // A torn index (the medium ended inside it) was written
                    // again on the next cartridge: skip it here.
                    if let Ok(i) = decode_index(&bytes) {
                        found.push(i);
                    }
                } else {
                    match d.op(MtOp::Fsf(1)) {
                        Ok(()) => {}
                        Err(e) if errno_of(&e) == Some(errno::EIO) => break, // unfinished file at the end
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok(found)
        })();
        self.stream = Some(s);
        let found = r?;
        for i in &found {
            let index = floe_core::media::SetIndex::new(i.record.clone());
            self.sets
                .insert(i.record.header.set.clone(), (i.clone(), index));
        }
        Ok(found)
    }
}

/// What a library holds: each cartridge scanned (label, generation) and
/// each set found whole (its index, and the cartridge its index file is
/// on). Sets with a piece on a cartridge recycled since are gone.
struct Survey {
    cartridges: Vec<(String, u32)>,
    sets: Vec<(TapeIndex, String)>,
}

impl Survey {
    /// The sets with any byte on cartridge `label`.
    fn holding(&self, label: &str) -> Vec<&SetId> {
        self.sets
            .iter()
            .filter(|(i, at)| at == label || i.pieces.iter().any(|p| p.label == label))
            .map(|(i, _)| &i.record.header.set)
            .collect()
    }
}

impl TapeReader {
    /// Scan every cartridge the reader knows of (`cartridges`, else the
    /// changer's list, else the loaded one).
    fn survey(&mut self) -> Result<Survey> {
        let labels: Vec<Option<String>> = if !self.cfg.cartridges.is_empty() {
            self.cfg.cartridges.iter().cloned().map(Some).collect()
        } else if self.cfg.changer.is_some() {
            // Every cartridge the library holds, the loaded one first.
            let mut l: Vec<Option<String>> = vec![None];
            l.extend(changer_list(&self.cfg)?.into_iter().map(Some));
            l
        } else {
            vec![None]
        };
        let listed = labels.len();
        let mut cartridges: Vec<(String, u32)> = Vec::new();
        let mut found: HashMap<SetId, (TapeIndex, String)> = HashMap::new();
        for l in labels {
            if l.as_ref()
                .is_some_and(|l| cartridges.iter().any(|(c, _)| c == l))
            {
                continue;
            }
            let r = self.scan(l.as_deref());
            let here = self
                .stream
                .as_ref()
                .and_then(|s| s.label.clone().map(|l| (l, s.generation)));
            match r {
                Ok(sets) => {
                    let (label, generation) = here.clone().unwrap_or_default();
                    if here.is_some() {
                        cartridges.push((label.clone(), generation));
                    }
                    for i in sets {
                        found.insert(i.record.header.set.clone(), (i, label.clone()));
                    }
                }
                // A blank or foreign cartridge in a library holds no sets.
                Err(e) if listed > 1 && e.to_string().contains("wanted cartridge") => {}
                Err(e) if listed > 1 && e.to_string().contains("has no Floe label") => {}
                Err(e) => return Err(e),
            }
        }
        // A piece on a cartridge whose generation moved on was written
        // over: its set is gone (only its index, elsewhere, remains).
        let gen_of: HashMap<&str, u32> = cartridges.iter().map(|(l, g)| (l.as_str(), *g)).collect();
        let mut sets: Vec<(TapeIndex, String)> = found
            .into_values()
            .filter(|(i, _)| {
                i.pieces.iter().all(|p| {
                    gen_of
                        .get(p.label.as_str())
                        .is_none_or(|g| *g == p.generation)
                })
            })
            .collect();
        sets.sort_by(|(a, _), (b, _)| {
            (a.record.committed_at, &a.record.header.set)
                .cmp(&(b.record.committed_at, &b.record.header.set))
        });
        for (i, _) in &sets {
            let index = floe_core::media::SetIndex::new(i.record.clone());
            self.sets
                .insert(i.record.header.set.clone(), (i.clone(), index));
        }
        Ok(Survey { cartridges, sets })
    }
}

impl MediaReader for TapeReader {
    fn list_sets(&mut self) -> Result<Vec<SetRecord>> {
        Ok(self
            .survey()?
            .sets
            .into_iter()
            .map(|(i, _)| i.record)
            .collect())
    }

    fn open_item(&mut self, set: &SetId, item: &ItemId) -> Result<ItemRecord> {
        if !self.sets.contains_key(set) {
            self.scan(None)?;
            for l in self.cfg.cartridges.clone() {
                if self.sets.contains_key(set) {
                    break;
                }
                self.scan(Some(&l))?;
            }
        }
        let (index, items) = self.sets.get(set).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!(
                    "no set {set} on the cartridge(s) read from {}",
                    self.cfg.device
                ),
            )
        })?;
        let rec = items.item(item)?;
        let (pieces, record_size) = (index.pieces.clone(), index.record_size);
        let mut s = self.take_stream();
        if s.pieces != pieces {
            s.pieces = pieces;
            s.next_record = u64::MAX;
            s.buf.clear();
        }
        s.record_size = record_size;
        let (size, sparse) = if rec.header.kind.has_bytes() {
            (rec.header.size.0, is_sparse(&rec.header))
        } else {
            (0, false)
        };
        if size > 0 {
            let at = locator_offset(&rec.position.locator).ok_or_else(|| {
                Error::new(
                    ErrorKind::Media,
                    format!("bad tape locator {:?}", rec.position.locator),
                )
            })?;
            if let Err(e) = s.seek(at) {
                self.stream = Some(s);
                return Err(e.item(item));
            }
        }
        match EntryReader::new(s, size, sparse) {
            Ok(e) => self.open = Some(e),
            Err(e) => return Err(e.item(item)),
        }
        Ok(rec)
    }

    fn read(&mut self, max: usize) -> Result<Vec<u8>> {
        self.open
            .as_mut()
            .ok_or_else(|| Error::new(ErrorKind::Media, "no item open"))?
            .read(max)
    }
}

/// The plugin.
pub struct TapePlugin;

impl Plugin for TapePlugin {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "tape".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            interfaces: vec![Interface::MediaWriter, Interface::MediaReader],
            sequential_media: true,
            path_order: false,
        }
    }
    fn media_writer(config: &serde_json::Value) -> Result<Box<dyn MediaWriter>> {
        Ok(Box::new(TapeWriter {
            cfg: config_of(config)?,
            drive: None,
            label: String::new(),
            generation: 0,
            set: None,
            labelled: 0,
        }))
    }
    fn media_reader(config: &serde_json::Value) -> Result<Box<dyn MediaReader>> {
        Ok(Box::new(TapeReader {
            cfg: config_of(config)?,
            stream: None,
            open: None,
            sets: HashMap::new(),
        }))
    }
}

floe_core::export_plugin!(TapePlugin);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_indexes_decode_and_refuse_strangers() {
        let l = Label {
            magic: LABEL_MAGIC.into(),
            version: VERSION,
            label: "FL0001".into(),
            created: 1,
            generation: 0,
        };
        let rec = pad_to(serde_json::to_vec(&l).unwrap(), 1024);
        assert_eq!(rec.len(), 1024);
        assert_eq!(decode_label(&rec), Some(l));
        assert_eq!(decode_label(b"ustar data"), None);
        assert!(decode_index(b"{}").is_err());
        assert_eq!(locator_offset("file=3,record=9,at=12345"), Some(12345));
        assert_eq!(locator_offset("at=7"), Some(7));
    }

    #[test]
    fn an_index_whose_pieces_do_not_follow_on_is_refused() {
        let i = TapeIndex {
            magic: INDEX_MAGIC.into(),
            version: VERSION,
            record_size: 512,
            pieces: vec![
                Piece {
                    label: "A".into(),
                    file: 1,
                    offset: 0,
                    length: 1024,
                    generation: 0,
                },
                Piece {
                    label: "B".into(),
                    file: 1,
                    offset: 2048,
                    length: 512,
                    generation: 0,
                },
            ],
            record: SetRecord {
                header: SetHeader {
                    set: SetId::new("s"),
                    label: String::new(),
                    agent: "h".into(),
                    sources: vec![],
                    image: ImageId::new("i"),
                    frozen_at: 1,
                    started_at: 1,
                },
                items: vec![],
                failures: vec![],
                committed_at: 1,
            },
        };
        let e = decode_index(&serde_json::to_vec(&i).unwrap()).unwrap_err();
        assert!(e.to_string().contains("does not follow on"), "{e}");
    }
}
