//! Floe plugin `lvm`: LVM2 logical volumes as volume items. The map comes
//! from the LVM2 metadata read from a physical volume itself (label,
//! metadata area, text — `floe_hostfs::lvm`), not from device-mapper:
//! every LV byte maps to PV extents (linear and striped segments), each PV
//! named `lvm-pv:UUID`, which the mover checks in the PV's own label.
//! Validity: the volume group's metadata sequence number (any change of
//! the VG — pvmove, lvextend, lvconvert — bumps it).
//!
//! Sources: `lvm:VG/LV` takes the LV as it is — no snapshot: for LVs
//! whose users are stopped or read-only; the seqno guards the map, not the
//! contents. `lvm:VG/LV?snapshot` is the lvm-snapshot freezer: a classic
//! snapshot made with `lvcreate -s` (needs device-mapper), whose frozen
//! image is mapped off-host as the origin's extents except the chunks its
//! copy-on-write exception store holds (`floe_hostfs::lvm::map_snapshot`);
//! its config id adds the number of exceptions, so a chunk copied while
//! the mover reads is caught and remapped. Removed on release.

use floe_core::abi::{Freezer, Interface, Mapper, Plugin, PluginInfo, ValidityIndicator};
use floe_core::error::{Error, ErrorKind, Result};
use floe_core::model::*;
use floe_core::units::{BlockSize, Blocks, Bytes, ItemOffset};
use floe_hostfs::lvm::{map_lv, map_snapshot, parse_exceptions, read_pv, VolumeGroup};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::process::Command;

/// The plugin.
pub struct LvmPlugin;

/// What the freezer records per LV.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LvHandle {
    /// The volume group.
    pub vg: String,
    /// The logical volume.
    pub lv: String,
    /// Devices of the VG's PVs on this host (metadata is read from them).
    pub pvs: Vec<PathBuf>,
    /// For a classic snapshot (made by `lvm-snapshot`): its COW LV. The
    /// item is then the snapshot's frozen image of `lv`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

fn handle(fi: &FrozenItem) -> Result<LvHandle> {
    serde_json::from_value(fi.handle.clone()).map_err(|e| {
        Error::new(ErrorKind::Plugin, "malformed lvm handle")
            .item(&fi.id)
            .source(e)
    })
}

/// The PVs of `vg`, from `pvs` (lvm2).
fn pvs_of(vg: &str) -> Result<Vec<PathBuf>> {
    let out = Command::new("pvs")
        .args(["--noheadings", "--separator", "|", "-o", "pv_name,vg_name"])
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .map_err(|e| Error::new(ErrorKind::Config, "cannot run pvs (lvm2)").source(e))?;
    let pvs: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().split_once('|'))
        .filter(|(_, v)| *v == vg)
        .map(|(p, _)| PathBuf::from(p))
        .collect();
    if pvs.is_empty() {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("no physical volume of VG {vg} on this host"),
        ));
    }
    Ok(pvs)
}

/// The VG's current metadata, from the first of its PVs that reads.
fn vg_of(h: &LvHandle) -> Result<VolumeGroup> {
    let mut last = None;
    for p in &h.pvs {
        match read_pv(p) {
            Ok((_, vg)) if vg.name == h.vg => return Ok(vg),
            Ok((_, vg)) => {
                last = Some(Error::new(
                    ErrorKind::IdentityMismatch,
                    format!("{} now belongs to VG {}", p.display(), vg.name),
                ))
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| Error::new(ErrorKind::NotFound, "no PV")))
}

fn config(vg: &VolumeGroup, exceptions: Option<&[(u64, u64)]>) -> ConfigId {
    match exceptions {
        None => ConfigId::new(format!("lvm:{}:seqno{}", vg.id, vg.seqno)),
        // Every copy-on-write adds an exception: a chunk moves from the
        // origin to the COW store.
        Some(ex) => ConfigId::new(format!("lvm:{}:seqno{}:cow{}", vg.id, vg.seqno, ex.len())),
    }
}

/// The exceptions of a snapshot's COW LV, read from its PVs.
fn exceptions(h: &LvHandle, vg: &VolumeGroup, cow: &str) -> Result<Vec<(u64, u64)>> {
    use std::os::unix::fs::FileExt;
    let (_, chunk_sectors) = vg.snapshots.get(cow).cloned().ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!("{cow} is not a snapshot in VG {}", vg.name),
        )
    })?;
    let chunk = chunk_sectors * 512;
    let (_, pieces) = map_lv(vg, cow)?;
    let mut devs = std::collections::HashMap::new();
    for p in &h.pvs {
        if let Ok((label, _)) = read_pv(p) {
            devs.insert(label.uuid, p.clone());
        }
    }
    parse_exceptions(|k| {
        let at = k * chunk;
        let (l, _, uuid, d) = pieces
            .iter()
            .find(|(l, n, _, _)| *l <= at && at < l + n)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidMap,
                    format!("chunk {k} outside the COW LV"),
                )
            })?;
        let path = devs.get(uuid).ok_or_else(|| {
            Error::new(
                ErrorKind::UnknownDevice,
                format!("PV {uuid} is not on this host"),
            )
        })?;
        let f = std::fs::File::open(path).map_err(|e| Error::io("open", e).path(path))?;
        let mut b = vec![0u8; usize::try_from(chunk).unwrap_or(0)];
        f.read_exact_at(&mut b, d + (at - l))
            .map_err(|e| Error::io("read the exception store", e).path(path))?;
        Ok(b)
    })
}

fn item_of(fi: &FrozenItem) -> Result<Item> {
    let h = handle(fi)?;
    let vg = vg_of(&h)?;
    let (size, pieces, ex) = match &h.snapshot {
        None => {
            let (size, pieces) = map_lv(&vg, &h.lv).map_err(|e| e.item(&fi.id))?;
            (size, pieces, None)
        }
        Some(cow) => {
            let ex = exceptions(&h, &vg, cow).map_err(|e| e.item(&fi.id))?;
            let (size, pieces) = map_snapshot(&vg, cow, &ex).map_err(|e| e.item(&fi.id))?;
            (size, pieces, Some(ex))
        }
    };
    let extents = pieces
        .into_iter()
        .map(|(at, len, uuid, dev)| MapExtent {
            logical: ItemOffset(at),
            length: Bytes(len),
            kind: ExtentKind::Data(ExtentChain {
                layers: vec![Layer {
                    kind: LayerKind::LogicalVolume,
                    object: format!("{}/{}", h.vg, h.lv),
                    offset: Bytes(at),
                }],
                physical: PhysicalExtent {
                    device: DeviceId::new(format!("lvm-pv:{uuid}")),
                    start: Blocks(dev / 512),
                    count: Blocks(len / 512),
                    block_size: BlockSize(512),
                },
            }),
        })
        .collect();
    Ok(Item {
        id: fi.id.clone(),
        kind: ItemKind::Volume,
        size: Bytes(size),
        config: config(&vg, ex.as_deref()),
        extents,
        meta: [
            ("vg".to_string(), h.vg.clone()),
            ("lv".to_string(), h.lv.clone()),
        ]
        .into_iter()
        .collect(),
        file: None,
    })
}

fn frozen_item<'a>(image: &'a FrozenImage, item: &ItemId) -> Result<&'a FrozenItem> {
    image
        .items
        .iter()
        .find(|i| &i.id == item)
        .ok_or_else(|| Error::new(ErrorKind::NotFound, "no such LV in the image").item(item))
}

/// The freezer (no snapshot).
pub struct LvmFreezer;

impl Freezer for LvmFreezer {
    fn freeze(&mut self, sources: &[String]) -> Result<FrozenImage> {
        let mut items = Vec::new();
        for s in sources {
            let spec = s.strip_prefix("lvm:").unwrap_or(s);
            let (vg, lv) = spec
                .split_once('/')
                .filter(|(v, l)| !v.is_empty() && !l.is_empty() && !l.contains('/'))
                .ok_or_else(|| {
                    Error::new(ErrorKind::Config, format!("source {s} is not lvm:VG/LV"))
                })?;
            let h = LvHandle {
                vg: vg.into(),
                lv: lv.into(),
                pvs: pvs_of(vg)?,
                snapshot: None,
            };
            let v = vg_of(&h)?;
            if !v.lvs.contains_key(lv) {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("VG {vg} has no LV {lv}"),
                ));
            }
            items.push(FrozenItem {
                id: ItemId::new(format!("{vg}/{lv}")),
                source: s.clone(),
                handle: serde_json::to_value(&h)
                    .map_err(|e| Error::new(ErrorKind::Plugin, "cannot encode handle").source(e))?,
            });
        }
        Ok(FrozenImage {
            id: ImageId::new(format!("lvm-{}-{}", now_secs(), std::process::id())),
            plugin: "lvm".into(),
            items,
            frozen_at: now_secs(),
            mapper: None,
            writes_held: false,
        })
    }
    fn release(&mut self, _image: &FrozenImage) -> Result<()> {
        Ok(())
    }
}

/// The mapper.
pub struct LvmMapper;

impl Mapper for LvmMapper {
    fn map(&mut self, image: &FrozenImage) -> Result<ImageMap> {
        Ok(ImageMap {
            image: image.id.clone(),
            items: image.items.iter().map(item_of).collect::<Result<_>>()?,
            failures: Vec::new(),
        })
    }
    fn remap(&mut self, image: &FrozenImage, item: &ItemId, _since: &ConfigId) -> Result<Remap> {
        // The VG changed: the LV's whole map as it is now.
        let it = item_of(frozen_item(image, item)?)?;
        Ok(Remap {
            item: it.id,
            config: it.config,
            extents: it.extents,
            after_freeze: false,
            size: Some(it.size),
            file: None,
        })
    }
}

/// The validity indicator: the VG's seqno, read from a PV.
pub struct LvmValidity;

impl ValidityIndicator for LvmValidity {
    fn config_id(&mut self, image: &FrozenImage, item: &ItemId) -> Result<ConfigId> {
        let h = handle(frozen_item(image, item)?)?;
        let vg = vg_of(&h)?;
        match &h.snapshot {
            None => Ok(config(&vg, None)),
            Some(cow) => Ok(config(&vg, Some(&exceptions(&h, &vg, cow)?))),
        }
    }
}

/// The `lvm-snapshot` freezer lives in this plugin too (one library,
/// two names would collide): `lvm:VG/LV?snapshot` makes a classic
/// snapshot with `lvcreate -s` (device-mapper needed), maps the origin
/// through its copy-on-write exception store, and removes it on release.
pub struct LvmSnapshotFreezer {
    made: std::collections::HashMap<ImageId, Vec<(String, String)>>,
}

fn lvm_tool(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .map_err(|e| {
            Error::new(ErrorKind::Config, format!("cannot run {} (lvm2)", args[0])).source(e)
        })?;
    if !out.status.success() {
        return Err(Error::new(
            ErrorKind::Io,
            format!(
                "{} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}

impl Freezer for LvmSnapshotFreezer {
    fn freeze(&mut self, sources: &[String]) -> Result<FrozenImage> {
        let id = ImageId::new(format!(
            "lvm-snapshot-{}-{}",
            now_secs(),
            std::process::id()
        ));
        let mut made: Vec<(String, String)> = Vec::new();
        let mut items = Vec::new();
        let result = (|| {
            for s in sources {
                let spec = s.strip_prefix("lvm:").unwrap_or(s);
                let spec = spec.strip_suffix("?snapshot").ok_or_else(|| {
                    Error::new(
                        ErrorKind::Config,
                        format!("source {s} is not lvm:VG/LV?snapshot"),
                    )
                })?;
                let (vg, lv) = spec.split_once('/').ok_or_else(|| {
                    Error::new(
                        ErrorKind::Config,
                        format!("source {s} is not lvm:VG/LV?snapshot"),
                    )
                })?;
                let snap = format!("floe-{}", made.len() + items.len() + 1);
                let snap = format!("{snap}-{}", now_secs());
                lvm_tool(&[
                    "lvcreate",
                    "-q",
                    "-s",
                    "-l",
                    "20%ORIGIN",
                    "-n",
                    &snap,
                    &format!("{vg}/{lv}"),
                ])?;
                made.push((vg.to_string(), snap.clone()));
                let h = LvHandle {
                    vg: vg.into(),
                    lv: lv.into(),
                    pvs: pvs_of(vg)?,
                    snapshot: Some(snap),
                };
                items.push(FrozenItem {
                    id: ItemId::new(format!("{vg}/{lv}")),
                    source: s.clone(),
                    handle: serde_json::to_value(&h).map_err(|e| {
                        Error::new(ErrorKind::Plugin, "cannot encode handle").source(e)
                    })?,
                });
            }
            Ok(())
        })();
        if let Err(e) = result {
            for (vg, snap) in &made {
                let _ = lvm_tool(&["lvremove", "-q", "-f", &format!("{vg}/{snap}")]);
            }
            return Err(e);
        }
        self.made.insert(id.clone(), made);
        Ok(FrozenImage {
            id,
            plugin: "lvm".into(),
            items,
            frozen_at: now_secs(),
            mapper: Some("lvm".into()),
            writes_held: false,
        })
    }
    fn release(&mut self, image: &FrozenImage) -> Result<()> {
        for (vg, snap) in self.made.remove(&image.id).unwrap_or_default() {
            lvm_tool(&["lvremove", "-q", "-f", &format!("{vg}/{snap}")])?;
        }
        Ok(())
    }
}

/// Freezes `lvm:VG/LV` as is, or `lvm:VG/LV?snapshot` with a snapshot.
pub struct LvmFreezers {
    plain: LvmFreezer,
    snap: LvmSnapshotFreezer,
}

impl Freezer for LvmFreezers {
    fn freeze(&mut self, sources: &[String]) -> Result<FrozenImage> {
        let snaps = sources.iter().filter(|s| s.ends_with("?snapshot")).count();
        match snaps {
            0 => self.plain.freeze(sources),
            n if n == sources.len() => self.snap.freeze(sources),
            _ => Err(Error::new(
                ErrorKind::Config,
                "one set's LVs are all snapshotted or none",
            )),
        }
    }
    fn release(&mut self, image: &FrozenImage) -> Result<()> {
        self.snap.release(image)?;
        self.plain.release(image)
    }
}

impl Plugin for LvmPlugin {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "lvm".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            interfaces: vec![Interface::Freezer, Interface::Mapper, Interface::Validity],
            sequential_media: false,
            path_order: false,
        }
    }
    fn freezer(_c: &serde_json::Value) -> Result<Box<dyn Freezer>> {
        Ok(Box::new(LvmFreezers {
            plain: LvmFreezer,
            snap: LvmSnapshotFreezer {
                made: Default::default(),
            },
        }))
    }
    fn mapper(_c: &serde_json::Value) -> Result<Box<dyn Mapper>> {
        Ok(Box::new(LvmMapper))
    }
    fn validity(_c: &serde_json::Value) -> Result<Box<dyn ValidityIndicator>> {
        Ok(Box::new(LvmValidity))
    }
}

floe_core::export_plugin!(LvmPlugin);
