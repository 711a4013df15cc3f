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
    /// The virtual tape library: serve it, or work its changer.
    #[command(subcommand)]
    Vtl(VtlCommand),
}

/// `floe-sim-san vtl …`
#[derive(Debug, Subcommand)]
pub enum VtlCommand {
    /// Serve a library of drives and file-backed cartridges (created in
    /// DIR if it holds none). Prints one JSON line once ready.
    ///
    /// Example: floe-sim-san vtl serve --dir /tmp/vtl --drives 1 --cartridges 3 --capacity 64M
    Serve(VtlServeArgs),
    /// The changer, as a media plugin's hook: `next` (unload, load the next
    /// slot's cartridge, print its barcode), `load BARCODE`, `unload`,
    /// `list` (every barcode), `protect BARCODE on|off`, `inventory`.
    ///
    /// Example: floe-sim-san vtl changer --library 127.0.0.1:10811 --drive 0 next
    Changer(ChangerArgs),
    /// Read tape file N of the loaded cartridge to stdout, record by
    /// record, as `dd if=/dev/nst0` after `mt fsf N` would.
    ///
    /// Example: floe-sim-san vtl read --library 127.0.0.1:10811 --file 1 | dd of=set.tar bs=256k
    Read(ReadArgs),
}

/// Options of `vtl read`.
#[derive(Debug, Args)]
pub struct ReadArgs {
    /// The library's address.
    #[arg(long, default_value = "127.0.0.1:10811")]
    pub library: String,
    /// Drive number.
    #[arg(long, default_value_t = 0)]
    pub drive: u32,
    /// Tape file number (0 is Floe's label).
    #[arg(long)]
    pub file: u32,
}

/// Options of `vtl serve`.
#[derive(Debug, Args)]
pub struct VtlServeArgs {
    /// Directory of the cartridge files (`BARCODE.vtape`).
    #[arg(long)]
    pub dir: PathBuf,
    /// Listen address of the tape protocol.
    #[arg(long, default_value = "127.0.0.1:10811")]
    pub listen: String,
    /// Drives.
    #[arg(long, default_value_t = 1)]
    pub drives: u32,
    /// Cartridges created when DIR holds none.
    #[arg(long, default_value_t = 4)]
    pub cartridges: u32,
    /// Capacity of each created cartridge (K, M, G).
    #[arg(long, default_value = "1G")]
    pub capacity: String,
    /// Early-warning zone before the end of each created cartridge.
    #[arg(long, default_value = "4M")]
    pub early_warning: String,
    /// Barcode prefix of created cartridges.
    #[arg(long, default_value = "FL")]
    pub prefix: String,
}

/// Options of `vtl changer`.
#[derive(Debug, Args)]
pub struct ChangerArgs {
    /// The library's address.
    #[arg(long, default_value = "127.0.0.1:10811")]
    pub library: String,
    /// Drive number.
    #[arg(long, default_value_t = 0)]
    pub drive: u32,
    /// `next`, `load BARCODE`, `unload`, `protect BARCODE on|off`, `list`
    /// (barcodes, one per line), `inventory` (JSON).
    #[arg(required = true)]
    pub verb: Vec<String>,
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
        Command::Vtl(VtlCommand::Serve(a)) => {
            let lib = crate::vtl::Library::open(
                &a.dir,
                &crate::vtl::LibraryOptions {
                    drives: a.drives,
                    cartridges: a.cartridges,
                    capacity: parse_size(&a.capacity)?.0,
                    early_warning: parse_size(&a.early_warning)?.0,
                    prefix: a.prefix,
                },
            )?;
            let l = std::net::TcpListener::bind(&a.listen)?;
            println!(
                "{}",
                serde_json::json!({"ready": true, "library": l.local_addr()?.to_string()})
            );
            lib.serve(l);
            Ok(())
        }
        Command::Vtl(VtlCommand::Changer(a)) => changer(&a),
        Command::Vtl(VtlCommand::Read(a)) => {
            use floe_core::tape::{MtOp, TapeDrive, VtlDrive};
            use std::io::Write;
            let mut d = VtlDrive::open(&format!("vtl://{}/{}", a.library, a.drive), false)?;
            d.op(MtOp::Rewind)?;
            d.op(MtOp::SetBlk(0))?;
            d.op(MtOp::Fsf(a.file))?;
            let mut buf = vec![0u8; 16 << 20];
            let mut out = std::io::stdout().lock();
            loop {
                let n = d.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                out.write_all(&buf[..n])?;
            }
            out.flush()?;
            Ok(())
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

fn changer(a: &ChangerArgs) -> anyhow::Result<()> {
    use floe_core::tape::{VtlClient, VtlRequest};
    let drive = a.drive;
    let verb: Vec<&str> = a.verb.iter().map(String::as_str).collect();
    let req = match verb.as_slice() {
        ["next"] => VtlRequest::Next { drive },
        ["load", barcode] => VtlRequest::Load {
            drive,
            barcode: (*barcode).to_string(),
        },
        ["unload"] => VtlRequest::Unload { drive },
        ["protect", barcode, on @ ("on" | "off")] => VtlRequest::Protect {
            barcode: (*barcode).to_string(),
            on: *on == "on",
        },
        ["inventory" | "list"] => VtlRequest::Inventory,
        _ => anyhow::bail!(
            "changer verbs: next | load BARCODE | unload | protect BARCODE on|off | list | inventory; got {:?}",
            a.verb
        ),
    };
    let mut c = VtlClient::connect(&a.library, &format!("vtl://{}/{drive}", a.library))?;
    let (r, _) = c.checked(&a.verb.join(" "), &req, &[])?;
    if verb == ["list"] {
        // One barcode per line: the cartridges a plugin may scan.
        for b in r.value["slots"].as_array().into_iter().flatten() {
            println!("{}", b.as_str().unwrap_or_default());
        }
        return Ok(());
    }
    match r.value {
        serde_json::Value::String(s) => println!("{s}"),
        serde_json::Value::Null => {}
        v => println!("{}", serde_json::to_string_pretty(&v)?),
    }
    Ok(())
}
