//! Test harness: a real sim-san (NBD over TCP, control API) and a real
//! agent (plugins loaded from the build tree) in this process, each on its
//! own loopback port; movers run through floe-core's engine or the `floe`
//! binary. Everything is torn down when the harness drops.

pub mod hostfs;

use floe_core::abi::{Interface, MediaReader, MediaWriter};
use floe_core::agent::{Agent, AgentClient, AgentOptions};
use floe_core::device::{open_target, DeviceResolver};
use floe_core::loader::PluginRegistry;
use floe_core::model::{ItemId, SetId};
use floe_core::mover::{backup, restore_item, BackupReport, MoverOptions};
use floe_sim_san::control::{Client, Op};
use floe_sim_san::SimSan;
use std::collections::HashMap;
use std::io::BufRead;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// The build tree's profile directory (`target/debug`).
pub fn build_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let mut d = exe.parent().expect("exe dir").to_path_buf();
    if d.ends_with("deps") {
        d.pop();
    }
    d
}

/// The `floe` binary of the build tree.
pub fn floe_bin() -> PathBuf {
    let p = build_dir().join("floe");
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (`cargo xtask test` does)",
        p.display()
    );
    p
}

/// A `floe` command whose catalog is a fresh file of its own (tests never
/// touch the user's catalog; tests about the catalog pass `--catalog`).
pub fn floe_cmd() -> std::process::Command {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static SWEPT: std::sync::Once = std::sync::Once::new();
    let base = std::env::temp_dir().join("floe-test-catalogs");
    // Catalogs of test processes that are gone are removed by the next.
    SWEPT.call_once(|| {
        for e in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let pid = e.file_name().to_string_lossy().parse::<u32>().ok();
            if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    });
    let dir = base.join(std::process::id().to_string());
    let _ = std::fs::create_dir_all(&dir);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let mut c = std::process::Command::new(floe_bin());
    c.env("FLOE_CATALOG", dir.join(format!("catalog-{n}.db")));
    c
}

/// The plugins of the build tree, loaded once.
pub fn plugins() -> Arc<PluginRegistry> {
    static REG: OnceLock<Arc<PluginRegistry>> = OnceLock::new();
    REG.get_or_init(|| {
        let reg = PluginRegistry::load_dirs(&[build_dir()]);
        for name in ["array", "disk", "null", "fsflush", "fiemap"] {
            assert!(
                reg.get(name).is_some(),
                "plugin {name} not found in {}: build the workspace first (`cargo xtask test` does); refused: {:?}",
                build_dir().display(),
                reg.refused().iter().map(|e| e.to_string()).collect::<Vec<_>>()
            );
        }
        Arc::new(reg)
    })
    .clone()
}

/// A sim-san and an agent in this process.
pub struct Lab {
    /// The simulator.
    pub san: SimSan,
    /// The agent's TCP address.
    pub agent_addr: String,
    /// Scratch space (LUN files, media).
    pub dir: tempfile::TempDir,
}

impl Lab {
    /// Start a simulator with LUNs of the given sizes and an agent that
    /// keeps snapshots after release when `keep` is set.
    pub fn start(seed: u64, luns: &[(&str, u64)], keep: bool) -> Lab {
        Lab::start_in(tempfile::tempdir().expect("tempdir"), seed, luns, keep)
    }

    /// [`Lab::start`] in the scratch directory `dir` (removed with the lab).
    pub fn start_in(dir: tempfile::TempDir, seed: u64, luns: &[(&str, u64)], keep: bool) -> Lab {
        let san = SimSan::start(&dir.path().join("san"), seed, "127.0.0.1:0", "127.0.0.1:0")
            .expect("start sim-san");
        for (name, size) in luns {
            san.array
                .create_lun(name, floe_core::units::Bytes(*size))
                .expect("create LUN");
        }
        let mut plugin_config = HashMap::new();
        plugin_config.insert(
            "array".to_string(),
            serde_json::json!({"control": san.control_addr.to_string(), "keep": keep}),
        );
        let agent = Arc::new(Agent::new(
            plugins(),
            AgentOptions {
                plugin_config,
                host: "apphost".into(),
                max_frame: None,
                allow_sources: vec!["array:*".into()],
                allow_restore: vec![],
                image_lease: std::time::Duration::ZERO,
            },
        ));
        let l = TcpListener::bind("127.0.0.1:0").expect("bind agent");
        let agent_addr = l.local_addr().expect("addr").to_string();
        std::thread::spawn(move || agent.listen(l));
        Lab {
            san,
            agent_addr,
            dir,
        }
    }

    /// A control client.
    pub fn ctl(&self) -> Client {
        self.san.client().expect("control client")
    }

    /// Call the control API, panicking on error.
    pub fn call(&self, op: Op) -> serde_json::Value {
        self.ctl().call(op).expect("control call")
    }

    /// A resolver that reads LUNs over NBD from this SAN.
    pub fn resolver(&self) -> DeviceResolver {
        DeviceResolver::new(HashMap::new(), Some(self.san.nbd_addr.to_string()))
    }

    /// The disk media directory of this lab.
    pub fn media_dir(&self) -> PathBuf {
        self.dir.path().join("media")
    }

    /// A disk media writer into `dir`.
    pub fn disk_writer(dir: &Path) -> Box<dyn MediaWriter> {
        plugins()
            .require("disk", Interface::MediaWriter)
            .and_then(|p| p.media_writer(&serde_json::json!({"dir": dir})))
            .expect("disk writer")
    }

    /// A disk media reader of `dir`.
    pub fn disk_reader(dir: &Path) -> Box<dyn MediaReader> {
        plugins()
            .require("disk", Interface::MediaReader)
            .and_then(|p| p.media_reader(&serde_json::json!({"dir": dir})))
            .expect("disk reader")
    }

    /// Back up sources to this lab's disk media with the engine.
    pub fn backup(&self, sources: &[&str], opts: &MoverOptions) -> floe_core::Result<BackupReport> {
        let mut agent = AgentClient::connect_tcp(&self.agent_addr)?;
        let mut media = Self::disk_writer(&self.media_dir());
        let sources: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
        backup(
            &mut agent,
            &sources,
            &self.resolver(),
            media.as_mut(),
            opts,
            &mut |_| {},
        )
    }

    /// Restore an item of a set to a file; its bytes.
    pub fn restore_to_file(&self, set: &SetId, item: &str) -> floe_core::Result<Vec<u8>> {
        let path = self.dir.path().join(format!("restore-{item}.img"));
        let _ = std::fs::remove_file(&path);
        let mut target = open_target(path.to_str().expect("utf-8 path"))?;
        let mut reader = Self::disk_reader(&self.media_dir());
        restore_item(
            reader.as_mut(),
            set,
            &ItemId::new(item),
            target.as_mut(),
            &mut |_| {},
        )?;
        let bytes = std::fs::read(&path).expect("read restored image");
        let _ = std::fs::remove_file(&path);
        Ok(bytes)
    }

    /// A target's bytes as the array has them now.
    pub fn read_target(&self, target: &str) -> Vec<u8> {
        let size = self.san.array.size(target).expect("target size");
        self.san
            .array
            .read(
                target,
                floe_core::units::DeviceOffset(0),
                floe_core::units::Bytes(size),
            )
            .expect("read target")
    }
}

/// Say loudly that a test is skipped, and why.
pub fn skip(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
}

/// True when running as root.
pub fn is_root() -> bool {
    // /proc/self/status: "Uid: real effective saved fs".
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// True when `cmd` is on PATH.
pub fn have(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .chain(["/usr/sbin".into(), "/sbin".into()])
                .any(|d| d.join(cmd).is_file())
        })
        .unwrap_or(false)
}

/// How a scripted agent misbehaves.
#[derive(Clone, Debug)]
pub enum Script {
    /// Serve this map honestly (checks always valid).
    Map(floe_core::model::ImageMap),
    /// Answer `Freeze` with the first half of a frame, then hang up.
    TruncatedFrame,
}

/// A hand-written agent serving a crafted map: what a buggy or compromised
/// application host could send. Returns its address.
pub fn scripted_agent(script: Script) -> String {
    use floe_core::model::{FrozenImage, FrozenItem};
    use floe_core::protocol::{
        encode_frame, read_message, write_message, Request, Response, DEFAULT_MAX_FRAME, VERSION,
    };
    use std::io::Write;
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        let Ok((s, _)) = l.accept() else { return };
        let mut r = s.try_clone().expect("clone");
        let mut w = s;
        while let Ok(Some(req)) = read_message::<Request>(&mut r, DEFAULT_MAX_FRAME) {
            let resp = match (&script, req) {
                (_, Request::Hello { .. }) => Response::Hello {
                    protocol: VERSION,
                    host: "crafted".into(),
                },
                (Script::TruncatedFrame, Request::Freeze { .. }) => {
                    let frame = encode_frame(br#"{"type":"released"}"#).expect("frame");
                    let _ = w.write_all(&frame[..frame.len() / 2]);
                    return;
                }
                (Script::Map(map), Request::Freeze { sources, .. }) => Response::Frozen {
                    image: FrozenImage {
                        id: map.image.clone(),
                        plugin: "crafted".into(),
                        items: map
                            .items
                            .iter()
                            .zip(sources)
                            .map(|(i, s)| FrozenItem {
                                id: i.id.clone(),
                                source: s,
                                handle: serde_json::Value::Null,
                            })
                            .collect(),
                        frozen_at: 0,
                        mapper: None,
                        writes_held: false,
                    },
                    map: map.clone(),
                    // Asked for parts or not, this agent answers whole.
                    more: false,
                },
                (Script::Map(map), Request::CheckConfig { item, .. }) => Response::Config {
                    current: map
                        .items
                        .iter()
                        .find(|i| i.id == item)
                        .map(|i| i.config.clone())
                        .unwrap_or_default_config(),
                    valid: true,
                },
                (_, Request::Release { .. }) => Response::Released,
                (_, other) => Response::Error {
                    error: floe_core::Error::new(
                        floe_core::ErrorKind::Protocol,
                        format!("scripted agent got {other:?}"),
                    )
                    .to_wire(),
                },
            };
            if write_message(&mut w, &resp).is_err() {
                return;
            }
        }
    });
    addr
}

trait OrDefaultConfig {
    fn unwrap_or_default_config(self) -> floe_core::model::ConfigId;
}
impl OrDefaultConfig for Option<floe_core::model::ConfigId> {
    fn unwrap_or_default_config(self) -> floe_core::model::ConfigId {
        self.unwrap_or_else(|| floe_core::model::ConfigId::new("none"))
    }
}

/// Assert two images are byte-identical, saying where they first differ
/// (never printing megabytes of bytes).
#[track_caller]
pub fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b);
    panic!(
        "{what}: images differ: got {} bytes (blake3 {}), want {} bytes (blake3 {}), first difference at byte {:?}",
        got.len(),
        blake3::hash(got).to_hex(),
        want.len(),
        blake3::hash(want).to_hex(),
        first
    );
}

/// A sim-san process, killed (by its pid) when dropped.
pub struct SimSanProcess {
    child: std::process::Child,
    /// NBD address.
    pub nbd: String,
    /// Control API address.
    pub control: String,
    _dir: tempfile::TempDir,
}

impl SimSanProcess {
    /// Start with pool LUNs and raw LUNs (`NAME=SIZE`).
    pub fn start(luns: &[&str], raw: &[&str]) -> SimSanProcess {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = std::process::Command::new(build_dir().join("floe-sim-san"));
        cmd.args([
            "serve",
            "--dir",
            dir.path().to_str().unwrap(),
            "--nbd",
            "127.0.0.1:0",
            "--control",
            "127.0.0.1:0",
        ]);
        for l in luns {
            cmd.args(["--lun", l]);
        }
        for l in raw {
            cmd.args(["--raw-lun", l]);
        }
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start floe-sim-san");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).expect("ready line");
        SimSanProcess {
            child,
            nbd: v["nbd"].as_str().unwrap().to_string(),
            control: v["control"].as_str().unwrap().to_string(),
            _dir: dir,
        }
    }

    /// Create volumes (`NAME`, bytes), give each a seeded workload of
    /// `writes` writes, and return their BLAKE3 — the bytes a backup frozen
    /// now must restore.
    pub fn volumes(&self, specs: &[(&str, u64)], writes: u32) -> Vec<String> {
        specs
            .iter()
            .enumerate()
            .map(|(i, (v, size))| {
                self.ctl(&format!(r#"{{"op":"create_volume","name":"{v}","size":{size}}}"#));
                self.ctl(&format!(
                    r#"{{"op":"workload","target":"{v}","seed":{i},"writes":{writes},"max_length":262144}}"#
                ));
                self.ctl(&format!(r#"{{"op":"checksum","target":"{v}"}}"#))["blake3"]
                    .as_str()
                    .expect("checksum")
                    .to_string()
            })
            .collect()
    }

    /// Send a control request (JSON without `v`).
    pub fn ctl(&self, req: &str) -> serde_json::Value {
        let out = std::process::Command::new(build_dir().join("floe-sim-san"))
            .args(["ctl", "--control", &self.control, req])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ctl {req}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for SimSanProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// sim-san's virtual tape library as a process (`floe-sim-san vtl
/// serve`), killed (by its pid) when dropped.
pub struct VtlProcess {
    child: std::process::Child,
    /// The library's address.
    pub addr: String,
    /// Its cartridge files.
    pub dir: tempfile::TempDir,
}

impl VtlProcess {
    /// A library of `drives` drives and `cartridges` empty cartridges of
    /// `capacity` bytes, the last `early_warning` of them past the early
    /// warning.
    pub fn start(drives: u32, cartridges: u32, capacity: u64, early_warning: u64) -> VtlProcess {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(build_dir().join("floe-sim-san"))
            .args(["vtl", "serve", "--listen", "127.0.0.1:0", "--dir"])
            .arg(dir.path())
            .args(["--drives", &drives.to_string()])
            .args(["--cartridges", &cartridges.to_string()])
            .args(["--capacity", &capacity.to_string()])
            .args(["--early-warning", &early_warning.to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start floe-sim-san vtl serve");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).expect("ready line");
        VtlProcess {
            child,
            addr: v["library"].as_str().unwrap().to_string(),
            dir,
        }
    }

    /// The drive's device name for the tape plugin.
    pub fn device(&self, drive: u32) -> String {
        format!("vtl://{}/{drive}", self.addr)
    }

    /// The changer command a tape plugin runs (`… next`, `… load L`).
    pub fn changer(&self, drive: u32) -> String {
        format!(
            "{} vtl changer --library {} --drive {drive}",
            build_dir().join("floe-sim-san").display(),
            self.addr
        )
    }

    /// Run a changer verb; its stdout.
    pub fn change(&self, drive: u32, verb: &[&str]) -> Result<String, String> {
        let out = std::process::Command::new(build_dir().join("floe-sim-san"))
            .args([
                "vtl",
                "changer",
                "--library",
                &self.addr,
                "--drive",
                &drive.to_string(),
            ])
            .args(verb)
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    }

    /// The library's inventory (slots, drives, per-drive counters).
    pub fn inventory(&self) -> serde_json::Value {
        serde_json::from_str(&self.change(0, &["inventory"]).expect("inventory")).unwrap()
    }
}

impl Drop for VtlProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An item of one data extent: `blocks` 512-byte blocks of `device` from
/// `start_block` — the shape of the crafted maps a bad agent sends.
pub fn one_extent_item(
    name: &str,
    device: &str,
    start_block: u64,
    blocks: u64,
) -> floe_core::model::Item {
    use floe_core::model::*;
    use floe_core::units::{BlockSize, Blocks, Bytes, ItemOffset};
    Item {
        id: ItemId::new(name),
        kind: ItemKind::Volume,
        size: Bytes(blocks * 512),
        config: ConfigId::new("c1"),
        extents: vec![MapExtent {
            logical: ItemOffset(0),
            length: Bytes(blocks * 512),
            kind: ExtentKind::Data(ExtentChain {
                layers: vec![],
                physical: PhysicalExtent {
                    device: DeviceId::new(device),
                    start: Blocks(start_block),
                    count: Blocks(blocks),
                    block_size: BlockSize::SECTOR,
                },
            }),
        }],
        meta: Default::default(),
        file: None,
    }
}
