//! Devices the mover reads (shared SAN storage) and restore writes: local
//! block devices and image files with O_DIRECT, and NBD exports through the
//! `nbd` crate's client. Resolved from a device's stable identity, never
//! from a path the agent sent.

use crate::error::{Error, ErrorKind, Result};
use crate::model::DeviceId;
use crate::nbd_client::{negotiate, ExportInfo};
use crate::sys::{block_device_size, AlignedBuf, ALIGN};
use crate::units::{Bytes, DeviceOffset};
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A device the mover reads from.
pub trait BlockDevice: Send + Sync {
    /// Its identity.
    fn id(&self) -> &DeviceId;
    /// Its size.
    fn size(&self) -> Bytes;
    /// Where it is (path or URL), for messages.
    fn location(&self) -> String;
    /// Read exactly `buf.len()` bytes at `offset`. For O_DIRECT devices
    /// `buf`, `offset` and the length must be 4096-aligned.
    fn read_at(&self, buf: &mut [u8], offset: DeviceOffset) -> Result<()>;
}

fn read_error(dev: &DeviceId, offset: u64, len: usize, e: std::io::Error) -> Error {
    Error::new(ErrorKind::ReadFailed, "read of the shared device failed")
        .op("read")
        .device(dev)
        .range(DeviceOffset(offset), Bytes(len as u64))
        .source(e)
}

/// A local block device or image file, read with O_DIRECT.
pub struct DirectFile {
    id: DeviceId,
    path: PathBuf,
    pub(crate) file: File,
    size: u64,
}

impl DirectFile {
    /// Open `path` read-only with O_DIRECT.
    pub fn open(id: DeviceId, path: &Path) -> Result<DirectFile> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|e| {
                Error::new(ErrorKind::UnknownDevice, "cannot open device with O_DIRECT")
                    .op("open")
                    .device(&id)
                    .path(path)
                    .source(e)
            })?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io("stat", e).device(&id).path(path))?;
        let size = if meta.file_type().is_block_device() {
            block_device_size(&file)
                .map_err(|e| Error::io("BLKGETSIZE64", e).device(&id).path(path))?
        } else {
            meta.len()
        };
        Ok(DirectFile {
            id,
            path: path.to_path_buf(),
            file,
            size,
        })
    }
}

impl BlockDevice for DirectFile {
    fn id(&self) -> &DeviceId {
        &self.id
    }
    fn size(&self) -> Bytes {
        Bytes(self.size)
    }
    fn location(&self) -> String {
        self.path.display().to_string()
    }
    fn read_at(&self, buf: &mut [u8], offset: DeviceOffset) -> Result<()> {
        if !(buf.as_ptr() as usize).is_multiple_of(ALIGN)
            || !buf.len().is_multiple_of(512)
            || !offset.0.is_multiple_of(512)
        {
            let mut bounce = AlignedBuf::new(buf.len().div_ceil(ALIGN) * ALIGN);
            let start = offset.0 / 512 * 512;
            let skip = usize::try_from(offset.0 - start).unwrap_or(0);
            bounce.set_len((skip + buf.len()).div_ceil(512) * 512);
            self.read_at(&mut bounce, DeviceOffset(start))?;
            buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
            return Ok(());
        }
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset.0 + done as u64;
            match self.file.read_at(&mut buf[done..], at) {
                Ok(0) => {
                    return Err(Error::new(
                        ErrorKind::ExtentOutOfRange,
                        "read past the end of the device",
                    )
                    .op("read")
                    .device(&self.id)
                    .range(offset, Bytes(buf.len() as u64)))
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(read_error(&self.id, at, buf.len() - done, e)),
            }
        }
        Ok(())
    }
}

type NbdConn = nbd::client::NbdClient<TcpStream>;

/// How NBD connections behave.
#[derive(Clone, Copy, Debug)]
pub struct NbdOptions {
    /// Reconnect attempts after a dropped connection, per read.
    pub retries: u32,
    /// First backoff; doubled per attempt, at most 2 s.
    pub backoff: Duration,
    /// A request that takes longer than this counts as a dropped
    /// connection.
    pub timeout: Duration,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            retries: 5,
            backoff: Duration::from_millis(50),
            timeout: Duration::from_secs(120),
        }
    }
}

fn nbd_connect(
    id: &DeviceId,
    addr: &str,
    export: &str,
    timeout: Duration,
) -> Result<(NbdConn, ExportInfo)> {
    let url = format!("nbd://{addr}/{export}");
    let mut s = TcpStream::connect(addr).map_err(|e| {
        Error::new(
            ErrorKind::UnknownDevice,
            format!("cannot reach NBD server {url}"),
        )
        .op("connect")
        .device(id)
        .source(e)
    })?;
    // Without TCP_NODELAY, Nagle and delayed ACKs cost ~50 ms a request.
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let info = negotiate(&mut s, export).map_err(|e| {
        let kind = if e.kind() == std::io::ErrorKind::NotFound {
            ErrorKind::UnknownDevice
        } else {
            ErrorKind::ReadFailed
        };
        Error::new(
            kind,
            format!("NBD server {url} refused export {export:?}: no such device on the SAN"),
        )
        .op("connect")
        .device(id)
        .source(e)
    })?;
    Ok((nbd::client::NbdClient::new(s, &info.to_crate()), info))
}

/// Did the transport fail (reconnect and retry), rather than the server
/// report an error for the request (fail)?
fn transport_failure(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::UnexpectedEof
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::BrokenPipe
            | K::TimedOut
            | K::WouldBlock
            | K::InvalidData
    )
}

/// An NBD export, read through a pool of connections (one request in
/// flight per connection; several connections for parallel reads).
/// A dropped connection is reconnected with bounded exponential backoff;
/// an error the server reports (EIO) fails the read at once.
pub struct NbdDevice {
    id: DeviceId,
    addr: String,
    export: String,
    info: ExportInfo,
    opts: NbdOptions,
    pool: Mutex<Vec<NbdConn>>,
    reconnects: AtomicU64,
}

impl NbdDevice {
    /// Connect to `export` at `addr` (host:port).
    pub fn connect(id: DeviceId, addr: &str, export: &str, opts: NbdOptions) -> Result<NbdDevice> {
        let (c, info) = nbd_connect(&id, addr, export, opts.timeout)?;
        Ok(NbdDevice {
            id,
            addr: addr.to_string(),
            export: export.to_string(),
            info,
            opts,
            pool: Mutex::new(vec![c]),
            reconnects: AtomicU64::new(0),
        })
    }

    /// What the server said the export is (its description is the array's
    /// device identity).
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Connections re-established after a drop.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
}

impl BlockDevice for NbdDevice {
    fn id(&self) -> &DeviceId {
        &self.id
    }
    fn size(&self) -> Bytes {
        Bytes(self.info.size)
    }
    fn location(&self) -> String {
        format!("nbd://{}/{}", self.addr, self.export)
    }
    fn read_at(&self, buf: &mut [u8], offset: DeviceOffset) -> Result<()> {
        let mut attempt = 0u32;
        loop {
            let conn = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let mut conn = match conn {
                Some(c) => c,
                None => match nbd_connect(&self.id, &self.addr, &self.export, self.opts.timeout) {
                    Ok((c, _)) => c,
                    Err(e) if attempt < self.opts.retries => {
                        attempt += 1;
                        std::thread::sleep(backoff(self.opts.backoff, attempt));
                        let _ = e;
                        continue;
                    }
                    Err(e) => {
                        return Err(e
                            .with_kind(ErrorKind::ReadFailed)
                            .range(offset, Bytes(buf.len() as u64)))
                    }
                },
            };
            let r = conn
                .seek(SeekFrom::Start(offset.0))
                .and_then(|_| conn.read_exact(buf));
            match r {
                Ok(()) => {
                    self.pool
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(conn);
                    return Ok(());
                }
                // The connection is dropped either way: after an error its
                // stream may be out of step.
                Err(e) if transport_failure(&e) && attempt < self.opts.retries => {
                    attempt += 1;
                    self.reconnects.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(backoff(self.opts.backoff, attempt));
                }
                Err(e) if transport_failure(&e) => {
                    return Err(Error::new(
                        ErrorKind::ReadFailed,
                        format!(
                            "the NBD connection kept failing: gave up after {} reconnects",
                            self.opts.retries
                        ),
                    )
                    .op("read")
                    .device(&self.id)
                    .range(offset, Bytes(buf.len() as u64))
                    .source(e))
                }
                Err(e) => return Err(read_error(&self.id, offset.0, buf.len(), e)),
            }
        }
    }
}

fn backoff(first: Duration, attempt: u32) -> Duration {
    (first * 2u32.saturating_pow(attempt.saturating_sub(1))).min(Duration::from_secs(2))
}

/// Where a device identity resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A local block device or image file.
    Path(PathBuf),
    /// An NBD export: `host:port` and export name.
    Nbd(String, String),
}

/// Parse `nbd://host:port/export` or a path.
pub fn parse_location(s: &str) -> Result<Location> {
    if let Some(rest) = s.strip_prefix("nbd://") {
        let (addr, export) = rest.split_once('/').unwrap_or((rest, ""));
        if addr.is_empty() {
            return Err(Error::new(ErrorKind::Config, format!("no host in {s:?}")));
        }
        let addr = if addr.contains(':') {
            addr.to_string()
        } else {
            format!("{addr}:10809")
        };
        Ok(Location::Nbd(addr, export.to_string()))
    } else if s.contains("://") {
        Err(Error::new(
            ErrorKind::Config,
            format!("unsupported device location {s:?}: use a path or nbd://host:port/export"),
        ))
    } else {
        Ok(Location::Path(PathBuf::from(s)))
    }
}

/// Resolves device identities to devices the mover may read: an explicit
/// table (`--device ID=LOCATION`), else exports of the SAN's NBD server
/// named by the identity (`--san nbd://host:port`).
///
/// Least privilege: with an allow-list, an identity not on it is refused
/// before anything is opened. Every device is opened read-only. An NBD
/// export that describes itself (sim-san gives its WWN) must describe
/// itself as the identity the map names; through the SAN this description
/// is required, through the table (where the operator vouches for the
/// mapping) it is checked when the server gives one.
pub struct DeviceResolver {
    table: HashMap<DeviceId, Location>,
    san: Option<String>,
    allow: Option<HashSet<DeviceId>>,
    nbd: NbdOptions,
    open: Mutex<HashMap<DeviceId, Arc<dyn BlockDevice>>>,
}

impl DeviceResolver {
    /// A resolver with a table and an optional SAN (`host:port`), allowing
    /// any device it can find.
    pub fn new(table: HashMap<DeviceId, Location>, san: Option<String>) -> DeviceResolver {
        DeviceResolver {
            table,
            san,
            allow: None,
            nbd: NbdOptions::default(),
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Only these devices may be read.
    pub fn with_allow_list(mut self, allow: impl IntoIterator<Item = DeviceId>) -> Self {
        self.allow = Some(allow.into_iter().collect());
        self
    }

    /// NBD connection behaviour.
    pub fn with_nbd_options(mut self, nbd: NbdOptions) -> Self {
        self.nbd = nbd;
        self
    }

    /// The device for `id`, opened once and shared.
    pub fn resolve(&self, id: &DeviceId) -> Result<Arc<dyn BlockDevice>> {
        if let Some(d) = self.open.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            return Ok(d.clone());
        }
        if let Some(allow) = &self.allow {
            if !allow.contains(id) {
                return Err(Error::new(
                    ErrorKind::Denied,
                    "device is not on this mover's allow-list for the agent: refused before any read",
                )
                .op("open device")
                .device(id));
            }
        }
        let dev: Arc<dyn BlockDevice> = match (self.table.get(id), &self.san) {
            (Some(Location::Path(p)), _) => {
                let d = DirectFile::open(id.clone(), p)?;
                check_local_identity(id, p, &d.file)?;
                check_on_device_identity(id, p, &d)?;
                Arc::new(d)
            }
            (Some(Location::Nbd(addr, export)), _) => {
                let d = NbdDevice::connect(id.clone(), addr, export, self.nbd)?;
                check_identity(id, &d, false)?;
                Arc::new(d)
            }
            (None, Some(addr)) => {
                let d = NbdDevice::connect(id.clone(), addr, id.as_str(), self.nbd)?;
                check_identity(id, &d, true)?;
                Arc::new(d)
            }
            (None, None) => {
                return Err(Error::new(
                    ErrorKind::UnknownDevice,
                    "unknown device: not in the device table and no SAN configured",
                )
                .device(id))
            }
        };
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), dev.clone());
        Ok(dev)
    }
}

/// What a local block device says it is, from sysfs: its WWN
/// (`device/wwid`, SCSI/NVMe disks) and, for a loop device, its backing
/// file.
fn local_identity(file: &File) -> Option<(Option<String>, Option<String>)> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata().ok()?;
    if !meta.file_type().is_block_device() {
        return None;
    }
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let read = |p: &str| {
        std::fs::read_to_string(sys.join(p))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    Some((
        read("device/wwid").or_else(|| read("wwid")),
        read("loop/backing_file"),
    ))
}

/// Normalize a WWN for comparison: sysfs says `naa.6001405…`, `eui.…` or
/// `t10.…`; maps may say the same in another case.
fn same_wwn(a: &str, b: &str) -> bool {
    a.trim().eq_ignore_ascii_case(b.trim())
}

/// A local block device that identifies itself must identify itself as the
/// device the map names: a disk by its WWN, a loop device (for `file:` ids)
/// by its backing file. A device that says nothing is the operator's word.
fn check_local_identity(id: &DeviceId, path: &Path, file: &File) -> Result<()> {
    let Some((wwid, backing)) = local_identity(file) else {
        return Ok(());
    };
    let mismatch = |what: String| {
        Err(Error::new(
            ErrorKind::IdentityMismatch,
            format!(
                "{} identifies itself as {what}, not as the device the map names",
                path.display()
            ),
        )
        .op("verify device identity")
        .device(id))
    };
    if let Some(w) = wwid {
        if !same_wwn(&w, id.as_str()) {
            return mismatch(format!("WWN {w:?}"));
        }
    }
    if let (Some(b), Some(f)) = (backing, id.as_str().strip_prefix("file:")) {
        if Path::new(&b) != Path::new(f) {
            return mismatch(format!("a loop device over {b:?}"));
        }
    }
    Ok(())
}

/// 16 bytes as a UUID, 8-4-4-4-12.
fn uuid_text(u: &[u8]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// What a device says it is, from its own first bytes, for identities of
/// the form `PREFIX:VALUE`: the prefix, where to read 4 KiB, how to find
/// the value in them, and what to call the device.
struct OnDevice {
    prefix: &'static str,
    offset: u64,
    parse: fn(&[u8]) -> Option<String>,
    kind: &'static str,
}

const ON_DEVICE: [OnDevice; 3] = [
    // btrfs: superblock at 64 KiB, magic `_BHRfS_M` at +64, dev_item.uuid
    // at +201+66.
    OnDevice {
        prefix: "btrfs-dev:",
        offset: 65536,
        parse: |b| (&b[64..72] == b"_BHRfS_M").then(|| uuid_text(&b[267..283])),
        kind: "btrfs device",
    },
    // ext2/3/4: magic 0xEF53 at 1024+56, UUID at 1024+104; XFS: `XFSB`,
    // UUID at 32.
    OnDevice {
        prefix: "fs-uuid:",
        offset: 0,
        parse: |b| {
            if &b[0..4] == b"XFSB" {
                Some(uuid_text(&b[32..48]))
            } else if b[1024 + 56..1024 + 58] == [0x53, 0xEF] {
                Some(uuid_text(&b[1024 + 104..1024 + 120]))
            } else {
                None
            }
        },
        kind: "file system",
    },
    // LVM2 PV: `LABELONE` in one of the first four sectors; the PV
    // header's 32-character UUID, dashed 6-4-4-4-4-4-6.
    OnDevice {
        prefix: "lvm-pv:",
        offset: 0,
        parse: |b| {
            (0..4).find_map(|s| {
                let l = &b[s * 512..s * 512 + 512];
                if &l[0..8] != b"LABELONE" {
                    return None;
                }
                let off = usize::try_from(u32::from_le_bytes([l[20], l[21], l[22], l[23]])).ok()?;
                let u = std::str::from_utf8(l.get(off..off + 32)?).ok()?;
                Some(
                    [
                        &u[0..6],
                        &u[6..10],
                        &u[10..14],
                        &u[14..18],
                        &u[18..22],
                        &u[22..26],
                        &u[26..32],
                    ]
                    .join("-"),
                )
            })
        },
        kind: "LVM physical volume",
    },
];

/// A device named by an identity it carries itself (btrfs device UUID,
/// file system UUID, LVM PV UUID) must carry exactly that one.
fn check_on_device_identity(id: &DeviceId, path: &Path, d: &DirectFile) -> Result<()> {
    for o in &ON_DEVICE {
        let Some(want) = id.as_str().strip_prefix(o.prefix) else {
            continue;
        };
        let mut buf = AlignedBuf::new(4096);
        d.read_at(&mut buf, DeviceOffset(o.offset))?;
        let found = (o.parse)(&buf);
        if found.as_deref() == Some(want) {
            return Ok(());
        }
        return Err(Error::new(
            ErrorKind::IdentityMismatch,
            format!(
                "{} is {}, not the {} the map names",
                path.display(),
                found.map_or_else(|| format!("no {}", o.kind), |u| format!("{} {u}", o.kind)),
                o.kind
            ),
        )
        .op("verify device identity")
        .device(id));
    }
    Ok(())
}

fn check_identity(id: &DeviceId, d: &NbdDevice, required: bool) -> Result<()> {
    match &d.info().description {
        Some(desc) if desc == id.as_str() => Ok(()),
        Some(desc) => Err(Error::new(
            ErrorKind::IdentityMismatch,
            format!("{} identifies itself as {desc:?}, not as the device the map names", d.location()),
        )
        .op("verify device identity")
        .device(id)),
        None if required => Err(Error::new(
            ErrorKind::IdentityMismatch,
            format!("{} does not say which device it is; map it explicitly with --device to vouch for it", d.location()),
        )
        .op("verify device identity")
        .device(id)),
        None => Ok(()),
    }
}

/// Where a restore writes an item.
pub trait RestoreTarget: Send {
    /// Write `data` at `offset`.
    fn write_at(&mut self, data: &[u8], offset: DeviceOffset) -> Result<()>;
    /// Make it durable.
    fn flush(&mut self) -> Result<()>;
    /// Its size, when it has a fixed one.
    fn size(&self) -> Option<Bytes>;
}

struct FileTarget {
    path: PathBuf,
    file: File,
    fixed: Option<u64>,
}

impl RestoreTarget for FileTarget {
    fn write_at(&mut self, data: &[u8], offset: DeviceOffset) -> Result<()> {
        self.file.write_all_at(data, offset.0).map_err(|e| {
            Error::io("write", e)
                .with_kind(ErrorKind::WriteFailed)
                .path(&self.path)
                .range(offset, Bytes(data.len() as u64))
        })
    }
    fn flush(&mut self) -> Result<()> {
        self.file.sync_all().map_err(|e| {
            Error::io("fsync", e)
                .with_kind(ErrorKind::WriteFailed)
                .path(&self.path)
        })
    }
    fn size(&self) -> Option<Bytes> {
        self.fixed.map(Bytes)
    }
}

struct NbdTarget {
    url: String,
    conn: NbdConn,
    size: u64,
}

impl RestoreTarget for NbdTarget {
    fn write_at(&mut self, data: &[u8], offset: DeviceOffset) -> Result<()> {
        self.conn
            .seek(SeekFrom::Start(offset.0))
            .and_then(|_| self.conn.write_all(data))
            .map_err(|e| {
                Error::new(
                    ErrorKind::WriteFailed,
                    format!("write to {} failed", self.url),
                )
                .op("write")
                .range(offset, Bytes(data.len() as u64))
                .source(e)
            })
    }
    fn flush(&mut self) -> Result<()> {
        self.conn.flush().map_err(|e| {
            Error::new(
                ErrorKind::WriteFailed,
                format!("flush of {} failed", self.url),
            )
            .source(e)
        })
    }
    fn size(&self) -> Option<Bytes> {
        Some(Bytes(self.size))
    }
}

/// Open a restore target: a path (image file, created if missing, or a
/// block device) or `nbd://host:port/export`.
pub fn open_target(spec: &str) -> Result<Box<dyn RestoreTarget>> {
    match parse_location(spec)? {
        Location::Path(path) => {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| {
                    Error::io("open restore target", e)
                        .with_kind(ErrorKind::WriteFailed)
                        .path(&path)
                })?;
            let meta = file
                .metadata()
                .map_err(|e| Error::io("stat", e).path(&path))?;
            let fixed = if meta.file_type().is_block_device() {
                Some(
                    block_device_size(&file)
                        .map_err(|e| Error::io("BLKGETSIZE64", e).path(&path))?,
                )
            } else {
                None
            };
            Ok(Box::new(FileTarget { path, file, fixed }))
        }
        Location::Nbd(addr, export) => {
            let id = DeviceId::new(format!("nbd://{addr}/{export}"));
            let (conn, info) = nbd_connect(&id, &addr, &export, NbdOptions::default().timeout)?;
            Ok(Box::new(NbdTarget {
                url: id.0,
                conn,
                size: info.size,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wwns_compare_without_case() {
        assert!(same_wwn("naa.6001405ABC", "naa.6001405abc"));
        assert!(!same_wwn("naa.6001405abc", "naa.6001405abd"));
    }

    #[test]
    fn locations_parse() {
        assert_eq!(
            parse_location("nbd://h:1/x").unwrap(),
            Location::Nbd("h:1".into(), "x".into())
        );
        assert_eq!(
            parse_location("nbd://h/x").unwrap(),
            Location::Nbd("h:10809".into(), "x".into())
        );
        assert_eq!(
            parse_location("/dev/sdb").unwrap(),
            Location::Path("/dev/sdb".into())
        );
        assert!(parse_location("iscsi://h/x").is_err());
    }
}
