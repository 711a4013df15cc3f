//! The plugin ABI.
//!
//! Plugins are `cdylib` crates that implement the native traits below
//! ([`Freezer`], [`Mapper`], [`ValidityIndicator`], [`MediaWriter`],
//! [`MediaReader`]) and export them with [`export_plugin!`](crate::export_plugin).
//! Between the engine and a plugin only `abi_stable` types travel: each
//! trait has a small `#[sabi_trait]` twin whose methods take and return
//! JSON text (the serde form of [`crate::model`]) and byte slices, so the
//! binary surface stays small and the data model can grow compatibly.
//!
//! Versioning: [`ABI_VERSION`] is bumped on any incompatible change of the
//! traits or the JSON they carry. Every plugin exports it twice: as the plain
//! C symbol `floe_plugin_abi_version` (read with libloading before anything
//! else is trusted) and in its root module. abi_stable also checks the type
//! layout of the root module when it loads.

#![allow(non_local_definitions)] // the code #[sabi_trait] generates

use crate::error::{Error, ErrorKind, Result, WireError};
use crate::model::{
    Committed, ConfigId, FrozenImage, ImageMap, ItemAt, ItemFailure, ItemHeader, ItemId,
    ItemRecord, ItemTrailer, MapPart, MediaPosition, Remap, SetHeader, SetId, SetRecord,
};
use abi_stable::library::RootModule;
use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{RBox, RErr, ROk, RResult, RSlice, RStr, RString, RVec};
use abi_stable::{declare_root_module_statics, package_version_strings, sabi_trait, StableAbi};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The Floe plugin ABI version this build implements.
pub const ABI_VERSION: u32 = 8;

/// The C symbol every plugin exports with its ABI version.
pub const ABI_VERSION_SYMBOL: &[u8] = b"floe_plugin_abi_version\0";

// ---------------------------------------------------------------------------
// Native traits: what plugin authors implement and the engine calls.

/// Makes a frozen image of sources (array snapshot, FIFREEZE, ...).
pub trait Freezer: Send {
    /// Freeze these sources into one consistent image.
    fn freeze(&mut self, sources: &[String]) -> Result<FrozenImage>;
    /// The image is mapped: a freezer that holds writes only while the map
    /// is captured (FIFREEZE) lets them go now. Called once, after `map`,
    /// whether the map succeeded or not.
    fn mapped(&mut self, _image: &FrozenImage) -> Result<()> {
        Ok(())
    }
    /// Let the image go (delete snapshots, thaw).
    fn release(&mut self, image: &FrozenImage) -> Result<()>;
    /// Are writes to the image held right now, without a break since the
    /// freeze? Asked after [`Freezer::mapped`] and then for each config
    /// check: while true, everything read so far is as mapped and checks
    /// are answered without a look. A freezer must answer false once its
    /// hold may have ended (a bound ran out, someone thawed), and keep
    /// answering false. Must not block. Default: no.
    fn writes_held(&mut self, _image: &FrozenImage) -> Result<bool> {
        Ok(false)
    }
}

/// Maps a frozen image to physical extents.
pub trait Mapper: Send {
    /// The whole map.
    fn map(&mut self, image: &FrozenImage) -> Result<ImageMap>;
    /// Only the extents of `item` that changed since `since`.
    fn remap(&mut self, image: &FrozenImage, item: &ItemId, since: &ConfigId) -> Result<Remap>;
    /// The map in parts, so the mover reads the first items while the
    /// rest are mapped: each call gives the next items and failures, `more`
    /// false on the last; not called again after it. Default: the whole
    /// map in one part.
    fn map_part(&mut self, image: &FrozenImage) -> Result<MapPart> {
        Ok(MapPart {
            map: self.map(image)?,
            more: false,
        })
    }
    /// [`Mapper::map_part`] as it came: decoded, or, when it crossed a
    /// plugin boundary, the JSON the plugin wrote (the agent hands those
    /// bytes on to the mover, which decodes and checks every item before
    /// it uses one, instead of decoding and encoding the part again).
    /// Default: decoded.
    fn map_part_raw(&mut self, image: &FrozenImage) -> Result<PartFromPlugin> {
        Ok(PartFromPlugin::Part(self.map_part(image)?))
    }
    /// Does every extent of the whole map still hold what it held when it
    /// was mapped, as far as this mapper saw — no write submitted to a
    /// mapped extent since the map began (it began while the freezer held
    /// writes, so none was in flight)? Asked after the reads it covers,
    /// once the whole map is made, when the freezer no longer holds
    /// writes: while true, checks are answered without a look. Must
    /// answer false once it may have missed a write, and keep answering
    /// false. Must not block. Default: no.
    fn untouched(&mut self, _image: &FrozenImage) -> Result<bool> {
        Ok(false)
    }
    /// Once [`Mapper::untouched`] said no: for each of `items`, may a
    /// write have reached one of its mapped extents since the map (true),
    /// as far as this mapper saw? An item it answers false for reads as
    /// mapped: its check is answered without a look. `None` once it may
    /// have missed a write (then every item is looked at). Must not
    /// block. Default: `None`.
    fn touched(&mut self, _image: &FrozenImage, _items: &[ItemId]) -> Result<Option<Vec<bool>>> {
        Ok(None)
    }
}

/// A part of a map as a mapper gave it.
#[derive(Debug)]
pub enum PartFromPlugin {
    /// Decoded.
    Part(MapPart),
    /// The JSON a plugin wrote (an object with `more` and `map`), not
    /// decoded: only its `more` was read. Kept in the plugin's own buffer
    /// (freed by the plugin's allocator), not copied into the engine's.
    Json {
        /// The part's JSON.
        json: RString,
        /// More parts follow.
        more: bool,
    },
}

impl PartFromPlugin {
    /// More parts follow.
    pub fn more(&self) -> bool {
        match self {
            PartFromPlugin::Part(p) => p.more,
            PartFromPlugin::Json { more, .. } => *more,
        }
    }

    /// The part, decoded.
    pub fn decode(self) -> Result<MapPart> {
        match self {
            PartFromPlugin::Part(p) => Ok(p),
            PartFromPlugin::Json { json, .. } => from_json(&json, "map part"),
        }
    }
}

/// Refuse a config key the plugin does not know (a misspelt or misplaced
/// `--media-opt` must not be ignored: `compress=zstd` given to media that
/// do not compress would otherwise write a set the user did not ask for).
/// `what` names the plugin, `keys` are the ones it takes.
pub fn known_options(config: &serde_json::Value, what: &str, keys: &[&str]) -> Result<()> {
    let Some(map) = config.as_object() else {
        return Ok(());
    };
    match map.keys().find(|k| !keys.contains(&k.as_str())) {
        None => Ok(()),
        Some(k) => Err(Error::new(
            ErrorKind::Config,
            format!("{what} has no option {k:?} (it takes: {})", keys.join(", ")),
        )),
    }
}

/// A plugin's true/false option `key` in its config (JSON `true`/`false`
/// or the strings `--plugin-opt` gives); `None` when absent. Anything else
/// is a config error naming it as `label` and what was given.
pub fn flag_option(config: &serde_json::Value, key: &str, label: &str) -> Result<Option<bool>> {
    config
        .get(key)
        .map(|v| {
            v.as_bool()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::Config,
                        format!("{label} must be true or false, got {v}"),
                    )
                })
        })
        .transpose()
}

/// The `more` of a map part's JSON written with `more` first — as serde
/// writes a [`MapPart`] (`{"more":BOOL,…`) or as the `map_part` message
/// that carries it (`{"type":"map_part","more":BOOL,…`) — without reading
/// the megabytes after it; `None` for JSON written otherwise (then it is
/// parsed).
pub fn more_first(json: &str) -> Option<bool> {
    let fields = json
        .strip_prefix(crate::protocol::MAP_PART_OPEN)
        .or_else(|| json.strip_prefix('{'))?;
    let rest = fields.strip_prefix(r#""more":"#)?;
    if rest.starts_with("true,") {
        Some(true)
    } else if rest.starts_with("false,") {
        Some(false)
    } else {
        None
    }
}

/// Says whether an item's map is still valid.
pub trait ValidityIndicator: Send {
    /// The item's current config id.
    fn config_id(&mut self, image: &FrozenImage, item: &ItemId) -> Result<ConfigId>;
    /// The current config ids of several items, in order (one call for a
    /// batch of small files).
    fn config_ids(&mut self, image: &FrozenImage, items: &[ItemId]) -> Result<Vec<ConfigId>> {
        items.iter().map(|i| self.config_id(image, i)).collect()
    }
}

/// Writes backup sets to media.
pub trait MediaWriter: Send {
    /// Start a set.
    fn begin_set(&mut self, header: &SetHeader) -> Result<()>;
    /// Reopen a set that was begun and not committed (its writer died):
    /// its header and the items that are durable on the media. Writing
    /// continues with the next item.
    fn resume_set(&mut self, set: &SetId) -> Result<SetRecord>;
    /// Start an item of the set.
    fn begin_item(&mut self, header: &ItemHeader) -> Result<()>;
    /// [`MediaWriter::begin_item`] with the header owned and the JSON it
    /// crossed the plugin boundary as (`json` decodes to `header`; serde's
    /// compact form of it): media that store the header's JSON (the tar
    /// index, item by item) keep it instead of encoding the header again.
    /// Default: `begin_item`.
    fn begin_item_from(&mut self, header: ItemHeader, json: &str) -> Result<()> {
        let _ = json;
        self.begin_item(&header)
    }
    /// Append bytes to the current item.
    fn write(&mut self, data: &[u8]) -> Result<()>;
    /// Finish the current item; where it landed.
    fn end_item(&mut self, trailer: &ItemTrailer) -> Result<MediaPosition>;
    /// Record that an item could not be backed up; the committed set lists
    /// it among its failures (and is partial). Not inside an item.
    fn fail_item(&mut self, failure: &ItemFailure) -> Result<()>;
    /// Make the set durable and visible; only now is it complete. The
    /// set's record is the mover's (what it began and ended, and the
    /// positions `end_item` answered); media say when, how many items,
    /// and any positions that changed.
    fn commit(&mut self) -> Result<Committed>;
    /// Throw the set away; nothing of it may look complete.
    fn abort(&mut self) -> Result<()>;
    /// Remove a committed set from the media (retention). It disappears
    /// at once as a whole, or not at all.
    fn delete_set(&mut self, set: &SetId) -> Result<()>;
    /// Retention forgot `forgotten`: free every medium that holds only
    /// forgotten sets (tape: write a cartridge's label again, which ends
    /// its data), never one that holds a set still kept. The media freed
    /// (or that would be, with `dry_run`). Default: nothing to free
    /// (media that delete sets one by one).
    fn recycle(&mut self, _forgotten: &[SetId], _dry_run: bool) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
}

/// Reads backup sets from media.
pub trait MediaReader: Send {
    /// Every committed set on the media.
    fn list_sets(&mut self) -> Result<Vec<SetRecord>>;
    /// Position at the start of an item's bytes.
    fn open_item(&mut self, set: &SetId, item: &ItemId) -> Result<ItemRecord>;
    /// Position at the start of an item's bytes where its record (the
    /// catalog's, or the set's index read before) says they are, without
    /// looking it up. Bytes read from a wrong place fail the item's
    /// checksum: nothing wrong is restored silently. Default: look it up
    /// ([`MediaReader::open_item`]).
    fn open_at(&mut self, set: &SetId, at: &ItemAt) -> Result<()> {
        self.open_item(set, &at.item).map(|_| ())
    }
    /// The next bytes of the open item, at most `max`; empty at its end.
    fn read(&mut self, max: usize) -> Result<Vec<u8>>;
    /// [`MediaReader::read`], the bytes left where they were made: a
    /// plugin's buffer is not copied into one of the host's (a tree
    /// restore reads 1.5 GB this way; the copy was a tenth of its user
    /// CPU).
    fn read_chunk(&mut self, max: usize) -> Result<Chunk> {
        self.read(max).map(Chunk::Host)
    }
}

/// Bytes read from media: the host's, or a plugin's buffer handed over
/// as it is (freed by the plugin's allocator, whose vtable it carries).
#[derive(Debug)]
pub enum Chunk {
    /// Allocated here.
    Host(Vec<u8>),
    /// Allocated by a plugin.
    Plugin(RVec<u8>),
}

impl std::ops::Deref for Chunk {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Chunk::Host(v) => v,
            Chunk::Plugin(v) => v,
        }
    }
}

/// One interface a plugin provides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interface {
    /// [`Freezer`].
    Freezer,
    /// [`Mapper`].
    Mapper,
    /// [`ValidityIndicator`].
    Validity,
    /// [`MediaWriter`].
    MediaWriter,
    /// [`MediaReader`].
    MediaReader,
}

/// What a plugin says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginInfo {
    /// Its name (`array`, `disk`).
    pub name: String,
    /// Its own version.
    pub version: String,
    /// What it provides.
    pub interfaces: Vec<Interface>,
    /// Its media are read by one reader at a time, in order (tape): a
    /// restore opens one reader, not several in parallel.
    #[serde(default)]
    pub sequential_media: bool,
    /// Its media writer needs items in path order (it builds directory
    /// trees as they come, like restic): the mover writes them so.
    #[serde(default)]
    pub path_order: bool,
}

/// A plugin: its name and constructors. `config` is the JSON object of
/// options the operator gave for this plugin.
pub trait Plugin {
    /// What it is.
    fn info() -> PluginInfo;
    /// A freezer, if provided.
    fn freezer(_config: &serde_json::Value) -> Result<Box<dyn Freezer>> {
        Err(not_provided(Interface::Freezer))
    }
    /// A mapper, if provided.
    fn mapper(_config: &serde_json::Value) -> Result<Box<dyn Mapper>> {
        Err(not_provided(Interface::Mapper))
    }
    /// A validity indicator, if provided.
    fn validity(_config: &serde_json::Value) -> Result<Box<dyn ValidityIndicator>> {
        Err(not_provided(Interface::Validity))
    }
    /// A media writer, if provided.
    fn media_writer(_config: &serde_json::Value) -> Result<Box<dyn MediaWriter>> {
        Err(not_provided(Interface::MediaWriter))
    }
    /// A media reader, if provided.
    fn media_reader(_config: &serde_json::Value) -> Result<Box<dyn MediaReader>> {
        Err(not_provided(Interface::MediaReader))
    }
}

fn not_provided(i: Interface) -> Error {
    Error::new(ErrorKind::Plugin, format!("this plugin provides no {i:?}"))
}

// ---------------------------------------------------------------------------
// The stable twins.

/// ABI twin of [`Freezer`].
#[sabi_trait]
pub trait FreezerAbi: Send {
    /// JSON `[String]` → JSON [`FrozenImage`].
    fn freeze(&mut self, sources: RStr<'_>) -> RResult<RString, RString>;
    /// JSON [`FrozenImage`]: the map is captured.
    fn mapped(&mut self, image: RStr<'_>) -> RResult<(), RString>;
    /// JSON [`FrozenImage`].
    #[sabi(last_prefix_field)]
    fn release(&mut self, image: RStr<'_>) -> RResult<(), RString>;
    /// JSON [`FrozenImage`] → are writes held? Added after ABI 6's first
    /// release: a plugin built before it has no such method, and this
    /// default answers for it (writes not held).
    fn writes_held(&mut self, _image: RStr<'_>) -> RResult<bool, RString> {
        ROk(false)
    }
}

/// ABI twin of [`Mapper`].
#[sabi_trait]
pub trait MapperAbi: Send {
    /// JSON [`FrozenImage`] → JSON [`ImageMap`].
    fn map(&mut self, image: RStr<'_>) -> RResult<RString, RString>;
    /// JSON `[FrozenImage, ItemId, ConfigId]` → JSON [`Remap`].
    fn remap(&mut self, args: RStr<'_>) -> RResult<RString, RString>;
    /// JSON [`FrozenImage`] → JSON [`MapPart`].
    #[sabi(last_prefix_field)]
    fn map_part(&mut self, image: RStr<'_>) -> RResult<RString, RString>;
    /// JSON [`FrozenImage`] → untouched since the map? (ABI 8.)
    fn untouched(&mut self, _image: RStr<'_>) -> RResult<bool, RString> {
        ROk(false)
    }
    /// JSON `[FrozenImage, [ItemId]]` → JSON `[bool]` or `null`. (ABI 8.)
    fn touched(&mut self, _args: RStr<'_>) -> RResult<RString, RString> {
        ROk(RString::from("null"))
    }
}

/// ABI twin of [`ValidityIndicator`].
#[sabi_trait]
pub trait ValidityAbi: Send {
    /// JSON `[FrozenImage, ItemId]` → JSON [`ConfigId`].
    fn config_id(&mut self, args: RStr<'_>) -> RResult<RString, RString>;
    /// JSON `[FrozenImage, [ItemId]]` → JSON `[ConfigId]`.
    #[sabi(last_prefix_field)]
    fn config_ids(&mut self, args: RStr<'_>) -> RResult<RString, RString>;
}

/// ABI twin of [`MediaWriter`].
#[sabi_trait]
pub trait MediaWriterAbi: Send {
    /// JSON [`SetHeader`].
    fn begin_set(&mut self, header: RStr<'_>) -> RResult<(), RString>;
    /// JSON [`SetId`] → JSON [`SetRecord`] (durable items so far).
    fn resume_set(&mut self, set: RStr<'_>) -> RResult<RString, RString>;
    /// JSON [`ItemHeader`].
    fn begin_item(&mut self, header: RStr<'_>) -> RResult<(), RString>;
    /// Raw bytes.
    fn write(&mut self, data: RSlice<'_, u8>) -> RResult<(), RString>;
    /// JSON [`ItemTrailer`] → JSON [`MediaPosition`].
    fn end_item(&mut self, trailer: RStr<'_>) -> RResult<RString, RString>;
    /// JSON [`ItemFailure`].
    fn fail_item(&mut self, failure: RStr<'_>) -> RResult<(), RString>;
    /// → JSON [`Committed`].
    fn commit(&mut self) -> RResult<RString, RString>;
    /// Throw the set away.
    fn abort(&mut self) -> RResult<(), RString>;
    /// JSON [`SetId`]: remove a committed set.
    fn delete_set(&mut self, set: RStr<'_>) -> RResult<(), RString>;
    /// JSON `[[SetId], bool]` → JSON `[String]`: media freed.
    #[sabi(last_prefix_field)]
    fn recycle(&mut self, args: RStr<'_>) -> RResult<RString, RString>;
}

/// ABI twin of [`MediaReader`].
#[sabi_trait]
pub trait MediaReaderAbi: Send {
    /// → JSON `[SetRecord]`.
    fn list_sets(&mut self) -> RResult<RString, RString>;
    /// JSON `[SetId, ItemId]` → JSON [`ItemRecord`].
    fn open_item(&mut self, args: RStr<'_>) -> RResult<RString, RString>;
    /// Next bytes, at most `max`.
    fn read(&mut self, max: u64) -> RResult<RVec<u8>, RString>;
    /// JSON `[SetId, ItemAt]`.
    #[sabi(last_prefix_field)]
    fn open_at(&mut self, args: RStr<'_>) -> RResult<(), RString>;
}

/// A boxed freezer across the ABI.
pub type FreezerBox = FreezerAbi_TO<'static, RBox<()>>;
/// A boxed mapper across the ABI.
pub type MapperBox = MapperAbi_TO<'static, RBox<()>>;
/// A boxed validity indicator across the ABI.
pub type ValidityBox = ValidityAbi_TO<'static, RBox<()>>;
/// A boxed media writer across the ABI.
pub type MediaWriterBox = MediaWriterAbi_TO<'static, RBox<()>>;
/// A boxed media reader across the ABI.
pub type MediaReaderBox = MediaReaderAbi_TO<'static, RBox<()>>;

/// The root module every plugin exports.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    /// [`ABI_VERSION`] of the core the plugin was built against.
    pub abi_version: extern "C" fn() -> u32,
    /// JSON [`PluginInfo`].
    pub info: extern "C" fn() -> RString,
    /// Make a freezer from a JSON config.
    pub new_freezer: extern "C" fn(RStr<'_>) -> RResult<FreezerBox, RString>,
    /// Make a mapper from a JSON config.
    pub new_mapper: extern "C" fn(RStr<'_>) -> RResult<MapperBox, RString>,
    /// Make a validity indicator from a JSON config.
    pub new_validity: extern "C" fn(RStr<'_>) -> RResult<ValidityBox, RString>,
    /// Make a media writer from a JSON config.
    pub new_media_writer: extern "C" fn(RStr<'_>) -> RResult<MediaWriterBox, RString>,
    /// Make a media reader from a JSON config.
    #[sabi(last_prefix_field)]
    pub new_media_reader: extern "C" fn(RStr<'_>) -> RResult<MediaReaderBox, RString>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "floe_plugin";
    const NAME: &'static str = "floe_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

// ---------------------------------------------------------------------------
// JSON marshalling shared by both sides.

fn err_text(e: &Error) -> RString {
    RString::from(serde_json::to_string(&e.to_wire()).unwrap_or_else(|_| e.to_string()))
}

fn err_from_text(plugin: &str, op: &str, text: &RString) -> Error {
    match serde_json::from_str::<WireError>(text.as_str()) {
        Ok(w) => Error::from(w),
        Err(_) => Error::new(
            ErrorKind::Plugin,
            format!("plugin {plugin} failed {op}: {text}"),
        ),
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v)
        .map_err(|e| Error::new(ErrorKind::Plugin, "cannot encode for the plugin ABI").source(e))
}

fn from_json<T: DeserializeOwned>(s: &str, what: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| {
        Error::new(
            ErrorKind::Plugin,
            format!("malformed {what} across the plugin ABI"),
        )
        .source(e)
    })
}

/// Run plugin code, turning errors and panics into ABI error text.
fn guard<T>(op: &str, f: impl FnOnce() -> Result<T>) -> RResult<T, RString> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => ROk(v),
        Ok(Err(e)) => RErr(err_text(&e)),
        Err(p) => {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_default();
            RErr(err_text(&Error::new(
                ErrorKind::Plugin,
                format!("plugin panicked during {op}: {what}"),
            )))
        }
    }
}

fn json_out<T: Serialize>(op: &str, f: impl FnOnce() -> Result<T>) -> RResult<RString, RString> {
    guard(op, || f().and_then(|v| to_json(&v)).map(RString::from))
}

// Plugin side: native object → ABI twin.

struct FreezerExport(Box<dyn Freezer>);
impl FreezerAbi for FreezerExport {
    fn freeze(&mut self, sources: RStr<'_>) -> RResult<RString, RString> {
        json_out("freeze", || {
            let s: Vec<String> = from_json(sources.as_str(), "sources")?;
            self.0.freeze(&s)
        })
    }
    fn mapped(&mut self, image: RStr<'_>) -> RResult<(), RString> {
        guard("mapped", || {
            self.0.mapped(&from_json(image.as_str(), "image")?)
        })
    }
    fn release(&mut self, image: RStr<'_>) -> RResult<(), RString> {
        guard("release", || {
            self.0.release(&from_json(image.as_str(), "image")?)
        })
    }
    fn writes_held(&mut self, image: RStr<'_>) -> RResult<bool, RString> {
        guard("writes_held", || {
            self.0.writes_held(&from_json(image.as_str(), "image")?)
        })
    }
}

struct MapperExport {
    mapper: Box<dyn Mapper>,
    /// Bytes of JSON per item of the last part, a little over: the next
    /// part's JSON is written into a buffer of that size, not grown into
    /// (each growth of a megabytes-long buffer is a copy, and fresh pages
    /// the kernel zeroes).
    bytes_per_item: usize,
}

impl MapperExport {
    /// JSON bytes per item before any part was written: above a typical
    /// file's item (~600 bytes).
    const FIRST_BYTES_PER_ITEM: usize = 768;
}

/// The most room [`part_json`] takes before writing.
const PART_ROOM_MAX: usize = 64 << 20;

/// `part` as JSON, into a buffer of `per_item` bytes per item: the
/// protocol's `map_part` message (its tag, then the part's fields as serde
/// writes them — `more` first), which the agent sends as it is. A
/// [`MapPart`] decoder takes it too (the tag is a field it ignores).
fn part_json(part: &MapPart, per_item: usize) -> Result<String> {
    let items = part.map.items.len() + part.map.failures.len();
    // At most 64 MiB up front: a part of one volume's map (a JSON of tens
    // of MB) must not make the next part of 4,096 files ask for as much
    // per item; past that, the buffer grows as it is written.
    let room = items
        .saturating_mul(per_item)
        .saturating_add(256)
        .min(PART_ROOM_MAX);
    let mut out = Vec::with_capacity(room);
    out.extend_from_slice(crate::protocol::MAP_PART_OPEN.as_bytes());
    out.extend_from_slice(if part.more {
        br#""more":true,"map":"#
    } else {
        br#""more":false,"map":"#
    });
    serde_json::to_writer(&mut out, &part.map)
        .map_err(|e| Error::new(ErrorKind::Plugin, "cannot encode for the plugin ABI").source(e))?;
    out.push(b'}');
    // serde_json writes UTF-8 only.
    String::from_utf8(out)
        .map_err(|e| Error::new(ErrorKind::Plugin, "cannot encode for the plugin ABI").source(e))
}

impl MapperAbi for MapperExport {
    fn map(&mut self, image: RStr<'_>) -> RResult<RString, RString> {
        json_out("map", || {
            self.mapper.map(&from_json(image.as_str(), "image")?)
        })
    }
    fn remap(&mut self, args: RStr<'_>) -> RResult<RString, RString> {
        json_out("remap", || {
            let (img, item, since): (FrozenImage, ItemId, ConfigId) =
                from_json(args.as_str(), "remap arguments")?;
            self.mapper.remap(&img, &item, &since)
        })
    }
    fn map_part(&mut self, image: RStr<'_>) -> RResult<RString, RString> {
        guard("map part", || {
            let part = self.mapper.map_part(&from_json(image.as_str(), "image")?)?;
            let json = part_json(&part, self.bytes_per_item)?;
            let items = part.map.items.len() + part.map.failures.len();
            if let Some(per) = json.len().checked_div(items) {
                self.bytes_per_item = per + per / 8;
            }
            Ok(RString::from(json))
        })
    }
    fn untouched(&mut self, image: RStr<'_>) -> RResult<bool, RString> {
        guard("untouched", || {
            self.mapper.untouched(&from_json(image.as_str(), "image")?)
        })
    }
    fn touched(&mut self, args: RStr<'_>) -> RResult<RString, RString> {
        json_out("touched", || {
            let (img, items): (FrozenImage, Vec<ItemId>) =
                from_json(args.as_str(), "touched arguments")?;
            self.mapper.touched(&img, &items)
        })
    }
}

struct ValidityExport(Box<dyn ValidityIndicator>);
impl ValidityAbi for ValidityExport {
    fn config_id(&mut self, args: RStr<'_>) -> RResult<RString, RString> {
        json_out("config id", || {
            let (img, item): (FrozenImage, ItemId) =
                from_json(args.as_str(), "config id arguments")?;
            self.0.config_id(&img, &item)
        })
    }
    fn config_ids(&mut self, args: RStr<'_>) -> RResult<RString, RString> {
        json_out("config ids", || {
            let (img, items): (FrozenImage, Vec<ItemId>) =
                from_json(args.as_str(), "config ids arguments")?;
            self.0.config_ids(&img, &items)
        })
    }
}

struct MediaWriterExport(Box<dyn MediaWriter>);
impl MediaWriterAbi for MediaWriterExport {
    fn begin_set(&mut self, header: RStr<'_>) -> RResult<(), RString> {
        guard("begin set", || {
            self.0.begin_set(&from_json(header.as_str(), "set header")?)
        })
    }
    fn resume_set(&mut self, set: RStr<'_>) -> RResult<RString, RString> {
        json_out("resume set", || {
            self.0.resume_set(&from_json(set.as_str(), "set id")?)
        })
    }
    fn begin_item(&mut self, header: RStr<'_>) -> RResult<(), RString> {
        guard("begin item", || {
            self.0
                .begin_item_from(from_json(header.as_str(), "item header")?, header.as_str())
        })
    }
    fn write(&mut self, data: RSlice<'_, u8>) -> RResult<(), RString> {
        guard("write", || self.0.write(data.as_slice()))
    }
    fn end_item(&mut self, trailer: RStr<'_>) -> RResult<RString, RString> {
        json_out("end item", || {
            self.0
                .end_item(&from_json(trailer.as_str(), "item trailer")?)
        })
    }
    fn fail_item(&mut self, failure: RStr<'_>) -> RResult<(), RString> {
        guard("fail item", || {
            self.0
                .fail_item(&from_json(failure.as_str(), "item failure")?)
        })
    }
    fn commit(&mut self) -> RResult<RString, RString> {
        json_out("commit", || self.0.commit())
    }
    fn abort(&mut self) -> RResult<(), RString> {
        guard("abort", || self.0.abort())
    }
    fn delete_set(&mut self, set: RStr<'_>) -> RResult<(), RString> {
        guard("delete set", || {
            self.0.delete_set(&from_json(set.as_str(), "set id")?)
        })
    }
    fn recycle(&mut self, args: RStr<'_>) -> RResult<RString, RString> {
        json_out("recycle", || {
            let (sets, dry_run): (Vec<SetId>, bool) =
                from_json(args.as_str(), "recycle arguments")?;
            self.0.recycle(&sets, dry_run)
        })
    }
}

struct MediaReaderExport(Box<dyn MediaReader>);
impl MediaReaderAbi for MediaReaderExport {
    fn list_sets(&mut self) -> RResult<RString, RString> {
        json_out("list sets", || self.0.list_sets())
    }
    fn open_item(&mut self, args: RStr<'_>) -> RResult<RString, RString> {
        json_out("open item", || {
            let (set, item): (SetId, ItemId) = from_json(args.as_str(), "open item arguments")?;
            self.0.open_item(&set, &item)
        })
    }
    fn read(&mut self, max: u64) -> RResult<RVec<u8>, RString> {
        guard("read", || {
            self.0
                .read(usize::try_from(max).unwrap_or(usize::MAX))
                .map(RVec::from)
        })
    }
    fn open_at(&mut self, args: RStr<'_>) -> RResult<(), RString> {
        guard("open item", || {
            let (set, at): (SetId, ItemAt) = from_json(args.as_str(), "open item arguments")?;
            self.0.open_at(&set, &at)
        })
    }
}

fn parse_config(config: RStr<'_>) -> Result<serde_json::Value> {
    if config.as_str().trim().is_empty() {
        return Ok(serde_json::Value::Object(Default::default()));
    }
    from_json(config.as_str(), "plugin config")
}

extern "C" fn abi_version_fn() -> u32 {
    ABI_VERSION
}
extern "C" fn info_fn<P: Plugin>() -> RString {
    RString::from(serde_json::to_string(&P::info()).unwrap_or_default())
}
extern "C" fn new_freezer_fn<P: Plugin>(c: RStr<'_>) -> RResult<FreezerBox, RString> {
    guard("new freezer", || {
        let f = P::freezer(&parse_config(c)?)?;
        Ok(FreezerAbi_TO::from_value(
            FreezerExport(f),
            sabi_trait::TD_Opaque,
        ))
    })
}
extern "C" fn new_mapper_fn<P: Plugin>(c: RStr<'_>) -> RResult<MapperBox, RString> {
    guard("new mapper", || {
        let m = P::mapper(&parse_config(c)?)?;
        Ok(MapperAbi_TO::from_value(
            MapperExport {
                mapper: m,
                bytes_per_item: MapperExport::FIRST_BYTES_PER_ITEM,
            },
            sabi_trait::TD_Opaque,
        ))
    })
}
extern "C" fn new_validity_fn<P: Plugin>(c: RStr<'_>) -> RResult<ValidityBox, RString> {
    guard("new validity indicator", || {
        let v = P::validity(&parse_config(c)?)?;
        Ok(ValidityAbi_TO::from_value(
            ValidityExport(v),
            sabi_trait::TD_Opaque,
        ))
    })
}
extern "C" fn new_media_writer_fn<P: Plugin>(c: RStr<'_>) -> RResult<MediaWriterBox, RString> {
    guard("new media writer", || {
        let w = P::media_writer(&parse_config(c)?)?;
        Ok(MediaWriterAbi_TO::from_value(
            MediaWriterExport(w),
            sabi_trait::TD_Opaque,
        ))
    })
}
extern "C" fn new_media_reader_fn<P: Plugin>(c: RStr<'_>) -> RResult<MediaReaderBox, RString> {
    guard("new media reader", || {
        let r = P::media_reader(&parse_config(c)?)?;
        Ok(MediaReaderAbi_TO::from_value(
            MediaReaderExport(r),
            sabi_trait::TD_Opaque,
        ))
    })
}

/// The root module for plugin `P` (used by [`export_plugin!`](crate::export_plugin)).
pub fn plugin_module<P: Plugin>() -> PluginModRef {
    PluginMod {
        abi_version: abi_version_fn,
        info: info_fn::<P>,
        new_freezer: new_freezer_fn::<P>,
        new_mapper: new_mapper_fn::<P>,
        new_validity: new_validity_fn::<P>,
        new_media_writer: new_media_writer_fn::<P>,
        new_media_reader: new_media_reader_fn::<P>,
    }
    .leak_into_prefix()
}

/// Export a [`Plugin`] from a `cdylib` crate.
///
/// ```ignore
/// struct Disk;
/// impl floe_core::abi::Plugin for Disk { /* ... */ }
/// floe_core::export_plugin!(Disk);
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        $crate::export_plugin!($plugin, abi_version = $crate::abi::ABI_VERSION);
    };
    ($plugin:ty, abi_version = $version:expr) => {
        /// The plugin's root module (abi_stable).
        #[::abi_stable::export_root_module]
        pub fn floe_plugin_root_module() -> $crate::abi::PluginModRef {
            $crate::abi::plugin_module::<$plugin>()
        }

        /// The Floe plugin ABI version this plugin was built against.
        #[no_mangle]
        pub extern "C" fn floe_plugin_abi_version() -> u32 {
            $version
        }
    };
}

// Engine side: ABI twin → native object.

/// A loaded plugin's freezer.
pub struct LoadedFreezer(pub(crate) String, pub(crate) FreezerBox);
/// A loaded plugin's mapper.
pub struct LoadedMapper(pub(crate) String, pub(crate) MapperBox);
/// A loaded plugin's validity indicator.
pub struct LoadedValidity(pub(crate) String, pub(crate) ValidityBox);
/// A loaded plugin's media writer.
pub struct LoadedMediaWriter(pub(crate) String, pub(crate) MediaWriterBox);
/// A loaded plugin's media reader.
pub struct LoadedMediaReader(pub(crate) String, pub(crate) MediaReaderBox);

fn back<T: DeserializeOwned>(plugin: &str, op: &str, r: RResult<RString, RString>) -> Result<T> {
    match r {
        ROk(s) => from_json(s.as_str(), op),
        RErr(e) => Err(err_from_text(plugin, op, &e)),
    }
}

fn back_unit(plugin: &str, op: &str, r: RResult<(), RString>) -> Result<()> {
    match r {
        ROk(()) => Ok(()),
        RErr(e) => Err(err_from_text(plugin, op, &e)),
    }
}

impl Freezer for LoadedFreezer {
    fn freeze(&mut self, sources: &[String]) -> Result<FrozenImage> {
        let r = self.1.freeze(to_json(&sources)?.as_str().into());
        back(&self.0, "freeze", r)
    }
    fn mapped(&mut self, image: &FrozenImage) -> Result<()> {
        let r = self.1.mapped(to_json(image)?.as_str().into());
        back_unit(&self.0, "mapped", r)
    }
    fn release(&mut self, image: &FrozenImage) -> Result<()> {
        let r = self.1.release(to_json(image)?.as_str().into());
        back_unit(&self.0, "release", r)
    }
    fn writes_held(&mut self, image: &FrozenImage) -> Result<bool> {
        match self.1.writes_held(to_json(image)?.as_str().into()) {
            ROk(held) => Ok(held),
            RErr(e) => Err(err_from_text(&self.0, "writes_held", &e)),
        }
    }
}

impl Mapper for LoadedMapper {
    fn map(&mut self, image: &FrozenImage) -> Result<ImageMap> {
        let r = self.1.map(to_json(image)?.as_str().into());
        back(&self.0, "map", r)
    }
    fn remap(&mut self, image: &FrozenImage, item: &ItemId, since: &ConfigId) -> Result<Remap> {
        let r = self
            .1
            .remap(to_json(&(image, item, since))?.as_str().into());
        back(&self.0, "remap", r)
    }
    fn map_part(&mut self, image: &FrozenImage) -> Result<MapPart> {
        self.map_part_raw(image)?.decode()
    }
    fn map_part_raw(&mut self, image: &FrozenImage) -> Result<PartFromPlugin> {
        /// Only the flag; the map is skipped over, not built.
        #[derive(Deserialize)]
        struct More {
            more: bool,
        }
        match self.1.map_part(to_json(image)?.as_str().into()) {
            ROk(json) => {
                let more = match more_first(&json) {
                    Some(more) => more,
                    None => from_json::<More>(&json, "map part")?.more,
                };
                Ok(PartFromPlugin::Json { json, more })
            }
            RErr(e) => Err(err_from_text(&self.0, "map part", &e)),
        }
    }
    fn untouched(&mut self, image: &FrozenImage) -> Result<bool> {
        match self.1.untouched(to_json(image)?.as_str().into()) {
            ROk(untouched) => Ok(untouched),
            RErr(e) => Err(err_from_text(&self.0, "untouched", &e)),
        }
    }
    fn touched(&mut self, image: &FrozenImage, items: &[ItemId]) -> Result<Option<Vec<bool>>> {
        let r = self.1.touched(to_json(&(image, items))?.as_str().into());
        back(&self.0, "touched", r)
    }
}

impl ValidityIndicator for LoadedValidity {
    fn config_id(&mut self, image: &FrozenImage, item: &ItemId) -> Result<ConfigId> {
        let r = self.1.config_id(to_json(&(image, item))?.as_str().into());
        back(&self.0, "config id", r)
    }
    fn config_ids(&mut self, image: &FrozenImage, items: &[ItemId]) -> Result<Vec<ConfigId>> {
        let r = self.1.config_ids(to_json(&(image, items))?.as_str().into());
        back(&self.0, "config ids", r)
    }
}

impl MediaWriter for LoadedMediaWriter {
    fn begin_set(&mut self, header: &SetHeader) -> Result<()> {
        let r = self.1.begin_set(to_json(header)?.as_str().into());
        back_unit(&self.0, "begin set", r)
    }
    fn resume_set(&mut self, set: &SetId) -> Result<SetRecord> {
        let r = self.1.resume_set(to_json(set)?.as_str().into());
        back(&self.0, "resume set", r)
    }
    fn begin_item(&mut self, header: &ItemHeader) -> Result<()> {
        let r = self.1.begin_item(to_json(header)?.as_str().into());
        back_unit(&self.0, "begin item", r)
    }
    fn write(&mut self, data: &[u8]) -> Result<()> {
        let r = self.1.write(RSlice::from_slice(data));
        back_unit(&self.0, "write", r)
    }
    fn end_item(&mut self, trailer: &ItemTrailer) -> Result<MediaPosition> {
        let r = self.1.end_item(to_json(trailer)?.as_str().into());
        back(&self.0, "end item", r)
    }
    fn fail_item(&mut self, failure: &ItemFailure) -> Result<()> {
        let r = self.1.fail_item(to_json(failure)?.as_str().into());
        back_unit(&self.0, "fail item", r)
    }
    fn commit(&mut self) -> Result<Committed> {
        let r = self.1.commit();
        back(&self.0, "commit", r)
    }
    fn abort(&mut self) -> Result<()> {
        let r = self.1.abort();
        back_unit(&self.0, "abort", r)
    }
    fn delete_set(&mut self, set: &SetId) -> Result<()> {
        let r = self.1.delete_set(to_json(set)?.as_str().into());
        back_unit(&self.0, "delete set", r)
    }
    fn recycle(&mut self, forgotten: &[SetId], dry_run: bool) -> Result<Vec<String>> {
        let r = self
            .1
            .recycle(to_json(&(forgotten, dry_run))?.as_str().into());
        back(&self.0, "recycle", r)
    }
}

impl MediaReader for LoadedMediaReader {
    fn list_sets(&mut self) -> Result<Vec<SetRecord>> {
        let r = self.1.list_sets();
        back(&self.0, "list sets", r)
    }
    fn open_item(&mut self, set: &SetId, item: &ItemId) -> Result<ItemRecord> {
        let r = self.1.open_item(to_json(&(set, item))?.as_str().into());
        back(&self.0, "open item", r)
    }
    fn read(&mut self, max: usize) -> Result<Vec<u8>> {
        self.read_chunk(max).map(|c| match c {
            Chunk::Host(v) => v,
            Chunk::Plugin(v) => v.into_vec(),
        })
    }
    fn read_chunk(&mut self, max: usize) -> Result<Chunk> {
        match self.1.read(u64::try_from(max).unwrap_or(u64::MAX)) {
            ROk(v) => Ok(Chunk::Plugin(v)),
            RErr(e) => Err(err_from_text(&self.0, "read", &e)),
        }
    }
    fn open_at(&mut self, set: &SetId, at: &ItemAt) -> Result<()> {
        let r = self.1.open_at(to_json(&(set, at))?.as_str().into());
        back_unit(&self.0, "open item", r)
    }
}

/// Build the ABI-side error for a constructor that failed.
#[cfg(feature = "engine")]
pub(crate) fn constructor_error(plugin: &str, what: &str, e: &RString) -> Error {
    err_from_text(plugin, what, e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ImageId, ImageMap, MapPart};

    #[test]
    fn a_flag_option_is_true_or_false_and_anything_else_is_named() {
        let c = serde_json::json!({"a": true, "b": "false", "c": "maybe", "d": 1});
        assert_eq!(flag_option(&c, "a", "x.a").unwrap(), Some(true));
        assert_eq!(flag_option(&c, "b", "x.b").unwrap(), Some(false));
        assert_eq!(flag_option(&c, "missing", "x.m").unwrap(), None);
        for (k, given) in [("c", "\"maybe\""), ("d", "1")] {
            let e = flag_option(&c, k, &format!("x.{k}")).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config);
            assert!(
                e.to_string()
                    .contains(&format!("x.{k} must be true or false, got {given}")),
                "{e}"
            );
        }
    }

    fn part(more: bool, items: usize) -> MapPart {
        let item = |k: usize| crate::model::Item {
            id: ItemId::new(format!("/srv/\"more\":false,{k}")),
            kind: crate::model::ItemKind::File,
            size: crate::units::Bytes(1),
            config: ConfigId::new(format!("f:{k}")),
            extents: vec![crate::model::MapExtent {
                logical: crate::units::ItemOffset(0),
                length: crate::units::Bytes(1),
                kind: crate::model::ExtentKind::Inline(vec![7]),
            }],
            meta: Default::default(),
            file: None,
        };
        MapPart {
            more,
            map: ImageMap {
                image: ImageId::new("img"),
                items: (0..items).map(item).collect(),
                failures: Vec::new(),
            },
        }
    }

    #[test]
    fn a_part_s_more_is_read_from_its_first_bytes_as_serde_wrote_them() {
        for more in [true, false] {
            for items in [0, 1, 300] {
                let p = part(more, items);
                // As the plugin side writes it, whatever size it guessed.
                for per_item in [0, 1, 768, usize::MAX] {
                    let json = part_json(&p, per_item).unwrap();
                    let message = crate::protocol::Response::MapPart(p.clone());
                    assert_eq!(json, serde_json::to_string(&message).unwrap());
                    assert_eq!(more_first(&json), Some(more), "{json:.80}");
                    // As serde writes the part alone.
                    let alone = serde_json::to_string(&p).unwrap();
                    assert_eq!(more_first(&alone), Some(more), "{alone:.80}");
                    let back: MapPart = serde_json::from_str(&json).unwrap();
                    assert_eq!(back, p);
                }
            }
        }
        // Written otherwise (another order, spacing): not guessed.
        let json = serde_json::to_string(&part(false, 2)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(more_first(&serde_json::to_string_pretty(&v).unwrap()), None);
        assert_eq!(
            more_first(r#"{"map":{"image":"i","items":[]},"more":true}"#),
            None
        );
        assert_eq!(more_first(r#"{"more":truex"#), None);
        assert_eq!(more_first(r#"{"more":true}"#), None);
        assert_eq!(more_first(""), None);
    }
}
