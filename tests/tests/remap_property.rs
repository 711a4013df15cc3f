//! The property every mover test comes back to: the backup of a frozen
//! image equals the frozen image byte for byte, whatever remaps, writes and
//! faults happen while it runs.
//!
//! Random volume layouts, workloads, snapshot points, remap/write schedules
//! hitting every window of the algorithm (before the check, between check
//! and read, between read and re-check), mover shapes, and one-shot read
//! errors — against a real sim-san over NBD and a real agent with the
//! dynamically loaded `array` plugin. `PROPTEST_CASES` raises the count
//! (default 24, sized for CI).

use floe_core::mover::MoverOptions;
use floe_core::units::{Bytes, DeviceOffset};
use floe_core::ErrorKind;
use floe_sim_san::control::{Action, Event, Op, Trigger};
use floe_tests::{assert_same_bytes, Lab};
use proptest::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

const CHUNK: u64 = 64 * 1024;
const MIB: u64 = 1 << 20;

/// One lab for every case, in cargo's scratch directory for integration
/// tests (a static is never dropped: the lab of an earlier run is removed
/// here instead, and each case deletes its set).
fn lab() -> &'static Lab {
    static LAB: OnceLock<Lab> = OnceLock::new();
    LAB.get_or_init(|| {
        let base = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
        if let Ok(old) = std::fs::read_dir(base) {
            for e in old.flatten() {
                if e.file_name().to_string_lossy().starts_with("remap-lab-") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("remap-lab-")
            .tempdir_in(base)
            .expect("scratch directory");
        Lab::start_in(
            dir,
            7,
            &[("lun0", 96 * MIB), ("lun1", 96 * MIB), ("lun2", 96 * MIB)],
            false,
        )
    })
}

#[derive(Clone, Debug)]
struct VolumeSpec {
    chunks: u64,
    max_run: u64,
    luns: Vec<usize>,
    writes: u32,
}

#[derive(Clone, Debug)]
enum Act {
    MigrateSnapshot {
        vol: usize,
        chunk: u64,
        chunks: u64,
    },
    WriteOrigin {
        vol: usize,
        sector: u64,
        sectors: u64,
        seed: u64,
    },
}

#[derive(Clone, Debug)]
struct Case {
    seed: u64,
    volumes: Vec<VolumeSpec>,
    events: Vec<(u8, u64, Act)>,
    window: u64,
    parallel: usize,
    max_read: u64,
    coalesce_gap: u64,
    fault: Option<(usize, u64)>,
}

fn volume_spec() -> impl Strategy<Value = VolumeSpec> {
    (
        8u64..96,
        1u64..12,
        proptest::sample::subsequence(vec![0usize, 1, 2], 1..=3),
        0u32..150,
    )
        .prop_map(|(chunks, max_run, luns, writes)| VolumeSpec {
            chunks,
            max_run,
            luns,
            writes,
        })
}

fn act(vols: usize) -> impl Strategy<Value = Act> {
    prop_oneof![
        (0..vols, 0u64..96, 1u64..24).prop_map(|(vol, chunk, chunks)| Act::MigrateSnapshot {
            vol,
            chunk,
            chunks
        }),
        (0..vols, 0u64..96 * 128, 1u64..1024, any::<u64>()).prop_map(
            |(vol, sector, sectors, seed)| Act::WriteOrigin {
                vol,
                sector,
                sectors,
                seed
            }
        ),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    proptest::collection::vec(volume_spec(), 1..=2).prop_flat_map(|volumes| {
        let n = volumes.len();
        (
            Just(volumes),
            any::<u64>(),
            proptest::collection::vec((0u8..3, 1u64..48, act(n)), 0..10),
            prop_oneof![
                Just(64 * 1024u64),
                Just(256 * 1024),
                Just(MIB),
                Just(4 * MIB)
            ],
            1usize..=4,
            prop_oneof![Just(64 * 1024u64), Just(256 * 1024), Just(2 * MIB)],
            prop_oneof![Just(0u64), Just(64 * 1024)],
            proptest::option::weighted(0.2, (0usize..3, 0u64..96 * MIB / 4096)),
        )
            .prop_map(
                |(volumes, seed, events, window, parallel, max_read, coalesce_gap, fault)| Case {
                    seed,
                    volumes,
                    events,
                    window,
                    parallel,
                    max_read,
                    coalesce_gap,
                    fault,
                },
            )
    })
}

static CASE: AtomicU64 = AtomicU64::new(0);
static REMAPS: AtomicU64 = AtomicU64::new(0);
static REREADS: AtomicU64 = AtomicU64::new(0);

/// Cases share one array; its schedule and counters are global, so cases
/// (from both tests here) run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run(c: &Case) -> Result<(), TestCaseError> {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let lab = lab();
    let n = CASE.fetch_add(1, Ordering::SeqCst);
    let names: Vec<String> = (0..c.volumes.len()).map(|i| format!("c{n}v{i}")).collect();
    let sizes: Vec<u64> = c.volumes.iter().map(|v| v.chunks * CHUNK).collect();
    for (i, v) in c.volumes.iter().enumerate() {
        lab.call(Op::CreateVolume {
            name: names[i].clone(),
            size: Bytes(sizes[i]),
            max_run_chunks: Some(v.max_run),
            luns: Some(v.luns.iter().map(|l| format!("lun{l}")).collect()),
        });
        lab.call(Op::Workload {
            target: names[i].clone(),
            seed: c.seed ^ i as u64,
            writes: v.writes,
            max_length: Bytes(128 * 1024),
        });
    }
    // The snapshot point is the freeze; until then nothing moves.
    let frozen: Vec<Vec<u8>> = names.iter().map(|v| lab.read_target(v)).collect();
    let events: Vec<Event> = c
        .events
        .iter()
        .map(|(kind, k, a)| {
            let trigger = match kind {
                0 => Trigger::BeforeQuery(*k),
                1 => Trigger::BeforeRead(*k),
                _ => Trigger::AfterRead(*k),
            };
            let action = match a {
                Act::MigrateSnapshot { vol, chunk, chunks } => {
                    let size = sizes[*vol] / CHUNK;
                    let start = chunk % size;
                    let len = (*chunks).min(size - start);
                    Action::Migrate {
                        target: format!("{}@*", names[*vol]),
                        offset: DeviceOffset(start * CHUNK),
                        length: Bytes(len * CHUNK),
                    }
                }
                Act::WriteOrigin {
                    vol,
                    sector,
                    sectors,
                    seed,
                } => {
                    let total = sizes[*vol] / 512;
                    let start = sector % total;
                    let len = (*sectors).min(total - start);
                    Action::Write {
                        target: names[*vol].clone(),
                        offset: DeviceOffset(start * 512),
                        length: Bytes(len * 512),
                        seed: *seed,
                    }
                }
            };
            Event { trigger, action }
        })
        .collect();
    lab.call(Op::Schedule { events });
    if let Some((l, block)) = c.fault {
        lab.call(Op::InjectError {
            lun: format!("lun{l}"),
            offset: DeviceOffset(block * 4096),
            length: Bytes(4096),
            count: Some(1),
        });
    }
    let sets_before = Lab::disk_reader(&lab.media_dir())
        .list_sets()
        .map(|s| s.len())
        .unwrap_or(0);
    let opts = MoverOptions {
        window: Bytes(c.window),
        parallel: c.parallel,
        max_read: Bytes(c.max_read),
        coalesce_gap: Bytes(c.coalesce_gap),
        ..MoverOptions::default()
    };
    let sources: Vec<String> = names.iter().map(|v| format!("array:{v}")).collect();
    let source_refs: Vec<&str> = sources.iter().map(String::as_str).collect();
    let result = lab.backup(&source_refs, &opts);
    lab.call(Op::ClearFaults);
    match result {
        Ok(report) => {
            REMAPS.fetch_add(u64::from(report.remaps), Ordering::Relaxed);
            REREADS.fetch_add(u64::from(report.rereads), Ordering::Relaxed);
            for (i, v) in names.iter().enumerate() {
                let got = lab
                    .restore_to_file(&report.set.header.set, v)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                assert_same_bytes(&got, &frozen[i], v);
            }
            Lab::disk_writer(&lab.media_dir())
                .delete_set(&report.set.header.set)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        Err(e) => {
            prop_assert!(
                c.fault.is_some(),
                "backup failed without an injected fault: {e}"
            );
            prop_assert_eq!(e.kind(), ErrorKind::ReadFailed, "{}", e);
            prop_assert!(
                e.context().item.is_some()
                    && e.context().device.is_some()
                    && e.context().offset.is_some(),
                "{}",
                e
            );
            let sets_after = Lab::disk_reader(&lab.media_dir())
                .list_sets()
                .map(|s| s.len())
                .unwrap_or(0);
            prop_assert_eq!(sets_after, sets_before, "a failed backup recorded a set");
        }
    }
    lab.call(Op::Check);
    for v in &names {
        lab.call(Op::Delete { target: v.clone() });
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24),
        max_shrink_iters: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn backup_equals_frozen_image_whatever_remaps_happen(c in case()) {
        run(&c)?;
    }
}

#[test]
fn the_generated_schedules_do_remap_in_every_window() {
    // A fixed set of cases from the same generator must exercise remaps
    // found before the read and after it; otherwise the property above
    // would be passing vacuously.
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRng, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha),
    );
    let mut remaps = 0;
    let mut rereads = 0;
    for _ in 0..30 {
        let c = case().new_tree(&mut runner).expect("case").current();
        let before = (
            REMAPS.load(Ordering::SeqCst),
            REREADS.load(Ordering::SeqCst),
        );
        run(&c).expect("case passes");
        remaps += REMAPS.load(Ordering::SeqCst) - before.0;
        rereads += REREADS.load(Ordering::SeqCst) - before.1;
    }
    eprintln!("30 generated cases: {remaps} remaps, {rereads} re-reads");
    assert!(remaps >= 10, "only {remaps} remaps in 30 cases");
    assert!(rereads >= 3, "only {rereads} re-reads in 30 cases");
}
