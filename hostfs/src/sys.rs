//! The kernel interfaces the host side uses that need `unsafe`: and only
//! them. Each ioctl is quoted from the kernel's UAPI headers.
//!
//! ```c
//! /* include/uapi/linux/fs.h */
//! #define FS_IOC_FIEMAP     _IOWR('f', 11, struct fiemap)     /* 0xC020660B */
//! #define FIFREEZE          _IOWR('X', 119, int)              /* 0xC0045877 */
//! #define FITHAW            _IOWR('X', 120, int)              /* 0xC0045878 */
//! #define FS_IOC_GETVERSION _IOR('v', 1, long)                /* 0x80087601 */
//! /* include/uapi/linux/fiemap.h */
//! struct fiemap_extent { __u64 fe_logical, fe_physical, fe_length;
//!                        __u64 fe_reserved64[2]; __u32 fe_flags;
//!                        __u32 fe_reserved[3]; };              /* 56 bytes */
//! struct fiemap { __u64 fm_start, fm_length; __u32 fm_flags,
//!                 fm_mapped_extents, fm_extent_count, fm_reserved;
//!                 struct fiemap_extent fm_extents[]; };        /* 32 + n*56 */
//! /* include/uapi/linux/fsmap.h */
//! struct fsmap { __u32 fmr_device, fmr_flags; __u64 fmr_physical,
//!                fmr_owner, fmr_offset, fmr_length;
//!                __u64 fmr_reserved[3]; };                     /* 64 bytes */
//! struct fsmap_head { __u32 fmh_iflags, fmh_oflags, fmh_count,
//!                     fmh_entries; __u64 fmh_reserved[6];
//!                     struct fsmap fmh_keys[2];
//!                     struct fsmap fmh_recs[]; };              /* 192 + n*64 */
//! #define FS_IOC_GETFSMAP _IOWR('X', 59, struct fsmap_head)    /* 0xC0C0583B */
//! #define FMR_OF_LAST  0x20          /* segment is the last in the dataset */
//! #define FMR_OWNER(type, code) (((__u64)type << 32) | ((__u64)code & 0xFFFFFFFFULL))
//! #define FMR_OF_SPECIAL_OWNER 0x10  /* owner is a special value */
//! #define FMR_OWN_FREE FMR_OWNER(0, 1)     /* free space */
//! /* include/uapi/linux/fcntl.h (open_by_handle_at(2)) */
//! struct file_handle { __u32 handle_bytes; int handle_type;
//!                      unsigned char f_handle[]; };
//! /* include/linux/exportfs.h */
//! FILEID_INO32_GEN = 1,   /* 32bit inode number, 32 bit generation number */
//! struct fid { union { struct { u32 ino; u32 gen; } i32; ... }; };
//! /* fs/ext4/super.c, ext4_nfs_get_inode() */
//! if (generation && EXT4_I(inode)->i_generation != generation) -> -ESTALE
//! ```
//!
//! The thaw guard is a forked child that only calls async-signal-safe
//! functions (`setsid`, `sigaction`, `poll`, `read`, `ioctl`, `_exit`).

use std::os::fd::{AsRawFd, RawFd};

pub mod perf;
use std::time::Duration;

const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;
const FS_IOC_GETVERSION: libc::c_ulong = 0x8008_7601;
const FS_IOC_GETFSMAP: libc::c_ulong = 0xC0C0_583B;
const FMR_OF_LAST: u32 = 0x20;
/// `FMR_OWN_FREE`: the owner of free space in a `GETFSMAP` record.
pub const FMR_OWN_FREE: u64 = 1;
/// `FMR_OF_SPECIAL_OWNER`: the record's owner is a special value.
pub const FMR_OF_SPECIAL_OWNER: u32 = 0x10;

/// `FIEMAP_FLAG_SYNC`: write the file's dirty data back before mapping.
pub const FIEMAP_FLAG_SYNC: u32 = 0x1;

/// One `struct fiemap_extent`, as the kernel lays it out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FiemapExtent {
    /// Logical offset in the file.
    pub logical: u64,
    /// Physical offset (device offset; btrfs: its logical address).
    pub physical: u64,
    /// Length.
    pub length: u64,
    reserved64: [u64; 2],
    /// `FIEMAP_EXTENT_*` flags.
    pub flags: u32,
    reserved: [u32; 3],
}

impl FiemapExtent {
    /// An extent (for tests and planning).
    pub fn new(logical: u64, physical: u64, length: u64, flags: u32) -> Self {
        FiemapExtent {
            logical,
            physical,
            length,
            flags,
            ..Default::default()
        }
    }
}

#[repr(C)]
struct FiemapHead {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
}

/// Extents asked for per call.
const BATCH: usize = 256;
/// [`BATCH`] as the kernel's `__u32`.
const BATCH_U32: u32 = 256;

/// The extents of `fd` from `FS_IOC_FIEMAP`, all of them, in order.
pub fn fiemap(fd: &impl AsRawFd, flags: u32) -> std::io::Result<Vec<FiemapExtent>> {
    #[repr(C)]
    struct Req {
        head: FiemapHead,
        extents: [FiemapExtent; BATCH],
    }
    let mut out = Vec::new();
    let mut start = 0u64;
    loop {
        let mut req = Req {
            head: FiemapHead {
                start,
                length: u64::MAX - start,
                flags,
                mapped_extents: 0,
                extent_count: BATCH_U32,
                reserved: 0,
            },
            extents: [FiemapExtent::default(); BATCH],
        };
        // SAFETY: `req` is a `struct fiemap` header followed by room for
        // exactly `extent_count` extents, laid out as the kernel expects
        // (repr(C), sizes 32 and 56); the kernel writes at most that many.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), FS_IOC_FIEMAP, &mut req) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = (req.head.mapped_extents as usize).min(BATCH);
        if n == 0 {
            return Ok(out);
        }
        let got = &req.extents[..n];
        out.extend_from_slice(got);
        let last = got[n - 1];
        if last.flags & crate::filemap::flags::LAST != 0 {
            return Ok(out);
        }
        let next = last.logical.saturating_add(last.length);
        if next <= start {
            return Ok(out);
        }
        start = next;
        // The kernel asks for a new call from fm_start = end of the last.
    }
}

/// One `GETFSMAP` record: which device, where, how long, whose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsmapRecord {
    /// `fmr_device` (the kernel's encoding of the device number).
    pub device: u32,
    /// Byte offset on the device.
    pub physical: u64,
    /// Bytes.
    pub length: u64,
    /// Owner (an inode number, or a special owner such as [`FMR_OWN_FREE`]).
    pub owner: u64,
    /// `fmr_flags`.
    pub flags: u32,
}

/// Every `GETFSMAP` record of the file system `fd` is on (ext4, XFS):
/// what each physical range of its devices holds, free space included.
pub fn getfsmap(fd: &impl AsRawFd) -> std::io::Result<Vec<FsmapRecord>> {
    const N: usize = 512;
    const HEAD: usize = 192;
    const REC: usize = 64;
    let u32_at =
        |b: &[u8], at: usize| u32::from_ne_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]));
    let u64_at =
        |b: &[u8], at: usize| u64::from_ne_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]));
    // u64 words keep the buffer aligned for the kernel's structs.
    let mut words = vec![0u64; (HEAD + N * REC) / 8];
    let mut out = Vec::new();
    // The high key: everything (device, flags, physical, owner, offset
    // all ones; length zero, as XFS insists).
    let mut high = [0u8; REC];
    high[..32].fill(0xff);
    let mut low = [0u8; REC];
    loop {
        words.fill(0);
        {
            // SAFETY: viewing the u64 buffer as bytes of the same length
            // (u8 has no alignment or validity requirements).
            let b = unsafe {
                std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8)
            };
            b[8..12].copy_from_slice(&u32::try_from(N).unwrap_or(0).to_ne_bytes());
            b[64..64 + REC].copy_from_slice(&low);
            b[64 + REC..64 + 2 * REC].copy_from_slice(&high);
        }
        // SAFETY: FS_IOC_GETFSMAP reads the head and keys and writes at most
        // fmh_count (N) records after them; the buffer holds HEAD + N*REC
        // bytes, 8-byte aligned.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), FS_IOC_GETFSMAP, words.as_mut_ptr()) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(
                e.kind(),
                format!(
                    "GETFSMAP after {} records, low key {low:02x?}: {e}",
                    out.len()
                ),
            ));
        }
        // SAFETY: as above.
        let b = unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), words.len() * 8) };
        let entries = usize::try_from(u32_at(b, 12)).unwrap_or(0).min(N);
        if entries == 0 {
            return Ok(out);
        }
        let mut last_flags = 0;
        for k in 0..entries {
            let r = &b[HEAD + k * REC..HEAD + (k + 1) * REC];
            out.push(FsmapRecord {
                device: u32_at(r, 0),
                physical: u64_at(r, 8),
                owner: u64_at(r, 16),
                length: u64_at(r, 32),
                flags: u32_at(r, 4),
            });
            last_flags = u32_at(r, 4);
        }
        if last_flags & FMR_OF_LAST != 0 {
            return Ok(out);
        }
        // Go on after the last record returned.
        low.copy_from_slice(&b[HEAD + (entries - 1) * REC..HEAD + entries * REC]);
    }
}

/// `FIFREEZE` the file system `fd` is on (a directory of it).
pub fn freeze(fd: &impl AsRawFd) -> std::io::Result<()> {
    let mut zero: libc::c_int = 0;
    // SAFETY: FIFREEZE takes an int argument it does not use; passing a
    // valid pointer to one is what userspace tools do.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), FIFREEZE, &mut zero) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `FITHAW` the file system `fd` is on. `EINVAL` means it was not frozen.
pub fn thaw(fd: &impl AsRawFd) -> std::io::Result<()> {
    thaw_raw(fd.as_raw_fd())
}

fn thaw_raw(fd: RawFd) -> std::io::Result<()> {
    let mut zero: libc::c_int = 0;
    // SAFETY: as for FIFREEZE.
    let r = unsafe { libc::ioctl(fd, FITHAW, &mut zero) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The inode generation (`FS_IOC_GETVERSION`), when the file system
/// keeps one.
pub fn generation(fd: &impl AsRawFd) -> Option<u64> {
    let mut v: libc::c_long = 0;
    // SAFETY: FS_IOC_GETVERSION writes one long through the pointer.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), FS_IOC_GETVERSION, &mut v) };
    (r == 0).then_some(v.cast_unsigned())
}

/// `FILEID_INO32_GEN`: an ext2/3/4 file handle's type.
const FILEID_INO32_GEN: libc::c_int = 1;

/// Open inode `ino` of generation `gen` of the ext2/3/4 file system
/// `mount` is on, by file handle (`open_by_handle_at(2)`, which needs
/// `CAP_DAC_READ_SEARCH`): no directory is searched for a name. `ESTALE`
/// when the inode is free or has another generation (it was deleted, or
/// deleted and its number reused). Generation 0 is taken by ext4 as
/// "any": only for a file system that holds still (frozen) while the
/// inode number is known to be the file's.
pub fn open_ext4_inode(
    mount: std::os::fd::BorrowedFd<'_>,
    ino: u32,
    gen: u32,
    flags: libc::c_int,
) -> std::io::Result<std::os::fd::OwnedFd> {
    /// `struct file_handle` with the 8 bytes of a `FILEID_INO32_GEN` fid.
    #[repr(C)]
    struct Handle {
        handle_bytes: libc::c_uint,
        handle_type: libc::c_int,
        f_handle: [u32; 2],
    }
    let mut h = Handle {
        handle_bytes: 8,
        handle_type: FILEID_INO32_GEN,
        f_handle: [ino, gen],
    };
    // SAFETY: `h` is a `struct file_handle` whose `handle_bytes` (8) says
    // how many bytes of `f_handle` follow, and they do; the kernel only
    // reads it. On success the return value is a new descriptor that
    // nothing else owns.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount.as_raw_fd(),
            std::ptr::from_mut(&mut h).cast::<libc::file_handle>(),
            flags,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by no one.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// A thaw guard: a child process that thaws the given file systems when
/// told to, when the deadline passes, or when its parent dies (its pipe
/// closes) — whichever is first. It outlives a killed agent by design.
pub struct ThawGuard {
    pid: libc::pid_t,
    pipe: Option<std::os::fd::OwnedFd>,
}

impl ThawGuard {
    /// Fork the guard over these open directories (one per file system).
    pub fn spawn(dirs: &[RawFd], deadline: Duration) -> std::io::Result<ThawGuard> {
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(std::io::Error::from)?;
        let fds: Vec<RawFd> = dirs.to_vec();
        let timeout_ms: libc::c_int = deadline.as_millis().try_into().unwrap_or(libc::c_int::MAX);
        let rfd = r.as_raw_fd();
        // SAFETY: after fork the child runs only async-signal-safe calls
        // on memory that was allocated before the fork (`fds`), then
        // `_exit`s: no allocation, no locks, no unwinding.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: see above; every call here is async-signal-safe.
            unsafe { guard_child(rfd, w.as_raw_fd(), &fds, timeout_ms) }
        }
        drop(r);
        Ok(ThawGuard { pid, pipe: Some(w) })
    }

    /// Has the guard already exited (its deadline passed and it thawed)?
    pub fn fired(&self) -> bool {
        let mut status = 0;
        // SAFETY: waitpid on our own child with WNOHANG.
        let r = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
        r == self.pid || r < 0
    }

    /// Tell the guard to thaw and exit now, and reap it.
    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(p) = self.pipe.take() {
            drop(p); // EOF: the guard thaws (a no-op if thawed) and exits.
            let mut status = 0;
            // SAFETY: waitpid on our own child; ECHILD if `fired` reaped it.
            unsafe { libc::waitpid(self.pid, &mut status, 0) };
        }
    }

    /// The guard's process id.
    pub fn pid(&self) -> u32 {
        self.pid.unsigned_abs()
    }
}

impl Drop for ThawGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The guard's whole life. Never returns.
///
/// # Safety
/// Only call in a freshly forked child.
unsafe fn guard_child(rfd: RawFd, wfd: RawFd, fds: &[RawFd], timeout_ms: libc::c_int) -> ! {
    libc::close(wfd);
    libc::setsid();
    for sig in [libc::SIGHUP, libc::SIGINT, libc::SIGTERM, libc::SIGPIPE] {
        libc::signal(sig, libc::SIG_IGN);
    }
    let mut pfd = libc::pollfd {
        fd: rfd,
        events: libc::POLLIN,
        revents: 0,
    };
    // Wait for EOF (the agent is done or dead) or the deadline; a signal
    // interrupting poll is not either.
    loop {
        let r = libc::poll(&mut pfd, 1, timeout_ms);
        if r < 0 && *libc::__errno_location() == libc::EINTR {
            continue;
        }
        break;
    }
    for &fd in fds {
        let _ = thaw_raw(fd);
    }
    libc::_exit(0)
}

// ---------------------------------------------------------------------------
// btrfs (include/uapi/linux/btrfs.h):
//
// ```c
// #define BTRFS_IOCTL_MAGIC 0x94
// #define BTRFS_IOC_TREE_SEARCH _IOWR(BTRFS_IOCTL_MAGIC, 17, struct btrfs_ioctl_search_args) /* 0xD0009411 */
// #define BTRFS_IOC_DEV_INFO    _IOWR(BTRFS_IOCTL_MAGIC, 30, struct btrfs_ioctl_dev_info_args) /* 0xD000941E */
// #define BTRFS_IOC_FS_INFO     _IOR(BTRFS_IOCTL_MAGIC, 31, struct btrfs_ioctl_fs_info_args)  /* 0x8400941F */
// struct btrfs_ioctl_search_key { __u64 tree_id, min_objectid, max_objectid,
//     min_offset, max_offset, min_transid, max_transid; __u32 min_type,
//     max_type, nr_items, unused; __u64 unused1, unused2, unused3, unused4; }; /* 104 */
// struct btrfs_ioctl_search_args { struct btrfs_ioctl_search_key key;
//     char buf[4096 - 104]; };                                   /* 4096 */
// struct btrfs_ioctl_search_header { __u64 transid, objectid, offset;
//     __u32 type, len; };                                         /* 32 */
// struct btrfs_ioctl_dev_info_args { __u64 devid; __u8 uuid[16];
//     __u64 bytes_used, total_bytes; __u8 fsid[16]; __u64 unused[377];
//     __u8 path[1024]; };                                         /* 4096 */
// struct btrfs_ioctl_fs_info_args { __u64 max_id, num_devices; __u8 fsid[16];
//     __u32 nodesize, sectorsize, clone_alignment; __u16 csum_type, csum_size;
//     __u64 flags, generation; __u8 metadata_uuid[16]; __u8 reserved[944]; }; /* 1024 */
// ```

const BTRFS_IOC_TREE_SEARCH: libc::c_ulong = 0xD000_9411;
const BTRFS_IOC_DEV_INFO: libc::c_ulong = 0xD000_941E;
const BTRFS_IOC_FS_INFO: libc::c_ulong = 0x8400_941F;

/// One item found by a tree search: its key and raw bytes.
#[derive(Clone, Debug)]
pub struct SearchItem {
    /// Key objectid.
    pub objectid: u64,
    /// Key type.
    pub item_type: u32,
    /// Key offset.
    pub offset: u64,
    /// The item's bytes (little-endian on-disk structure).
    pub data: Vec<u8>,
}

/// Every item of `tree` with key type `item_type` and objectid in
/// `objectids` (`BTRFS_IOC_TREE_SEARCH`, needs CAP_SYS_ADMIN).
pub fn btrfs_search(
    fd: &impl AsRawFd,
    tree: u64,
    objectids: (u64, u64),
    item_type: u32,
) -> std::io::Result<Vec<SearchItem>> {
    let mut out = Vec::new();
    let (mut min_obj, mut min_off) = (objectids.0, 0u64);
    loop {
        let mut args = [0u8; 4096];
        let key: [u64; 7] = [tree, min_obj, objectids.1, min_off, u64::MAX, 0, u64::MAX];
        for (i, v) in key.iter().enumerate() {
            args[i * 8..i * 8 + 8].copy_from_slice(&v.to_ne_bytes());
        }
        args[56..60].copy_from_slice(&item_type.to_ne_bytes());
        args[60..64].copy_from_slice(&item_type.to_ne_bytes());
        args[64..68].copy_from_slice(&4096u32.to_ne_bytes()); // nr_items: as many as fit
                                                              // SAFETY: `args` is a 4096-byte `struct btrfs_ioctl_search_args`
                                                              // (key, then the result buffer), which the kernel fills in place.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), BTRFS_IOC_TREE_SEARCH, args.as_mut_ptr()) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = u32::from_ne_bytes([args[64], args[65], args[66], args[67]]);
        if n == 0 {
            return Ok(out);
        }
        let buf = &args[104..];
        let mut at = 0usize;
        let mut last = (0u64, 0u64);
        for _ in 0..n {
            if at + 32 > buf.len() {
                break;
            }
            let objectid = u64::from_ne_bytes(buf[at + 8..at + 16].try_into().unwrap_or([0; 8]));
            let offset = u64::from_ne_bytes(buf[at + 16..at + 24].try_into().unwrap_or([0; 8]));
            let ty = u32::from_ne_bytes(buf[at + 24..at + 28].try_into().unwrap_or([0; 4]));
            let len =
                u32::from_ne_bytes(buf[at + 28..at + 32].try_into().unwrap_or([0; 4])) as usize;
            let data = buf.get(at + 32..at + 32 + len).unwrap_or(&[]).to_vec();
            at += 32 + len;
            last = (objectid, offset);
            if ty == item_type {
                out.push(SearchItem {
                    objectid,
                    item_type: ty,
                    offset,
                    data,
                });
            }
        }
        // Continue after the last key seen.
        if last.1 == u64::MAX {
            if last.0 >= objectids.1 {
                return Ok(out);
            }
            min_obj = last.0 + 1;
            min_off = 0;
        } else {
            min_obj = last.0;
            min_off = last.1 + 1;
        }
    }
}

/// `(max_id, num_devices, fsid)` from `BTRFS_IOC_FS_INFO`.
pub fn btrfs_fs_info(fd: &impl AsRawFd) -> std::io::Result<(u64, u64, [u8; 16])> {
    let mut args = [0u8; 1024];
    // SAFETY: `args` is a 1024-byte `struct btrfs_ioctl_fs_info_args`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), BTRFS_IOC_FS_INFO, args.as_mut_ptr()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut fsid = [0u8; 16];
    fsid.copy_from_slice(&args[16..32]);
    Ok((le64_ne(&args, 0), le64_ne(&args, 8), fsid))
}

fn le64_ne(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// `(uuid, path)` of device `devid` from `BTRFS_IOC_DEV_INFO`; `None` when
/// there is no such device.
pub fn btrfs_dev_info(
    fd: &impl AsRawFd,
    devid: u64,
) -> std::io::Result<Option<([u8; 16], String)>> {
    let mut args = [0u8; 4096];
    args[0..8].copy_from_slice(&devid.to_ne_bytes());
    // SAFETY: `args` is a 4096-byte `struct btrfs_ioctl_dev_info_args`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), BTRFS_IOC_DEV_INFO, args.as_mut_ptr()) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENODEV) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&args[8..24]);
    let path = &args[3072..];
    let end = path.iter().position(|&b| b == 0).unwrap_or(path.len());
    Ok(Some((
        uuid,
        String::from_utf8_lossy(&path[..end]).to_string(),
    )))
}
