//! Read planning: turn a window of an item's map into device reads, sorted
//! by physical position, coalesced, and aligned for O_DIRECT; plus the fills
//! (holes, zeros, inline bytes) that need no read. Pure: no I/O here.

use crate::error::Result;
use crate::map::clip;
use crate::model::{DeviceId, ExtentKind, Item};
use crate::units::{Bytes, DeviceOffset, ItemOffset};

/// How reads are shaped.
#[derive(Clone, Copy, Debug)]
pub struct PlanOptions {
    /// Alignment of every device read's offset and length (O_DIRECT).
    pub align: u64,
    /// Merge two reads of one device when the gap between them is at most
    /// this many bytes (the gap is read and thrown away).
    pub coalesce_gap: u64,
    /// Never make one read longer than this.
    pub max_read: u64,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            align: 4096,
            coalesce_gap: 64 * 1024,
            max_read: 8 * 1024 * 1024,
        }
    }
}

/// A piece of a device read that lands in the window's buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Offset inside the read's buffer.
    pub from: u64,
    /// Offset inside the window's buffer.
    pub to: u64,
    /// Length.
    pub len: u64,
}

/// One device read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceRead {
    /// The device.
    pub device: DeviceId,
    /// The first byte read (aligned).
    pub offset: DeviceOffset,
    /// How many bytes (aligned).
    pub length: Bytes,
    /// Where its bytes go.
    pub targets: Vec<Target>,
}

impl DeviceRead {
    /// The exclusive end on the device.
    pub fn end(&self) -> u64 {
        self.offset.0 + self.length.0
    }
}

/// A range of the window filled without reading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fill {
    /// Zeros (hole or zero extent): `(offset in window, length)`.
    Zeros(u64, u64),
    /// Inline bytes at an offset in the window.
    Inline(u64, Vec<u8>),
}

/// Everything needed to assemble one window of an item.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WindowPlan {
    /// Device reads, sorted by (device, offset).
    pub reads: Vec<DeviceRead>,
    /// Fills.
    pub fills: Vec<Fill>,
    /// Bytes of data the map says to read (before alignment and gaps).
    pub data_bytes: u64,
}

/// Split an item of `size` bytes into windows of at most `window` bytes.
pub fn windows(size: Bytes, window: Bytes) -> Vec<(ItemOffset, Bytes)> {
    let w = window.0.max(1);
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < size.0 {
        let len = w.min(size.0 - pos);
        out.push((ItemOffset(pos), Bytes(len)));
        pos += len;
    }
    out
}

struct Piece {
    device: DeviceId,
    phys: u64,
    len: u64,
    to: u64,
}

/// Plan the window `[lo, lo+len)` of `item` (whose map must be valid).
pub fn plan_window(
    item: &Item,
    lo: ItemOffset,
    len: Bytes,
    opts: &PlanOptions,
) -> Result<WindowPlan> {
    let (lo, hi) = (lo.0, lo.0 + len.0);
    let align = opts.align.max(1);
    let mut plan = WindowPlan::default();
    let mut pieces: Vec<Piece> = Vec::new();
    let first = item
        .extents
        .partition_point(|e| e.logical.0 + e.length.0 <= lo);
    for e in &item.extents[first..] {
        let (s, t) = (e.logical.0, e.logical.0 + e.length.0);
        if s >= hi {
            break;
        }
        let (a, b) = (s.max(lo), t.min(hi));
        let part = if a == s && b == t {
            e.clone()
        } else {
            clip(item, e, a, b)?
        };
        let to = a - lo;
        match part.kind {
            ExtentKind::Data(chain) => {
                let p = chain.physical;
                let phys = u64::from(p.block_size.0) * p.start.0;
                plan.data_bytes += b - a;
                // Split long extents so no read exceeds max_read and several
                // can be in flight.
                let step = (opts.max_read / align).max(1) * align;
                let mut done = 0;
                while done < b - a {
                    let len = step.min(b - a - done);
                    pieces.push(Piece {
                        device: p.device.clone(),
                        phys: phys + done,
                        len,
                        to: to + done,
                    });
                    done += len;
                }
            }
            ExtentKind::Hole | ExtentKind::Zero => plan.fills.push(Fill::Zeros(to, b - a)),
            ExtentKind::Inline(bytes) => plan.fills.push(Fill::Inline(to, bytes)),
        }
    }
    pieces.sort_by(|x, y| (&x.device, x.phys).cmp(&(&y.device, y.phys)));
    for piece in pieces {
        let start = piece.phys / align * align;
        let end = (piece.phys + piece.len).div_ceil(align) * align;
        if let Some(cur) = plan.reads.last_mut() {
            let merged_len = end.max(cur.end()) - cur.offset.0;
            if cur.device == piece.device
                && start <= cur.end() + opts.coalesce_gap
                && merged_len <= opts.max_read
            {
                cur.length = Bytes(merged_len);
                cur.targets.push(Target {
                    from: piece.phys - cur.offset.0,
                    to: piece.to,
                    len: piece.len,
                });
                continue;
            }
        }
        plan.reads.push(DeviceRead {
            device: piece.device,
            offset: DeviceOffset(start),
            length: Bytes(end - start),
            targets: vec![Target {
                from: piece.phys - start,
                to: piece.to,
                len: piece.len,
            }],
        });
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use crate::units::*;

    fn data(logical: u64, len: u64, dev: &str, byte: u64) -> MapExtent {
        MapExtent {
            logical: ItemOffset(logical),
            length: Bytes(len),
            kind: ExtentKind::Data(ExtentChain {
                layers: vec![],
                physical: PhysicalExtent {
                    device: DeviceId::new(dev),
                    start: Blocks(byte / 512),
                    count: Blocks(len / 512),
                    block_size: BlockSize::SECTOR,
                },
            }),
        }
    }

    fn item(extents: Vec<MapExtent>) -> Item {
        let size = extents
            .last()
            .map(|e| e.logical.0 + e.length.0)
            .unwrap_or(0);
        Item {
            id: ItemId::new("v"),
            kind: ItemKind::Volume,
            size: Bytes(size),
            config: ConfigId::new("c"),
            extents,
            meta: Default::default(),
            file: None,
        }
    }

    #[test]
    fn reads_are_sorted_by_physical_position_and_coalesced() {
        // logical order: B(high), A(low), A(adjacent to first A)
        let it = item(vec![
            data(0, 8192, "a", 1 << 20),
            data(8192, 4096, "a", 0),
            data(12288, 4096, "a", 4096),
            MapExtent {
                logical: ItemOffset(16384),
                length: Bytes(4096),
                kind: ExtentKind::Hole,
            },
        ]);
        let plan = plan_window(&it, ItemOffset(0), Bytes(20480), &PlanOptions::default()).unwrap();
        assert_eq!(plan.reads.len(), 2);
        assert_eq!(plan.reads[0].offset, DeviceOffset(0));
        assert_eq!(plan.reads[0].length, Bytes(8192));
        assert_eq!(
            plan.reads[0].targets,
            vec![
                Target {
                    from: 0,
                    to: 8192,
                    len: 4096
                },
                Target {
                    from: 4096,
                    to: 12288,
                    len: 4096
                }
            ]
        );
        assert_eq!(plan.reads[1].offset, DeviceOffset(1 << 20));
        assert_eq!(plan.fills, vec![Fill::Zeros(16384, 4096)]);
        assert_eq!(plan.data_bytes, 16384);
    }

    #[test]
    fn unaligned_pieces_get_aligned_reads_and_windows_clip_extents() {
        let it = item(vec![data(0, 1024, "a", 512), data(1024, 7168, "b", 512)]);
        let plan = plan_window(&it, ItemOffset(512), Bytes(1024), &PlanOptions::default()).unwrap();
        assert_eq!(plan.reads.len(), 2);
        assert_eq!(plan.reads[0].device, DeviceId::new("a"));
        assert_eq!(
            (plan.reads[0].offset, plan.reads[0].length),
            (DeviceOffset(0), Bytes(4096))
        );
        assert_eq!(
            plan.reads[0].targets,
            vec![Target {
                from: 1024,
                to: 0,
                len: 512
            }]
        );
        assert_eq!(
            plan.reads[1].targets,
            vec![Target {
                from: 512,
                to: 512,
                len: 512
            }]
        );
    }

    #[test]
    fn distant_reads_stay_apart_and_max_read_is_respected() {
        let it = item(vec![data(0, 4096, "a", 0), data(4096, 4096, "a", 10 << 20)]);
        let plan = plan_window(&it, ItemOffset(0), Bytes(8192), &PlanOptions::default()).unwrap();
        assert_eq!(plan.reads.len(), 2);
        let opts = PlanOptions {
            max_read: 4096,
            coalesce_gap: 1 << 30,
            align: 4096,
        };
        let it = item(vec![data(0, 4096, "a", 0), data(4096, 4096, "a", 4096)]);
        assert_eq!(
            plan_window(&it, ItemOffset(0), Bytes(8192), &opts)
                .unwrap()
                .reads
                .len(),
            2
        );
        // one long extent is split too
        let it = item(vec![data(0, 3 * 4096, "a", 0)]);
        let plan = plan_window(&it, ItemOffset(0), Bytes(3 * 4096), &opts).unwrap();
        assert_eq!(plan.reads.len(), 3);
        assert_eq!(
            plan.reads[2].targets,
            vec![Target {
                from: 0,
                to: 8192,
                len: 4096
            }]
        );
    }

    #[test]
    fn windows_cover_the_item() {
        let w = windows(Bytes(10), Bytes(4));
        assert_eq!(
            w,
            vec![
                (ItemOffset(0), Bytes(4)),
                (ItemOffset(4), Bytes(4)),
                (ItemOffset(8), Bytes(2))
            ]
        );
        assert!(windows(Bytes(0), Bytes(4)).is_empty());
    }
}
