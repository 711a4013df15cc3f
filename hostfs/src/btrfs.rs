//! btrfs: its FIEMAP gives logical addresses; the chunk tree maps them to
//! (device, physical offset) stripes. Pure stripe maths here ([`ChunkMap`])
//! plus the ioctl loading ([`ChunkMap::load`]).
//!
//! Profiles: SINGLE, DUP, RAID1/1C3/1C4 (first copy), RAID0, RAID10.
//! RAID5/6 (parity) are refused. Devices are named by their btrfs device
//! UUID (`btrfs-dev:UUID`), which the mover checks in the device's own
//! superblock.

use floe_core::error::{Error, ErrorKind, Result};
use floe_core::model::DeviceId;
use std::collections::BTreeMap;

/// Block group type flags.
pub mod profile {
    /// RAID0.
    pub const RAID0: u64 = 1 << 3;
    /// RAID1.
    pub const RAID1: u64 = 1 << 4;
    /// DUP.
    pub const DUP: u64 = 1 << 5;
    /// RAID10.
    pub const RAID10: u64 = 1 << 6;
    /// RAID5.
    pub const RAID5: u64 = 1 << 7;
    /// RAID6.
    pub const RAID6: u64 = 1 << 8;
    /// RAID1C3.
    pub const RAID1C3: u64 = 1 << 9;
    /// RAID1C4.
    pub const RAID1C4: u64 = 1 << 10;
}

/// One stripe of a chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stripe {
    /// The device id within the file system.
    pub devid: u64,
    /// Where the stripe starts on the device.
    pub offset: u64,
}

/// One chunk: a range of logical addresses and its stripes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// First logical address.
    pub start: u64,
    /// Length in logical bytes.
    pub length: u64,
    /// Stripe length (RAID0/10).
    pub stripe_len: u64,
    /// Block group type and profile flags.
    pub flags: u64,
    /// RAID10: copies per stripe set.
    pub sub_stripes: u16,
    /// Stripes.
    pub stripes: Vec<Stripe>,
}

/// The logical → physical map of a btrfs file system.
#[derive(Clone, Debug, Default)]
pub struct ChunkMap {
    /// Chunks by start.
    pub chunks: BTreeMap<u64, Chunk>,
    /// Device identity by devid.
    pub devices: BTreeMap<u64, DeviceId>,
    /// Device path by devid, as the kernel has it (not part of the
    /// digest: the same device may be reached by another path).
    pub paths: BTreeMap<u64, String>,
}

/// Format a UUID the usual way.
pub fn uuid_text(u: &[u8; 16]) -> String {
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

/// Parse a `struct btrfs_chunk` (key offset = logical start).
pub fn parse_chunk(start: u64, data: &[u8]) -> Option<Chunk> {
    use crate::le;
    let num = usize::from(le::u16(data, 44)?);
    let sub = le::u16(data, 46)?;
    let stripes = (0..num)
        .map(|i| {
            Some(Stripe {
                devid: le::u64(data, 48 + i * 32)?,
                offset: le::u64(data, 48 + i * 32 + 8)?,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Chunk {
        start,
        length: le::u64(data, 0)?,
        stripe_len: le::u64(data, 16)?,
        flags: le::u64(data, 24)?,
        sub_stripes: sub,
        stripes,
    })
}

impl ChunkMap {
    /// Load the chunk tree and the devices of the btrfs file system `fd`
    /// is on.
    pub fn load(fd: &impl std::os::fd::AsRawFd) -> Result<ChunkMap> {
        let io = |op: &str, e: std::io::Error| {
            Error::new(ErrorKind::Io, format!("btrfs {op} failed"))
                .op(op)
                .source(e)
        };
        let items = crate::sys::btrfs_search(fd, 3, (256, 256), 228)
            .map_err(|e| io("chunk tree search", e))?;
        let mut map = ChunkMap::default();
        for it in items {
            let c = parse_chunk(it.offset, &it.data).ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidMap,
                    format!("malformed btrfs chunk item at {}", it.offset),
                )
            })?;
            map.chunks.insert(c.start, c);
        }
        let (max_id, _, _) = crate::sys::btrfs_fs_info(fd).map_err(|e| io("fs info", e))?;
        for devid in 1..=max_id {
            if let Some((uuid, path)) =
                crate::sys::btrfs_dev_info(fd, devid).map_err(|e| io("dev info", e))?
            {
                map.devices.insert(
                    devid,
                    DeviceId::new(format!("btrfs-dev:{}", uuid_text(&uuid))),
                );
                map.paths.insert(devid, path);
            }
        }
        Ok(map)
    }

    /// Every device's block device numbers for a watch of writes (a
    /// device's offsets are from its own start); `None` if one cannot be
    /// found.
    pub fn watched(&self) -> Option<Vec<crate::watch::Watched>> {
        use std::os::unix::fs::MetadataExt;
        let mut out = Vec::new();
        for (devid, id) in &self.devices {
            let rdev = std::fs::metadata(self.paths.get(devid)?).ok()?.rdev();
            if rdev == 0 {
                return None;
            }
            out.extend(
                crate::identity::kernel_devices(rdev, 0)
                    .into_iter()
                    .map(|(dev, delta)| crate::watch::Watched {
                        device: id.clone(),
                        dev,
                        delta,
                    }),
            );
        }
        Some(out)
    }

    /// A digest of the whole map: changes when any chunk moves or a device
    /// is replaced (the btrfs part of a file's config id).
    pub fn digest(&self) -> String {
        let mut h = blake3::Hasher::new();
        for c in self.chunks.values() {
            h.update(format!("{c:?}").as_bytes());
        }
        for (d, id) in &self.devices {
            h.update(format!("{d}={id};").as_bytes());
        }
        h.finalize().to_hex()[..16].to_string()
    }

    /// Translate `[addr, addr+len)` to device pieces `(device, offset,
    /// length)`, split at chunk and stripe boundaries.
    pub fn translate(&self, addr: u64, len: u64) -> Result<Vec<(DeviceId, u64, u64)>> {
        let mut out = Vec::new();
        let (mut at, end) = (addr, addr + len);
        while at < end {
            let c = self
                .chunks
                .range(..=at)
                .next_back()
                .map(|(_, c)| c)
                .filter(|c| at < c.start + c.length)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidMap,
                        format!("btrfs logical address {at} is in no chunk"),
                    )
                })?;
            let off = at - c.start;
            let chunk_left = c.start + c.length - at;
            let (stripe, phys, run) = if c.flags & (profile::RAID5 | profile::RAID6) != 0 {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    "btrfs RAID5/RAID6 chunks hold parity: Floe does not map them",
                ));
            } else if c.flags & (profile::RAID0 | profile::RAID10) != 0 {
                let sl = c.stripe_len.max(1);
                let n = c.stripes.len() as u64;
                let sub = if c.flags & profile::RAID10 != 0 {
                    u64::from(c.sub_stripes.max(1))
                } else {
                    1
                };
                let factor = (n / sub).max(1);
                let nr = off / sl;
                let idx = (nr % factor) * sub;
                let within = off % sl;
                let s = usize::try_from(idx).unwrap_or(0);
                (
                    s,
                    c.stripes
                        .get(s)
                        .map(|x| x.offset + (nr / factor) * sl + within),
                    sl - within,
                )
            } else {
                // SINGLE, DUP, RAID1*: every stripe holds the bytes; read
                // the first copy.
                (0, c.stripes.first().map(|x| x.offset + off), chunk_left)
            };
            let phys = phys
                .ok_or_else(|| Error::new(ErrorKind::InvalidMap, "btrfs chunk without stripes"))?;
            let devid = c.stripes[stripe].devid;
            let dev = self.devices.get(&devid).cloned().ok_or_else(|| {
                Error::new(
                    ErrorKind::UnknownDevice,
                    format!("btrfs device {devid} is missing"),
                )
            })?;
            let n = run.min(chunk_left).min(end - at);
            match out.last_mut() {
                Some((d, o, l)) if *d == dev && *o + *l == phys => *l += n,
                _ => out.push((dev, phys, n)),
            }
            at += n;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(flags: u64, stripes: &[(u64, u64)], sub: u16) -> ChunkMap {
        let mut m = ChunkMap::default();
        m.chunks.insert(
            1 << 30,
            Chunk {
                start: 1 << 30,
                length: 1 << 30,
                stripe_len: 65536,
                flags: 1 | flags,
                sub_stripes: sub,
                stripes: stripes
                    .iter()
                    .map(|&(devid, offset)| Stripe { devid, offset })
                    .collect(),
            },
        );
        for d in 1..=4 {
            m.devices.insert(d, DeviceId::new(format!("btrfs-dev:{d}")));
        }
        m
    }

    fn d(n: u64) -> DeviceId {
        DeviceId::new(format!("btrfs-dev:{n}"))
    }

    #[test]
    fn single_and_dup_map_linearly() {
        let m = map(0, &[(1, 1 << 20)], 0);
        assert_eq!(
            m.translate((1 << 30) + 4096, 8192).unwrap(),
            vec![(d(1), (1 << 20) + 4096, 8192)]
        );
        let m = map(profile::DUP, &[(1, 1 << 20), (1, 5 << 20)], 0);
        assert_eq!(
            m.translate(1 << 30, 4096).unwrap(),
            vec![(d(1), 1 << 20, 4096)]
        );
        assert!(m.translate(5, 1).is_err(), "outside every chunk");
    }

    #[test]
    fn raid0_splits_at_stripes_across_devices() {
        let m = map(profile::RAID0, &[(1, 1 << 20), (2, 2 << 20)], 0);
        // 64K in stripe 0 (dev 1), then 64K on dev 2, then dev 1 row 1.
        let got = m.translate((1 << 30) + 32768, 3 * 65536).unwrap();
        assert_eq!(
            got,
            vec![
                (d(1), (1 << 20) + 32768, 32768),
                (d(2), 2 << 20, 65536),
                (d(1), (1 << 20) + 65536, 65536),
                (d(2), (2 << 20) + 65536, 32768),
            ]
        );
    }

    #[test]
    fn raid10_and_raid1_read_the_first_copy_of_each_stripe() {
        let m = map(profile::RAID10, &[(1, 0), (2, 0), (3, 0), (4, 0)], 2);
        let got = m.translate(1 << 30, 2 * 65536).unwrap();
        assert_eq!(got, vec![(d(1), 0, 65536), (d(3), 0, 65536)]);
        let m = map(profile::RAID1, &[(2, 7 << 20), (1, 9 << 20)], 0);
        assert_eq!(
            m.translate(1 << 30, 100).unwrap(),
            vec![(d(2), 7 << 20, 100)]
        );
        let m = map(profile::RAID5, &[(1, 0), (2, 0), (3, 0)], 0);
        assert!(m
            .translate(1 << 30, 1)
            .unwrap_err()
            .to_string()
            .contains("parity"));
    }

    #[test]
    fn chunk_items_parse() {
        let mut b = vec![0u8; 48 + 64];
        b[0..8].copy_from_slice(&(8u64 << 20).to_le_bytes());
        b[16..24].copy_from_slice(&65536u64.to_le_bytes());
        b[24..32].copy_from_slice(&(1 | profile::RAID0).to_le_bytes());
        b[44..46].copy_from_slice(&2u16.to_le_bytes());
        b[48..56].copy_from_slice(&1u64.to_le_bytes());
        b[56..64].copy_from_slice(&4096u64.to_le_bytes());
        b[80..88].copy_from_slice(&2u64.to_le_bytes());
        b[88..96].copy_from_slice(&8192u64.to_le_bytes());
        let c = parse_chunk(1 << 30, &b).unwrap();
        assert_eq!(c.length, 8 << 20);
        assert_eq!(
            c.stripes,
            vec![
                Stripe {
                    devid: 1,
                    offset: 4096
                },
                Stripe {
                    devid: 2,
                    offset: 8192
                }
            ]
        );
        assert!(parse_chunk(0, &b[..60]).is_none());
    }
}
