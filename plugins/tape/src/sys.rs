//! The unsafe corner of the tape plugin: a real drive through the Linux
//! `st` driver's ioctls.
//!
//! Kernel ABI used (include/uapi/linux/mtio.h):
//! ```c
//! struct mtop  { short mt_op; int mt_count; };
//! struct mtget { long mt_type; long mt_resid; long mt_dsreg; long mt_gstat;
//!                long mt_erreg; __kernel_daddr_t mt_fileno; __kernel_daddr_t mt_blkno; };
//! #define MTIOCTOP _IOW('m', 1, struct mtop)   /* do a mag tape op */
//! #define MTIOCGET _IOR('m', 2, struct mtget)  /* get tape status */
//! ```
//! (`__kernel_daddr_t` is `int`.) `read(2)`/`write(2)` on `/dev/nstN` move
//! records; errors come back as errno (ENOSPC at early warning, EROFS for
//! a write-protected cartridge on open, ENOMEDIUM without one).

use floe_core::error::Result;
use floe_core::tape::{tape_error, MtOp, TapeDrive, TapeStatus};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;

#[repr(C)]
struct Mtop {
    mt_op: libc::c_short,
    mt_count: libc::c_int,
}

#[repr(C)]
#[derive(Default)]
struct Mtget {
    mt_type: libc::c_long,
    mt_resid: libc::c_long,
    mt_dsreg: libc::c_long,
    mt_gstat: libc::c_long,
    mt_erreg: libc::c_long,
    mt_fileno: libc::c_int,
    mt_blkno: libc::c_int,
}

const fn ioc(dir: u64, ty: u8, nr: u8, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}
const MTIOCTOP: u64 = ioc(1, b'm', 1, std::mem::size_of::<Mtop>());
const MTIOCGET: u64 = ioc(2, b'm', 2, std::mem::size_of::<Mtget>());

/// A drive through `st`.
pub struct StDrive {
    name: String,
    file: File,
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(floe_core::tape::errno::EIO)
}

impl StDrive {
    /// `open(2)` a non-rewinding tape device.
    pub fn open(path: &str, write: bool) -> Result<StDrive> {
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(|e| tape_error(path, "open", errno(&e)).source(e))?;
        Ok(StDrive {
            name: path.to_string(),
            file,
        })
    }
}

impl TapeDrive for StDrive {
    fn name(&self) -> &str {
        &self.name
    }

    fn op(&mut self, op: MtOp) -> Result<()> {
        let (code, count) = op.code();
        let m = Mtop {
            mt_op: libc::c_short::try_from(code).unwrap_or(0),
            mt_count: libc::c_int::try_from(count).unwrap_or(libc::c_int::MAX),
        };
        // SAFETY: MTIOCTOP reads one `struct mtop` from the pointer, which
        // points at a live, properly laid out (repr(C)) value for the call.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), MTIOCTOP as _, &m as *const Mtop) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return Err(tape_error(&self.name, &format!("{op:?}"), errno(&e)).source(e));
        }
        Ok(())
    }

    fn status(&mut self) -> Result<TapeStatus> {
        let mut g = Mtget::default();
        // SAFETY: MTIOCGET writes one `struct mtget` through the pointer,
        // which points at a live, writable repr(C) value of that size.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), MTIOCGET as _, &mut g as *mut Mtget) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return Err(tape_error(&self.name, "MTIOCGET", errno(&e)).source(e));
        }
        #[allow(clippy::cast_sign_loss)]
        Ok(TapeStatus::from_mtget(
            g.mt_gstat as u64,
            g.mt_dsreg as u64,
            i64::from(g.mt_fileno),
            i64::from(g.mt_blkno),
        ))
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        self.file
            .read(buf)
            .map_err(|e| tape_error(&self.name, "read", errno(&e)).source(e))
    }

    fn write(&mut self, buf: &[u8]) -> Result<usize> {
        self.file
            .write(buf)
            .map_err(|e| tape_error(&self.name, "write", errno(&e)).source(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Values from <linux/mtio.h> on x86_64.
        assert_eq!(MTIOCTOP, 0x4008_6d01);
        assert_eq!(MTIOCGET, 0x8030_6d02);
    }
}
