//! The emulated storage array: LUNs on sparse files, virtual volumes laid
//! out in chunks across LUNs, copy-on-write snapshots, extent migration,
//! fault injection and a deterministic remap scheduler.
//!
//! Invariants (checked by the tests):
//! - every target (volume or snapshot) maps each of its chunks to exactly
//!   one physical chunk; a physical chunk's reference count is the number of
//!   target chunks mapped to it; free chunks have no references;
//! - a snapshot's bytes never change: when its origin is written, the old
//!   chunk is copied to a new place and the snapshot's map (and generation)
//!   changes instead; a migration copies before it switches;
//! - a target's generation changes whenever its map changes, and its change
//!   log says which chunks changed in which generation;
//! - a freed chunk is scribbled over at once, so a reader that uses a stale
//!   map reads bytes that belong to no image.

use crate::control::{
    ArrayError, ErrorCode, Event, LunInfo, MapExtentInfo, Stats, TargetMap, Trigger,
};
use floe_core::units::{Bytes, DeviceOffset};
use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

/// Allocation and copy-on-write granularity.
pub const CHUNK: u64 = 64 * 1024;
/// The block size the array's maps are expressed in.
pub const BLOCK_SIZE: u32 = 512;

type R<T> = std::result::Result<T, ArrayError>;

fn err(code: ErrorCode, msg: impl Into<String>) -> ArrayError {
    ArrayError {
        code,
        message: msg.into(),
    }
}

/// A small deterministic PRNG (splitmix64): the same seed gives the same
/// layouts, workloads and scribbles on every machine.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, n)` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// Fill a buffer.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Phys {
    lun: usize,
    chunk: u64,
}

#[derive(Clone, Debug)]
struct Fault {
    offset: u64,
    length: u64,
    remaining: Option<u32>,
}

#[derive(Clone, Debug)]
struct Latency {
    offset: u64,
    length: u64,
    delay: Duration,
}

struct Lun {
    name: String,
    /// In the storage pool (volumes and the snapshot reserve allocate from
    /// it); a raw LUN is only ever written through NBD.
    pool: bool,
    wwn: String,
    size: u64,
    path: PathBuf,
    file: File,
    free: BTreeSet<u64>,
    errors: Vec<Fault>,
    disconnects: Vec<Fault>,
    latency: Vec<Latency>,
}

/// What `nbd_read` returns when a fault says to drop the connection.
pub const DISCONNECT: i32 = -1;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    Volume,
    Snapshot { origin: String },
}

struct Target {
    kind: Kind,
    /// Creation order (for `volume@*`, the newest snapshot).
    created: u64,
    map: Vec<Phys>,
    generation: u64,
    /// (generation, chunk) for every chunk whose mapping changed.
    changes: Vec<(u64, u64)>,
}

struct State {
    luns: Vec<Lun>,
    targets: HashMap<String, Target>,
    refs: HashMap<Phys, u32>,
    rng: Rng,
    scribbles: u64,
    created: u64,
}

impl State {
    /// `name`, or for `volume@*` the newest snapshot of that volume.
    fn resolve(&self, name: &str) -> String {
        if let Some(origin) = name.strip_suffix("@*") {
            if let Some((n, _)) = self
                .targets
                .iter()
                .filter(|(_, t)| {
                    t.kind
                        == Kind::Snapshot {
                            origin: origin.to_string(),
                        }
                })
                .max_by_key(|(_, t)| t.created)
            {
                return n.clone();
            }
        }
        name.to_string()
    }

    fn next_created(&mut self) -> u64 {
        self.created += 1;
        self.created
    }
}

struct Schedule {
    events: Vec<(Event, bool)>,
    fired: u64,
}

/// The array.
pub struct Array {
    dir: PathBuf,
    id: String,
    state: RwLock<State>,
    schedule: Mutex<Schedule>,
    reads: AtomicU64,
    bytes_read: AtomicU64,
    queries: AtomicU64,
}

/// What an NBD export reads and writes: one LUN.
#[derive(Clone, Debug)]
pub struct ExportInfo {
    /// Index of the LUN.
    pub lun: usize,
    /// LUN name.
    pub name: String,
    /// LUN WWN.
    pub wwn: String,
    /// Size in bytes.
    pub size: u64,
}

fn wwn_for(array_id: &str, name: &str) -> String {
    let h = blake3::hash(format!("{array_id}/{name}").as_bytes());
    format!("naa.6001405{}", &h.to_hex()[..25])
}

impl Array {
    /// A new array keeping its LUN files in `dir`, seeded for layouts.
    pub fn new(dir: &Path, seed: u64) -> R<Array> {
        std::fs::create_dir_all(dir).map_err(|e| {
            err(
                ErrorCode::Io,
                format!("cannot create array directory {}: {e}", dir.display()),
            )
        })?;
        let id =
            blake3::hash(format!("{}:{seed}:{}", dir.display(), std::process::id()).as_bytes())
                .to_hex()[..16]
                .to_string();
        Ok(Array {
            dir: dir.to_path_buf(),
            id,
            state: RwLock::new(State {
                luns: Vec::new(),
                targets: HashMap::new(),
                refs: HashMap::new(),
                rng: Rng::new(seed),
                scribbles: 0,
                created: 0,
            }),
            schedule: Mutex::new(Schedule {
                events: Vec::new(),
                fired: 0,
            }),
            reads: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            queries: AtomicU64::new(0),
        })
    }

    /// This array's identity (part of every WWN and config id).
    pub fn id(&self) -> &str {
        &self.id
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// `name`, or for `volume@*` the newest snapshot of that volume.
    pub fn resolve(&self, name: &str) -> String {
        self.read_state().resolve(name)
    }

    /// Create a LUN of `size` bytes (a multiple of 64 KiB) on a sparse file.
    pub fn create_lun(&self, name: &str, size: Bytes) -> R<LunInfo> {
        self.create_lun_in(name, size, true)
    }

    /// Create a LUN; `pool` says whether volumes may allocate from it (a raw
    /// LUN is for hosts to write through NBD, e.g. restore targets).
    pub fn create_lun_in(&self, name: &str, size: Bytes, pool: bool) -> R<LunInfo> {
        let size = size.0;
        if name.is_empty() || name.contains('/') {
            return Err(err(ErrorCode::Invalid, format!("bad LUN name {name:?}")));
        }
        if size == 0 || !size.is_multiple_of(CHUNK) {
            return Err(err(
                ErrorCode::Invalid,
                format!("LUN size {size} is not a positive multiple of {CHUNK}"),
            ));
        }
        let mut st = self.write_state();
        if st.luns.iter().any(|l| l.name == name) {
            return Err(err(ErrorCode::Exists, format!("LUN {name} exists")));
        }
        let path = self.dir.join(format!("{name}.lun"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .and_then(|f| f.set_len(size).map(|()| f))
            .map_err(|e| {
                err(
                    ErrorCode::Io,
                    format!("cannot create {}: {e}", path.display()),
                )
            })?;
        let lun = Lun {
            name: name.to_string(),
            pool,
            wwn: wwn_for(&self.id, name),
            size,
            path,
            file,
            free: (0..size / CHUNK).collect(),
            errors: Vec::new(),
            disconnects: Vec::new(),
            latency: Vec::new(),
        };
        let info = lun_info(&lun);
        st.luns.push(lun);
        Ok(info)
    }

    /// Every LUN.
    pub fn luns(&self) -> Vec<LunInfo> {
        self.read_state().luns.iter().map(lun_info).collect()
    }

    /// The export for an NBD export name (LUN name or WWN; "" = first LUN).
    pub fn export(&self, name: &str) -> Option<ExportInfo> {
        let st = self.read_state();
        st.luns
            .iter()
            .enumerate()
            .find(|(_, l)| l.name == name || l.wwn == name || (name.is_empty()))
            .map(|(i, l)| ExportInfo {
                lun: i,
                name: l.name.clone(),
                wwn: l.wwn.clone(),
                size: l.size,
            })
    }

    /// Create a volume of `size` bytes, laid out in runs of up to
    /// `max_run` chunks on LUNs chosen by the seeded generator (from `luns`,
    /// or all LUNs).
    pub fn create_volume(
        &self,
        name: &str,
        size: Bytes,
        max_run: u64,
        luns: Option<&[String]>,
    ) -> R<TargetMap> {
        let size = size.0;
        if size == 0 || !size.is_multiple_of(CHUNK) {
            return Err(err(
                ErrorCode::Invalid,
                format!("volume size {size} is not a positive multiple of {CHUNK}"),
            ));
        }
        let mut st = self.write_state();
        if st.targets.contains_key(name) {
            return Err(err(ErrorCode::Exists, format!("volume {name} exists")));
        }
        let allowed: Vec<usize> = match luns {
            None => (0..st.luns.len()).filter(|&i| st.luns[i].pool).collect(),
            Some(names) => names
                .iter()
                .map(|n| {
                    let i = st
                        .luns
                        .iter()
                        .position(|l| &l.name == n)
                        .ok_or_else(|| err(ErrorCode::NotFound, format!("no LUN {n}")))?;
                    if !st.luns[i].pool {
                        return Err(err(
                            ErrorCode::Invalid,
                            format!("LUN {n} is raw, not in the pool"),
                        ));
                    }
                    Ok(i)
                })
                .collect::<R<_>>()?,
        };
        let chunks = size / CHUNK;
        let free: u64 = allowed.iter().map(|&i| st.luns[i].free.len() as u64).sum();
        if free < chunks {
            return Err(err(
                ErrorCode::NoSpace,
                format!("volume {name} needs {chunks} chunks, {free} free"),
            ));
        }
        let mut map = Vec::with_capacity(usize::try_from(chunks).unwrap_or(0));
        while (map.len() as u64) < chunks {
            let run = 1 + st.rng.below(max_run.max(1));
            let candidates: Vec<usize> = allowed
                .iter()
                .copied()
                .filter(|&i| !st.luns[i].free.is_empty())
                .collect();
            let lun =
                candidates[usize::try_from(st.rng.below(candidates.len() as u64)).unwrap_or(0)];
            let want = run.min(chunks - map.len() as u64);
            for c in take_run(&mut st.luns[lun].free, want) {
                map.push(Phys { lun, chunk: c });
            }
        }
        for p in &map {
            *st.refs.entry(*p).or_insert(0) += 1;
        }
        let created = st.next_created();
        st.targets.insert(
            name.to_string(),
            Target {
                kind: Kind::Volume,
                created,
                map,
                generation: 1,
                changes: Vec::new(),
            },
        );
        Ok(target_map(&st, name))
    }

    fn alloc(st: &mut State) -> R<Phys> {
        let candidates: Vec<usize> = (0..st.luns.len())
            .filter(|&i| st.luns[i].pool && !st.luns[i].free.is_empty())
            .collect();
        if candidates.is_empty() {
            return Err(err(
                ErrorCode::NoSpace,
                "snapshot reserve exhausted: no free chunk",
            ));
        }
        let lun = candidates[usize::try_from(st.rng.below(candidates.len() as u64)).unwrap_or(0)];
        let chunk = st.luns[lun].free.pop_first().unwrap_or(0);
        Ok(Phys { lun, chunk })
    }

    fn copy_chunk(st: &State, from: Phys, to: Phys) -> R<()> {
        let mut buf = vec![0u8; usize::try_from(CHUNK).unwrap_or(0)];
        let a = &st.luns[from.lun];
        a.file
            .read_exact_at(&mut buf, from.chunk * CHUNK)
            .map_err(|e| err(ErrorCode::Io, format!("copy read {}: {e}", a.name)))?;
        let b = &st.luns[to.lun];
        b.file
            .write_all_at(&buf, to.chunk * CHUNK)
            .map_err(|e| err(ErrorCode::Io, format!("copy write {}: {e}", b.name)))
    }

    fn release(st: &mut State, p: Phys) -> R<()> {
        let n = st.refs.get_mut(&p).map(|n| {
            *n -= 1;
            *n
        });
        if n == Some(0) {
            st.refs.remove(&p);
            // Scribble: a stale map pointing here now reads garbage.
            st.scribbles += 1;
            let mut buf = vec![0u8; usize::try_from(CHUNK).unwrap_or(0)];
            Rng::new(0xdead_0000 ^ st.scribbles).fill(&mut buf);
            let lun = &mut st.luns[p.lun];
            lun.file
                .write_all_at(&buf, p.chunk * CHUNK)
                .map_err(|e| err(ErrorCode::Io, format!("scribble {}: {e}", lun.name)))?;
            lun.free.insert(p.chunk);
        }
        Ok(())
    }

    fn target<'a>(st: &'a State, name: &str) -> R<&'a Target> {
        st.targets
            .get(name)
            .ok_or_else(|| err(ErrorCode::NotFound, format!("no volume or snapshot {name}")))
    }

    fn check_range(t: &Target, name: &str, offset: u64, length: u64) -> R<()> {
        let size = t.map.len() as u64 * CHUNK;
        if offset.checked_add(length).is_none_or(|e| e > size) {
            return Err(err(
                ErrorCode::Invalid,
                format!("range {offset}+{length} is outside {name} ({size} bytes)"),
            ));
        }
        Ok(())
    }

    /// Write `data` to a volume at `offset`, copying chunks shared with
    /// snapshots to the reserve first (and remapping those snapshots).
    pub fn write(&self, target: &str, offset: DeviceOffset, data: &[u8]) -> R<()> {
        let mut st = self.write_state();
        Self::write_locked(&mut st, target, offset.0, data)
    }

    fn write_locked(st: &mut State, name: &str, offset: u64, data: &[u8]) -> R<()> {
        let t = Self::target(st, name)?;
        if t.kind != Kind::Volume {
            return Err(err(
                ErrorCode::Invalid,
                format!("{name} is a snapshot: snapshots are read-only"),
            ));
        }
        Self::check_range(t, name, offset, data.len() as u64)?;
        let end = offset + data.len() as u64;
        let mut bumped: BTreeSet<String> = BTreeSet::new();
        for c in offset / CHUNK..end.div_ceil(CHUNK) {
            let ci = usize::try_from(c).unwrap_or(0);
            let old = st.targets[name].map[ci];
            if st.refs.get(&old).copied().unwrap_or(0) > 1 {
                let new = Self::alloc(st)?;
                Self::copy_chunk(st, old, new)?;
                let sharers: Vec<String> = st
                    .targets
                    .iter()
                    .filter(|(n, t)| n.as_str() != name && t.map.get(ci) == Some(&old))
                    .map(|(n, _)| n.clone())
                    .collect();
                for s in sharers {
                    let t = st.targets.get_mut(&s).expect("sharer exists");
                    if bumped.insert(s.clone()) {
                        t.generation += 1;
                    }
                    let g = t.generation;
                    t.map[ci] = new;
                    t.changes.push((g, c));
                    *st.refs.get_mut(&old).expect("shared chunk has refs") -= 1;
                    *st.refs.entry(new).or_insert(0) += 1;
                }
            }
        }
        // Now every touched chunk belongs to the volume alone: write in place.
        let t = &st.targets[name];
        let mut pos = offset;
        while pos < end {
            let c = pos / CHUNK;
            let within = pos % CHUNK;
            let n = (CHUNK - within).min(end - pos);
            let p = t.map[usize::try_from(c).unwrap_or(0)];
            let lun = &st.luns[p.lun];
            let s = usize::try_from(pos - offset).unwrap_or(0);
            lun.file
                .write_all_at(
                    &data[s..s + usize::try_from(n).unwrap_or(0)],
                    p.chunk * CHUNK + within,
                )
                .map_err(|e| err(ErrorCode::Io, format!("write {}: {e}", lun.name)))?;
            pos += n;
        }
        Ok(())
    }

    /// Write `length` pseudo-random bytes from `seed` at `offset`.
    pub fn write_pattern(
        &self,
        target: &str,
        offset: DeviceOffset,
        length: Bytes,
        seed: u64,
    ) -> R<()> {
        let mut buf =
            vec![0u8; usize::try_from(length.0).map_err(|_| err(ErrorCode::Invalid, "too long"))?];
        Rng::new(seed).fill(&mut buf);
        self.write(target, offset, &buf)
    }

    /// `writes` random writes of up to `max_length` bytes (512-aligned).
    pub fn workload(&self, target: &str, seed: u64, writes: u32, max_length: Bytes) -> R<()> {
        let size = self.size(target)?;
        let mut rng = Rng::new(seed);
        let sectors = size / 512;
        for _ in 0..writes {
            let len = (1 + rng.below(max_length.0.max(512) / 512)).min(sectors);
            let off = rng.below(sectors - len + 1);
            let s = rng.next_u64();
            self.write_pattern(target, DeviceOffset(off * 512), Bytes(len * 512), s)?;
        }
        Ok(())
    }

    /// A target's size in bytes.
    pub fn size(&self, target: &str) -> R<u64> {
        let st = self.read_state();
        Ok(Self::target(&st, target)?.map.len() as u64 * CHUNK)
    }

    /// Read a target's bytes through its current map.
    pub fn read(&self, target: &str, offset: DeviceOffset, length: Bytes) -> R<Vec<u8>> {
        let st = self.read_state();
        let t = Self::target(&st, target)?;
        let (offset, length) = (offset.0, length.0);
        Self::check_range(t, target, offset, length)?;
        let mut out =
            vec![0u8; usize::try_from(length).map_err(|_| err(ErrorCode::Invalid, "too long"))?];
        let mut pos = offset;
        while pos < offset + length {
            let within = pos % CHUNK;
            let n = (CHUNK - within).min(offset + length - pos);
            let p = t.map[usize::try_from(pos / CHUNK).unwrap_or(0)];
            let s = usize::try_from(pos - offset).unwrap_or(0);
            let lun = &st.luns[p.lun];
            lun.file
                .read_exact_at(
                    &mut out[s..s + usize::try_from(n).unwrap_or(0)],
                    p.chunk * CHUNK + within,
                )
                .map_err(|e| err(ErrorCode::Io, format!("read {}: {e}", lun.name)))?;
            pos += n;
        }
        Ok(out)
    }

    /// BLAKE3 of a target's bytes (all of them by default).
    pub fn checksum(
        &self,
        target: &str,
        offset: Option<DeviceOffset>,
        length: Option<Bytes>,
    ) -> R<String> {
        let size = self.size(target)?;
        let off = offset.map_or(0, |o| o.0);
        let len = length.map_or(size.saturating_sub(off), |l| l.0);
        let mut h = blake3::Hasher::new();
        let mut pos = off;
        while pos < off + len {
            let n = (8 * 1024 * 1024).min(off + len - pos);
            h.update(&self.read(target, DeviceOffset(pos), Bytes(n))?);
            pos += n;
        }
        Ok(h.finalize().to_hex().to_string())
    }

    /// Snapshot several volumes at one instant (a consistency group).
    pub fn snapshot(&self, volumes: &[String], suffix: &str) -> R<Vec<String>> {
        let mut st = self.write_state();
        let mut names = Vec::new();
        for v in volumes {
            let t = Self::target(&st, v)?;
            if t.kind != Kind::Volume {
                return Err(err(ErrorCode::Invalid, format!("{v} is not a volume")));
            }
            let name = format!("{v}@{suffix}");
            if st.targets.contains_key(&name) {
                return Err(err(ErrorCode::Exists, format!("snapshot {name} exists")));
            }
            names.push(name);
        }
        for (v, name) in volumes.iter().zip(&names) {
            let map = st.targets[v].map.clone();
            for p in &map {
                *st.refs.entry(*p).or_insert(0) += 1;
            }
            let created = st.next_created();
            st.targets.insert(
                name.clone(),
                Target {
                    kind: Kind::Snapshot { origin: v.clone() },
                    created,
                    map,
                    generation: 1,
                    changes: Vec::new(),
                },
            );
        }
        Ok(names)
    }

    /// Delete a volume or snapshot; chunks no one maps are freed.
    pub fn delete(&self, name: &str) -> R<()> {
        let mut st = self.write_state();
        if let Some(dep) = st.targets.iter().find(|(_, t)| {
            t.kind
                == Kind::Snapshot {
                    origin: name.to_string(),
                }
        }) {
            return Err(err(
                ErrorCode::Busy,
                format!("volume {name} has snapshot {}", dep.0),
            ));
        }
        let t = st
            .targets
            .remove(name)
            .ok_or_else(|| err(ErrorCode::NotFound, format!("no volume or snapshot {name}")))?;
        for p in t.map {
            Self::release(&mut st, p)?;
        }
        Ok(())
    }

    /// Move a range of a target's chunks elsewhere: copy, switch, bump the
    /// generation, scribble the old place if nothing else maps it.
    pub fn migrate(&self, target: &str, offset: DeviceOffset, length: Bytes) -> R<u64> {
        let mut st = self.write_state();
        Self::migrate_locked(&mut st, target, offset.0, length.0)
    }

    fn migrate_locked(st: &mut State, name: &str, offset: u64, length: u64) -> R<u64> {
        let t = Self::target(st, name)?;
        Self::check_range(t, name, offset, length.max(1))?;
        let first = offset / CHUNK;
        let last = (offset + length.max(1)).div_ceil(CHUNK);
        let g = t.generation + 1;
        for c in first..last {
            let ci = usize::try_from(c).unwrap_or(0);
            let old = st.targets[name].map[ci];
            let new = Self::alloc(st)?;
            Self::copy_chunk(st, old, new)?;
            *st.refs.entry(new).or_insert(0) += 1;
            let t = st.targets.get_mut(name).expect("checked");
            t.map[ci] = new;
            t.changes.push((g, c));
            Self::release(st, old)?;
        }
        st.targets.get_mut(name).expect("checked").generation = g;
        Ok(g)
    }

    /// The current map and generation of a target, coalesced into extents.
    pub fn map(&self, target: &str) -> R<TargetMap> {
        let st = self.read_state();
        Self::target(&st, target)?;
        Ok(target_map(&st, target))
    }

    /// The generation of a target (a config query: counted, may fire events).
    pub fn generation(&self, target: &str) -> R<u64> {
        self.on_query();
        let st = self.read_state();
        Ok(Self::target(&st, target)?.generation)
    }

    /// The extents of a target whose mapping changed after generation
    /// `since` (a config query: counted, may fire events). When nothing
    /// changed, `extents` is empty.
    pub fn remap(&self, target: &str, since: u64) -> R<TargetMap> {
        self.on_query();
        let st = self.read_state();
        let t = Self::target(&st, target)?;
        if since > t.generation {
            return Err(err(
                ErrorCode::Invalid,
                format!("{target} is at generation {}, not {since}", t.generation),
            ));
        }
        let changed: BTreeSet<u64> = t
            .changes
            .iter()
            .filter(|(g, _)| *g > since)
            .map(|(_, c)| *c)
            .collect();
        let mut m = target_map(&st, target);
        m.extents = coalesce(&st, t, changed.into_iter());
        Ok(m)
    }

    /// Make reads of `[offset, offset+length)` of a LUN fail with EIO
    /// (`count` times, or until cleared).
    pub fn inject_error(
        &self,
        lun: &str,
        offset: DeviceOffset,
        length: Bytes,
        count: Option<u32>,
    ) -> R<()> {
        self.add_fault(lun, |l| &mut l.errors, offset, length, count)
    }

    /// Drop the NBD connection of reads of `[offset, offset+length)` of a
    /// LUN (`count` times, or until cleared), as a flaky SAN path would.
    pub fn inject_disconnect(
        &self,
        lun: &str,
        offset: DeviceOffset,
        length: Bytes,
        count: Option<u32>,
    ) -> R<()> {
        self.add_fault(lun, |l| &mut l.disconnects, offset, length, count)
    }

    fn add_fault(
        &self,
        lun: &str,
        list: impl FnOnce(&mut Lun) -> &mut Vec<Fault>,
        offset: DeviceOffset,
        length: Bytes,
        count: Option<u32>,
    ) -> R<()> {
        let mut st = self.write_state();
        list(lun_mut(&mut st, lun)?).push(Fault {
            offset: offset.0,
            length: length.0,
            remaining: count,
        });
        Ok(())
    }

    /// Delay reads of a LUN range.
    pub fn inject_latency(
        &self,
        lun: &str,
        offset: DeviceOffset,
        length: Bytes,
        delay: Duration,
    ) -> R<()> {
        let mut st = self.write_state();
        let l = lun_mut(&mut st, lun)?;
        l.latency.push(Latency {
            offset: offset.0,
            length: length.0,
            delay,
        });
        Ok(())
    }

    /// Remove every fault.
    pub fn clear_faults(&self) {
        let mut st = self.write_state();
        for l in &mut st.luns {
            l.errors.clear();
            l.disconnects.clear();
            l.latency.clear();
        }
    }

    /// Replace the schedule and reset the counters it triggers on.
    pub fn set_schedule(&self, events: Vec<Event>) {
        let mut s = self.schedule.lock().unwrap_or_else(|p| p.into_inner());
        s.events = events.into_iter().map(|e| (e, false)).collect();
        s.fired = 0;
        self.reads.store(0, Ordering::SeqCst);
        self.bytes_read.store(0, Ordering::SeqCst);
        self.queries.store(0, Ordering::SeqCst);
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        let s = self.schedule.lock().unwrap_or_else(|p| p.into_inner());
        Stats {
            reads: self.reads.load(Ordering::SeqCst),
            bytes_read: Bytes(self.bytes_read.load(Ordering::SeqCst)),
            queries: self.queries.load(Ordering::SeqCst),
            events_fired: s.fired,
            events_pending: s.events.iter().filter(|(_, f)| !f).count() as u64,
        }
    }

    fn fire(&self, pred: impl Fn(&Trigger) -> bool) {
        let due: Vec<Event> = {
            let mut s = self.schedule.lock().unwrap_or_else(|p| p.into_inner());
            let mut due = Vec::new();
            for (e, fired) in &mut s.events {
                if !*fired && pred(&e.trigger) {
                    *fired = true;
                    due.push(e.clone());
                }
            }
            s.fired += due.len() as u64;
            due
        };
        for e in due {
            let mut st = self.write_state();
            // A scheduled action that cannot run (e.g. range outside a
            // deleted snapshot) is skipped: the schedule is a workload, not
            // a contract.
            let _ = match e.action {
                crate::control::Action::Migrate {
                    target,
                    offset,
                    length,
                } => {
                    let target = st.resolve(&target);
                    Self::migrate_locked(&mut st, &target, offset.0, length.0).map(|_| ())
                }
                crate::control::Action::Write {
                    target,
                    offset,
                    length,
                    seed,
                } => {
                    let mut buf = vec![0u8; usize::try_from(length.0).unwrap_or(0)];
                    Rng::new(seed).fill(&mut buf);
                    Self::write_locked(&mut st, &target, offset.0, &buf)
                }
            };
        }
    }

    fn on_query(&self) {
        let n = self.queries.fetch_add(1, Ordering::SeqCst) + 1;
        self.fire(|t| matches!(t, Trigger::BeforeQuery(k) if *k == n));
    }

    /// Serve an NBD read of a LUN: faults, latency, the scheduler's
    /// before/after-read events, and the read itself.
    pub fn nbd_read(
        &self,
        lun: usize,
        offset: u64,
        buf: &mut [u8],
    ) -> std::result::Result<(), i32> {
        let n = self.reads.fetch_add(1, Ordering::SeqCst) + 1;
        self.fire(|t| matches!(t, Trigger::BeforeRead(k) if *k == n));
        let len = buf.len() as u64;
        let delay = {
            let mut st = self.write_state();
            let l = st.luns.get_mut(lun).ok_or(libc::ENXIO)?;
            if offset.checked_add(len).is_none_or(|e| e > l.size) {
                return Err(libc::EINVAL);
            }
            let overlaps = |o: u64, l2: u64| o < offset + len && offset < o + l2;
            let hit = |faults: &mut Vec<Fault>| {
                let mut any = false;
                for f in faults.iter_mut() {
                    if overlaps(f.offset, f.length) && f.remaining != Some(0) {
                        any = true;
                        if let Some(r) = &mut f.remaining {
                            *r -= 1;
                        }
                    }
                }
                any
            };
            if hit(&mut l.disconnects) {
                return Err(DISCONNECT);
            }
            if hit(&mut l.errors) {
                return Err(libc::EIO);
            }
            l.latency
                .iter()
                .filter(|x| overlaps(x.offset, x.length))
                .map(|x| x.delay)
                .max()
        };
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        {
            let st = self.read_state();
            st.luns[lun]
                .file
                .read_exact_at(buf, offset)
                .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        }
        self.bytes_read.fetch_add(len, Ordering::Relaxed);
        self.fire(|t| matches!(t, Trigger::AfterRead(k) if *k == n));
        Ok(())
    }

    /// Serve an NBD write to a LUN.
    pub fn nbd_write(&self, lun: usize, offset: u64, data: &[u8]) -> std::result::Result<(), i32> {
        let st = self.write_state();
        let l = st.luns.get(lun).ok_or(libc::ENXIO)?;
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > l.size)
        {
            return Err(libc::ENOSPC);
        }
        l.file
            .write_all_at(data, offset)
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
    }

    /// Flush a LUN's file.
    pub fn nbd_flush(&self, lun: usize) -> std::result::Result<(), i32> {
        let st = self.read_state();
        let l = st.luns.get(lun).ok_or(libc::ENXIO)?;
        l.file
            .sync_data()
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
    }

    /// Check the reference counts against the maps (for tests).
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let st = self.read_state();
        let mut counted: HashMap<Phys, u32> = HashMap::new();
        for t in st.targets.values() {
            for p in &t.map {
                *counted.entry(*p).or_insert(0) += 1;
            }
        }
        if counted != st.refs {
            return Err("reference counts disagree with the maps".into());
        }
        for p in counted.keys() {
            if st.luns[p.lun].free.contains(&p.chunk) {
                return Err(format!(
                    "chunk {} of LUN {} is mapped and free",
                    p.chunk, p.lun
                ));
            }
        }
        Ok(())
    }

    /// The backing file of a LUN (for local O_DIRECT reads in benchmarks).
    pub fn lun_path(&self, name: &str) -> Option<PathBuf> {
        self.read_state()
            .luns
            .iter()
            .find(|l| l.name == name || l.wwn == name)
            .map(|l| l.path.clone())
    }
}

fn lun_mut<'a>(st: &'a mut State, name: &str) -> R<&'a mut Lun> {
    st.luns
        .iter_mut()
        .find(|l| l.name == name || l.wwn == name)
        .ok_or_else(|| err(ErrorCode::NotFound, format!("no LUN {name}")))
}

fn lun_info(l: &Lun) -> LunInfo {
    LunInfo {
        name: l.name.clone(),
        wwn: l.wwn.clone(),
        size: Bytes(l.size),
        path: l.path.clone(),
        free: Bytes(l.free.len() as u64 * CHUNK),
        pool: l.pool,
    }
}

fn take_run(free: &mut BTreeSet<u64>, want: u64) -> Vec<u64> {
    // First fit for a contiguous run; otherwise whatever comes first.
    let mut start = None;
    let mut prev = None;
    let mut len = 0;
    for &c in free.iter() {
        if prev.map(|p: u64| p + 1) == Some(c) {
            len += 1;
        } else {
            start = Some(c);
            len = 1;
        }
        prev = Some(c);
        if len == want {
            break;
        }
    }
    let run: Vec<u64> = if len == want {
        let s = start.unwrap_or(0);
        (s..s + want).collect()
    } else {
        free.iter()
            .copied()
            .take(usize::try_from(want).unwrap_or(0))
            .collect()
    };
    for c in &run {
        free.remove(c);
    }
    run
}

fn coalesce(st: &State, t: &Target, chunks: impl Iterator<Item = u64>) -> Vec<MapExtentInfo> {
    let mut out: Vec<MapExtentInfo> = Vec::new();
    for c in chunks {
        let p = t.map[usize::try_from(c).unwrap_or(0)];
        let lun = &st.luns[p.lun];
        if let Some(last) = out.last_mut() {
            if last.offset.0 + last.length.0 == c * CHUNK
                && last.lun == lun.name
                && last.lun_offset.0 + last.length.0 == p.chunk * CHUNK
            {
                last.length.0 += CHUNK;
                continue;
            }
        }
        out.push(MapExtentInfo {
            offset: DeviceOffset(c * CHUNK),
            length: Bytes(CHUNK),
            lun: lun.name.clone(),
            wwn: lun.wwn.clone(),
            lun_offset: DeviceOffset(p.chunk * CHUNK),
        });
    }
    out
}

fn target_map(st: &State, name: &str) -> TargetMap {
    let t = &st.targets[name];
    TargetMap {
        target: name.to_string(),
        origin: match &t.kind {
            Kind::Volume => None,
            Kind::Snapshot { origin } => Some(origin.clone()),
        },
        size: Bytes(t.map.len() as u64 * CHUNK),
        generation: t.generation,
        block_size: BLOCK_SIZE,
        extents: coalesce(st, t, 0..t.map.len() as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn array(luns: usize) -> (tempfile::TempDir, Array) {
        let dir = tempfile::tempdir().unwrap();
        let a = Array::new(dir.path(), 1).unwrap();
        for i in 0..luns {
            a.create_lun(&format!("lun{i}"), Bytes(16 << 20)).unwrap();
        }
        (dir, a)
    }

    fn all(a: &Array, t: &str) -> Vec<u8> {
        a.read(t, DeviceOffset(0), Bytes(a.size(t).unwrap()))
            .unwrap()
    }

    #[test]
    fn writing_the_origin_remaps_the_snapshot_and_keeps_its_bytes() {
        let (_d, a) = array(2);
        a.create_volume("v", Bytes(1 << 20), 4, None).unwrap();
        a.workload("v", 1, 50, Bytes(65536)).unwrap();
        let before = all(&a, "v");
        let snap = a.snapshot(&["v".into()], "s").unwrap().remove(0);
        let m0 = a.map(&snap).unwrap();
        a.write_pattern("v", DeviceOffset(100_000), Bytes(70_000), 9)
            .unwrap();
        let m1 = a.map(&snap).unwrap();
        assert_eq!(m1.generation, 2, "one write, one new generation");
        assert_ne!(m0.extents, m1.extents);
        assert_eq!(all(&a, &snap), before, "snapshot bytes never change");
        assert_ne!(all(&a, "v"), before);
        let changed = a.remap(&snap, 1).unwrap();
        let covered: u64 = changed.extents.iter().map(|e| e.length.0).sum();
        assert_eq!(
            covered,
            2 * CHUNK,
            "bytes 100000..170000 touch chunks 1 and 2"
        );
        assert!(a.remap(&snap, 2).unwrap().extents.is_empty());
        a.check_invariants().unwrap();
    }

    #[test]
    fn migration_copies_switches_and_scribbles_the_old_place() {
        let (_d, a) = array(1);
        a.create_volume("v", Bytes(4 * CHUNK), 4, None).unwrap();
        a.write_pattern("v", DeviceOffset(0), Bytes(4 * CHUNK), 3)
            .unwrap();
        let before = all(&a, "v");
        let old = a.map("v").unwrap().extents[0].clone();
        assert_eq!(
            a.migrate("v", DeviceOffset(CHUNK), Bytes(CHUNK)).unwrap(),
            2
        );
        assert_eq!(all(&a, "v"), before);
        let path = a.lun_path("lun0").unwrap();
        let f = File::open(path).unwrap();
        let mut buf = vec![0u8; usize::try_from(CHUNK).unwrap()];
        f.read_exact_at(&mut buf, old.lun_offset.0 + CHUNK).unwrap();
        assert_ne!(
            &buf[..],
            &before[usize::try_from(CHUNK).unwrap()..usize::try_from(2 * CHUNK).unwrap()],
            "the old place was scribbled"
        );
        a.check_invariants().unwrap();
    }

    #[test]
    fn raw_luns_are_never_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let a = Array::new(dir.path(), 1).unwrap();
        a.create_lun_in("raw", Bytes(16 << 20), false).unwrap();
        let e = a.create_volume("v", Bytes(CHUNK), 1, None).unwrap_err();
        assert_eq!(e.code, ErrorCode::NoSpace);
        a.create_lun("pool", Bytes(CHUNK * 2)).unwrap();
        a.create_volume("v", Bytes(CHUNK), 1, None).unwrap();
        assert!(a.map("v").unwrap().extents.iter().all(|e| e.lun == "pool"));
    }

    #[test]
    fn injected_latency_delays_reads_of_its_range_only() {
        let (_d, a) = array(1);
        a.inject_latency(
            "lun0",
            DeviceOffset(8192),
            Bytes(4096),
            Duration::from_micros(30_000),
        )
        .unwrap();
        let mut buf = vec![0u8; 4096];
        let t = std::time::Instant::now();
        assert_eq!(a.nbd_read(0, 8192, &mut buf), Ok(()));
        assert!(
            t.elapsed() >= Duration::from_millis(30),
            "{:?}",
            t.elapsed()
        );
        a.clear_faults();
        let t = std::time::Instant::now();
        assert_eq!(a.nbd_read(0, 8192, &mut buf), Ok(()));
        assert!(
            t.elapsed() < Duration::from_millis(30),
            "cleared: {:?}",
            t.elapsed()
        );
    }

    #[test]
    fn injected_errors_fail_reads_of_their_range_only() {
        let (_d, a) = array(1);
        a.inject_error("lun0", DeviceOffset(8192), Bytes(4096), Some(1))
            .unwrap();
        let mut buf = vec![0u8; 4096];
        assert_eq!(a.nbd_read(0, 0, &mut buf), Ok(()));
        assert_eq!(a.nbd_read(0, 8192, &mut buf), Err(libc::EIO));
        assert_eq!(a.nbd_read(0, 8192, &mut buf), Ok(()), "count=1 fails once");
        assert_eq!(a.nbd_read(0, 16 << 20, &mut buf), Err(libc::EINVAL));
    }

    proptest! {
        /// Any sequence of writes, snapshots, migrations and deletions keeps
        /// every snapshot's bytes, and the reference counts right.
        #[test]
        fn snapshots_never_change(ops in proptest::collection::vec((0u8..4, 0u64..16, 1u64..8, any::<u64>()), 1..40)) {
            let (_d, a) = array(2);
            a.create_volume("v", Bytes(16 * CHUNK), 3, None).unwrap();
            a.workload("v", 7, 20, Bytes(CHUNK)).unwrap();
            let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
            for (i, (op, at, len, seed)) in ops.into_iter().enumerate() {
                let len = len.min(16 - at);
                match op {
                    0 => {
                        let name = a.snapshot(&["v".into()], &i.to_string()).unwrap().remove(0);
                        snaps.push((name.clone(), all(&a, &name)));
                    }
                    1 => a.write_pattern("v", DeviceOffset(at * CHUNK + 512), Bytes(len * CHUNK - 512), seed).unwrap(),
                    2 => if let Some((s, _)) = snaps.get(usize::try_from(seed % 4).unwrap()) {
                        a.migrate(s, DeviceOffset(at * CHUNK), Bytes(len * CHUNK)).unwrap();
                    },
                    _ => if !snaps.is_empty() && seed % 3 == 0 {
                        let (s, _) = snaps.remove(0);
                        a.delete(&s).unwrap();
                    },
                }
                for (s, bytes) in &snaps {
                    prop_assert!(&all(&a, s) == bytes, "snapshot {} changed", s);
                }
                prop_assert_eq!(a.check_invariants(), Ok(()));
            }
        }
    }
}
