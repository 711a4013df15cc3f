//! Floe plugin `array`: the simulated SAN's array as freezer (array
//! snapshot of a consistency group), mapper (the array's volume map, LUN by
//! WWN) and validity indicator (the snapshot's metadata generation).
//!
//! Config (`--plugin-opt array.KEY=VALUE` on the agent):
//! - `control`: the sim-san control API address (default 127.0.0.1:10810);
//! - `keep`: keep the snapshots after release (default false).
//!
//! Config ids look like `array:<array id>:<snapshot>:g<generation>`.

use floe_core::abi::{Freezer, Interface, Mapper, Plugin, PluginInfo, ValidityIndicator};
use floe_core::error::{Error, ErrorKind, Result};
use floe_core::model::*;
use floe_core::units::{BlockSize, Blocks, Bytes, ItemOffset};
use floe_sim_san::control::{ArrayError, Client, MapExtentInfo, Op, TargetMap};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// The plugin.
pub struct ArrayPlugin;

struct Conn {
    addr: String,
    client: Client,
    array: String,
    keep: bool,
}

fn san_err(op: &str, e: ArrayError) -> Error {
    let kind = match e.code {
        floe_sim_san::control::ErrorCode::NotFound => ErrorKind::NotFound,
        floe_sim_san::control::ErrorCode::Invalid => ErrorKind::Config,
        _ => ErrorKind::Plugin,
    };
    Error::new(kind, format!("array {op} failed: {}", e.message)).op(op.to_string())
}

impl Conn {
    fn open(config: &serde_json::Value) -> Result<Conn> {
        let addr = config
            .get("control")
            .and_then(|v| v.as_str())
            .unwrap_or("127.0.0.1:10810")
            .to_string();
        let keep = match config.get("keep") {
            Some(serde_json::Value::Bool(b)) => *b,
            Some(serde_json::Value::String(s)) => s == "true" || s == "1",
            _ => false,
        };
        let mut client = Client::connect(&addr).map_err(|e| san_err("connect", e))?;
        let hello = client.call(Op::Hello).map_err(|e| san_err("hello", e))?;
        let array = hello
            .get("array")
            .and_then(|v| v.as_str())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Plugin,
                    format!("sim-san at {addr} did not say its array id"),
                )
            })?
            .to_string();
        Ok(Conn {
            addr,
            client,
            array,
            keep,
        })
    }

    fn make_config(&self, snapshot: &str, generation: u64) -> ConfigId {
        ConfigId::new(format!("array:{}:{snapshot}:g{generation}", self.array))
    }

    fn parse_config(&self, snapshot: &str, c: &ConfigId) -> Result<u64> {
        let prefix = format!("array:{}:{snapshot}:g", self.array);
        c.as_str()
            .strip_prefix(&prefix)
            .and_then(|g| g.parse().ok())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    format!(
                        "config id {c} is not one of snapshot {snapshot} on array {} ({})",
                        self.array, self.addr
                    ),
                )
            })
    }
}

fn snapshot_of(image: &FrozenImage, item: &ItemId) -> Result<String> {
    image
        .items
        .iter()
        .find(|i| &i.id == item)
        .and_then(|i| {
            i.handle
                .get("snapshot")
                .and_then(|s| s.as_str())
                .map(str::to_string)
        })
        .ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("item {item} is not in image {}", image.id),
            )
            .item(item)
        })
}

fn extents(m: &TargetMap, list: &[MapExtentInfo]) -> Vec<MapExtent> {
    let bs = u64::from(m.block_size);
    list.iter()
        .map(|e| MapExtent {
            logical: ItemOffset(e.offset.0),
            length: e.length,
            kind: ExtentKind::Data(ExtentChain {
                layers: vec![
                    Layer {
                        kind: LayerKind::Volume,
                        object: m.target.clone(),
                        offset: Bytes(e.offset.0),
                    },
                    Layer {
                        kind: LayerKind::Lun,
                        object: e.lun.clone(),
                        offset: Bytes(e.lun_offset.0),
                    },
                ],
                physical: PhysicalExtent {
                    device: DeviceId::new(e.wwn.clone()),
                    start: Blocks(e.lun_offset.0 / bs),
                    count: Blocks(e.length.0 / bs),
                    block_size: BlockSize(m.block_size),
                },
            }),
        })
        .collect()
}

static SNAPSHOTS: AtomicU64 = AtomicU64::new(0);

impl Freezer for Conn {
    fn freeze(&mut self, sources: &[String]) -> Result<FrozenImage> {
        let mut volumes = Vec::new();
        for s in sources {
            let v = s.strip_prefix("array:").ok_or_else(|| {
                Error::new(ErrorKind::Config, format!("source {s} is not array:VOLUME"))
            })?;
            volumes.push(v.to_string());
        }
        let now = now_secs();
        let suffix = format!(
            "floe-{now}-{}-{}",
            std::process::id(),
            SNAPSHOTS.fetch_add(1, Ordering::SeqCst)
        );
        let r = self
            .client
            .call(Op::Snapshot {
                volumes: volumes.clone(),
                suffix: suffix.clone(),
            })
            .map_err(|e| san_err("snapshot", e))?;
        let snaps: Vec<String> = serde_json::from_value(r["snapshots"].clone())
            .map_err(|e| Error::new(ErrorKind::Plugin, format!("bad snapshot answer: {e}")))?;
        Ok(FrozenImage {
            id: ImageId::new(format!("array-{suffix}")),
            plugin: "array".into(),
            items: volumes
                .iter()
                .zip(sources)
                .zip(snaps)
                .map(|((v, s), snap)| FrozenItem {
                    id: ItemId::new(v.clone()),
                    source: s.clone(),
                    handle: serde_json::json!({"snapshot": snap, "origin": v}),
                })
                .collect(),
            frozen_at: now,
            mapper: None,
            writes_held: false,
        })
    }

    fn release(&mut self, image: &FrozenImage) -> Result<()> {
        if self.keep {
            return Ok(());
        }
        for item in &image.items {
            let snap = snapshot_of(image, &item.id)?;
            self.client
                .call(Op::Delete { target: snap })
                .map_err(|e| san_err("delete snapshot", e))?;
        }
        Ok(())
    }
}

impl Mapper for Conn {
    fn map(&mut self, image: &FrozenImage) -> Result<ImageMap> {
        let mut items = Vec::new();
        for fi in &image.items {
            let snap = snapshot_of(image, &fi.id)?;
            let m: TargetMap = self
                .client
                .call_as(Op::Map {
                    target: snap.clone(),
                })
                .map_err(|e| san_err("map", e).item(&fi.id))?;
            let mut meta = BTreeMap::new();
            meta.insert("snapshot".into(), snap.clone());
            meta.insert("origin".into(), m.origin.clone().unwrap_or_default());
            meta.insert("array".into(), self.array.clone());
            items.push(Item {
                id: fi.id.clone(),
                kind: ItemKind::Volume,
                size: m.size,
                config: self.make_config(&snap, m.generation),
                extents: extents(&m, &m.extents),
                meta,
                file: None,
            });
        }
        Ok(ImageMap {
            image: image.id.clone(),
            items,
            failures: Vec::new(),
        })
    }

    fn remap(&mut self, image: &FrozenImage, item: &ItemId, since: &ConfigId) -> Result<Remap> {
        let snap = snapshot_of(image, item)?;
        let generation = self.parse_config(&snap, since)?;
        let m: TargetMap = self
            .client
            .call_as(Op::Remap {
                target: snap.clone(),
                since: generation,
            })
            .map_err(|e| san_err("remap", e).item(item))?;
        Ok(Remap {
            item: item.clone(),
            config: self.make_config(&snap, m.generation),
            extents: extents(&m, &m.extents),
            after_freeze: false,
            file: None,
            size: None,
        })
    }
}

impl ValidityIndicator for Conn {
    fn config_id(&mut self, image: &FrozenImage, item: &ItemId) -> Result<ConfigId> {
        let snap = snapshot_of(image, item)?;
        let r = self
            .client
            .call(Op::Generation {
                target: snap.clone(),
            })
            .map_err(|e| san_err("generation", e).item(item))?;
        let g = r["generation"]
            .as_u64()
            .ok_or_else(|| Error::new(ErrorKind::Plugin, "bad generation answer"))?;
        Ok(self.make_config(&snap, g))
    }
}

impl Plugin for ArrayPlugin {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "array".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            interfaces: vec![Interface::Freezer, Interface::Mapper, Interface::Validity],
            sequential_media: false,
            path_order: false,
        }
    }
    fn freezer(config: &serde_json::Value) -> Result<Box<dyn Freezer>> {
        Ok(Box::new(Conn::open(config)?))
    }
    fn mapper(config: &serde_json::Value) -> Result<Box<dyn Mapper>> {
        Ok(Box::new(Conn::open(config)?))
    }
    fn validity(config: &serde_json::Value) -> Result<Box<dyn ValidityIndicator>> {
        Ok(Box::new(Conn::open(config)?))
    }
}

floe_core::export_plugin!(ArrayPlugin);
