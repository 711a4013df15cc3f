//! Floe plugin `fiemap`: maps files on ext4 and XFS (and any file system
//! whose FIEMAP gives device offsets) to extents of the disk the file
//! system is on, through a partition's offset, identified by WWN, serial
//! or (loop devices) backing file. Validity per file: inode, generation,
//! size, ctime and a hash of its FIEMAP extent list.
//!
//! It maps images made by a file system freezer (`fsflush`, `reflink`),
//! which names it as the image's mapper.
//!
//! For an image whose freezer holds writes while it is mapped (`fsflush`)
//! it watches the writes queued on the file system's device from the map
//! on ([`floe_hostfs::watch`]) and, after the thaw, vouches for the map
//! until one reaches a mapped extent (`Mapper::untouched`): checks are
//! then answered without looking at a file. `--plugin-opt
//! fiemap.watch_writes=false` turns the watch off.

/// mimalloc instead of glibc's malloc inside this plugin too (a cdylib has
/// its own allocator; values crossing the ABI carry theirs): mapping
/// allocates per file (ids, paths, metadata, JSON), and glibc's
/// malloc/free were a tenth of the agent's CPU after `floe` itself moved
/// to mimalloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use floe_core::error::Result;
use floe_hostfs::identity::{fs_device, mount_of};
use floe_hostfs::mapper::{check_mapper, SourceHandle, Translate};

fn translator(h: &SourceHandle) -> Result<Box<dyn Translate>> {
    // btrfs's FIEMAP gives its logical addresses, not device offsets.
    check_mapper(h, "fiemap")?;
    let (_, _, dev) = mount_of(&h.frozen)?;
    Ok(Box::new(fs_device(dev)?))
}

floe_hostfs::file_mapper_plugin!(FiemapPlugin, "fiemap", translator);
