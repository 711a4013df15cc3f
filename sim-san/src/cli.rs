//! The `floe-sim-san` command line (also `floe sim-san`).

use crate::control::{Client, Op, Request, CONTROL_VERSION};
use crate::SimSan;
use clap::{Args, Subcommand};
use floe_core::units::Bytes;
use std::path::PathBuf;

/// Run or talk to the simulated SAN.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the array: NBD exports of its LUNs and the control API.
    ///
    /// Example: floe-sim-san serve --dir /tmp/san --lun lun0=256M --lun lun1=256M
    ///
    /// Prints one JSON line with the bound addresses once ready, then serves
    /// until killed.
    Serve(ServeArgs),
    /// Send one control request (JSON, without the version) and print the
    /// result.
    ///
    /// Example: floe-sim-san ctl --control 127.0.0.1:10810 '{"op":"list_luns"}'
    Ctl(CtlArgs),
}

/// Options of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Directory for the LUNs' sparse files.
    #[arg(long)]
    pub dir: PathBuf,
    /// NBD listen address.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub nbd: String,
    /// Control API listen address.
    #[arg(long, default_value = "127.0.0.1:10810")]
    pub control: String,
    /// Seed for layouts and allocation.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Create a pool LUN at start: NAME=SIZE (K, M, G suffixes). Volumes
    /// and the snapshot reserve allocate from pool LUNs.
    #[arg(long = "lun", value_name = "NAME=SIZE")]
    pub luns: Vec<String>,
    /// Create a raw LUN at start (not in the pool; e.g. a restore target).
    #[arg(long = "raw-lun", value_name = "NAME=SIZE")]
    pub raw_luns: Vec<String>,
}

/// Options of `ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// Control API address.
    #[arg(long, default_value = "127.0.0.1:10810")]
    pub control: String,
    /// The request, e.g. '{"op":"map","target":"vol0"}'.
    pub request: String,
}

/// Parse `64M`, `1G`, `4096`.
pub fn parse_size(s: &str) -> anyhow::Result<Bytes> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("bad size {s:?}: expected a number with K, M or G"))?;
    n.checked_mul(mult)
        .map(Bytes)
        .ok_or_else(|| anyhow::anyhow!("size {s:?} overflows"))
}

/// Run a command.
pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Serve(a) => {
            let san = SimSan::start(&a.dir, a.seed, &a.nbd, &a.control)?;
            let mut luns = Vec::new();
            for (spec, pool) in a
                .luns
                .iter()
                .map(|s| (s, true))
                .chain(a.raw_luns.iter().map(|s| (s, false)))
            {
                let (name, size) = spec
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--lun wants NAME=SIZE, got {spec:?}"))?;
                luns.push(san.array.create_lun_in(name, parse_size(size)?, pool)?);
            }
            println!(
                "{}",
                serde_json::json!({"ready": true, "nbd": san.nbd_addr.to_string(),
                    "control": san.control_addr.to_string(), "array": san.array.id(), "luns": luns})
            );
            loop {
                std::thread::park();
            }
        }
        Command::Ctl(a) => {
            let mut v: serde_json::Value = serde_json::from_str(&a.request)
                .map_err(|e| anyhow::anyhow!("request is not JSON: {e}"))?;
            if let Some(o) = v.as_object_mut() {
                o.insert("v".into(), CONTROL_VERSION.into());
            }
            let req: Request = serde_json::from_value(v)
                .map_err(|e| anyhow::anyhow!("not a control request: {e}"))?;
            let op: Op = req.op;
            let mut c = Client::connect(&a.control)?;
            let r = c.call(op)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(())
        }
    }
}
