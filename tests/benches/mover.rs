//! Criterion: the mover reading a volume from a sim-san export (NBD) and
//! from the LUN's backing file with O_DIRECT, into the dry-run sink.
//! `cargo bench -p floe-tests` (after `cargo build --workspace`);
//! `cargo xtask bench` compares against dd and nbdcopy.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use floe_core::agent::AgentClient;
use floe_core::device::{DeviceResolver, Location};
use floe_core::media::NullMediaWriter;
use floe_core::model::DeviceId;
use floe_core::mover::{backup, MoverOptions};
use floe_core::units::{Bytes, DeviceOffset};
use floe_sim_san::control::Op;
use floe_tests::Lab;
use std::collections::HashMap;

const SIZE: u64 = 256 << 20;

fn mover(c: &mut Criterion) {
    let lab = Lab::start(1, &[("lun0", SIZE)], false);
    lab.call(Op::CreateVolume {
        name: "bench".into(),
        size: Bytes(SIZE),
        max_run_chunks: Some(SIZE / 65536),
        luns: None,
    });
    for i in 0..SIZE / (64 << 20) {
        lab.call(Op::Write {
            target: "bench".into(),
            offset: DeviceOffset(i * (64 << 20)),
            length: Bytes(64 << 20),
            seed: i,
        });
    }
    let lun = lab.san.array.luns().remove(0);
    let mut table = HashMap::new();
    table.insert(
        DeviceId::new(lun.wwn.clone()),
        Location::Path(lun.path.clone()),
    );
    let local = DeviceResolver::new(table, None);
    let nbd = lab.resolver();
    let opts = MoverOptions::default();
    let mut g = c.benchmark_group("mover");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(SIZE));
    for (name, resolver) in [("local_o_direct", &local), ("sim_san_nbd", &nbd)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut agent = AgentClient::connect_tcp(&lab.agent_addr).expect("agent");
                let mut media = NullMediaWriter::default();
                backup(
                    &mut agent,
                    &["array:bench".to_string()],
                    resolver,
                    &mut media,
                    &opts,
                    &mut |_| {},
                )
                .expect("backup")
            })
        });
    }
    g.finish();
}

criterion_group!(benches, mover);
criterion_main!(benches);
