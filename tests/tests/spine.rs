//! End to end through the simulated SAN: freeze, map, move with remaps in
//! every window, commit, restore — and every kind of bad input.

use floe_core::model::*;
use floe_core::mover::MoverOptions;
use floe_core::units::{Bytes, DeviceOffset};
use floe_core::ErrorKind;
use floe_sim_san::control::{Action, Event, LunInfo, Op, Trigger};
use floe_tests::{assert_same_bytes, scripted_agent, Lab, Script};

const MIB: u64 = 1 << 20;

fn opts(window: u64, parallel: usize) -> MoverOptions {
    MoverOptions {
        window: Bytes(window),
        parallel,
        ..MoverOptions::default()
    }
}

fn volume(lab: &Lab, name: &str, size: u64, seed: u64) {
    lab.call(Op::CreateVolume {
        name: name.into(),
        size: Bytes(size),
        max_run_chunks: Some(3),
        luns: None,
    });
    lab.call(Op::Workload {
        target: name.into(),
        seed,
        writes: 300,
        max_length: Bytes(256 * 1024),
    });
}

fn ev(trigger: Trigger, action: Action) -> Event {
    Event { trigger, action }
}

fn migrate(target: &str, offset: u64, length: u64) -> Action {
    Action::Migrate {
        target: target.into(),
        offset: DeviceOffset(offset),
        length: Bytes(length),
    }
}

fn write(target: &str, offset: u64, length: u64, seed: u64) -> Action {
    Action::Write {
        target: target.into(),
        offset: DeviceOffset(offset),
        length: Bytes(length),
        seed,
    }
}

fn sets(lab: &Lab) -> Vec<SetRecord> {
    if !lab.media_dir().exists() {
        return Vec::new();
    }
    Lab::disk_reader(&lab.media_dir())
        .list_sets()
        .expect("list sets")
}

#[test]
fn two_volumes_with_app_writes_and_migrations_restore_to_the_frozen_bytes() {
    let lab = Lab::start(11, &[("lun0", 64 * MIB), ("lun1", 64 * MIB)], false);
    volume(&lab, "vol0", 12 * MIB, 1);
    volume(&lab, "vol1", 8 * MIB, 2);
    let frozen0 = lab.read_target("vol0");
    let frozen1 = lab.read_target("vol1");
    // The application keeps writing (copy-on-write remaps the snapshots) and
    // the array migrates extents, in each window of the mover's algorithm.
    lab.call(Op::Schedule {
        events: vec![
            ev(Trigger::BeforeQuery(2), write("vol0", 0, 3 * MIB, 90)),
            ev(Trigger::BeforeRead(3), migrate("vol0@*", MIB, 2 * MIB)),
            ev(Trigger::AfterRead(6), migrate("vol0@*", 4 * MIB, 3 * MIB)),
            ev(Trigger::BeforeRead(14), write("vol1", 2 * MIB, 5 * MIB, 91)),
            ev(Trigger::AfterRead(20), migrate("vol1@*", 0, 8 * MIB)),
            ev(Trigger::BeforeQuery(16), migrate("vol1@*", 6 * MIB, MIB)),
        ],
    });
    let report = lab
        .backup(&["array:vol0", "array:vol1"], &opts(MIB, 3))
        .expect("backup");
    let stats = lab.san.array.stats();
    assert_eq!(
        stats.events_pending, 0,
        "every scheduled remap fired: {stats:?}"
    );
    // Several generation changes may be folded into one remap.
    assert!(
        report.remaps >= 2,
        "remaps were applied: {:?}",
        (report.remaps, report.rereads)
    );
    assert!(
        report.rereads >= 1,
        "a read was discarded after a late remap: {:?}",
        (report.remaps, report.rereads)
    );
    let set = &report.set.header.set;
    assert_same_bytes(
        &lab.restore_to_file(set, "vol0").expect("restore vol0"),
        &frozen0,
        "vol0",
    );
    assert_same_bytes(
        &lab.restore_to_file(set, "vol1").expect("restore vol1"),
        &frozen1,
        "vol1",
    );
    // The origin did change: the backup is of the frozen image, not of now.
    assert!(lab.read_target("vol0") != frozen0);
    // Released: the snapshots are gone, the array is consistent.
    assert!(lab
        .ctl()
        .call(Op::Map {
            target: "vol0@*".into()
        })
        .is_err());
    lab.call(Op::Check);
    let listed = sets(&lab);
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].items[0].trailer.blake3,
        blake3::hash(&frozen0).to_hex().to_string()
    );
}

#[test]
fn the_check_after_the_read_is_what_catches_a_remap_between_check_and_read() {
    // Between the mover's check and its read, the array migrates the
    // snapshot's extents and the application overwrites the origin, which
    // still owns the old blocks: a mover that trusts its first check reads
    // the application's new bytes. This proves the tests can see that.
    let schedule = || {
        vec![
            ev(Trigger::BeforeRead(2), migrate("vol0@*", 0, 4 * MIB)),
            ev(Trigger::BeforeRead(2), write("vol0", 0, 4 * MIB, 77)),
        ]
    };
    let lab = Lab::start(5, &[("lun0", 32 * MIB)], false);
    volume(&lab, "vol0", 4 * MIB, 3);
    let frozen = lab.read_target("vol0");

    lab.call(Op::Schedule { events: schedule() });
    // One window, read in four 1 MiB reads: the event lands before the second.
    let one_window = MoverOptions {
        max_read: Bytes(MIB),
        ..opts(4 * MIB, 1)
    };
    let careless = MoverOptions {
        recheck_after_read: false,
        ..one_window.clone()
    };
    let bad = lab
        .backup(&["array:vol0"], &careless)
        .expect("backup without recheck");
    assert!(
        lab.restore_to_file(&bad.set.header.set, "vol0")
            .expect("restore")
            != frozen,
        "without the second check the stale read must show"
    );

    let frozen = lab.read_target("vol0"); // the careless run's writes changed it
    lab.call(Op::Schedule { events: schedule() });
    let good = lab.backup(&["array:vol0"], &one_window).expect("backup");
    assert_eq!(good.rereads, 1);
    assert_same_bytes(
        &lab.restore_to_file(&good.set.header.set, "vol0")
            .expect("restore"),
        &frozen,
        "vol0",
    );
}

/// Make the first block of `target`'s middle extent fail every read
/// (EIO); that extent.
fn fail_a_middle_block(lab: &Lab, target: &str) -> floe_sim_san::control::MapExtentInfo {
    let mut map: floe_sim_san::control::TargetMap = lab
        .ctl()
        .call_as(Op::Map {
            target: target.into(),
        })
        .expect("map");
    let victim = map.extents.swap_remove(map.extents.len() / 2);
    lab.call(Op::InjectError {
        lun: victim.lun.clone(),
        offset: victim.lun_offset,
        length: Bytes(4096),
        count: None,
    });
    victim
}

#[test]
fn a_san_read_error_fails_the_backup_naming_item_device_and_offset() {
    let lab = Lab::start(3, &[("lun0", 32 * MIB)], false);
    volume(&lab, "vol0", 4 * MIB, 4);
    let victim = &fail_a_middle_block(&lab, "vol0");
    let err = lab
        .backup(&["array:vol0"], &opts(MIB, 2))
        .expect_err("a read error must fail the backup");
    assert_eq!(err.kind(), ErrorKind::ReadFailed, "{err}");
    let ctx = err.context();
    assert_eq!(ctx.item, Some(ItemId::new("vol0")), "{err}");
    assert_eq!(ctx.device, Some(DeviceId::new(victim.wwn.clone())), "{err}");
    let off = ctx.offset.expect("offset").0;
    let len = ctx.length.expect("length").0;
    assert!(
        off <= victim.lun_offset.0 && victim.lun_offset.0 < off + len,
        "{err}"
    );
    assert!(err.to_string().contains("EIO"), "{err}");
    assert!(sets(&lab).is_empty(), "nothing recorded as complete");
    assert_eq!(
        std::fs::read_dir(lab.media_dir())
            .map(|d| d.count())
            .unwrap_or(0),
        0,
        "the partial set was removed"
    );
}

#[test]
fn a_read_error_inside_a_batch_names_the_item_whose_bytes_failed() {
    // Three volumes small enough to move as one batch (one window, one
    // check): the error must name the one whose block failed, not the
    // batch or its first member.
    let lab = Lab::start(3, &[("lun0", 32 * MIB)], false);
    for (k, v) in ["vol0", "vol1", "vol2"].iter().enumerate() {
        volume(&lab, v, MIB, k as u64);
    }
    let victim = &fail_a_middle_block(&lab, "vol1");
    let o = MoverOptions {
        max_read: Bytes(4096),
        ..opts(8 * MIB, 2)
    };
    let err = lab
        .backup(&["array:vol0", "array:vol1", "array:vol2"], &o)
        .expect_err("a read error must fail the backup");
    assert_eq!(err.kind(), ErrorKind::ReadFailed, "{err}");
    assert_eq!(err.context().item, Some(ItemId::new("vol1")), "{err}");
    assert_eq!(
        err.context().offset.map(|o| o.0),
        Some(victim.lun_offset.0),
        "{err}"
    );
    assert!(sets(&lab).is_empty(), "nothing recorded as complete");
}

fn lun(lab: &Lab) -> LunInfo {
    lab.san.array.luns().remove(0)
}

fn crafted_item(device: &str, start_block: u64, blocks: u64) -> Item {
    floe_tests::one_extent_item("evil", device, start_block, blocks)
}

fn backup_from(lab: &Lab, agent: &str) -> floe_core::Result<floe_core::mover::BackupReport> {
    let mut client = floe_core::agent::AgentClient::connect_tcp(agent)?;
    let mut media = Lab::disk_writer(&lab.media_dir());
    floe_core::mover::backup(
        &mut client,
        &["crafted:evil".to_string()],
        &lab.resolver(),
        media.as_mut(),
        &MoverOptions::default(),
        &mut |_| {},
    )
}

#[test]
fn an_extent_past_the_end_of_its_device_is_refused_before_any_read() {
    let lab = Lab::start(1, &[("lun0", 8 * MIB)], false);
    let l = lun(&lab);
    let reads_before = lab.san.array.stats().reads;
    let map = ImageMap {
        image: ImageId::new("img"),
        items: vec![crafted_item(&l.wwn, 8 * MIB / 512 - 8, 16)],
        failures: Vec::new(),
    };
    let err = backup_from(&lab, &scripted_agent(Script::Map(map))).expect_err("must refuse");
    assert_eq!(err.kind(), ErrorKind::ExtentOutOfRange, "{err}");
    assert_eq!(err.context().agent.as_deref(), Some("crafted"), "{err}");
    assert_eq!(err.context().item, Some(ItemId::new("evil")));
    assert_eq!(err.context().device, Some(DeviceId::new(l.wwn.clone())));
    assert_eq!(err.context().offset, Some(DeviceOffset(8 * MIB - 4096)));
    assert_eq!(
        lab.san.array.stats().reads,
        reads_before,
        "no read was made"
    );
    assert!(sets(&lab).is_empty());
}

#[test]
fn an_unknown_device_is_refused_naming_item_and_device() {
    let lab = Lab::start(1, &[("lun0", 8 * MIB)], false);
    let map = ImageMap {
        image: ImageId::new("img"),
        items: vec![crafted_item("naa.6001405000000000000000000deadbeef", 0, 8)],
        failures: Vec::new(),
    };
    let err = backup_from(&lab, &scripted_agent(Script::Map(map))).expect_err("must refuse");
    assert_eq!(err.kind(), ErrorKind::UnknownDevice, "{err}");
    assert_eq!(err.context().agent.as_deref(), Some("crafted"), "{err}");
    assert_eq!(err.context().item, Some(ItemId::new("evil")));
    assert!(
        err.to_string()
            .contains("naa.6001405000000000000000000deadbeef"),
        "{err}"
    );
    assert!(sets(&lab).is_empty());
}

#[test]
fn a_malformed_map_is_refused() {
    let lab = Lab::start(1, &[("lun0", 8 * MIB)], false);
    let l = lun(&lab);
    let mut item = crafted_item(&l.wwn, 0, 8);
    item.size = Bytes(8192); // the map covers only 4096 bytes
    let map = ImageMap {
        image: ImageId::new("img"),
        items: vec![item],
        failures: Vec::new(),
    };
    let err = backup_from(&lab, &scripted_agent(Script::Map(map))).expect_err("must refuse");
    assert_eq!(err.kind(), ErrorKind::InvalidMap, "{err}");
    assert!(
        err.to_string()
            .contains("map covers 4096 bytes but the item is 8192 bytes"),
        "{err}"
    );
}

#[test]
fn a_truncated_frame_from_the_agent_fails_the_backup() {
    let lab = Lab::start(1, &[("lun0", 8 * MIB)], false);
    let err = backup_from(&lab, &scripted_agent(Script::TruncatedFrame)).expect_err("must fail");
    assert_eq!(err.kind(), ErrorKind::Protocol, "{err}");
    assert!(err.to_string().contains("truncated frame"), "{err}");
    assert!(sets(&lab).is_empty());
}

#[test]
fn an_oversized_frame_to_the_agent_is_refused_without_reading_it() {
    use std::io::{Read, Write};
    let lab = Lab::start(1, &[("lun0", 8 * MIB)], false);
    let mut s = std::net::TcpStream::connect(&lab.agent_addr).expect("connect");
    let mut h = Vec::new();
    h.extend_from_slice(b"FLOE");
    h.extend_from_slice(&floe_core::protocol::VERSION.to_be_bytes());
    h.extend_from_slice(&0u16.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&h).expect("send header");
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).expect("read answer");
    let resp: floe_core::protocol::Response =
        floe_core::protocol::decode_message(&answer[12..]).expect("an error frame");
    match resp {
        floe_core::protocol::Response::Error { error } => {
            assert_eq!(error.kind, ErrorKind::FrameTooLarge);
            assert!(
                error.message.contains("4294967295 bytes exceeds the limit"),
                "{}",
                error.message
            );
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Media that take every item and then refuse to commit.
struct RefusesCommit(Box<dyn floe_core::abi::MediaWriter>);

impl floe_core::abi::MediaWriter for RefusesCommit {
    fn begin_set(&mut self, h: &SetHeader) -> floe_core::Result<()> {
        self.0.begin_set(h)
    }
    fn resume_set(&mut self, s: &SetId) -> floe_core::Result<SetRecord> {
        self.0.resume_set(s)
    }
    fn begin_item(&mut self, h: &ItemHeader) -> floe_core::Result<()> {
        self.0.begin_item(h)
    }
    fn write(&mut self, d: &[u8]) -> floe_core::Result<()> {
        self.0.write(d)
    }
    fn end_item(&mut self, t: &ItemTrailer) -> floe_core::Result<MediaPosition> {
        self.0.end_item(t)
    }
    fn fail_item(&mut self, f: &ItemFailure) -> floe_core::Result<()> {
        self.0.fail_item(f)
    }
    fn commit(&mut self) -> floe_core::Result<Committed> {
        Err(floe_core::Error::new(
            ErrorKind::MediaFull,
            "the media refused the commit",
        ))
    }
    fn abort(&mut self) -> floe_core::Result<()> {
        self.0.abort()
    }
    fn delete_set(&mut self, s: &SetId) -> floe_core::Result<()> {
        self.0.delete_set(s)
    }
}

#[test]
fn a_refused_media_commit_rolls_back_what_the_catalog_staged() {
    use floe_core::catalog::{Catalog, CatalogRecorder};
    use floe_core::mover::{backup_recorded, Progress};
    let lab = Lab::start(3, &[("lun0", 32 * MIB)], false);
    volume(&lab, "vol0", 2 * MIB, 1);
    let d = tempfile::tempdir().unwrap();
    let mut cat = Catalog::open(&d.path().join("catalog.db")).unwrap();
    let run = |cat: &mut Catalog, media: &mut dyn floe_core::abi::MediaWriter| {
        let mut set = None;
        let mut agent = floe_core::agent::AgentClient::connect_tcp(&lab.agent_addr).unwrap();
        let mut recorder = CatalogRecorder {
            catalog: cat,
            media: "disk:test",
        };
        let r = backup_recorded(
            &mut agent,
            &["array:vol0".into()],
            &lab.resolver(),
            media,
            Some(&mut recorder),
            &opts(MIB, 2),
            &mut |p| {
                if let Progress::Begun { set: s, .. } = p {
                    set = Some(s.clone());
                }
            },
        );
        (r, set.expect("the set was begun"))
    };
    let mut refusing = RefusesCommit(Lab::disk_writer(&lab.media_dir()));
    let (r, set) = run(&mut cat, &mut refusing);
    let err = r.expect_err("a refused commit fails the backup");
    assert_eq!(err.kind(), ErrorKind::MediaFull, "{err}");
    assert!(cat.sets().unwrap().is_empty());
    assert_eq!(cat.item_rows(&set).unwrap(), 0, "staged rows stayed");
    // The catalog's connection is left outside any transaction: the next
    // backup records.
    let mut disk = Lab::disk_writer(&lab.media_dir());
    let (r, set) = run(&mut cat, disk.as_mut());
    let report = r.unwrap();
    assert_eq!(report.unrecorded, None);
    assert_eq!(cat.sets().unwrap().len(), 1);
    assert_eq!(cat.item_rows(&set).unwrap(), 1);
}
