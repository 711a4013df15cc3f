//! ext2/3/4 metadata as it is on the device: the superblock, group
//! descriptors, inodes, extent tree nodes, extended attributes and POSIX
//! ACLs, decoded from bytes. Pure: no I/O (the reader is
//! [`crate::ondisk`]). Layouts as the kernel's
//! `Documentation/filesystems/ext4/` and `fs/ext4/ext4.h`,
//! `ext4_extents.h`, `xattr.h`, `acl.h` give them; every field read is
//! checked against the bounds it must keep, and anything this decoder
//! does not take (inline data, encryption, verity, block maps of ext2/3,
//! values in EA inodes, `meta_bg`) is refused by name, so the caller asks
//! the kernel instead.

use crate::sys::FiemapExtent;
use floe_core::error::{Error, ErrorKind, Result};

/// Where the primary superblock is, from the start of the file system.
pub const SUPERBLOCK_OFFSET: u64 = 1024;
/// Bytes of the superblock read.
pub const SUPERBLOCK_LEN: usize = 1024;

const EXT4_MAGIC: u16 = 0xEF53;
const EXTENT_MAGIC: u16 = 0xF30A;
const XATTR_MAGIC: u32 = 0xEA02_0000;
/// `ee_len` above this: an unwritten extent of `ee_len - 32768` blocks.
const INIT_MAX_LEN: u16 = 32768;
/// `EXT4_MAX_EXTENT_DEPTH`.
const MAX_DEPTH: u16 = 5;

/// `s_feature_incompat` bits.
mod incompat {
    pub const COMPRESSION: u32 = 0x1;
    pub const RECOVER: u32 = 0x4;
    pub const JOURNAL_DEV: u32 = 0x8;
    pub const META_BG: u32 = 0x10;
    pub const BIT64: u32 = 0x80;
    pub const DIRDATA: u32 = 0x1000;
}

/// `i_flags` bits.
mod iflags {
    pub const ENCRYPT: u32 = 0x800;
    pub const EXTENTS: u32 = 0x8_0000;
    pub const VERITY: u32 = 0x10_0000;
    pub const EA_INODE: u32 = 0x20_0000;
    pub const DAX: u32 = 0x200_0000;
    pub const INLINE_DATA: u32 = 0x1000_0000;
}

fn malformed(what: impl Into<String>) -> Error {
    Error::new(
        ErrorKind::InvalidMap,
        format!("malformed ext4 metadata: {}", what.into()),
    )
}

fn unsupported(what: impl Into<String>) -> Error {
    Error::new(ErrorKind::Unsupported, what.into())
}

// Past the end reads as 0: the decoders here check a region's length
// before they read its fields.
fn u16_at(b: &[u8], at: usize) -> u16 {
    crate::le::u16(b, at).unwrap_or(0)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    crate::le::u32(b, at).unwrap_or(0)
}

/// What the superblock says about where things are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes per block.
    pub block_size: u64,
    /// Blocks in the file system.
    pub blocks: u64,
    /// Inodes in the file system.
    pub inodes: u32,
    /// Inodes per block group.
    pub inodes_per_group: u32,
    /// Blocks per block group.
    pub blocks_per_group: u32,
    /// Bytes per on-disk inode.
    pub inode_size: u64,
    /// The block the first group starts at (1 for 1 KiB blocks, else 0).
    pub first_data_block: u64,
    /// Bytes per group descriptor.
    pub desc_size: u64,
    /// Block groups.
    pub groups: u32,
}

impl Geometry {
    /// Decode a superblock ([`SUPERBLOCK_LEN`] bytes read at
    /// [`SUPERBLOCK_OFFSET`]). Refuses one whose journal has not been
    /// written back to its place (`needs_recovery`: the file system is
    /// mounted and not frozen, so what is on the device lags what the
    /// kernel holds) and layouts this decoder does not take.
    pub fn from_superblock(sb: &[u8]) -> Result<Geometry> {
        if sb.len() < SUPERBLOCK_LEN {
            return Err(malformed("superblock too short"));
        }
        if u16_at(sb, 0x38) != EXT4_MAGIC {
            return Err(malformed("no ext2/3/4 superblock magic"));
        }
        let incompat = u32_at(sb, 0x60);
        if incompat & incompat::RECOVER != 0 {
            return Err(unsupported(
                "the journal is not written back (the file system is not frozen): its metadata on the device is not current",
            ));
        }
        for (bit, name) in [
            (incompat::COMPRESSION, "compression"),
            (incompat::JOURNAL_DEV, "journal_dev"),
            (incompat::META_BG, "meta_bg"),
            (incompat::DIRDATA, "dirdata"),
        ] {
            if incompat & bit != 0 {
                return Err(unsupported(format!(
                    "ext4 feature {name} is not read from the device"
                )));
            }
        }
        let log = u32_at(sb, 0x18);
        if log > 6 {
            return Err(malformed(format!("block size 1024 << {log}")));
        }
        let block_size = 1024u64 << log;
        let blocks = u64::from(u32_at(sb, 0x4)) | (u64::from(u32_at(sb, 0x150)) << 32);
        let blocks = if incompat & incompat::BIT64 != 0 {
            blocks
        } else {
            blocks & 0xFFFF_FFFF
        };
        let inodes = u32_at(sb, 0x0);
        let first_data_block = u64::from(u32_at(sb, 0x14));
        let blocks_per_group = u32_at(sb, 0x20);
        let inodes_per_group = u32_at(sb, 0x28);
        let inode_size = if u32_at(sb, 0x4C) == 0 {
            128
        } else {
            u64::from(u16_at(sb, 0x58))
        };
        if !(128..=block_size).contains(&inode_size) || !inode_size.is_power_of_two() {
            return Err(malformed(format!("inode size {inode_size}")));
        }
        let desc_size = if incompat & incompat::BIT64 != 0 {
            u64::from(u16_at(sb, 0xFE))
        } else {
            32
        };
        if !(32..=block_size).contains(&desc_size) || !desc_size.is_power_of_two() {
            return Err(malformed(format!("group descriptor size {desc_size}")));
        }
        if blocks_per_group == 0 || inodes_per_group == 0 || blocks <= first_data_block {
            return Err(malformed(format!(
                "{blocks} blocks, {blocks_per_group} per group, {inodes_per_group} inodes per group"
            )));
        }
        let groups = (blocks - first_data_block).div_ceil(u64::from(blocks_per_group));
        let groups = u32::try_from(groups).map_err(|_| malformed("too many groups"))?;
        if u64::from(groups) * u64::from(inodes_per_group) < u64::from(inodes) {
            return Err(malformed(format!(
                "{inodes} inodes do not fit {groups} groups of {inodes_per_group}"
            )));
        }
        Ok(Geometry {
            block_size,
            blocks,
            inodes,
            inodes_per_group,
            blocks_per_group,
            inode_size,
            first_data_block,
            desc_size,
            groups,
        })
    }

    /// Where the group descriptor table starts and how many bytes it has.
    pub fn descriptors(&self) -> (u64, u64) {
        (
            (self.first_data_block + 1) * self.block_size,
            u64::from(self.groups) * self.desc_size,
        )
    }

    /// Each group's inode table block, from the descriptor table.
    pub fn inode_tables(&self, table: &[u8]) -> Result<Vec<u64>> {
        let ds = usize::try_from(self.desc_size).map_err(|_| malformed("descriptor size"))?;
        let need = usize::try_from(self.groups)
            .ok()
            .and_then(|g| g.checked_mul(ds))
            .ok_or_else(|| malformed("descriptor table size"))?;
        if table.len() < need {
            return Err(malformed("group descriptor table too short"));
        }
        let table_blocks =
            (u64::from(self.inodes_per_group) * self.inode_size).div_ceil(self.block_size);
        table
            .chunks(ds)
            .take(need / ds)
            .enumerate()
            .map(|(g, d)| {
                let lo = u64::from(u32_at(d, 0x8));
                let hi = if ds >= 64 {
                    u64::from(u32_at(d, 0x28))
                } else {
                    0
                };
                let at = lo | (hi << 32);
                if at == 0 || at + table_blocks > self.blocks {
                    return Err(malformed(format!(
                        "group {g}'s inode table at block {at} is outside the file system"
                    )));
                }
                Ok(at)
            })
            .collect()
    }

    /// Where inode `ino` is: (group, byte offset of it in the file
    /// system, given the group's inode table block).
    pub fn inode_group(&self, ino: u64) -> Result<(usize, u64)> {
        if ino == 0 || ino > u64::from(self.inodes) {
            return Err(malformed(format!(
                "inode {ino} is not in 1..={}",
                self.inodes
            )));
        }
        let ipg = u64::from(self.inodes_per_group);
        let group = usize::try_from((ino - 1) / ipg).map_err(|_| malformed("group"))?;
        Ok((group, ((ino - 1) % ipg) * self.inode_size))
    }
}

/// A time from its seconds field and, when the inode has it, its extra
/// field (2 epoch bits, 30 bits of nanoseconds): as `ext4_decode_extra_time`.
pub fn decode_time(base: u32, extra: Option<u32>) -> (i64, u32) {
    let mut sec = i64::from(base.cast_signed());
    let Some(extra) = extra else {
        return (sec, 0);
    };
    sec += i64::from(extra & 3) << 32;
    (sec, extra >> 2)
}

/// An inode's fields that a backup records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    /// Type and permission bits.
    pub mode: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Access time.
    pub atime: (i64, u32),
    /// Modification time.
    pub mtime: (i64, u32),
    /// Change time.
    pub ctime: (i64, u32),
    /// Hard links.
    pub links: u16,
    /// `i_flags`.
    pub flags: u32,
    /// `i_generation`.
    pub generation: u32,
    /// The external extended attribute block (0: none).
    pub xattr_block: u64,
    /// `i_block`: the extent tree's root.
    pub root: [u8; 60],
    /// The in-inode extended attributes (after `i_extra_isize`).
    pub xattrs_in_inode: Vec<u8>,
}

impl Inode {
    /// Decode an on-disk inode (`inode_size` bytes).
    pub fn decode(raw: &[u8]) -> Result<Inode> {
        if raw.len() < 128 {
            return Err(malformed("inode shorter than 128 bytes"));
        }
        let extra_isize = if raw.len() > 128 {
            usize::from(u16_at(raw, 0x80))
        } else {
            0
        };
        if 128 + extra_isize > raw.len() || extra_isize % 4 != 0 {
            return Err(malformed(format!("i_extra_isize {extra_isize}")));
        }
        // A field of the extra part is there when i_extra_isize covers it.
        let extra = |at: usize| (at + 4 <= 128 + extra_isize).then(|| u32_at(raw, at));
        let mut root = [0u8; 60];
        root.copy_from_slice(&raw[0x28..0x28 + 60]);
        Ok(Inode {
            mode: u16_at(raw, 0x0),
            uid: u32::from(u16_at(raw, 0x2)) | (u32::from(u16_at(raw, 0x78)) << 16),
            gid: u32::from(u16_at(raw, 0x18)) | (u32::from(u16_at(raw, 0x7A)) << 16),
            size: u64::from(u32_at(raw, 0x4)) | (u64::from(u32_at(raw, 0x6C)) << 32),
            atime: decode_time(u32_at(raw, 0x8), extra(0x8C)),
            ctime: decode_time(u32_at(raw, 0xC), extra(0x84)),
            mtime: decode_time(u32_at(raw, 0x10), extra(0x88)),
            links: u16_at(raw, 0x1A),
            flags: u32_at(raw, 0x20),
            generation: u32_at(raw, 0x64),
            xattr_block: u64::from(u32_at(raw, 0x68)) | (u64::from(u16_at(raw, 0x76)) << 32),
            root,
            xattrs_in_inode: raw[128 + extra_isize..].to_vec(),
        })
    }

    /// True for a regular file in use.
    pub fn is_live_file(&self) -> bool {
        self.mode & 0o170_000 == 0o100_000 && self.links > 0
    }

    /// Refuse an inode whose data this decoder cannot place: not an
    /// extent-mapped file, or one whose bytes on the device are not its
    /// bytes (inline, encrypted, verity, DAX, an EA inode).
    pub fn check_mappable(&self) -> Result<()> {
        for (bit, what) in [
            (iflags::INLINE_DATA, "its data is inline in the inode"),
            (iflags::ENCRYPT, "it is encrypted"),
            (iflags::VERITY, "it has fs-verity"),
            (iflags::DAX, "it is DAX"),
            (iflags::EA_INODE, "it is an extended attribute inode"),
        ] {
            if self.flags & bit != 0 {
                return Err(unsupported(format!("not read from the device: {what}")));
            }
        }
        if self.flags & iflags::EXTENTS == 0 {
            return Err(unsupported(
                "not read from the device: mapped by indirect blocks (ext2/3)",
            ));
        }
        Ok(())
    }
}

/// One node of an extent tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExtentNode {
    /// Depth 0: extents (logical block, physical block, blocks, unwritten).
    Leaf(Vec<Extent>),
    /// Depth > 0: (first logical block, child node's block), and the
    /// children's depth.
    Index(Vec<(u32, u64)>, u16),
}

/// A leaf's extent, in blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// First block in the file.
    pub logical: u32,
    /// First block on the device.
    pub physical: u64,
    /// Blocks.
    pub len: u32,
    /// Allocated, never written: reads as zeros.
    pub unwritten: bool,
}

/// Decode an extent tree node (the inode's `i_block`, or a tree block),
/// of depth `depth` when the parent says so.
pub fn extent_node(b: &[u8], depth: Option<u16>) -> Result<ExtentNode> {
    if u16_at(b, 0) != EXTENT_MAGIC {
        return Err(malformed("extent node without its magic"));
    }
    let (entries, max, d) = (
        usize::from(u16_at(b, 2)),
        usize::from(u16_at(b, 4)),
        u16_at(b, 6),
    );
    if entries > max || 12 + max * 12 > b.len() {
        return Err(malformed(format!(
            "extent node of {entries} entries, room for {max}, in {} bytes",
            b.len()
        )));
    }
    if d > MAX_DEPTH || depth.is_some_and(|want| want != d) {
        return Err(malformed(format!("extent node of depth {d}")));
    }
    let entry = |k: usize| &b[12 + k * 12..24 + k * 12];
    if d == 0 {
        let mut out: Vec<Extent> = Vec::with_capacity(entries);
        for k in 0..entries {
            let e = entry(k);
            let raw_len = u16_at(e, 4);
            let (len, unwritten) = if raw_len > INIT_MAX_LEN {
                (raw_len - INIT_MAX_LEN, true)
            } else {
                (raw_len, false)
            };
            let x = Extent {
                logical: u32_at(e, 0),
                physical: u64::from(u32_at(e, 8)) | (u64::from(u16_at(e, 6)) << 32),
                len: u32::from(len),
                unwritten,
            };
            if x.len == 0 {
                return Err(malformed("an extent of no blocks"));
            }
            if let Some(p) = out.last() {
                if u64::from(p.logical) + u64::from(p.len) > u64::from(x.logical) {
                    return Err(malformed(format!(
                        "extents overlap at logical block {}",
                        x.logical
                    )));
                }
            }
            out.push(x);
        }
        Ok(ExtentNode::Leaf(out))
    } else {
        let mut out: Vec<(u32, u64)> = Vec::with_capacity(entries);
        for k in 0..entries {
            let e = entry(k);
            let first = u32_at(e, 0);
            let leaf = u64::from(u32_at(e, 4)) | (u64::from(u16_at(e, 8)) << 32);
            if out.last().is_some_and(|&(p, _)| p >= first) {
                return Err(malformed(format!(
                    "extent index out of order at logical block {first}"
                )));
            }
            out.push((first, leaf));
        }
        Ok(ExtentNode::Index(out, d - 1))
    }
}

/// A file's extents as FIEMAP reports them on ext4: bytes, in logical
/// order, unwritten ones flagged, the last flagged last. Refuses extents
/// that are out of order or past the file system's end (`blocks`).
pub fn to_fiemap(extents: &[Extent], block_size: u64, blocks: u64) -> Result<Vec<FiemapExtent>> {
    let mut out = Vec::with_capacity(extents.len());
    let mut next = 0u64;
    for e in extents {
        if u64::from(e.logical) < next {
            return Err(malformed(format!(
                "extents out of order at logical block {}",
                e.logical
            )));
        }
        next = u64::from(e.logical) + u64::from(e.len);
        if e.physical == 0 || e.physical + u64::from(e.len) > blocks {
            return Err(malformed(format!(
                "extent at block {} of {} blocks is outside the file system ({blocks} blocks)",
                e.physical, e.len
            )));
        }
        let flags = if e.unwritten {
            crate::filemap::flags::UNWRITTEN
        } else {
            0
        };
        out.push(FiemapExtent::new(
            u64::from(e.logical) * block_size,
            e.physical * block_size,
            u64::from(e.len) * block_size,
            flags,
        ));
    }
    if let Some(last) = out.last_mut() {
        last.flags |= crate::filemap::flags::LAST;
    }
    Ok(out)
}

/// An extended attribute entry: its full name, and its value (or where
/// it is) in the region it was found in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XattrEntry {
    /// `user.x`, `trusted.x`, `security.x`, `system.posix_acl_access`…
    /// (`None`: a name space the kernel does not list, e.g. inline data's
    /// `system.data`).
    pub name: Option<String>,
    /// The raw value (ACLs in ext4's own format: see [`acl_to_xattr`]).
    pub value: Vec<u8>,
}

/// The name space of an attribute's index, as the kernel lists it.
fn prefix(index: u8) -> Option<&'static str> {
    Some(match index {
        1 => "user.",
        2 => "system.posix_acl_access",
        3 => "system.posix_acl_default",
        4 => "trusted.",
        6 => "security.",
        10 => "gnu.",
        _ => return None,
    })
}

/// Decode the entries of an attribute region: `entries` starts at the
/// first entry, values at `value_base + e_value_offs` of `region`.
fn xattr_entries(region: &[u8], first: usize, value_base: usize) -> Result<Vec<XattrEntry>> {
    let mut out = Vec::new();
    let mut at = first;
    while at + 4 <= region.len() && u32_at(region, at) != 0 {
        if at + 16 > region.len() {
            return Err(malformed("extended attribute entry past its region"));
        }
        let name_len = usize::from(region[at]);
        let index = region[at + 1];
        let offs = usize::from(u16_at(region, at + 2));
        let inum = u32_at(region, at + 4);
        let size = usize::try_from(u32_at(region, at + 8)).unwrap_or(usize::MAX);
        let name = region
            .get(at + 16..at + 16 + name_len)
            .ok_or_else(|| malformed("extended attribute name past its region"))?;
        if inum != 0 {
            return Err(unsupported(
                "not read from the device: an extended attribute value is in an EA inode",
            ));
        }
        let value = value_base
            .checked_add(offs)
            .and_then(|s| Some((s, s.checked_add(size)?)))
            .and_then(|(s, e)| region.get(s..e))
            .ok_or_else(|| malformed("extended attribute value past its region"))?;
        let name = match prefix(index) {
            Some(p) if index == 2 || index == 3 => Some(p.to_string()),
            Some(p) => {
                let n = std::str::from_utf8(name)
                    .map_err(|_| malformed("extended attribute name is not UTF-8"))?;
                Some(format!("{p}{n}"))
            }
            None => None,
        };
        out.push(XattrEntry {
            name,
            value: value.to_vec(),
        });
        at += (16 + name_len).next_multiple_of(4);
    }
    Ok(out)
}

/// The attributes stored in the inode (the bytes after `i_extra_isize`).
pub fn xattrs_in_inode(region: &[u8]) -> Result<Vec<XattrEntry>> {
    if region.len() < 4 || u32_at(region, 0) != XATTR_MAGIC {
        return Ok(Vec::new()); // none in the inode
    }
    // Value offsets count from the first entry, right after the magic.
    xattr_entries(&region[4..], 0, 0)
}

/// The attributes of an external attribute block.
pub fn xattrs_in_block(block: &[u8]) -> Result<Vec<XattrEntry>> {
    if block.len() < 32 || u32_at(block, 0) != XATTR_MAGIC {
        return Err(malformed("extended attribute block without its magic"));
    }
    if u32_at(block, 8) != 1 {
        return Err(malformed("extended attribute block of more than one block"));
    }
    xattr_entries(block, 32, 0)
}

/// An ACL in ext4's on-disk form (version 1; short entries for the owner,
/// owning group, mask and others) as `getxattr` gives it (the
/// `posix_acl_xattr` form: version 2, every entry with an id, undefined
/// ids as `u32::MAX`).
pub fn acl_to_xattr(disk: &[u8]) -> Result<Vec<u8>> {
    const USER_OBJ: u16 = 0x01;
    const USER: u16 = 0x02;
    const GROUP_OBJ: u16 = 0x04;
    const GROUP: u16 = 0x08;
    const MASK: u16 = 0x10;
    const OTHER: u16 = 0x20;
    if disk.len() < 4 || u32_at(disk, 0) != 1 {
        return Err(malformed("ACL not of version 1"));
    }
    let mut out = Vec::with_capacity(disk.len() * 2);
    out.extend_from_slice(&2u32.to_le_bytes());
    let mut at = 4;
    while at < disk.len() {
        let tag = u16_at(disk, at);
        let perm = u16_at(disk, at + 2);
        let (id, len) = match tag {
            USER | GROUP => (u32_at(disk, at + 4), 8),
            USER_OBJ | GROUP_OBJ | MASK | OTHER => (u32::MAX, 4),
            _ => return Err(malformed(format!("ACL entry tag {tag:#x}"))),
        };
        if at + len > disk.len() {
            return Err(malformed("ACL entry past its end"));
        }
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
        at += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn put16(b: &mut [u8], at: usize, v: u16) {
        b[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn put32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn superblock() -> Vec<u8> {
        let mut sb = vec![0u8; SUPERBLOCK_LEN];
        put32(&mut sb, 0x0, 8192); // inodes
        put32(&mut sb, 0x4, 65536); // blocks
        put32(&mut sb, 0x18, 2); // 4 KiB
        put32(&mut sb, 0x20, 32768);
        put32(&mut sb, 0x28, 4096);
        put16(&mut sb, 0x38, EXT4_MAGIC);
        put32(&mut sb, 0x4C, 1);
        put16(&mut sb, 0x58, 256);
        put32(&mut sb, 0x60, 0x2C2); // filetype, extents, 64bit, flex_bg
        put16(&mut sb, 0xFE, 64);
        sb
    }

    #[test]
    fn a_superblock_gives_the_geometry_and_refuses_an_unflushed_journal() {
        let g = Geometry::from_superblock(&superblock()).unwrap();
        assert_eq!(
            (g.block_size, g.blocks, g.groups, g.inode_size, g.desc_size),
            (4096, 65536, 2, 256, 64)
        );
        assert_eq!(g.descriptors(), (4096, 128));
        assert_eq!(g.inode_group(1).unwrap(), (0, 0));
        assert_eq!(g.inode_group(4097).unwrap(), (1, 0));
        assert_eq!(g.inode_group(4098).unwrap(), (1, 256));
        assert!(g.inode_group(0).is_err() && g.inode_group(8193).is_err());
        let mut sb = superblock();
        put32(&mut sb, 0x60, 0x2C2 | incompat::RECOVER);
        let err = Geometry::from_superblock(&sb).unwrap_err();
        assert!(err.to_string().contains("not frozen"), "{err}");
        let mut sb = superblock();
        put32(&mut sb, 0x60, 0x2C2 | incompat::META_BG);
        let err = Geometry::from_superblock(&sb).unwrap_err();
        assert!(err.to_string().contains("meta_bg"), "{err}");
        let mut sb = superblock();
        put16(&mut sb, 0x38, 0x1234);
        assert!(Geometry::from_superblock(&sb).is_err());
    }

    #[test]
    fn inode_tables_outside_the_file_system_are_refused() {
        let g = Geometry::from_superblock(&superblock()).unwrap();
        let mut t = vec![0u8; 128];
        put32(&mut t, 0x8, 100);
        put32(&mut t, 64 + 0x8, 32868);
        assert_eq!(g.inode_tables(&t).unwrap(), vec![100, 32868]);
        put32(&mut t, 64 + 0x8, 65530);
        let err = g.inode_tables(&t).unwrap_err();
        assert!(err.to_string().contains("group 1"), "{err}");
        assert!(g.inode_tables(&t[..64]).is_err());
    }

    #[test]
    fn times_carry_epoch_bits_and_nanoseconds() {
        // 1960 (negative), 2100 (epoch 1), nanoseconds in the top 30 bits.
        assert_eq!(
            decode_time((-315_619_200i32).cast_unsigned(), Some(5 << 2)),
            (-315_619_200, 5)
        );
        let base = (-192_522_496i32).cast_unsigned(); // 2100 - 2^32
        assert_eq!(
            decode_time(base, Some(1 | (999_999_999 << 2))),
            (4_102_444_800, 999_999_999)
        );
        assert_eq!(decode_time(7, None), (7, 0));
    }

    fn node(depth: u16, entries: &[[u8; 12]], max: u16) -> Vec<u8> {
        let mut b = vec![0u8; 12 + usize::from(max) * 12];
        put16(&mut b, 0, EXTENT_MAGIC);
        put16(&mut b, 2, u16::try_from(entries.len()).unwrap());
        put16(&mut b, 4, max);
        put16(&mut b, 6, depth);
        for (k, e) in entries.iter().enumerate() {
            b[12 + k * 12..24 + k * 12].copy_from_slice(e);
        }
        b
    }

    fn leaf(logical: u32, len: u16, physical: u64) -> [u8; 12] {
        let mut e = [0u8; 12];
        put32(&mut e, 0, logical);
        put16(&mut e, 4, len);
        put16(&mut e, 6, u16::try_from(physical >> 32).unwrap());
        put32(&mut e, 8, u32::try_from(physical & 0xFFFF_FFFF).unwrap());
        e
    }

    #[test]
    fn extent_nodes_decode_unwritten_extents_and_indexes() {
        let b = node(0, &[leaf(0, 8, 1000), leaf(8, 32768 + 4, (1 << 32) + 5)], 4);
        let ExtentNode::Leaf(x) = extent_node(&b, Some(0)).unwrap() else {
            panic!("not a leaf")
        };
        assert_eq!(
            x,
            vec![
                Extent {
                    logical: 0,
                    physical: 1000,
                    len: 8,
                    unwritten: false
                },
                Extent {
                    logical: 8,
                    physical: (1 << 32) + 5,
                    len: 4,
                    unwritten: true
                },
            ]
        );
        let f = to_fiemap(&x, 4096, 1 << 40).unwrap();
        assert_eq!(f[1].logical, 8 * 4096);
        assert_eq!(
            f[1].flags,
            crate::filemap::flags::UNWRITTEN | crate::filemap::flags::LAST
        );
        assert!(to_fiemap(&x, 4096, 2000).is_err(), "an extent past the end");
        // Overlapping leaves, a wrong depth, entries past the node.
        let b = node(0, &[leaf(0, 8, 1000), leaf(4, 8, 2000)], 4);
        assert!(extent_node(&b, None).is_err());
        let b = node(0, &[leaf(0, 8, 1000)], 4);
        assert!(extent_node(&b, Some(1)).is_err());
        let mut b = node(0, &[leaf(0, 8, 1000)], 4);
        put16(&mut b, 4, 40);
        assert!(extent_node(&b, None).is_err());
        let mut idx = [0u8; 12];
        put32(&mut idx, 0, 0);
        put32(&mut idx, 4, 777);
        let b = node(2, &[idx], 4);
        assert_eq!(
            extent_node(&b, None).unwrap(),
            ExtentNode::Index(vec![(0, 777)], 1)
        );
    }

    #[test]
    fn attributes_in_the_inode_and_in_a_block_with_acls_converted() {
        // In the inode: magic, then entries; values from the first entry.
        let mut r = vec![0u8; 96];
        put32(&mut r, 0, XATTR_MAGIC);
        // user.ab = "xyz" at value offset 60 (from the first entry).
        r[4] = 2;
        r[5] = 1;
        put16(&mut r, 6, 60);
        put32(&mut r, 12, 3);
        r[20..22].copy_from_slice(b"ab");
        r[64..67].copy_from_slice(b"xyz");
        let e = xattrs_in_inode(&r).unwrap();
        assert_eq!(
            e,
            vec![XattrEntry {
                name: Some("user.ab".into()),
                value: b"xyz".to_vec()
            }]
        );
        // A value past the region is refused, not read short.
        put32(&mut r, 12, 300);
        assert!(xattrs_in_inode(&r).is_err());
        // A block with an ACL (owner rw, user 1234 r, group r, mask r,
        // other none) and system.data (not listed).
        let mut b = vec![0u8; 4096];
        put32(&mut b, 0, XATTR_MAGIC);
        put32(&mut b, 8, 1);
        b[32] = 0;
        b[33] = 2;
        put16(&mut b, 34, 4000);
        let acl: Vec<u8> = [
            &1u32.to_le_bytes()[..],
            &[1, 0, 6, 0],
            &[2, 0, 4, 0],
            &1234u32.to_le_bytes(),
            &[4, 0, 4, 0],
            &[0x10, 0, 4, 0],
            &[0x20, 0, 0, 0],
        ]
        .concat();
        put32(&mut b, 40, u32::try_from(acl.len()).unwrap());
        b[4000..4000 + acl.len()].copy_from_slice(&acl);
        b[48] = 4;
        b[49] = 7;
        put16(&mut b, 50, 3000);
        b[64..68].copy_from_slice(b"data");
        let e = xattrs_in_block(&b).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].name.as_deref(), Some("system.posix_acl_access"));
        assert_eq!(e[1].name, None);
        let x = acl_to_xattr(&e[0].value).unwrap();
        assert_eq!(x.len(), 4 + 5 * 8);
        assert_eq!(&x[..4], &2u32.to_le_bytes());
        assert_eq!(&x[4..12], &[1, 0, 6, 0, 0xFF, 0xFF, 0xFF, 0xFF]);
        assert_eq!(&x[12..20], &[2, 0, 4, 0, 0xD2, 0x04, 0, 0]);
        assert!(acl_to_xattr(&acl[..10]).is_err(), "a cut entry");
    }

    proptest! {
        /// Any bytes decode or fail cleanly: never a panic, never a value
        /// read from outside what was given.
        #[test]
        fn any_bytes_decode_or_fail_cleanly(raw in proptest::collection::vec(any::<u8>(), 0..1200),
                                            seed in any::<u8>()) {
            let mut sb = raw.clone();
            sb.resize(SUPERBLOCK_LEN.max(raw.len()), seed);
            if sb.len() > 0x3A { sb[0x38] = 0x53; sb[0x39] = 0xEF; }
            if let Ok(g) = Geometry::from_superblock(&sb) {
                let _ = g.inode_tables(&raw);
                let _ = g.inode_group(u64::from(seed));
            }
            let _ = Inode::decode(&raw);
            let mut n = raw.clone();
            if n.len() >= 2 { n[0] = 0x0A; n[1] = 0xF3; }
            if let Ok(ExtentNode::Leaf(x)) = extent_node(&n, None) {
                let _ = to_fiemap(&x, 4096, u64::MAX >> 13);
            }
            let _ = xattrs_in_inode(&raw);
            let _ = xattrs_in_block(&raw);
            let _ = acl_to_xattr(&raw);
        }
    }
}
