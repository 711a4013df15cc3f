//! The mover engine (backup host): the algorithm of the design brief.
//!
//! For every window of every item:
//! 1. check the config id with the agent; if it changed, ask for a remap
//!    and apply only the changed extents;
//! 2. read the window's extents from the shared devices (O_DIRECT or NBD),
//!    in physical order, coalesced, several reads in flight;
//! 3. check the config id again, after the read; if it changed, the bytes
//!    may be stale: discard them, remap, and go back to 2;
//! 4. hash the window (BLAKE3 of the item) and hand it to the media
//!    writer, which writes it.
//!
//! Reading (1–3, and the hash) runs on its own thread, windows ahead of
//! writing (4). The mover keeps the set's record as items end.
//! The set is committed only after every item ended; any error aborts the
//! set, so nothing partial is ever recorded as complete.

use crate::abi::{MediaReader, MediaWriter};
use crate::agent::AgentClient;
use crate::device::{BlockDevice, DeviceResolver, RestoreTarget};
use crate::error::{Error, ErrorKind, Result};
use crate::map::{apply_remap, validate_item};
use crate::model::{
    now_secs, Committed, ExtentKind, FrozenImage, ImageMap, Item, ItemFailure, ItemHeader, ItemId,
    ItemKind, ItemRecord, ItemTrailer, MapExtent, SetHeader, SetId, SetRecord,
};
use crate::plan::{plan_window, windows, Fill, PlanOptions, WindowPlan};
use crate::sys::{AlignedBuf, ALIGN};
use crate::units::{Bytes, DeviceOffset, ItemOffset};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};

/// How the mover works. The CLI flattens these (`floe backup --help`).
#[derive(Clone, Debug)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct MoverOptions {
    /// Bytes of an item read and verified as one portion. 16 MiB: the
    /// reads in flight and queued are a few windows, and every byte of
    /// them is memory the backup host touches (32 MiB windows took 270 MiB
    /// of read buffers on the 70,000-file tree, 16 MiB 180 MiB, 0.2 s less
    /// wall time; 8 MiB doubled the agent's checks).
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
    #[cfg_attr(feature = "cli", arg(long, default_value = "8M"))]
    pub max_read: Bytes,
    /// Check the config id again after each read. Only tests that prove the
    /// check matters turn it off.
    #[cfg_attr(feature = "cli", arg(skip = true))]
    pub recheck_after_read: bool,
    /// A label for the set.
    #[cfg_attr(feature = "cli", arg(long, default_value = ""))]
    pub label: String,
    /// Write file items in path order instead of disk order: media that
    /// build directory trees as they go (restic) need it. Set from the
    /// media plugin's `PluginInfo::path_order`.
    #[cfg_attr(feature = "cli", arg(skip = false))]
    pub path_order: bool,
    /// Take the whole map before the first read (by default reading starts
    /// with the first part of the map while the agent maps the rest).
    #[cfg_attr(feature = "cli", arg(long))]
    pub map_whole: bool,
}

impl Default for MoverOptions {
    fn default() -> Self {
        MoverOptions {
            window: Bytes(16 * 1024 * 1024),
            parallel: 4,
            max_remaps: 32,
            coalesce_gap: Bytes(64 * 1024),
            max_read: Bytes(8 * 1024 * 1024),
            recheck_after_read: true,
            label: String::new(),
            path_order: false,
            map_whole: false,
        }
    }
}

impl MoverOptions {
    /// How reads are shaped.
    pub fn plan(&self) -> PlanOptions {
        PlanOptions {
            align: ALIGN as u64,
            coalesce_gap: self.coalesce_gap.0,
            max_read: self.max_read.0.max(ALIGN as u64),
        }
    }
}

/// What the mover reports while it works.
#[derive(Clone, Debug)]
pub enum Progress {
    /// The set is begun on the media (or reopened to resume).
    Begun {
        /// Its id (to `--resume` it if this mover dies).
        set: SetId,
        /// Items already durable from an earlier run.
        resumed: usize,
    },
    /// The image is frozen and mapped.
    Frozen {
        /// Items.
        items: usize,
        /// Their total size.
        bytes: Bytes,
    },
    /// Another part of the map came in while the first were moved (the
    /// totals grow by this much).
    Mapped {
        /// Items in it.
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
    /// Bytes received from the agent (maps, remaps, answers), as on the
    /// wire: the application host's network cost.
    pub bytes_from_agent: u64,
    /// Where the time went.
    pub timings: Timings,
    /// Parts the map came in (1: whole).
    pub map_parts: u32,
    /// Why the recorder could not record the set (it is complete on its
    /// media all the same: a catalog rebuild from them adds it).
    pub unrecorded: Option<String>,
}

/// Wall time of a backup's phases.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Timings {
    /// Freeze and map on the agent, until the map (its first part, when
    /// it comes in parts: reading starts then) is in the mover's hands.
    pub map: std::time::Duration,
    /// Reading, checking and writing every item to media.
    pub r#move: std::time::Duration,
    /// The media commit (the set made durable); a recorder stages the
    /// set meanwhile.
    pub commit: std::time::Duration,
    /// The recorder's commit, after the media's (the catalog commit is
    /// last).
    pub record: std::time::Duration,
}

/// Records a set once its media committed it (the catalog). The mover
/// stages the set while the media commit (their work overlaps: a tree's
/// 70,000 rows are inserted while the archive's index is written and
/// synced), and makes it durable only after the media commit succeeded;
/// if that fails, what was staged is discarded.
pub trait Recorder {
    /// Stage the set as the mover holds it (positions as `end_item` said).
    fn stage(&mut self, record: &SetRecord) -> Result<()>;
    /// The media committed `record` (its time; `moved`: its positions
    /// changed since staged): make it durable.
    fn commit(&mut self, record: &SetRecord, moved: bool) -> Result<()>;
    /// The media commit failed: forget what was staged.
    fn discard(&mut self);
}

#[derive(Default)]
struct Counters {
    /// Parts of the map fetched while moving.
    more_parts: u32,
    remaps: u32,
    rereads: u32,
    bytes_read: u64,
}

enum Msg {
    Begin(Box<ItemHeader>),
    Window(Vec<Segment>, usize),
    End {
        config: crate::model::ConfigId,
        remaps: u32,
        after_freeze: bool,
        /// BLAKE3 of the item's bytes, as the windows before it hold
        /// them (hashed by the reader thread, so the writer only writes).
        blake3: blake3::Hash,
    },
    /// An item that cannot be backed up (a file that vanished): the set
    /// goes on without it and lists it.
    Skip(ItemFailure),
    /// Another part of the map came in.
    Mapped {
        items: usize,
        bytes: Bytes,
    },
    Done(Counters),
    Failed(Error),
}

/// Check every data extent against its device: resolvable, and inside it.
pub fn check_devices(item: &Item, extents: &[MapExtent], resolver: &DeviceResolver) -> Result<()> {
    for e in extents {
        if let ExtentKind::Data(c) = &e.kind {
            let p = &c.physical;
            let dev = resolver
                .resolve(&p.device)
                .map_err(|err| err.item(&item.id))?;
            let start = p
                .block_size
                .offset(p.start)
                .unwrap_or(DeviceOffset(u64::MAX));
            let len = p.block_size.bytes(p.count).unwrap_or(Bytes(u64::MAX));
            if start
                .0
                .checked_add(len.0)
                .is_none_or(|end| end > dev.size().0)
            {
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

/// Ask for and apply a remap of `item`; true when its content is now of
/// a version later than the frozen point.
fn remap_item(
    agent: &mut AgentClient,
    image: &FrozenImage,
    item: &mut Item,
    resolver: &DeviceResolver,
) -> Result<bool> {
    let remap = agent.remap(&image.id, &item.id, &item.config)?;
    check_devices(item, &remap.extents, resolver).map_err(|e| e.agent(&agent.host))?;
    *item = apply_remap(item, &remap).map_err(|e| e.agent(&agent.host))?;
    Ok(remap.after_freeze)
}

/// Take (a part of) the map in: items the mover can read as mapped, in
/// the order they are moved, and the failures of the set so far. An item
/// it cannot read as mapped: a volume fails the set (it is
/// all-or-nothing); a file is listed as a failure of a partial set.
fn admit(
    map: ImageMap,
    resolver: &DeviceResolver,
    host: &str,
    opts: &MoverOptions,
) -> Result<(Vec<Item>, Vec<ItemFailure>)> {
    let mut failures = map.failures;
    let mut keep = Vec::with_capacity(map.items.len());
    for item in map.items {
        let checked =
            validate_item(&item).and_then(|()| check_devices(&item, &item.extents, resolver));
        match checked {
            Ok(()) => keep.push(item),
            Err(e) if item.kind != ItemKind::Volume => failures.push(ItemFailure {
                item: item.id.clone(),
                error: e.agent(host).to_string(),
            }),
            Err(e) => return Err(e.agent(host)),
        }
    }
    order_items(&mut keep, opts.path_order);
    Ok((keep, failures))
}

/// Where an item's bytes start on disk: its first data extent's device
/// and offset.
fn first_extent(item: &Item) -> Option<(&crate::model::DeviceId, u64)> {
    item.extents.iter().find_map(|e| match &e.kind {
        ExtentKind::Data(c) => Some((
            &c.physical.device,
            c.physical
                .start
                .0
                .saturating_mul(u64::from(c.physical.block_size.0)),
        )),
        _ => None,
    })
}

/// The order items are moved in (and land on media). Files: those without
/// bytes to read first (directories, links, nodes, holes and inline data,
/// in walk order), then by where their bytes start on disk, so that reads
/// sweep each device once instead of seeking back and forth in name order.
/// Volumes keep the map's order. Pure.
///
/// With `by_path`, file items are ordered by path instead (component by
/// component, as directory trees are built), volumes by id.
pub fn order_items(items: &mut [Item], by_path: bool) {
    if by_path {
        items.sort_by(|a, b| {
            std::path::Path::new(a.id.as_str()).cmp(std::path::Path::new(b.id.as_str()))
        });
    } else {
        order_for_reading(items);
    }
}

/// Disk order (see [`order_items`]).
pub fn order_for_reading(items: &mut [Item]) {
    if !items.iter().any(|i| i.kind != ItemKind::Volume) {
        return;
    }
    items.sort_by(|a, b| match (first_extent(a), first_extent(b)) {
        (None, None) => std::cmp::Ordering::Equal,
        (None, Some(_)) => std::cmp::Ordering::Less,
        (Some(_), None) => std::cmp::Ordering::Greater,
        (Some(x), Some(y)) => x.cmp(&y),
    });
}

/// The header of an item as it is written.
fn header_of(item: &Item) -> ItemHeader {
    ItemHeader {
        item: item.id.clone(),
        kind: item.kind,
        size: item.size,
        config: item.config.clone(),
        meta: item.meta.clone(),
        file: item.file.clone(),
        holes: if item.kind == ItemKind::Volume {
            volume_holes(&item.extents)
        } else {
            Vec::new()
        },
    }
}

/// The hole extents of a volume's map, adjacent ones merged. Pure.
pub fn volume_holes(extents: &[MapExtent]) -> Vec<[u64; 2]> {
    let mut holes: Vec<[u64; 2]> = Vec::new();
    for e in extents
        .iter()
        .filter(|e| matches!(e.kind, ExtentKind::Hole))
    {
        match holes.last_mut() {
            Some(h) if h[0] + h[1] == e.logical.0 => h[1] += e.length.0,
            _ => holes.push([e.logical.0, e.length.0]),
        }
    }
    holes.retain(|h| h[1] > 0);
    holes
}

/// Items at most this large (and at most a window) are moved in batches:
/// their extents are read together, in physical order, with the reads of
/// the next batches in flight, and checked with one round trip. (Each
/// larger item stops that pipeline: the batches before it are finished
/// first. With a 1 MiB bound, the 190 files over 1 MiB of the 70,000-file
/// bench tree cost ~0.3 s of waiting.)
const BATCH_ITEM_MAX: u64 = 32 << 20;
/// Items in one batch at most.
const BATCH_ITEMS_MAX: usize = 4096;

/// Bytes of verified windows queued for the writer, at most `max` (more
/// only when a single window is larger). Closed when the writer ends, so a
/// reader waiting on it stops.
struct Budget {
    state: Mutex<(u64, bool)>,
    cv: std::sync::Condvar,
    max: u64,
}

impl Budget {
    fn new(max: u64) -> Budget {
        Budget {
            state: Mutex::new((0, false)),
            cv: std::sync::Condvar::new(),
            max,
        }
    }
    /// Wait for room for `n` bytes; false once closed.
    fn take(&self, n: u64) -> bool {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while !g.1 && g.0 > 0 && g.0 + n > self.max {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        if g.1 {
            return false;
        }
        g.0 += n;
        true
    }
    fn give(&self, n: u64) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        g.0 = g.0.saturating_sub(n);
        self.cv.notify_all();
    }
    fn close(&self) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        g.1 = true;
        self.cv.notify_all();
    }
}

/// A batch whose reads are in flight.
struct Batch {
    members: Vec<Member>,
    pending: Pending,
    total: u64,
    /// Times it was read again because a member's map changed.
    rounds: u32,
    /// Its check, sent ahead once its reads were in (the answer is read
    /// when the batch is finished).
    asked: Option<Asked>,
}

/// A batch's check sent ahead.
#[derive(Clone, Copy)]
enum Asked {
    /// Whether the freezer still holds every write since the map (the
    /// answer covers every item at once).
    Held(u64),
    /// The config ids of its items.
    Configs(u64),
}

/// The items of a batch its check asks about: those with bytes.
fn checked_members(members: &[Member]) -> Vec<usize> {
    (0..members.len())
        .filter(|&k| members[k].item.size.0 > 0)
        .collect()
}

/// One item's piece of a batch: the item, where it sits in the batch's
/// virtual byte space, and its remaps so far.
struct Member {
    item: Item,
    remaps: u32,
    after_freeze: bool,
}

fn to_usize(v: u64) -> Result<usize> {
    usize::try_from(v)
        .map_err(|_| Error::new(ErrorKind::InvalidMap, format!("{v} does not fit in memory")))
}

/// A piece of a verified window, in logical order.
enum Segment {
    /// Bytes `[from, from+len)` of a read buffer.
    Buf(Arc<PooledBuf>, usize, usize),
    /// Zeros (hole or zero extent).
    Zeros(usize),
    /// Bytes carried in the map.
    Inline(Vec<u8>),
}

/// Add a window's segments to an item's BLAKE3, in order.
fn hash_segments(hasher: &mut blake3::Hasher, segments: &[Segment]) {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    for seg in segments {
        match seg {
            Segment::Buf(b, from, len) => {
                hasher.update(&b[*from..*from + *len]);
            }
            Segment::Zeros(len) => {
                let mut left = *len;
                while left > 0 {
                    let k = left.min(ZEROS.len());
                    hasher.update(&ZEROS[..k]);
                    left -= k;
                }
            }
            Segment::Inline(bytes) => {
                hasher.update(bytes);
            }
        }
    }
}

/// One device read for the pool.
struct Job {
    window: u64,
    index: usize,
    device: Arc<dyn BlockDevice>,
    offset: DeviceOffset,
    len: usize,
}

struct Done {
    window: u64,
    index: usize,
    result: Result<PooledBuf>,
}

/// A window whose reads are in flight.
struct Pending {
    seq: u64,
    lo: ItemOffset,
    plan: WindowPlan,
    config: crate::model::ConfigId,
    bufs: Vec<Option<PooledBuf>>,
    outstanding: usize,
    /// The first read that failed: its error (without an item: the
    /// consumer names the item, or the batch member, it held) and index.
    error: Option<(Error, usize)>,
}

/// Windows in flight at once: reads of the next window overlap the check
/// that validates the current one.
const LOOKAHEAD: usize = 4;

struct Reader<'a> {
    agent: &'a mut AgentClient,
    image: &'a FrozenImage,
    resolver: &'a DeviceResolver,
    opts: &'a MoverOptions,
    tx: SyncSender<Msg>,
    budget: &'a Budget,
    jobs: Sender<Job>,
    done: Receiver<Done>,
    next_seq: u64,
    counters: Counters,
    /// The freezer may still hold every write since the map
    /// (`FrozenImage::writes_held`, until the agent first says no): a
    /// check asks only that.
    held: bool,
}

impl Reader<'_> {
    /// Does the freezer still hold every write since the map (asked now,
    /// after the reads the answer is to cover)? Once no, no for good.
    fn held_now(&mut self) -> Result<bool> {
        if self.held {
            self.held = self.agent.held(&self.image.id)?;
        }
        Ok(self.held)
    }

    /// Is `config` still the item's? True without a look at the item
    /// while the freezer holds every write since the map.
    fn check_one(&mut self, item: &ItemId, config: &crate::model::ConfigId) -> Result<bool> {
        if self.held_now()? {
            return Ok(true);
        }
        Ok(self.agent.check(&self.image.id, item, config)?.1)
    }

    /// Move `items`, then (while `more`) the next parts of the map as the
    /// agent hands them out.
    fn run(&mut self, items: Vec<Item>, mut more: bool) -> Result<()> {
        let batch_max = self.opts.window.0.min(BATCH_ITEM_MAX);
        let mut items: std::collections::VecDeque<Item> = items.into();
        // Batches in flight, oldest first: the reads of the next ones
        // overlap the check of the first.
        let mut queue: std::collections::VecDeque<Batch> = std::collections::VecDeque::new();
        loop {
            if items.is_empty() && more {
                let part = self.agent.map_more(&self.image.id)?;
                self.counters.more_parts += 1;
                more = part.more;
                let (admitted, failures) =
                    admit(part.map, self.resolver, &self.agent.host, self.opts)?;
                for f in failures {
                    if !self.send(Msg::Skip(f)) {
                        return Ok(());
                    }
                }
                let mapped = Msg::Mapped {
                    items: admitted.len(),
                    bytes: Bytes(admitted.iter().map(|i| i.size.0).sum()),
                };
                if !self.send(mapped) {
                    return Ok(());
                }
                items.extend(admitted);
                continue;
            }
            let Some(item) = items.pop_front() else {
                break;
            };
            if item.size.0 > batch_max {
                // Items go to media in order: finish the batches before it.
                if !self.drain(&mut queue, 0)? || !self.item(item)? {
                    return Ok(());
                }
                continue;
            }
            let mut bytes = item.size.0;
            let mut batch = vec![item];
            while let Some(next) = items.front() {
                let fits = next.size.0 <= batch_max
                    && bytes + next.size.0 <= self.opts.window.0
                    && batch.len() < BATCH_ITEMS_MAX;
                if !fits {
                    break;
                }
                bytes += next.size.0;
                batch.extend(items.pop_front());
            }
            let members = batch
                .into_iter()
                .map(|item| Member {
                    item,
                    remaps: 0,
                    after_freeze: false,
                })
                .collect();
            let b = self.submit_batch(members, 0)?;
            queue.push_back(b);
            if !self.drain(&mut queue, LOOKAHEAD - 1)? {
                return Ok(());
            }
        }
        self.drain(&mut queue, 0)?;
        Ok(())
    }

    /// Finish batches from the front until at most `keep` are in flight.
    /// False when the writer went away.
    fn drain(
        &mut self,
        queue: &mut std::collections::VecDeque<Batch>,
        keep: usize,
    ) -> Result<bool> {
        while queue.len() > keep {
            match self.finish_batch(queue)? {
                Some(true) => {}
                Some(false) => return Ok(false),
                None => {} // the front batch was read again: wait for it
            }
        }
        Ok(true)
    }

    /// Queue a window plan's reads on the pool.
    fn submit_plan(&mut self, plan: WindowPlan, lo: ItemOffset, item: &Item) -> Result<Pending> {
        let seq = self.next_seq;
        self.next_seq += 1;
        for (index, r) in plan.reads.iter().enumerate() {
            let device = self
                .resolver
                .resolve(&r.device)
                .map_err(|e| e.item(&item.id))?;
            let job = Job {
                window: seq,
                index,
                device,
                offset: r.offset,
                len: to_usize(r.length.0)?,
            };
            self.jobs
                .send(job)
                .map_err(|_| Error::new(ErrorKind::Io, "the read pool stopped"))?;
        }
        Ok(Pending {
            seq,
            lo,
            bufs: (0..plan.reads.len()).map(|_| None).collect(),
            outstanding: plan.reads.len(),
            plan,
            config: item.config.clone(),
            error: None,
        })
    }

    fn submit(&mut self, item: &Item, lo: ItemOffset, len: Bytes) -> Result<Pending> {
        let plan = plan_window(item, lo, len, &self.opts.plan())?;
        self.submit_plan(plan, lo, item)
    }

    /// Wait until the reads of the window `seq` (and of any other window in
    /// `inflight`) have all come back.
    fn wait(&mut self, inflight: &mut [&mut Pending]) -> Result<()> {
        while inflight.first().is_some_and(|p| p.outstanding > 0) {
            let d = self
                .done
                .recv()
                .map_err(|_| Error::new(ErrorKind::Io, "the read pool stopped"))?;
            if let Some(p) = inflight.iter_mut().find(|p| p.seq == d.window) {
                p.outstanding -= 1;
                match d.result {
                    Ok(b) => p.bufs[d.index] = Some(b),
                    Err(e) => {
                        p.error.get_or_insert((e, d.index));
                    }
                }
            }
            // else: a read of a discarded window; drop it.
        }
        Ok(())
    }

    fn send(&self, msg: Msg) -> bool {
        // Bytes handed to the writer are bounded, whatever the media's pace.
        if let Msg::Window(_, n) = &msg {
            if !self.budget.take(*n as u64) {
                return false;
            }
        }
        self.tx.send(msg).is_ok()
    }

    /// Send a batch's check ahead, once (its reads are all in): unless it
    /// asks about nothing or its frame is too large to go ahead.
    fn ask_ahead(&mut self, b: &mut Batch) -> Result<()> {
        if b.asked.is_some() || b.pending.outstanding > 0 {
            return Ok(());
        }
        let checked = checked_members(&b.members);
        if checked.is_empty() {
            // Nothing to check: nothing asked (an answer would never be read).
            return Ok(());
        }
        if self.held {
            b.asked = self.agent.held_ahead(&self.image.id)?.map(Asked::Held);
            return Ok(());
        }
        let items: Vec<(ItemId, crate::model::ConfigId)> = checked
            .into_iter()
            .map(|k| {
                (
                    b.members[k].item.id.clone(),
                    b.members[k].item.config.clone(),
                )
            })
            .collect();
        b.asked = self
            .agent
            .check_many_ahead(&self.image.id, items)?
            .map(Asked::Configs);
        Ok(())
    }

    /// Plan a batch of small items as one window of a virtual item (their
    /// concatenation), so reads follow physical order across items and
    /// coalesce, and queue its reads.
    fn submit_batch(&mut self, members: Vec<Member>, rounds: u32) -> Result<Batch> {
        let (virt, total) = concatenate(&members)?;
        let plan = plan_window(&virt, ItemOffset(0), Bytes(total), &self.opts.plan())?;
        let pending = self.submit_plan(plan, ItemOffset(0), &virt)?;
        Ok(Batch {
            members,
            pending,
            total,
            rounds,
            asked: None,
        })
    }

    /// Steps 2–3 for the front batch: wait for its reads, check every
    /// config id in one round trip. Items whose map changed are remapped
    /// and the batch is queued again at the front (`None`); else its items
    /// go to the writer (`Some(false)` when the writer went away).
    fn finish_batch(
        &mut self,
        queue: &mut std::collections::VecDeque<Batch>,
    ) -> Result<Option<bool>> {
        {
            let mut all: Vec<&mut Pending> = queue.iter_mut().map(|b| &mut b.pending).collect();
            self.wait(&mut all)?;
        }
        if self.opts.recheck_after_read && queue.len() > 1 {
            // Send the front's check, then — once the next batch's reads
            // are in — the next one's: the agent answers it while this one
            // is assembled, hashed and handed to the writer. (Each check
            // still follows its own batch's reads.)
            self.ask_ahead(&mut queue[0])?;
            {
                let mut all: Vec<&mut Pending> = Vec::with_capacity(queue.len());
                let mut it = queue.iter_mut();
                let front = it.next();
                all.extend(it.map(|b| &mut b.pending)); // the next first
                all.extend(front.map(|b| &mut b.pending));
                self.wait(&mut all)?;
            }
            self.ask_ahead(&mut queue[1])?;
        }
        let Some(Batch {
            mut members,
            pending,
            total,
            mut rounds,
            asked: ahead,
        }) = queue.pop_front()
        else {
            return Ok(Some(true));
        };
        // 3. check every item that has bytes, after the read.
        let asked = checked_members(&members);
        let stale: Vec<usize> = if self.opts.recheck_after_read && !asked.is_empty() {
            // Writes still held since the map: every item is as mapped.
            let held = match ahead {
                Some(Asked::Held(t)) => {
                    self.held &= self.agent.held_answer(t)?;
                    self.held
                }
                Some(Asked::Configs(_)) => false,
                None => self.held_now()?,
            };
            let current = match ahead {
                _ if held => Vec::new(),
                Some(Asked::Configs(t)) => self.agent.check_many_answer(t, asked.len())?,
                Some(Asked::Held(_)) | None => self.agent.check_many(
                    &self.image.id,
                    asked
                        .iter()
                        .map(|&k| (members[k].item.id.clone(), members[k].item.config.clone()))
                        .collect(),
                )?,
            };
            asked
                .iter()
                .zip(current)
                .filter(|(&k, c)| *c != members[k].item.config)
                .map(|(&k, _)| k)
                .collect()
        } else {
            Vec::new()
        };
        if !stale.is_empty() {
            self.counters.rereads += 1;
            rounds += 1;
            if rounds > self.opts.max_remaps {
                return Err(Error::new(
                    ErrorKind::Unstable,
                    format!("the map kept changing: {rounds} remaps without a stable read"),
                )
                .item(&members[stale[0]].item.id));
            }
            let mut gone = Vec::new();
            for k in stale {
                let m = &mut members[k];
                match remap_item(self.agent, self.image, &mut m.item, self.resolver) {
                    Ok(newer) => m.after_freeze |= newer,
                    Err(e) if m.item.kind != ItemKind::Volume => gone.push((k, e)),
                    Err(e) => return Err(e),
                }
                m.remaps += 1;
                self.counters.remaps += 1;
            }
            for (k, e) in gone.into_iter().rev() {
                let m = members.remove(k);
                let f = ItemFailure {
                    item: m.item.id.clone(),
                    error: e.item(&m.item.id).to_string(),
                };
                if !self.send(Msg::Skip(f)) {
                    return Ok(Some(false));
                }
            }
            // Read it again (its earlier reads are dropped as they land).
            let again = self.submit_batch(members, rounds)?;
            queue.push_front(again);
            return Ok(None);
        }
        if let Some((e, k)) = pending.error {
            // Name the item whose bytes the failed read held (the first,
            // when one read spans several), not the batch.
            let at = pending.plan.reads[k].targets.first().map_or(0, |t| t.to);
            let mut base = 0u64;
            let member = members.iter().find(|m| {
                base += m.item.size.0;
                at < base
            });
            return Err(match member {
                Some(m) => e.item(&m.item.id),
                None => e,
            });
        }
        self.counters.bytes_read += pending.plan.reads.iter().map(|r| r.length.0).sum::<u64>();
        let (segments, _) = assemble(pending.plan, pending.bufs, Bytes(total))?;
        let sizes: Vec<u64> = members.iter().map(|m| m.item.size.0).collect();
        for (m, segs) in members.iter().zip(split_segments(segments, &sizes)?) {
            if !self.send(Msg::Begin(Box::new(header_of(&m.item)))) {
                return Ok(Some(false));
            }
            let mut hasher = blake3::Hasher::new();
            if m.item.size.0 > 0 {
                let n = to_usize(m.item.size.0)?;
                hash_segments(&mut hasher, &segs);
                if !self.send(Msg::Window(segs, n)) {
                    return Ok(Some(false));
                }
            }
            let end = Msg::End {
                config: m.item.config.clone(),
                remaps: m.remaps,
                after_freeze: m.after_freeze,
                blake3: hasher.finalize(),
            };
            if !self.send(end) {
                return Ok(Some(false));
            }
        }
        Ok(Some(true))
    }

    /// Steps 1–3 for every window of one large item, with reads of the
    /// next windows in flight while the current one is checked. False when
    /// the writer went away.
    fn item(&mut self, mut item: Item) -> Result<bool> {
        let mut remaps = 0u32;
        let mut window_remaps = 0u32;
        let mut after_freeze = false;
        // A file that cannot be remapped (it vanished) is skipped and
        // listed; a volume that cannot be is the set's failure.
        let skip = |me: &Self, item: &Item, e: Error| -> Result<bool> {
            if item.kind == ItemKind::Volume {
                return Err(e);
            }
            Ok(me.send(Msg::Skip(ItemFailure {
                item: item.id.clone(),
                error: e.item(&item.id).to_string(),
            })))
        };
        // 1. check before the first read of the item.
        if !self.check_one(&item.id, &item.config)? {
            match remap_item(self.agent, self.image, &mut item, self.resolver) {
                Ok(newer) => after_freeze |= newer,
                Err(e) => return skip(self, &item, e),
            }
            remaps += 1;
        }
        let mut wins = windows(item.size, self.opts.window);
        // The header goes out with the first verified window: until then a
        // remap may still replace the item whole (new size).
        let mut begun = false;
        let mut hasher = blake3::Hasher::new();
        let mut next = 0usize;
        let mut inflight: std::collections::VecDeque<(usize, Pending)> =
            std::collections::VecDeque::new();
        loop {
            while inflight.len() < LOOKAHEAD && next < wins.len() {
                let (lo, len) = wins[next];
                inflight.push_back((next, self.submit(&item, lo, len)?));
                next += 1;
            }
            let Some((front_index, _)) = inflight.front() else {
                break;
            };
            let front_index = *front_index;
            // 2. wait for the front window's reads.
            {
                let mut all: Vec<&mut Pending> = inflight.iter_mut().map(|(_, p)| p).collect();
                self.wait(&mut all)?;
            }
            let (_, front) = inflight.pop_front().expect("front exists");
            // 3. check again, after the read.
            let valid = if self.opts.recheck_after_read {
                self.check_one(&item.id, &front.config)?
            } else {
                true
            };
            if !valid {
                // The map changed while we read: these bytes prove nothing,
                // nor do those of the windows read after them.
                self.counters.rereads += 1;
                if window_remaps >= self.opts.max_remaps {
                    return Err(Error::new(
                        ErrorKind::Unstable,
                        format!(
                            "the map kept changing: {window_remaps} remaps of the window at {} without a stable read",
                            front.lo
                        ),
                    )
                    .item(&item.id));
                }
                let size = item.size;
                let newer = match remap_item(self.agent, self.image, &mut item, self.resolver) {
                    Ok(n) => n,
                    Err(e) if !begun => return skip(self, &item, e),
                    Err(e) => return Err(e),
                };
                remaps += 1;
                window_remaps += 1;
                inflight.clear();
                if newer || item.size != size {
                    if begun {
                        // Part of the older version is on media already;
                        // a mix of versions is never written.
                        return Err(Error::new(
                            ErrorKind::Unstable,
                            format!(
                                "the file changed after the frozen point while it was being read, and the freezer kept no copy: {} of its bytes are written already",
                                front.lo
                            ),
                        )
                        .item(&item.id));
                    }
                    after_freeze |= newer;
                    wins = windows(item.size, self.opts.window);
                    next = 0;
                } else {
                    next = front_index;
                }
                continue;
            }
            if let Some((e, _)) = front.error {
                return Err(e.item(&item.id));
            }
            window_remaps = 0;
            self.counters.bytes_read += front.plan.reads.iter().map(|r| r.length.0).sum::<u64>();
            let (segments, len) = assemble(front.plan, front.bufs, wins[front_index].1)?;
            if !begun {
                begun = true;
                if !self.send(Msg::Begin(Box::new(header_of(&item)))) {
                    return Ok(false);
                }
            }
            hash_segments(&mut hasher, &segments);
            if !self.send(Msg::Window(segments, len)) {
                return Ok(false);
            }
        }
        if !begun && !self.send(Msg::Begin(Box::new(header_of(&item)))) {
            return Ok(false);
        }
        self.counters.remaps += remaps;
        Ok(self.send(Msg::End {
            config: item.config.clone(),
            remaps,
            after_freeze,
            blake3: hasher.finalize(),
        }))
    }
}

/// The members of a batch as one virtual item: their extents back to back.
fn concatenate(members: &[Member]) -> Result<(Item, u64)> {
    let mut extents = Vec::new();
    let mut base = 0u64;
    for m in members {
        for e in &m.item.extents {
            extents.push(MapExtent {
                logical: ItemOffset(base + e.logical.0),
                ..e.clone()
            });
        }
        base = base.checked_add(m.item.size.0).ok_or_else(|| {
            Error::new(ErrorKind::InvalidMap, "a batch's sizes overflow").item(&m.item.id)
        })?;
    }
    let first = members
        .first()
        .map(|m| m.item.id.to_string())
        .unwrap_or_default();
    let virt = Item {
        id: ItemId::new(format!("batch from {first}")),
        kind: crate::model::ItemKind::Volume,
        size: Bytes(base),
        config: crate::model::ConfigId::new("batch"),
        extents,
        meta: Default::default(),
        file: None,
    };
    Ok((virt, base))
}

/// Cut a batch's segments (in virtual order) into each member's own.
fn split_segments(segments: Vec<Segment>, sizes: &[u64]) -> Result<Vec<Vec<Segment>>> {
    let mut out: Vec<Vec<Segment>> = sizes.iter().map(|_| Vec::new()).collect();
    let mut k = 0usize;
    let mut left = sizes.first().copied().unwrap_or(0);
    let advance = |k: &mut usize, left: &mut u64| {
        while *left == 0 && *k + 1 < sizes.len() {
            *k += 1;
            *left = sizes[*k];
        }
    };
    advance(&mut k, &mut left);
    for seg in segments {
        let mut seg = Some(seg);
        while let Some(s) = seg.take() {
            let n = match &s {
                Segment::Buf(_, _, n) | Segment::Zeros(n) => *n as u64,
                Segment::Inline(b) => b.len() as u64,
            };
            if n == 0 {
                continue;
            }
            if left == 0 {
                return Err(Error::new(
                    ErrorKind::InvalidMap,
                    "a batch's bytes run past its items",
                ));
            }
            if n <= left {
                out[k].push(s);
                left -= n;
            } else {
                let cut = to_usize(left)?;
                let (a, b) = match s {
                    Segment::Buf(buf, from, len) => (
                        Segment::Buf(buf.clone(), from, cut),
                        Segment::Buf(buf, from + cut, len - cut),
                    ),
                    Segment::Zeros(len) => (Segment::Zeros(cut), Segment::Zeros(len - cut)),
                    Segment::Inline(mut bytes) => {
                        let rest = bytes.split_off(cut);
                        (Segment::Inline(bytes), Segment::Inline(rest))
                    }
                };
                out[k].push(a);
                left = 0;
                seg = Some(b);
            }
            advance(&mut k, &mut left);
        }
    }
    Ok(out)
}

/// Turn a window's completed reads and fills into segments in logical
/// order. Reads that land whole and alone are passed on without a copy.
fn assemble(
    plan: WindowPlan,
    bufs: Vec<Option<PooledBuf>>,
    len: Bytes,
) -> Result<(Vec<Segment>, usize)> {
    let mut parts: Vec<(u64, Segment)> = Vec::new();
    for (read, buf) in plan.reads.iter().zip(bufs) {
        let buf = Arc::new(
            buf.ok_or_else(|| Error::new(ErrorKind::Io, "a read finished without its buffer"))?,
        );
        for t in &read.targets {
            parts.push((
                t.to,
                Segment::Buf(buf.clone(), to_usize(t.from)?, to_usize(t.len)?),
            ));
        }
    }
    for f in plan.fills {
        match f {
            Fill::Zeros(at, n) => parts.push((at, Segment::Zeros(to_usize(n)?))),
            Fill::Inline(at, bytes) => parts.push((at, Segment::Inline(bytes))),
        }
    }
    parts.sort_by_key(|(at, _)| *at);
    let mut pos = 0u64;
    for (at, seg) in &parts {
        if *at != pos {
            return Err(Error::new(
                ErrorKind::InvalidMap,
                format!("window pieces do not tile it at {pos}"),
            ));
        }
        pos += match seg {
            Segment::Buf(_, _, n) | Segment::Zeros(n) => *n as u64,
            Segment::Inline(b) => b.len() as u64,
        };
    }
    if pos != len.0 {
        return Err(Error::new(
            ErrorKind::InvalidMap,
            format!("window pieces cover {pos} of {len} bytes"),
        ));
    }
    Ok((
        parts.into_iter().map(|(_, s)| s).collect(),
        to_usize(len.0)?,
    ))
}

/// Read buffers handed back by the writer, reused so that O_DIRECT reads
/// do not fault in fresh pages for every read: a fresh buffer costs the
/// kernel a page fault and a zeroed page per 4 KiB (or per 2 MiB huge
/// page), which was a third of the mover's CPU on the 70,000-file tree
/// when buffers were sized to each read and handed out first-fit (a small
/// read took a large buffer, so the next large read allocated again).
/// Buffers come in size classes (powers of two from [`BufferPool::MIN`]),
/// are handed out best-fit, go back to the pool when their last holder
/// drops them (one read serves several files of a batch), and idle ones
/// are kept up to a byte bound.
struct BufferPool {
    free: Mutex<(Vec<AlignedBuf>, usize)>,
    keep_bytes: usize,
}

impl BufferPool {
    /// Smallest buffer made.
    const MIN: usize = 64 * 1024;

    /// A pool that keeps at most `keep_bytes` of idle buffers.
    fn new(keep_bytes: usize) -> BufferPool {
        BufferPool {
            free: Mutex::new((Vec::new(), 0)),
            keep_bytes,
        }
    }

    /// The capacity a buffer for `len` bytes is made with.
    fn class(len: usize) -> usize {
        len.max(Self::MIN)
            .checked_next_power_of_two()
            .unwrap_or(len)
    }

    /// An idle buffer of `len`'s class or the next (best fit; a larger
    /// one would be held by a small read while a large read makes a new
    /// one), else a new one of its class.
    fn get(&self, len: usize) -> AlignedBuf {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let class = Self::class(len);
        let best = free
            .0
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len && b.capacity() <= 2 * class)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        match best {
            Some(i) => {
                let mut b = free.0.swap_remove(i);
                free.1 -= b.capacity();
                b.set_len(len);
                b
            }
            None => {
                drop(free);
                let mut b = AlignedBuf::new(Self::class(len));
                b.set_len(len);
                b
            }
        }
    }

    fn put(&self, b: AlignedBuf) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.1 + b.capacity() <= self.keep_bytes {
            free.1 += b.capacity();
            free.0.push(b);
        }
    }

    /// A buffer of `len` bytes that goes back to this pool when dropped.
    fn take(self: &Arc<Self>, len: usize) -> PooledBuf {
        PooledBuf {
            buf: Some(self.get(len)),
            pool: self.clone(),
        }
    }
}

/// A read buffer of a [`BufferPool`], given back to it on drop.
struct PooledBuf {
    buf: Option<AlignedBuf>,
    pool: Arc<BufferPool>,
}

impl std::ops::Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf.as_deref().unwrap_or_default()
    }
}

impl std::ops::DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.buf.as_deref_mut().unwrap_or_default()
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.put(b);
        }
    }
}

/// Idle read buffers a backup keeps, in windows.
const KEEP_WINDOWS: u64 = 16;

/// A read-pool worker: read jobs until the job channel closes.
fn read_worker(jobs: Arc<Mutex<Receiver<Job>>>, done: Sender<Done>, pool: &Arc<BufferPool>) {
    loop {
        let job = match jobs.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        let mut buf = pool.take(job.len);
        let result = job.device.read_at(&mut buf, job.offset).map(|()| buf);
        if done
            .send(Done {
                window: job.window,
                index: job.index,
                result,
            })
            .is_err()
        {
            return;
        }
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
    backup_recorded(agent, sources, resolver, media, None, opts, progress)
}

/// [`backup`], recording the committed set with `recorder` (the catalog
/// commit last, its work overlapping the media commit).
pub fn backup_recorded(
    agent: &mut AgentClient,
    sources: &[String],
    resolver: &DeviceResolver,
    media: &mut dyn MediaWriter,
    recorder: Option<&mut dyn Recorder>,
    opts: &MoverOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<BackupReport> {
    let started_at = now_secs();
    let t = std::time::Instant::now();
    // In parts (reading starts with the first), unless the media need
    // every item before the first (path order).
    let parts = !opts.path_order && !opts.map_whole;
    let (image, map, more) = agent.freeze_in_parts(sources, parts)?;
    let mapped = t.elapsed();
    let start = Start::New {
        sources: sources.to_vec(),
        started_at,
    };
    let first = MapStart { map, more };
    let media = Media { media, recorder };
    finish(agent, start, image, first, resolver, media, opts, progress).map(|mut r| {
        r.timings.map = mapped;
        r
    })
}

/// Resume a set whose mover died: reopen it on the media, take over its
/// frozen image on the agent (which keeps it for its image lease), and
/// back up only the items that are not durable yet.
pub fn resume(
    agent: &mut AgentClient,
    set: &SetId,
    resolver: &DeviceResolver,
    media: &mut dyn MediaWriter,
    opts: &MoverOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<BackupReport> {
    resume_recorded(agent, set, resolver, media, None, opts, progress)
}

/// [`resume`], recording the committed set with `recorder`.
pub fn resume_recorded(
    agent: &mut AgentClient,
    set: &SetId,
    resolver: &DeviceResolver,
    media: &mut dyn MediaWriter,
    recorder: Option<&mut dyn Recorder>,
    opts: &MoverOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<BackupReport> {
    let record = media.resume_set(set)?;
    let (image, map) = agent.attach(&record.header.image).inspect_err(|_| {
        let _ = media.abort();
    })?;
    finish(
        agent,
        Start::Resume(record),
        image,
        MapStart { map, more: false },
        resolver,
        Media { media, recorder },
        opts,
        progress,
    )
}

/// Where a set goes: its media, and what records it once committed.
struct Media<'a, 'r> {
    media: &'a mut dyn MediaWriter,
    recorder: Option<&'r mut dyn Recorder>,
}

/// The map as the mover first holds it: whole, or its first part with
/// more to fetch from the agent while reading.
struct MapStart {
    map: ImageMap,
    more: bool,
}

/// How a set starts.
enum Start {
    New {
        sources: Vec<String>,
        started_at: u64,
    },
    Resume(SetRecord),
}

#[allow(clippy::too_many_arguments)]
fn finish(
    agent: &mut AgentClient,
    start: Start,
    image: FrozenImage,
    map: MapStart,
    resolver: &DeviceResolver,
    media: Media<'_, '_>,
    opts: &MoverOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<BackupReport> {
    let result = move_image(agent, start, &image, map, resolver, media, opts, progress);
    let released = agent.release(&image.id);
    let result = result.map(|mut r| {
        r.bytes_from_agent = agent.bytes_received();
        r
    });
    match (result, released) {
        (Ok(r), Ok(())) => Ok(r),
        (Ok(r), Err(e)) => {
            // The set is durable and complete; the agent failed to let the
            // image go. Say so, but the backup stands.
            crate::log_line!(
                "floe: warning: the agent could not release image {}: {e}",
                image.id
            );
            Ok(r)
        }
        (Err(e), _) => Err(e),
    }
}

#[allow(clippy::too_many_arguments)]
fn move_image(
    agent: &mut AgentClient,
    start: Start,
    image: &FrozenImage,
    map: MapStart,
    resolver: &DeviceResolver,
    media: Media<'_, '_>,
    opts: &MoverOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<BackupReport> {
    let Media {
        media,
        mut recorder,
    } = media;
    let MapStart { mut map, more } = map;
    let fail = |media: &mut dyn MediaWriter, e: Error| {
        let _ = media.abort();
        e
    };
    let resumed = match &start {
        Start::Resume(record) => {
            if record.header.image != image.id {
                return Err(fail(
                    media,
                    Error::new(
                        ErrorKind::Protocol,
                        format!(
                            "the agent attached image {}, the set is of image {}",
                            image.id, record.header.image
                        ),
                    ),
                ));
            }
            let done: std::collections::HashSet<&ItemId> =
                record.items.iter().map(|i| &i.header.item).collect();
            map.items.retain(|i| !done.contains(&i.id));
            record.items.len()
        }
        Start::New { .. } => 0,
    };
    let (items, failures) = match admit(map, resolver, &agent.host, opts) {
        Ok(a) => a,
        Err(e) => return Err(fail(media, e)),
    };
    map = ImageMap {
        image: image.id.clone(),
        items,
        failures: Vec::new(),
    };
    progress(&Progress::Frozen {
        items: map.items.len(),
        bytes: Bytes(map.items.iter().map(|i| i.size.0).sum()),
    });
    // The set's record, kept here as items end (media are not asked for
    // it back).
    let mut record = match start {
        Start::New {
            sources,
            started_at,
        } => {
            let header = SetHeader {
                set: SetId::new(format!("{}-{}", image.id, started_at)),
                label: opts.label.clone(),
                agent: agent.host.clone(),
                sources,
                image: image.id.clone(),
                frozen_at: image.frozen_at,
                started_at,
            };
            media.begin_set(&header)?;
            SetRecord {
                header,
                items: Vec::new(),
                failures: Vec::new(),
                committed_at: 0,
            }
        }
        Start::Resume(record) => record,
    };
    progress(&Progress::Begun {
        set: record.header.set.clone(),
        resumed,
    });
    for f in &failures {
        if let Err(e) = media.fail_item(f) {
            return Err(fail(media, e));
        }
        record.fail(f);
    }
    let t = std::time::Instant::now();
    let moved = write_items(
        agent,
        image,
        map,
        more,
        resolver,
        media,
        &mut record,
        opts,
        progress,
    );
    let counters = match moved {
        Ok(c) => c,
        Err(e) => return Err(fail(media, e)),
    };
    let moved = t.elapsed();
    let t = std::time::Instant::now();
    // Media commit now (they say when; to the second it is this).
    record.committed_at = now_secs();
    // The media commit on a thread of its own while the recorder stages
    // the set; the recorder commits only after the media did.
    let (commit, staged) = std::thread::scope(|s| {
        let media = &mut *media;
        let h = s.spawn(move || media.commit());
        let staged = recorder.as_mut().map(|r| r.stage(&record));
        let commit = h
            .join()
            .unwrap_or_else(|_| Err(Error::new(ErrorKind::Media, "the media commit panicked")));
        (commit, staged)
    });
    let commit_time = t.elapsed();
    let c = match commit {
        Ok(c) => c,
        Err(e) => {
            if let Some(r) = recorder.as_mut() {
                r.discard();
            }
            return Err(fail(media, e));
        }
    };
    let moved_positions = !c.positions.is_empty();
    let record = committed(record, c).inspect_err(|_| {
        if let Some(r) = recorder.as_mut() {
            r.discard();
        }
    })?;
    let t = std::time::Instant::now();
    let mut unrecorded = None;
    if let Some(r) = recorder {
        let recorded = match staged {
            Some(Err(e)) => Err(e),
            _ => r.commit(&record, moved_positions),
        };
        if let Err(e) = recorded {
            r.discard();
            unrecorded = Some(e.to_string());
        }
    }
    let record_time = t.elapsed();
    let bytes_written = record.items.iter().map(|i| i.trailer.length.0).sum();
    Ok(BackupReport {
        set: record,
        remaps: counters.remaps,
        rereads: counters.rereads,
        bytes_read: counters.bytes_read,
        bytes_written,
        bytes_from_agent: 0,
        map_parts: 1 + counters.more_parts,
        timings: Timings {
            map: std::time::Duration::ZERO,
            r#move: moved,
            commit: commit_time,
            record: record_time,
        },
        unrecorded,
    })
}

/// The set's record once media committed it: their time, and any
/// positions they moved. Media that say they hold another number of items
/// than the mover ended disagree with it: an error, not a record.
fn committed(mut record: SetRecord, c: Committed) -> Result<SetRecord> {
    let n = record.items.len();
    let disagree = |what: String| {
        Error::new(
            ErrorKind::Media,
            format!("media committed set {} with {what}", record.header.set),
        )
    };
    if c.items != n as u64 {
        return Err(disagree(format!("{} items; the mover ended {n}", c.items)));
    }
    if !c.positions.is_empty() {
        if c.positions.len() != n {
            return Err(disagree(format!(
                "{} positions for {n} items",
                c.positions.len()
            )));
        }
        for (it, p) in record.items.iter_mut().zip(c.positions) {
            it.position = p;
        }
    }
    record.committed_at = c.committed_at;
    Ok(record)
}

#[allow(clippy::too_many_arguments)]
fn write_items(
    agent: &mut AgentClient,
    image: &FrozenImage,
    map: ImageMap,
    more: bool,
    resolver: &DeviceResolver,
    media: &mut dyn MediaWriter,
    record: &mut SetRecord,
    opts: &MoverOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Counters> {
    // Small items are three messages each: room for a batch's worth, so the
    // reader is not held up item by item by the writer.
    let (tx, rx) = sync_channel::<Msg>(3 * BATCH_ITEMS_MAX);
    let (job_tx, job_rx) = channel::<Job>();
    let (done_tx, done_rx) = channel::<Done>();
    let budget = Budget::new(2 * opts.window.0.max(1));
    // Idle buffers: never let go during a backup in practice (buffers let
    // go beyond a bound of four windows were made again moments later, a
    // third of all made on the 70,000-file tree); the bound is only a cap.
    let pool = Arc::new(BufferPool::new(
        usize::try_from(KEEP_WINDOWS * opts.window.0.max(1)).unwrap_or(usize::MAX),
    ));
    let job_rx = Arc::new(Mutex::new(job_rx));
    std::thread::scope(|s| {
        for _ in 0..opts.parallel.max(1) {
            let (jobs, done, pool) = (job_rx.clone(), done_tx.clone(), &pool);
            std::thread::Builder::new()
                .name("floe-read-io".into())
                .spawn_scoped(s, move || read_worker(jobs, done, pool))
                .map_err(|e| Error::new(ErrorKind::Io, "start a read thread").source(e))?;
        }
        drop(done_tx);
        let budget = &budget;
        let reader = std::thread::Builder::new()
            .name("floe-reader".into())
            .spawn_scoped(s, move || {
                let mut r = Reader {
                    agent,
                    image,
                    resolver,
                    opts,
                    tx,
                    budget,
                    jobs: job_tx,
                    done: done_rx,
                    next_seq: 0,
                    counters: Counters::default(),
                    held: image.writes_held,
                };
                match r.run(map.items, more) {
                    Ok(()) => {
                        let _ = r.tx.send(Msg::Done(std::mem::take(&mut r.counters)));
                    }
                    Err(e) => {
                        let _ = r.tx.send(Msg::Failed(e));
                    }
                }
                // Dropping r closes the job channel: the workers end.
            })
            .map_err(|e| Error::new(ErrorKind::Io, "start the reader thread").source(e))?;
        // However the writer ends — result, error or panic — the reader
        // must not stay waiting for room to hand it more.
        struct CloseOnDrop<'b>(&'b Budget);
        impl Drop for CloseOnDrop<'_> {
            fn drop(&mut self) {
                self.0.close();
            }
        }
        let _closer = CloseOnDrop(budget);
        let rx = rx; // dropped with this frame, even when unwinding
        let zeros = vec![0u8; 1 << 20];
        let mut current: Option<(ItemHeader, u64)> = None;
        let outcome = loop {
            let Ok(msg) = rx.recv() else {
                break Err(Error::new(
                    ErrorKind::Io,
                    "the read thread ended without a result",
                ));
            };
            match msg {
                Msg::Begin(h) => {
                    if let Err(e) = media.begin_item(&h) {
                        break Err(e.item(&h.item));
                    }
                    current = Some((*h, 0));
                }
                Msg::Window(segments, n) => {
                    let Some((h, done)) = current.as_mut() else {
                        break Err(Error::new(ErrorKind::Io, "window outside an item"));
                    };
                    let mut write = |data: &[u8]| -> Result<()> { media.write(data) };
                    let mut failed = None;
                    for seg in segments {
                        let r = match &seg {
                            Segment::Buf(b, from, len) => write(&b[*from..*from + *len]),
                            Segment::Zeros(len) => {
                                let mut left = *len;
                                let mut r = Ok(());
                                while left > 0 && r.is_ok() {
                                    let k = left.min(zeros.len());
                                    r = write(&zeros[..k]);
                                    left -= k;
                                }
                                r
                            }
                            Segment::Inline(bytes) => write(bytes),
                        };
                        if let Err(e) = r {
                            failed = Some(e);
                            break;
                        }
                    }
                    if let Some(e) = failed {
                        break Err(e.item(&h.item));
                    }
                    budget.give(n as u64);
                    *done += n as u64;
                    progress(&Progress::Written {
                        item: h.item.clone(),
                        done: Bytes(*done),
                        size: h.size,
                    });
                }
                Msg::End {
                    config,
                    remaps,
                    after_freeze,
                    blake3,
                } => {
                    let Some((h, done)) = current.take() else {
                        break Err(Error::new(ErrorKind::Io, "item end outside an item"));
                    };
                    if remaps > 0 {
                        progress(&Progress::Remapped {
                            item: h.item.clone(),
                            remaps,
                        });
                    }
                    let trailer = ItemTrailer {
                        length: Bytes(done),
                        blake3: blake3.to_hex().to_string(),
                        config,
                        remaps,
                        captured_after_freeze: after_freeze,
                    };
                    match media.end_item(&trailer) {
                        Ok(position) => record.items.push(ItemRecord {
                            header: h,
                            trailer,
                            position,
                        }),
                        Err(e) => break Err(e.item(&h.item)),
                    }
                }
                Msg::Skip(f) => {
                    if let Err(e) = media.fail_item(&f) {
                        break Err(e);
                    }
                    record.fail(&f);
                }
                Msg::Mapped { items, bytes } => {
                    // Room for this part's records in steps of eight times
                    // what is there: growing by doubling copied the records
                    // (hundreds of bytes each) into never-touched memory
                    // again and again (5 % of the mover's CPU on the
                    // 70,000-file tree). Room not used is never touched.
                    let (len, room) = (record.items.len(), record.items.capacity());
                    if room - len < items {
                        record.items.reserve(items.max(len.saturating_mul(7)));
                    }
                    progress(&Progress::Mapped { items, bytes });
                }
                Msg::Done(c) => break Ok(c),
                Msg::Failed(e) => break Err(e),
            }
        };
        budget.close();
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
                format!(
                    "restore target holds {size} bytes, item {item} needs {}",
                    record.header.size
                ),
            )
            .item(item));
        }
    }
    // Reading the media runs on its own thread, a few chunks ahead of
    // hashing and writing.
    let mut hasher = blake3::Hasher::new();
    let mut pos = 0u64;
    let (tx, rx) = sync_channel::<Result<crate::abi::Chunk>>(4);
    std::thread::scope(|s| -> Result<()> {
        s.spawn(move || loop {
            let r = reader.read_chunk(8 * 1024 * 1024);
            let end = matches!(&r, Ok(c) if c.is_empty()) || r.is_err();
            if tx.send(r).is_err() || end {
                return;
            }
        });
        for chunk in rx.iter() {
            let chunk = chunk.map_err(|e| e.item(item))?;
            if chunk.is_empty() {
                break;
            }
            hasher.update(&chunk);
            target
                .write_at(&chunk, DeviceOffset(pos))
                .map_err(|e| e.item(item))?;
            pos += chunk.len() as u64;
            progress(&Progress::Written {
                item: item.clone(),
                done: Bytes(pos),
                size: record.header.size,
            });
        }
        Ok(())
    })?;
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
    Ok(RestoreReport {
        bytes: pos,
        blake3: sum,
    })
}

/// What verifying one item found.
#[derive(Clone, Debug)]
pub struct VerifyOutcome {
    /// The item.
    pub item: ItemId,
    /// Bytes read back.
    pub bytes: u64,
    /// `None` when the bytes hash to the recorded checksum; else why not.
    pub damage: Option<String>,
}

/// Re-read every item of a set from media and check it against its
/// recorded length and BLAKE3. Damage is reported per item, naming it;
/// only a set that cannot be read at all is an error.
pub fn verify_set(reader: &mut dyn MediaReader, set: &SetId) -> Result<Vec<VerifyOutcome>> {
    let record = reader
        .list_sets()?
        .into_iter()
        .find(|s| &s.header.set == set)
        .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no set {set} on this media")))?;
    let mut out = Vec::new();
    for it in &record.items {
        let id = it.header.item.clone();
        let mut hasher = blake3::Hasher::new();
        let mut bytes = 0u64;
        let damage = match reader.open_item(set, &id) {
            Err(e) => Some(e.to_string()),
            Ok(rec) => loop {
                match reader.read_chunk(4 * 1024 * 1024) {
                    Ok(c) if c.is_empty() => {
                        let sum = hasher.finalize().to_hex().to_string();
                        break if bytes != rec.trailer.length.0 {
                            Some(format!(
                                "{bytes} bytes on media, {} recorded",
                                rec.trailer.length
                            ))
                        } else if sum != rec.trailer.blake3 {
                            Some(format!(
                                "BLAKE3 {sum} on media, {} recorded",
                                rec.trailer.blake3
                            ))
                        } else {
                            None
                        };
                    }
                    Ok(c) => {
                        hasher.update(&c);
                        bytes += c.len() as u64;
                    }
                    Err(e) => break Some(e.to_string()),
                }
            },
        };
        out.push(VerifyOutcome {
            item: id,
            bytes,
            damage,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod order_tests {
    use super::*;
    use crate::model::MediaPosition;

    #[test]
    fn read_buffers_go_back_to_the_pool_from_their_last_holder_and_fit_best() {
        const K64: usize = 64 * 1024;
        const M: usize = 1 << 20;
        let pool = Arc::new(BufferPool::new(5 * M));
        let pooled = || pool.free.lock().unwrap().1;
        let small = pool.take(4096);
        let big = pool.take(3 * M);
        assert_eq!((small.len(), big.len()), (4096, 3 * M));
        let (small_at, big_at) = (small.as_ptr(), big.as_ptr());
        drop(small);
        assert_eq!(pooled(), K64);
        // One read serving several files: the buffer returns when the
        // last of them is done with it, whoever that is.
        let shared = Arc::new(big);
        let (a, b) = (shared.clone(), shared.clone());
        drop(shared);
        drop(a);
        assert_eq!(pooled(), K64, "still held");
        drop(b);
        assert_eq!(pooled(), K64 + 4 * M);
        // Best fit: a small read takes the small buffer, a large read the
        // large one (the same memory again: no fresh pages).
        let small = pool.take(8192);
        let large = pool.take(3 * M);
        assert_eq!((small.as_ptr(), large.as_ptr()), (small_at, big_at));
        assert_eq!(pooled(), 0);
        // Never one more than a class too large: with only the large one
        // idle, a small read gets a new buffer of its own.
        drop(large);
        let small2 = pool.take(4096);
        assert_eq!(small2.len(), 4096);
        assert_ne!(small2.as_ptr(), big_at);
        assert_eq!(pooled(), 4 * M);
        drop(small2);
        let large = pool.take(3 * M);
        assert_eq!(large.as_ptr(), big_at);
        assert_eq!(pooled(), K64);
        let small = pool.take(8192);
        assert_eq!(pooled(), 0);
        drop(small);
        // Beyond the bound, buffers are let go.
        let extra = pool.take(2 * M);
        drop(extra);
        assert_eq!(pooled(), K64 + 2 * M);
        drop(large);
        assert_eq!(pooled(), K64 + 2 * M, "over the bound: freed");
    }

    #[test]
    fn a_commit_gives_the_record_its_time_and_moved_positions_and_must_agree() {
        let at = |k: usize| MediaPosition {
            medium: "m".into(),
            locator: format!("@{k}"),
        };
        let record = SetRecord {
            header: SetHeader {
                set: SetId::new("s"),
                label: String::new(),
                agent: "h".into(),
                sources: vec![],
                image: crate::model::ImageId::new("i"),
                frozen_at: 1,
                started_at: 1,
            },
            items: (0..3)
                .map(|k| ItemRecord {
                    header: header_of(&file(&format!("f{k}"))),
                    trailer: ItemTrailer {
                        length: Bytes(0),
                        blake3: String::new(),
                        config: crate::model::ConfigId::new("c"),
                        remaps: 0,
                        captured_after_freeze: false,
                    },
                    position: at(k),
                })
                .collect(),
            failures: vec![],
            committed_at: 0,
        };
        let c = Committed::of(&record);
        let same = committed(
            record.clone(),
            Committed {
                committed_at: 77,
                ..c.clone()
            },
        )
        .unwrap();
        assert_eq!(same.committed_at, 77);
        assert_eq!(same.items, record.items);
        let moved: Vec<MediaPosition> = (10..13).map(at).collect();
        let tape = committed(
            record.clone(),
            Committed {
                positions: moved.clone(),
                ..c.clone()
            },
        )
        .unwrap();
        let got: Vec<MediaPosition> = tape.items.iter().map(|i| i.position.clone()).collect();
        assert_eq!(got, moved);
        let short = committed(
            record.clone(),
            Committed {
                items: 2,
                ..c.clone()
            },
        )
        .unwrap_err();
        assert_eq!(short.kind(), ErrorKind::Media);
        assert!(
            short.to_string().contains("2 items; the mover ended 3"),
            "{short}"
        );
        let few = committed(
            record,
            Committed {
                positions: moved[..2].to_vec(),
                ..c
            },
        )
        .unwrap_err();
        assert!(few.to_string().contains("2 positions for 3 items"), "{few}");
    }

    #[test]
    fn a_volume_s_holes_are_its_hole_extents_merged() {
        let ext = |at: u64, len: u64, kind: ExtentKind| MapExtent {
            logical: ItemOffset(at),
            length: Bytes(len),
            kind,
        };
        let extents = vec![
            ext(0, 10, ExtentKind::Hole),
            ext(10, 5, ExtentKind::Hole),
            ext(15, 5, ExtentKind::Zero),
            ext(20, 0, ExtentKind::Hole),
            ext(20, 7, ExtentKind::Inline(vec![1; 7])),
            ext(27, 3, ExtentKind::Hole),
        ];
        assert_eq!(volume_holes(&extents), vec![[0, 15], [27, 3]]);
        assert!(volume_holes(&[]).is_empty());
    }
    use crate::model::ConfigId;

    fn file(path: &str) -> Item {
        Item {
            id: ItemId::new(path),
            kind: ItemKind::File,
            size: Bytes(0),
            config: ConfigId::new("c"),
            meta: Default::default(),
            extents: Vec::new(),
            file: None,
        }
    }

    #[test]
    fn path_order_puts_a_directory_s_contents_before_its_next_sibling() {
        let mut items: Vec<Item> = ["/r/a.txt", "/r/a/z", "/r/b", "/r", "/r/a"]
            .into_iter()
            .map(file)
            .collect();
        order_items(&mut items, true);
        let got: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(got, ["/r", "/r/a", "/r/a/z", "/r/a.txt", "/r/b"]);
    }
}
