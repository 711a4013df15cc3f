//! Trust and faults: least privilege on both sides, and every fault of the
//! SAN, the network and the agent ends in a documented outcome — never in a
//! backup that looks complete but is not.

use floe_core::agent::{Agent, AgentClient, AgentOptions};
use floe_core::device::{DeviceResolver, Location, NbdOptions};
use floe_core::model::*;
use floe_core::mover::{backup, BackupReport, MoverOptions};
use floe_core::units::{Bytes, DeviceOffset};
use floe_core::ErrorKind;
use floe_sim_san::control::{Op, TargetMap};
use floe_tests::{
    assert_same_bytes, floe_cmd, have, is_root, plugins, scripted_agent, skip, Lab, Script,
    SimSanProcess,
};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn lab_with_volume(size: u64) -> (Lab, Vec<u8>, TargetMap) {
    let lab = Lab::start(21, &[("lun0", 32 * MIB), ("lun1", 32 * MIB)], false);
    lab.call(Op::CreateVolume {
        name: "vol0".into(),
        size: Bytes(size),
        max_run_chunks: Some(4),
        luns: Some(vec!["lun0".into()]),
    });
    lab.call(Op::Workload {
        target: "vol0".into(),
        seed: 3,
        writes: 200,
        max_length: Bytes(256 * 1024),
    });
    let frozen = lab.read_target("vol0");
    let map = lab
        .ctl()
        .call_as(Op::Map {
            target: "vol0".into(),
        })
        .expect("map");
    (lab, frozen, map)
}

fn run(
    lab: &Lab,
    resolver: &DeviceResolver,
    opts: &MoverOptions,
) -> floe_core::Result<BackupReport> {
    let mut agent = AgentClient::connect_tcp(&lab.agent_addr)?;
    let mut media = Lab::disk_writer(&lab.media_dir());
    backup(
        &mut agent,
        &["array:vol0".to_string()],
        resolver,
        media.as_mut(),
        opts,
        &mut |_| {},
    )
}

fn no_sets(lab: &Lab) -> bool {
    !lab.media_dir().exists()
        || Lab::disk_reader(&lab.media_dir())
            .list_sets()
            .expect("list")
            .is_empty()
}

fn small_reads() -> MoverOptions {
    MoverOptions {
        window: Bytes(MIB),
        max_read: Bytes(256 * 1024),
        ..MoverOptions::default()
    }
}

#[test]
fn a_dropped_nbd_connection_is_reconnected_and_the_backup_completes() {
    let (lab, frozen, map) = lab_with_volume(4 * MIB);
    let e = &map.extents[0];
    lab.call(Op::InjectDisconnect {
        lun: "lun0".into(),
        offset: e.lun_offset,
        length: Bytes(64 * 1024),
        count: Some(3),
    });
    let report =
        run(&lab, &lab.resolver(), &small_reads()).expect("backup survives three disconnects");
    assert_same_bytes(
        &lab.restore_to_file(&report.set.header.set, "vol0")
            .expect("restore"),
        &frozen,
        "vol0",
    );
}

#[test]
fn a_connection_that_keeps_dropping_fails_after_bounded_retries() {
    let (lab, _, map) = lab_with_volume(4 * MIB);
    let e = &map.extents[0];
    lab.call(Op::InjectDisconnect {
        lun: "lun0".into(),
        offset: e.lun_offset,
        length: Bytes(4096),
        count: None,
    });
    let resolver = lab.resolver().with_nbd_options(NbdOptions {
        retries: 3,
        backoff: Duration::from_millis(10),
        ..NbdOptions::default()
    });
    let t = Instant::now();
    let err = run(&lab, &resolver, &small_reads()).expect_err("must give up");
    assert!(t.elapsed() < Duration::from_secs(20), "retries are bounded");
    assert_eq!(err.kind(), ErrorKind::ReadFailed, "{err}");
    assert!(
        err.to_string().contains("gave up after 3 reconnects"),
        "{err}"
    );
    assert_eq!(err.context().item, Some(ItemId::new("vol0")), "{err}");
    assert!(no_sets(&lab));
}

#[test]
fn a_slow_san_is_slow_but_exact() {
    let (lab, frozen, _) = lab_with_volume(2 * MIB);
    lab.call(Op::InjectLatency {
        lun: "lun0".into(),
        offset: DeviceOffset(0),
        length: Bytes(32 * MIB),
        millis: 30,
        micros: 0,
    });
    let t = Instant::now();
    let report = run(&lab, &lab.resolver(), &small_reads()).expect("backup");
    assert!(
        t.elapsed() >= Duration::from_millis(30 * 2),
        "the latency was in the path"
    );
    assert_same_bytes(
        &lab.restore_to_file(&report.set.header.set, "vol0")
            .expect("restore"),
        &frozen,
        "vol0",
    );
}

#[test]
fn a_device_not_on_the_allow_list_is_refused_before_any_read_naming_agent_item_device() {
    let (lab, _, map) = lab_with_volume(2 * MIB);
    let other = lab.san.array.luns()[1].wwn.clone();
    let resolver = lab.resolver().with_allow_list([DeviceId::new(other)]);
    lab.call(Op::Schedule { events: vec![] }); // resets the read counter
    let err = run(&lab, &resolver, &MoverOptions::default()).expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::Denied, "{err}");
    assert_eq!(err.context().agent.as_deref(), Some("apphost"), "{err}");
    assert_eq!(err.context().item, Some(ItemId::new("vol0")), "{err}");
    assert_eq!(
        err.context().device,
        Some(DeviceId::new(map.extents[0].wwn.clone())),
        "{err}"
    );
    assert_eq!(lab.san.array.stats().reads, 0, "not one read");
    assert!(no_sets(&lab));
    // The snapshot was released all the same.
    assert!(lab
        .ctl()
        .call(Op::Map {
            target: "vol0@*".into()
        })
        .is_err());
}

#[test]
fn a_device_whose_own_identity_differs_from_the_map_is_refused() {
    let lab = Lab::start(1, &[("lun0", 8 * MIB)], false);
    let claimed = "naa.6001405000000000000000000c1a1ed";
    let item = floe_tests::one_extent_item("evil", claimed, 0, 8);
    let addr = scripted_agent(Script::Map(ImageMap {
        image: ImageId::new("i"),
        items: vec![item],
        failures: Vec::new(),
    }));
    // The operator (wrongly) says the claimed device is lun0; lun0 says
    // otherwise on the wire.
    let mut table = HashMap::new();
    table.insert(
        DeviceId::new(claimed),
        Location::Nbd(lab.san.nbd_addr.to_string(), "lun0".into()),
    );
    let resolver = DeviceResolver::new(table, None);
    let mut agent = AgentClient::connect_tcp(&addr).unwrap();
    let mut media = Lab::disk_writer(&lab.media_dir());
    let err = backup(
        &mut agent,
        &["crafted:evil".into()],
        &resolver,
        media.as_mut(),
        &MoverOptions::default(),
        &mut |_| {},
    )
    .expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::IdentityMismatch, "{err}");
    assert!(
        err.to_string().contains(&lab.san.array.luns()[0].wwn),
        "{err}"
    );
    assert_eq!(err.context().agent.as_deref(), Some("crafted"), "{err}");
    assert_eq!(err.context().item, Some(ItemId::new("evil")), "{err}");
    assert_eq!(lab.san.array.stats().reads, 0);
}

#[test]
fn the_agent_refuses_sources_outside_its_allowed_roots() {
    let lab = Lab::start(1, &[("lun0", 16 * MIB)], false);
    for v in ["public0", "secret"] {
        lab.call(Op::CreateVolume {
            name: v.into(),
            size: Bytes(MIB),
            max_run_chunks: None,
            luns: None,
        });
    }
    let mut plugin_config = HashMap::new();
    plugin_config.insert(
        "array".to_string(),
        serde_json::json!({"control": lab.san.control_addr.to_string()}),
    );
    let agent = Arc::new(Agent::new(
        plugins(),
        AgentOptions {
            plugin_config,
            host: "strict".into(),
            max_frame: None,
            allow_sources: vec!["array:public*".into()],
            allow_restore: vec![],
            image_lease: Duration::ZERO,
        },
    ));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || agent.listen(l));
    let mut client = AgentClient::connect_tcp(&addr).unwrap();
    let err = client
        .freeze(&["array:public0".into(), "array:secret".into()])
        .expect_err("denied");
    assert_eq!(err.kind(), ErrorKind::Denied, "{err}");
    assert!(
        err.to_string()
            .contains("source array:secret is not under this agent's allowed sources"),
        "{err}"
    );
    assert!(
        lab.ctl()
            .call(Op::Map {
                target: "public0@*".into()
            })
            .is_err(),
        "nothing was frozen"
    );
    let (image, _) = client.freeze(&["array:public0".into()]).expect("allowed");
    client.release(&image.id).unwrap();
}

#[test]
fn the_agent_killed_mid_backup_fails_the_backup_and_records_nothing() {
    let san = SimSanProcess::start(&["lun0=64M"], &[]);
    san.ctl(r#"{"op":"create_volume","name":"vol0","size":16777216}"#);
    san.ctl(r#"{"op":"inject_latency","lun":"lun0","offset":0,"length":67108864,"millis":40}"#);
    let mut agent = floe_cmd()
        .args([
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--allow-source",
            "array:*",
            "--plugin-opt",
        ])
        .arg(format!("array.control={}", san.control))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(agent.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();
    let media = tempfile::tempdir().unwrap();
    let mover = backup_cmd(
        &san,
        &addr,
        &["array:vol0"],
        &format!("disk:{}", media.path().display()),
    )
    .args(["--max-read", "256K", "--window", "1M", "--parallel", "1"])
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    agent.kill().unwrap(); // our own child, by pid
    agent.wait().unwrap();
    let out = mover.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing was recorded as complete"), "{err}");
    assert!(
        err.contains("[remote]") || err.contains("[protocol]"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(media.path()).unwrap().count(),
        0,
        "no set, no partial set"
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An nbdkit serving a file, killed (by pid) when dropped.
struct Nbdkit(std::process::Child, String);

impl Nbdkit {
    fn start(file: &std::path::Path, filter: &[&str]) -> Nbdkit {
        let port = free_port();
        let mut cmd = Command::new("nbdkit");
        cmd.args(["-f", "-i", "127.0.0.1", "-p", &port.to_string()]);
        for f in filter.iter().filter(|a| a.starts_with("--filter")) {
            cmd.arg(f);
        }
        cmd.arg("file").arg(file);
        for a in filter.iter().filter(|a| !a.starts_with("--filter")) {
            cmd.arg(a);
        }
        let child = cmd.stderr(Stdio::null()).spawn().expect("nbdkit");
        let addr = format!("127.0.0.1:{port}");
        for _ in 0..100 {
            if std::net::TcpStream::connect(&addr).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Nbdkit(child, addr)
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nbdkit_case(filter: &[&str]) -> (floe_core::Result<BackupReport>, Vec<u8>, Lab) {
    let lab = Lab::start(1, &[("lun0", 8 * MIB)], false);
    let file = lab.dir.path().join("disk.img");
    let mut data = vec![0u8; usize::try_from(4 * MIB).unwrap()];
    floe_sim_san::array::Rng::new(5).fill(&mut data);
    std::fs::write(&file, &data).unwrap();
    let kit = Nbdkit::start(&file, filter);
    let id = "naa.60014050000000000000000000bdc17";
    let item = floe_tests::one_extent_item("disk", id, 0, 4 * MIB / 512);
    let addr = scripted_agent(Script::Map(ImageMap {
        image: ImageId::new("i"),
        items: vec![item],
        failures: Vec::new(),
    }));
    let mut table = HashMap::new();
    table.insert(
        DeviceId::new(id),
        Location::Nbd(kit.1.clone(), String::new()),
    );
    let resolver = DeviceResolver::new(table, None).with_nbd_options(NbdOptions {
        retries: 1,
        backoff: Duration::from_millis(10),
        ..NbdOptions::default()
    });
    let mut agent = AgentClient::connect_tcp(&addr).unwrap();
    let mut media = Lab::disk_writer(&lab.media_dir());
    let r = backup(
        &mut agent,
        &["crafted:disk".into()],
        &resolver,
        media.as_mut(),
        &small_reads(),
        &mut |_| {},
    );
    (r, data, lab)
}

#[test]
fn eio_from_nbdkits_error_filter_fails_the_backup_naming_the_device() {
    if !have("nbdkit") {
        return skip(
            "eio_from_nbdkits_error_filter_fails_the_backup_naming_the_device",
            "nbdkit is not installed",
        );
    }
    let (r, _, lab) = nbdkit_case(&["--filter=error", "error-pread=EIO", "error-pread-rate=100%"]);
    let err = r.expect_err("EIO must fail the backup");
    assert_eq!(err.kind(), ErrorKind::ReadFailed, "{err}");
    assert_eq!(
        err.context().device,
        Some(DeviceId::new("naa.60014050000000000000000000bdc17"))
    );
    assert!(
        err.context().offset.is_some() && err.to_string().contains("EIO"),
        "{err}"
    );
    assert!(no_sets(&lab));
}

#[test]
fn nbdkits_delay_filter_is_slow_but_exact() {
    if !have("nbdkit") {
        return skip(
            "nbdkits_delay_filter_is_slow_but_exact",
            "nbdkit is not installed",
        );
    }
    let (r, data, lab) = nbdkit_case(&["--filter=delay", "rdelay=20ms"]);
    let report = r.expect("backup");
    assert_same_bytes(
        &lab.restore_to_file(&report.set.header.set, "disk").unwrap(),
        &data,
        "disk",
    );
}

/// nbdfuse + a loop device over a sim-san LUN: a real kernel block device
/// whose reads go through sim-san. Cleaned up when dropped.
struct KernelPath {
    fuse: std::process::Child,
    mnt: std::path::PathBuf,
    loopdev: String,
}

impl KernelPath {
    fn start(nbd: &str, export: &str, mnt: &std::path::Path) -> Option<KernelPath> {
        std::fs::create_dir_all(mnt).ok()?;
        let fuse = Command::new("nbdfuse")
            .arg(mnt)
            .arg(format!("nbd://{nbd}/{export}"))
            .spawn()
            .ok()?;
        let file = mnt.join("nbd");
        let mut kp = KernelPath {
            fuse,
            mnt: mnt.to_path_buf(),
            loopdev: String::new(),
        };
        for _ in 0..100 {
            if file.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = Command::new("losetup")
            .args(["--direct-io=on", "--read-only", "-f", "--show"])
            .arg(&file)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        kp.loopdev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Some(kp)
    }
}

impl Drop for KernelPath {
    fn drop(&mut self) {
        if !self.loopdev.is_empty() {
            let _ = Command::new("losetup").args(["-d", &self.loopdev]).status();
        }
        // Detaching a loop device is asynchronous: wait until the FUSE
        // file is no longer busy, and unmount lazily if it stays busy.
        let mut unmounted = false;
        for _ in 0..50 {
            if Command::new("umount")
                .arg(&self.mnt)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
            {
                unmounted = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        let _ = self.fuse.kill();
        let _ = self.fuse.wait();
    }
}

#[test]
fn kernel_eio_through_nbdfuse_and_a_loop_device_fails_the_backup_precisely() {
    let name = "kernel_eio_through_nbdfuse_and_a_loop_device_fails_the_backup_precisely";
    if !is_root() || !have("nbdfuse") || !std::path::Path::new("/dev/fuse").exists() {
        return skip(name, "needs root, nbdfuse (libnbd-bin) and /dev/fuse");
    }
    let (lab, frozen, map) = lab_with_volume(4 * MIB);
    let lun = lab.san.array.luns().remove(0);
    let Some(kp) = KernelPath::start(
        &lab.san.nbd_addr.to_string(),
        "lun0",
        &lab.dir.path().join("fuse"),
    ) else {
        return skip(name, "nbdfuse or losetup failed");
    };
    let mut table = HashMap::new();
    table.insert(
        DeviceId::new(lun.wwn.clone()),
        Location::Path(kp.loopdev.clone().into()),
    );
    let resolver =
        DeviceResolver::new(table, None).with_allow_list([DeviceId::new(lun.wwn.clone())]);
    // Through the kernel, O_DIRECT, exact.
    let report = run(&lab, &resolver, &small_reads()).expect("backup through the loop device");
    drop(resolver); // closes the loop device
    assert_same_bytes(
        &lab.restore_to_file(&report.set.header.set, "vol0").unwrap(),
        &frozen,
        "vol0",
    );
    // A bad sector on the SAN is a kernel EIO at exactly that place.
    let bad = map.extents[0].lun_offset.0 + 128 * 1024;
    lab.call(Op::InjectError {
        lun: "lun0".into(),
        offset: DeviceOffset(bad),
        length: Bytes(4096),
        count: None,
    });
    let resolver = DeviceResolver::new(
        [(
            DeviceId::new(lun.wwn.clone()),
            Location::Path(kp.loopdev.clone().into()),
        )]
        .into_iter()
        .collect(),
        None,
    );
    let err = run(&lab, &resolver, &small_reads()).expect_err("EIO");
    assert_eq!(err.kind(), ErrorKind::ReadFailed, "{err}");
    assert_eq!(err.context().device, Some(DeviceId::new(lun.wwn.clone())));
    let (off, len) = (
        err.context().offset.unwrap().0,
        err.context().length.unwrap().0,
    );
    assert!(off <= bad && bad < off + len, "{err}");
    assert!(err.to_string().contains("Input/output error"), "{err}");
    drop(resolver);
    drop(kp);
}

/// A floe agent daemon (TCP), killed by pid when dropped; its address.
fn agent_daemon(san: &SimSanProcess, lease_secs: u64) -> (AgentDaemon, String) {
    let mut agent = floe_cmd()
        .args([
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--allow-source",
            "array:*",
            "--image-lease",
            &lease_secs.to_string(),
        ])
        .arg("--plugin-opt")
        .arg(format!("array.control={}", san.control))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut r = BufReader::new(agent.stderr.take().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    std::thread::spawn(move || for _ in r.lines() {});
    (
        AgentDaemon(agent),
        line.trim().rsplit(' ').next().unwrap().to_string(),
    )
}

struct AgentDaemon(std::process::Child);

impl Drop for AgentDaemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start a mover, wait until its set has `items` durable items, kill it;
/// the set id.
fn kill_mover_after(
    san: &SimSanProcess,
    agent: &str,
    media: &std::path::Path,
    sources: &[&str],
    items: usize,
) -> String {
    kill_mover_on(san, agent, "disk", media, sources, items, &[])
}

/// Where a media plugin keeps the journal of an unfinished set.
fn journal_of(plugin: &str, media: &std::path::Path, set: &str) -> std::path::PathBuf {
    match plugin {
        "tar" => media.join(format!(".{set}.tar.journal")),
        _ => media.join(format!(".{set}.partial")).join("journal.jsonl"),
    }
}

/// `floe backup --resume SET` against a daemon agent, with `extra` args.
fn resume(
    san: &SimSanProcess,
    agent: &str,
    plugin: &str,
    media: &std::path::Path,
    set: &str,
    extra: &[&str],
) -> std::process::Output {
    floe_cmd()
        .args([
            "backup",
            "--agent",
            agent,
            "--resume",
            set,
            "--san",
            &format!("nbd://{}", san.nbd),
            "--allow-any-device",
        ])
        .args(extra)
        .arg("--media")
        .arg(format!("{plugin}:{}", media.display()))
        .output()
        .unwrap()
}

fn kill_mover_on(
    san: &SimSanProcess,
    agent: &str,
    plugin: &str,
    media: &std::path::Path,
    sources: &[&str],
    items: usize,
    opts: &[&str],
) -> String {
    let mut cmd = floe_cmd();
    cmd.args([
        "backup",
        "--agent",
        agent,
        "--san",
        &format!("nbd://{}", san.nbd),
        "--allow-any-device",
    ])
    .arg("--media")
    .arg(format!("{plugin}:{}", media.display()))
    .args(["--max-read", "256K", "--window", "1M", "--parallel", "1"])
    .args(opts);
    for s in sources {
        cmd.args(["--source", s]);
    }
    let mut mover = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let mut r = BufReader::new(mover.stderr.take().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let set = line
        .split_whitespace()
        .nth(2)
        .expect("set id in the begun line")
        .to_string();
    let journal = journal_of(plugin, media, &set);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = std::fs::read(&journal)
            .ok()
            .map(|b| {
                // JSON lines: a head, then one line per durable item.
                String::from_utf8_lossy(&b)
                    .lines()
                    .filter(|l| l.starts_with("{\"item\""))
                    .count()
            })
            .unwrap_or(0);
        if n >= items {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the mover never finished {items} item(s): {line}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    mover.kill().unwrap(); // SIGKILL, our own child
    mover.wait().unwrap();
    set
}

#[test]
fn a_mover_killed_mid_backup_resumes_from_the_last_durable_item() {
    let san = SimSanProcess::start(&["lun0=128M"], &[]);
    let sizes = [("vol0", 4u64 << 20), ("vol1", 8 << 20), ("vol2", 8 << 20)];
    let frozen = san.volumes(&sizes, 100);
    san.ctl(r#"{"op":"inject_latency","lun":"lun0","offset":0,"length":134217728,"millis":15}"#);
    let (_agent, addr) = agent_daemon(&san, 60);
    let media = tempfile::tempdir().unwrap();
    let set = kill_mover_after(
        &san,
        &addr,
        media.path(),
        &["array:vol0", "array:vol1", "array:vol2"],
        1,
    );

    // The application writes on; the frozen image must not care.
    san.ctl(r#"{"op":"write","target":"vol1","offset":0,"length":4194304,"seed":99}"#);
    san.ctl(r#"{"op":"clear_faults"}"#);
    san.ctl(r#"{"op":"schedule","events":[]}"#); // reset the read counters
    let out = resume(&san, &addr, "disk", media.path(), &set, &["--json"]);
    assert!(
        out.status.success(),
        "resume failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("resuming set"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let items = report["set"]["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    for (i, (v, _)) in sizes.iter().enumerate() {
        assert_eq!(items[i]["header"]["item"].as_str(), Some(*v));
        assert_eq!(
            items[i]["trailer"]["blake3"].as_str(),
            Some(frozen[i].as_str()),
            "{v}"
        );
    }
    // vol1 + vol2 are 16 MiB; vol0 (4 MiB) must not be read again. Allow one
    // read of the killed mover that the array was still serving.
    let read = san.ctl(r#"{"op":"stats"}"#)["bytes_read"].as_u64().unwrap();
    assert!(
        read <= (16 << 20) + (1 << 20),
        "the finished item was read again: {read} bytes read on resume"
    );
    // Restorable, byte for byte.
    let target = media.path().join("vol0.img");
    let out = floe_cmd()
        .args([
            "restore",
            "--media",
            &format!("disk:{}", media.path().display()),
            "--set",
            &set,
        ])
        .arg("--to")
        .arg(format!("vol0={}", target.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        blake3::hash(&std::fs::read(&target).unwrap())
            .to_hex()
            .to_string(),
        frozen[0]
    );
    // The agent released the image after the resumed backup.
    let ctl = san.ctl(r#"{"op":"list_luns"}"#);
    assert!(ctl.is_array());
    let snap = Command::new(floe_tests::build_dir().join("floe-sim-san"))
        .args([
            "ctl",
            "--control",
            &san.control,
            r#"{"op":"map","target":"vol1@*"}"#,
        ])
        .output()
        .unwrap();
    assert!(!snap.status.success(), "the snapshot is gone");
}

#[test]
fn resuming_after_the_image_lease_ran_out_fails_clearly_and_leaves_nothing() {
    let san = SimSanProcess::start(&["lun0=64M"], &[]);
    for v in ["vol0", "vol1"] {
        san.ctl(&format!(
            r#"{{"op":"create_volume","name":"{v}","size":4194304}}"#
        ));
    }
    san.ctl(r#"{"op":"inject_latency","lun":"lun0","offset":0,"length":67108864,"millis":15}"#);
    let (_agent, addr) = agent_daemon(&san, 1);
    let media = tempfile::tempdir().unwrap();
    let set = kill_mover_after(&san, &addr, media.path(), &["array:vol0", "array:vol1"], 1);
    std::thread::sleep(Duration::from_millis(2500)); // the lease (1 s) runs out; the reaper releases
    let out = resume(&san, &addr, "disk", media.path(), &set, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not waiting on this agent"), "{err}");
    assert_eq!(
        std::fs::read_dir(media.path()).unwrap().count(),
        0,
        "the partial set was removed"
    );
    let snap = Command::new(floe_tests::build_dir().join("floe-sim-san"))
        .args([
            "ctl",
            "--control",
            &san.control,
            r#"{"op":"map","target":"vol0@*"}"#,
        ])
        .output()
        .unwrap();
    assert!(
        !snap.status.success(),
        "the orphaned snapshot was released when its lease ran out"
    );
}

#[test]
fn an_archive_that_cannot_be_made_durable_fails_the_backup_and_records_nothing() {
    // The tar writer's fsyncs run behind it, on their own thread: an EIO
    // there must still fail the set, never commit it.
    let san = SimSanProcess::start(&["lun0=64M"], &[]);
    san.volumes(&[("vol0", 4 << 20), ("vol1", 4 << 20)], 50);
    let (_agent, addr) = agent_daemon(&san, 60);
    let media = tempfile::tempdir().unwrap();
    let out = backup_cmd(
        &san,
        &addr,
        &["array:vol0", "array:vol1"],
        &format!("tar:{}", media.path().display()),
    )
    .env("FLOE_ERRPOINT", "tar-sync")
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the backup succeeded: {err}");
    assert!(
        err.contains("fsync archive") && err.contains("Input/output error"),
        "{err}"
    );
    let committed: Vec<_> = std::fs::read_dir(media.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tar"))
        .collect();
    assert!(
        committed.is_empty(),
        "an archive was committed: {committed:?}"
    );
    assert_no_set_on(&format!("tar:{}", media.path().display()));
}

/// `floe backup` of `sources` through the agent at `agent`, reading the
/// SAN's devices, to `media`.
fn backup_cmd(
    san: &SimSanProcess,
    agent: &str,
    sources: &[&str],
    media: &str,
) -> std::process::Command {
    let mut c = floe_cmd();
    c.args([
        "backup",
        "--agent",
        agent,
        "--san",
        &format!("nbd://{}", san.nbd),
        "--allow-any-device",
    ]);
    for s in sources {
        c.args(["--source", s]);
    }
    c.args(["--media", media]);
    c
}

/// `floe list --media SPEC` runs and lists no set.
fn assert_no_set_on(spec: &str) {
    let list = floe_cmd().args(["list", "--media", spec]).output().unwrap();
    assert!(
        list.status.success() && list.stdout.is_empty(),
        "a set is listed on {spec}: {}{}",
        String::from_utf8_lossy(&list.stdout),
        String::from_utf8_lossy(&list.stderr)
    );
}

#[test]
fn a_writer_killed_during_commit_leaves_no_set_pointing_at_unfinished_media() {
    let san = SimSanProcess::start(&["lun0=64M"], &[]);
    let want = san.volumes(&[("vol0", 4 << 20), ("vol1", 4 << 20)], 50);
    let (_agent, addr) = agent_daemon(&san, 60);
    let media = tempfile::tempdir().unwrap();
    let backup = |extra: &[&str], failpoint: Option<&str>| {
        let mut cmd = floe_cmd();
        cmd.args([
            "backup",
            "--agent",
            &addr,
            "--san",
            &format!("nbd://{}", san.nbd),
            "--allow-any-device",
            "--json",
        ])
        .arg("--media")
        .arg(format!("disk:{}", media.path().display()))
        .args(extra);
        if let Some(f) = failpoint {
            cmd.env("FLOE_FAILPOINT", f);
        }
        cmd.output().unwrap()
    };
    // The mover dies after every item and the manifest are durable, just
    // before the rename that makes the set visible.
    let out = backup(
        &["--source", "array:vol0", "--source", "array:vol1"],
        Some("disk-commit-before-rename"),
    );
    assert!(!out.status.success(), "the failpoint killed the mover");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("failpoint disk-commit-before-rename"), "{err}");
    assert_no_set_on(&format!("disk:{}", media.path().display()));
    // Nothing was lost: the interrupted set resumes and commits.
    let set = err
        .lines()
        .find_map(|l| l.strip_prefix("floe: set "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    let out = backup(&["--resume", &set], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for (i, w) in want.iter().enumerate() {
        assert_eq!(
            report["set"]["items"][i]["trailer"]["blake3"].as_str(),
            Some(w.as_str())
        );
    }
    let list = floe_cmd()
        .args([
            "list",
            "--media",
            &format!("disk:{}", media.path().display()),
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&list.stdout).contains(&set));
}

#[test]
fn a_local_device_that_says_it_is_something_else_is_refused() {
    let name = "a_local_device_that_says_it_is_something_else_is_refused";
    if !is_root() || !have("losetup") {
        return skip(name, "needs root and losetup to attach a loop device");
    }
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    for f in [&a, &b] {
        std::fs::write(f, vec![7u8; 1 << 20]).unwrap();
    }
    let out = Command::new("losetup")
        .args(["--read-only", "-f", "--show"])
        .arg(&a)
        .output()
        .unwrap();
    if !out.status.success() {
        return skip(name, "losetup could not attach a loop device");
    }
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _detach = Detach(dev.clone());
    let resolve = |id: String| {
        let table = [(
            DeviceId::new(id.clone()),
            Location::Path(dev.clone().into()),
        )]
        .into_iter()
        .collect();
        DeviceResolver::new(table, None)
            .resolve(&DeviceId::new(id))
            .map(|_| ())
    };
    let err = resolve(format!("file:{}", b.display())).expect_err("the loop device is over a.img");
    assert_eq!(err.kind(), ErrorKind::IdentityMismatch, "{err}");
    assert!(err.to_string().contains("a.img"), "{err}");
    resolve(format!("file:{}", a.display())).expect("the loop device is over a.img");
}

/// Plain and compressed (`compress=zstd`, resumed without the option:
/// the set's journal says how it goes on).
#[test]
fn a_mover_killed_while_writing_tar_media_resumes_into_one_archive_gnu_tar_reads() {
    let name = "a_mover_killed_while_writing_tar_media_resumes_into_one_archive_gnu_tar_reads";
    for (opts, ext) in [
        (&[][..], "tar"),
        (&["--media-opt", "compress=zstd"][..], "tar.zst"),
    ] {
        let san = SimSanProcess::start(&["lun0=64M"], &[]);
        let want = san.volumes(&[("vol0", 4 << 20), ("vol1", 4 << 20)], 50);
        san.ctl(r#"{"op":"inject_latency","lun":"lun0","offset":0,"length":67108864,"millis":15}"#);
        let (_agent, addr) = agent_daemon(&san, 60);
        let media = tempfile::tempdir().unwrap();
        let set = kill_mover_on(
            &san,
            &addr,
            "tar",
            media.path(),
            &["array:vol0", "array:vol1"],
            1,
            opts,
        );
        san.ctl(r#"{"op":"clear_faults"}"#);
        let out = resume(&san, &addr, "tar", media.path(), &set, &[]);
        assert!(
            out.status.success(),
            "resume ({ext}) failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let archive = media.path().join(format!("{set}.{ext}"));
        assert!(archive.exists(), "{}", archive.display());
        let missing = ["tar", "zstd"]
            .into_iter()
            .take(if ext == "tar" { 1 } else { 2 })
            .find(|t| !have(t));
        if let Some(t) = missing {
            skip(
                &format!("{name} (GNU tar part, {ext})"),
                &format!("{t} is not installed"),
            );
            continue;
        }
        let dest = media.path().join("x");
        std::fs::create_dir_all(&dest).unwrap();
        let st = Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&dest)
            .status()
            .unwrap();
        assert!(st.success(), "{ext}");
        for (i, v) in ["vol0", "vol1"].iter().enumerate() {
            let bytes = std::fs::read(dest.join(&set).join(v)).unwrap();
            assert_eq!(
                blake3::hash(&bytes).to_hex().to_string(),
                want[i],
                "{ext} {v}"
            );
        }
    }
}
