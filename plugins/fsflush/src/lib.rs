//! Floe plugin `fsflush`: the flush-only freezer for file systems. For the
//! sources of one set: sync each file system, `FIFREEZE` them all (one
//! consistent point across file systems), let the mapper capture the map,
//! `FITHAW`. Writes are held only while the map is captured.
//!
//! The freeze is bounded (`--plugin-opt fsflush.freeze_timeout=SECS`,
//! default 30) and always thawed: before freezing, a guard process is
//! forked that thaws the file systems when the agent says so, when the
//! bound runs out, or when the agent dies (its pipe closes) — it does not
//! share the agent's fate. A map captured after the guard had to thaw is
//! refused (it is not of one frozen point).
//!
//! Flush-only keeps no old version: a file changed after the thaw is read
//! whole in its newer version and recorded as captured after the freeze.
//! (Until a write reaches a mapped extent, the mapper's watch of queued
//! writes vouches that nothing read changed: `Mapper::untouched`.)
//!
//! While it syncs and freezes, the whole-tree sources' directories are
//! read ahead on threads of their own and the read ahead is stopped once
//! all are frozen ([`floe_hostfs::warm`]): the listing under the freeze
//! finds them in the kernel's caches, so writes are held for less time.
//! `--plugin-opt fsflush.read_ahead=false` turns it off.
//!
//! `--plugin-opt fsflush.hold_writes=backup` holds writes past the map,
//! until the mover releases the image (still within the freeze bound):
//! the set is then of one point in time, and the agent answers config
//! checks without looking at a file ([`Freezer::writes_held`]: a
//! `FIFREEZE` probe per check, which fails with EBUSY while the file
//! system stays frozen). The application's writes wait for the whole
//! backup instead of for the map. If the bound runs out first the guard
//! thaws, checks look at every file again, and the rest of the set is
//! read as without the option (files changed since: whole, later
//! versions). The default, `map`, holds writes only while the map is
//! captured.
//!
//! Sources: `fsflush:/mount/point` (a file system), `fsflush:/dir`,
//! `fsflush:/dir/file`, `fsflush:/dir/*.log`, `fsflush:/dir?from=/dir/list`;
//! and a file system's volume as one image, `fsflush:/mount/point?volume`
//! (every block) or `?volume=allocated` (only allocated blocks, from
//! `GETFSMAP`; ext4 and XFS). A set with a volume source stays frozen until
//! it is released — the image is read while writes are held — still
//! bounded by the freeze timeout: if the guard thaws first, the volume's
//! config id changes and the backup fails rather than record a mixed image.

use floe_core::abi::{Freezer, Interface, Plugin, PluginInfo};
use floe_core::error::{Error, ErrorKind, Result};
use floe_core::media::pausepoint;
use floe_core::model::{now_secs, FrozenImage, FrozenItem, ImageId};
use floe_hostfs::identity::mount_of;
use floe_hostfs::mapper::{mapper_for, SourceHandle};
use floe_hostfs::source::parse_source;
use floe_hostfs::source::Selection;
use floe_hostfs::sys::{freeze, thaw, ThawGuard};
use floe_hostfs::volume::volume_mode;
use floe_hostfs::warm::{self, DirectoryWarmer};
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

/// The plugin.
pub struct FsFlushPlugin;

struct Held {
    mounts: Vec<(PathBuf, File)>,
    /// When the first file system was frozen.
    since: std::time::Instant,
    guard: Option<ThawGuard>,
    /// Frozen until release, not just while mapped (volume sources, or
    /// `hold_writes=backup`).
    hold: bool,
    /// The hold ended (thawed, by us or the guard, or found thawed):
    /// writes are never again "held since the freeze".
    ended: bool,
    /// Directories read ahead while flushing and freezing.
    read_ahead: u64,
}

impl Held {
    fn thaw_all(&mut self) {
        self.ended = true;
        for (_, d) in &self.mounts {
            let _ = thaw(d);
        }
    }

    /// Are all its file systems still frozen, without a break since the
    /// freeze? A second `FIFREEZE` of a frozen file system fails with
    /// EBUSY; one that succeeds found it thawed (and is undone at once).
    fn still_frozen(&mut self) -> bool {
        if self.ended {
            return false;
        }
        let frozen = !self.guard.as_ref().is_none_or(ThawGuard::fired)
            && self.mounts.iter().all(|(_, d)| match freeze(d) {
                Err(e) => e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()),
                Ok(()) => {
                    let _ = thaw(d);
                    false
                }
            });
        if !frozen {
            self.ended = true;
            floe_core::log_line!(
                "floe agent: fsflush: writes held {:.3} s, then let go before the release (the freeze bound ran out, or something else thawed); the rest is checked file by file",
                self.since.elapsed().as_secs_f64()
            );
        }
        frozen
    }

    /// The application's cost of the backup, in the agent's log.
    fn log_held(&self) {
        let mounts: Vec<String> = self
            .mounts
            .iter()
            .map(|(m, _)| m.display().to_string())
            .collect();
        let ahead = match self.read_ahead {
            0 => String::new(),
            1 => " (1 directory read ahead)".into(),
            n => format!(" ({n} directories read ahead)"),
        };
        floe_core::log_line!(
            "floe agent: fsflush: writes held {:.3} s on {}{ahead}",
            self.since.elapsed().as_secs_f64(),
            mounts.join(", ")
        );
    }
}

/// How long writes are held: `hold_writes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HoldWrites {
    /// While the map is captured (the default).
    Map,
    /// Until the image is released.
    Backup,
}

/// The freezer.
pub struct FsFlush {
    bound: Duration,
    hold_writes: HoldWrites,
    /// `read_ahead` (default on): the trees' directories read while the
    /// file systems are flushed and frozen ([`DirectoryWarmer`]).
    read_ahead: bool,
    held: HashMap<ImageId, Held>,
}

fn io(op: &str, p: &std::path::Path, e: std::io::Error) -> Error {
    let kind = if e.raw_os_error() == Some(rustix::io::Errno::OPNOTSUPP.raw_os_error()) {
        ErrorKind::Unsupported
    } else {
        ErrorKind::Io
    };
    Error::new(kind, format!("cannot {op} {}", p.display()))
        .op(op)
        .path(p)
        .source(e)
}

impl Freezer for FsFlush {
    fn freeze(&mut self, sources: &[String]) -> Result<FrozenImage> {
        let mut items = Vec::new();
        let mut mounts: Vec<PathBuf> = Vec::new();
        let mut mapper: Option<&'static str> = None;
        let mut hold = self.hold_writes == HoldWrites::Backup;
        // Whole trees, read ahead while the file systems are flushed and
        // frozen.
        let mut trees: Vec<PathBuf> = Vec::new();
        for s in sources {
            let text = s.strip_prefix("fsflush:").ok_or_else(|| {
                Error::new(ErrorKind::Config, format!("{s} is not an fsflush: source"))
            })?;
            let (path, volume) = volume_mode(text)?;
            let spec = parse_source(path)?;
            let (mp, fstype, _) = mount_of(&spec.root)?;
            if volume.is_some() {
                if spec.root != mp {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "{s}: a volume source names a mount point ({} is on {})",
                            spec.root.display(),
                            mp.display()
                        ),
                    ));
                }
                if !matches!(fstype.as_str(), "ext4" | "ext3" | "ext2" | "xfs") {
                    return Err(Error::new(
                        ErrorKind::Unsupported,
                        format!("{s}: volume images are of ext4 and XFS file systems (this is {fstype}; btrfs spans devices: back up its files)"),
                    ));
                }
                hold = true;
            }
            // A source on a file system no mapper supports is not frozen;
            // the mapper names it as a failure and the set goes on.
            if let Some(m) = mapper_for(&fstype) {
                if mapper.is_some_and(|x| x != m) {
                    return Err(Error::new(
                        ErrorKind::Config,
                        "one set's file systems must share a mapper (ext4/XFS: fiemap, btrfs: btrfs): back them up as separate sets",
                    ));
                }
                mapper = Some(m);
                if !mounts.contains(&mp) {
                    mounts.push(mp);
                }
                if volume.is_none() && spec.select == Selection::Tree {
                    trees.push(spec.root.clone());
                }
            }
            items.push(FrozenItem {
                id: floe_core::model::ItemId::new(s.clone()),
                source: s.clone(),
                handle: serde_json::to_value(SourceHandle {
                    spec: path.to_string(),
                    frozen: spec.root.clone(),
                    snapshot: false,
                    fstype,
                    skip: Vec::new(),
                    volume,
                })
                .map_err(|e| Error::new(ErrorKind::Plugin, "cannot encode handle").source(e))?,
            });
        }
        if mapper.is_none() {
            let types: Vec<String> = items
                .iter()
                .filter_map(|i| {
                    i.handle
                        .get("fstype")
                        .and_then(|v| v.as_str())
                        .map(String::from)
                })
                .collect();
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "no source is on a file system Floe can map ({}; supported: ext4, ext3, ext2, xfs, btrfs)",
                    types.join(", ")
                ),
            ));
        }
        mounts.sort();
        let mut dirs = Vec::new();
        for mp in &mounts {
            let d = File::open(mp).map_err(|e| io("open", mp, e))?;
            dirs.push((mp.clone(), d));
        }
        // The trees' directories read meanwhile (dropped, so stopped, on
        // every way out), so the listing under the freeze finds them in
        // the kernel's caches.
        let warmer = self
            .read_ahead
            .then(|| DirectoryWarmer::start(&warm::roots(trees.iter().map(PathBuf::as_path))));
        // Flush first, outside the freeze: FIFREEZE then has little left
        // to write and holds writers for less time.
        for (mp, d) in &dirs {
            rustix::fs::syncfs(d).map_err(|e| io("sync", mp, e.into()))?;
        }
        pausepoint("fsflush-flushed");
        // The guard exists before anything is frozen.
        let fds: Vec<_> = dirs.iter().map(|(_, d)| d.as_raw_fd()).collect();
        let guard =
            ThawGuard::spawn(&fds, self.bound).map_err(|e| Error::io("start the thaw guard", e))?;
        let mut held = Held {
            mounts: Vec::new(),
            since: std::time::Instant::now(),
            guard: Some(guard),
            hold,
            ended: false,
            read_ahead: 0,
        };
        for (mp, d) in dirs {
            if let Err(e) = freeze(&d) {
                held.thaw_all();
                let why = if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) {
                    " (it is frozen already, by another tool or backup)"
                } else {
                    ""
                };
                return Err(io(&format!("freeze{why}"), &mp, e));
            }
            held.mounts.push((mp, d));
        }
        if let Some(w) = warmer {
            held.read_ahead = w.stop();
        }
        pausepoint("fsflush-frozen");
        let id = ImageId::new(format!("fsflush-{}-{}", now_secs(), std::process::id()));
        let id = unique(&self.held, id);
        self.held.insert(id.clone(), held);
        Ok(FrozenImage {
            id,
            plugin: "fsflush".into(),
            items,
            frozen_at: now_secs(),
            mapper: mapper.map(String::from),
            writes_held: true,
        })
    }

    fn mapped(&mut self, image: &FrozenImage) -> Result<()> {
        let Some(h) = self.held.get_mut(&image.id) else {
            return Ok(());
        };
        let fired = h.guard.as_ref().is_some_and(ThawGuard::fired);
        if h.hold && !fired {
            // Read while the file systems stay frozen (a volume image,
            // `hold_writes=backup`); the guard still thaws at the bound or
            // if the agent dies.
            return Ok(());
        }
        h.thaw_all();
        h.log_held();
        if let Some(g) = h.guard.take() {
            g.finish();
        }
        if fired {
            return Err(Error::new(
                ErrorKind::Unstable,
                format!(
                    "the freeze bound of {} s ran out before the map was captured: the file systems were thawed by the guard, the map is not of one point in time (raise fsflush.freeze_timeout)",
                    self.bound.as_secs()
                ),
            )
            .op("freeze"));
        }
        Ok(())
    }

    fn release(&mut self, image: &FrozenImage) -> Result<()> {
        if let Some(mut h) = self.held.remove(&image.id) {
            let logged = h.ended;
            h.thaw_all();
            if !logged && h.hold {
                h.log_held();
            }
            if let Some(g) = h.guard.take() {
                g.finish();
            }
        }
        Ok(())
    }

    fn writes_held(&mut self, image: &FrozenImage) -> Result<bool> {
        Ok(self.held.get_mut(&image.id).is_some_and(Held::still_frozen))
    }
}

fn unique(held: &HashMap<ImageId, Held>, id: ImageId) -> ImageId {
    let mut n = 0;
    let mut c = id.clone();
    while held.contains_key(&c) {
        n += 1;
        c = ImageId::new(format!("{id}-{n}"));
    }
    c
}

impl Plugin for FsFlushPlugin {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "fsflush".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            interfaces: vec![Interface::Freezer],
            sequential_media: false,
            path_order: false,
        }
    }
    fn freezer(config: &serde_json::Value) -> Result<Box<dyn Freezer>> {
        let secs = match config.get("freeze_timeout") {
            None => 30.0,
            Some(v) => v
                .as_f64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                .filter(|s| *s > 0.0 && *s <= 3600.0)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::Config,
                        format!("fsflush.freeze_timeout must be seconds in (0, 3600], got {v}"),
                    )
                })?,
        };
        let hold_writes = match config.get("hold_writes") {
            None => HoldWrites::Map,
            Some(v) => match v.as_str() {
                Some("map") => HoldWrites::Map,
                Some("backup") => HoldWrites::Backup,
                _ => {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!("fsflush.hold_writes must be map (while the map is captured, the default) or backup (until the backup releases the image, within freeze_timeout), got {v}"),
                    ))
                }
            },
        };
        let read_ahead = floe_core::abi::flag_option(config, "read_ahead", "fsflush.read_ahead")?
            .unwrap_or(true);
        Ok(Box::new(FsFlush {
            bound: Duration::from_secs_f64(secs),
            hold_writes,
            read_ahead,
            held: HashMap::new(),
        }))
    }
}

floe_core::export_plugin!(FsFlushPlugin);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_and_named_when_wrong() {
        let hold = |v: serde_json::Value| {
            FsFlushPlugin::freezer(&serde_json::json!({ "hold_writes": v })).map(|_| ())
        };
        assert!(hold("map".into()).is_ok());
        assert!(hold("backup".into()).is_ok());
        for bad in [serde_json::json!("forever"), serde_json::json!(true)] {
            let e = hold(bad.clone()).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config);
            assert!(
                e.to_string().contains("fsflush.hold_writes must be map")
                    && e.to_string().contains(&bad.to_string()),
                "{e}"
            );
        }
        let e = FsFlushPlugin::freezer(&serde_json::json!({ "freeze_timeout": 0 }))
            .map(|_| ())
            .unwrap_err();
        assert!(e.to_string().contains("freeze_timeout"), "{e}");
        for ok in [serde_json::json!(false), serde_json::json!("true")] {
            assert!(FsFlushPlugin::freezer(&serde_json::json!({ "read_ahead": ok })).is_ok());
        }
        let e = FsFlushPlugin::freezer(&serde_json::json!({ "read_ahead": "sometimes" }))
            .map(|_| ())
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("fsflush.read_ahead must be true or false")
                && e.to_string().contains("sometimes"),
            "{e}"
        );
    }
}
