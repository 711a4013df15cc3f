//! The virtual tape library: drives and file-backed cartridges with the
//! Linux `st` driver's semantics (record boundaries, filemarks, end of
//! data, early warning then ENOSPC, write protection, load and unload from
//! slots), served over TCP with the protocol in `floe_core::tape` (spec:
//! `docs/formats/vtl-protocol.md`). Cartridge files: `docs/formats/vtl-cartridge.md`.
//!
//! These machines have no tape driver and no CUSE, so the library is not a
//! character device: the tape plugin reaches it as `vtl://HOST:PORT/DRIVE`
//! through the same `TapeDrive` trait it uses for `/dev/nstN`.

use floe_core::tape::{
    errno, read_frame, write_frame, MtOp, TapeStatus, VtlRequest, VtlResponse, VTL_MAGIC,
    VTL_MAX_FRAME, VTL_VERSION,
};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Cartridge file magic.
pub const CART_MAGIC: &[u8; 8] = b"FLOETAPE";
/// Cartridge format version.
pub const CART_VERSION: u32 = 1;
/// Bytes of the cartridge header.
pub const CART_HEADER: u64 = 4096;
/// The tag of a filemark in a cartridge's entry stream.
pub const FILEMARK: u32 = u32::MAX;
/// Cartridge file name suffix.
pub const CART_SUFFIX: &str = ".vtape";

/// A cartridge's fixed header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CartHeader {
    /// The barcode on its label.
    pub barcode: String,
    /// Bytes of records it holds.
    pub capacity: u64,
    /// Bytes of records after which writes meet the early warning.
    pub early_warning_at: u64,
    /// The write-protect tab.
    pub write_protected: bool,
}

impl CartHeader {
    fn encode(&self) -> Vec<u8> {
        let mut h = vec![0u8; usize::try_from(CART_HEADER).unwrap_or(4096)];
        h[..8].copy_from_slice(CART_MAGIC);
        h[8..12].copy_from_slice(&CART_VERSION.to_le_bytes());
        h[12] = u8::from(self.write_protected);
        h[16..24].copy_from_slice(&self.capacity.to_le_bytes());
        h[24..32].copy_from_slice(&self.early_warning_at.to_le_bytes());
        let b = self.barcode.as_bytes();
        let n = b.len().min(64);
        h[32..32 + n].copy_from_slice(&b[..n]);
        h
    }

    /// Decode and check a header block.
    pub fn decode(h: &[u8]) -> Result<CartHeader, String> {
        if h.len() < 96 || &h[..8] != CART_MAGIC {
            return Err("not a Floe virtual tape cartridge (bad magic)".into());
        }
        let v = u32::from_le_bytes(h[8..12].try_into().map_err(|_| "short header")?);
        if v != CART_VERSION {
            return Err(format!(
                "cartridge format version {v}, this library reads {CART_VERSION}"
            ));
        }
        let u = |r: std::ops::Range<usize>| u64::from_le_bytes(h[r].try_into().unwrap_or([0; 8]));
        let barcode_bytes: Vec<u8> = h[32..96].iter().copied().take_while(|&b| b != 0).collect();
        let barcode = String::from_utf8(barcode_bytes).map_err(|_| "barcode is not UTF-8")?;
        let capacity = u(16..24);
        let early_warning_at = u(24..32);
        if early_warning_at > capacity {
            return Err(format!(
                "early warning at {early_warning_at} past capacity {capacity}"
            ));
        }
        Ok(CartHeader {
            barcode,
            capacity,
            early_warning_at,
            write_protected: h[12] != 0,
        })
    }
}

/// One entry of a cartridge: a record of `len` bytes or a filemark, at
/// `offset` in the cartridge file (of its tag).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Offset of the tag.
    pub offset: u64,
    /// Record length; `None` for a filemark.
    pub len: Option<u32>,
}

/// Scan a cartridge's entries after the header; a torn last entry (a
/// crash mid-write) ends the recorded data before it.
pub fn scan_entries(r: &mut (impl Read + Seek), file_len: u64) -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    let mut at = CART_HEADER;
    while at + 4 <= file_len {
        r.seek(SeekFrom::Start(at)).map_err(|e| e.to_string())?;
        let mut t = [0u8; 4];
        r.read_exact(&mut t).map_err(|e| e.to_string())?;
        let tag = u32::from_le_bytes(t);
        if tag == FILEMARK {
            out.push(Entry {
                offset: at,
                len: None,
            });
            at += 4;
            continue;
        }
        if tag == 0 || tag > VTL_MAX_FRAME {
            return Err(format!("cartridge entry at {at} has length {tag}"));
        }
        let end = at + 4 + u64::from(tag);
        if end > file_len {
            break; // torn
        }
        out.push(Entry {
            offset: at,
            len: Some(tag),
        });
        at = end;
    }
    Ok(out)
}

/// Counters of one drive, for tests and the inventory.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DriveStats {
    /// Record bytes read.
    pub bytes_read: u64,
    /// Records read.
    pub records_read: u64,
    /// Record bytes written.
    pub bytes_written: u64,
    /// Positioning operations (rewind, fsf, bsf, fsr, bsr, eom).
    pub positionings: u64,
    /// Loads into this drive.
    pub loads: u64,
}

struct Loaded {
    header: CartHeader,
    file: File,
    entries: Vec<Entry>,
    pos: usize,
    /// The early warning was reported once since the last positioning.
    ew_reported: bool,
    eof: bool,
    eod_reads: u32,
    last_was_write: bool,
}

impl Loaded {
    fn used_before(&self, pos: usize) -> u64 {
        self.entries[..pos]
            .iter()
            .filter_map(|e| e.len.map(u64::from))
            .sum()
    }
    fn end_offset(&self, pos: usize) -> u64 {
        match self.entries.get(pos) {
            Some(e) => e.offset,
            None => self
                .entries
                .last()
                .map_or(CART_HEADER, |e| e.offset + 4 + e.len.map_or(0, u64::from)),
        }
    }
    fn status(&self, block_size: u32) -> TapeStatus {
        let marks = self.entries[..self.pos]
            .iter()
            .filter(|e| e.len.is_none())
            .count();
        let since = self.entries[..self.pos]
            .iter()
            .rev()
            .take_while(|e| e.len.is_some())
            .count();
        TapeStatus {
            file_number: i64::try_from(marks).unwrap_or(-1),
            block_number: i64::try_from(since).unwrap_or(-1),
            block_size,
            bot: self.pos == 0,
            eof: self.eof,
            eod: self.pos == self.entries.len(),
            eot: self.used_before(self.pos) >= self.header.early_warning_at,
            write_protected: self.header.write_protected,
            online: true,
        }
    }
    /// Cut everything from `pos` on: writing destroys what follows.
    fn truncate(&mut self) -> std::io::Result<()> {
        let end = self.end_offset(self.pos);
        self.entries.truncate(self.pos);
        self.file.set_len(end)
    }
    fn append(&mut self, tag: u32, data: &[u8]) -> std::io::Result<()> {
        let at = self.end_offset(self.pos);
        self.file.seek(SeekFrom::Start(at))?;
        let mut buf = tag.to_le_bytes().to_vec();
        buf.extend_from_slice(data);
        self.file.write_all(&buf)?;
        self.entries.push(Entry {
            offset: at,
            len: (tag != FILEMARK).then_some(tag),
        });
        self.pos = self.entries.len();
        Ok(())
    }
    fn read_record(&mut self, i: usize) -> std::io::Result<Vec<u8>> {
        let e = self.entries[i];
        let mut buf = vec![0u8; e.len.map_or(0, |l| usize::try_from(l).unwrap_or(0))];
        self.file.seek(SeekFrom::Start(e.offset + 4))?;
        self.file.read_exact(&mut buf)?;
        Ok(buf)
    }
}

#[derive(Default)]
struct Drive {
    loaded: Option<Loaded>,
    open: bool,
    block_size: u32,
    stats: DriveStats,
}

struct State {
    dir: PathBuf,
    drives: Vec<Drive>,
}

/// The library.
#[derive(Clone)]
pub struct Library {
    state: Arc<Mutex<State>>,
}

/// Options of a library.
#[derive(Clone, Debug)]
pub struct LibraryOptions {
    /// Drives.
    pub drives: u32,
    /// Cartridges to create if the directory holds none.
    pub cartridges: u32,
    /// Capacity of each created cartridge.
    pub capacity: u64,
    /// Bytes before the end of a created cartridge where the early warning
    /// begins.
    pub early_warning: u64,
    /// Barcode prefix of created cartridges (`FL` → `FL0001`).
    pub prefix: String,
}

/// A VTL-level error: an errno and a message.
type VtlResult<T> = Result<T, (i32, String)>;

fn ioerr(e: std::io::Error) -> (i32, String) {
    (errno::EIO, e.to_string())
}

/// Create a cartridge file.
pub fn create_cartridge(
    dir: &Path,
    barcode: &str,
    capacity: u64,
    early_warning: u64,
) -> std::io::Result<PathBuf> {
    let path = dir.join(format!("{barcode}{CART_SUFFIX}"));
    let h = CartHeader {
        barcode: barcode.into(),
        capacity,
        early_warning_at: capacity.saturating_sub(early_warning),
        write_protected: false,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    f.write_all(&h.encode())?;
    f.sync_all()?;
    Ok(path)
}

impl Library {
    /// Open (and populate, if empty) a library in `dir`.
    pub fn open(dir: &Path, o: &LibraryOptions) -> std::io::Result<Library> {
        std::fs::create_dir_all(dir)?;
        let lib = Library {
            state: Arc::new(Mutex::new(State {
                dir: dir.to_path_buf(),
                drives: (0..o.drives).map(|_| Drive::default()).collect(),
            })),
        };
        if barcodes_in(dir)?.is_empty() {
            for i in 1..=o.cartridges {
                create_cartridge(
                    dir,
                    &format!("{}{i:04}", o.prefix),
                    o.capacity,
                    o.early_warning,
                )?;
            }
        }
        Ok(lib)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serve clients on `listener` until the process ends.
    pub fn serve(self, listener: TcpListener) {
        for conn in listener.incoming().flatten() {
            let lib = self.clone();
            std::thread::spawn(move || lib.connection(conn));
        }
    }

    fn connection(&self, mut s: TcpStream) {
        let _ = s.set_nodelay(true);
        let mut hello = [0u8; 12];
        if s.read_exact(&mut hello).is_err()
            || &hello[..8] != VTL_MAGIC
            || hello[8..] != VTL_VERSION.to_be_bytes()
        {
            return;
        }
        let mut back = VTL_MAGIC.to_vec();
        back.extend_from_slice(&VTL_VERSION.to_be_bytes());
        if s.write_all(&back).is_err() {
            return;
        }
        let mut open: Option<usize> = None;
        while let Ok((json, payload)) = read_frame(&mut s) {
            let (resp, data) = match serde_json::from_slice::<VtlRequest>(&json) {
                Err(e) => (
                    fail(errno::EINVAL, format!("malformed request: {e}")),
                    Vec::new(),
                ),
                Ok(req) => match self.handle(&mut open, req, &payload) {
                    Ok((r, d)) => (r, d),
                    Err((n, m)) => (fail(n, m), Vec::new()),
                },
            };
            let j = serde_json::to_vec(&resp).unwrap_or_default();
            if write_frame(&mut s, &j, &data).is_err() {
                break;
            }
        }
        if let Some(d) = open {
            self.close(d);
        }
    }

    /// `close(2)`: a filemark after a write, and the drive is free.
    fn close(&self, d: usize) {
        let mut st = self.lock();
        let drive = &mut st.drives[d];
        drive.open = false;
        if let Some(l) = drive.loaded.as_mut() {
            if l.last_was_write {
                let _ = l.truncate().and_then(|()| l.append(FILEMARK, &[]));
                let _ = l.file.sync_all();
                l.last_was_write = false;
            }
        }
    }

    fn handle(
        &self,
        open: &mut Option<usize>,
        req: VtlRequest,
        payload: &[u8],
    ) -> VtlResult<(VtlResponse, Vec<u8>)> {
        if req == VtlRequest::Close {
            if let Some(d) = open.take() {
                self.close(d);
            }
            return Ok((ok(0, serde_json::Value::Null), Vec::new()));
        }
        let mut st = self.lock();
        let ndrives = st.drives.len();
        let drive_no = |d: u32| -> VtlResult<usize> {
            usize::try_from(d).ok().filter(|&d| d < ndrives).ok_or((
                errno::ENODEV,
                format!("no drive {d} in this library ({ndrives} drives)"),
            ))
        };
        match req {
            VtlRequest::Open { drive, write } => {
                let d = drive_no(drive)?;
                if open.is_some() {
                    return Err((errno::EBUSY, "this connection has a drive open".into()));
                }
                let dr = &mut st.drives[d];
                if dr.open {
                    return Err((errno::EBUSY, format!("drive {d} is open elsewhere")));
                }
                let l = dr
                    .loaded
                    .as_ref()
                    .ok_or((errno::ENOMEDIUM, format!("drive {d} is empty")))?;
                if write && l.header.write_protected {
                    return Err((
                        errno::EROFS,
                        format!("cartridge {} is write-protected", l.header.barcode),
                    ));
                }
                dr.open = true;
                *open = Some(d);
                Ok((ok(0, serde_json::Value::Null), Vec::new()))
            }
            VtlRequest::Read { max } => {
                let d = open.ok_or((errno::EINVAL, "no drive open".into()))?;
                let dr = &mut st.drives[d];
                let bs = dr.block_size;
                let l = dr
                    .loaded
                    .as_mut()
                    .ok_or((errno::ENOMEDIUM, "no cartridge".into()))?;
                l.last_was_write = false;
                if bs > 0 && max % bs != 0 {
                    return Err((
                        errno::EINVAL,
                        format!("read of {max} bytes in {bs}-byte fixed-block mode"),
                    ));
                }
                let mut out = Vec::new();
                loop {
                    match l.entries.get(l.pos).copied() {
                        None => {
                            if out.is_empty() {
                                l.eod_reads += 1;
                                if l.eod_reads > 1 {
                                    return Err((errno::EIO, "read past end of data".into()));
                                }
                            }
                            break;
                        }
                        Some(Entry { len: None, .. }) => {
                            if out.is_empty() {
                                l.pos += 1;
                                l.eof = true;
                            }
                            break;
                        }
                        Some(Entry { len: Some(n), .. }) => {
                            let rec = l.read_record(l.pos).map_err(ioerr)?;
                            if bs == 0 {
                                l.pos += 1;
                                dr.stats.records_read += 1;
                                dr.stats.bytes_read += u64::from(n);
                                if n > max {
                                    return Err((
                                        12,
                                        format!("record of {n} bytes, read buffer of {max}"),
                                    ));
                                }
                                out = rec;
                                break;
                            }
                            if n != bs {
                                return Err((
                                    errno::EIO,
                                    format!("record of {n} bytes in {bs}-byte fixed-block mode"),
                                ));
                            }
                            if out.len() + rec.len() > usize::try_from(max).unwrap_or(0) {
                                break;
                            }
                            l.pos += 1;
                            dr.stats.records_read += 1;
                            dr.stats.bytes_read += u64::from(n);
                            out.extend_from_slice(&rec);
                        }
                    }
                }
                if !out.is_empty() {
                    l.eof = false;
                }
                Ok((ok(out.len() as u64, serde_json::Value::Null), out))
            }
            VtlRequest::Write => {
                let d = open.ok_or((errno::EINVAL, "no drive open".into()))?;
                let dr = &mut st.drives[d];
                let bs = dr.block_size;
                let l = dr
                    .loaded
                    .as_mut()
                    .ok_or((errno::ENOMEDIUM, "no cartridge".into()))?;
                if l.header.write_protected {
                    return Err((errno::EROFS, "write-protected".into()));
                }
                if payload.is_empty()
                    || (bs > 0
                        && !payload
                            .len()
                            .is_multiple_of(usize::try_from(bs).unwrap_or(1)))
                {
                    return Err((
                        errno::EINVAL,
                        format!("write of {} bytes in block mode {bs}", payload.len()),
                    ));
                }
                let used = l.used_before(l.pos);
                if used >= l.header.early_warning_at && !l.ew_reported {
                    l.ew_reported = true;
                    return Err((
                        errno::ENOSPC,
                        format!("early warning on {} at {used} bytes", l.header.barcode),
                    ));
                }
                if used + payload.len() as u64 > l.header.capacity {
                    return Err((
                        errno::ENOSPC,
                        format!(
                            "physical end of medium on {}: {} bytes do not fit after {used}",
                            l.header.barcode,
                            payload.len()
                        ),
                    ));
                }
                l.truncate().map_err(ioerr)?;
                let recs: Vec<&[u8]> = if bs == 0 {
                    vec![payload]
                } else {
                    payload.chunks(usize::try_from(bs).unwrap_or(1)).collect()
                };
                for r in recs {
                    let n = u32::try_from(r.len())
                        .map_err(|_| (errno::EINVAL, "record too long".to_string()))?;
                    l.append(n, r).map_err(ioerr)?;
                }
                l.last_was_write = true;
                l.eof = false;
                l.eod_reads = 0;
                dr.stats.bytes_written += payload.len() as u64;
                Ok((
                    ok(payload.len() as u64, serde_json::Value::Null),
                    Vec::new(),
                ))
            }
            VtlRequest::Op { code, count } => {
                let d = open.ok_or((errno::EINVAL, "no drive open".into()))?;
                let op = MtOp::from_code(code, count)
                    .ok_or((errno::EINVAL, format!("unsupported mt_op {code}")))?;
                let dr = &mut st.drives[d];
                if let MtOp::SetBlk(n) = op {
                    dr.block_size = n;
                    return Ok((ok(0, serde_json::Value::Null), Vec::new()));
                }
                let l = dr
                    .loaded
                    .as_mut()
                    .ok_or((errno::ENOMEDIUM, "no cartridge".into()))?;
                if !matches!(op, MtOp::Weof(_)) {
                    // st writes a filemark before moving away from a write.
                    if l.last_was_write {
                        l.truncate()
                            .and_then(|()| l.append(FILEMARK, &[]))
                            .map_err(ioerr)?;
                        l.file.sync_all().map_err(ioerr)?;
                    }
                    dr.stats.positionings += 1;
                    l.ew_reported = false;
                    l.eod_reads = 0;
                }
                l.last_was_write = false;
                l.eof = false;
                let marks_fwd = |l: &mut Loaded, n: u32| -> VtlResult<()> {
                    for _ in 0..n {
                        loop {
                            match l.entries.get(l.pos) {
                                None => {
                                    return Err((
                                        errno::EIO,
                                        "end of data while spacing forward".into(),
                                    ))
                                }
                                Some(e) => {
                                    l.pos += 1;
                                    if e.len.is_none() {
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    l.eof = n > 0;
                    Ok(())
                };
                match op {
                    MtOp::Rewind => l.pos = 0,
                    MtOp::Eom => l.pos = l.entries.len(),
                    MtOp::Fsf(n) => marks_fwd(l, n)?,
                    MtOp::Bsf(n) => {
                        for _ in 0..n {
                            loop {
                                if l.pos == 0 {
                                    return Err((
                                        errno::EIO,
                                        "beginning of tape while spacing back".into(),
                                    ));
                                }
                                l.pos -= 1;
                                if l.entries[l.pos].len.is_none() {
                                    break;
                                }
                            }
                        }
                    }
                    MtOp::Fsr(n) => {
                        for _ in 0..n {
                            match l.entries.get(l.pos) {
                                Some(Entry { len: Some(_), .. }) => l.pos += 1,
                                Some(_) => {
                                    l.pos += 1;
                                    l.eof = true;
                                    return Err((
                                        errno::EIO,
                                        "filemark while spacing records".into(),
                                    ));
                                }
                                None => {
                                    return Err((
                                        errno::EIO,
                                        "end of data while spacing records".into(),
                                    ))
                                }
                            }
                        }
                    }
                    MtOp::Bsr(n) => {
                        for _ in 0..n {
                            if l.pos == 0 || l.entries[l.pos - 1].len.is_none() {
                                return Err((
                                    errno::EIO,
                                    "filemark or beginning while spacing back".into(),
                                ));
                            }
                            l.pos -= 1;
                        }
                    }
                    MtOp::Weof(n) => {
                        if l.header.write_protected {
                            return Err((errno::EROFS, "write-protected".into()));
                        }
                        l.truncate().map_err(ioerr)?;
                        for _ in 0..n {
                            l.append(FILEMARK, &[]).map_err(ioerr)?;
                        }
                        l.file.sync_all().map_err(ioerr)?;
                    }
                    MtOp::Offline => {
                        dr.loaded = None;
                    }
                    MtOp::SetBlk(_) => {}
                }
                Ok((ok(0, serde_json::Value::Null), Vec::new()))
            }
            VtlRequest::Status => {
                let d = open.ok_or((errno::EINVAL, "no drive open".into()))?;
                let dr = &st.drives[d];
                let s = match &dr.loaded {
                    Some(l) => l.status(dr.block_size),
                    None => TapeStatus {
                        file_number: -1,
                        block_number: -1,
                        block_size: dr.block_size,
                        ..Default::default()
                    },
                };
                Ok((
                    ok(0, serde_json::to_value(s).unwrap_or_default()),
                    Vec::new(),
                ))
            }
            VtlRequest::Next { drive } => {
                let d = drive_no(drive)?;
                let codes = barcodes_in(&st.dir).map_err(ioerr)?;
                let current = st.drives[d]
                    .loaded
                    .as_ref()
                    .map(|l| l.header.barcode.clone());
                let in_drives: Vec<String> = st
                    .drives
                    .iter()
                    .filter_map(|x| x.loaded.as_ref().map(|l| l.header.barcode.clone()))
                    .collect();
                let next = codes
                    .into_iter()
                    .filter(|b| current.as_ref().is_none_or(|c| b > c))
                    .find(|b| !in_drives.contains(b))
                    .ok_or((
                        errno::ENOMEDIUM,
                        "no further cartridge in the library's slots".to_string(),
                    ))?;
                load(&mut st, d, &next)?;
                Ok((ok(0, serde_json::Value::String(next)), Vec::new()))
            }
            VtlRequest::Load { drive, barcode } => {
                let d = drive_no(drive)?;
                if st.drives[d]
                    .loaded
                    .as_ref()
                    .is_some_and(|l| l.header.barcode == barcode)
                {
                    return Ok((ok(0, serde_json::Value::String(barcode)), Vec::new()));
                }
                if st.drives.iter().any(|x| {
                    x.loaded
                        .as_ref()
                        .is_some_and(|l| l.header.barcode == barcode)
                }) {
                    return Err((
                        errno::EBUSY,
                        format!("cartridge {barcode} is in another drive"),
                    ));
                }
                load(&mut st, d, &barcode)?;
                Ok((ok(0, serde_json::Value::String(barcode)), Vec::new()))
            }
            VtlRequest::Unload { drive } => {
                let d = drive_no(drive)?;
                if st.drives[d].open {
                    return Err((errno::EBUSY, format!("drive {d} is open")));
                }
                st.drives[d].loaded = None;
                Ok((ok(0, serde_json::Value::Null), Vec::new()))
            }
            VtlRequest::Protect { barcode, on } => {
                let path = st.dir.join(format!("{barcode}{CART_SUFFIX}"));
                let mut f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|e| (errno::ENOMEDIUM, format!("no cartridge {barcode}: {e}")))?;
                f.seek(SeekFrom::Start(12))
                    .and_then(|_| f.write_all(&[u8::from(on)]))
                    .and_then(|()| f.sync_all())
                    .map_err(ioerr)?;
                for dr in &mut st.drives {
                    if let Some(l) = dr.loaded.as_mut().filter(|l| l.header.barcode == barcode) {
                        l.header.write_protected = on;
                    }
                }
                Ok((ok(0, serde_json::Value::Null), Vec::new()))
            }
            VtlRequest::Close => Ok((ok(0, serde_json::Value::Null), Vec::new())),
            VtlRequest::Inventory => {
                let codes = barcodes_in(&st.dir).map_err(ioerr)?;
                let drives: Vec<serde_json::Value> = st
                    .drives
                    .iter()
                    .map(|x| {
                        serde_json::json!({
                            "loaded": x.loaded.as_ref().map(|l| l.header.barcode.clone()),
                            "open": x.open,
                            "stats": x.stats,
                        })
                    })
                    .collect();
                Ok((
                    ok(0, serde_json::json!({"slots": codes, "drives": drives})),
                    Vec::new(),
                ))
            }
        }
    }
}

fn barcodes_in(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut out: Vec<String> = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(CART_SUFFIX))
                .map(str::to_string)
        })
        .collect();
    out.sort();
    Ok(out)
}

fn load(st: &mut State, d: usize, barcode: &str) -> VtlResult<()> {
    if st.drives[d].open {
        return Err((
            errno::EBUSY,
            format!("drive {d} is open: close it before changing cartridges"),
        ));
    }
    let path = st.dir.join(format!("{barcode}{CART_SUFFIX}"));
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| (errno::ENOMEDIUM, format!("no cartridge {barcode}: {e}")))?;
    let len = file.metadata().map_err(ioerr)?.len();
    let mut h = vec![0u8; usize::try_from(CART_HEADER).unwrap_or(4096)];
    file.read_exact(&mut h)
        .map_err(|e| (errno::EIO, format!("cartridge {barcode}: {e}")))?;
    let header =
        CartHeader::decode(&h).map_err(|m| (errno::EIO, format!("cartridge {barcode}: {m}")))?;
    let entries = scan_entries(&mut file, len)
        .map_err(|m| (errno::EIO, format!("cartridge {barcode}: {m}")))?;
    let dr = &mut st.drives[d];
    dr.loaded = Some(Loaded {
        header,
        file,
        entries,
        pos: 0,
        ew_reported: false,
        eof: false,
        eod_reads: 0,
        last_was_write: false,
    });
    dr.stats.loads += 1;
    Ok(())
}

fn ok(count: u64, value: serde_json::Value) -> VtlResponse {
    VtlResponse {
        errno: 0,
        count,
        value,
    }
}

fn fail(n: i32, m: String) -> VtlResponse {
    VtlResponse {
        errno: n,
        count: 0,
        value: serde_json::Value::String(m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_round_trips() {
        let h = CartHeader {
            barcode: "FL0001".into(),
            capacity: 1 << 30,
            early_warning_at: (1 << 30) - (1 << 20),
            write_protected: true,
        };
        assert_eq!(CartHeader::decode(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad[0] = b'X';
        assert!(CartHeader::decode(&bad).unwrap_err().contains("magic"));
    }

    proptest! {
        #[test]
        fn the_entry_scanner_never_panics_and_stays_in_the_file(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut data = vec![0u8; 4096];
            data.extend_from_slice(&bytes);
            let len = data.len() as u64;
            if let Ok(es) = scan_entries(&mut std::io::Cursor::new(data), len) {
                for e in es {
                    prop_assert!(e.offset + 4 + e.len.map_or(0, u64::from) <= len);
                }
            }
        }
    }
}
