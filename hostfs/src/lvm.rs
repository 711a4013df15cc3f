//! LVM2 on-disk metadata, read from a physical volume itself: the label
//! (`LABELONE` in one of the first four sectors), the PV header (its UUID
//! and metadata areas), the metadata area header (`" LVM2 x[5A%r0N*>"`) and
//! the current metadata text it points at; a parser for that text format;
//! and the mapping of a logical volume's bytes to PV extents (linear and
//! striped segments). Pure except [`read_pv`].

use crate::le;
use floe_core::error::{Error, ErrorKind, Result};
use std::collections::BTreeMap;

const MDA_MAGIC: &[u8; 16] = b" LVM2 x[5A%r0N*>";

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidMap, msg.into())
}

/// What a PV's label says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PvLabel {
    /// The PV UUID, with the usual dashes (6-4-4-4-4-4-6).
    pub uuid: String,
    /// Metadata areas: (offset, size) in bytes.
    pub mdas: Vec<(u64, u64)>,
}

/// Format a 32-character LVM UUID with dashes.
pub fn dashed(u: &str) -> String {
    let cuts = [6, 4, 4, 4, 4, 4, 6];
    let mut out = Vec::new();
    let mut at = 0;
    for c in cuts {
        out.push(u.get(at..at + c).unwrap_or(""));
        at += c;
    }
    out.join("-")
}

/// Find and parse the label in the first 2 KiB of a device.
pub fn parse_label(head: &[u8]) -> Result<PvLabel> {
    for sector in 0..4 {
        let s = sector * 512;
        let Some(l) = head.get(s..s + 512) else { break };
        if &l[0..8] != b"LABELONE" || &l[24..32] != b"LVM2 001" {
            continue;
        }
        let off = le::u32(l, 20).ok_or_else(|| bad("short label"))? as usize;
        let pv = l
            .get(off..)
            .ok_or_else(|| bad("label points outside its sector"))?;
        let uuid = std::str::from_utf8(pv.get(0..32).ok_or_else(|| bad("short PV header"))?)
            .map_err(|_| bad("PV UUID is not text"))?;
        // device size, then data areas (to a zero entry), then metadata
        // areas (to a zero entry).
        let mut at = 40;
        let mut lists = [Vec::new(), Vec::new()];
        for list in &mut lists {
            loop {
                let (o, z) = (le::u64(pv, at), le::u64(pv, at + 8));
                at += 16;
                match (o, z) {
                    (Some(0), Some(0)) => break,
                    (Some(o), Some(z)) => list.push((o, z)),
                    _ => return Err(bad("PV header runs past its sector")),
                }
            }
        }
        return Ok(PvLabel {
            uuid: dashed(uuid),
            mdas: lists[1].clone(),
        });
    }
    Err(bad(
        "no LVM2 label (LABELONE) in the first four sectors: not a physical volume",
    ))
}

/// The current metadata text of a metadata area, given the area's bytes.
pub fn parse_mda(area: &[u8]) -> Result<String> {
    if area.get(4..20) != Some(&MDA_MAGIC[..]) {
        return Err(bad("metadata area has no LVM2 magic"));
    }
    let size = le::u64(area, 32).ok_or_else(|| bad("short metadata area header"))?;
    let (off, len) = (
        le::u64(area, 40).ok_or_else(|| bad("short metadata area header"))?,
        le::u64(area, 48).ok_or_else(|| bad("short metadata area header"))?,
    );
    if off == 0 || len == 0 {
        return Err(bad("metadata area holds no metadata"));
    }
    let (off, len, size) = (
        usize::try_from(off).map_err(|_| bad("offset"))?,
        usize::try_from(len).map_err(|_| bad("length"))?,
        usize::try_from(size).map_err(|_| bad("size"))?,
    );
    let mut text = Vec::with_capacity(len);
    // A circular buffer after the 512-byte header: the text may wrap.
    let first = len.min(size.saturating_sub(off));
    text.extend_from_slice(
        area.get(off..off + first)
            .ok_or_else(|| bad("metadata past its area"))?,
    );
    if first < len {
        text.extend_from_slice(
            area.get(512..512 + len - first)
                .ok_or_else(|| bad("metadata past its area"))?,
        );
    }
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    String::from_utf8(text[..end].to_vec()).map_err(|_| bad("metadata is not text"))
}

/// A value of the LVM2 text format.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `key = 12`.
    Int(i64),
    /// `key = "text"`.
    Str(String),
    /// `key = [ ... ]`.
    List(Vec<Value>),
    /// `name { ... }`.
    Section(BTreeMap<String, Value>),
}

impl Value {
    /// A member of a section.
    pub fn get(&self, k: &str) -> Option<&Value> {
        match self {
            Value::Section(m) => m.get(k),
            _ => None,
        }
    }
    /// As an integer.
    pub fn int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
    /// As text.
    pub fn str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

struct Lexer<'a> {
    s: &'a [u8],
    i: usize,
}

impl Lexer<'_> {
    fn skip(&mut self) {
        while self.i < self.s.len() {
            match self.s[self.i] {
                b' ' | b'\t' | b'\n' | b'\r' | b',' => self.i += 1,
                b'#' => {
                    while self.i < self.s.len() && self.s[self.i] != b'\n' {
                        self.i += 1;
                    }
                }
                _ => break,
            }
        }
    }
    fn word(&mut self) -> Option<String> {
        self.skip();
        let st = self.i;
        while self.i < self.s.len()
            && (self.s[self.i].is_ascii_alphanumeric() || b"_-.+".contains(&self.s[self.i]))
        {
            self.i += 1;
        }
        (self.i > st).then(|| String::from_utf8_lossy(&self.s[st..self.i]).to_string())
    }
    fn peek(&mut self) -> Option<u8> {
        self.skip();
        self.s.get(self.i).copied()
    }
    fn value(&mut self, depth: usize) -> Result<Value> {
        if depth > 32 {
            return Err(bad("metadata nested too deeply"));
        }
        match self.peek() {
            Some(b'"') => {
                self.i += 1;
                let mut out = Vec::new();
                while let Some(&c) = self.s.get(self.i) {
                    self.i += 1;
                    match c {
                        b'"' => return Ok(Value::Str(String::from_utf8_lossy(&out).to_string())),
                        b'\\' => {
                            if let Some(&n) = self.s.get(self.i) {
                                out.push(n);
                                self.i += 1;
                            }
                        }
                        c => out.push(c),
                    }
                }
                Err(bad("unterminated string in metadata"))
            }
            Some(b'[') => {
                self.i += 1;
                let mut v = Vec::new();
                loop {
                    match self.peek() {
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Value::List(v));
                        }
                        None => return Err(bad("unterminated list in metadata")),
                        _ => v.push(self.value(depth + 1)?),
                    }
                }
            }
            _ => {
                let w = self
                    .word()
                    .ok_or_else(|| bad(format!("unexpected byte in metadata at {}", self.i)))?;
                w.parse::<i64>()
                    .map(Value::Int)
                    .map_err(|_| bad(format!("metadata value {w:?} is not a number")))
            }
        }
    }
    fn section(&mut self, depth: usize, top: bool) -> Result<BTreeMap<String, Value>> {
        if depth > 32 {
            return Err(bad("metadata nested too deeply"));
        }
        let mut m = BTreeMap::new();
        loop {
            match self.peek() {
                None if top => return Ok(m),
                None => return Err(bad("unterminated section in metadata")),
                Some(b'}') if !top => {
                    self.i += 1;
                    return Ok(m);
                }
                _ => {}
            }
            let k = self
                .word()
                .ok_or_else(|| bad(format!("expected a name in metadata at {}", self.i)))?;
            match self.peek() {
                Some(b'=') => {
                    self.i += 1;
                    let v = self.value(depth)?;
                    m.insert(k, v);
                }
                Some(b'{') => {
                    self.i += 1;
                    let v = self.section(depth + 1, false)?;
                    m.insert(k, Value::Section(v));
                }
                _ => return Err(bad(format!("expected `=` or `{{` after {k:?} in metadata"))),
            }
        }
    }
}

/// Parse LVM2 metadata text.
pub fn parse_text(text: &str) -> Result<Value> {
    let mut l = Lexer {
        s: text.as_bytes(),
        i: 0,
    };
    Ok(Value::Section(l.section(0, true)?))
}

/// One segment of an LV: `extent_count` extents from `start_extent`,
/// striped over `stripes` (PV name, first PV extent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First LV extent.
    pub start_extent: u64,
    /// Extents.
    pub extent_count: u64,
    /// Stripe size in sectors (striped segments).
    pub stripe_size: u64,
    /// (PV name, first PV extent) per stripe.
    pub stripes: Vec<(String, u64)>,
}

/// A volume group as its metadata describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeGroup {
    /// Its name.
    pub name: String,
    /// Its UUID.
    pub id: String,
    /// The metadata sequence number: changes on every change.
    pub seqno: u64,
    /// Extent size in 512-byte sectors.
    pub extent_size: u64,
    /// PV name → (UUID, pe_start in sectors).
    pub pvs: BTreeMap<String, (String, u64)>,
    /// LV name → segments (linear and striped LVs).
    pub lvs: BTreeMap<String, Vec<Segment>>,
    /// LVs of other kinds, by name: their segment type (`snapshot`, `thin`…).
    pub other: BTreeMap<String, String>,
    /// Classic snapshots, by their copy-on-write LV: (origin LV, chunk
    /// size in sectors).
    pub snapshots: BTreeMap<String, (String, u64)>,
}

/// The volume group of a parsed metadata text.
pub fn volume_group(meta: &Value) -> Result<VolumeGroup> {
    let Value::Section(top) = meta else {
        return Err(bad("metadata is not a section"));
    };
    let (name, vg) = top
        .iter()
        .find(|(_, v)| matches!(v, Value::Section(_)) && v.get("seqno").is_some())
        .ok_or_else(|| bad("metadata holds no volume group"))?;
    let int = |v: &Value, k: &str| -> Result<u64> {
        v.get(k)
            .and_then(Value::int)
            .and_then(|i| u64::try_from(i).ok())
            .ok_or_else(|| bad(format!("metadata lacks {k}")))
    };
    let mut pvs = BTreeMap::new();
    if let Some(Value::Section(m)) = vg.get("physical_volumes") {
        for (pn, pv) in m {
            let id = pv
                .get("id")
                .and_then(Value::str)
                .ok_or_else(|| bad(format!("PV {pn} has no id")))?;
            pvs.insert(pn.clone(), (id.to_string(), int(pv, "pe_start")?));
        }
    }
    let mut lvs = BTreeMap::new();
    let mut other = BTreeMap::new();
    let mut snapshots = BTreeMap::new();
    if let Some(Value::Section(m)) = vg.get("logical_volumes") {
        for (ln, lv) in m {
            let Value::Section(fields) = lv else { continue };
            let mut segs = Vec::new();
            for (k, seg) in fields {
                if !k.starts_with("segment") || !matches!(seg, Value::Section(_)) {
                    continue; // `segment_count`
                }
                let ty = seg.get("type").and_then(Value::str).unwrap_or("");
                if ty == "snapshot" {
                    // A hidden `snapshotN` LV ties a COW LV to its origin.
                    if let (Some(origin), Some(cow)) = (
                        seg.get("origin").and_then(Value::str),
                        seg.get("cow_store").and_then(Value::str),
                    ) {
                        let chunk = int(seg, "chunk_size")?;
                        snapshots.insert(cow.to_string(), (origin.to_string(), chunk));
                    }
                }
                if ty != "striped" {
                    other.insert(ln.clone(), ty.to_string());
                    segs.clear();
                    break;
                }
                let Some(Value::List(st)) = seg.get("stripes") else {
                    return Err(bad(format!("LV {ln} segment has no stripes")));
                };
                let mut stripes = Vec::new();
                for pair in st.chunks(2) {
                    match pair {
                        [Value::Str(pv), Value::Int(e)] => stripes.push((
                            pv.clone(),
                            u64::try_from(*e).map_err(|_| bad("negative extent"))?,
                        )),
                        _ => return Err(bad(format!("LV {ln} has malformed stripes"))),
                    }
                }
                segs.push(Segment {
                    start_extent: int(seg, "start_extent")?,
                    extent_count: int(seg, "extent_count")?,
                    stripe_size: seg
                        .get("stripe_size")
                        .and_then(Value::int)
                        .and_then(|i| u64::try_from(i).ok())
                        .unwrap_or(0),
                    stripes,
                });
            }
            if other.contains_key(ln) {
                continue;
            }
            segs.sort_by_key(|s| s.start_extent);
            lvs.insert(ln.clone(), segs);
        }
    }
    Ok(VolumeGroup {
        name: name.clone(),
        id: vg.get("id").and_then(Value::str).unwrap_or("").to_string(),
        seqno: int(vg, "seqno")?,
        extent_size: int(vg, "extent_size")?,
        pvs,
        lvs,
        other,
        snapshots,
    })
}

/// One piece of an LV on a PV: LV byte offset, length, PV UUID, PV byte
/// offset.
pub type LvPiece = (u64, u64, String, u64);

/// Map every byte of an LV to its PVs, in LV order. Pure.
pub fn map_lv(vg: &VolumeGroup, lv: &str) -> Result<(u64, Vec<LvPiece>)> {
    if let Some(ty) = vg.other.get(lv) {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("LV {lv} is a {ty:?} LV: only linear and striped LVs (and classic snapshots of them) are mapped"),
        ));
    }
    let segs = vg
        .lvs
        .get(lv)
        .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no LV {lv} in VG {}", vg.name)))?;
    let ext = vg.extent_size * 512;
    let mut out: Vec<LvPiece> = Vec::new();
    let mut at = 0u64;
    for s in segs {
        if s.start_extent * ext != at {
            return Err(bad(format!(
                "LV {lv} segments leave a gap at extent {}",
                s.start_extent
            )));
        }
        let n = u64::try_from(s.stripes.len()).unwrap_or(0).max(1);
        let pv = |name: &str| {
            vg.pvs
                .get(name)
                .cloned()
                .ok_or_else(|| bad(format!("LV {lv} names an unknown PV {name}")))
        };
        let len = s.extent_count * ext;
        if n == 1 {
            let (uuid, pe_start) = pv(&s.stripes[0].0)?;
            out.push((at, len, uuid, pe_start * 512 + s.stripes[0].1 * ext));
        } else {
            let chunk = s.stripe_size * 512;
            if chunk == 0 || !len.is_multiple_of(chunk * n) {
                return Err(bad(format!("LV {lv} has a striped segment of odd size")));
            }
            let per = s.extent_count / n * ext; // bytes per stripe
            let mut off = 0;
            while off < len {
                let row = off / (chunk * n);
                let col = (off / chunk) % n;
                let (name, first) = &s.stripes[usize::try_from(col).unwrap_or(0)];
                let (uuid, pe_start) = pv(name)?;
                let dev = pe_start * 512 + first * ext + row * chunk;
                debug_assert!(row * chunk < per);
                match out.last_mut() {
                    Some((l, n2, u, d))
                        if *u == uuid && *d + *n2 == dev && *l + *n2 == at + off =>
                    {
                        *n2 += chunk
                    }
                    _ => out.push((at + off, chunk, uuid, dev)),
                }
                off += chunk;
            }
        }
        at += len;
    }
    Ok((at, out))
}

/// The magic of a persistent snapshot exception store (`"SnAp"`).
pub const SNAP_MAGIC: u32 = 0x7041_6e53;

/// Parse a classic (dm-snapshot, persistent) exception store: chunk 0 is
/// the header (magic, valid, version 1, chunk size in sectors); metadata
/// areas of `chunk_size*512/16` exceptions `(old_chunk, new_chunk)` follow
/// at chunks `1 + i*(per_area + 1)`, each followed by its data chunks; the
/// list ends at the first exception whose `new_chunk` is 0. `chunk(k)`
/// reads chunk k of the COW device. The exceptions, in store order.
pub fn parse_exceptions(mut chunk: impl FnMut(u64) -> Result<Vec<u8>>) -> Result<Vec<(u64, u64)>> {
    let head = chunk(0)?;
    let (magic, valid, version, size) = (
        le::u32(&head, 0),
        le::u32(&head, 4),
        le::u32(&head, 8),
        le::u32(&head, 12),
    );
    if magic != Some(SNAP_MAGIC) {
        return Err(bad("not a snapshot exception store (no SnAp magic)"));
    }
    if valid != Some(1) {
        return Err(Error::new(
            ErrorKind::Unstable,
            "the snapshot is invalid (it overflowed): its frozen image is lost",
        ));
    }
    if version != Some(1) {
        return Err(bad(format!("exception store version {version:?}, not 1")));
    }
    let per_area = u64::from(size.unwrap_or(0)) * 512 / 16;
    if per_area == 0 {
        return Err(bad("exception store with a zero chunk size"));
    }
    let mut out = Vec::new();
    for area in 0.. {
        if area > 1 << 20 {
            return Err(bad("exception store without an end"));
        }
        let b = chunk(1 + area * (per_area + 1))?;
        for e in b.chunks_exact(16) {
            let (old, new) = (le::u64(e, 0).unwrap_or(0), le::u64(e, 8).unwrap_or(0));
            if new == 0 {
                return Ok(out);
            }
            out.push((old, new));
        }
    }
    Ok(out)
}

/// The frozen image of a classic snapshot as pieces on PVs: the origin's
/// map, except that every chunk with an exception is read from the COW LV
/// at its `new_chunk`. Pure.
pub fn map_snapshot(
    vg: &VolumeGroup,
    cow: &str,
    exceptions: &[(u64, u64)],
) -> Result<(u64, Vec<LvPiece>)> {
    let (origin, chunk_sectors) = vg.snapshots.get(cow).ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!("{cow} is not a snapshot in VG {}", vg.name),
        )
    })?;
    let chunk = chunk_sectors * 512;
    let (size, base) = map_lv(vg, origin)?;
    let cow_map = vg
        .lvs
        .get(cow)
        .ok_or_else(|| {
            bad(format!(
                "the snapshot's COW LV {cow} is not a linear or striped LV"
            ))
        })
        .and_then(|_| map_lv(vg, cow))?;
    let moved: BTreeMap<u64, u64> = exceptions.iter().copied().collect();
    // Where byte `at` of an LV map lies, for `len` bytes at most.
    let locate = |m: &[LvPiece], at: u64| -> Result<(String, u64, u64)> {
        m.iter()
            .find(|(l, n, _, _)| *l <= at && at < l + n)
            .map(|(l, n, u, d)| (u.clone(), d + (at - l), l + n - at))
            .ok_or_else(|| bad(format!("offset {at} outside the LV")))
    };
    let mut out: Vec<LvPiece> = Vec::new();
    let mut at = 0;
    while at < size {
        let c = at / chunk;
        let end = ((c + 1) * chunk).min(size);
        let (uuid, dev, left) = match moved.get(&c) {
            Some(&n) => locate(&cow_map.1, n * chunk + (at - c * chunk))?,
            None => locate(&base, at)?,
        };
        let n = (end - at).min(left);
        match out.last_mut() {
            Some((l, k, u, d)) if *u == uuid && *d + *k == dev && *l + *k == at => *k += n,
            _ => out.push((at, n, uuid, dev)),
        }
        at += n;
    }
    Ok((size, out))
}

/// Read a PV's label and current metadata from its device.
pub fn read_pv(dev: &std::path::Path) -> Result<(PvLabel, VolumeGroup)> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(dev).map_err(|e| Error::io("open", e).path(dev))?;
    let mut head = vec![0u8; 2048];
    f.read_exact_at(&mut head, 0)
        .map_err(|e| Error::io("read label", e).path(dev))?;
    let label = parse_label(&head).map_err(|e| e.path(dev))?;
    let (off, size) = *label
        .mdas
        .first()
        .ok_or_else(|| bad("PV has no metadata area").path(dev))?;
    let mut area = vec![0u8; usize::try_from(size.min(64 << 20)).unwrap_or(0)];
    f.read_exact_at(&mut area, off)
        .map_err(|e| Error::io("read metadata", e).path(dev))?;
    let text = parse_mda(&area).map_err(|e| e.path(dev))?;
    let vg = volume_group(&parse_text(&text)?).map_err(|e| e.path(dev))?;
    Ok((label, vg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const META: &str = r#"
vg0 {
    id = "abc"
    seqno = 7
    extent_size = 8192   # 4 MiB
    physical_volumes {
        pv0 { id = "P0" pe_start = 2048 pe_count = 15 }
        pv1 { id = "P1" pe_start = 2048 pe_count = 15 }
    }
    logical_volumes {
        lin {
            segment_count = 2
            segment1 { start_extent = 0 extent_count = 2 type = "striped" stripe_count = 1 stripes = ["pv0", 3] }
            segment2 { start_extent = 2 extent_count = 1 type = "striped" stripe_count = 1 stripes = ["pv1", 0] }
        }
        str {
            segment1 { start_extent = 0 extent_count = 2 type = "striped" stripe_count = 2 stripe_size = 128
                       stripes = ["pv0", 5, "pv1", 5] }
        }
    }
}
"#;

    #[test]
    fn text_parses_and_maps_linear_and_striped() {
        let vg = volume_group(&parse_text(META).unwrap()).unwrap();
        assert_eq!((vg.seqno, vg.extent_size), (7, 8192));
        let e = 4u64 << 20;
        let (size, lin) = map_lv(&vg, "lin").unwrap();
        assert_eq!(size, 3 * e);
        assert_eq!(
            lin,
            vec![
                (0, 2 * e, "P0".into(), (1 << 20) + 3 * e),
                (2 * e, e, "P1".into(), 1 << 20)
            ]
        );
        let (size, st) = map_lv(&vg, "str").unwrap();
        assert_eq!(size, 2 * e);
        // 64 KiB chunks alternate between the PVs.
        assert_eq!(st[0], (0, 65536, "P0".into(), (1 << 20) + 5 * e));
        assert_eq!(st[1], (65536, 65536, "P1".into(), (1 << 20) + 5 * e));
        assert_eq!(
            st[2],
            (131072, 65536, "P0".into(), (1 << 20) + 5 * e + 65536)
        );
        assert_eq!(st.iter().map(|p| p.1).sum::<u64>(), 2 * e);
        assert!(map_lv(&vg, "nope").is_err());
    }

    #[test]
    fn labels_and_metadata_areas_decode() {
        let mut head = vec![0u8; 2048];
        head[512..520].copy_from_slice(b"LABELONE");
        head[512 + 20..512 + 24].copy_from_slice(&32u32.to_le_bytes());
        head[512 + 24..512 + 32].copy_from_slice(b"LVM2 001");
        head[544..576].copy_from_slice(b"ZfJnv40nncweMmyt7Dwd8dmzTzT8b7ST");
        // data area (1 MiB, 0), end; metadata area (4096, 1 MiB - 4096), end.
        head[584..592].copy_from_slice(&(1u64 << 20).to_le_bytes());
        head[616..624].copy_from_slice(&4096u64.to_le_bytes());
        head[624..632].copy_from_slice(&((1u64 << 20) - 4096).to_le_bytes());
        let l = parse_label(&head).unwrap();
        assert_eq!(l.uuid, "ZfJnv4-0nnc-weMm-yt7D-wd8d-mzTz-T8b7ST");
        assert_eq!(l.mdas, vec![(4096, (1 << 20) - 4096)]);
        assert!(parse_label(&[0u8; 2048]).is_err());
        let mut area = vec![0u8; 8192];
        area[4..20].copy_from_slice(MDA_MAGIC);
        area[32..40].copy_from_slice(&8192u64.to_le_bytes());
        area[40..48].copy_from_slice(&8000u64.to_le_bytes()); // wraps
        area[48..56].copy_from_slice(&300u64.to_le_bytes());
        let text = "x".repeat(192) + &"y".repeat(108);
        area[8000..8192].copy_from_slice(&text.as_bytes()[..192]);
        area[512..620].copy_from_slice(&text.as_bytes()[192..]);
        assert_eq!(parse_mda(&area).unwrap(), text);
    }

    #[test]
    fn a_snapshot_reads_moved_chunks_from_its_cow_store() {
        let meta = META.replace(
            "        str {",
            r#"        cow {
            segment1 { start_extent = 0 extent_count = 1 type = "striped" stripe_count = 1 stripes = ["pv1", 10] }
        }
        snapshot0 {
            segment1 { start_extent = 0 extent_count = 3 type = "snapshot" chunk_size = 8 origin = "lin" cow_store = "cow" }
        }
        str {"#,
        );
        let vg = volume_group(&parse_text(&meta).unwrap()).unwrap();
        assert_eq!(vg.snapshots.get("cow"), Some(&("lin".to_string(), 8)));
        assert!(map_lv(&vg, "snapshot0")
            .unwrap_err()
            .to_string()
            .contains("snapshot"));
        // Chunk 0 is the header, 1 the first metadata area, 2.. data.
        let chunk = 4096u64;
        let mut store = vec![vec![0u8; 4096]; 4];
        store[0][0..4].copy_from_slice(&SNAP_MAGIC.to_le_bytes());
        store[0][4..8].copy_from_slice(&1u32.to_le_bytes());
        store[0][8..12].copy_from_slice(&1u32.to_le_bytes());
        store[0][12..16].copy_from_slice(&8u32.to_le_bytes());
        store[1][0..8].copy_from_slice(&5u64.to_le_bytes()); // origin chunk 5 -> 2
        store[1][8..16].copy_from_slice(&2u64.to_le_bytes());
        let ex = parse_exceptions(|k| {
            Ok(store
                .get(usize::try_from(k).unwrap())
                .cloned()
                .unwrap_or(vec![0; 4096]))
        })
        .unwrap();
        assert_eq!(ex, vec![(5, 2)]);
        let (size, pieces) = map_snapshot(&vg, "cow", &ex).unwrap();
        let (_, origin) = map_lv(&vg, "lin").unwrap();
        assert_eq!(size, 3 * (4 << 20));
        let cow_at = (1u64 << 20) + 10 * (4 << 20) + 2 * chunk;
        assert!(
            pieces.contains(&(5 * chunk, chunk, "P1".into(), cow_at)),
            "{pieces:?}"
        );
        assert_eq!(pieces[0], (0, 5 * chunk, "P0".into(), origin[0].3));
        assert_eq!(pieces.iter().map(|p| p.1).sum::<u64>(), size);
        // An overflowed snapshot is refused.
        store[0][4..8].copy_from_slice(&0u32.to_le_bytes());
        assert!(parse_exceptions(|k| Ok(store[usize::try_from(k).unwrap()].clone())).is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse_label(&bytes);
            let _ = parse_mda(&bytes);
            let _ = parse_text(&String::from_utf8_lossy(&bytes));
        }
    }
}
