//! A file system's volume as one item: every block of the device it is
//! on (`?volume`), or only the blocks it has allocated (`?volume=allocated`,
//! from `GETFSMAP`: free space becomes holes, which are not read and
//! restore as zeros). The file system is held frozen for the whole backup
//! (the freezer does not thaw after mapping), so the image is of one point
//! in time; its config id says whether it still is.

use crate::mapper::{SourceHandle, Translate};
use crate::sys::{freeze, getfsmap, thaw, FMR_OF_SPECIAL_OWNER, FMR_OWN_FREE};
use floe_core::error::{Error, ErrorKind, Result};
use floe_core::model::*;
use floe_core::units::{BlockSize, Blocks, Bytes, ItemOffset};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// What of a volume is backed up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeMode {
    /// Every block.
    All,
    /// Only the blocks the file system has allocated.
    Allocated,
}

/// Split `PATH?volume[=all|allocated]` into the path and the mode.
pub fn volume_mode(text: &str) -> Result<(&str, Option<VolumeMode>)> {
    let Some((path, q)) = text.split_once("?volume") else {
        return Ok((text, None));
    };
    let mode = match q {
        "" | "=all" => VolumeMode::All,
        "=allocated" => VolumeMode::Allocated,
        other => {
            return Err(Error::new(
                ErrorKind::Config,
                format!("`?volume{other}`: say ?volume, ?volume=all or ?volume=allocated"),
            ))
        }
    };
    Ok((path, Some(mode)))
}

/// The size in bytes of the block device `dev` (an `st_dev`).
pub fn device_size(dev: u64) -> Result<u64> {
    let p = format!(
        "/sys/dev/block/{}:{}/size",
        libc::major(dev),
        libc::minor(dev)
    );
    std::fs::read_to_string(&p)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(|sectors| sectors * 512)
        .ok_or_else(|| Error::new(ErrorKind::UnknownDevice, format!("cannot read {p}")))
}

/// The free ranges of a file system of `size` bytes from its `GETFSMAP`
/// records on device `dev`: sorted, merged, inside `[0, size)`. Pure.
pub fn free_ranges(records: &[crate::sys::FsmapRecord], dev: u32, size: u64) -> Vec<[u64; 2]> {
    let mut free: Vec<[u64; 2]> = records
        .iter()
        .filter(|r| {
            r.flags & FMR_OF_SPECIAL_OWNER != 0
                && r.owner == FMR_OWN_FREE
                && r.device == dev
                && r.length > 0
        })
        .filter_map(|r| {
            let end = r.physical.saturating_add(r.length).min(size);
            (r.physical < end).then_some([r.physical, end - r.physical])
        })
        .collect();
    free.sort_unstable();
    let mut out: Vec<[u64; 2]> = Vec::with_capacity(free.len());
    for f in free {
        match out.last_mut() {
            Some(l) if l[0] + l[1] >= f[0] => l[1] = (f[0] + f[1]).max(l[0] + l[1]) - l[0],
            _ => out.push(f),
        }
    }
    out
}

/// The kernel's `new_encode_dev` of an `st_dev` (as `fmr_device` holds it).
fn encode_dev(dev: u64) -> u32 {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// The config id of a held volume: the same while the file system stays
/// frozen; a new one, never seen before, once anything thawed it. (A
/// second `FIFREEZE` of a frozen file system fails with EBUSY; if it
/// succeeds the file system had been thawed, and is thawed again at once.)
pub fn volume_config(mount: &Path) -> ConfigId {
    let Ok(d) = std::fs::File::open(mount) else {
        return ConfigId::new(format!("volume:gone:{}", now_nanos()));
    };
    match freeze(&d) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => ConfigId::new("volume:frozen"),
        Ok(()) => {
            let _ = thaw(&d);
            ConfigId::new(format!("volume:thawed:{}", now_nanos()))
        }
        Err(e) => ConfigId::new(format!("volume:unknown:{e}:{}", now_nanos())),
    }
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Map the volume of a held file system as one item (id: the mount point).
pub fn map_volume(h: &SourceHandle, mode: VolumeMode, tr: &dyn Translate) -> Result<Item> {
    let id = ItemId::new(h.frozen.display().to_string());
    let meta = std::fs::metadata(&h.frozen).map_err(|e| Error::io("stat", e).item(&id))?;
    let size = device_size(meta.dev())?;
    let free = match mode {
        VolumeMode::All => Vec::new(),
        VolumeMode::Allocated => {
            let d = std::fs::File::open(&h.frozen).map_err(|e| Error::io("open", e).item(&id))?;
            let recs = getfsmap(&d).map_err(|e| {
                Error::new(
                    ErrorKind::Unsupported,
                    format!("GETFSMAP failed on {}: cannot tell allocated blocks from free ones (use ?volume)", h.fstype),
                )
                .item(&id)
                .source(e)
            })?;
            free_ranges(&recs, encode_dev(meta.dev()), size)
        }
    };
    let mut extents = Vec::new();
    let mut at = 0u64;
    let data = |from: u64, to: u64, extents: &mut Vec<MapExtent>| -> Result<()> {
        let mut logical = from;
        for (device, off, len) in tr.translate(from, to - from)? {
            let bs: u32 = if off % 4096 == 0 && len % 4096 == 0 {
                4096
            } else {
                512
            };
            extents.push(MapExtent {
                logical: ItemOffset(logical),
                length: Bytes(len),
                kind: ExtentKind::Data(ExtentChain {
                    layers: Vec::new(),
                    physical: PhysicalExtent {
                        device,
                        start: Blocks(off / u64::from(bs)),
                        count: Blocks(len / u64::from(bs)),
                        block_size: BlockSize(bs),
                    },
                }),
            });
            logical += len;
        }
        Ok(())
    };
    let mut used = 0u64;
    for f in &free {
        if f[0] > at {
            data(at, f[0], &mut extents)?;
            used += f[0] - at;
        }
        extents.push(MapExtent {
            logical: ItemOffset(f[0]),
            length: Bytes(f[1]),
            kind: ExtentKind::Hole,
        });
        at = f[0] + f[1];
    }
    if at < size {
        data(at, size, &mut extents)?;
        used += size - at;
    }
    let mut m = std::collections::BTreeMap::new();
    m.insert("fstype".to_string(), h.fstype.clone());
    m.insert(
        "volume".to_string(),
        match mode {
            VolumeMode::All => "all",
            VolumeMode::Allocated => "allocated",
        }
        .to_string(),
    );
    m.insert("allocated_bytes".to_string(), used.to_string());
    Ok(Item {
        id,
        kind: ItemKind::Volume,
        size: Bytes(size),
        config: volume_config(&h.frozen),
        extents,
        meta: m,
        file: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::FsmapRecord;

    fn rec(physical: u64, length: u64, owner: u64) -> FsmapRecord {
        FsmapRecord {
            device: 7,
            physical,
            length,
            owner,
            flags: if owner == FMR_OWN_FREE {
                FMR_OF_SPECIAL_OWNER
            } else {
                0
            },
        }
    }

    #[test]
    fn free_space_is_merged_clipped_and_only_of_this_device() {
        let recs = [
            rec(0, 4096, 12),
            FsmapRecord {
                flags: 0,
                ..rec(8192, 100, FMR_OWN_FREE)
            }, // inode 1's, not free
            rec(4096, 8192, FMR_OWN_FREE),
            rec(12288, 4096, FMR_OWN_FREE),
            rec(20480, 4096, FMR_OWN_FREE),
            rec(90000, 100_000, FMR_OWN_FREE),
            FsmapRecord {
                device: 9,
                ..rec(30000, 4096, FMR_OWN_FREE)
            },
        ];
        assert_eq!(
            free_ranges(&recs, 7, 100_000),
            vec![[4096, 12288], [20480, 4096], [90000, 10_000]]
        );
    }

    #[test]
    fn volume_modes_parse() {
        assert_eq!(volume_mode("/mnt").unwrap(), ("/mnt", None));
        assert_eq!(
            volume_mode("/mnt?volume").unwrap(),
            ("/mnt", Some(VolumeMode::All))
        );
        assert_eq!(
            volume_mode("/mnt?volume=allocated").unwrap(),
            ("/mnt", Some(VolumeMode::Allocated))
        );
        assert!(volume_mode("/mnt?volume=some").is_err());
    }
}
