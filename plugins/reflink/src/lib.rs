//! Floe plugin `reflink`: freezes sources on XFS (reflink=1) or btrfs by
//! cloning them with `FICLONE` into a private copy,
//! `<mount>/.floe-clones/<image>/<n>` — names, hard links and metadata
//! kept, every file made immutable so defragmenters leave its blocks where
//! the map says they are. The copy shares the original's blocks until the
//! application rewrites them, so it holds the frozen version; it is mapped
//! by `fiemap` (XFS) or `btrfs` and removed on release.
//!
//! Each file is cloned atomically; a tree is cloned file by file (use
//! `fsflush` or `btrfs-snapshot` for one point across files). Sources as
//! for `fsflush`: `reflink:/srv/data`, a file, a glob, a list.

use floe_core::abi::{Freezer, Interface, Plugin, PluginInfo};
use floe_core::error::{Error, ErrorKind, Result};
use floe_core::model::{now_secs, FrozenImage, FrozenItem, ImageId, ItemId};
use floe_hostfs::clone::{clone_tree, keeping_times, remove_clone};
use floe_hostfs::identity::mount_of;
use floe_hostfs::mapper::{mapper_for, SourceHandle};
use floe_hostfs::source::parse_source;
use std::collections::HashMap;
use std::path::PathBuf;

/// The plugin.
pub struct ReflinkPlugin;

/// Where clones go, under the file system's mount point.
pub const CLONE_DIR: &str = ".floe-clones";

/// The freezer.
#[derive(Default)]
pub struct Reflink {
    /// Per image: (mount point, its clone directory).
    held: HashMap<ImageId, Vec<(PathBuf, PathBuf)>>,
}

fn release_clones(clones: &[(PathBuf, PathBuf)]) {
    for (mp, dir) in clones {
        let _ = remove_clone(dir);
        let _ = keeping_times(mp, || {
            let _ = std::fs::remove_dir(mp.join(CLONE_DIR)); // only if empty
            Ok(())
        });
    }
}

impl Freezer for Reflink {
    fn freeze(&mut self, sources: &[String]) -> Result<FrozenImage> {
        let mut id = ImageId::new(format!("reflink-{}-{}", now_secs(), std::process::id()));
        let mut n = 0;
        while self.held.contains_key(&id) {
            n += 1;
            id = ImageId::new(format!("reflink-{}-{}-{n}", now_secs(), std::process::id()));
        }
        let mut clones: Vec<(PathBuf, PathBuf)> = Vec::new();
        let mut items = Vec::new();
        let mut mapper: Option<&'static str> = None;
        let result = (|| {
            for (k, s) in sources.iter().enumerate() {
                let text = s.strip_prefix("reflink:").ok_or_else(|| {
                    Error::new(ErrorKind::Config, format!("{s} is not a reflink: source"))
                })?;
                let spec = parse_source(text)?;
                let (mp, fstype, _) = mount_of(&spec.root)?;
                if fstype != "xfs" && fstype != "btrfs" {
                    return Err(Error::new(
                        ErrorKind::Unsupported,
                        format!(
                            "{} is on {fstype}: reflink clones need XFS or btrfs (use fsflush)",
                            spec.root.display()
                        ),
                    ));
                }
                let m = mapper_for(&fstype).unwrap_or("fiemap");
                if mapper.is_some_and(|x| x != m) {
                    return Err(Error::new(
                        ErrorKind::Config,
                        "one set's file systems must share a mapper (XFS: fiemap, btrfs: btrfs)",
                    ));
                }
                mapper = Some(m);
                let base = mp.join(CLONE_DIR);
                keeping_times(&mp, || {
                    std::fs::create_dir_all(&base)
                        .map_err(|e| Error::io("create clone directory", e).path(&base))
                })?;
                // Clones of agents that died holding them go first.
                for left in floe_hostfs::clone::leftovers(&base, "reflink") {
                    floe_core::log_line!(
                        "floe agent: removing {}, left by an agent that died",
                        left.display()
                    );
                    let _ = remove_clone(&left);
                }
                let dest = base.join(id.as_str()).join(k.to_string());
                let skip = if spec.root == mp {
                    vec![CLONE_DIR.to_string()]
                } else {
                    Vec::new()
                };
                clones.push((mp.clone(), base.join(id.as_str())));
                clone_tree(&spec, &dest, &skip)?;
                items.push(FrozenItem {
                    id: ItemId::new(s.clone()),
                    source: s.clone(),
                    handle: serde_json::to_value(SourceHandle {
                        spec: text.to_string(),
                        frozen: dest,
                        snapshot: true,
                        fstype,
                        skip: Vec::new(),
                        volume: None,
                    })
                    .map_err(|e| Error::new(ErrorKind::Plugin, "cannot encode handle").source(e))?,
                });
            }
            Ok(())
        })();
        if let Err(e) = result {
            release_clones(&clones);
            return Err(e);
        }
        clones.dedup();
        self.held.insert(id.clone(), clones);
        Ok(FrozenImage {
            id,
            plugin: "reflink".into(),
            items,
            frozen_at: now_secs(),
            mapper: mapper.map(String::from),
            writes_held: false,
        })
    }

    fn release(&mut self, image: &FrozenImage) -> Result<()> {
        release_clones(&self.held.remove(&image.id).unwrap_or_default());
        Ok(())
    }
}

impl Plugin for ReflinkPlugin {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "reflink".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            interfaces: vec![Interface::Freezer],
            sequential_media: false,
            path_order: false,
        }
    }
    fn freezer(_config: &serde_json::Value) -> Result<Box<dyn Freezer>> {
        Ok(Box::new(Reflink::default()))
    }
}

floe_core::export_plugin!(ReflinkPlugin);
