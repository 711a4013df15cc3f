//! Floe plugin `fiemap`: maps files on ext4 and XFS (and any file system
//! whose FIEMAP gives device offsets) to extents of the disk the file
//! system is on, through a partition's offset, identified by WWN, serial
//! or (loop devices) backing file. Validity per file: inode, generation,
//! size, ctime and a hash of its FIEMAP extent list.
//!
//! It maps images made by a file system freezer (`fsflush`, `reflink`),
//! which names it as the image's mapper.

use floe_core::abi::{Interface, Mapper, Plugin, PluginInfo, ValidityIndicator};
use floe_core::error::Result;
use floe_hostfs::identity::{fs_device, mount_of};
use floe_hostfs::mapper::{check_mapper, FileMapper, FileValidity, SourceHandle, Translate};

/// The plugin.
pub struct FiemapPlugin;

fn translator(h: &SourceHandle) -> Result<Box<dyn Translate>> {
    // btrfs's FIEMAP gives its logical addresses, not device offsets.
    check_mapper(h, "fiemap")?;
    let (_, _, dev) = mount_of(&h.frozen)?;
    Ok(Box::new(fs_device(dev)?))
}

impl Plugin for FiemapPlugin {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "fiemap".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            interfaces: vec![Interface::Mapper, Interface::Validity],
        }
    }
    fn mapper(_config: &serde_json::Value) -> Result<Box<dyn Mapper>> {
        Ok(Box::new(FileMapper::new(translator)))
    }
    fn validity(_config: &serde_json::Value) -> Result<Box<dyn ValidityIndicator>> {
        Ok(Box::new(FileValidity::new(translator)))
    }
}

floe_core::export_plugin!(FiemapPlugin);
