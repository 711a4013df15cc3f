//! NBD client negotiation (fixed newstyle, `NBD_OPT_GO` with info
//! requests), so the mover learns an export's size *and* its description —
//! the device identity an array like sim-san reports (its WWN) — before it
//! reads. Transmission then uses the `nbd` crate's client. Falls back to
//! `NBD_OPT_EXPORT_NAME` for servers that do not know `GO`.
//! Protocol: NetworkBlockDevice `doc/proto.md`.

use std::io::{Error, ErrorKind, Read, Result, Write};

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 1 | (1 << 31);
const REP_ERR_UNKNOWN: u32 = 6 | (1 << 31);
const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_DESCRIPTION: u16 = 2;
const TFLAG_READ_ONLY: u16 = 1 << 1;

/// What the server said about the export.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// The export's description, if the server gave one.
    pub description: Option<String>,
}

impl ExportInfo {
    /// The `nbd` crate's view of it.
    pub fn to_crate(&self) -> nbd::Export {
        nbd::Export {
            size: self.size,
            readonly: self.flags & TFLAG_READ_ONLY != 0,
            ..Default::default()
        }
    }
}

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidData, msg.into())
}

fn u16_of(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn read_exact_vec(s: &mut impl Read, n: usize) -> Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v)?;
    Ok(v)
}

/// Negotiate `export` on a fresh connection.
pub fn negotiate<S: Read + Write>(s: &mut S, export: &str) -> Result<ExportInfo> {
    let hello = read_exact_vec(s, 18)?;
    if &hello[0..8] != b"NBDMAGIC" || hello[8..16] != IHAVEOPT.to_be_bytes() {
        return Err(bad("not a newstyle NBD server"));
    }
    let hflags = u16_of(&hello[16..18]);
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(bad(
            "the NBD server does not speak fixed newstyle negotiation",
        ));
    }
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let cflags = u32::from(FLAG_FIXED_NEWSTYLE)
        | if no_zeroes {
            u32::from(FLAG_NO_ZEROES)
        } else {
            0
        };
    s.write_all(&cflags.to_be_bytes())?;

    let name = export.as_bytes();
    let name_len = u32::try_from(name.len()).map_err(|_| bad("export name too long"))?;
    let mut data = Vec::new();
    data.extend_from_slice(&name_len.to_be_bytes());
    data.extend_from_slice(name);
    data.extend_from_slice(&2u16.to_be_bytes());
    data.extend_from_slice(&INFO_NAME.to_be_bytes());
    data.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
    let mut req = Vec::new();
    req.extend_from_slice(&IHAVEOPT.to_be_bytes());
    req.extend_from_slice(&OPT_GO.to_be_bytes());
    req.extend_from_slice(
        &u32::try_from(data.len())
            .map_err(|_| bad("option too long"))?
            .to_be_bytes(),
    );
    req.extend_from_slice(&data);
    s.write_all(&req)?;
    s.flush()?;

    let mut info = ExportInfo::default();
    let mut have_export = false;
    loop {
        let h = read_exact_vec(s, 20)?;
        if h[0..8] != REPLY_MAGIC.to_be_bytes() {
            return Err(bad("bad NBD option reply magic"));
        }
        let typ = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
        if len > 64 * 1024 {
            return Err(bad("NBD option reply too long"));
        }
        let body = read_exact_vec(s, usize::try_from(len).map_err(|_| bad("reply too long"))?)?;
        match typ {
            REP_INFO if body.len() >= 2 => match u16_of(&body) {
                INFO_EXPORT if body.len() >= 12 => {
                    info.size =
                        u64::from_be_bytes(body[2..10].try_into().map_err(|_| bad("short info"))?);
                    info.flags = u16_of(&body[10..12]);
                    have_export = true;
                }
                INFO_DESCRIPTION => {
                    info.description = Some(String::from_utf8_lossy(&body[2..]).to_string())
                }
                _ => {}
            },
            REP_INFO => {}
            REP_ACK => {
                if !have_export {
                    return Err(bad("NBD server acknowledged GO without export info"));
                }
                return Ok(info);
            }
            REP_ERR_UNSUP => return export_name_fallback(s, export, no_zeroes),
            REP_ERR_UNKNOWN => {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "no export named {export:?} ({})",
                        String::from_utf8_lossy(&body)
                    ),
                ))
            }
            t if t & (1 << 31) != 0 => {
                return Err(Error::other(format!(
                    "NBD server refused export {export:?}: error {:#x} {}",
                    t,
                    String::from_utf8_lossy(&body)
                )))
            }
            _ => {}
        }
    }
}

fn export_name_fallback<S: Read + Write>(
    s: &mut S,
    export: &str,
    no_zeroes: bool,
) -> Result<ExportInfo> {
    let name = export.as_bytes();
    let mut req = Vec::new();
    req.extend_from_slice(&IHAVEOPT.to_be_bytes());
    req.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    req.extend_from_slice(
        &u32::try_from(name.len())
            .map_err(|_| bad("export name too long"))?
            .to_be_bytes(),
    );
    req.extend_from_slice(name);
    s.write_all(&req)?;
    s.flush()?;
    let r = read_exact_vec(s, 10)
        .map_err(|_| Error::new(ErrorKind::NotFound, format!("no export named {export:?}")))?;
    if !no_zeroes {
        read_exact_vec(s, 124)?;
    }
    Ok(ExportInfo {
        size: u64::from_be_bytes(r[0..8].try_into().map_err(|_| bad("short reply"))?),
        flags: u16_of(&r[8..10]),
        description: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct Script {
        input: std::io::Cursor<Vec<u8>>,
    }
    impl Read for Script {
        fn read(&mut self, b: &mut [u8]) -> Result<usize> {
            self.input.read(b)
        }
    }
    impl Write for Script {
        fn write(&mut self, b: &[u8]) -> Result<usize> {
            Ok(b.len())
        }
        fn flush(&mut self) -> Result<()> {
            Ok(())
        }
    }

    proptest! {
        /// Whatever a server sends, negotiation ends in a value or an
        /// error, never a panic.
        #[test]
        fn negotiation_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut input = b"NBDMAGIC".to_vec();
            input.extend_from_slice(&IHAVEOPT.to_be_bytes());
            input.extend_from_slice(&3u16.to_be_bytes());
            input.extend_from_slice(&tail);
            let _ = negotiate(&mut Script { input: std::io::Cursor::new(input) }, "lun0");
        }
    }
}
