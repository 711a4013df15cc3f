//! Floe plugin `btrfs`: maps files on btrfs, whose FIEMAP gives btrfs
//! logical addresses, through the chunk tree to (device, physical offset)
//! stripes — SINGLE, DUP, RAID0, RAID1 (first copy), RAID10, across
//! devices. Devices are named by their btrfs device UUID
//! (`btrfs-dev:UUID`), which the mover checks in each device's superblock.
//! Inline and compressed (encoded) extents cannot be read raw: the agent
//! carries their bytes in the map.
//!
//! Validity per file: inode, generation, size, ctime, a hash of its FIEMAP
//! extent list and a digest of the chunk map and device UUIDs (balance
//! moves chunks; device replace changes a device).
//!
//! Like `fiemap`, it watches the writes queued on every device of the
//! file system from the map on ([`floe_hostfs::watch`]): a file no write
//! reached is not looked at after the thaw (a copy-on-write rewrite never
//! reaches the mapped extents). `--plugin-opt btrfs.watch_writes=false`
//! turns the watch off.

/// mimalloc instead of glibc's malloc inside this plugin too (a cdylib has
/// its own allocator; values crossing the ABI carry theirs): mapping
/// allocates per file (ids, paths, metadata, JSON), and glibc's
/// malloc/free were a tenth of the agent's CPU after `floe` itself moved
/// to mimalloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use floe_core::error::{Error, Result};
use floe_core::model::DeviceId;
use floe_hostfs::btrfs::ChunkMap;
use floe_hostfs::mapper::{check_mapper, SourceHandle, Translate};

struct Chunks {
    map: ChunkMap,
    epoch: String,
}

impl Translate for Chunks {
    fn translate(&self, addr: u64, len: u64) -> Result<Vec<(DeviceId, u64, u64)>> {
        self.map.translate(addr, len)
    }
    fn epoch(&self) -> String {
        format!(":{}", self.epoch)
    }
    fn watched(&self) -> Option<Vec<floe_hostfs::watch::Watched>> {
        self.map.watched()
    }
}

fn translator(h: &SourceHandle) -> Result<Box<dyn Translate>> {
    check_mapper(h, "btrfs")?;
    let dir = std::fs::File::open(&h.frozen).map_err(|e| Error::io("open", e).path(&h.frozen))?;
    let map = ChunkMap::load(&dir).map_err(|e| e.path(&h.frozen))?;
    let epoch = map.digest();
    Ok(Box::new(Chunks { map, epoch }))
}

floe_hostfs::file_mapper_plugin!(BtrfsPlugin, "btrfs", translator);
