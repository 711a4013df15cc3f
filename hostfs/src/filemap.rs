//! A file's map, planned from its FIEMAP extents: pure, no I/O.
//!
//! Rules (facts measured on ext4, XFS and btrfs):
//! - extents past EOF are dropped (XFS speculative preallocation) and the
//!   last one is cut at EOF;
//! - gaps are holes; `UNWRITTEN` extents read as zeros and are not read;
//! - `DELALLOC`/`UNKNOWN` have no address yet: an error (the agent maps
//!   with `FIEMAP_FLAG_SYNC` on a synced, frozen file system, so this means
//!   the file is being written);
//! - `DATA_INLINE`, `ENCODED` (compressed), `DATA_ENCRYPTED`,
//!   `NOT_ALIGNED` and `DATA_TAIL` extents cannot be read raw: the agent
//!   carries their bytes in the map;
//! - files below a threshold with nothing raw-readable worth a device read
//!   are not special: a tiny file is one data extent like any other.

/// `FIEMAP_EXTENT_*` flags (include/uapi/linux/fiemap.h).
pub mod flags {
    /// Last extent of the file.
    pub const LAST: u32 = 0x1;
    /// Location not known yet.
    pub const UNKNOWN: u32 = 0x2;
    /// Delayed allocation: no location yet.
    pub const DELALLOC: u32 = 0x4;
    /// Data is encoded (compressed) on disk.
    pub const ENCODED: u32 = 0x8;
    /// Data is encrypted on disk.
    pub const DATA_ENCRYPTED: u32 = 0x80;
    /// Offsets are not block-aligned.
    pub const NOT_ALIGNED: u32 = 0x100;
    /// Data lives in a metadata block (inline).
    pub const DATA_INLINE: u32 = 0x200;
    /// Data is packed with other files' tails.
    pub const DATA_TAIL: u32 = 0x400;
    /// Allocated but never written: reads as zeros.
    pub const UNWRITTEN: u32 = 0x800;
    /// Shared with another file (reflink, snapshot).
    pub const SHARED: u32 = 0x2000;
}

use crate::sys::FiemapExtent;

/// One piece of a file's plan, in logical order, covering `[0, size)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FilePiece {
    /// Read raw from the file system's address space at `physical`.
    Data {
        /// Offset in the file.
        logical: u64,
        /// Length.
        length: u64,
        /// Address in the file system's space (device offset; btrfs
        /// logical address).
        physical: u64,
    },
    /// Unallocated.
    Hole {
        /// Offset in the file.
        logical: u64,
        /// Length.
        length: u64,
    },
    /// Allocated, reads as zeros.
    Zero {
        /// Offset in the file.
        logical: u64,
        /// Length.
        length: u64,
    },
    /// Not raw-readable: the agent reads these bytes through the file.
    Inline {
        /// Offset in the file.
        logical: u64,
        /// Length.
        length: u64,
    },
}

impl FilePiece {
    /// Where it starts.
    pub fn logical(&self) -> u64 {
        match *self {
            FilePiece::Data { logical, .. }
            | FilePiece::Hole { logical, .. }
            | FilePiece::Zero { logical, .. }
            | FilePiece::Inline { logical, .. } => logical,
        }
    }
    /// Its length.
    pub fn length(&self) -> u64 {
        match *self {
            FilePiece::Data { length, .. }
            | FilePiece::Hole { length, .. }
            | FilePiece::Zero { length, .. }
            | FilePiece::Inline { length, .. } => length,
        }
    }
}

/// Why a file cannot be planned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanError {
    /// An extent has no address yet (being written).
    Unallocated(u64),
    /// Extents overlap or go backwards.
    Overlap(u64),
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlanError::Unallocated(at) => write!(
                f,
                "data at offset {at} has no place on disk yet (delayed allocation): the file is being written"
            ),
            PlanError::Overlap(at) => write!(f, "FIEMAP extents overlap at offset {at}"),
        }
    }
}

const RAW_UNREADABLE: u32 = flags::DATA_INLINE
    | flags::ENCODED
    | flags::DATA_ENCRYPTED
    | flags::NOT_ALIGNED
    | flags::DATA_TAIL;

/// Plan a file of `size` bytes from its FIEMAP extents.
pub fn plan_file(size: u64, extents: &[FiemapExtent]) -> Result<Vec<FilePiece>, PlanError> {
    let mut out: Vec<FilePiece> = Vec::new();
    let mut pos = 0u64;
    let push = |out: &mut Vec<FilePiece>, p: FilePiece| {
        // Merge with the previous piece when contiguous and alike.
        if let Some(last) = out.last_mut() {
            let end = last.logical() + last.length();
            match (last, &p) {
                (
                    FilePiece::Data {
                        length, physical, ..
                    },
                    FilePiece::Data {
                        logical: l,
                        physical: ph,
                        length: n,
                    },
                ) if end == *l && *physical + *length == *ph => {
                    *length += n;
                    return;
                }
                (FilePiece::Hole { length, .. }, FilePiece::Hole { length: n, .. })
                | (FilePiece::Zero { length, .. }, FilePiece::Zero { length: n, .. })
                | (FilePiece::Inline { length, .. }, FilePiece::Inline { length: n, .. }) => {
                    *length += n;
                    return;
                }
                _ => {}
            }
        }
        out.push(p);
    };
    for e in extents {
        if e.logical >= size {
            break; // past EOF: speculative preallocation
        }
        if e.logical < pos {
            return Err(PlanError::Overlap(e.logical));
        }
        if e.length == 0 {
            continue;
        }
        if e.logical > pos {
            push(
                &mut out,
                FilePiece::Hole {
                    logical: pos,
                    length: e.logical - pos,
                },
            );
        }
        let length = e.length.min(size - e.logical);
        let logical = e.logical;
        let piece = if e.flags & (flags::DELALLOC | flags::UNKNOWN) != 0 {
            return Err(PlanError::Unallocated(logical));
        } else if e.flags & RAW_UNREADABLE != 0 {
            FilePiece::Inline { logical, length }
        } else if e.flags & flags::UNWRITTEN != 0 {
            FilePiece::Zero { logical, length }
        } else {
            FilePiece::Data {
                logical,
                length,
                physical: e.physical,
            }
        };
        push(&mut out, piece);
        pos = logical + length;
    }
    if pos < size {
        push(
            &mut out,
            FilePiece::Hole {
                logical: pos,
                length: size - pos,
            },
        );
    }
    Ok(out)
}

/// Flags that say how FIEMAP reported an extent, not where it is.
const REPORTING: u32 = flags::LAST | 0x1000; // FIEMAP_EXTENT_MERGED

/// A stable digest of an extent list: the part of a file's config id that
/// catches defragmenters, which move extents without touching anything
/// else (`e4defrag`, `xfs_fsr`). Of where the bytes are, not of how the
/// list was cut: runs of extents contiguous in the file and on the device
/// with the same flags count as one (ext4 reports two such extents of its
/// tree as one once its extent cache has merged them, and its tree as it
/// is on the device keeps them apart).
pub fn extents_digest(extents: &[FiemapExtent]) -> String {
    let mut h = blake3::Hasher::new();
    let mut run: Option<(u64, u64, u64, u32)> = None;
    let mut put = |(logical, physical, length, flags): (u64, u64, u64, u32)| {
        h.update(&logical.to_le_bytes());
        h.update(&physical.to_le_bytes());
        h.update(&length.to_le_bytes());
        h.update(&flags.to_le_bytes());
    };
    for e in extents {
        let flags = e.flags & !REPORTING;
        run = match run {
            Some((l, p, n, f)) if f == flags && l + n == e.logical && p + n == e.physical => {
                Some((l, p, n + e.length, f))
            }
            Some(r) => {
                put(r);
                Some((e.logical, e.physical, e.length, flags))
            }
            None => Some((e.logical, e.physical, e.length, flags)),
        };
    }
    if let Some(r) = run {
        put(r);
    }
    h.finalize().to_hex()[..16].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn x(l: u64, p: u64, n: u64, f: u32) -> FiemapExtent {
        FiemapExtent::new(l, p, n, f)
    }

    #[test]
    fn holes_unwritten_eof_and_inline() {
        let plan = plan_file(
            20_000,
            &[
                x(4096, 1 << 20, 4096, 0),
                x(8192, 2 << 20, 4096, flags::UNWRITTEN),
                x(16384, 0, 4096, flags::DATA_INLINE | flags::NOT_ALIGNED),
                x(20480, 3 << 20, 1 << 20, flags::UNWRITTEN | flags::LAST), // past EOF
            ],
        )
        .unwrap();
        assert_eq!(
            plan,
            vec![
                FilePiece::Hole {
                    logical: 0,
                    length: 4096
                },
                FilePiece::Data {
                    logical: 4096,
                    length: 4096,
                    physical: 1 << 20
                },
                FilePiece::Zero {
                    logical: 8192,
                    length: 4096
                },
                FilePiece::Hole {
                    logical: 12288,
                    length: 4096
                },
                FilePiece::Inline {
                    logical: 16384,
                    length: 20_000 - 16384
                },
            ]
        );
    }

    #[test]
    fn contiguous_extents_merge_and_tail_is_cut_at_eof() {
        let plan = plan_file(
            10_000,
            &[x(0, 40960, 4096, 0), x(4096, 45056, 8192, flags::LAST)],
        )
        .unwrap();
        assert_eq!(
            plan,
            vec![FilePiece::Data {
                logical: 0,
                length: 10_000,
                physical: 40960
            }]
        );
    }

    #[test]
    fn delalloc_and_overlap_are_errors() {
        assert_eq!(
            plan_file(4096, &[x(0, 0, 4096, flags::DELALLOC)]),
            Err(PlanError::Unallocated(0))
        );
        assert_eq!(
            plan_file(9000, &[x(0, 0, 8192, 0), x(4096, 0, 4096, 0)]),
            Err(PlanError::Overlap(4096))
        );
    }

    #[test]
    fn defrag_changes_the_digest_and_nothing_else_does() {
        let a = [x(0, 4096, 4096, 0), x(4096, 65536, 4096, flags::LAST)];
        let b = [x(0, 4096, 4096, 0), x(4096, 8192, 4096, flags::LAST)];
        assert_ne!(extents_digest(&a), extents_digest(&b));
        assert_eq!(extents_digest(&a), extents_digest(&a.clone()));
    }

    #[test]
    fn the_digest_is_of_where_the_bytes_are_not_how_the_list_is_cut() {
        // One run of 12 KiB, reported whole, in two, or in three.
        let whole = [x(0, 8192, 12288, flags::LAST)];
        let two = [x(0, 8192, 4096, 0), x(4096, 12288, 8192, flags::LAST)];
        let three = [
            x(0, 8192, 4096, 0x1000),
            x(4096, 12288, 4096, 0),
            x(8192, 16384, 4096, flags::LAST),
        ];
        assert_eq!(extents_digest(&whole), extents_digest(&two));
        assert_eq!(extents_digest(&whole), extents_digest(&three));
        // Not merged: a gap in the file, a gap on the device, other flags.
        let file_gap = [x(0, 8192, 4096, 0), x(8192, 12288, 8192, flags::LAST)];
        let dev_gap = [x(0, 8192, 4096, 0), x(4096, 16384, 8192, flags::LAST)];
        let unwritten = [
            x(0, 8192, 4096, 0),
            x(4096, 12288, 8192, flags::UNWRITTEN | flags::LAST),
        ];
        for other in [&file_gap[..], &dev_gap, &unwritten] {
            assert_ne!(extents_digest(&whole), extents_digest(other), "{other:?}");
        }
    }

    proptest! {
        /// Whatever the kernel says, a plan tiles [0, size) exactly.
        #[test]
        fn plans_tile_the_file(
            size in 0u64..1_000_000,
            raw in proptest::collection::vec((0u64..64, 1u64..64, 0u64..1000, 0u32..0x1000), 0..20),
        ) {
            let mut pos = 0u64;
            let mut ex = Vec::new();
            for (gap, len, phys, fl) in raw {
                let l = pos + gap * 4096;
                ex.push(x(l, phys * 4096, len * 4096, fl & !(flags::DELALLOC | flags::UNKNOWN)));
                pos = l + len * 4096;
            }
            let plan = plan_file(size, &ex).unwrap();
            let mut at = 0;
            for p in &plan {
                prop_assert_eq!(p.logical(), at);
                prop_assert!(p.length() > 0);
                at += p.length();
            }
            prop_assert_eq!(at, size);
        }
    }
}
