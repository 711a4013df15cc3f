//! A tracepoint's perf events, one per CPU, read from their ring buffers:
//! the kernel interface of [`crate::watch`], and only it. Quoted from
//! `include/uapi/linux/perf_event.h`:
//!
//! ```c
//! struct perf_event_attr {
//!     __u32 type;            /* PERF_TYPE_TRACEPOINT = 2 */
//!     __u32 size;            /* PERF_ATTR_SIZE_VER0 = 64: the fields below */
//!     __u64 config;          /* the tracepoint's id (tracefs events/…/id) */
//!     union { __u64 sample_period; __u64 sample_freq; };
//!     __u64 sample_type;     /* PERF_SAMPLE_RAW = 1U << 10 */
//!     __u64 read_format;
//!     __u64 disabled : 1, inherit : 1, …;   /* bit 0: disabled */
//!     union { __u32 wakeup_events; __u32 wakeup_watermark; };
//!     __u32 bp_type;
//!     union { __u64 bp_addr; __u64 config1; };
//!     …                      /* later versions; size tells the kernel */
//! };
//! int perf_event_open(struct perf_event_attr *attr, pid_t pid /* -1 */,
//!                     int cpu, int group_fd /* -1 */, unsigned long flags);
//! #define PERF_FLAG_FD_CLOEXEC      (1UL << 3)
//! #define PERF_EVENT_IOC_ENABLE     _IO ('$', 0)          /* 0x2400 */
//! #define PERF_EVENT_IOC_SET_FILTER _IOW('$', 6, char *)  /* 0x40082406 */
//! struct perf_event_mmap_page {   /* the first page of the mapping */
//!     …
//!     __u64 data_head;   /* at 1024: written by the kernel; read, then rmb() */
//!     __u64 data_tail;   /* at 1032: written by userspace after its reads (mb()) */
//!     __u64 data_offset; /* at 1040: where the data pages start */
//!     __u64 data_size;   /* at 1048: their size (a power of two) */
//! };
//! struct perf_event_header { __u32 type; __u16 misc; __u16 size; };
//! ```
//!
//! `read(2)` of an event's descriptor gives its count (a `__u64`): every
//! hit that passed the filter, sampled or not.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_SAMPLE_RAW: u64 = 1 << 10;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_EVENT_IOC_SET_FILTER: libc::c_ulong = 0x4008_2406;
const DATA_HEAD: usize = 1024;
const DATA_TAIL: usize = 1032;
const DATA_OFFSET: usize = 1040;
const DATA_SIZE: usize = 1048;

/// `struct perf_event_attr` up to `PERF_ATTR_SIZE_VER0`.
#[repr(C)]
struct Attr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

/// A tracepoint's event on one CPU, sampling every hit that passes its
/// filter into a ring buffer mapped here.
pub struct TracepointRing {
    fd: OwnedFd,
    /// The mapping: one header page, then `data_size` bytes of records.
    base: *mut u8,
    len: usize,
    data_offset: usize,
    data_size: usize,
}

// SAFETY: the mapping is this value's own (unmapped on drop) and is only
// touched through `&mut self`; the kernel's side of it is synchronized by
// data_head / data_tail as the ABI says.
unsafe impl Send for TracepointRing {}

impl TracepointRing {
    /// Sample tracepoint `id` on `cpu` (every task), keeping only hits
    /// that pass `filter` (the tracefs filter syntax), in `data_pages`
    /// pages (a power of two) of records.
    pub fn open(
        id: u64,
        cpu: u32,
        filter: &std::ffi::CStr,
        data_pages: usize,
    ) -> std::io::Result<TracepointRing> {
        let attr = Attr {
            kind: PERF_TYPE_TRACEPOINT,
            size: 64,
            config: id,
            sample_period: 1,
            sample_type: PERF_SAMPLE_RAW,
            read_format: 0,
            // Disabled until its filter is set.
            flags: 1,
            wakeup_events: 0,
            bp_type: 0,
            config1: 0,
        };
        // SAFETY: `attr` is a valid PERF_ATTR_SIZE_VER0 attribute block
        // that outlives the call; the kernel only reads it.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                std::ptr::from_ref(&attr),
                -1 as libc::pid_t,
                libc::c_int::try_from(cpu).unwrap_or(libc::c_int::MAX),
                -1 as libc::c_int,
                PERF_FLAG_FD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = libc::c_int::try_from(fd).map_err(|_| std::io::Error::other("fd out of range"))?;
        // SAFETY: the kernel just returned this descriptor to us; nothing
        // else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: SET_FILTER reads a NUL-terminated string, which `filter`
        // is, alive for the call.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_SET_FILTER, filter.as_ptr()) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: sysconf takes no pointers.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|p| *p >= 4096)
            .unwrap_or(4096);
        let len = page * (1 + data_pages.next_power_of_two());
        // SAFETY: a fresh shared mapping of the event's buffer, of the
        // length the ABI asks for (1 + 2^n pages); checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = base.cast::<u8>();
        let mut ring = TracepointRing {
            fd,
            base,
            len,
            data_offset: page,
            data_size: len - page,
        };
        // Kernels since 4.1 say where the data is; older ones leave zeros.
        let (offset, size) = (ring.word(DATA_OFFSET), ring.word(DATA_SIZE));
        if let (Ok(o), Ok(s)) = (usize::try_from(offset), usize::try_from(size)) {
            if o != 0 && s != 0 && o.checked_add(s).is_some_and(|end| end <= len) {
                ring.data_offset = o;
                ring.data_size = s;
            }
        }
        // SAFETY: ENABLE takes no argument.
        let r = unsafe { libc::ioctl(ring.fd.as_raw_fd(), PERF_EVENT_IOC_ENABLE, 0) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(ring)
    }

    /// The header page's 64-bit word at `at`, read as the kernel may be
    /// writing it.
    fn atomic(&self, at: usize) -> &AtomicU64 {
        debug_assert!(at.is_multiple_of(8) && at + 8 <= self.data_offset);
        // SAFETY: `at` is one of the header page's aligned u64 fields,
        // inside the mapping, which lives as long as `self`; AtomicU64 has
        // the layout of u64.
        unsafe { &*self.base.add(at).cast::<AtomicU64>() }
    }

    fn word(&self, at: usize) -> u64 {
        self.atomic(at).load(Ordering::Acquire)
    }

    /// The event's count: every hit that passed the filter.
    pub fn count(&self) -> std::io::Result<u64> {
        let mut v = [0u8; 8];
        rustix::io::read(&self.fd, &mut v)?;
        Ok(u64::from_ne_bytes(v))
    }

    /// Copy the records written since the last call to the end of `out`
    /// (whole records, in order) and give their room back to the kernel.
    /// Returns the room that was left before: a record that did not fit
    /// was dropped.
    pub fn drain(&mut self, out: &mut Vec<u8>) -> usize {
        // Acquire: the records before data_head are written (the ABI's
        // rmb() after reading it).
        let head = self.word(DATA_HEAD);
        let tail = self.atomic(DATA_TAIL).load(Ordering::Relaxed);
        let size = self.data_size;
        let used = usize::try_from(head.wrapping_sub(tail))
            .unwrap_or(usize::MAX)
            .min(size);
        // Power-of-two size: an offset is the position modulo it.
        let mask = u64::try_from(size - 1).unwrap_or(u64::MAX);
        let from = usize::try_from(tail & mask).unwrap_or(0);
        let first = used.min(size - from);
        // SAFETY: both ranges lie within the data pages of the mapping
        // (from + first <= size, used - first <= from); the kernel does
        // not write them until data_tail moves past them.
        unsafe {
            let data = self.base.add(self.data_offset);
            out.extend_from_slice(std::slice::from_raw_parts(data.add(from), first));
            out.extend_from_slice(std::slice::from_raw_parts(data, used - first));
        }
        // Release: our reads are done before the kernel may reuse the
        // room (the ABI's mb() before writing data_tail).
        self.atomic(DATA_TAIL).store(
            tail.wrapping_add(u64::try_from(used).unwrap_or(0)),
            Ordering::Release,
        );
        size - used
    }
}

impl Drop for TracepointRing {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once; the fd closes
        // after it.
        unsafe {
            libc::munmap(self.base.cast(), self.len);
        }
    }
}
