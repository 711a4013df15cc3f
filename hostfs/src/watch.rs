//! The writes submitted to a file system's devices after its map began,
//! seen as the kernel submits them: the `block:block_bio_queue`
//! tracepoint, one perf event per CPU, filtered to the devices and to
//! anything but reads. A write reaches a device only after its bio was
//! queued, so while no queued write overlaps a mapped extent, every
//! extent the mover has read held what it held when it was mapped — a
//! flush-only freeze of a file system nobody writes to then costs no
//! check per file after the thaw ([`crate::mapper`]'s `untouched`).
//!
//! A thread drains the rings every few milliseconds into a list of the
//! writes seen (overlapping ones merged), which the agent takes when it
//! looks: a busy host's writes elsewhere do not overflow a ring while the
//! map is made or between two checks.
//!
//! The watch vouches for nothing once it may have missed a record: a
//! lost or throttled record, a ring that filled between two drains, a
//! count of hits above the records kept, more distinct writes than it
//! keeps, a CPU that came or went.
//! Writes that bypass the block layer's bios (SCSI pass-through, another
//! host on the same SAN) are not seen — nor would a per-file check see
//! them: they corrupt the file system under its own kernel.

use crate::sys::perf::TracepointRing;
use floe_core::model::DeviceId;
use std::path::Path;

/// A device to watch: its identity in maps, its kernel device number,
/// and where its sectors are in the identity's address space (a
/// partition's bios may be traced on the whole disk, after the kernel
/// added the partition's start).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watched {
    /// The identity map extents name.
    pub device: DeviceId,
    /// The block device number traced (`st_rdev`).
    pub dev: u64,
    /// Byte address in `device`'s space of the traced device's sector 0.
    pub delta: i128,
}

/// Where a tracepoint's fields are in its raw record (tracefs `format`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Format {
    /// The tracepoint's id (perf's `config`).
    pub id: u64,
    dev: usize,
    sector: usize,
    nr_sector: usize,
    rwbs: (usize, usize),
}

fn field(format: &str, name: &str) -> Option<(usize, usize)> {
    format.lines().find_map(|l| {
        let mut decl = None;
        let mut offset = None;
        let mut size = None;
        for part in l.split(';') {
            let part = part.trim();
            if let Some(d) = part.strip_prefix("field:") {
                decl = d.split_whitespace().last();
            } else if let Some(o) = part.strip_prefix("offset:") {
                offset = o.parse().ok();
            } else if let Some(s) = part.strip_prefix("size:") {
                size = s.parse().ok();
            }
        }
        let decl = decl?;
        let bare = decl.split('[').next().unwrap_or(decl);
        (bare == name).then_some(())?;
        Some((offset?, size?))
    })
}

/// The fields of `block_bio_queue` from its `id` and `format` files.
pub fn parse_format(id: &str, format: &str) -> Option<Format> {
    let (dev, 4) = field(format, "dev")? else {
        return None;
    };
    let (sector, 8) = field(format, "sector")? else {
        return None;
    };
    let (nr_sector, 4) = field(format, "nr_sector")? else {
        return None;
    };
    let rwbs = field(format, "rwbs")?;
    Some(Format {
        id: id.trim().parse().ok()?,
        dev,
        sector,
        nr_sector,
        rwbs,
    })
}

const EVENT: &str = "events/block/block_bio_queue";

fn read_format(tracefs: &Path) -> Option<Format> {
    let id = std::fs::read_to_string(tracefs.join(EVENT).join("id")).ok()?;
    let format = std::fs::read_to_string(tracefs.join(EVENT).join("format")).ok()?;
    parse_format(&id, &format)
}

/// The tracepoint, from tracefs where it is mounted, else from a tracefs
/// mounted for the moment on a directory of our own (and unmounted).
fn tracepoint() -> Result<Format, String> {
    static FORMAT: std::sync::OnceLock<Result<Format, String>> = std::sync::OnceLock::new();
    FORMAT
        .get_or_init(|| {
            for at in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
                if let Some(f) = read_format(Path::new(at)) {
                    return Ok(f);
                }
            }
            let dir = std::env::temp_dir().join(format!("floe-tracefs-{}", std::process::id()));
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let mounted = rustix::mount::mount(
                "tracefs",
                &dir,
                "tracefs",
                rustix::mount::MountFlags::empty(),
                None,
            );
            let got = mounted
                .map_err(|e| format!("cannot mount tracefs: {e}"))
                .and_then(|()| {
                    let f = read_format(&dir);
                    let _ = rustix::mount::unmount(&dir, rustix::mount::UnmountFlags::DETACH);
                    f.ok_or_else(|| format!("tracefs has no readable {EVENT}"))
                });
            let _ = std::fs::remove_dir(&dir);
            got
        })
        .clone()
}

/// The kernel's own encoding of a device number (`MKDEV`: major << 20).
fn kernel_dev(dev: u64) -> u64 {
    (u64::from(libc::major(dev)) << 20) | u64::from(libc::minor(dev))
}

fn user_dev(kernel: u32) -> u64 {
    libc::makedev(kernel >> 20, kernel & 0xf_ffff)
}

/// The CPUs of a `/sys/devices/system/cpu/online` list (`0-3,6`).
pub fn parse_cpus(text: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
        if b < a || b - a > 65_536 {
            return None;
        }
        cpus.extend(a..=b);
    }
    (!cpus.is_empty()).then_some(cpus)
}

const ONLINE: &str = "/sys/devices/system/cpu/online";

/// A write a record shows: traced device number and byte range there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Write {
    /// `st_rdev` of the device the bio was queued on.
    pub dev: u64,
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
}

/// What a batch of records held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Records {
    /// Samples (whatever they showed).
    pub samples: u64,
    /// Writes with data (or a range: discards, zeroing).
    pub writes: Vec<Write>,
}

const PERF_RECORD_SAMPLE: u32 = 9;

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The records of a perf ring buffer (as drained), for `format`'s
/// tracepoint sampled raw. Anything but a sample (a lost or throttle
/// record) or a malformed record is an error: the watch missed writes.
pub fn parse_records(b: &[u8], format: &Format) -> Result<Records, String> {
    let mut out = Records::default();
    let mut at = 0;
    while at < b.len() {
        let (Some(kind), Some(size)) = (u32_at(b, at), b.get(at + 6..at + 8)) else {
            return Err(format!("a record header cut short at byte {at}"));
        };
        let size = usize::from(u16::from_ne_bytes([size[0], size[1]]));
        if size < 8 || at + size > b.len() {
            return Err(format!(
                "a record of {size} bytes at byte {at} does not fit"
            ));
        }
        let rec = &b[at..at + size];
        at += size;
        if kind != PERF_RECORD_SAMPLE {
            return Err(format!(
                "the kernel dropped or throttled records (record type {kind})"
            ));
        }
        let raw_len = u32_at(rec, 8).ok_or("a sample without its raw size")?;
        let raw = usize::try_from(raw_len)
            .ok()
            .and_then(|n| rec.get(12..12 + n))
            .ok_or("a sample's raw data does not fit its record")?;
        out.samples += 1;
        let (Some(dev), Some(sector), Some(nr)) = (
            u32_at(raw, format.dev),
            u64_at(raw, format.sector),
            u32_at(raw, format.nr_sector),
        ) else {
            return Err("a sample shorter than the tracepoint's fields".into());
        };
        let rwbs = raw
            .get(format.rwbs.0..format.rwbs.0 + format.rwbs.1)
            .ok_or("a sample shorter than its rwbs")?;
        // `F` first: a flush before the operation (REQ_PREFLUSH).
        let op = rwbs.iter().copied().find(|c| *c != b'F');
        match (op, nr) {
            // Reads (the filter keeps them out) and flushes change nothing.
            (Some(b'R'), _) | (None | Some(0), _) => continue,
            // A write without data is a flush.
            (Some(b'W'), 0) => continue,
            (Some(c), 0) => {
                return Err(format!(
                    "a write of unknown range ({}) was queued",
                    char::from(c)
                ))
            }
            _ => {}
        }
        out.writes.push(Write {
            dev: user_dev(dev),
            start: sector.saturating_mul(512),
            length: u64::from(nr) * 512,
        });
    }
    Ok(out)
}

/// Room left in a ring below which a record may have been dropped (a
/// `block_bio_queue` sample is under 100 bytes).
const SLACK: usize = 256;
/// Pages of records per CPU (about 1,300 records).
const DATA_PAGES: usize = 32;
/// How often the rings are drained in the background, between the
/// agent's looks: a ring then overflows only if one CPU queues more than
/// ~100,000 writes a second to the watched devices (a busy database does
/// not), not whenever the map takes longer than the ring's worth of the
/// host's writes.
const DRAIN_EVERY: std::time::Duration = std::time::Duration::from_millis(10);
/// Writes kept between two looks, at most (after merging overlapping
/// ones): 24 MiB.
const PENDING_MAX: usize = 1 << 20;

/// The rings and what was drained from them.
struct Rings {
    format: Format,
    /// Each online CPU's ring, and the samples read from it.
    rings: Vec<(TracepointRing, u64)>,
    online: String,
    /// Why the watch stopped vouching (for good).
    blind: Option<String>,
    buf: Vec<u8>,
    /// Writes drained and not handed out yet.
    pending: Vec<Write>,
}

impl Rings {
    /// Drain every ring into `pending`, unless blind; blind (for good,
    /// `pending` dropped) once a write may have been missed. `full`: also
    /// check that the online CPUs are the same and that every hit the
    /// events counted was read (when the agent looks; the drain thread
    /// only empties the rings, with no system call, so that draining
    /// every few milliseconds costs next to nothing).
    fn take(&mut self, full: bool) {
        if self.blind.is_some() {
            return;
        }
        if let Err(why) = self.drain(full) {
            self.blind = Some(why);
            self.pending = Vec::new();
        }
    }

    fn drain(&mut self, full: bool) -> Result<(), String> {
        if full {
            let online = std::fs::read_to_string(ONLINE).unwrap_or_default();
            if online != self.online {
                return Err(format!(
                    "the online CPUs changed ({} to {}): writes on a new one are not seen",
                    self.online.trim(),
                    online.trim()
                ));
            }
        }
        for (ring, seen) in &mut self.rings {
            // The count first: every hit it counts has its record in the
            // ring by the time the ring is read (or is being written: one
            // more look).
            let count = if full {
                ring.count().map_err(|e| format!("perf event count: {e}"))?
            } else {
                0
            };
            for pass in 0..2 {
                self.buf.clear();
                let room = ring.drain(&mut self.buf);
                if room < SLACK {
                    return Err("more writes than the watch holds between two drains".into());
                }
                let recs = parse_records(&self.buf, &self.format)?;
                *seen += recs.samples;
                self.pending.extend(recs.writes);
                if *seen >= count {
                    break;
                }
                if pass == 1 {
                    return Err(format!("{} writes counted, {} recorded", count, *seen));
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        keep_bounded(&mut self.pending, PENDING_MAX)
    }
}

/// Keep at most `max` pending writes: past half of it they are merged,
/// and more than `max` distinct ranges after merging is why the watch can
/// no longer vouch (the error).
fn keep_bounded(pending: &mut Vec<Write>, max: usize) -> Result<(), String> {
    if pending.len() > max / 2 {
        merge_writes(pending);
        if pending.len() > max {
            return Err(format!(
                "more writes than the watch keeps between two looks ({} distinct ranges)",
                pending.len()
            ));
        }
    }
    Ok(())
}

/// Sort `writes` and merge those of one device that overlap or touch:
/// the same bytes, fewer ranges (a database rewriting its pages queues
/// the same ranges again and again).
pub fn merge_writes(writes: &mut Vec<Write>) {
    writes.sort_unstable_by_key(|w| (w.dev, w.start));
    let mut out: Vec<Write> = Vec::with_capacity(writes.len());
    for w in writes.drain(..) {
        let end = w.start.saturating_add(w.length);
        match out.last_mut() {
            Some(last)
                if last.dev == w.dev && last.start.saturating_add(last.length) >= w.start =>
            {
                let last_end = last.start.saturating_add(last.length);
                last.length = last_end.max(end) - last.start;
            }
            _ => out.push(w),
        }
    }
    *writes = out;
}

/// Tells the drain thread to end.
#[derive(Default)]
struct Stop {
    stopped: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
}

/// The writes queued on some devices, from now on.
pub struct WriteWatch {
    devices: Vec<Watched>,
    rings: std::sync::Arc<std::sync::Mutex<Rings>>,
    stop: std::sync::Arc<Stop>,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The drain thread: the rings drained every [`DRAIN_EVERY`] until the
/// watch is dropped or blind.
fn drain_rings(rings: &std::sync::Mutex<Rings>, stop: &Stop) {
    floe_core::media::pausepoint("watch-drain");
    loop {
        {
            let g = lock(&stop.stopped);
            let (g, _) = stop
                .cv
                .wait_timeout_while(g, DRAIN_EVERY, |stopped| !*stopped)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *g {
                return;
            }
        }
        let mut r = lock(rings);
        r.take(false);
        if r.blind.is_some() {
            return;
        }
    }
}

impl WriteWatch {
    /// Watch `devices` for queued writes (other than reads and flushes).
    pub fn start(devices: Vec<Watched>) -> Result<WriteWatch, String> {
        if devices.is_empty() {
            return Err("no device to watch".into());
        }
        let format = tracepoint()?;
        let mut devs: Vec<u64> = devices.iter().map(|d| kernel_dev(d.dev)).collect();
        devs.sort_unstable();
        devs.dedup();
        let any: Vec<String> = devs.iter().map(|d| format!("dev == {d}")).collect();
        let filter = format!("({}) && !(rwbs ~ \"R*\")", any.join(" || "));
        let filter = std::ffi::CString::new(filter).map_err(|e| e.to_string())?;
        let online = std::fs::read_to_string(ONLINE).map_err(|e| format!("{ONLINE}: {e}"))?;
        let cpus =
            parse_cpus(&online).ok_or_else(|| format!("{ONLINE}: cannot read {online:?}"))?;
        let rings = cpus
            .iter()
            .map(|&cpu| {
                TracepointRing::open(format.id, cpu, &filter, DATA_PAGES)
                    .map(|r| (r, 0))
                    .map_err(|e| format!("perf event on CPU {cpu}: {e}"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let rings = std::sync::Arc::new(std::sync::Mutex::new(Rings {
            format,
            rings,
            online,
            blind: None,
            buf: Vec::new(),
            pending: Vec::new(),
        }));
        let stop = std::sync::Arc::new(Stop::default());
        // Not joined: it ends at its next wake once told (the watch's
        // owner does not wait on it).
        let (r, st) = (rings.clone(), stop.clone());
        std::thread::Builder::new()
            .name("floe-watch".into())
            .spawn(move || drain_rings(&r, &st))
            .map_err(|e| format!("cannot start the thread that drains the watch: {e}"))?;
        Ok(WriteWatch {
            devices,
            rings,
            stop,
        })
    }

    /// The devices watched.
    pub fn devices(&self) -> &[Watched] {
        &self.devices
    }

    /// The writes queued since the last call (the first: since the
    /// start), as (index into [`WriteWatch::devices`], first byte, end)
    /// in the device identity's address space; an error, for good, once
    /// the watch may have missed one.
    pub fn writes(&mut self) -> Result<Vec<(usize, u64, u64)>, String> {
        let found = {
            let mut r = lock(&self.rings);
            r.take(true);
            if let Some(why) = &r.blind {
                return Err(why.clone());
            }
            std::mem::take(&mut r.pending)
        };
        let mut out = Vec::new();
        for w in found {
            let end = w.start.saturating_add(w.length);
            for (k, d) in self
                .devices
                .iter()
                .enumerate()
                .filter(|(_, d)| d.dev == w.dev)
            {
                let at = |b: u64| -> u64 {
                    u64::try_from((i128::from(b) + d.delta).max(0)).unwrap_or(u64::MAX)
                };
                out.push((k, at(w.start), at(end)));
            }
        }
        Ok(out)
    }
}

impl Drop for WriteWatch {
    fn drop(&mut self) {
        *lock(&self.stop.stopped) = true;
        self.stop.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_writes_are_merged_past_half_the_bound_and_blind_past_it() {
        let w = |dev, start, length| Write { dev, start, length };
        // The same few ranges again and again (a database's pages): merged
        // down, however many times they come.
        let mut pending: Vec<Write> = (0..1000).map(|k| w(1, (k % 4) * 8192, 4096)).collect();
        assert_eq!(keep_bounded(&mut pending, 100), Ok(()));
        assert_eq!(pending.len(), 4);
        // Below half the bound nothing is touched (no sort per drain).
        let mut few = vec![w(1, 9000, 1), w(1, 0, 1)];
        assert_eq!(keep_bounded(&mut few, 100), Ok(()));
        assert_eq!(few[0].start, 9000);
        // Distinct ranges past the bound: blind, saying why.
        let mut many: Vec<Write> = (0..101).map(|k| w(2, k * 8192, 4096)).collect();
        let why = keep_bounded(&mut many, 100).unwrap_err();
        assert!(why.contains("101 distinct ranges"), "{why}");
        // Exactly the bound is still kept.
        let mut full: Vec<Write> = (0..100).map(|k| w(2, k * 8192, 4096)).collect();
        assert_eq!(keep_bounded(&mut full, 100), Ok(()));
    }

    /// `block_bio_queue`'s format as this kernel (6.18) writes it.
    const FORMAT: &str = "name: block_bio_queue
ID: 2097
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:char rwbs[10];\toffset:28;\tsize:10;\tsigned:0;
\tfield:char comm[16];\toffset:38;\tsize:16;\tsigned:0;

print fmt: \"%d,%d %s %llu + %u [%s]\", ((unsigned int) ((REC->dev) >> 20))
";

    fn format() -> Format {
        parse_format("2097\n", FORMAT).expect("parsed")
    }

    fn sample(dev: u32, sector: u64, nr: u32, rwbs: &str) -> Vec<u8> {
        let mut raw = vec![0u8; 56];
        raw[8..12].copy_from_slice(&dev.to_ne_bytes());
        raw[16..24].copy_from_slice(&sector.to_ne_bytes());
        raw[24..28].copy_from_slice(&nr.to_ne_bytes());
        raw[28..28 + rwbs.len()].copy_from_slice(rwbs.as_bytes());
        let size = 8 + 4 + raw.len();
        let mut rec = Vec::new();
        rec.extend_from_slice(&PERF_RECORD_SAMPLE.to_ne_bytes());
        rec.extend_from_slice(&0u16.to_ne_bytes());
        rec.extend_from_slice(&u16::try_from(size).unwrap().to_ne_bytes());
        rec.extend_from_slice(&u32::try_from(raw.len()).unwrap().to_ne_bytes());
        rec.extend_from_slice(&raw);
        rec
    }

    #[test]
    fn the_tracepoint_s_fields_are_found_where_its_format_puts_them() {
        assert_eq!(
            format(),
            Format {
                id: 2097,
                dev: 8,
                sector: 16,
                nr_sector: 24,
                rwbs: (28, 10),
            }
        );
        // A field of another size than the kernel's is not guessed at.
        let odd = FORMAT.replace("sector;\toffset:16;\tsize:8", "sector;\toffset:16;\tsize:4");
        assert_eq!(parse_format("2097", &odd), None);
        assert_eq!(parse_format("x", FORMAT), None);
    }

    #[test]
    fn writes_discards_and_zeroing_are_ranges_reads_and_flushes_are_nothing() {
        let loop0 = 7 << 20;
        let mut b = Vec::new();
        b.extend(sample(loop0, 80, 8, "WS"));
        b.extend(sample(loop0, 0, 0, "FWS")); // a flush
        b.extend(sample(loop0, 1000, 16, "RA"));
        b.extend(sample(loop0, 2048, 2048, "D"));
        b.extend(sample(loop0 | 3, 10, 1, "FWFS")); // loop3, preflush + FUA
        b.extend(sample(loop0, 64, 8, "N")); // write zeroes
        let r = parse_records(&b, &format()).unwrap();
        assert_eq!(r.samples, 6);
        let dev0 = libc::makedev(7, 0);
        assert_eq!(
            r.writes,
            vec![
                Write {
                    dev: dev0,
                    start: 40960,
                    length: 4096
                },
                Write {
                    dev: dev0,
                    start: 2048 * 512,
                    length: 2048 * 512
                },
                Write {
                    dev: libc::makedev(7, 3),
                    start: 5120,
                    length: 512
                },
                Write {
                    dev: dev0,
                    start: 32768,
                    length: 4096
                },
            ]
        );
    }

    #[test]
    fn a_lost_record_a_write_of_unknown_range_or_a_torn_record_blinds_the_watch() {
        let mut lost = Vec::new();
        lost.extend_from_slice(&2u32.to_ne_bytes());
        lost.extend_from_slice(&0u16.to_ne_bytes());
        lost.extend_from_slice(&24u16.to_ne_bytes());
        lost.extend_from_slice(&[0u8; 16]);
        let e = parse_records(&lost, &format()).unwrap_err();
        assert!(e.contains("dropped or throttled"), "{e}");
        let e = parse_records(&sample(7 << 20, 0, 0, "N"), &format()).unwrap_err();
        assert!(e.contains("unknown range"), "{e}");
        let whole = sample(7 << 20, 80, 8, "WS");
        let e = parse_records(&whole[..whole.len() - 3], &format()).unwrap_err();
        assert!(e.contains("does not fit"), "{e}");
        let e = parse_records(&whole[..5], &format()).unwrap_err();
        assert!(e.contains("cut short"), "{e}");
    }

    #[test]
    fn online_cpu_lists_are_read_as_the_kernel_writes_them() {
        assert_eq!(parse_cpus("0-1\n"), Some(vec![0, 1]));
        assert_eq!(parse_cpus("0,2-4,7"), Some(vec![0, 2, 3, 4, 7]));
        assert_eq!(parse_cpus(""), None);
        assert_eq!(parse_cpus("3-1"), None);
        assert_eq!(parse_cpus("a"), None);
    }

    proptest::proptest! {
        /// Whatever bytes a ring holds, reading them never panics.
        #[test]
        fn any_bytes_parse_or_fail_cleanly(b in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = parse_records(&b, &format());
        }

        /// Merging keeps exactly the bytes written, per device, in
        /// sorted ranges that neither overlap nor touch.
        #[test]
        fn merged_writes_cover_the_same_bytes(
            ws in proptest::collection::vec((0u64..3, 0u64..200, 0u64..20), 0..60)
        ) {
            let mut writes: Vec<Write> = ws
                .iter()
                .map(|&(dev, start, length)| Write { dev, start, length })
                .collect();
            let before = writes.clone();
            merge_writes(&mut writes);
            let covered = |ws: &[Write], dev: u64, b: u64| {
                ws.iter().any(|w| w.dev == dev && w.start <= b && b < w.start + w.length)
            };
            for dev in 0..3 {
                for b in 0..230 {
                    proptest::prop_assert_eq!(covered(&before, dev, b), covered(&writes, dev, b));
                }
            }
            for pair in writes.windows(2) {
                proptest::prop_assert!(
                    pair[0].dev < pair[1].dev
                        || pair[0].start + pair[0].length < pair[1].start,
                    "{:?}", pair
                );
            }
        }
    }

    #[test]
    fn overlapping_and_touching_writes_merge_others_stay() {
        let w = |dev, start, length| Write { dev, start, length };
        let mut ws = vec![
            w(2, 0, 8),
            w(1, 10, 5),
            w(1, 0, 4),
            w(1, 4, 2),
            w(1, 12, 10),
            w(2, 9, 1),
        ];
        merge_writes(&mut ws);
        assert_eq!(ws, vec![w(1, 0, 6), w(1, 10, 12), w(2, 0, 8), w(2, 9, 1)]);
    }
}
