//! Rules of image maps, and applying a remap: pure functions, no I/O.
//!
//! Invariants of a valid [`Item`] map:
//! - extents are sorted by logical offset, start at 0, touch each other and
//!   end exactly at the item's size: every byte is said to be data, hole,
//!   zero or inline, exactly once;
//! - no extent is empty and no arithmetic on offsets overflows;
//! - a data extent's physical length (`count × block_size`) equals its
//!   logical length; an inline extent carries exactly `length` bytes.

use crate::error::{Error, ErrorKind, Result};
use crate::model::{ExtentKind, Item, MapExtent, Remap};
use crate::units::{Blocks, Bytes, ItemOffset};

fn invalid(item: &Item, msg: String) -> Error {
    Error::new(ErrorKind::InvalidMap, msg)
        .op("validate map")
        .item(&item.id)
}

/// Check one extent on its own: non-empty, no overflow, lengths agree.
pub fn check_extent(item: &Item, e: &MapExtent) -> Result<u64> {
    if e.length.0 == 0 {
        return Err(invalid(
            item,
            format!("empty extent at logical offset {}", e.logical),
        ));
    }
    let end = e.end().ok_or_else(|| {
        invalid(
            item,
            format!(
                "extent at logical offset {} with length {} overflows",
                e.logical, e.length
            ),
        )
    })?;
    match &e.kind {
        ExtentKind::Data(chain) => {
            let p = &chain.physical;
            if p.block_size.0 == 0 || !p.block_size.0.is_power_of_two() {
                return Err(invalid(
                    item,
                    format!("block size {} is not a power of two", p.block_size.0),
                ));
            }
            let phys_len = p.block_size.bytes(p.count).ok_or_else(|| {
                invalid(item, format!("{} of {} overflows", p.count, p.block_size))
            })?;
            p.block_size
                .bytes(Blocks(p.start.0.saturating_add(p.count.0)))
                .ok_or_else(|| {
                    invalid(
                        item,
                        format!(
                            "extent on {} at block {} + {} overflows",
                            p.device, p.start, p.count
                        ),
                    )
                })?;
            if phys_len != e.length {
                return Err(invalid(
                    item,
                    format!(
                        "extent at logical offset {} is {} bytes long but maps {} bytes on {}",
                        e.logical, e.length, phys_len, p.device
                    ),
                ));
            }
        }
        ExtentKind::Inline(bytes) => {
            if u64::try_from(bytes.len()).ok() != Some(e.length.0) {
                return Err(invalid(
                    item,
                    format!(
                        "inline extent at logical offset {} carries {} bytes, not {}",
                        e.logical,
                        bytes.len(),
                        e.length
                    ),
                ));
            }
        }
        ExtentKind::Hole | ExtentKind::Zero => {}
    }
    Ok(end)
}

/// Check an item's whole map against the invariants above.
pub fn validate_item(item: &Item) -> Result<()> {
    let mut pos = 0u64;
    for e in &item.extents {
        if e.logical.0 != pos {
            return Err(invalid(
                item,
                if e.logical.0 < pos {
                    format!(
                        "extent at logical offset {} overlaps the one before",
                        e.logical
                    )
                } else {
                    format!("gap in the map from {pos} to {}", e.logical)
                },
            ));
        }
        pos = check_extent(item, e)?;
    }
    if pos != item.size.0 {
        return Err(invalid(
            item,
            format!("map covers {pos} bytes but the item is {} bytes", item.size),
        ));
    }
    Ok(())
}

/// The part `[lo, hi)` of extent `e` (which must contain it), as an extent.
pub fn clip(item: &Item, e: &MapExtent, lo: u64, hi: u64) -> Result<MapExtent> {
    let start = e.logical.0;
    debug_assert!(start <= lo && lo < hi && hi <= start + e.length.0);
    let delta = lo - start;
    let len = hi - lo;
    let kind = match &e.kind {
        ExtentKind::Data(chain) => {
            let bs = u64::from(chain.physical.block_size.0);
            if !delta.is_multiple_of(bs) || !len.is_multiple_of(bs) {
                return Err(invalid(
                    item,
                    format!(
                        "range {lo}..{hi} does not fall on {}-byte blocks of {}",
                        bs, chain.physical.device
                    ),
                ));
            }
            let mut chain = chain.clone();
            chain.physical.start = Blocks(chain.physical.start.0 + delta / bs);
            chain.physical.count = Blocks(len / bs);
            for layer in &mut chain.layers {
                layer.offset = Bytes(layer.offset.0 + delta);
            }
            ExtentKind::Data(chain)
        }
        ExtentKind::Inline(bytes) => {
            let a = usize::try_from(delta).map_err(|_| invalid(item, "inline too big".into()))?;
            let b =
                usize::try_from(hi - start).map_err(|_| invalid(item, "inline too big".into()))?;
            ExtentKind::Inline(bytes[a..b].to_vec())
        }
        ExtentKind::Hole => ExtentKind::Hole,
        ExtentKind::Zero => ExtentKind::Zero,
    };
    Ok(MapExtent {
        logical: ItemOffset(lo),
        length: Bytes(len),
        kind,
    })
}

/// Apply a remap to an item: the remap's extents replace exactly the ranges
/// they cover, everything else keeps its old mapping, and the item takes the
/// remap's config id. The result is validated.
pub fn apply_remap(item: &Item, remap: &Remap) -> Result<Item> {
    if remap.item != item.id {
        return Err(invalid(
            item,
            format!("remap is for item {}, not {}", remap.item, item.id),
        ));
    }
    if let Some(size) = remap.size {
        // Replaced whole: the remap is the item's entire new map.
        let updated = Item {
            size,
            extents: remap.extents.clone(),
            config: remap.config.clone(),
            file: remap.file.clone().or_else(|| item.file.clone()),
            ..item.clone()
        };
        validate_item(&updated)?;
        return Ok(updated);
    }
    let mut changed: Vec<(u64, u64)> = Vec::with_capacity(remap.extents.len());
    let mut last_end = 0u64;
    for e in &remap.extents {
        let end = check_extent(item, e)?;
        if e.logical.0 < last_end {
            return Err(invalid(
                item,
                format!("remap extents overlap or are unsorted at {}", e.logical),
            ));
        }
        if end > item.size.0 {
            return Err(invalid(
                item,
                format!(
                    "remap extent {}..{end} reaches past the item's size {}",
                    e.logical, item.size
                ),
            ));
        }
        changed.push((e.logical.0, end));
        last_end = end;
    }
    let mut out: Vec<MapExtent> = Vec::with_capacity(item.extents.len() + remap.extents.len());
    for e in &item.extents {
        let (s, t) = (e.logical.0, e.end().unwrap_or(u64::MAX));
        let mut cursor = s;
        for &(a, b) in changed.iter().filter(|&&(a, b)| a < t && b > s) {
            if a > cursor {
                out.push(clip(item, e, cursor, a)?);
            }
            cursor = cursor.max(b);
        }
        if cursor < t {
            out.push(clip(item, e, cursor, t)?);
        }
    }
    out.extend(remap.extents.iter().cloned());
    out.sort_by_key(|e| e.logical);
    let updated = Item {
        extents: out,
        config: remap.config.clone(),
        ..item.clone()
    };
    validate_item(&updated)?;
    Ok(updated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use crate::units::*;
    use proptest::prelude::*;

    fn data(logical: u64, len: u64, dev: &str, block: u64) -> MapExtent {
        MapExtent {
            logical: ItemOffset(logical),
            length: Bytes(len),
            kind: ExtentKind::Data(ExtentChain {
                layers: vec![Layer {
                    kind: LayerKind::Volume,
                    object: "v".into(),
                    offset: Bytes(logical),
                }],
                physical: PhysicalExtent {
                    device: DeviceId::new(dev),
                    start: Blocks(block),
                    count: Blocks(len / 512),
                    block_size: BlockSize::SECTOR,
                },
            }),
        }
    }

    fn item(extents: Vec<MapExtent>, size: u64) -> Item {
        Item {
            id: ItemId::new("v"),
            kind: ItemKind::Volume,
            size: Bytes(size),
            config: ConfigId::new("c1"),
            extents,
            meta: Default::default(),
            file: None,
        }
    }

    #[test]
    fn valid_map_passes_and_gaps_overlaps_fail() {
        let ok = item(vec![data(0, 4096, "a", 0), data(4096, 4096, "b", 8)], 8192);
        validate_item(&ok).unwrap();
        let gap = item(vec![data(0, 4096, "a", 0), data(8192, 4096, "b", 8)], 12288);
        let e = validate_item(&gap).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidMap);
        assert!(
            e.to_string().contains("gap in the map from 4096 to 8192"),
            "{e}"
        );
        let overlap = item(vec![data(0, 4096, "a", 0), data(2048, 4096, "b", 8)], 6144);
        assert!(validate_item(&overlap)
            .unwrap_err()
            .to_string()
            .contains("overlaps"));
        let short = item(vec![data(0, 4096, "a", 0)], 8192);
        assert!(validate_item(&short)
            .unwrap_err()
            .to_string()
            .contains("covers 4096"));
        let mut bad_len = data(0, 4096, "a", 0);
        bad_len.length = Bytes(1024);
        let e = validate_item(&item(vec![bad_len], 1024)).unwrap_err();
        assert!(e.to_string().contains("maps 4096 bytes on a"), "{e}");
    }

    #[test]
    fn remap_replaces_only_the_changed_range() {
        let it = item(vec![data(0, 65536, "a", 0)], 65536);
        let remap = Remap {
            item: ItemId::new("v"),
            config: ConfigId::new("c2"),
            extents: vec![data(8192, 4096, "b", 100)],
            after_freeze: false,
            file: None,
            size: None,
        };
        let out = apply_remap(&it, &remap).unwrap();
        assert_eq!(out.config, ConfigId::new("c2"));
        assert_eq!(out.extents.len(), 3);
        assert_eq!(out.extents[0], clip(&it, &it.extents[0], 0, 8192).unwrap());
        assert_eq!(out.extents[1], remap.extents[0]);
        match &out.extents[2].kind {
            ExtentKind::Data(c) => {
                assert_eq!(c.physical.start, Blocks(24));
                assert_eq!(c.layers[0].offset, Bytes(12288));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn remap_past_the_end_is_refused() {
        let it = item(vec![data(0, 4096, "a", 0)], 4096);
        let remap = Remap {
            item: ItemId::new("v"),
            config: ConfigId::new("c2"),
            extents: vec![data(4096, 4096, "b", 0)],
            after_freeze: false,
            file: None,
            size: None,
        };
        let e = apply_remap(&it, &remap).unwrap_err();
        assert!(e.to_string().contains("past the item's size"), "{e}");
    }

    proptest! {
        /// Any remap of block-aligned ranges keeps the map valid, and every
        /// logical block then resolves to the remap's block where changed and
        /// to the old block elsewhere.
        #[test]
        fn remap_resolves_like_a_model(
            blocks in 1u64..64,
            cuts in proptest::collection::vec(0u64..64, 0..6),
            changes in proptest::collection::vec((0u64..64, 1u64..8), 0..5),
        ) {
            let size = blocks * 512;
            let mut bounds: Vec<u64> = cuts.into_iter().filter(|&c| c > 0 && c < blocks).collect();
            bounds.push(0);
            bounds.push(blocks);
            bounds.sort_unstable();
            bounds.dedup();
            let extents: Vec<_> = bounds.windows(2)
                .map(|w| data(w[0] * 512, (w[1] - w[0]) * 512, "old", 1000 + w[0]))
                .collect();
            let it = item(extents, size);
            validate_item(&it).unwrap();
            let mut model: Vec<(String, u64)> = (0..blocks).map(|b| ("old".to_string(), 1000 + b)).collect();
            let mut rex = Vec::new();
            let mut last = 0;
            let mut ch = changes;
            ch.sort_unstable();
            for (start, len) in ch {
                let start = start.max(last);
                let end = (start + len).min(blocks);
                if start >= end { continue; }
                rex.push(data(start * 512, (end - start) * 512, "new", 5000 + start));
                for (b, m) in model.iter_mut().enumerate().take(usize::try_from(end).unwrap()).skip(usize::try_from(start).unwrap()) {
                    *m = ("new".to_string(), 5000 + u64::try_from(b).unwrap());
                }
                last = end;
            }
            let remap = Remap { item: ItemId::new("v"), config: ConfigId::new("c9"), extents: rex, after_freeze: false, file: None, size: None };
            let out = apply_remap(&it, &remap).unwrap();
            validate_item(&out).unwrap();
            for e in &out.extents {
                let ExtentKind::Data(c) = &e.kind else { panic!() };
                for k in 0..c.physical.count.0 {
                    let b = usize::try_from(e.logical.0 / 512 + k).unwrap();
                    prop_assert_eq!(&model[b].0, c.physical.device.as_str());
                    prop_assert_eq!(model[b].1, c.physical.start.0 + k);
                }
            }
        }

        /// A valid map broken in any of the ways a bad agent could break it
        /// is refused: overlap, gap, zero length, overflow, huge counts.
        #[test]
        fn every_kind_of_broken_map_is_refused(
            blocks in 2u64..64,
            how in 0u8..6,
            at in 0usize..4,
        ) {
            let n = usize::try_from(blocks.min(4)).unwrap();
            let each = blocks / u64::try_from(n).unwrap();
            let mut extents: Vec<_> = (0..n)
                .map(|i| { let i = u64::try_from(i).unwrap(); data(i * each * 512, each * 512, "d", 100 * i) })
                .collect();
            let size = each * u64::try_from(n).unwrap() * 512;
            let k = at % n;
            match how {
                0 => extents[k].logical = ItemOffset(extents[k].logical.0 + 512), // gap / overlap
                1 if k > 0 => extents[k].logical = ItemOffset(extents[k].logical.0 - 512),
                1 => extents[k].logical = ItemOffset(512),
                2 => extents[k].length = Bytes(0),
                3 => extents[k].logical = ItemOffset(u64::MAX - 10),
                4 => if let ExtentKind::Data(c) = &mut extents[k].kind { c.physical.count = Blocks(u64::MAX / 2) },
                _ => if let ExtentKind::Data(c) = &mut extents[k].kind { c.physical.start = Blocks(u64::MAX - 1) },
            }
            let e = validate_item(&item(extents, size)).unwrap_err();
            prop_assert_eq!(e.kind(), ErrorKind::InvalidMap);
        }

        /// Arbitrary (often invalid) maps never panic the validator.
        #[test]
        fn validator_never_panics(
            ext in proptest::collection::vec((any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>(), 0u32..10000), 0..8),
            size in any::<u64>(),
        ) {
            let extents = ext.into_iter().map(|(l, len, start, count, bs)| MapExtent {
                logical: ItemOffset(l),
                length: Bytes(len),
                kind: ExtentKind::Data(ExtentChain { layers: vec![], physical: PhysicalExtent {
                    device: DeviceId::new("d"), start: Blocks(start), count: Blocks(count), block_size: BlockSize(bs) } }),
            }).collect();
            let _ = validate_item(&item(extents, size));
        }
    }
}
