//! The domain model: devices, extents and their chains, image maps, config
//! ids, remaps, frozen images, and what a backup set records on media.
//!
//! Everything here is plain data (serde), shared by the agent, the mover,
//! the plugins and the wire protocol. Rules about it live in [`crate::map`].

use crate::units::{BlockSize, Blocks, Bytes, ItemOffset};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

macro_rules! id {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// A new id.
            pub fn new(s: impl Into<String>) -> Self {
                $name(s.into())
            }
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(&self.0)
            }
        }
    };
}

id!(
    /// A device's stable identity, never a path: a WWN (`naa.6001405…`), a
    /// file system or btrfs device UUID (`uuid:…`), or for tests a loop
    /// device's backing file (`file:…`).
    DeviceId
);
id!(
    /// One frozen image, unique on its agent.
    ImageId
);
id!(
    /// One item (volume, file) of an image, unique within it.
    ItemId
);
id!(
    /// A configuration identifier: opaque to the mover, equal as long as
    /// the item's map is valid. Any change of the map changes it.
    ConfigId
);
id!(
    /// A backup set on media.
    SetId
);

/// The layer an extent was mapped through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    /// A file's logical space.
    File,
    /// A file system's address space (e.g. btrfs logical addresses).
    Filesystem,
    /// A logical volume (LVM LV).
    LogicalVolume,
    /// An array's virtual volume or snapshot.
    Volume,
    /// A LUN or disk: the physical end of the chain.
    Lun,
}

/// One layer of an extent chain: where this extent sits in that layer's
/// address space.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// What kind of layer.
    pub kind: LayerKind,
    /// The object in that layer (volume name, LV name, file path).
    pub object: String,
    /// The byte offset within the object.
    pub offset: Bytes,
}

/// Where an extent's bytes are on a physical device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhysicalExtent {
    /// The device, by stable identity.
    pub device: DeviceId,
    /// The first block.
    pub start: Blocks,
    /// How many blocks.
    pub count: Blocks,
    /// The block size of `start` and `count`.
    pub block_size: BlockSize,
}

/// An extent mapped from the item's logical space down to a physical device,
/// with every layer it went through (logical first).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtentChain {
    /// The layers above the device, logical first (may be empty; left
    /// out of the JSON then).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<Layer>,
    /// The physical end of the chain.
    pub physical: PhysicalExtent,
}

/// What an extent of an item's logical space is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtentKind {
    /// Bytes to read from a device.
    Data(ExtentChain),
    /// Unallocated: reads as zeros, stored sparse.
    Hole,
    /// Allocated but known to read as zeros (unwritten/preallocated).
    Zero,
    /// Bytes carried in the map itself (tiny, inline or encoded data).
    Inline(Vec<u8>),
}

/// One extent of an item: a range of its logical space and what it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapExtent {
    /// Where in the item it starts.
    pub logical: ItemOffset,
    /// Its length.
    pub length: Bytes,
    /// What it is.
    pub kind: ExtentKind,
}

impl MapExtent {
    /// The logical end (exclusive); `None` on overflow.
    pub fn end(&self) -> Option<u64> {
        self.logical.0.checked_add(self.length.0)
    }
}

/// What kind of thing an item is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemKind {
    /// A volume: a linear byte space.
    Volume,
    /// A regular file.
    File,
    /// A directory (no bytes; its metadata).
    Directory,
    /// A symbolic link (no bytes; [`FileMeta::target`]).
    Symlink,
    /// A further name of a file backed up under another path
    /// ([`FileMeta::target`], relative to the source root).
    HardLink,
    /// A named pipe.
    Fifo,
    /// A character device node ([`FileMeta::rdev`]).
    CharDevice,
    /// A block device node ([`FileMeta::rdev`]).
    BlockDevice,
}

impl ItemKind {
    /// Does an item of this kind carry bytes?
    pub fn has_bytes(self) -> bool {
        matches!(self, ItemKind::Volume | ItemKind::File)
    }

    /// The kind's name in the catalog, in listings and in the tar
    /// keyword `FLOE.kind`: its variant's name in lower case (`hardlink`,
    /// `chardevice`), without a formatter per item.
    pub fn name(self) -> &'static str {
        match self {
            ItemKind::Volume => "volume",
            ItemKind::File => "file",
            ItemKind::Directory => "directory",
            ItemKind::Symlink => "symlink",
            ItemKind::HardLink => "hardlink",
            ItemKind::Fifo => "fifo",
            ItemKind::CharDevice => "chardevice",
            ItemKind::BlockDevice => "blockdevice",
        }
    }
}

/// A point in time: seconds and nanoseconds since the epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    /// Seconds since the epoch (negative before it).
    pub sec: i64,
    /// Nanoseconds within the second.
    pub nsec: u32,
}

/// What a file system says about a file, beyond its bytes: everything a
/// restore to a directory needs to make the file again.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    /// The source root the item was found under (`/srv/data`).
    pub root: String,
    /// The path relative to the root, `/`-separated; `.` is the root itself.
    pub path: String,
    /// Permission and type bits (`st_mode`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Last access.
    pub atime: Timestamp,
    /// Last modification.
    pub mtime: Timestamp,
    /// Last status change (recorded, not restorable).
    pub ctime: Timestamp,
    /// The device number of a device node.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rdev: u64,
    /// A symlink's target, or a hard link's first path (relative to root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Extended attributes (ACLs are `system.posix_acl_*`), values in hex.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    /// Holes: `[offset, length]` ranges that read as zeros and were not
    /// allocated, so a restore can leave them sparse.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holes: Vec<[u64; 2]>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// An item that could not be backed up, and why. A set with failures is
/// committed as *partial*: what it holds is sound, what it lacks is listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemFailure {
    /// The item (or the path, when no item could be made of it).
    pub item: ItemId,
    /// What went wrong, as the error said it.
    pub error: String,
}

/// One item of an image map: its identity, metadata, config id and extents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// Unique within the image.
    pub id: ItemId,
    /// Volume or file.
    pub kind: ItemKind,
    /// The logical size.
    pub size: Bytes,
    /// The config id this map is valid for.
    pub config: ConfigId,
    /// Extents covering `[0, size)` in order, without gaps or overlaps.
    pub extents: Vec<MapExtent>,
    /// Metadata (origin volume, snapshot name, ...); left out of the JSON
    /// when empty (a file's is).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    /// A file's metadata (file system sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileMeta>,
}

/// The logical representation of a frozen image: every item and its map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMap {
    /// The frozen image this maps.
    pub image: ImageId,
    /// Its items.
    pub items: Vec<Item>,
    /// What the mapper found and could not map (a file that vanished, a
    /// file system it does not support): each becomes a failure of the set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<ItemFailure>,
}

/// One part of an image's map, for a mover that starts reading before the
/// whole image is mapped ([`crate::abi::Mapper::map_part`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapPart {
    /// False on the last part. (First: whoever hands a part on as JSON
    /// reads it from the first bytes, without scanning the map.)
    pub more: bool,
    /// The items and failures of this part (never repeated in another).
    pub map: ImageMap,
}

/// The agent's answer to "what changed since config id X": the new config
/// id and extents for only the logical ranges whose mapping changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remap {
    /// The item.
    pub item: ItemId,
    /// The config id the updated map is valid for.
    pub config: ConfigId,
    /// Extents for the changed ranges only, sorted, non-overlapping.
    pub extents: Vec<MapExtent>,
    /// True when the item's content changed after the frozen point and the
    /// freezer kept no copy of the old version (flush-only freezers): the
    /// extents then cover the whole newer version, which the mover reads
    /// whole and records as captured after the freeze.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub after_freeze: bool,
    /// Set when the item is replaced whole (its size changed, or the
    /// freezer kept no old version): the new size, and `extents` then
    /// cover `[0, size)` exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Bytes>,
    /// The item's metadata as of the new version, when replaced whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileMeta>,
}

/// One item of a frozen image, as the freezer made it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrozenItem {
    /// The item id used in the map.
    pub id: ItemId,
    /// The source it came from (`array:vol0`).
    pub source: String,
    /// Plugin-private data (snapshot name, ...).
    #[serde(default)]
    pub handle: serde_json::Value,
}

/// A frozen image: the point-in-time copy of the sources, until released.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrozenImage {
    /// Unique on its agent.
    pub id: ImageId,
    /// The plugin that froze it.
    pub plugin: String,
    /// Its items.
    pub items: Vec<FrozenItem>,
    /// When it was frozen (seconds since the epoch).
    pub frozen_at: u64,
    /// The plugin that maps (and validates) this image, when it is not the
    /// freezer itself (`fsflush` freezes, `fiemap` or `btrfs` maps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapper: Option<String>,
    /// The freezer holds every write to what it froze from before the map
    /// until `Freezer::mapped` (FIFREEZE): nothing read in that window can
    /// have changed since it was mapped, so its checks need no look.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub writes_held: bool,
}

/// Where an item sits on media.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaPosition {
    /// The medium (directory, cartridge label).
    pub medium: String,
    /// Where on it (file name, tape file number and block).
    pub locator: String,
}

/// What a backup set says about itself before its items.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetHeader {
    /// The set.
    pub set: SetId,
    /// A label the operator chose.
    pub label: String,
    /// The agent (host) the data came from.
    pub agent: String,
    /// The sources backed up.
    pub sources: Vec<String>,
    /// The frozen image read.
    pub image: ImageId,
    /// When the image was frozen.
    pub frozen_at: u64,
    /// When the mover started.
    pub started_at: u64,
}

/// What an item says about itself before its bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemHeader {
    /// The item.
    pub item: ItemId,
    /// Volume or file.
    pub kind: ItemKind,
    /// The logical size.
    pub size: Bytes,
    /// The config id at the start of the backup.
    pub config: ConfigId,
    /// Metadata from the map.
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    /// A file's metadata, from the map.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileMeta>,
    /// A volume's holes (`[offset, length]`, sorted, apart): ranges its map
    /// says hold no data (unallocated blocks), so media may store it
    /// sparse. A file's holes are in its `file` metadata.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holes: Vec<[u64; 2]>,
}

impl ItemHeader {
    /// The item's holes: a file's (from its metadata) or a volume's.
    pub fn holes(&self) -> &[[u64; 2]] {
        match (&self.kind, &self.file) {
            (ItemKind::File, Some(f)) => &f.holes,
            (ItemKind::Volume, _) => &self.holes,
            _ => &[],
        }
    }
}

/// What the mover knows about an item after its bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemTrailer {
    /// Bytes written.
    pub length: Bytes,
    /// BLAKE3 of the bytes, hex.
    pub blake3: String,
    /// The config id the last portion was verified against.
    pub config: ConfigId,
    /// How many remaps the mover applied.
    pub remaps: u32,
    /// True when the bytes are of a version later than the frozen point
    /// (the freezer could not keep the old version).
    pub captured_after_freeze: bool,
}

/// One item of a committed set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemRecord {
    /// Before the bytes.
    pub header: ItemHeader,
    /// After the bytes.
    pub trailer: ItemTrailer,
    /// Where the bytes are.
    pub position: MediaPosition,
}

/// A set as committed on media.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetRecord {
    /// The header.
    pub header: SetHeader,
    /// Every item, in the order written.
    pub items: Vec<ItemRecord>,
    /// Items that could not be backed up; a set with any is partial.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<ItemFailure>,
    /// When the commit happened.
    pub committed_at: u64,
}

impl SetRecord {
    /// Add a failure, once per item (a resumed set may meet it again).
    pub fn fail(&mut self, failure: &ItemFailure) {
        if !self.failures.iter().any(|f| f.item == failure.item) {
            self.failures.push(failure.clone());
        }
    }
}

/// What media say when they commit a set. The mover keeps the set's
/// record itself (every header it began, trailer it ended and position
/// media answered), so a set of 70,000 items is not sent back across the
/// plugin boundary; media add only what the mover cannot know.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    /// When the commit happened (the record's `committed_at`).
    pub committed_at: u64,
    /// Items in the committed set (resumed ones included): the mover
    /// checks it against its own count.
    pub items: u64,
    /// Where each item ended up, in the set's order, when media placed
    /// them elsewhere than `end_item` said (tape: cartridge, tape file
    /// and record, known only once the archive is on tape); empty when
    /// every item is where `end_item` said.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub positions: Vec<MediaPosition>,
}

impl Committed {
    /// A commit of `record` as built, at its `committed_at`.
    pub fn of(record: &SetRecord) -> Committed {
        Committed {
            committed_at: record.committed_at,
            items: record.items.len() as u64,
            positions: Vec::new(),
        }
    }
}

/// Where an item's bytes are, as its record says: what media need to go
/// straight there (a tree restore opens 70,000 items; each would otherwise
/// be looked up in the media's own index and its whole record sent back).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemAt {
    /// The item.
    pub item: ItemId,
    /// Its kind.
    pub kind: ItemKind,
    /// Its logical size.
    pub size: Bytes,
    /// Where media put it.
    pub position: MediaPosition,
    /// Its holes (a file's or a volume's; sparse media store them so).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holes: Vec<[u64; 2]>,
}

impl ItemAt {
    /// Where `record` says its item is.
    pub fn of(record: &ItemRecord) -> ItemAt {
        ItemAt {
            item: record.header.item.clone(),
            kind: record.header.kind,
            size: record.header.size,
            position: record.position.clone(),
            holes: record.header.holes().to_vec(),
        }
    }
}

/// Seconds since the epoch, now.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_are_the_variants_in_lower_case_as_catalogs_and_archives_hold_them() {
        for k in [
            ItemKind::Volume,
            ItemKind::File,
            ItemKind::Directory,
            ItemKind::Symlink,
            ItemKind::HardLink,
            ItemKind::Fifo,
            ItemKind::CharDevice,
            ItemKind::BlockDevice,
        ] {
            assert_eq!(k.name(), format!("{k:?}").to_lowercase());
        }
    }
}
