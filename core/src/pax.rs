//! POSIX pax (tar) entries for Floe items, shared by the media plugins that
//! write the open format (`tar` on disk, `tape`). Spec:
//! `docs/formats/tar-media.md`. Pure: no I/O beyond the `Read` a reader is
//! handed.
//!
//! An item becomes one entry GNU tar extracts as what it was: regular
//! files (sparse ones in GNU sparse format 1.0: the map at the start of the
//! data, then only the stored segments), directories, symlinks, hard
//! links, FIFOs and device nodes, with mode, owner, nanosecond times and
//! extended attributes (`SCHILY.xattr.*`). Floe's own metadata rides in
//! `comment` records (`FLOE.item=…`), which tar ignores without a word.

use crate::error::{Error, ErrorKind, Result};
use crate::fsmeta::unhex;
use crate::model::{FileMeta, ItemHeader, ItemKind, SetHeader, SetId, SetRecord, Timestamp};
use serde::{Deserialize, Serialize};
use std::io::Read;

/// Block size of tar.
pub const BLOCK: u64 = 512;
/// The index entry's magic.
pub const INDEX_MAGIC: &str = "floe-tar-index";
/// Index (and entry layout) version written: 2 has typed entries and GNU
/// sparse files; 1 (read too) stored every item as a plain file.
pub const INDEX_VERSION: u32 = 2;
/// Largest pax extended header a reader accepts.
pub const MAX_PAX_HEADER: u64 = 1 << 20;
/// Largest index a reader accepts.
pub const MAX_INDEX: u64 = 256 << 20;
/// Largest sparse map a reader accepts.
pub const MAX_SPARSE_MAP: u64 = 64 << 20;

/// The index entry's contents (the last entry of a set's archive).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// [`INDEX_MAGIC`].
    pub magic: String,
    /// [`INDEX_VERSION`] (or 1).
    pub version: u32,
    /// The set.
    pub record: SetRecord,
}

/// Zero bytes that pad `n` to a whole block.
pub fn padding(n: u64) -> u64 {
    (BLOCK - n % BLOCK) % BLOCK
}

fn octal(field: &mut [u8], v: u64) {
    // width-1 octal digits, then NUL; a value too wide for the field is
    // written as 0 (its pax keyword is authoritative). Digit by digit: a
    // `format!` here was two allocations per field, eight fields an item.
    let w = field.len() - 1;
    let mut rest = v;
    for d in field[..w].iter_mut().rev() {
        *d = b'0' + u8::try_from(rest & 7).unwrap_or(0);
        rest >>= 3;
    }
    if rest != 0 {
        field[..w].fill(b'0');
    }
    field[w] = 0;
}

/// `v` in decimal, at the end of `buf`: the digits.
fn decimal(buf: &mut [u8; 20], mut v: u64) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + u8::try_from(v % 10).unwrap_or(0);
        v /= 10;
        if v == 0 {
            return &buf[i..];
        }
    }
}

/// The fields of one ustar header block.
#[derive(Clone, Debug, Default)]
pub struct Ustar<'a> {
    /// Name (at most 100 bytes are kept; pax `path` carries the rest).
    pub name: &'a str,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Bytes in the entry's data area.
    pub size: u64,
    /// Modification time, whole seconds.
    pub mtime: u64,
    /// `0` file, `1` hard link, `2` symlink, `3`/`4` char/block device,
    /// `5` directory, `6` FIFO, `x` pax header.
    pub typeflag: u8,
    /// Link target (at most 100 bytes; pax `linkpath` carries it whole).
    pub linkname: &'a str,
    /// Device numbers of a node.
    pub dev: (u64, u64),
}

fn keep_tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

impl Ustar<'_> {
    /// The 512-byte header with its checksum.
    pub fn block(&self) -> [u8; 512] {
        let mut h = [0u8; 512];
        let n = keep_tail(self.name, 100).as_bytes();
        h[..n.len()].copy_from_slice(n);
        octal(&mut h[100..108], u64::from(self.mode & 0o7777));
        octal(&mut h[108..116], self.uid);
        octal(&mut h[116..124], self.gid);
        octal(&mut h[124..136], self.size);
        octal(&mut h[136..148], self.mtime);
        h[156] = self.typeflag;
        let l = keep_tail(self.linkname, 100).as_bytes();
        h[157..157 + l.len()].copy_from_slice(l);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        if matches!(self.typeflag, b'3' | b'4') {
            octal(&mut h[329..337], self.dev.0);
            octal(&mut h[337..345], self.dev.1);
        }
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        // Six octal digits, NUL, space (a sum is at most 512 × 255).
        octal(&mut h[148..155], sum);
        h[155] = b' ';
        h
    }
}

/// One pax record: `LEN key=value\n`, LEN counting itself. Values are
/// bytes (extended attribute values need not be text).
pub fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    push_record(&mut out, &[key.as_bytes()], &[value]);
    out
}

/// Append one pax record whose key and value are the concatenations of
/// these pieces (an entry's records go into one buffer, not a `Vec` each).
fn push_record(out: &mut Vec<u8>, key: &[&[u8]], value: &[&[u8]]) {
    let sum = |p: &[&[u8]]| p.iter().map(|b| b.len()).sum::<usize>();
    let body_len = 1 + sum(key) + 1 + sum(value) + 1;
    let mut len = body_len + 1;
    let mut digits = [0u8; 20];
    loop {
        let candidate = decimal(&mut digits, len as u64).len() + body_len;
        if candidate == len {
            break;
        }
        len = candidate;
    }
    out.reserve(len);
    out.extend_from_slice(decimal(&mut digits, len as u64));
    out.push(b' ');
    key.iter().for_each(|k| out.extend_from_slice(k));
    out.push(b'=');
    value.iter().for_each(|v| out.extend_from_slice(v));
    out.push(b'\n');
}

/// Parse pax records into key/value pairs; `None` when malformed.
pub fn parse_pax(data: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let sp = rest.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return None;
        }
        let rec = &rest[sp + 1..len - 1];
        let eq = rec.iter().position(|&b| b == b'=')?;
        let key = std::str::from_utf8(&rec[..eq]).ok()?.to_string();
        out.push((key, rec[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    Some(out)
}

/// Parse the numeric field of a ustar header.
pub fn parse_octal(f: &[u8]) -> Option<u64> {
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

/// Does this 512-byte block carry a valid ustar checksum?
pub fn checksum_ok(h: &[u8; 512]) -> bool {
    let Some(stored) = parse_octal(&h[148..156]) else {
        return false;
    };
    let mut hh = *h;
    hh[148..156].copy_from_slice(b"        ");
    hh.iter().map(|&b| u64::from(b)).sum::<u64>() == stored
}

/// A pax time: seconds, and nanoseconds when there are any (and the
/// time is not before 1970); in `buf`, without allocating.
fn time_value(t: Timestamp, buf: &mut [u8; 48]) -> &[u8] {
    let mut digits = [0u8; 20];
    let mut n = 0;
    let mut put = |b: &[u8]| {
        buf[n..n + b.len()].copy_from_slice(b);
        n += b.len();
    };
    if t.sec < 0 {
        put(b"-");
    }
    put(decimal(&mut digits, t.sec.unsigned_abs()));
    if t.sec >= 0 && t.nsec > 0 {
        let ns = decimal(&mut digits, u64::from(t.nsec));
        put(b".");
        put(&b"000000000"[..9usize.saturating_sub(ns.len())]);
        put(ns);
    }
    &buf[..n]
}

/// A pax extended header (`x`) holding `records`, named after `name`.
pub fn pax_header(name: &str, records: &[u8], mtime: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(
        &Ustar {
            name: &format!("PaxHeaders/{}", keep_tail(name, 80)),
            mode: 0o644,
            size: records.len() as u64,
            mtime,
            typeflag: b'x',
            ..Default::default()
        }
        .block(),
    );
    out.extend_from_slice(records);
    out.resize(out.len() + pad_usize(records.len() as u64), 0);
    out
}

fn pad_usize(n: u64) -> usize {
    usize::try_from(padding(n)).unwrap_or(0)
}

/// The archive name of an item of `set`: `<set>/<item path>`.
pub fn entry_name(set: &SetId, item: &str) -> String {
    format!("{set}/{}", item.trim_start_matches('/'))
}

/// The archive name a hard link's target has: its first path, under the
/// same root.
fn link_target_name(set: &SetId, f: &FileMeta, target: &str) -> String {
    let root = f.root.trim_end_matches('/');
    entry_name(set, &format!("{root}/{target}"))
}

/// An item as a pax entry: everything before its stored bytes, and which
/// of its bytes are stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ItemEntry {
    /// The pax header, the ustar header and (sparse entries) the sparse
    /// map, padded: write these first.
    pub head: Vec<u8>,
    /// Where within `head` the entry's data area starts: the item's
    /// locator points there (at the map, for a sparse entry).
    pub data_at: usize,
    /// The item's logical size.
    pub size: u64,
    /// The `[offset, length]` ranges of the item stored in the entry, in
    /// order (all of it, unless sparse).
    pub stored: Vec<[u64; 2]>,
    /// True for a GNU sparse 1.0 entry.
    pub sparse: bool,
}

impl ItemEntry {
    /// Bytes of item data the entry stores.
    pub fn stored_len(&self) -> u64 {
        self.stored.iter().map(|s| s[1]).sum()
    }
}

/// The stored segments of a file of `size` bytes with `holes`.
pub fn stored_segments(size: u64, holes: &[[u64; 2]]) -> Result<Vec<[u64; 2]>> {
    let mut out = Vec::new();
    let mut at = 0u64;
    for h in holes {
        let end = h[0].checked_add(h[1]).filter(|&e| e <= size);
        let Some(end) = end.filter(|_| h[0] >= at) else {
            return Err(Error::new(
                ErrorKind::InvalidMap,
                format!("hole {h:?} overlaps, is out of order or past the end ({size} bytes)"),
            ));
        };
        if h[0] > at {
            out.push([at, h[0] - at]);
        }
        at = end;
    }
    if at < size {
        out.push([at, size - at]);
    }
    Ok(out)
}

/// The GNU sparse 1.0 map of `stored`, padded to a block. A file ending in
/// a hole gets a last `size 0` segment at its end, as GNU tar writes it.
pub fn sparse_map(size: u64, stored: &[[u64; 2]]) -> Vec<u8> {
    let mut segs: Vec<[u64; 2]> = stored.to_vec();
    if segs.last().is_none_or(|s| s[0] + s[1] < size) {
        segs.push([size, 0]);
    }
    let mut s = format!("{}\n", segs.len());
    for [o, l] in &segs {
        s.push_str(&format!("{o}\n{l}\n"));
    }
    let mut out = s.into_bytes();
    out.resize(out.len() + pad_usize(out.len() as u64), 0);
    out
}

/// Parse a GNU sparse 1.0 map from the start of an entry's data: the
/// segments (with a final zero-length one dropped) and the map's length.
pub fn parse_sparse_map(r: &mut impl Read, realsize: u64) -> Result<(Vec<[u64; 2]>, u64)> {
    let bad = |m: String| Error::new(ErrorKind::Media, m);
    let mut buf = Vec::new();
    let mut numbers = Vec::new();
    let mut want: Option<u64> = None;
    let mut consumed = 0usize;
    loop {
        // Parse what is buffered.
        while let Some(nl) = buf[consumed..].iter().position(|&b| b == b'\n') {
            let text = std::str::from_utf8(&buf[consumed..consumed + nl])
                .ok()
                .and_then(|t| t.parse::<u64>().ok())
                .ok_or_else(|| bad("malformed GNU sparse map".into()))?;
            consumed += nl + 1;
            match want {
                None => {
                    if text > MAX_SPARSE_MAP / 4 {
                        return Err(bad(format!("sparse map of {text} segments")));
                    }
                    want = Some(text);
                }
                Some(_) => numbers.push(text),
            }
            if want.is_some_and(|w| numbers.len() as u64 == 2 * w) {
                // The map ends inside the last block read; its padding is
                // the rest of that block.
                let map_len = buf.len() as u64;
                let mut segs = Vec::new();
                let mut at = 0u64;
                for p in numbers.chunks(2) {
                    let (o, l) = (p[0], p[1]);
                    let end = o.checked_add(l).filter(|&e| e <= realsize && o >= at);
                    let Some(end) = end else {
                        return Err(bad(format!(
                            "sparse segment {o}+{l} out of order or past {realsize}"
                        )));
                    };
                    if l > 0 {
                        segs.push([o, l]);
                    }
                    at = end;
                }
                return Ok((segs, map_len));
            }
        }
        if buf.len() as u64 >= MAX_SPARSE_MAP {
            return Err(bad("sparse map too long".into()));
        }
        // Read one more block.
        let mut block = [0u8; 512];
        r.read_exact(&mut block)
            .map_err(|e| bad("archive ends inside a sparse map".into()).source(e))?;
        buf.extend_from_slice(&block);
    }
}

/// Build the entry of one item of `set`.
pub fn item_entry(set: &SetId, h: &ItemHeader, frozen_at: u64) -> Result<ItemEntry> {
    let name = entry_name(set, h.item.as_str());
    let size = h.size.0;
    let mut recs = Vec::with_capacity(512);
    let mut push = |k: &[&[u8]], v: &[&[u8]]| push_record(&mut recs, k, v);
    let (mut digits, mut time) = ([0u8; 20], [0u8; 48]);
    let mut ustar = Ustar {
        mode: 0o600,
        mtime: frozen_at,
        typeflag: b'0',
        ..Default::default()
    };
    let mut stored = if h.kind.has_bytes() {
        vec![[0, size]]
    } else {
        Vec::new()
    };
    let mut sparse = false;
    let mut linkname = String::new();
    let mut dir_name = String::new();
    if let Some(f) = &h.file {
        ustar.mode = f.mode & 0o7777;
        ustar.uid = u64::from(f.uid);
        ustar.gid = u64::from(f.gid);
        ustar.mtime = u64::try_from(f.mtime.sec).unwrap_or(0);
        ustar.typeflag = match h.kind {
            ItemKind::Volume | ItemKind::File => b'0',
            ItemKind::HardLink => b'1',
            ItemKind::Symlink => b'2',
            ItemKind::CharDevice => b'3',
            ItemKind::BlockDevice => b'4',
            ItemKind::Directory => b'5',
            ItemKind::Fifo => b'6',
        };
        // glibc's gnu_dev_major/minor.
        let major =
            ((f.rdev & 0x0000_0000_000f_ff00) >> 8) | ((f.rdev & 0xffff_f000_0000_0000) >> 32);
        let minor = (f.rdev & 0xff) | ((f.rdev & 0x0000_0fff_fff0_0000) >> 12);
        ustar.dev = (major, minor);
        if ustar.uid > 0o7777777 {
            push(&[b"uid"], &[decimal(&mut digits, ustar.uid)]);
        }
        if ustar.gid > 0o7777777 {
            push(&[b"gid"], &[decimal(&mut digits, ustar.gid)]);
        }
        push(&[b"mtime"], &[time_value(f.mtime, &mut time)]);
        push(&[b"atime"], &[time_value(f.atime, &mut time)]);
        push(&[b"ctime"], &[time_value(f.ctime, &mut time)]);
        match h.kind {
            ItemKind::Symlink => linkname = f.target.clone().unwrap_or_default(),
            ItemKind::HardLink => {
                let t = f.target.as_deref().ok_or_else(|| {
                    Error::new(ErrorKind::InvalidMap, "hard link without a target").item(&h.item)
                })?;
                linkname = link_target_name(set, f, t);
            }
            _ => {}
        }
        for (k, v) in &f.xattrs {
            let bytes = unhex(v).ok_or_else(|| {
                Error::new(ErrorKind::InvalidMap, format!("xattr {k} is not hex")).item(&h.item)
            })?;
            push(&[b"SCHILY.xattr.", k.as_bytes()], &[&bytes]);
        }
        if h.kind == ItemKind::Directory {
            dir_name = format!("{name}/");
        }
    }
    // Files and volumes with holes are stored sparse (GNU sparse 1.0).
    if h.kind.has_bytes() && !h.holes().is_empty() {
        stored = stored_segments(size, h.holes()).map_err(|e| e.item(&h.item))?;
        sparse = true;
    }
    let name = if dir_name.is_empty() { name } else { dir_name };
    let map = if sparse {
        sparse_map(size, &stored)
    } else {
        Vec::new()
    };
    let stored_len: u64 = stored.iter().map(|s| s[1]).sum();
    let data_len = map.len() as u64 + stored_len;
    let ustar_name = if sparse {
        push(&[b"GNU.sparse.major"], &[b"1"]);
        push(&[b"GNU.sparse.minor"], &[b"0"]);
        push(&[b"GNU.sparse.name"], &[name.as_bytes()]);
        push(&[b"GNU.sparse.realsize"], &[decimal(&mut digits, size)]);
        let (dir, base) = name.rsplit_once('/').unwrap_or((".", &name));
        format!("{dir}/GNUSparseFile.0/{base}")
    } else {
        push(&[b"path"], &[name.as_bytes()]);
        name.clone()
    };
    push(&[b"size"], &[decimal(&mut digits, data_len)]);
    if !linkname.is_empty() {
        push(&[b"linkpath"], &[linkname.as_bytes()]);
    }
    // Floe's own fields go in `comment` records, which POSIX tells every
    // reader to ignore: GNU tar warns of each unknown keyword (three lines
    // per entry with `FLOE.item`-style keywords).
    let mut floe = |k: &[u8], k2: &[u8], v: &[u8]| push(&[b"comment"], &[k, k2, b"=", v]);
    floe(b"FLOE.item", b"", h.item.as_str().as_bytes());
    floe(b"FLOE.kind", b"", h.kind.name().as_bytes());
    floe(b"FLOE.config", b"", h.config.as_str().as_bytes());
    for (k, v) in &h.meta {
        floe(b"FLOE.meta.", k.as_bytes(), v.as_bytes());
    }
    ustar.name = &ustar_name;
    ustar.size = data_len;
    ustar.linkname = &linkname;
    let mut head = pax_header(&name, &recs, ustar.mtime);
    head.extend_from_slice(&ustar.block());
    let data_at = head.len();
    head.extend_from_slice(&map);
    Ok(ItemEntry {
        head,
        data_at,
        size,
        stored,
        sparse,
    })
}

/// The index entry closing a set's archive (without the end-of-archive
/// blocks).
pub fn index_entry(record: &SetRecord) -> Result<Vec<u8>> {
    /// [`Index`], borrowing the record (no copy of 70,000 items to write).
    #[derive(Serialize)]
    struct IndexOut<'a> {
        magic: &'a str,
        version: u32,
        record: &'a SetRecord,
    }
    let index = serde_json::to_vec(&IndexOut {
        magic: INDEX_MAGIC,
        version: INDEX_VERSION,
        record,
    })
    .map_err(|e| Error::new(ErrorKind::Media, "cannot encode index").source(e))?;
    Ok(index_entry_of(
        &record.header.set,
        record.committed_at,
        &index,
    ))
}

/// The JSON of a set's [`Index`] from its parts, the items already encoded
/// (`items`: each item record's JSON, comma-separated, as a writer that
/// journals them encodes them anyway): byte for byte what serde writes for
/// the whole, without encoding 70,000 records a second time.
pub fn index_json(
    header: &SetHeader,
    items: &[u8],
    failures: &[crate::model::ItemFailure],
    committed_at: u64,
) -> Result<Vec<u8>> {
    let (head, tail) = index_json_around(header, failures, committed_at)?;
    let mut out = Vec::with_capacity(head.len() + items.len() + tail.len());
    out.extend_from_slice(&head);
    out.extend_from_slice(items);
    out.extend_from_slice(&tail);
    Ok(out)
}

/// [`index_json`] as the JSON before the items and the JSON after them,
/// so that a writer can write its encoded items in between from where
/// they are (a 70,000-file set's index is 50 MB: each copy of it into
/// fresh memory cost a tenth of a second).
pub fn index_json_around(
    header: &SetHeader,
    failures: &[crate::model::ItemFailure],
    committed_at: u64,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let enc = |e| Error::new(ErrorKind::Media, "cannot encode index").source(e);
    let mut head = Vec::with_capacity(4096);
    head.extend_from_slice(br#"{"magic":"#);
    serde_json::to_writer(&mut head, INDEX_MAGIC).map_err(enc)?;
    head.extend_from_slice(
        format!(r#","version":{INDEX_VERSION},"record":{{"header":"#).as_bytes(),
    );
    serde_json::to_writer(&mut head, header).map_err(enc)?;
    head.extend_from_slice(br#","items":["#);
    let mut tail = vec![b']'];
    if !failures.is_empty() {
        tail.extend_from_slice(br#","failures":"#);
        serde_json::to_writer(&mut tail, failures).map_err(enc)?;
    }
    tail.extend_from_slice(format!(r#","committed_at":{committed_at}}}}}"#).as_bytes());
    Ok((head, tail))
}

/// The index entry of `set` holding `index` (its JSON).
pub fn index_entry_of(set: &SetId, committed_at: u64, index: &[u8]) -> Vec<u8> {
    let mut out = index_entry_head(set, committed_at, index.len() as u64);
    out.reserve_exact(index.len() + index_entry_padding(index.len() as u64));
    out.extend_from_slice(index);
    out.resize(out.len() + index_entry_padding(index.len() as u64), 0);
    out
}

/// The `comment` that marks the index entry (archives before it said
/// `FLOE.index=1` as a keyword of its own, which readers still take).
const INDEX_MARK: &[u8] = b"FLOE.index=1";

/// Does a pax header mark the index entry?
fn marks_index(pax: &[(String, Vec<u8>)]) -> bool {
    pax.iter()
        .any(|(k, v)| (k == "comment" && v == INDEX_MARK) || (k == "FLOE.index" && v == b"1"))
}

/// The headers of the index entry of `set` whose JSON is `len` bytes
/// long; the entry is these, the JSON, then [`index_entry_padding`] zeros.
pub fn index_entry_head(set: &SetId, committed_at: u64, len: u64) -> Vec<u8> {
    let name = format!("{set}/floe-index.json");
    let mut recs = pax_record("path", name.as_bytes());
    recs.extend(pax_record("size", len.to_string().as_bytes()));
    recs.extend(pax_record("comment", INDEX_MARK));
    let mut out = pax_header(&name, &recs, committed_at);
    out.extend_from_slice(
        &Ustar {
            name: &name,
            mode: 0o600,
            size: len,
            mtime: committed_at,
            typeflag: b'0',
            ..Default::default()
        }
        .block(),
    );
    out
}

/// Zeros after an index entry's `len` bytes of JSON.
pub fn index_entry_padding(len: u64) -> usize {
    pad_usize(len)
}

/// Decode and check an index entry's bytes.
pub fn decode_index(bytes: &[u8]) -> Result<SetRecord> {
    let i: Index = serde_json::from_slice(bytes)
        .map_err(|e| Error::new(ErrorKind::Media, "malformed Floe index").source(e))?;
    if i.magic != INDEX_MAGIC || !(1..=INDEX_VERSION).contains(&i.version) {
        return Err(Error::new(
            ErrorKind::Media,
            format!(
                "not a Floe tar index of version 1..={INDEX_VERSION}: {:?} version {}",
                i.magic, i.version
            ),
        ));
    }
    Ok(i.record)
}

/// The end of an archive: two zero blocks, then zeros to a whole record
/// of `record` bytes, given the archive's length `pos` before it.
pub fn archive_end(pos: u64, record: u64) -> Vec<u8> {
    let after = pos + 2 * BLOCK;
    let rest = (record - after % record) % record;
    vec![0u8; usize::try_from(2 * BLOCK + rest).unwrap_or(0)]
}

/// Magic of the index locator: the last block of a Floe archive on disk
/// says where its index entry starts, so a reader finds the index without
/// walking every header (GNU tar stops at the two zero blocks before it).
pub const LOCATOR_MAGIC: &[u8; 8] = b"FLOEILOC";
/// Index locator version.
pub const LOCATOR_VERSION: u32 = 1;

/// The end of an archive whose index entry is `index_len` bytes at
/// `index_at`: [`archive_end`], with one more record when the padding has
/// no room, and the locator in the very last block.
pub fn archive_end_located(pos: u64, record: u64, index_at: u64, index_len: u64) -> Vec<u8> {
    let mut end = archive_end(pos, record);
    let block = usize::try_from(BLOCK).unwrap_or(512);
    if end.len() < 2 * block + block {
        end.resize(end.len() + usize::try_from(record).unwrap_or(block), 0);
    }
    let at = end.len() - block;
    end[at..].copy_from_slice(&locator(index_at, index_len));
    end
}

/// The locator block: magic, version, index offset and length (little
/// endian), the FNV-1a 64 of those 28 bytes (little endian), zeros.
pub fn locator(index_at: u64, index_len: u64) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[..8].copy_from_slice(LOCATOR_MAGIC);
    b[8..12].copy_from_slice(&LOCATOR_VERSION.to_le_bytes());
    b[12..20].copy_from_slice(&index_at.to_le_bytes());
    b[20..28].copy_from_slice(&index_len.to_le_bytes());
    let sum = fnv1a(&b[..28]);
    b[28..36].copy_from_slice(&sum.to_le_bytes());
    b
}

/// FNV-1a, 64 bits: a check against torn or stray bytes, not an
/// adversary (the index it leads to is decoded and checked in full).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Decode an archive's last block as a locator: (index offset, length),
/// or None when it is not one (an older archive: walk the headers).
pub fn read_locator(block: &[u8]) -> Option<(u64, u64)> {
    if block.len() != 512 || &block[..8] != LOCATOR_MAGIC {
        return None;
    }
    let word = |r: std::ops::Range<usize>| -> Option<u64> {
        Some(u64::from_le_bytes(block.get(r)?.try_into().ok()?))
    };
    let version = u32::from_le_bytes(block[8..12].try_into().ok()?);
    if version != LOCATOR_VERSION
        || word(28..36)? != fnv1a(&block[..28])
        || block[36..].iter().any(|&b| b != 0)
    {
        return None;
    }
    Some((word(12..20)?, word(20..28)?))
}

/// Turns an item's bytes, as the mover hands them over, into the bytes
/// its entry stores: everything, or only the segments outside its holes —
/// and refuses non-zero bytes where the map said a hole is (never drop
/// data silently).
#[derive(Debug)]
pub struct EntryStream {
    item: String,
    size: u64,
    stored: Vec<[u64; 2]>,
    next: usize,
    pos: u64,
    written: u64,
}

impl EntryStream {
    /// A stream for `entry` of item `item`.
    pub fn new(item: &str, entry: &ItemEntry) -> EntryStream {
        EntryStream {
            item: item.to_string(),
            size: entry.size,
            stored: entry.stored.clone(),
            next: 0,
            pos: 0,
            written: 0,
        }
    }

    /// Feed the next bytes of the item; `out` gets the parts to store.
    pub fn feed(&mut self, data: &[u8], out: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let end = self.pos + data.len() as u64;
        if end > self.size {
            return Err(Error::new(
                ErrorKind::Media,
                format!("item {} is longer than its header said", self.item),
            ));
        }
        let mut at = self.pos;
        while at < end {
            // Skip segments that end before `at`.
            while self.next < self.stored.len()
                && self.stored[self.next][0] + self.stored[self.next][1] <= at
            {
                self.next += 1;
            }
            let (seg_start, seg_end) = match self.stored.get(self.next) {
                Some(s) => (s[0], s[0] + s[1]),
                None => (self.size, self.size),
            };
            let lo = usize::try_from(at - self.pos).unwrap_or(0);
            if at < seg_start {
                // In a hole: must be zeros.
                let stop = seg_start.min(end);
                let hi = usize::try_from(stop - self.pos).unwrap_or(0);
                if let Some(k) = data[lo..hi].iter().position(|&b| b != 0) {
                    return Err(Error::new(
                        ErrorKind::Media,
                        format!(
                            "item {}: byte {} is not zero but its map says it is in a hole",
                            self.item,
                            at + k as u64
                        ),
                    ));
                }
                at = stop;
            } else {
                let stop = seg_end.min(end);
                let hi = usize::try_from(stop - self.pos).unwrap_or(0);
                out(&data[lo..hi])?;
                self.written += (hi - lo) as u64;
                at = stop;
            }
        }
        self.pos = end;
        Ok(())
    }

    /// The item's bytes are all fed: the padding that closes the entry.
    pub fn finish(&self) -> Result<Vec<u8>> {
        if self.pos != self.size {
            return Err(Error::new(
                ErrorKind::Media,
                format!(
                    "item {} is {} bytes, its header said {}",
                    self.item, self.pos, self.size
                ),
            ));
        }
        // A sparse map is padded to a block: only the data counts.
        Ok(vec![0u8; pad_usize(self.written)])
    }
}

/// Reads an item back from its entry's data area: a plain entry as is, a
/// sparse one by its map, with zeros for the holes.
pub struct EntryReader<R: Read> {
    inner: R,
    size: u64,
    stored: Vec<[u64; 2]>,
    next: usize,
    pos: u64,
}

impl<R: Read> EntryReader<R> {
    /// `inner` is positioned at the entry's data area (the item's
    /// locator); `sparse` says whether a map starts there.
    pub fn new(mut inner: R, size: u64, sparse: bool) -> Result<EntryReader<R>> {
        let stored = if sparse {
            parse_sparse_map(&mut inner, size)?.0
        } else {
            vec![[0, size]]
        };
        Ok(EntryReader {
            inner,
            size,
            stored,
            next: 0,
            pos: 0,
        })
    }

    /// Up to `max` more bytes of the item; empty at its end.
    pub fn read(&mut self, max: usize) -> Result<Vec<u8>> {
        let left = self.size - self.pos;
        let n = usize::try_from(left.min(max as u64)).unwrap_or(max);
        // Filled as it is read: zeros written only for holes (zeroing a
        // buffer the data then overwrote was 3 % of a tree restore's user
        // CPU).
        let mut buf = Vec::with_capacity(n);
        while buf.len() < n {
            let pos = self.pos + buf.len() as u64;
            while self.next < self.stored.len()
                && self.stored[self.next][0] + self.stored[self.next][1] <= pos
            {
                self.next += 1;
            }
            let (s, e) = self
                .stored
                .get(self.next)
                .map_or((self.size, self.size), |g| (g[0], g[0] + g[1]));
            let room = (n - buf.len()) as u64;
            if pos < s {
                let hole = usize::try_from((s - pos).min(room)).unwrap_or(0);
                buf.resize(buf.len() + hole, 0);
            } else {
                let take = (e - pos).min(room);
                let got = (&mut self.inner)
                    .take(take)
                    .read_to_end(&mut buf)
                    .map_err(|e| {
                        Error::new(ErrorKind::Media, "cannot read the archive").source(e)
                    })?;
                if (got as u64) < take {
                    return Err(Error::new(ErrorKind::Media, "archive ends inside an item"));
                }
            }
        }
        self.pos += n as u64;
        Ok(buf)
    }

    /// The reader underneath.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// Items whose entries a writer holds back until the set's end: hard
/// links (GNU tar links only to a path it has already extracted) and
/// directories (it sets a directory's times when it moves past it, so no
/// member may follow into it).
pub fn written_last(kind: ItemKind) -> bool {
    matches!(kind, ItemKind::HardLink | ItemKind::Directory)
}

/// The held-back items of a set, in the order they are written: hard
/// links, then directories by name (parents before children).
pub fn last_entries<'a>(headers: impl IntoIterator<Item = &'a ItemHeader>) -> Vec<ItemHeader> {
    let mut links: Vec<ItemHeader> = Vec::new();
    let mut dirs: Vec<ItemHeader> = Vec::new();
    for h in headers {
        match h.kind {
            ItemKind::HardLink => links.push(h.clone()),
            ItemKind::Directory => dirs.push(h.clone()),
            _ => {}
        }
    }
    dirs.sort_by(|a, b| a.item.as_str().cmp(b.item.as_str()));
    links.extend(dirs);
    links
}

/// Is this entry of a set's archive sparse (by its item's metadata)?
pub fn is_sparse(h: &ItemHeader) -> bool {
    h.kind.has_bytes() && !h.holes().is_empty()
}

/// Walk an archive's headers from the start until the index entry and
/// decode it; `skip(n)` moves the reader over `n` bytes of data (a seek on
/// a file, reads or record spacing on tape).
pub fn find_index<R: Read>(
    r: &mut R,
    skip: &mut dyn FnMut(&mut R, u64) -> std::io::Result<()>,
) -> Result<SetRecord> {
    let bad = |msg: String| Error::new(ErrorKind::Media, msg);
    let mut pos = 0u64;
    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    loop {
        let mut h = [0u8; 512];
        if r.read_exact(&mut h).is_err() {
            return Err(bad("archive ends before its Floe index".into()));
        }
        if h.iter().all(|&b| b == 0) {
            return Err(bad(
                "archive has no Floe index: not a complete Floe set".into()
            ));
        }
        if !checksum_ok(&h) {
            return Err(bad(format!("header at byte {pos} fails its checksum")));
        }
        let mut size =
            parse_octal(&h[124..136]).ok_or_else(|| bad(format!("bad size at {pos}")))?;
        if let Some((_, v)) = pax.iter().find(|(k, _)| k == "size") {
            size = std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad(format!("bad pax size at {pos}")))?;
        }
        let padded = size
            .checked_add(padding(size))
            .ok_or_else(|| bad(format!("entry at {pos} overflows")))?;
        if h[156] == b'x' {
            if size > MAX_PAX_HEADER {
                return Err(bad(format!("pax header of {size} bytes at {pos}")));
            }
            let mut d = vec![0u8; usize::try_from(padded).unwrap_or(0)];
            r.read_exact(&mut d)
                .map_err(|e| bad("archive ends inside a pax header".into()).source(e))?;
            pax = parse_pax(&d[..usize::try_from(size).unwrap_or(0)])
                .ok_or_else(|| bad(format!("malformed pax records at {pos}")))?;
        } else {
            if marks_index(&pax) {
                if size > MAX_INDEX {
                    return Err(bad(format!("index of {size} bytes")));
                }
                let mut d = vec![0u8; usize::try_from(size).unwrap_or(0)];
                r.read_exact(&mut d)
                    .map_err(|e| bad("archive ends inside its index".into()).source(e))?;
                return decode_index(&d);
            }
            pax.clear();
            skip(r, padded)
                .map_err(|e| bad(format!("cannot skip the entry at {pos}")).source(e))?;
        }
        pos = pos
            .checked_add(BLOCK + padded)
            .ok_or_else(|| bad(format!("entry at {pos} overflows")))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ConfigId, ItemId};
    use crate::units::Bytes;
    use proptest::prelude::*;

    #[test]
    fn an_index_from_encoded_items_is_byte_for_byte_serde_s() {
        use crate::model::*;
        let rec = |k: u64| ItemRecord {
            header: ItemHeader {
                item: ItemId::new(format!("/srv/\"q\"/f{k}")),
                kind: ItemKind::File,
                size: crate::units::Bytes(k),
                config: ConfigId::new("c"),
                meta: Default::default(),
                file: None,
                holes: vec![[0, k]],
            },
            trailer: ItemTrailer {
                length: crate::units::Bytes(k),
                blake3: "b".into(),
                config: ConfigId::new("c"),
                remaps: 1,
                captured_after_freeze: k.is_multiple_of(2),
            },
            position: MediaPosition {
                medium: "m".into(),
                locator: format!("s.tar@{k}"),
            },
        };
        for (n, failures) in [
            (0usize, vec![]),
            (1, vec![]),
            (
                5,
                vec![ItemFailure {
                    item: ItemId::new("/x"),
                    error: "gone \n".into(),
                }],
            ),
        ] {
            let record = SetRecord {
                header: SetHeader {
                    set: SetId::new("s"),
                    label: "l\"".into(),
                    agent: "h".into(),
                    sources: vec!["fsflush:/srv".into()],
                    image: ImageId::new("i"),
                    frozen_at: 3,
                    started_at: 4,
                },
                items: (0..n as u64).map(rec).collect(),
                failures,
                committed_at: 99,
            };
            let items: Vec<Vec<u8>> = record
                .items
                .iter()
                .map(|i| serde_json::to_vec(i).unwrap())
                .collect();
            let json =
                index_json(&record.header, &items.join(&b',')[..], &record.failures, 99).unwrap();
            assert_eq!(
                index_entry_of(&record.header.set, 99, &json),
                index_entry(&record).unwrap(),
                "{n} items"
            );
            assert_eq!(decode_index(&json).unwrap(), record);
        }
    }

    #[test]
    fn floe_fields_are_comments_and_the_index_is_found_by_either_mark() {
        use crate::model::*;
        let set = SetId::new("s");
        let mut h = file(5, Vec::new());
        h.meta.insert("layer".into(), "a=b".into());
        let e = item_entry(&set, &h, 7).unwrap();
        let pax_len = usize::try_from(parse_octal(&e.head[124..136]).unwrap()).unwrap();
        let pax = parse_pax(&e.head[512..512 + pax_len]).unwrap();
        let comments: Vec<&[u8]> = pax
            .iter()
            .filter(|(k, _)| k == "comment")
            .map(|(_, v)| v.as_slice())
            .collect();
        assert_eq!(
            comments,
            [
                &b"FLOE.item=/srv/a/f"[..],
                b"FLOE.kind=file",
                b"FLOE.config=c",
                b"FLOE.meta.layer=a=b"
            ]
        );
        assert!(
            pax.iter().all(|(k, _)| !k.starts_with("FLOE")),
            "a keyword tar does not know: {pax:?}"
        );
        // An archive of that entry and an index, marked as this writer
        // marks it and as archives before it did (a keyword of its own).
        let record = SetRecord {
            header: SetHeader {
                set: set.clone(),
                label: String::new(),
                agent: "h".into(),
                sources: Vec::new(),
                image: ImageId::new("i"),
                frozen_at: 7,
                started_at: 7,
            },
            items: Vec::new(),
            failures: Vec::new(),
            committed_at: 9,
        };
        let json = index_json(&record.header, b"", &[], 9).unwrap();
        let old_head = {
            let name = format!("{set}/floe-index.json");
            let mut recs = pax_record("path", name.as_bytes());
            recs.extend(pax_record("size", json.len().to_string().as_bytes()));
            recs.extend(pax_record("FLOE.index", b"1"));
            let mut out = pax_header(&name, &recs, 9);
            out.extend_from_slice(
                &Ustar {
                    name: &name,
                    mode: 0o600,
                    size: json.len() as u64,
                    mtime: 9,
                    typeflag: b'0',
                    ..Default::default()
                }
                .block(),
            );
            out
        };
        for head in [index_entry_head(&set, 9, json.len() as u64), old_head] {
            let mut archive = e.head.clone();
            archive.extend_from_slice(b"hello");
            archive.resize(archive.len() + 512 - 5, 0);
            archive.extend_from_slice(&head);
            archive.extend_from_slice(&json);
            archive.resize(archive.len() + index_entry_padding(json.len() as u64), 0);
            archive.extend_from_slice(&archive_end(archive.len() as u64, 512));
            let mut r = std::io::Cursor::new(archive);
            let found = find_index(&mut r, &mut |r, n| {
                r.set_position(r.position() + n);
                Ok(())
            })
            .unwrap();
            assert_eq!(found, record);
        }
        // Without a mark there is no index.
        let mut archive = e.head.clone();
        archive.resize(archive.len() + 512, 0);
        archive.extend_from_slice(&archive_end(archive.len() as u64, 512));
        let err = find_index(&mut std::io::Cursor::new(archive), &mut |r, n| {
            r.set_position(r.position() + n);
            Ok(())
        })
        .unwrap_err();
        assert!(err.to_string().contains("no Floe index"), "{err}");
    }

    #[test]
    fn pax_records_count_their_own_length() {
        for (k, v) in [
            ("path", &b"a"[..]),
            ("size", b"123456789012"),
            ("FLOE.meta.x", &[b'y'; 120][..]),
            ("SCHILY.xattr.user.bin", &[0, 10, 255, b'='][..]),
        ] {
            let r = pax_record(k, v);
            let n: usize = std::str::from_utf8(&r[..r.iter().position(|&b| b == b' ').unwrap()])
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(n, r.len());
            assert_eq!(parse_pax(&r).unwrap(), vec![(k.to_string(), v.to_vec())]);
        }
    }

    #[test]
    fn headers_checksum_and_big_values_fall_back_to_zero() {
        let h = Ustar {
            name: "s/vol0",
            size: 1 << 20,
            typeflag: b'0',
            ..Default::default()
        }
        .block();
        assert!(checksum_ok(&h));
        assert_eq!(parse_octal(&h[124..136]), Some(1 << 20));
        let big = Ustar {
            name: "s/big",
            size: 1 << 40,
            ..Default::default()
        }
        .block();
        assert_eq!(parse_octal(&big[124..136]), Some(0));
    }

    #[test]
    fn the_locator_ends_every_record_aligned_archive_and_round_trips() {
        for (pos, record) in [
            (0u64, 512u64),
            (1024, 1024),
            (512 * 7, 4096),
            (3 * 262_144, 262_144),
        ] {
            let end = archive_end_located(pos, record, 12_345, 678);
            assert_eq!((pos + end.len() as u64) % record, 0, "record aligned");
            assert!(end[..1024].iter().all(|&b| b == 0), "two zero blocks first");
            assert_eq!(read_locator(&end[end.len() - 512..]), Some((12_345, 678)));
        }
        // Any changed byte makes it not a locator.
        let good = locator(1 << 40, 99);
        for k in [0usize, 9, 13, 21, 30, 50, 511] {
            let mut bad = good;
            bad[k] ^= 1;
            assert_eq!(read_locator(&bad), None, "byte {k}");
        }
        assert_eq!(read_locator(&[0u8; 512]), None);
    }

    /// The `format!` forms these were written with before they wrote
    /// digit by digit: the bytes must not change.
    fn octal_as_before(width: usize, v: u64) -> Vec<u8> {
        let w = width - 1;
        let s = format!("{v:0w$o}");
        let mut f = if s.len() > w {
            vec![b'0'; w]
        } else {
            s.into_bytes()
        };
        f.push(0);
        f
    }

    fn record_as_before(key: &str, value: &[u8]) -> Vec<u8> {
        let body_len = 1 + key.len() + 1 + value.len() + 1;
        let mut len = body_len + 1;
        loop {
            let candidate = len.to_string().len() + body_len;
            if candidate == len {
                break;
            }
            len = candidate;
        }
        let mut out = format!("{len} {key}=").into_bytes();
        out.extend_from_slice(value);
        out.push(b'\n');
        out
    }

    fn time_as_before(t: Timestamp) -> String {
        if t.sec >= 0 && t.nsec > 0 {
            format!("{}.{:09}", t.sec, t.nsec)
        } else {
            t.sec.to_string()
        }
    }

    proptest! {
        #[test]
        fn numbers_records_and_times_are_the_bytes_format_wrote(
            width in 2usize..14,
            v in prop_oneof![any::<u64>(), 0u64..5000, Just(0o7777777), Just(0o10000000)],
            key in "[a-zA-Z.]{1,30}",
            value in proptest::collection::vec(any::<u8>(), 0..1100),
            sec in prop_oneof![any::<i64>(), -5i64..5, 1_700_000_000i64..1_800_000_000],
            nsec in prop_oneof![0u32..1_000_000_000, Just(0), Just(1), Just(999_999_999)],
        ) {
            let mut f = vec![0xffu8; width];
            octal(&mut f, v);
            prop_assert_eq!(&f, &octal_as_before(width, v));
            let mut digits = [0u8; 20];
            let want = v.to_string();
            prop_assert_eq!(decimal(&mut digits, v), want.as_bytes());
            prop_assert_eq!(pax_record(&key, &value), record_as_before(&key, &value));
            let t = Timestamp { sec, nsec };
            let mut buf = [0u8; 48];
            let want = time_as_before(t);
            prop_assert_eq!(time_value(t, &mut buf), want.as_bytes());
        }
    }

    proptest! {
        #[test]
        fn the_locator_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = read_locator(&bytes);
        }
    }

    fn file(size: u64, holes: Vec<[u64; 2]>) -> ItemHeader {
        ItemHeader {
            item: ItemId::new("/srv/a/f"),
            kind: ItemKind::File,
            size: Bytes(size),
            config: ConfigId::new("c"),
            meta: Default::default(),
            holes: Vec::new(),
            file: Some(FileMeta {
                root: "/srv/a".into(),
                path: "f".into(),
                mode: 0o100640,
                holes,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_sparse_file_stores_only_its_data_and_reads_back_whole() {
        let h = file(10_000, vec![[0, 4096], [6000, 4000]]);
        let e = item_entry(&SetId::new("s"), &h, 1).unwrap();
        assert!(e.sparse);
        assert_eq!(e.stored, vec![[4096, 1904]]);
        let map = &e.head[e.data_at..];
        assert!(map.starts_with(b"2\n4096\n1904\n10000\n0\n"), "{map:?}");
        let mut data = vec![0u8; 10_000];
        data[4096..6000].fill(7);
        let mut s = EntryStream::new("f", &e);
        let mut stored = Vec::new();
        for c in data.chunks(999) {
            s.feed(c, &mut |b| {
                stored.extend_from_slice(b);
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(stored, vec![7u8; 1904]);
        let pad = s.finish().unwrap();
        assert_eq!((stored.len() + pad.len()) % 512, 0);
        let mut area = map.to_vec();
        area.extend_from_slice(&stored);
        let mut r = EntryReader::new(std::io::Cursor::new(area), 10_000, true).unwrap();
        let mut back = Vec::new();
        loop {
            let c = r.read(777).unwrap();
            if c.is_empty() {
                break;
            }
            back.extend(c);
        }
        assert_eq!(back, data);
    }

    #[test]
    fn an_entry_cut_short_is_an_error_never_zeros() {
        // A plain entry of 10,000 bytes whose archive ends after 6,000.
        let mut r = EntryReader::new(std::io::Cursor::new(vec![5u8; 6000]), 10_000, false).unwrap();
        let first = r.read(4000).unwrap();
        assert_eq!(first, vec![5u8; 4000]);
        let err = r.read(4000).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Media);
        assert!(
            err.to_string().contains("archive ends inside an item"),
            "{err}"
        );
        // A sparse one whose stored data is cut short after its map.
        let mut area = b"1\n0\n3000\n".to_vec();
        area.resize(512, 0);
        area.extend_from_slice(&[9u8; 1000]);
        let mut r = EntryReader::new(std::io::Cursor::new(area), 8000, true).unwrap();
        let err = r.read(8000).unwrap_err();
        assert!(
            err.to_string().contains("archive ends inside an item"),
            "{err}"
        );
        // A medium that fails (EIO) is named as such, with its cause.
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::from_raw_os_error(libc::EIO))
            }
        }
        let mut r = EntryReader::new(Failing, 100, false).unwrap();
        let err = r.read(100).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Media);
        let text = format!("{err:#}");
        assert!(text.contains("cannot read the archive"), "{text}");
        assert!(
            std::error::Error::source(&err)
                .is_some_and(|s| s.to_string().contains("Input/output error")),
            "{text}"
        );
    }

    #[test]
    fn a_volume_with_holes_is_a_sparse_entry_and_a_file_s_header_holes_are_ignored() {
        let vol = ItemHeader {
            item: ItemId::new("vol0"),
            kind: ItemKind::Volume,
            size: Bytes(1 << 20),
            config: ConfigId::new("c"),
            meta: Default::default(),
            file: None,
            holes: vec![[4096, (1 << 20) - 8192]],
        };
        assert!(is_sparse(&vol));
        let e = item_entry(&SetId::new("s"), &vol, 1).unwrap();
        assert!(e.sparse);
        assert_eq!(e.stored, vec![[0, 4096], [(1 << 20) - 4096, 4096]]);
        let head = String::from_utf8_lossy(&e.head);
        assert!(head.contains("GNU.sparse.name=s/vol0"), "{head}");
        assert!(head.contains("GNU.sparse.realsize=1048576"), "{head}");
        // Without holes: a plain entry.
        let plain = ItemHeader {
            holes: Vec::new(),
            ..vol.clone()
        };
        assert!(!is_sparse(&plain) && !item_entry(&SetId::new("s"), &plain, 1).unwrap().sparse);
        // A file's holes are its metadata's, never the header's.
        let mut f = file(8192, Vec::new());
        f.holes = vec![[0, 4096]];
        assert!(!is_sparse(&f) && f.holes().is_empty());
    }

    #[test]
    fn bytes_in_a_hole_that_are_not_zero_are_refused() {
        let h = file(8192, vec![[0, 4096]]);
        let e = item_entry(&SetId::new("s"), &h, 1).unwrap();
        let mut s = EntryStream::new("f", &e);
        let mut data = vec![0u8; 8192];
        data[100] = 1;
        let err = s.feed(&data, &mut |_| Ok(())).unwrap_err();
        assert!(err.to_string().contains("byte 100 is not zero"), "{err}");
    }

    #[test]
    fn holes_that_overlap_are_a_bad_map() {
        assert!(stored_segments(100, &[[0, 50], [40, 10]]).is_err());
        assert!(stored_segments(100, &[[90, 20]]).is_err());
        assert_eq!(
            stored_segments(100, &[[10, 10], [50, 50]]).unwrap(),
            vec![[0, 10], [20, 30]]
        );
    }

    proptest! {
        #[test]
        fn stream_and_reader_round_trip_any_holes(
            size in 0u64..20_000,
            cuts in proptest::collection::vec(0u64..20_000, 0..8),
            chunk in 1usize..5000,
        ) {
            let mut cuts: Vec<u64> = cuts.into_iter().map(|c| c % (size + 1)).collect();
            cuts.sort_unstable();
            cuts.dedup();
            let holes: Vec<[u64; 2]> = cuts.chunks(2).filter(|p| p.len() == 2 && p[1] > p[0]).map(|p| [p[0], p[1] - p[0]]).collect();
            let h = file(size, holes.clone());
            let e = item_entry(&SetId::new("s"), &h, 1).unwrap();
            let mut data: Vec<u8> = (0..size).map(|i| (i % 251) as u8 | 1).collect();
            for hole in &holes {
                let (a, b) = (usize::try_from(hole[0]).unwrap(), usize::try_from(hole[0] + hole[1]).unwrap());
                data[a..b].fill(0);
            }
            let mut s = EntryStream::new("f", &e);
            let mut area = e.head[e.data_at..].to_vec();
            for c in data.chunks(chunk) {
                s.feed(c, &mut |b| { area.extend_from_slice(b); Ok(()) }).unwrap();
            }
            area.extend(s.finish().unwrap());
            prop_assert_eq!(area.len() % 512, 0);
            let mut r = EntryReader::new(std::io::Cursor::new(area), size, e.sparse).unwrap();
            let mut back = Vec::new();
            loop {
                let c = r.read(chunk).unwrap();
                if c.is_empty() { break; }
                back.extend(c);
            }
            prop_assert_eq!(back, data);
        }

        #[test]
        fn the_sparse_map_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048), size in any::<u64>()) {
            let _ = parse_sparse_map(&mut std::io::Cursor::new(bytes), size);
        }

        #[test]
        fn the_index_finder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut c = std::io::Cursor::new(bytes);
            let _ = find_index(&mut c, &mut |r, n| {
                std::io::copy(&mut r.by_ref().take(n), &mut std::io::sink()).map(|_| ())
            });
        }

        #[test]
        fn the_pax_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_pax(&bytes);
        }
    }
}
