//! NBD server for the array's LUNs (fixed newstyle negotiation, simple
//! replies), after the protocol in NetworkBlockDevice's `doc/proto.md`.
//!
//! Negotiation does what real clients need: `NBD_OPT_EXPORT_NAME`,
//! `NBD_OPT_LIST` with the real export names, `NBD_OPT_INFO`/`NBD_OPT_GO`
//! with size, name, description (the WWN) and block sizes, `NBD_OPT_ABORT`;
//! everything else (TLS, structured replies, meta contexts) is answered
//! `NBD_REP_ERR_UNSUP`, which clients treat as "use the simple protocol".
//! Exports are LUNs, named by LUN name or by WWN; "" is the first LUN.

use crate::array::{Array, ExportInfo};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const FLAG_C_NO_ZEROES: u32 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 1 | (1 << 31);
const REP_ERR_INVALID: u32 = 3 | (1 << 31);
const REP_ERR_UNKNOWN: u32 = 6 | (1 << 31);

const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_DESCRIPTION: u16 = 2;
const INFO_BLOCK_SIZE: u16 = 3;

const TFLAG_HAS_FLAGS: u16 = 1;
const TFLAG_SEND_FLUSH: u16 = 1 << 2;
const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;

/// The largest request served (reads and writes).
pub const MAX_REQUEST: u32 = 64 * 1024 * 1024;
const MAX_OPTION: u32 = 64 * 1024;

fn tflags() -> u16 {
    TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN
}

fn read_u16(r: &mut impl Read) -> std::io::Result<u16> {
    let mut b = [0; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn opt_reply(w: &mut impl Write, opt: u32, typ: u32, data: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(data);
    w.write_all(&out)
}

fn name_bytes(name: &str) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&u32::try_from(name.len()).unwrap_or(0).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d
}

/// Negotiate; the export to serve, or `None` when the client left.
fn negotiate(array: &Array, s: &mut TcpStream) -> std::io::Result<Option<ExportInfo>> {
    let mut hello = Vec::new();
    hello.extend_from_slice(NBDMAGIC);
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let cflags = read_u32(s)?;
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    loop {
        if read_u64(s)? != IHAVEOPT {
            return Ok(None);
        }
        let opt = read_u32(s)?;
        let len = read_u32(s)?;
        if len > MAX_OPTION {
            return Ok(None);
        }
        let mut data = vec![0u8; usize::try_from(len).unwrap_or(0)];
        s.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).to_string();
                let Some(e) = array.export(&name) else {
                    return Ok(None); // the protocol has no error reply here
                };
                let mut out = Vec::new();
                out.extend_from_slice(&e.size.to_be_bytes());
                out.extend_from_slice(&tflags().to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&out)?;
                return Ok(Some(e));
            }
            OPT_ABORT => {
                opt_reply(s, opt, REP_ACK, &[])?;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    opt_reply(s, opt, REP_ERR_INVALID, b"LIST takes no data")?;
                    continue;
                }
                for l in array.luns() {
                    opt_reply(s, opt, REP_SERVER, &name_bytes(&l.name))?;
                }
                opt_reply(s, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let parsed = (|| {
                    let mut r = data.as_slice();
                    let n = usize::try_from(read_u32(&mut r).ok()?).ok()?;
                    let name = String::from_utf8(r.get(..n)?.to_vec()).ok()?;
                    r = r.get(n..)?;
                    let k = read_u16(&mut r).ok()?;
                    let mut reqs = Vec::new();
                    for _ in 0..k {
                        reqs.push(read_u16(&mut r).ok()?);
                    }
                    Some((name, reqs))
                })();
                let Some((name, reqs)) = parsed else {
                    opt_reply(s, opt, REP_ERR_INVALID, b"malformed INFO/GO request")?;
                    continue;
                };
                let Some(e) = array.export(&name) else {
                    let msg = format!("no export named {name:?}");
                    opt_reply(s, opt, REP_ERR_UNKNOWN, msg.as_bytes())?;
                    continue;
                };
                let mut info = Vec::new();
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&e.size.to_be_bytes());
                info.extend_from_slice(&tflags().to_be_bytes());
                opt_reply(s, opt, REP_INFO, &info)?;
                for r in reqs {
                    let mut d = r.to_be_bytes().to_vec();
                    match r {
                        INFO_NAME => d.extend_from_slice(e.name.as_bytes()),
                        INFO_DESCRIPTION => d.extend_from_slice(e.wwn.as_bytes()),
                        INFO_BLOCK_SIZE => {
                            d.extend_from_slice(&1u32.to_be_bytes());
                            d.extend_from_slice(&4096u32.to_be_bytes());
                            d.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                        }
                        _ => continue,
                    }
                    opt_reply(s, opt, REP_INFO, &d)?;
                }
                opt_reply(s, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    return Ok(Some(e));
                }
            }
            _ => opt_reply(s, opt, REP_ERR_UNSUP, &[])?,
        }
    }
}

fn reply_header(buf: &mut [u8], error: u32, handle: u64) {
    buf[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    buf[4..8].copy_from_slice(&error.to_be_bytes());
    buf[8..16].copy_from_slice(&handle.to_be_bytes());
}

fn errno(e: i32) -> u32 {
    u32::try_from(e).unwrap_or(5)
}

fn transmission(array: &Array, s: &mut TcpStream, e: &ExportInfo) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let mut req = [0u8; 28];
        s.read_exact(&mut req)?;
        let magic = u32::from_be_bytes([req[0], req[1], req[2], req[3]]);
        if magic != REQUEST_MAGIC {
            return Ok(());
        }
        let typ = u16::from_be_bytes([req[6], req[7]]);
        let handle = u64::from_be_bytes(req[8..16].try_into().unwrap_or_default());
        let offset = u64::from_be_bytes(req[16..24].try_into().unwrap_or_default());
        let len = u32::from_be_bytes([req[24], req[25], req[26], req[27]]);
        let ulen = usize::try_from(len).unwrap_or(0);
        match typ {
            CMD_READ => {
                if len > MAX_REQUEST {
                    let mut h = [0u8; 16];
                    reply_header(&mut h, errno(libc::EINVAL), handle);
                    s.write_all(&h)?;
                    continue;
                }
                buf.resize(16 + ulen, 0);
                match array.nbd_read(e.lun, offset, &mut buf[16..]) {
                    Err(crate::array::DISCONNECT) => return Ok(()),
                    Ok(()) => {
                        reply_header(&mut buf[..16], 0, handle);
                        s.write_all(&buf)?;
                    }
                    Err(code) => {
                        reply_header(&mut buf[..16], errno(code), handle);
                        s.write_all(&buf[..16])?;
                    }
                }
            }
            CMD_WRITE => {
                if len > MAX_REQUEST {
                    return Ok(()); // cannot skip the payload safely
                }
                buf.resize(ulen, 0);
                s.read_exact(&mut buf)?;
                let r = array.nbd_write(e.lun, offset, &buf);
                let mut h = [0u8; 16];
                reply_header(&mut h, r.err().map_or(0, errno), handle);
                s.write_all(&h)?;
            }
            CMD_FLUSH => {
                let r = array.nbd_flush(e.lun);
                let mut h = [0u8; 16];
                reply_header(&mut h, r.err().map_or(0, errno), handle);
                s.write_all(&h)?;
            }
            CMD_DISC => return Ok(()),
            _ => {
                let mut h = [0u8; 16];
                reply_header(&mut h, errno(libc::EINVAL), handle);
                s.write_all(&h)?;
            }
        }
    }
}

/// Serve one NBD client connection.
pub fn serve_connection(array: Arc<Array>, mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    if let Ok(Some(e)) = negotiate(&array, &mut s) {
        let _ = transmission(&array, &mut s, &e);
    }
}

/// Accept NBD clients forever, one thread each.
pub fn serve(array: Arc<Array>, listener: TcpListener) {
    for conn in listener.incoming() {
        match conn {
            Ok(s) => {
                let a = array.clone();
                std::thread::spawn(move || serve_connection(a, s));
            }
            Err(_) => continue,
        }
    }
}
