//! The mover engine (backup host): the algorithm of the design brief.
//!
//! For every window of every item:
//! 1. check the config id with the agent; if it changed, ask for a remap
//!    and apply only the changed extents;
//! 2. read the window's extents from the shared devices (O_DIRECT or NBD),
//!    in physical order, coalesced, several reads in flight;
//! 3. check the config id again, after the read; if it changed, the bytes
//!    may be stale: discard them, remap, and go back to 2;
//! 4. hand the window to the media writer, which hashes and writes it.
//!
//! Reading (1–3) runs on its own thread, one window ahead of writing (4).
//! The set is committed only after every item ended; any error aborts the
//! set, so nothing partial is ever recorded as complete.

use crate::abi::{MediaReader, MediaWriter};
use crate::agent::AgentClient;
use crate::device::{DeviceResolver, RestoreTarget};
use crate::error::{Error, ErrorKind, Result};
use crate::map::{apply_remap, validate_item};
use crate::model::{
    now_secs, ExtentKind, FrozenImage, ImageMap, Item, ItemHeader, ItemId, ItemTrailer, MapExtent,
    SetHeader, SetId, SetRecord,
};
use crate::plan::{plan_window, windows, DeviceRead, Fill, PlanOptions};
use crate::sys::{AlignedBuf, ALIGN};
use crate::units::{Bytes, DeviceOffset, ItemOffset};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Mutex;

/// How the mover works. The CLI flattens these (`floe backup --help`).
#[derive(Clone, Debug)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct MoverOptions {
    /// Bytes of an item read and verified as one portion.
    #[cfg_attr(feature = "cli", arg(long, default_value = "16M"))]
    pub window: Bytes,
    /// Device reads in flight at once.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 4))]
    pub parallel: usize,
    /// Remaps of one portion before the backup fails as unstable.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 32))]
    pub max_remaps: u32,
    /// Merge reads of one device whose gap is at most this (the gap is read
    /// and discarded).
    #[cfg_attr(feature = "cli", arg(long, default_value = "64K"))]
    pub coalesce_gap: Bytes,
    /// Longest single device read.
    #[cfg_attr(feature = "cli", arg(long, default_value = "2M"))]
    pub max_read: Bytes,
    /// Check the config id again after each read. Only tests that prove the
    /// check matters turn it off.
    #[cfg_attr(feature = "cli", arg(skip = true))]
    pub recheck_after_read: bool,
    /// A label for the set.
    #[cfg_attr(feature = "cli", arg(long, default_value = ""))]
    pub label: String,
}

impl Default for MoverOptions {
    fn default() -> Self {
        MoverOptions {
            window: Bytes(16 * 1024 * 1024),
            parallel: 4,
            max_remaps: 32,
            coalesce_gap: Bytes(64 * 1024),
            max_read: Bytes(2 * 1024 * 1024),
            recheck_after_read: true,
            label: String::new(),
        }
    }
}

impl MoverOptions {
    /// How reads are shaped.
    pub fn plan(&self) -> PlanOptions {
        PlanOptions { align: ALIGN as u64, coalesce_gap: self.coalesce_gap.0, max_read: self.max_read.0.max(ALIGN as u64) }
    }
}

/// What the mover reports while it works.
#[derive(Clone, Debug)]
pub enum Progress {
    /// The image is frozen and mapped.
    Frozen {
        /// Items.
        items: usize,
        /// Their total size.
        bytes: Bytes,
    },
    /// An item was finished after its map changed under the mover.
    Remapped {
        /// The item.
        item: ItemId,
        /// Remaps applied to it.
        remaps: u32,
    },
    /// Bytes of an item are on media.
    Written {
        /// The item.
        item: ItemId,
        /// Bytes of this item written so far.
        done: Bytes,
        /// Its size.
        size: Bytes,
    },
}

/// What a backup did.
#[derive(Clone, Debug)]
pub struct BackupReport {
    /// The committed set.
    pub set: SetRecord,
    /// Remaps applied.
    pub remaps: u32,
    /// Windows read again because the check after the read failed.
    pub rereads: u32,
    /// Bytes read from devices (aligned, with gaps).
    pub bytes_read: u64,
    /// Bytes of items written to media.
    pub bytes_written: u64,
}

#[derive(Default)]
struct Counters {
    remaps: u32,
    rereads: u32,
    bytes_read: u64,
}

enum Msg {
    Begin(ItemHeader),
    Window(AlignedBuf, usize),
    End { config: crate::model::ConfigId, remaps: u32 },
    Done(Counters),
    Failed(Error),
}

/// Check every data extent against its device: resolvable, and inside it.
pub fn check_devices(item: &Item, extents: &[MapExtent], resolver: &DeviceResolver) -> Result<()> {
    for e in extents {
        if let ExtentKind::Data(c) = &e.kind {
            let p = &c.physical;
            let dev = resolver.resolve(&p.device).map_err(|err| err.item(&item.id))?;
            let start = p.block_size.offset(p.start).unwrap_or(DeviceOffset(u64::MAX));
            let len = p.block_size.bytes(p.count).unwrap_or(Bytes(u64::MAX));
            if start.0.checked_add(len.0).is_none_or(|end| end > dev.size().0) {
                return Err(Error::new(
                    ErrorKind::ExtentOutOfRange,
                    format!(
                        "extent reaches past the end of the device ({} bytes at {})",
                        dev.size(),
                        dev.location()
                    ),
                )
                .op("validate map")
                .item(&item.id)
                .device(&p.device)
                .range(start, len));
            }
        }
    }
    Ok(())
}

fn remap_item(
    agent: &mut AgentClient,
    image: &FrozenImage,
    item: &mut Item,
    resolver: &DeviceResolver,
) -> Result<usize> {
    let remap = agent.remap(&image.id, &item.id, &item.config)?;
    check_devices(item, &remap.extents, resolver)?;
    *item = apply_remap(item, &remap)?;
    Ok(remap.extents.len())
}

/// Read one window's plan into `buf` (which has the window's length).
fn read_window(plan: &crate::plan::WindowPlan, buf: &mut [u8], resolver: &DeviceResolver, item: &ItemId, parallel: usize) -> Result<u64> {
    for f in &plan.fills {
        match f {
            Fill::Zeros(at, len) => {
                let (a, l) = (to_usize(*at)?, to_usize(*len)?);
                buf[a..a + l].fill(0);
            }
            Fill::Inline(at, bytes) => {
                let a = to_usize(*at)?;
                buf[a..a + bytes.len()].copy_from_slice(bytes);
            }
        }
    }
    // Direct reads land in the window buffer; the others go through a
    // bounce buffer. Hand out disjoint slices of the window for the first.
    let is_direct = |r: &DeviceRead| {
        r.targets.len() == 1
            && r.targets[0].from == 0
            && r.targets[0].len == r.length.0
            && r.targets[0].to % ALIGN as u64 == 0
    };
    let mut direct: Vec<(usize, u64)> = plan
        .reads
        .iter()
        .enumerate()
        .filter(|(_, r)| is_direct(r))
        .map(|(i, r)| (i, r.targets[0].to))
        .collect();
    direct.sort_by_key(|&(_, to)| to);
    let mut slices: Vec<(usize, &mut [u8])> = Vec::with_capacity(direct.len());
    let mut rest: &mut [u8] = buf;
    let mut consumed = 0u64;
    for (i, to) in direct {
        let skip = to_usize(to - consumed)?;
        let len = to_usize(plan.reads[i].length.0)?;
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(skip);
        let (mine, tail) = tail.split_at_mut(len);
        slices.push((i, mine));
        rest = tail;
        consumed = to + len as u64;
    }
    enum Job<'a> {
        Direct(usize, &'a mut [u8]),
        Bounce(usize),
    }
    let mut jobs: Vec<Job<'_>> = slices.into_iter().map(|(i, s)| Job::Direct(i, s)).collect();
    jobs.extend(
        plan.reads
            .iter()
            .enumerate()
            .filter(|(_, r)| !is_direct(r))
            .map(|(i, _)| Job::Bounce(i)),
    );
    jobs.reverse(); // pop() then takes them in physical order
    let bytes: u64 = plan.reads.iter().map(|r| r.length.0).sum();
    let queue = Mutex::new(jobs);
    let bounced: Mutex<Vec<(usize, AlignedBuf)>> = Mutex::new(Vec::new());
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let work = || loop {
        if failure.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
            return;
        }
        let Some(job) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop() else { return };
        let r = match job {
            Job::Direct(i, slice) => {
                let read = &plan.reads[i];
                resolver.resolve(&read.device).and_then(|d| d.read_at(slice, read.offset))
            }
            Job::Bounce(i) => {
                let read = &plan.reads[i];
                let mut b = AlignedBuf::new(usize::try_from(read.length.0).unwrap_or(0));
                let r = resolver.resolve(&read.device).and_then(|d| d.read_at(&mut b, read.offset));
                if r.is_ok() {
                    bounced.lock().unwrap_or_else(|p| p.into_inner()).push((i, b));
                }
                r
            }
        };
        if let Err(e) = r {
            failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e.item(item));
            return;
        }
    };
    let threads = parallel.max(1).min(plan.reads.len());
    if threads <= 1 {
        work();
    } else {
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(work);
            }
        });
    }
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    for (i, b) in bounced.into_inner().unwrap_or_else(|p| p.into_inner()) {
        for t in &plan.reads[i].targets {
            let (from, to, len) = (to_usize(t.from)?, to_usize(t.to)?, to_usize(t.len)?);
            buf[to..to + len].copy_from_slice(&b[from..from + len]);
        }
    }
    Ok(bytes)
}

fn to_usize(v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::new(ErrorKind::InvalidMap, format!("{v} does not fit in memory")))
}

struct Reader<'a> {
    agent: &'a mut AgentClient,
    image: &'a FrozenImage,
    resolver: &'a DeviceResolver,
    opts: &'a MoverOptions,
    tx: SyncSender<Msg>,
    free: Receiver<AlignedBuf>,
    counters: Counters,
}

impl Reader<'_> {
    fn run(&mut self, items: Vec<Item>) -> Result<()> {
        for mut item in items {
            let header = ItemHeader {
                item: item.id.clone(),
                kind: item.kind,
                size: item.size,
                config: item.config.clone(),
                meta: item.meta.clone(),
            };
            if self.tx.send(Msg::Begin(header)).is_err() {
                return Ok(());
            }
            let mut item_remaps = 0u32;
            for (lo, len) in windows(item.size, self.opts.window) {
                let mut buf = self
                    .free
                    .try_recv()
                    .unwrap_or_else(|_| AlignedBuf::new(to_usize(self.opts.window.0).unwrap_or(0)));
                buf.set_len(to_usize(len.0)?);
                item_remaps += self.window(&mut item, lo, len, &mut buf)?;
                let n = buf.len();
                if self.tx.send(Msg::Window(buf, n)).is_err() {
                    return Ok(());
                }
            }
            if self.tx.send(Msg::End { config: item.config.clone(), remaps: item_remaps }).is_err() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Steps 1–3 for one window; the number of remaps applied.
    fn window(&mut self, item: &mut Item, lo: ItemOffset, len: Bytes, buf: &mut AlignedBuf) -> Result<u32> {
        let mut remaps = 0u32;
        let (_, valid) = self.agent.check(&self.image.id, &item.id, &item.config)?;
        if !valid {
            remap_item(self.agent, self.image, item, self.resolver)?;
            remaps += 1;
        }
        loop {
            let plan = plan_window(item, lo, len, &self.opts.plan())?;
            self.counters.bytes_read += read_window(&plan, buf, self.resolver, &item.id, self.opts.parallel)?;
            if !self.opts.recheck_after_read {
                break;
            }
            let (_, valid) = self.agent.check(&self.image.id, &item.id, &item.config)?;
            if valid {
                break;
            }
            // The map changed while we read: these bytes prove nothing.
            self.counters.rereads += 1;
            if remaps >= self.opts.max_remaps {
                return Err(Error::new(
                    ErrorKind::Unstable,
                    format!(
                        "the map kept changing: {remaps} remaps of the window at {lo} without a stable read"
                    ),
                )
                .item(&item.id));
            }
            remap_item(self.agent, self.image, item, self.resolver)?;
            remaps += 1;
        }
        self.counters.remaps += remaps;
        Ok(remaps)
    }
}

/// Back up `sources` through `agent` to `media`: freeze, map, move, commit,
/// release. On any error the set is aborted and the image released.
pub fn backup(
    agent: &mut AgentClient,
    sources: &[String],
    resolver: &DeviceResolver,
    media: &mut dyn MediaWriter,
    opts: &MoverOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<BackupReport> {
    let started_at = now_secs();
    let (image, map) = agent.freeze(sources)?;
    let result = move_image(agent, sources, &image, map, resolver, media, opts, progress, started_at);
    let released = agent.release(&image.id);
    match (result, released) {
        (Ok(r), Ok(())) => Ok(r),
        (Ok(r), Err(e)) => {
            // The set is durable and complete; the agent failed to let the
            // image go. Say so, but the backup stands.
            eprintln!("floe: warning: the agent could not release image {}: {e}", image.id);
            Ok(r)
        }
        (Err(e), _) => Err(e),
    }
}

#[allow(clippy::too_many_arguments)]
fn move_image(
    agent: &mut AgentClient,
    sources: &[String],
    image: &FrozenImage,
    map: ImageMap,
    resolver: &DeviceResolver,
    media: &mut dyn MediaWriter,
    opts: &MoverOptions,
    progress: &mut dyn FnMut(&Progress),
    started_at: u64,
) -> Result<BackupReport> {
    for item in &map.items {
        validate_item(item)?;
        check_devices(item, &item.extents, resolver)?;
    }
    progress(&Progress::Frozen {
        items: map.items.len(),
        bytes: Bytes(map.items.iter().map(|i| i.size.0).sum()),
    });
    let set = SetId::new(format!("{}-{}", image.id, started_at));
    let header = SetHeader {
        set: set.clone(),
        label: opts.label.clone(),
        agent: agent.host.clone(),
        sources: sources.to_vec(),
        image: image.id.clone(),
        frozen_at: image.frozen_at,
        started_at,
    };
    media.begin_set(&header)?;
    match write_items(agent, image, map, resolver, media, opts, progress) {
        Ok(counters) => match media.commit() {
            Ok(record) => {
                let bytes_written = record.items.iter().map(|i| i.trailer.length.0).sum();
                Ok(BackupReport {
                    set: record,
                    remaps: counters.remaps,
                    rereads: counters.rereads,
                    bytes_read: counters.bytes_read,
                    bytes_written,
                })
            }
            Err(e) => {
                let _ = media.abort();
                Err(e)
            }
        },
        Err(e) => {
            let _ = media.abort();
            Err(e)
        }
    }
}

fn write_items(
    agent: &mut AgentClient,
    image: &FrozenImage,
    map: ImageMap,
    resolver: &DeviceResolver,
    media: &mut dyn MediaWriter,
    opts: &MoverOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Counters> {
    let (tx, rx) = sync_channel::<Msg>(2);
    let (free_tx, free_rx) = sync_channel::<AlignedBuf>(4);
    std::thread::scope(|s| {
        let reader = s.spawn(move || {
            let mut r = Reader { agent, image, resolver, opts, tx, free: free_rx, counters: Counters::default() };
            match r.run(map.items) {
                Ok(()) => {
                    let _ = r.tx.send(Msg::Done(std::mem::take(&mut r.counters)));
                }
                Err(e) => {
                    let _ = r.tx.send(Msg::Failed(e));
                }
            }
        });
        let mut current: Option<(ItemHeader, blake3::Hasher, u64, u32)> = None;
        let outcome = loop {
            let Ok(msg) = rx.recv() else {
                break Err(Error::new(ErrorKind::Io, "the read thread ended without a result"));
            };
            match msg {
                Msg::Begin(h) => {
                    if let Err(e) = media.begin_item(&h) {
                        break Err(e.item(&h.item));
                    }
                    current = Some((h, blake3::Hasher::new(), 0, 0));
                }
                Msg::Window(buf, n) => {
                    let Some((h, hasher, done, _)) = current.as_mut() else {
                        break Err(Error::new(ErrorKind::Io, "window outside an item"));
                    };
                    let data = &buf[..n];
                    hasher.update(data);
                    if let Err(e) = media.write(data) {
                        break Err(e.item(&h.item));
                    }
                    *done += n as u64;
                    progress(&Progress::Written { item: h.item.clone(), done: Bytes(*done), size: h.size });
                    let _ = free_tx.try_send(buf);
                }
                Msg::End { config, remaps } => {
                    let Some((h, hasher, done, _)) = current.take() else {
                        break Err(Error::new(ErrorKind::Io, "item end outside an item"));
                    };
                    if remaps > 0 {
                        progress(&Progress::Remapped { item: h.item.clone(), remaps });
                    }
                    let trailer = ItemTrailer {
                        length: Bytes(done),
                        blake3: hasher.finalize().to_hex().to_string(),
                        config,
                        remaps,
                        captured_after_freeze: false,
                    };
                    if let Err(e) = media.end_item(&trailer) {
                        break Err(e.item(&h.item));
                    }
                }
                Msg::Done(c) => break Ok(c),
                Msg::Failed(e) => break Err(e),
            }
        };
        drop(rx);
        let _ = reader.join();
        outcome
    })
}

/// What a restore of one item did.
#[derive(Clone, Debug)]
pub struct RestoreReport {
    /// Bytes written.
    pub bytes: u64,
    /// BLAKE3 of them, equal to the recorded one.
    pub blake3: String,
}

/// Restore one item of a set to a target, checking its checksum.
pub fn restore_item(
    reader: &mut dyn MediaReader,
    set: &SetId,
    item: &ItemId,
    target: &mut dyn RestoreTarget,
    progress: &mut dyn FnMut(&Progress),
) -> Result<RestoreReport> {
    let record = reader.open_item(set, item)?;
    if let Some(size) = target.size() {
        if size.0 < record.header.size.0 {
            return Err(Error::new(
                ErrorKind::WriteFailed,
                format!("restore target holds {size} bytes, item {item} needs {}", record.header.size),
            )
            .item(item));
        }
    }
    let mut hasher = blake3::Hasher::new();
    let mut pos = 0u64;
    loop {
        let chunk = reader.read(4 * 1024 * 1024).map_err(|e| e.item(item))?;
        if chunk.is_empty() {
            break;
        }
        hasher.update(&chunk);
        target.write_at(&chunk, DeviceOffset(pos)).map_err(|e| e.item(item))?;
        pos += chunk.len() as u64;
        progress(&Progress::Written { item: item.clone(), done: Bytes(pos), size: record.header.size });
    }
    target.flush().map_err(|e| e.item(item))?;
    let sum = hasher.finalize().to_hex().to_string();
    if pos != record.trailer.length.0 || sum != record.trailer.blake3 {
        return Err(Error::new(
            ErrorKind::ChecksumMismatch,
            format!(
                "restored {pos} bytes with BLAKE3 {sum}, the set recorded {} bytes with {}",
                record.trailer.length, record.trailer.blake3
            ),
        )
        .item(item));
    }
    Ok(RestoreReport { bytes: pos, blake3: sum })
}
