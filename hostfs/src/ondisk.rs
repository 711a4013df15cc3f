//! The agent reads the metadata of a frozen ext2/3/4 file system from its
//! device: inode tables, extent tree blocks and attribute blocks, decoded
//! by [`crate::ext4`]. Per file this replaces opening it by handle,
//! `fstat`, `flistxattr`/`fgetxattr`, `FIEMAP` and `close` — five system
//! calls and the kernel's inode set-up — with a share of a 256 KiB read
//! of its inode table.
//!
//! Why the device says what the kernel would: `FIFREEZE` on ext4 syncs the
//! file system, writes the journal back to its place and clears
//! `needs_recovery` in the superblock before it returns, and nothing is
//! written until the thaw (which sets the flag again). The device is read
//! through its page cache, which is where ext4 keeps its metadata blocks,
//! so nothing cached is missed either. The reader is only used for an
//! image whose freezer holds its writes (`FrozenImage::writes_held`:
//! `fsflush`), checks `needs_recovery` is clear when it opens and
//! before each part of the map, and anything it does not take (inline
//! data, encryption, block-mapped ext2/3 files, EA inodes, malformed
//! metadata) is left to the kernel, file by file. It shows what the
//! kernel shows of each file: ACLs only if the mount does (a probe of
//! `getxattr` on it; `noacl` hides them from the kernel's view, not from
//! the inodes). What it maps is checked
//! by the kernel anyway: the validity indicator computes each file's
//! config id from `fstat` and `FIEMAP` after the thaw, so a map the device
//! got wrong would be remapped, never read.

use crate::ext4::{
    acl_to_xattr, extent_node, to_fiemap, xattrs_in_block, xattrs_in_inode, ExtentNode, Geometry,
    Inode, XattrEntry, SUPERBLOCK_LEN, SUPERBLOCK_OFFSET,
};
use crate::meta::hex;
use crate::sys::FiemapExtent;
use floe_core::error::{Error, ErrorKind, Result};
use floe_core::units::{Bytes, DeviceOffset};
use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Bytes of inode table read at once: a thread maps 512 inodes of a part
/// in number order, which this covers in one read (over a SAN answering
/// each read after 0.2 ms, 256 KiB reads took the first part of the
/// 70,000-file tree from 0.53 s to 0.43 s against 64 KiB ones, and writes
/// were held 1.22 s instead of 1.40 s; the kernel reads 128 KiB ahead).
const TABLE_READ: u64 = 256 << 10;
/// Extent tree blocks read for one file at most (a tree of depth 5 with
/// full nodes is far beyond any file; this bounds a malformed one).
const TREE_BLOCKS: usize = 1 << 16;

/// A frozen ext2/3/4 file system's device, open to read its metadata.
#[derive(Debug)]
pub struct Ext4Disk {
    dev: std::fs::File,
    path: PathBuf,
    geo: Geometry,
    tables: Vec<u64>,
    /// The mount shows POSIX ACLs (`acl`, ext4's default): else the
    /// kernel hides `system.posix_acl_*` and so does this reader.
    acls: bool,
}

/// The block device node of `dev` (an `st_dev`): `/dev/NAME`, NAME the
/// kernel's (as [`crate::identity::fs_device`] finds it), if it is that
/// device.
fn device_node(dev: u64) -> Result<PathBuf> {
    let (_, name) = crate::identity::sysfs_block(dev)?;
    let p = Path::new("/dev").join(&name);
    let it =
        std::fs::metadata(&p).is_ok_and(|m| m.file_type().is_block_device() && m.rdev() == dev);
    if !it {
        return Err(Error::new(
            ErrorKind::UnknownDevice,
            format!(
                "no device node for block device {}:{} ({} is not it)",
                libc::major(dev),
                libc::minor(dev),
                p.display()
            ),
        ));
    }
    Ok(p)
}

impl Ext4Disk {
    /// Open the device of the file system whose `st_dev` is `dev`, read
    /// its superblock and group descriptors. Fails (and the caller asks
    /// the kernel) when the device cannot be opened, is not ext2/3/4, or
    /// its journal is not written back (not frozen).
    pub fn open(dev: u64) -> Result<Ext4Disk> {
        let path = device_node(dev)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| Error::io("open", e).path(&path))?;
        Self::from_file(file, path)
    }

    /// [`Ext4Disk::open`] on an open device (or image file).
    pub fn from_file(dev: std::fs::File, path: PathBuf) -> Result<Ext4Disk> {
        let mut sb = vec![0u8; SUPERBLOCK_LEN];
        dev.read_exact_at(&mut sb, SUPERBLOCK_OFFSET)
            .map_err(|e| Error::io("read superblock", e).path(&path))?;
        let geo = Geometry::from_superblock(&sb).map_err(|e| e.path(&path))?;
        let (at, len) = geo.descriptors();
        let mut table = vec![
            0u8;
            usize::try_from(len).map_err(|_| {
                Error::new(ErrorKind::InvalidMap, "group descriptor table too large")
            })?
        ];
        dev.read_exact_at(&mut table, at)
            .map_err(|e| Error::io("read group descriptors", e).path(&path))?;
        let tables = geo.inode_tables(&table).map_err(|e| e.path(&path))?;
        Ok(Ext4Disk {
            dev,
            path,
            geo,
            tables,
            acls: true,
        })
    }

    /// Show ACLs only if the kernel does on the mount at `dir` (a directory
    /// of the file system): mounted `noacl` (older kernels take it; ext4
    /// dropped the option in 2022), `getxattr` of an ACL answers "not
    /// supported" and `listxattr` leaves them out, while the inodes still
    /// hold them.
    pub fn acls_as_mounted(mut self, dir: &Path) -> Result<Ext4Disk> {
        self.acls = match rustix::fs::getxattr(dir, "system.posix_acl_access", &mut [0u8; 0]) {
            Err(rustix::io::Errno::NOTSUP) => false,
            Ok(_) | Err(rustix::io::Errno::NODATA | rustix::io::Errno::RANGE) => true,
            Err(e) => {
                return Err(Error::io("probe ACLs (getxattr)", e.into()).path(dir));
            }
        };
        Ok(self)
    }

    /// As on a mount without ACLs (what [`Ext4Disk::acls_as_mounted`]
    /// finds under `noacl`).
    #[must_use]
    pub fn without_acls(mut self) -> Ext4Disk {
        self.acls = false;
        self
    }

    /// Does this reader show ACLs?
    pub fn acls(&self) -> bool {
        self.acls
    }

    /// Check the superblock still says the journal is written back (the
    /// file system was not thawed under the reader).
    pub fn still_flushed(&self) -> Result<()> {
        let mut sb = vec![0u8; SUPERBLOCK_LEN];
        self.dev
            .read_exact_at(&mut sb, SUPERBLOCK_OFFSET)
            .map_err(|e| Error::io("read superblock", e).path(&self.path))?;
        Geometry::from_superblock(&sb)
            .map(drop)
            .map_err(|e| e.path(&self.path))
    }

    fn read(&self, at: u64, len: u64, what: &str) -> Result<Vec<u8>> {
        let n = usize::try_from(len)
            .map_err(|_| Error::new(ErrorKind::InvalidMap, format!("{what} too large")))?;
        let mut b = vec![0u8; n];
        self.dev.read_exact_at(&mut b, at).map_err(|e| {
            Error::io(what, e)
                .path(&self.path)
                .range(DeviceOffset(at), Bytes(len))
        })?;
        Ok(b)
    }

    fn block(&self, block: u64, what: &str) -> Result<Vec<u8>> {
        if block == 0 || block >= self.geo.blocks {
            return Err(Error::new(
                ErrorKind::InvalidMap,
                format!(
                    "malformed ext4 metadata: {what} at block {block}, outside the file system"
                ),
            ));
        }
        let bs = self.geo.block_size;
        self.read(block * bs, bs, what)
    }

    /// A file's extents as FIEMAP would report them.
    pub fn extents(&self, inode: &Inode) -> Result<Vec<FiemapExtent>> {
        let mut leaves = Vec::new();
        let mut read = 0usize;
        self.walk(&inode.root, None, &mut leaves, &mut read)?;
        to_fiemap(&leaves, self.geo.block_size, self.geo.blocks)
    }

    fn walk(
        &self,
        node: &[u8],
        depth: Option<u16>,
        out: &mut Vec<crate::ext4::Extent>,
        read: &mut usize,
    ) -> Result<()> {
        match extent_node(node, depth)? {
            ExtentNode::Leaf(x) => out.extend(x),
            ExtentNode::Index(children, d) => {
                for (_, at) in children {
                    *read += 1;
                    if *read > TREE_BLOCKS {
                        return Err(Error::new(
                            ErrorKind::InvalidMap,
                            "malformed ext4 metadata: an extent tree of too many blocks",
                        ));
                    }
                    let b = self.block(at, "extent tree block")?;
                    self.walk(&b, Some(d), out, read)?;
                }
            }
        }
        Ok(())
    }

    /// A file's extended attributes as `listxattr`/`getxattr` give them
    /// (ACLs converted to the form `getxattr` returns, and left out where
    /// the mount hides them), hex-encoded.
    pub fn xattrs(
        &self,
        inode: &Inode,
        cache: &mut XattrCache,
    ) -> Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        let mut add = |entries: &[XattrEntry]| -> Result<()> {
            for e in entries {
                let Some(name) = &e.name else { continue };
                let acl = name.starts_with("system.posix_acl_");
                if acl && !self.acls {
                    continue;
                }
                let value = if acl {
                    acl_to_xattr(&e.value)?
                } else {
                    e.value.clone()
                };
                out.insert(name.clone(), hex(&value));
            }
            Ok(())
        };
        add(&xattrs_in_inode(&inode.xattrs_in_inode)?)?;
        if inode.xattr_block != 0 {
            if cache.block != inode.xattr_block {
                let b = self.block(inode.xattr_block, "extended attribute block")?;
                cache.entries = xattrs_in_block(&b)?;
                cache.block = inode.xattr_block;
            }
            add(&cache.entries)?;
        }
        Ok(out)
    }
}

/// The last attribute block read (files with the same attributes share
/// one).
#[derive(Default)]
pub struct XattrCache {
    block: u64,
    entries: Vec<XattrEntry>,
}

/// A thread's view of the inode tables: the last [`TABLE_READ`] bytes
/// read (inodes come in number order, so a read serves the next ones).
#[derive(Default)]
pub struct InodeReader {
    at: u64,
    bytes: Vec<u8>,
    /// Attribute blocks.
    pub xattrs: XattrCache,
}

impl InodeReader {
    /// Inode `ino` of `disk`.
    pub fn inode(&mut self, disk: &Ext4Disk, ino: u64) -> Result<Inode> {
        let g = &disk.geo;
        let (group, offset) = g.inode_group(ino)?;
        let table = disk.tables.get(group).copied().ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidMap,
                format!("inode {ino}: no group {group}"),
            )
        })?;
        let at = table * g.block_size + offset;
        let end = at + g.inode_size;
        let cached = self.at <= at && end <= self.at + self.bytes.len() as u64;
        if !cached {
            // From the block the inode is in, to the end of its group's
            // table at most.
            let start = at - at % g.block_size;
            let table_end = table * g.block_size + u64::from(g.inodes_per_group) * g.inode_size;
            let len = TABLE_READ.min(table_end - start);
            self.bytes = disk.read(start, len, "inode table")?;
            self.at = start;
        }
        let from = usize::try_from(at - self.at).unwrap_or(usize::MAX);
        let to = usize::try_from(end - self.at).unwrap_or(usize::MAX);
        let raw = self.bytes.get(from..to).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidMap,
                format!("inode {ino} past its table read"),
            )
        })?;
        Inode::decode(raw)
    }
}
