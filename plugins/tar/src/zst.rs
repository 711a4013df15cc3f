//! Compressed archives (media option `compress=zstd`): the same pax
//! archive, cut into frames of [`FRAME`] bytes that are compressed one by
//! one as independent zstd frames, followed by a seek table in zstd's
//! *seekable format* (a skippable frame, which `zstd -d` and `tar --zstd`
//! pass over). A reader maps an offset of the archive (an item's locator)
//! to the one frame that holds it and inflates only that frame.
//!
//! Writing: the frames are compressed by a small pool of threads while
//! the next one fills, and handed to [`ArchiveOut`] (O_DIRECT stages) in
//! order. A checkpoint ends the frame being filled (a short frame), so
//! every journaled end of the archive is a frame boundary: a resumed set
//! goes on from a whole frame, with the table the journal kept.
//!
//! Format: `docs/formats/tar-media.md`, "Compressed archives".

use crate::out::{ArchiveOut, Handed};
use floe_core::units::Bytes;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};

/// Bytes of the archive per frame (a reader inflates a whole frame to
/// reach any byte in it; a tree restore's worker reads runs of ~1 MiB).
pub(crate) const FRAME: usize = 1 << 20;
/// A zstd skippable frame's magic (the seek table's frame).
const SKIPPABLE_MAGIC: u32 = 0x184D_2A5E;
/// The seekable format's magic, the table's last four bytes.
const SEEKABLE_MAGIC: u32 = 0x8F92_EAB1;
/// Number of frames (u32), descriptor (u8), magic (u32).
const FOOTER: usize = 9;
/// The seekable format's limit on frames.
const MAX_FRAMES: usize = 0x800_0000;
/// Frames compressed at once by the pool, at most, beyond the one
/// filling.
const IN_FLIGHT: usize = 4;

/// One frame: its compressed and decompressed sizes, as the seek table
/// lists them.
pub type FrameSizes = [u32; 2];

/// The compressed bytes of `frames` (the file's bytes before the table).
pub fn compressed_len(frames: &[FrameSizes]) -> u64 {
    frames.iter().map(|[c, _]| u64::from(*c)).sum()
}

/// The seek table for `frames`: a skippable frame of the entries
/// (compressed size, decompressed size; no checksums: each frame carries
/// zstd's own) and the footer.
pub fn encode_seek_table(frames: &[FrameSizes]) -> Vec<u8> {
    let body = frames.len() * 8 + FOOTER;
    let mut out = Vec::with_capacity(8 + body);
    out.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    out.extend_from_slice(&u32::try_from(body).unwrap_or(u32::MAX).to_le_bytes());
    for [c, d] in frames {
        out.extend_from_slice(&c.to_le_bytes());
        out.extend_from_slice(&d.to_le_bytes());
    }
    out.extend_from_slice(
        &u32::try_from(frames.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    out.push(0);
    out.extend_from_slice(&SEEKABLE_MAGIC.to_le_bytes());
    out
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// How many bytes at the end of a compressed archive its seek table
/// takes, from the table's footer (the last [`FOOTER`] bytes); why not.
pub fn seek_table_len(footer: &[u8]) -> Result<usize, String> {
    if footer.len() != FOOTER || le32(footer, 5) != Some(SEEKABLE_MAGIC) {
        return Err("no zstd seek table at its end (not a seekable zstd archive)".into());
    }
    let n = le32(footer, 0).map_or(usize::MAX, |n| n as usize);
    if n > MAX_FRAMES {
        return Err(format!("its seek table claims {n} frames"));
    }
    let descriptor = footer[4];
    if descriptor & 0x7c != 0 {
        return Err(format!(
            "its seek table's descriptor {descriptor:#x} sets reserved bits"
        ));
    }
    let entry = if descriptor & 0x80 != 0 { 12 } else { 8 };
    Ok(8 + n * entry + FOOTER)
}

/// Decode a seek table (the archive's last [`seek_table_len`] bytes),
/// checking it against the length of what precedes it: the frames' sizes.
pub fn decode_seek_table(table: &[u8], frames_len: Bytes) -> Result<Vec<FrameSizes>, String> {
    let frames_len = frames_len.0;
    let footer = table
        .len()
        .checked_sub(FOOTER)
        .and_then(|at| table.get(at..))
        .ok_or("its seek table is cut short")?;
    if seek_table_len(footer)? != table.len() {
        return Err("its seek table's length disagrees with its footer".into());
    }
    if le32(table, 0) != Some(SKIPPABLE_MAGIC)
        || le32(table, 4).map(|n| n as usize) != Some(table.len() - 8)
    {
        return Err("its seek table is not a well-formed skippable frame".into());
    }
    let entry = if footer[4] & 0x80 != 0 { 12 } else { 8 };
    let frames: Vec<FrameSizes> = table[8..table.len() - FOOTER]
        .chunks_exact(entry)
        .map(|e| [le32(e, 0).unwrap_or(0), le32(e, 4).unwrap_or(0)])
        .collect();
    let sum = compressed_len(&frames);
    if sum != frames_len {
        return Err(format!(
            "its seek table's frames hold {sum} bytes, the file {frames_len} before the table"
        ));
    }
    if let Some(k) = frames.iter().position(|[c, d]| *c == 0 || *d == 0) {
        return Err(format!("its seek table lists an empty frame ({k})"));
    }
    Ok(frames)
}

/// A frame to compress (its sequence number, the bytes, a buffer for the
/// result) and what comes back (the bytes' buffer to fill again).
type Job = (u64, Vec<u8>, Vec<u8>);
type Done = (u64, Vec<u8>, std::io::Result<Vec<u8>>);

/// Threads compressing frames, each with a zstd context of its own.
struct Pool {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Pool {
    fn start(level: i32, n: usize) -> std::io::Result<Pool> {
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let (tx, done) = std::sync::mpsc::channel::<Done>();
        let mut threads = Vec::with_capacity(n);
        for _ in 0..n {
            let (rx, tx) = (rx.clone(), tx.clone());
            let mut z = zstd::bulk::Compressor::new(level)?;
            z.include_checksum(true)?;
            z.include_contentsize(true)?;
            threads.push(
                std::thread::Builder::new()
                    .name("floe-tar-zstd".into())
                    .spawn(move || loop {
                        let job = rx
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .recv();
                        let Ok((seq, raw, mut out)) = job else { return };
                        out.clear();
                        out.reserve(zstd::zstd_safe::compress_bound(raw.len()));
                        let r = z.compress_to_buffer(&raw, &mut out).map(|_| out);
                        if tx.send((seq, raw, r)).is_err() {
                            return;
                        }
                    })?,
            );
        }
        Ok(Pool {
            jobs: Some(jobs),
            done,
            threads,
        })
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        drop(self.jobs.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A compressed archive open for writing: bytes are put as into
/// [`ArchiveOut`] (offsets count the archive's own, uncompressed bytes);
/// the file gets frames and, at [`ZstOut::finish`], the seek table.
pub struct ZstOut {
    inner: ArchiveOut,
    pool: Pool,
    /// The frame being filled.
    frame: Vec<u8>,
    /// Frames handed to the pool and not yet put, and the next one's
    /// number; frames done out of order wait here.
    sent: u64,
    next: u64,
    ready: BTreeMap<u64, (Vec<u8>, std::io::Result<Vec<u8>>)>,
    /// Buffers back from the pool (fresh memory costs page faults).
    spare_raw: Vec<Vec<u8>>,
    spare_out: Vec<Vec<u8>>,
    /// Every frame put into the file, in order, and their compressed
    /// bytes in all.
    frames: Vec<FrameSizes>,
    zlen: u64,
}

/// Compressing threads: one per CPU, two at most (the mover's own threads
/// read, hash and write beside them).
fn pool_size() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(2))
}

impl ZstOut {
    /// A new, empty compressed archive at `path`, frames at `level`.
    pub fn create(path: &Path, direct: bool, level: i32) -> std::io::Result<ZstOut> {
        Self::on(ArchiveOut::create(path, direct)?, level, Vec::new())
    }

    /// The compressed archive at `path`, cut after `frames` (their
    /// compressed bytes: the file's first bytes), written on from there.
    pub fn resume(
        path: &Path,
        frames: Vec<FrameSizes>,
        direct: bool,
        level: i32,
    ) -> std::io::Result<ZstOut> {
        Self::on(
            ArchiveOut::resume(path, compressed_len(&frames), direct)?,
            level,
            frames,
        )
    }

    fn on(inner: ArchiveOut, level: i32, frames: Vec<FrameSizes>) -> std::io::Result<ZstOut> {
        let zlen = compressed_len(&frames);
        Ok(ZstOut {
            inner,
            pool: Pool::start(level, pool_size())?,
            frame: Vec::with_capacity(FRAME),
            sent: 0,
            next: 0,
            ready: BTreeMap::new(),
            spare_raw: Vec::new(),
            spare_out: Vec::new(),
            frames,
            zlen,
        })
    }

    /// The file (for an fsync on another thread).
    pub fn file(&self) -> &File {
        self.inner.file()
    }

    /// Every frame in the file so far (after [`ZstOut::hand_over`]: all
    /// of the archive's bytes put).
    pub fn frames(&self) -> &[FrameSizes] {
        &self.frames
    }

    /// Compressed bytes in the file so far.
    #[cfg(test)]
    pub(crate) fn zlen(&self) -> u64 {
        self.zlen
    }

    /// Append `bytes` to the archive.
    pub fn put(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let n = bytes.len().min(FRAME - self.frame.len());
            self.frame.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.frame.len() == FRAME {
                self.send_frame()?;
            }
        }
        Ok(())
    }

    /// Hand the frame being filled to the pool (if it holds anything),
    /// then put what is done.
    fn send_frame(&mut self) -> std::io::Result<()> {
        if self.frame.is_empty() {
            return Ok(());
        }
        while self.sent - self.next >= IN_FLIGHT as u64 {
            self.wait_one()?;
        }
        let fresh = self
            .spare_raw
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(FRAME));
        let raw = std::mem::replace(&mut self.frame, fresh);
        let out = self.spare_out.pop().unwrap_or_default();
        let sent = self
            .pool
            .jobs
            .as_ref()
            .is_some_and(|j| j.send((self.sent, raw, out)).is_ok());
        if !sent {
            return Err(std::io::Error::other("the archive's zstd threads stopped"));
        }
        self.sent += 1;
        while let Ok((seq, raw, r)) = self.pool.done.try_recv() {
            self.ready.insert(seq, (raw, r));
        }
        self.put_ready()
    }

    /// Wait for one more frame from the pool, and put what is done.
    fn wait_one(&mut self) -> std::io::Result<()> {
        let (seq, raw, r) = self
            .pool
            .done
            .recv()
            .map_err(|_| std::io::Error::other("the archive's zstd threads stopped"))?;
        self.ready.insert(seq, (raw, r));
        self.put_ready()
    }

    /// Put the frames done, in order, into the file.
    fn put_ready(&mut self) -> std::io::Result<()> {
        while let Some((mut raw, r)) = self.ready.remove(&self.next) {
            let z = r.map_err(|e| std::io::Error::other(format!("zstd: {e}")))?;
            let sizes = [
                u32::try_from(z.len()).map_err(std::io::Error::other)?,
                u32::try_from(raw.len()).map_err(std::io::Error::other)?,
            ];
            self.inner.put(&z)?;
            self.frames.push(sizes);
            self.zlen += u64::from(sizes[0]);
            self.next += 1;
            raw.clear();
            self.spare_raw.push(raw);
            self.spare_out.push(z);
        }
        Ok(())
    }

    /// End the frame being filled and wait until every frame is in the
    /// file's stages (what [`ZstOut::frames`] then lists is the whole
    /// archive so far).
    fn close_frames(&mut self) -> std::io::Result<()> {
        self.send_frame()?;
        while self.next < self.sent {
            self.wait_one()?;
        }
        Ok(())
    }

    /// As [`ArchiveOut::hand_over`], after ending the frame being filled:
    /// every byte put so far is in whole frames on their way to the file.
    pub(crate) fn hand_over(&mut self) -> std::io::Result<Option<Handed>> {
        self.close_frames()?;
        self.inner.hand_over()
    }

    /// End the last frame, append the seek table, flush, and cut the file
    /// to its length; `len` is the archive's (uncompressed) length, checked
    /// against the frames'.
    pub fn finish(&mut self, len: u64) -> std::io::Result<()> {
        self.close_frames()?;
        let sum: u64 = self.frames.iter().map(|[_, d]| u64::from(*d)).sum();
        if sum != len {
            return Err(std::io::Error::other(format!(
                "compressed archive: frames hold {sum} bytes, the archive {len}"
            )));
        }
        if self.frames.len() > MAX_FRAMES {
            return Err(std::io::Error::other("compressed archive: too many frames"));
        }
        let table = encode_seek_table(&self.frames);
        self.inner.put(&table)?;
        self.inner.finish(self.zlen + table.len() as u64)
    }
}

/// Where each frame lies: its offsets in the file and in the archive.
#[derive(Debug)]
pub struct FrameIndex {
    /// Per frame: file offset, archive offset, compressed and
    /// decompressed size.
    frames: Vec<(u64, u64, u32, u32)>,
    /// The archive's length.
    len: u64,
}

impl FrameIndex {
    /// The frames of the compressed archive `file` (its seek table).
    pub fn read(file: &File) -> Result<FrameIndex, String> {
        let flen = file.metadata().map_err(|e| e.to_string())?.len();
        let mut footer = [0u8; FOOTER];
        let at = flen
            .checked_sub(FOOTER as u64)
            .ok_or("too short for a seek table")?;
        file.read_exact_at(&mut footer, at)
            .map_err(|e| e.to_string())?;
        let n = seek_table_len(&footer)?;
        let start = flen
            .checked_sub(n as u64)
            .ok_or("shorter than its seek table")?;
        let mut table = vec![0u8; n];
        file.read_exact_at(&mut table, start)
            .map_err(|e| e.to_string())?;
        Ok(Self::of(&decode_seek_table(&table, Bytes(start))?))
    }

    /// The index of frames of these sizes, in order from the file's start.
    pub fn of(sizes: &[FrameSizes]) -> FrameIndex {
        let (mut z, mut u) = (0, 0);
        let frames = sizes
            .iter()
            .map(|&[c, d]| {
                let f = (z, u, c, d);
                z += u64::from(c);
                u += u64::from(d);
                f
            })
            .collect();
        FrameIndex { frames, len: u }
    }

    /// The archive's (uncompressed) length.
    pub fn archive_len(&self) -> Bytes {
        Bytes(self.len)
    }
}

/// A compressed archive read as the archive it holds: `Read` and `Seek`
/// in the archive's offsets, one frame inflated at a time.
pub struct ZstReader {
    file: File,
    index: Arc<FrameIndex>,
    pos: u64,
    /// The frame inflated last and its number.
    cur: Option<usize>,
    data: Vec<u8>,
    zbuf: Vec<u8>,
    z: zstd::bulk::Decompressor<'static>,
}

impl ZstReader {
    /// Read `file` through its frames.
    pub fn new(file: File, index: Arc<FrameIndex>) -> std::io::Result<ZstReader> {
        Ok(ZstReader {
            file,
            index,
            pos: 0,
            cur: None,
            data: Vec::new(),
            zbuf: Vec::new(),
            z: zstd::bulk::Decompressor::new()?,
        })
    }

    /// The file read.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Inflate frame `k` (unless it is the one at hand).
    fn load(&mut self, k: usize) -> std::io::Result<()> {
        if self.cur == Some(k) {
            return Ok(());
        }
        self.cur = None;
        let (zat, _, c, d) = self.index.frames[k];
        self.zbuf.resize(c as usize, 0);
        self.file.read_exact_at(&mut self.zbuf, zat)?;
        self.data.clear();
        self.data.reserve(d as usize);
        let bad = |what: String| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("compressed archive, frame {k} at byte {zat}: {what}"),
            )
        };
        let n = self
            .z
            .decompress_to_buffer(&self.zbuf, &mut self.data)
            .map_err(|e| bad(e.to_string()))?;
        if n != d as usize {
            return Err(bad(format!(
                "inflates to {n} bytes, the seek table says {d}"
            )));
        }
        self.cur = Some(k);
        Ok(())
    }
}

impl Read for ZstReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.index.len || buf.is_empty() {
            return Ok(0);
        }
        let f = &self.index.frames;
        let k = f.partition_point(|(_, u, _, _)| *u <= self.pos) - 1;
        self.load(k)?;
        let off =
            usize::try_from(self.pos - self.index.frames[k].1).map_err(std::io::Error::other)?;
        let n = buf.len().min(self.data.len() - off);
        buf[..n].copy_from_slice(&self.data[off..off + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for ZstReader {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let base = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.index.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = base.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek before the archive's start",
            )
        })?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Bytes half random, half text (the bench tree's mix).
    fn archive_bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|i| {
                if (i / 4096) % 2 == 0 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()[0]
                } else {
                    b"static int floe(void) { return 0; }\n"[i % 36]
                }
            })
            .collect()
    }

    fn write(path: &Path, data: &[u8], pieces: &[usize], hand_every: usize) -> Vec<FrameSizes> {
        let o = std::cell::RefCell::new(ZstOut::create(path, true, 1).unwrap());
        crate::out::tests::in_pieces(
            data,
            pieces,
            hand_every,
            |b| o.borrow_mut().put(b).unwrap(),
            |at| {
                let mut o = o.borrow_mut();
                if let Some(h) = o.hand_over().unwrap() {
                    h.wait().unwrap();
                }
                // What a crash now leaves: whole frames of every byte put.
                let got: u64 = o.frames().iter().map(|[_, d]| u64::from(*d)).sum();
                assert_eq!(got, at as u64);
                assert!(std::fs::metadata(path).unwrap().len() >= o.zlen());
            },
        );
        let mut o = o.into_inner();
        o.finish(data.len() as u64).unwrap();
        o.frames().to_vec()
    }

    fn read_all(path: &Path) -> Vec<u8> {
        let f = File::open(path).unwrap();
        let ix = Arc::new(FrameIndex::read(&f).unwrap());
        let mut r = ZstReader::new(f, ix).unwrap();
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn a_compressed_archive_reads_back_exactly_and_zstd_itself_inflates_it() {
        let data = archive_bytes(3 * FRAME + 12345, 7);
        let d = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        for (pieces, every) in [(vec![512, 1, 4095, 70000], 7), (vec![FRAME + 3], 1)] {
            let p = d.path().join("a.tar.zst");
            let frames = write(&p, &data, &pieces, every);
            assert!(frames.len() > 3, "hand-overs end frames: {}", frames.len());
            assert!(read_all(&p) == data, "pieces {pieces:?}: bytes differ");
            let len = std::fs::metadata(&p).unwrap().len();
            assert!(len < data.len() as u64 * 3 / 4, "not compressed: {len}");
            // zstd's own tool, where installed, reads it as a plain zstd
            // stream (the seek table is a skippable frame).
            match std::process::Command::new("zstd")
                .args(["-d", "-c", "-q"])
                .arg(&p)
                .output()
            {
                Ok(out) => {
                    assert!(out.status.success(), "zstd -d: {out:?}");
                    assert!(out.stdout == data, "zstd -d gives other bytes");
                }
                Err(e) => eprintln!("SKIP part: no zstd tool ({e})"),
            }
        }
    }

    #[test]
    fn seeks_land_on_the_archive_s_bytes_in_any_order() {
        let data = archive_bytes(2 * FRAME + 999, 3);
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.tar.zst");
        write(&p, &data, &[100_000], 5);
        let f = File::open(&p).unwrap();
        let ix = Arc::new(FrameIndex::read(&f).unwrap());
        assert_eq!(ix.archive_len(), Bytes(data.len() as u64));
        let mut r = ZstReader::new(f, ix).unwrap();
        for at in [FRAME * 2 + 5, 0, FRAME - 3, 17, data.len() - 1, FRAME] {
            r.seek(SeekFrom::Start(at as u64)).unwrap();
            let mut b = [0u8; 10];
            let n = r.read(&mut b).unwrap();
            assert!(n > 0);
            assert_eq!(&b[..n], &data[at..at + n], "at {at}");
        }
        r.seek(SeekFrom::End(0)).unwrap();
        assert_eq!(r.read(&mut [0u8; 4]).unwrap(), 0);
        let back = i64::try_from(data.len()).unwrap() + 1;
        assert!(r.seek(SeekFrom::Current(-back)).is_err());
    }

    #[test]
    fn a_resumed_compressed_archive_keeps_its_frames_and_cuts_the_rest() {
        let data = archive_bytes(FRAME + 5000, 9);
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.tar.zst");
        let mut o = ZstOut::create(&p, true, 1).unwrap();
        o.put(&data[..FRAME / 2]).unwrap();
        if let Some(h) = o.hand_over().unwrap() {
            h.wait().unwrap();
        }
        let kept = o.frames().to_vec();
        // Written on after the checkpoint, then the writer dies.
        o.put(&data[FRAME / 2..]).unwrap();
        o.hand_over().unwrap();
        drop(o);
        let mut o = ZstOut::resume(&p, kept, true, 1).unwrap();
        o.put(b"after").unwrap();
        o.finish(FRAME as u64 / 2 + 5).unwrap();
        let got = read_all(&p);
        assert_eq!(got.len(), FRAME / 2 + 5);
        assert!(got[..FRAME / 2] == data[..FRAME / 2]);
        assert_eq!(&got[FRAME / 2..], b"after");
    }

    #[test]
    fn a_damaged_frame_is_an_error_naming_it_not_other_bytes() {
        let data = archive_bytes(2 * FRAME, 5);
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.tar.zst");
        let frames = write(&p, &data, &[FRAME], 1);
        let mut bytes = std::fs::read(&p).unwrap();
        // A byte in the middle of the second frame.
        let at = frames[0][0] as usize + frames[1][0] as usize / 2;
        bytes[at] ^= 0x40;
        std::fs::write(&p, &bytes).unwrap();
        let f = File::open(&p).unwrap();
        let mut r = ZstReader::new(
            f,
            Arc::new(FrameIndex::read(&File::open(&p).unwrap()).unwrap()),
        )
        .unwrap();
        let mut out = Vec::new();
        let e = r.read_to_end(&mut out).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
        assert!(e.to_string().contains("frame 1"), "{e}");
        assert_eq!(out.len(), FRAME, "the first frame's bytes, nothing after");
        // A seek table that lists another size for a sound frame: the
        // frame is refused, not read short or long.
        let p2 = d.path().join("b.tar.zst");
        let mut frames = write(&p2, &data, &[FRAME], 1);
        frames[0][1] += 1;
        let mut bytes = std::fs::read(&p2).unwrap();
        let at = usize::try_from(compressed_len(&frames)).unwrap();
        bytes.truncate(at);
        bytes.extend(encode_seek_table(&frames));
        std::fs::write(&p2, &bytes).unwrap();
        let f = File::open(&p2).unwrap();
        let ix = Arc::new(FrameIndex::read(&f).unwrap());
        let e = ZstReader::new(f, ix)
            .unwrap()
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(
            e.to_string().contains("frame 0") && e.to_string().contains("the seek table says"),
            "{e}"
        );
        // A file that is no seekable archive says so.
        std::fs::write(&p, b"plain bytes, no table").unwrap();
        let e = FrameIndex::read(&File::open(&p).unwrap()).unwrap_err();
        assert!(e.contains("no zstd seek table"), "{e}");
    }

    proptest! {
        #[test]
        fn seek_tables_round_trip(frames in proptest::collection::vec((1u32.., 1u32..), 0..200)) {
            let frames: Vec<FrameSizes> = frames.into_iter().map(|(c, d)| [c, d]).collect();
            let t = encode_seek_table(&frames);
            let n = seek_table_len(&t[t.len() - FOOTER..]).unwrap();
            prop_assert_eq!(n, t.len());
            let sum = compressed_len(&frames);
            prop_assert_eq!(decode_seek_table(&t, Bytes(sum)).unwrap(), frames.clone());
            // Frames that do not fill the file before the table: refused.
            prop_assert!(decode_seek_table(&t, Bytes(sum + 1)).is_err());
        }

        #[test]
        fn the_seek_table_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), len in any::<u64>()) {
            let _ = decode_seek_table(&bytes, Bytes(len));
            if bytes.len() >= FOOTER {
                let _ = seek_table_len(&bytes[bytes.len() - FOOTER..]);
            }
        }
    }
}
