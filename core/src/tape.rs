//! Tape drives as Floe sees them: the Linux `st` driver's semantics
//! (`read(2)`/`write(2)` of records, `MTIOCTOP` operations, `MTIOCGET`
//! status) behind one small trait, so the tape media plugin talks the same
//! way to a real drive (`/dev/nstN`, through ioctls in the plugin's `sys`
//! module) and to sim-san's virtual tape library (`vtl://HOST:PORT/DRIVE`,
//! through the wire protocol here; spec `docs/formats/vtl-protocol.md`).
//!
//! The semantics both follow (Linux `Documentation/scsi/st.rst`):
//! - fixed-block mode (`MTSETBLK n`, n > 0): a write must be a multiple
//!   of n and writes that many blocks; variable mode (`MTSETBLK 0`): each
//!   write is one record, each read returns one record (at most the
//!   buffer);
//! - a read at a filemark returns 0 and moves past it; at end of data the
//!   first read returns 0, later ones fail with EIO;
//! - writing destroys everything after the write position (end of data
//!   moves there); closing after a write writes a filemark;
//! - at the early-warning point the write that reaches it completes; the
//!   next write fails with ENOSPC; later writes are allowed (to close the
//!   file) until the physical end, where they fail with ENOSPC too;
//! - opening a write-protected cartridge for writing fails with EROFS;
//!   a drive without a cartridge fails with ENOMEDIUM.

use crate::error::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

/// Linux errno values the tape paths use (asm-generic/errno-base.h,
/// errno.h): the same numbers on the wire and from the kernel.
pub mod errno {
    /// I/O error.
    pub const EIO: i32 = 5;
    /// Device busy.
    pub const EBUSY: i32 = 16;
    /// Invalid argument.
    pub const EINVAL: i32 = 22;
    /// No space left on device (early warning, end of medium).
    pub const ENOSPC: i32 = 28;
    /// Read-only file system (write-protected cartridge).
    pub const EROFS: i32 = 30;
    /// No medium found.
    pub const ENOMEDIUM: i32 = 123;
    /// No such device.
    pub const ENODEV: i32 = 19;
}

/// A magnetic-tape operation (`struct mtop`'s `mt_op`, with its count).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MtOp {
    /// MTREW: to the beginning of the tape.
    Rewind,
    /// MTFSF: forward past `n` filemarks (to the first block of a file).
    Fsf(u32),
    /// MTBSF: backward past `n` filemarks (to the end side of the mark).
    Bsf(u32),
    /// MTFSR: forward over `n` records.
    Fsr(u32),
    /// MTBSR: backward over `n` records.
    Bsr(u32),
    /// MTWEOF: write `n` filemarks (flushes the drive's buffer).
    Weof(u32),
    /// MTEOM: to the end of recorded data (to append).
    Eom,
    /// MTSETBLK: fixed block size `n`, or variable mode with 0.
    SetBlk(u32),
    /// MTOFFL: rewind and unload.
    Offline,
}

impl MtOp {
    /// The `mt_op` code and count of `struct mtop` (linux/mtio.h).
    pub fn code(self) -> (u16, u32) {
        match self {
            MtOp::Rewind => (6, 1),
            MtOp::Fsf(n) => (1, n),
            MtOp::Bsf(n) => (2, n),
            MtOp::Fsr(n) => (3, n),
            MtOp::Bsr(n) => (4, n),
            MtOp::Weof(n) => (5, n),
            MtOp::Eom => (12, 1),
            MtOp::SetBlk(n) => (20, n),
            MtOp::Offline => (7, 1),
        }
    }

    /// The operation of an `mt_op` code and count.
    pub fn from_code(code: u16, n: u32) -> Option<MtOp> {
        Some(match code {
            6 => MtOp::Rewind,
            1 => MtOp::Fsf(n),
            2 => MtOp::Bsf(n),
            3 => MtOp::Fsr(n),
            4 => MtOp::Bsr(n),
            5 => MtOp::Weof(n),
            12 => MtOp::Eom,
            20 => MtOp::SetBlk(n),
            7 => MtOp::Offline,
            _ => return None,
        })
    }
}

/// What `MTIOCGET` says (`struct mtget`, decoded).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapeStatus {
    /// Current file number (0 at the beginning); -1 when unknown.
    pub file_number: i64,
    /// Block number within the file; -1 when unknown.
    pub block_number: i64,
    /// Fixed block size, 0 in variable mode.
    pub block_size: u32,
    /// GMT_BOT: at the beginning of the tape.
    pub bot: bool,
    /// GMT_EOF: just past a filemark.
    pub eof: bool,
    /// GMT_EOD: at the end of recorded data.
    pub eod: bool,
    /// GMT_EOT: at or past the early-warning point.
    pub eot: bool,
    /// GMT_WR_PROT: the cartridge is write-protected.
    pub write_protected: bool,
    /// GMT_ONLINE: a cartridge is loaded.
    pub online: bool,
}

/// `mt_gstat` bits (linux/mtio.h).
pub mod gmt {
    /// Just past a filemark.
    pub const EOF: u64 = 0x8000_0000;
    /// Beginning of tape.
    pub const BOT: u64 = 0x4000_0000;
    /// End of tape (early warning).
    pub const EOT: u64 = 0x2000_0000;
    /// End of data.
    pub const EOD: u64 = 0x0800_0000;
    /// Write-protected.
    pub const WR_PROT: u64 = 0x0400_0000;
    /// Online.
    pub const ONLINE: u64 = 0x0100_0000;
}

impl TapeStatus {
    /// Decode `mt_gstat`, `mt_dsreg`, `mt_fileno`, `mt_blkno`.
    pub fn from_mtget(gstat: u64, dsreg: u64, fileno: i64, blkno: i64) -> TapeStatus {
        TapeStatus {
            file_number: fileno,
            block_number: blkno,
            block_size: u32::try_from(dsreg & 0x00ff_ffff).unwrap_or(0),
            bot: gstat & gmt::BOT != 0,
            eof: gstat & gmt::EOF != 0,
            eod: gstat & gmt::EOD != 0,
            eot: gstat & gmt::EOT != 0,
            write_protected: gstat & gmt::WR_PROT != 0,
            online: gstat & gmt::ONLINE != 0,
        }
    }

    /// Encode as `mt_gstat`.
    pub fn gstat(&self) -> u64 {
        let mut g = 0;
        for (on, bit) in [
            (self.bot, gmt::BOT),
            (self.eof, gmt::EOF),
            (self.eod, gmt::EOD),
            (self.eot, gmt::EOT),
            (self.write_protected, gmt::WR_PROT),
            (self.online, gmt::ONLINE),
        ] {
            if on {
                g |= bit;
            }
        }
        g
    }
}

/// A tape drive, opened (`open(2)` of a non-rewinding device).
pub trait TapeDrive: Send {
    /// The device, for messages (`/dev/nst0`, `vtl://…/0`).
    fn name(&self) -> &str;
    /// One `MTIOCTOP`.
    fn op(&mut self, op: MtOp) -> Result<()>;
    /// `MTIOCGET`.
    fn status(&mut self) -> Result<TapeStatus>;
    /// `read(2)`: bytes of the next record(s); 0 at a filemark or end of
    /// data.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize>;
    /// `write(2)` of a record (variable mode) or of whole blocks.
    fn write(&mut self, buf: &[u8]) -> Result<usize>;
}

/// The error of a failed tape call: kind Media, naming the device, the
/// operation and the errno; `errno_of` recovers the errno.
pub fn tape_error(device: &str, op: &str, errno: i32) -> Error {
    let what = match errno {
        errno::ENOSPC => "no space left: early warning or end of medium",
        errno::EROFS => "the cartridge is write-protected",
        errno::ENOMEDIUM => "no cartridge in the drive",
        errno::EIO => "I/O error",
        errno::EINVAL => "invalid argument (block size or count)",
        errno::EBUSY => "the drive is in use",
        errno::ENODEV => "no such drive",
        _ => "failed",
    };
    let kind = if errno == errno::ENOSPC {
        ErrorKind::MediaFull
    } else {
        ErrorKind::Media
    };
    Error::new(kind, format!("tape {device}: {op}: {what} (errno {errno})"))
}

/// The errno a [`tape_error`] carries.
pub fn errno_of(e: &Error) -> Option<i32> {
    let s = e.to_string();
    let at = s.rfind("(errno ")?;
    s[at + 7..].split(')').next()?.parse().ok()
}

/// Protocol version of the VTL wire protocol.
pub const VTL_VERSION: u32 = 1;
/// The first bytes a VTL client sends.
pub const VTL_MAGIC: &[u8; 8] = b"FLOEVTL\0";
/// Largest frame either side accepts.
pub const VTL_MAX_FRAME: u32 = 64 << 20;

/// A request to the virtual tape library.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "req")]
pub enum VtlRequest {
    /// `open(2)` drive `drive` for reading or reading and writing.
    Open {
        /// Drive number.
        drive: u32,
        /// O_RDWR (else O_RDONLY).
        write: bool,
    },
    /// `read(2)` of up to `max` bytes.
    Read {
        /// Buffer size.
        max: u32,
    },
    /// `write(2)`: the bytes follow the JSON in the frame.
    Write,
    /// `MTIOCTOP`.
    Op {
        /// `mt_op`.
        code: u16,
        /// `mt_count`.
        count: u32,
    },
    /// `MTIOCGET`.
    Status,
    /// `close(2)`: a filemark if the last operation was a write; the drive
    /// is free for the changer once this is answered.
    Close,
    /// Changer: unload the drive's cartridge to its slot and load the
    /// next slot's (in slot order, after the one unloaded).
    Next {
        /// Drive number.
        drive: u32,
    },
    /// Changer: load the cartridge with this barcode.
    Load {
        /// Drive number.
        drive: u32,
        /// Barcode.
        barcode: String,
    },
    /// Changer: unload the drive.
    Unload {
        /// Drive number.
        drive: u32,
    },
    /// Changer: set or clear a cartridge's write-protect tab.
    Protect {
        /// Barcode.
        barcode: String,
        /// On or off.
        on: bool,
    },
    /// The library: slots, drives, and per-drive counters.
    Inventory,
}

/// A VTL response: `errno` 0 on success; `data` after the JSON for reads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VtlResponse {
    /// 0, or the errno of the failure.
    pub errno: i32,
    /// Bytes done (read/write), if any.
    #[serde(default)]
    pub count: u64,
    /// Status (`Status`), barcode (`Next`/`Load`), inventory, message.
    #[serde(default)]
    pub value: serde_json::Value,
}

/// Write one frame: `u32` big-endian length of the JSON, the JSON, `u32`
/// length of the payload, the payload.
pub fn write_frame(w: &mut impl Write, json: &[u8], payload: &[u8]) -> std::io::Result<()> {
    let jl = u32::try_from(json.len()).map_err(std::io::Error::other)?;
    let pl = u32::try_from(payload.len()).map_err(std::io::Error::other)?;
    let mut head = Vec::with_capacity(8 + json.len());
    head.extend_from_slice(&jl.to_be_bytes());
    head.extend_from_slice(json);
    head.extend_from_slice(&pl.to_be_bytes());
    w.write_all(&head)?;
    w.write_all(payload)?;
    w.flush()
}

/// Read one frame (bounded by [`VTL_MAX_FRAME`]): the JSON and payload.
pub fn read_frame(r: &mut impl Read) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut part = || -> std::io::Result<Vec<u8>> {
        let mut n = [0u8; 4];
        r.read_exact(&mut n)?;
        let n = u32::from_be_bytes(n);
        if n > VTL_MAX_FRAME {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("VTL frame part of {n} bytes"),
            ));
        }
        let mut b = vec![0u8; usize::try_from(n).unwrap_or(0)];
        r.read_exact(&mut b)?;
        Ok(b)
    };
    let json = part()?;
    let payload = part()?;
    Ok((json, payload))
}

/// A connection to the virtual tape library (`vtl://HOST:PORT/DRIVE`).
pub struct VtlClient {
    name: String,
    stream: std::net::TcpStream,
}

impl VtlClient {
    /// Connect to `HOST:PORT` and say hello.
    pub fn connect(addr: &str, name: &str) -> Result<VtlClient> {
        let mut stream = std::net::TcpStream::connect(addr).map_err(|e| {
            Error::new(
                ErrorKind::Media,
                format!("cannot reach the tape library at {addr}"),
            )
            .source(e)
        })?;
        let _ = stream.set_nodelay(true);
        let mut hello = VTL_MAGIC.to_vec();
        hello.extend_from_slice(&VTL_VERSION.to_be_bytes());
        stream
            .write_all(&hello)
            .and_then(|()| {
                let mut back = [0u8; 12];
                stream.read_exact(&mut back)?;
                if &back[..8] != VTL_MAGIC || back[8..] != VTL_VERSION.to_be_bytes() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "not a Floe VTL of this protocol version",
                    ));
                }
                Ok(())
            })
            .map_err(|e| {
                Error::new(ErrorKind::Protocol, format!("tape library at {addr}")).source(e)
            })?;
        Ok(VtlClient {
            name: name.to_string(),
            stream,
        })
    }

    /// One request; `Err` for a transport failure, the response otherwise.
    pub fn call(&mut self, req: &VtlRequest, payload: &[u8]) -> Result<(VtlResponse, Vec<u8>)> {
        let json = serde_json::to_vec(req)
            .map_err(|e| Error::new(ErrorKind::Protocol, "encode VTL request").source(e))?;
        let io = |e: std::io::Error| {
            Error::new(
                ErrorKind::Media,
                format!("tape {}: connection to the library failed", self.name),
            )
            .source(e)
        };
        write_frame(&mut self.stream, &json, payload).map_err(io)?;
        let (j, p) = read_frame(&mut self.stream).map_err(io)?;
        let resp: VtlResponse = serde_json::from_slice(&j)
            .map_err(|e| Error::new(ErrorKind::Protocol, "malformed VTL response").source(e))?;
        Ok((resp, p))
    }

    /// A call whose non-zero errno becomes a [`tape_error`].
    pub fn checked(
        &mut self,
        what: &str,
        req: &VtlRequest,
        payload: &[u8],
    ) -> Result<(VtlResponse, Vec<u8>)> {
        let (r, p) = self.call(req, payload)?;
        if r.errno != 0 {
            let mut e = tape_error(&self.name, what, r.errno);
            if let Some(m) = r.value.as_str() {
                e = Error::new(e.kind(), format!("{e}: {m}"));
            }
            return Err(e);
        }
        Ok((r, p))
    }
}

/// A drive of the virtual tape library, opened.
pub struct VtlDrive {
    client: VtlClient,
}

/// Split `vtl://HOST:PORT/DRIVE`.
pub fn parse_vtl(spec: &str) -> Option<(String, u32)> {
    let rest = spec.strip_prefix("vtl://")?;
    let (addr, drive) = rest.rsplit_once('/')?;
    Some((addr.to_string(), drive.parse().ok()?))
}

impl VtlDrive {
    /// Open drive `vtl://HOST:PORT/N` for reading or writing.
    pub fn open(spec: &str, write: bool) -> Result<VtlDrive> {
        let (addr, drive) = parse_vtl(spec).ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                format!("tape device {spec:?} is not vtl://HOST:PORT/DRIVE"),
            )
        })?;
        let mut client = VtlClient::connect(&addr, spec)?;
        client.checked("open", &VtlRequest::Open { drive, write }, &[])?;
        Ok(VtlDrive { client })
    }
}

impl Drop for VtlDrive {
    fn drop(&mut self) {
        // Closed when the library answers, not when it notices the
        // connection gone: a changer run right after must find it free.
        let _ = self.client.call(&VtlRequest::Close, &[]);
    }
}

impl TapeDrive for VtlDrive {
    fn name(&self) -> &str {
        &self.client.name
    }
    fn op(&mut self, op: MtOp) -> Result<()> {
        let (code, count) = op.code();
        self.client
            .checked(&format!("{op:?}"), &VtlRequest::Op { code, count }, &[])?;
        Ok(())
    }
    fn status(&mut self) -> Result<TapeStatus> {
        let (r, _) = self.client.checked("MTIOCGET", &VtlRequest::Status, &[])?;
        serde_json::from_value(r.value)
            .map_err(|e| Error::new(ErrorKind::Protocol, "malformed VTL status").source(e))
    }
    fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        let max = u32::try_from(buf.len())
            .unwrap_or(u32::MAX)
            .min(VTL_MAX_FRAME);
        let (_, p) = self
            .client
            .checked("read", &VtlRequest::Read { max }, &[])?;
        if p.len() > buf.len() {
            return Err(Error::new(
                ErrorKind::Protocol,
                "VTL returned more than was asked",
            ));
        }
        buf[..p.len()].copy_from_slice(&p);
        Ok(p.len())
    }
    fn write(&mut self, buf: &[u8]) -> Result<usize> {
        let (r, _) = self.client.checked("write", &VtlRequest::Write, buf)?;
        Ok(usize::try_from(r.count).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn mt_codes_round_trip_and_status_bits_too() {
        for op in [
            MtOp::Rewind,
            MtOp::Fsf(3),
            MtOp::Bsf(1),
            MtOp::Fsr(9),
            MtOp::Bsr(2),
            MtOp::Weof(1),
            MtOp::Eom,
            MtOp::SetBlk(262_144),
            MtOp::Offline,
        ] {
            let (c, n) = op.code();
            assert_eq!(MtOp::from_code(c, n), Some(op));
        }
        let s = TapeStatus {
            bot: true,
            eot: true,
            write_protected: true,
            online: true,
            ..Default::default()
        };
        let back = TapeStatus::from_mtget(s.gstat(), 0, 0, 0);
        assert_eq!(back, s);
        let e = tape_error("vtl://x/0", "write", errno::ENOSPC);
        assert_eq!(errno_of(&e), Some(errno::ENOSPC));
        assert_eq!(e.kind(), ErrorKind::MediaFull);
    }

    proptest! {
        #[test]
        fn frames_round_trip(json in proptest::collection::vec(any::<u8>(), 0..300), payload in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let mut buf = Vec::new();
            write_frame(&mut buf, &json, &payload).unwrap();
            let (j, p) = read_frame(&mut std::io::Cursor::new(buf)).unwrap();
            prop_assert_eq!(j, json);
            prop_assert_eq!(p, payload);
        }

        #[test]
        fn the_frame_reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = read_frame(&mut std::io::Cursor::new(bytes));
        }
    }
}
