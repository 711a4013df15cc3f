//! Floe plugin `btrfs-snapshot`: freezes btrfs sources with a read-only
//! snapshot of each subvolume that holds one (`btrfs subvolume snapshot
//! -r`), made in `<subvolume>/.floe-snapshots/<image>`, mapped by the
//! `btrfs` plugin and deleted on release. The snapshot keeps the frozen
//! version whatever the application does next: nothing is ever captured
//! after the freeze. Sources as for `fsflush` (`btrfs-snapshot:/srv/data`,
//! a file, a glob, a list).
//!
//! Several sources on one subvolume share one snapshot (one point in
//! time); snapshots of different subvolumes are taken one after another.
//! The snapshot directory is created with the subvolume root's times put
//! back, so the frozen root carries no trace of the backup, and it is left
//! out of the walk.

use floe_core::abi::{Freezer, Interface, Plugin, PluginInfo};
use floe_core::error::{Error, ErrorKind, Result};
use floe_core::model::{now_secs, FrozenImage, FrozenItem, ImageId, ItemId};
use floe_hostfs::clone::keeping_times;
use floe_hostfs::identity::mount_of;
use floe_hostfs::mapper::SourceHandle;
use floe_hostfs::source::parse_source;
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The plugin.
pub struct BtrfsSnapshotPlugin;

/// Where snapshots go, under the subvolume root.
pub const SNAPSHOT_DIR: &str = ".floe-snapshots";

/// The freezer.
#[derive(Default)]
pub struct BtrfsSnapshot {
    held: HashMap<ImageId, Vec<PathBuf>>,
}

fn btrfs(args: &[&std::ffi::OsStr]) -> Result<()> {
    let out = Command::new("btrfs")
        .args(args)
        .output()
        .map_err(|e| Error::new(ErrorKind::Config, "cannot run btrfs (btrfs-progs)").source(e))?;
    if !out.status.success() {
        return Err(Error::new(
            ErrorKind::Io,
            format!(
                "btrfs {} failed: {}",
                args.iter()
                    .map(|a| a.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}

/// The root of the subvolume `p` is in (its inode is 256).
fn subvolume_root(p: &Path) -> Result<PathBuf> {
    let mut at = p.to_path_buf();
    loop {
        let m = std::fs::metadata(&at).map_err(|e| Error::io("stat", e).path(&at))?;
        if m.ino() == 256 {
            return Ok(at);
        }
        if !at.pop() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "no btrfs subvolume above the source",
            )
            .path(p));
        }
    }
}

fn delete(snap: &Path) {
    let _ = btrfs(&["subvolume".as_ref(), "delete".as_ref(), snap.as_os_str()]);
    if let Some(dir) = snap.parent() {
        if let Some(subvol) = dir.parent() {
            let _ = keeping_times(subvol, || {
                let _ = std::fs::remove_dir(dir); // only if empty
                Ok(())
            });
        }
    }
}

impl Freezer for BtrfsSnapshot {
    fn freeze(&mut self, sources: &[String]) -> Result<FrozenImage> {
        let mut id = ImageId::new(format!(
            "btrfs-snapshot-{}-{}",
            now_secs(),
            std::process::id()
        ));
        let mut n = 0;
        while self.held.contains_key(&id) {
            n += 1;
            id = ImageId::new(format!(
                "btrfs-snapshot-{}-{}-{n}",
                now_secs(),
                std::process::id()
            ));
        }
        let mut snaps: HashMap<PathBuf, PathBuf> = HashMap::new();
        let mut items = Vec::new();
        let result = (|| {
            for s in sources {
                let text = s.strip_prefix("btrfs-snapshot:").ok_or_else(|| {
                    Error::new(
                        ErrorKind::Config,
                        format!("{s} is not a btrfs-snapshot: source"),
                    )
                })?;
                let spec = parse_source(text)?;
                let (_, fstype, _) = mount_of(&spec.root)?;
                if fstype != "btrfs" {
                    return Err(Error::new(
                        ErrorKind::Unsupported,
                        format!(
                            "{} is on {fstype}: btrfs-snapshot freezes btrfs subvolumes (use fsflush)",
                            spec.root.display()
                        ),
                    ));
                }
                let subvol = subvolume_root(&spec.root)?;
                let snap = match snaps.get(&subvol) {
                    Some(p) => p.clone(),
                    None => {
                        let dir = subvol.join(SNAPSHOT_DIR);
                        keeping_times(&subvol, || {
                            std::fs::create_dir_all(&dir)
                                .map_err(|e| Error::io("create snapshot directory", e).path(&dir))
                        })?;
                        // Snapshots of agents that died holding them go first.
                        for left in floe_hostfs::clone::leftovers(&dir, "btrfs-snapshot") {
                            floe_core::log_line!(
                                "floe agent: removing {}, left by an agent that died",
                                left.display()
                            );
                            let _ =
                                btrfs(&["subvolume".as_ref(), "delete".as_ref(), left.as_os_str()]);
                        }
                        let snap = dir.join(id.as_str());
                        btrfs(&[
                            "subvolume".as_ref(),
                            "snapshot".as_ref(),
                            "-r".as_ref(),
                            subvol.as_os_str(),
                            snap.as_os_str(),
                        ])?;
                        snaps.insert(subvol.clone(), snap.clone());
                        snap
                    }
                };
                let rel = spec.root.strip_prefix(&subvol).unwrap_or(Path::new(""));
                let frozen = if rel.as_os_str().is_empty() {
                    snap.clone()
                } else {
                    snap.join(rel)
                };
                let skip = if rel.as_os_str().is_empty() {
                    vec![SNAPSHOT_DIR.to_string()]
                } else {
                    Vec::new()
                };
                items.push(FrozenItem {
                    id: ItemId::new(s.clone()),
                    source: s.clone(),
                    handle: serde_json::to_value(SourceHandle {
                        spec: text.to_string(),
                        frozen,
                        snapshot: true,
                        fstype,
                        skip,
                        volume: None,
                    })
                    .map_err(|e| Error::new(ErrorKind::Plugin, "cannot encode handle").source(e))?,
                });
            }
            Ok(())
        })();
        if let Err(e) = result {
            for snap in snaps.values() {
                delete(snap);
            }
            return Err(e);
        }
        self.held.insert(id.clone(), snaps.into_values().collect());
        Ok(FrozenImage {
            id,
            plugin: "btrfs-snapshot".into(),
            items,
            frozen_at: now_secs(),
            mapper: Some("btrfs".into()),
            writes_held: false,
        })
    }

    fn release(&mut self, image: &FrozenImage) -> Result<()> {
        for snap in self.held.remove(&image.id).unwrap_or_default() {
            delete(&snap);
        }
        Ok(())
    }
}

impl Plugin for BtrfsSnapshotPlugin {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "btrfs-snapshot".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            interfaces: vec![Interface::Freezer],
            sequential_media: false,
            path_order: false,
        }
    }
    fn freezer(_config: &serde_json::Value) -> Result<Box<dyn Freezer>> {
        Ok(Box::new(BtrfsSnapshot::default()))
    }
}

floe_core::export_plugin!(BtrfsSnapshotPlugin);
