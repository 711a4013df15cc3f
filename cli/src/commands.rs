//! The subcommands: argument shapes and the glue to floe-core.

use anyhow::{anyhow, bail, Context as _};
use clap::{Args, Parser, Subcommand};
use floe_core::abi::{Interface, MediaReader, MediaWriter};
use floe_core::agent::{Agent, AgentClient, AgentOptions};
use floe_core::catalog::{Catalog, CatalogRecorder};
use floe_core::device::{open_target, parse_location, DeviceResolver, Location};
use floe_core::loader::PluginRegistry;
use floe_core::model::{DeviceId, ItemId, SetId};
use floe_core::mover::{
    backup_recorded, restore_item, resume_recorded, verify_set, MoverOptions, Progress, Recorder,
};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;

/// Floe: off-host backup. The application host (agent) freezes its data and
/// says where the blocks are; the backup host (mover) reads them straight
/// from the shared storage and writes them to media.
#[derive(Parser)]
#[command(name = "floe", version)]
pub struct Cli {
    /// Extra plugin directories (searched before the defaults).
    #[arg(long = "plugin-dir", global = true, value_name = "DIR")]
    plugin_dirs: Vec<PathBuf>,
    /// The catalog database (default: $FLOE_CATALOG, else
    /// ~/.local/share/floe/catalog.db).
    #[arg(long, global = true, value_name = "FILE")]
    catalog: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent on the application host: freeze, map, answer config
    /// checks and remaps, release.
    ///
    /// Example: floe agent --listen 127.0.0.1:7070 --allow-source 'array:*'
    ///          --plugin-opt array.control=127.0.0.1:10810
    /// Example: ssh apphost floe agent --stdio --allow-source 'array:vol*'
    Agent(AgentArgs),
    /// Back up sources through an agent, reading the shared storage
    /// directly, to media.
    ///
    /// Example: floe backup --agent 127.0.0.1:7070 --san nbd://127.0.0.1:10809
    ///          --allow-device naa.6001405… --source array:vol0 --media disk:/backup
    Backup(Box<BackupArgs>),
    /// Restore items of a set to image files, block devices or NBD exports.
    ///
    /// Example: floe restore --media disk:/backup --set SET
    ///          --to vol0=nbd://127.0.0.1:10809/restore0 --to vol1=/tmp/vol1.img
    Restore(RestoreArgs),
    /// List the sets in the catalog (or, with --media, on media), one line
    /// each: id, commit time, items, bytes, how many failed if partial,
    /// agent, label and sources (`--json`: the whole records). `floe ls SET`
    /// lists a set's items.
    ///
    /// Example: floe list
    /// Example: floe list --media disk:/backup
    List(ListArgs),
    /// Show one set from the catalog: its header, items, checksums and
    /// where each item is.
    ///
    /// Example: floe show array-floe-1795306347-4403-0-1795306347
    Show {
        /// The set.
        set: String,
    },
    /// List the items of a set from the catalog.
    ///
    /// Example: floe ls array-floe-1795306347-4403-0-1795306347
    Ls {
        /// The set.
        set: String,
    },
    /// Re-read sets from media and check every item's checksum; names each
    /// damaged item and exits non-zero if any is.
    ///
    /// Example: floe verify --media disk:/backup
    Verify {
        #[command(flatten)]
        media: MediaArgs,
        /// Only this set (default: every set on the media).
        #[arg(long)]
        set: Option<String>,
        /// Name every item found intact too (by default: the damaged ones,
        /// and a line per set).
        #[arg(long, short)]
        verbose: bool,
    },
    /// Forget old sets by a retention policy: remove them from the catalog,
    /// then from the media. Sets are grouped by agent and sources.
    ///
    /// Example: floe prune --media disk:/backup --keep-last 3 --keep-daily 7 --keep-weekly 4
    Prune {
        #[command(flatten)]
        media: MediaArgs,
        #[command(flatten)]
        policy: floe_core::retention::Policy,
        /// Show what would be kept and forgotten; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Maintain the catalog.
    ///
    /// Example: floe catalog rebuild --media disk:/backup
    #[command(subcommand)]
    Catalog(CatalogAction),
    /// List the plugins found, and the files refused.
    ///
    /// Example: floe plugins
    Plugins,
    /// Run or talk to the simulated SAN (same as floe-sim-san).
    ///
    /// Example: floe sim-san serve --dir /tmp/san --lun lun0=256M
    #[command(name = "sim-san", subcommand)]
    SimSan(floe_sim_san::cli::Command),
}

#[derive(Args)]
#[command(subcommand_negates_reqs = true, args_conflicts_with_subcommands = true)]
struct AgentArgs {
    #[command(subcommand)]
    action: Option<AgentAction>,
    /// Listen for movers on this TCP address.
    #[arg(long, conflicts_with = "stdio")]
    listen: Option<String>,
    /// Serve one mover on stdin/stdout (for ssh).
    #[arg(long)]
    stdio: bool,
    /// Plugin option PLUGIN.KEY=VALUE (repeatable).
    #[arg(long = "plugin-opt", value_name = "PLUGIN.KEY=VALUE")]
    plugin_opts: Vec<String>,
    /// The host name to report (default: this host's name).
    #[arg(long)]
    host: Option<String>,
    /// A source this agent may back up, as a pattern (`*`, `?`):
    /// array:vol* (repeatable). Nothing else is frozen or mapped.
    #[arg(long = "allow-source", value_name = "PATTERN", required = true)]
    allow_sources: Vec<String>,
    /// A directory a mover may restore files under through this agent
    /// (`floe restore --agent … --to-dir DIR`), repeatable. Without it,
    /// nothing is restored through this agent.
    #[arg(long = "allow-restore", value_name = "DIR")]
    allow_restore: Vec<String>,
    /// Seconds a frozen image waits for its mover to come back (to resume)
    /// after the mover vanished without releasing it. Not with --stdio.
    #[arg(long, default_value_t = 900)]
    image_lease: u64,
    /// Serve mutual TLS with the key pair NAME.crt/NAME.key in this
    /// directory (made by `floe agent init`).
    #[arg(long, value_name = "DIR", requires = "listen")]
    tls_dir: Option<PathBuf>,
    /// The key pair's name in --tls-dir.
    #[arg(long, default_value = "agent")]
    tls_name: String,
    /// A mover certificate fingerprint (SHA256:…) this agent trusts
    /// (repeatable); with --tls-dir, no other mover gets through.
    #[arg(long = "trust-mover", value_name = "FINGERPRINT")]
    trust_movers: Vec<String>,
}

#[derive(Subcommand)]
enum AgentAction {
    /// Make a key pair for mutual TLS (DIR/NAME.crt, DIR/NAME.key) and
    /// print its fingerprint, to pin on the other side. Movers make theirs
    /// the same way, with --name mover.
    ///
    /// Example: floe agent init --dir /etc/floe
    Init {
        /// Where to put the key pair.
        #[arg(long)]
        dir: PathBuf,
        /// Its name.
        #[arg(long, default_value = "agent")]
        name: String,
    },
}

#[derive(Args)]
struct MediaArgs {
    /// Media: PLUGIN:PATH (disk:/backup, tar:/backup, tape:/dev/nst0,
    /// tape:vtl://HOST:PORT/DRIVE, null:).
    #[arg(long)]
    media: String,
    /// A media plugin option, KEY=VALUE (repeatable): record_size=64K,
    /// compress=zstd (tar), changer='mtx-wrapper', label=FL0001,
    /// cartridges=FL0001,FL0002.
    #[arg(long = "media-opt", value_name = "KEY=VALUE")]
    opts: Vec<String>,
}

impl MediaArgs {
    fn plain(media: &str) -> MediaArgs {
        MediaArgs {
            media: media.to_string(),
            opts: Vec::new(),
        }
    }
}

#[derive(Args)]
struct BackupArgs {
    /// The agent: ssh://[USER@]HOST[:PORT] (runs `floe agent --stdio`
    /// there over OpenSSH), tls://HOST:PORT (mutual TLS, pinned),
    /// HOST:PORT (plain TCP), or exec:COMMAND (speak over the command's
    /// stdin/stdout).
    #[arg(long)]
    agent: String,
    #[command(flatten)]
    ssh: SshArgs,
    /// A source to back up, PLUGIN:NAME (repeatable): array:vol0.
    #[arg(long = "source", required_unless_present = "resume")]
    sources: Vec<String>,
    /// Resume set SET, whose mover died: back up only its items that are
    /// not durable yet, from the same frozen image (which the agent keeps
    /// for its --image-lease).
    #[arg(long, value_name = "SET", conflicts_with = "sources")]
    resume: Option<String>,
    #[command(flatten)]
    media: MediaArgs,
    /// The SAN's NBD server: devices not in the table are its exports,
    /// named by device id (WWN).
    #[arg(long)]
    san: Option<String>,
    /// Where a device is: ID=PATH or ID=nbd://HOST:PORT/EXPORT (repeatable).
    #[arg(long = "device", value_name = "ID=LOCATION")]
    devices: Vec<String>,
    /// A device (by identity, e.g. a WWN) this agent's maps may make the
    /// mover read (repeatable). Anything else is refused before any read.
    #[arg(long = "allow-device", value_name = "ID")]
    allow_devices: Vec<String>,
    /// Read whatever devices the agent's map names (no allow-list).
    #[arg(long, conflicts_with = "allow_devices")]
    allow_any_device: bool,
    #[command(flatten)]
    mover: MoverOptions,
    /// Print the result as JSON: `full` (the default) with the set's whole
    /// record, every item's; `summary` without the items (their count
    /// instead: a tree's record is tens of MB, `floe show` prints it).
    #[arg(
        long,
        value_name = "WHAT",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "full"
    )]
    json: Option<JsonReport>,
}

/// What `floe backup --json` prints.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum JsonReport {
    /// Everything, the set's record with every item.
    Full,
    /// Everything but the items of the set's record.
    Summary,
}

/// How `--agent ssh://…` and `--agent tls://…` reach the agent.
#[derive(Args)]
struct SshArgs {
    /// Private key for ssh (`ssh -i`).
    #[arg(long, value_name = "FILE")]
    ssh_identity: Option<PathBuf>,
    /// known_hosts file that pins the agent's host key (default: ssh's).
    #[arg(long, value_name = "FILE")]
    ssh_known_hosts: Option<PathBuf>,
    /// Extra ssh option (`ssh -o OPTION`, repeatable).
    #[arg(long = "ssh-opt", value_name = "OPTION")]
    ssh_opts: Vec<String>,
    /// The floe binary on the agent's host.
    #[arg(long, default_value = "floe")]
    remote_floe: String,
    /// With --agent tls://HOST:PORT: the mover's key pair directory.
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// The mover's key pair's name in --tls-dir.
    #[arg(long, default_value = "mover")]
    tls_name: String,
    /// With --agent tls://…: the agent certificate fingerprint (SHA256:…)
    /// to accept (repeatable).
    #[arg(long = "agent-fingerprint", value_name = "FINGERPRINT")]
    agent_fingerprints: Vec<String>,
    /// Arguments for `floe agent --stdio` on the agent's host, e.g.
    /// "--allow-source array:* --plugin-opt array.control=HOST:PORT".
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    remote_agent_args: String,
}

/// The ssh command line for `ssh://[user@]host[:port]`.
fn ssh_command(url: &str, a: &SshArgs) -> anyhow::Result<Vec<String>> {
    let rest = url
        .strip_prefix("ssh://")
        .ok_or_else(|| anyhow!("not an ssh:// URL: {url}"))?;
    let (userhost, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.contains('[') => (h, Some(p)),
        _ => (rest, None),
    };
    if userhost.is_empty() || userhost.contains('/') {
        bail!("bad agent URL {url:?}: want ssh://[USER@]HOST[:PORT]");
    }
    let mut cmd = vec![
        "ssh".to_string(),
        "-o".into(),
        "BatchMode=yes".into(),
        "-T".into(),
    ];
    if let Some(p) = port {
        let p: u16 = p.parse().map_err(|_| anyhow!("bad port in {url:?}"))?;
        cmd.extend(["-p".into(), p.to_string()]);
    }
    if let Some(i) = &a.ssh_identity {
        cmd.extend([
            "-i".into(),
            i.display().to_string(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
        ]);
    }
    if let Some(k) = &a.ssh_known_hosts {
        cmd.extend([
            "-o".into(),
            format!("UserKnownHostsFile={}", k.display()),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
        ]);
    }
    for o in &a.ssh_opts {
        cmd.extend(["-o".into(), o.clone()]);
    }
    cmd.push(userhost.to_string());
    cmd.push("--".into());
    let remote = format!("{} agent --stdio {}", a.remote_floe, a.remote_agent_args);
    cmd.push(remote.trim().to_string());
    Ok(cmd)
}

#[derive(Args)]
struct RestoreArgs {
    #[command(flatten)]
    media: MediaArgs,
    /// The set.
    #[arg(long)]
    set: String,
    /// ITEM=TARGET: a path (image file or block device) or
    /// nbd://HOST:PORT/EXPORT (repeatable). For volumes.
    #[arg(
        long = "to",
        value_name = "ITEM=TARGET",
        required_unless_present = "to_dir"
    )]
    targets: Vec<String>,
    /// Restore the set's files (or the --path ones) under this directory,
    /// with their metadata. For file system sets.
    #[arg(long, value_name = "DIR", conflicts_with = "targets")]
    to_dir: Option<PathBuf>,
    #[command(flatten)]
    tree: floe_core::restore::TreeOptions,
    /// Restore on the agent's host instead of here, through the agent:
    /// with --to-dir, the files under DIR; with --to ITEM=PATH, a volume to
    /// an image file or block device PATH there. The agent must allow the
    /// directory (DIR, or PATH's) with --allow-restore. Same forms as
    /// `floe backup --agent`.
    #[arg(long)]
    agent: Option<String>,
    #[command(flatten)]
    ssh: SshArgs,
    /// Show what would be restored, write nothing.
    #[arg(long)]
    dry_run: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_captured_later_and_remapped_are_shown_first() {
        use floe_core::model::{
            ConfigId, ItemHeader, ItemKind, ItemRecord, ItemTrailer, MediaPosition,
        };
        use floe_core::units::Bytes;
        let record = |n: usize, remaps: u32, later: bool| ItemRecord {
            header: ItemHeader {
                item: ItemId::new(format!("/t/f{n}")),
                kind: ItemKind::File,
                size: Bytes(1),
                config: ConfigId::new("c"),
                meta: Default::default(),
                file: None,
                holes: Vec::new(),
            },
            trailer: ItemTrailer {
                length: Bytes(1),
                blake3: "00".into(),
                config: ConfigId::new("c"),
                remaps,
                captured_after_freeze: later,
            },
            position: MediaPosition {
                medium: "m".into(),
                locator: "l".into(),
            },
        };
        let items = vec![
            record(0, 0, false),
            record(1, 2, false),
            record(2, 0, false),
            record(3, 1, true),
            record(4, 1, false),
        ];
        let names = |v: Vec<&ItemRecord>| -> Vec<String> {
            v.iter().map(|i| i.header.item.to_string()).collect()
        };
        assert_eq!(
            names(worth_showing(&items, 4)),
            ["/t/f3", "/t/f1", "/t/f4", "/t/f0"]
        );
        assert_eq!(names(worth_showing(&items, 9)).len(), 5);
    }

    fn ssh() -> SshArgs {
        SshArgs {
            ssh_identity: Some("/k".into()),
            ssh_known_hosts: Some("/kh".into()),
            ssh_opts: vec![],
            tls_dir: None,
            tls_name: "mover".into(),
            agent_fingerprints: vec![],
            remote_floe: "/opt/floe/bin/floe".into(),
            remote_agent_args: "--allow-source array:*".into(),
        }
    }

    #[test]
    fn ssh_urls_become_ssh_command_lines() {
        let c = ssh_command("ssh://root@app:2222", &ssh()).unwrap();
        assert_eq!(&c[..4], &["ssh", "-o", "BatchMode=yes", "-T"]);
        assert!(c.windows(2).any(|w| w == ["-p", "2222"]));
        assert!(c.windows(2).any(|w| w == ["-i", "/k"]));
        assert!(c
            .windows(2)
            .any(|w| w == ["-o", "StrictHostKeyChecking=yes"]));
        assert_eq!(
            c[c.len() - 3..],
            [
                "root@app",
                "--",
                "/opt/floe/bin/floe agent --stdio --allow-source array:*"
            ]
        );
        let c = ssh_command("ssh://app", &ssh()).unwrap();
        assert!(!c.contains(&"-p".to_string()));
        assert!(ssh_command("ssh://app:x", &ssh()).is_err());
        assert!(ssh_command("ssh://", &ssh()).is_err());
    }
}

#[derive(Args)]
struct ListArgs {
    /// Scan this media (PLUGIN:PATH) instead of reading the catalog.
    #[arg(long)]
    media: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum CatalogAction {
    /// Make the catalog's view of a media equal what is on it (after the
    /// catalog was lost, or a set committed to media missed it).
    ///
    /// Example: floe catalog rebuild --media disk:/backup
    Rebuild {
        #[command(flatten)]
        media: MediaArgs,
    },
}

fn registry(extra: &[PathBuf]) -> Arc<PluginRegistry> {
    let mut dirs = extra.to_vec();
    dirs.extend(PluginRegistry::default_dirs());
    // Plugins load when first needed; one that is refused is named where
    // it was needed (`require`) and by `floe plugins`.
    Arc::new(PluginRegistry::load_dirs(&dirs))
}

fn media_plugin(m: &MediaArgs) -> anyhow::Result<(String, serde_json::Value)> {
    let spec = m.media.as_str();
    let (name, arg) = spec
        .split_once(':')
        .ok_or_else(|| anyhow!("media {spec:?} is not PLUGIN:PATH (e.g. disk:/backup)"))?;
    let mut cfg = serde_json::Map::new();
    if !arg.is_empty() {
        cfg.insert("dir".into(), arg.into());
    }
    for o in &m.opts {
        let (k, v) = o
            .split_once('=')
            .ok_or_else(|| anyhow!("--media-opt {o:?} is not KEY=VALUE"))?;
        cfg.insert(k.to_string(), v.into());
    }
    Ok((name.to_string(), serde_json::Value::Object(cfg)))
}

/// What the media's plugin says about itself.
fn media_info(reg: &PluginRegistry, m: &MediaArgs) -> Option<floe_core::abi::PluginInfo> {
    let (name, _) = media_plugin(m).ok()?;
    reg.get(&name).map(|p| p.info.clone())
}

fn media_writer(reg: &PluginRegistry, m: &MediaArgs) -> anyhow::Result<Box<dyn MediaWriter>> {
    let (name, cfg) = media_plugin(m)?;
    Ok(reg
        .require(&name, Interface::MediaWriter)?
        .media_writer(&cfg)?)
}

fn media_reader(reg: &PluginRegistry, m: &MediaArgs) -> anyhow::Result<Box<dyn MediaReader>> {
    let (name, cfg) = media_plugin(m)?;
    Ok(reg
        .require(&name, Interface::MediaReader)?
        .media_reader(&cfg)?)
}

fn bar(total: u64) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    Some(pb)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn agent(reg: Arc<PluginRegistry>, a: AgentArgs) -> anyhow::Result<()> {
    if let Some(AgentAction::Init { dir, name }) = &a.action {
        let fp = floe_core::tls::init(dir, name)?;
        println!("{fp}");
        eprintln!(
            "key pair {name} written to {}; pin this fingerprint on the other side",
            dir.display()
        );
        return Ok(());
    }
    // A long-running agent loads every plugin now and says which it
    // refused, rather than at its first backup.
    for r in reg.refused() {
        eprintln!("floe: warning: plugin refused: {r}");
    }
    let mut plugin_config: HashMap<String, serde_json::Value> = HashMap::new();
    for o in &a.plugin_opts {
        let (k, v) = o
            .split_once('=')
            .ok_or_else(|| anyhow!("--plugin-opt wants PLUGIN.KEY=VALUE, got {o:?}"))?;
        let (p, key) = k
            .split_once('.')
            .ok_or_else(|| anyhow!("--plugin-opt wants PLUGIN.KEY=VALUE, got {o:?}"))?;
        let entry = plugin_config
            .entry(p.to_string())
            .or_insert_with(|| serde_json::json!({}));
        if let Some(m) = entry.as_object_mut() {
            m.insert(key.to_string(), v.into());
        }
    }
    let opts = AgentOptions {
        plugin_config,
        host: a.host.unwrap_or_else(hostname),
        max_frame: None,
        allow_sources: a.allow_sources,
        allow_restore: a.allow_restore,
        image_lease: std::time::Duration::from_secs(a.image_lease),
    };
    let agent = Arc::new(Agent::new(reg, opts));
    if a.stdio {
        // The agent ends with the stream: nothing can wait for a lease.
        agent.serve_with_lease(std::io::stdin().lock(), std::io::stdout().lock(), false)?;
        return Ok(());
    }
    let addr = a
        .listen
        .ok_or_else(|| anyhow!("say --listen ADDR or --stdio"))?;
    let l =
        std::net::TcpListener::bind(&addr).with_context(|| format!("cannot listen on {addr}"))?;
    if let Some(dir) = &a.tls_dir {
        let me = floe_core::tls::Identity::load(dir, &a.tls_name)?;
        let cfg = floe_core::tls::server_config(me, &a.trust_movers)?;
        eprintln!("floe agent: listening (mutual TLS) on {}", l.local_addr()?);
        agent.listen_tls(l, cfg)?;
        return Ok(());
    }
    eprintln!("floe agent: listening on {}", l.local_addr()?);
    agent.listen(l)?;
    Ok(())
}

fn connect_agent(spec: &str, ssh: &SshArgs) -> anyhow::Result<AgentClient> {
    let argv: Option<Vec<String>> = if spec.starts_with("ssh://") {
        Some(ssh_command(spec, ssh)?)
    } else {
        spec.strip_prefix("exec:")
            .map(|cmd| vec!["sh".to_string(), "-c".into(), cmd.to_string()])
    };
    if let Some(argv) = argv {
        let mut child = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start agent command {argv:?}"))?;
        let w = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        let r = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        return Ok(AgentClient::new(Box::new(r), Box::new(w))?);
    }
    if let Some(addr) = spec.strip_prefix("tls://") {
        let dir = ssh
            .tls_dir
            .as_ref()
            .ok_or_else(|| anyhow!("--agent tls://… needs --tls-dir with the mover's key pair"))?;
        let me = floe_core::tls::Identity::load(dir, &ssh.tls_name)?;
        let cfg = floe_core::tls::client_config(me, &ssh.agent_fingerprints)?;
        return Ok(AgentClient::connect_tls(addr, cfg)?);
    }
    let addr = spec.strip_prefix("tcp://").unwrap_or(spec);
    Ok(AgentClient::connect_tcp(addr)?)
}

/// Joins the catalog's background checkpoint however the command ends. A
/// checkpoint that fails is reported and left to the next one: the WAL
/// keeps everything committed.
struct BackgroundCheckpoint(Option<std::thread::JoinHandle<floe_core::error::Result<()>>>);

impl Drop for BackgroundCheckpoint {
    fn drop(&mut self) {
        match self.0.take().map(std::thread::JoinHandle::join) {
            Some(Ok(r)) => warn_unless_checkpointed(r),
            Some(Err(_)) => eprintln!("floe: warning: the catalog checkpoint panicked"),
            None => {}
        }
    }
}

/// Checkpoint the catalog after a command wrote it.
fn checkpoint_or_warn(cat: &Catalog) {
    warn_unless_checkpointed(cat.checkpoint());
}

/// A checkpoint that failed is only reported: the WAL keeps what was
/// committed, and the next checkpoint copies it.
fn warn_unless_checkpointed(r: floe_core::error::Result<()>) {
    if let Err(e) = r {
        eprintln!("floe: warning: {e} (the next command that writes the catalog tries again)");
    }
}

fn run_backup(
    reg: Arc<PluginRegistry>,
    a: BackupArgs,
    catalog: Option<&PathBuf>,
) -> anyhow::Result<()> {
    // Open the catalog first: a backup that could not be catalogued should
    // fail before it reads anything.
    let mut cat = if a.media.media.starts_with("null:") {
        None
    } else {
        Some(open_catalog(catalog)?)
    };
    // What the last commits left in the catalog's WAL goes into the
    // database meanwhile (commits leave it there).
    let _checkpoint = BackgroundCheckpoint(cat.as_ref().map(Catalog::checkpoint_in_background));
    let mut table = HashMap::new();
    for d in &a.devices {
        let (id, loc) = d
            .split_once('=')
            .ok_or_else(|| anyhow!("--device wants ID=LOCATION, got {d:?}"))?;
        table.insert(DeviceId::new(id), parse_location(loc)?);
    }
    let san = match &a.san {
        None => None,
        Some(s) => match parse_location(s)? {
            Location::Nbd(addr, _) => Some(addr),
            Location::Path(_) => bail!("--san wants nbd://HOST:PORT, got {s:?}"),
        },
    };
    let resolver = DeviceResolver::new(table, san);
    let resolver = match (a.allow_any_device, a.allow_devices.is_empty()) {
        (true, _) => resolver,
        (false, false) => resolver.with_allow_list(a.allow_devices.iter().map(DeviceId::new)),
        (false, true) => bail!(
            "say which devices this agent may have the mover read: --allow-device ID (repeatable), or --allow-any-device"
        ),
    };
    let mut media = media_writer(&reg, &a.media)?;
    // Media that build trees as they go (restic) take items in path order.
    let mut mover = a.mover.clone();
    mover.path_order = media_info(&reg, &a.media).is_some_and(|i| i.path_order);
    let mut client = connect_agent(&a.agent, &a.ssh)?;
    let mut pb: Option<ProgressBar> = None;
    let mut base = 0u64;
    let mut last_item: Option<ItemId> = None;
    let mut progress = |p: &Progress| match p {
        Progress::Begun { set, resumed } => {
            if *resumed > 0 {
                eprintln!("floe: resuming set {set}: {resumed} item(s) already on the media");
            } else {
                eprintln!("floe: set {set} begun (if this mover dies, `floe backup --resume {set}` continues it)");
            }
        }
        Progress::Frozen { bytes, .. } => pb = bar(bytes.0),
        Progress::Mapped { bytes, .. } => {
            if let Some(pb) = &pb {
                pb.inc_length(bytes.0);
            }
        }
        Progress::Written { item, done, size } => {
            if let Some(pb) = &pb {
                if last_item.as_ref() != Some(item) {
                    if last_item.is_some() {
                        base = pb.position();
                    }
                    last_item = Some(item.clone());
                    pb.set_message(item.to_string());
                }
                pb.set_position(base + done.0.min(size.0));
            }
        }
        Progress::Remapped { item, remaps } => {
            if let Some(pb) = &pb {
                pb.println(format!(
                    "{item}: map changed during the backup, {remaps} remap(s) applied"
                ));
            }
        }
    };
    // The catalog stages the set while the media commit it, and commits
    // after them (the catalog commit is last).
    let mut recorder = cat.as_mut().map(|catalog| CatalogRecorder {
        catalog,
        media: &a.media.media,
    });
    let recorder = recorder.as_mut().map(|r| r as &mut dyn Recorder);
    let report = match &a.resume {
        Some(set) => resume_recorded(
            &mut client,
            &SetId::new(set.clone()),
            &resolver,
            media.as_mut(),
            recorder,
            &mover,
            &mut progress,
        )
        .with_context(|| format!("resume of set {set} failed; nothing was recorded as complete"))?,
        None => backup_recorded(
            &mut client,
            &a.sources,
            &resolver,
            media.as_mut(),
            recorder,
            &mover,
            &mut progress,
        )
        .with_context(|| {
            format!(
                "backup of {} failed; nothing was recorded as complete",
                a.sources.join(" ")
            )
        })?,
    };
    // Never freed: the process ends after the report is printed (a tree's
    // set is about a million allocations, a tenth of a second to free).
    let report = std::mem::ManuallyDrop::new(report);
    if let Some(why) = &report.unrecorded {
        bail!(
            "set {} is complete on {} but could not be catalogued ({why}); `floe catalog rebuild --media {}` adds it",
            report.set.header.set,
            a.media.media,
            a.media.media
        );
    }
    if let Some(what) = a.json {
        // Straight to stdout, by reference: a tree's set is tens of MB of
        // JSON (a `Value` copy of it would cost a second).
        #[derive(serde::Serialize)]
        struct Seconds {
            map: f64,
            r#move: f64,
            media_commit: f64,
            catalog: f64,
        }
        /// The set's record, or all of it but its items.
        #[derive(serde::Serialize)]
        #[serde(untagged)]
        enum Set<'a> {
            Full(&'a floe_core::model::SetRecord),
            Summary {
                header: &'a floe_core::model::SetHeader,
                items: usize,
                #[serde(skip_serializing_if = "<[_]>::is_empty")]
                failures: &'a [floe_core::model::ItemFailure],
                committed_at: u64,
            },
        }
        #[derive(serde::Serialize)]
        struct Json<'a> {
            set: Set<'a>,
            remaps: u32,
            rereads: u32,
            bytes_read: u64,
            bytes_written: u64,
            bytes_from_agent: u64,
            map_parts: u32,
            seconds: Seconds,
        }
        let set = &report.set;
        let json = Json {
            set: match what {
                JsonReport::Full => Set::Full(set),
                JsonReport::Summary => Set::Summary {
                    header: &set.header,
                    items: set.items.len(),
                    failures: &set.failures,
                    committed_at: set.committed_at,
                },
            },
            remaps: report.remaps,
            rereads: report.rereads,
            bytes_read: report.bytes_read,
            bytes_written: report.bytes_written,
            bytes_from_agent: report.bytes_from_agent,
            map_parts: report.map_parts,
            seconds: Seconds {
                map: report.timings.map.as_secs_f64(),
                r#move: report.timings.r#move.as_secs_f64(),
                media_commit: report.timings.commit.as_secs_f64(),
                catalog: report.timings.record.as_secs_f64(),
            },
        };
        let mut out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
        serde_json::to_writer(&mut out, &json)?;
        writeln!(out)?;
        out.flush()?;
    } else {
        println!(
            "set {} committed{} ({} items, {} bytes, {} remaps, {} re-reads, map in {} part(s))",
            report.set.header.set,
            if report.set.failures.is_empty() {
                ""
            } else {
                " PARTIAL"
            },
            report.set.items.len(),
            report.bytes_written,
            report.remaps,
            report.rereads,
            report.map_parts
        );
        let t = &report.timings;
        println!(
            "  read {} bytes from devices, {} bytes of map and answers from the agent; first part of the map {:.2} s, move {:.2} s, media commit {:.2} s, catalog {:.2} s",
            report.bytes_read,
            report.bytes_from_agent,
            t.map.as_secs_f64(),
            t.r#move.as_secs_f64(),
            t.commit.as_secs_f64(),
            t.record.as_secs_f64()
        );
        const SHOWN: usize = 40;
        for i in worth_showing(&report.set.items, SHOWN) {
            println!(
                "  {:<12} {:>14} bytes  blake3 {}  remaps {}{}",
                i.header.item,
                i.trailer.length.0,
                i.trailer.blake3,
                i.trailer.remaps,
                if i.trailer.captured_after_freeze {
                    "  (captured after the freeze: a later version, whole)"
                } else {
                    ""
                }
            );
        }
        if report.set.items.len() > SHOWN {
            println!(
                "  … and {} more (floe ls {})",
                report.set.items.len() - SHOWN,
                report.set.header.set
            );
        }
        let late = report
            .set
            .items
            .iter()
            .filter(|i| i.trailer.captured_after_freeze)
            .count();
        if late > 0 {
            println!("  {late} item(s) changed after the freeze and were captured whole in their later version");
        }
    }
    if !report.set.failures.is_empty() {
        for f in &report.set.failures {
            eprintln!("  not backed up: {}: {}", f.item, f.error);
        }
        return Err(Partial(format!(
            "set {} is PARTIAL: {} item(s) could not be backed up (listed above; the set records them)",
            report.set.header.set,
            report.set.failures.len()
        ))
        .into());
    }
    Ok(())
}

/// The first `n` items to show of a set: those captured after the
/// freeze, then those remapped (what an admin looks for), then the rest,
/// each group in set order.
fn worth_showing(
    items: &[floe_core::model::ItemRecord],
    n: usize,
) -> Vec<&floe_core::model::ItemRecord> {
    let mut shown: Vec<&floe_core::model::ItemRecord> = items.iter().collect();
    shown.sort_by_key(|i| (!i.trailer.captured_after_freeze, i.trailer.remaps == 0));
    shown.truncate(n);
    shown
}

/// The error of a backup that committed a partial set (exit status 3).
#[derive(Debug)]
pub struct Partial(pub String);

impl std::fmt::Display for Partial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Partial {}

/// The record of the set to restore: from the catalog when it has the
/// set on these media (one record to decode; the media may hold many
/// sets, each with its index), else from the media themselves.
fn set_to_restore(
    reader: &mut dyn floe_core::abi::MediaReader,
    a: &RestoreArgs,
    catalog: Option<&PathBuf>,
) -> anyhow::Result<floe_core::model::SetRecord> {
    let path = catalog_path(catalog);
    if path.exists() {
        match Catalog::open(&path).and_then(|c| c.set(&SetId::new(a.set.clone()))) {
            Ok(e) if e.media == a.media.media => return Ok(e.record),
            // Catalogued on other media, or not at all: these media say.
            Ok(_) => {}
            Err(e) if e.kind() == floe_core::error::ErrorKind::NotFound => {}
            Err(e) => eprintln!(
                "floe: warning: the catalog {} could not be read ({e}); reading the set's record from {}",
                path.display(),
                a.media.media
            ),
        }
    }
    reader
        .list_sets()?
        .into_iter()
        .find(|s| s.header.set.as_str() == a.set)
        .ok_or_else(|| anyhow!("no set {} on {}", a.set, a.media.media))
}

fn run_restore_tree(
    reg: &Arc<PluginRegistry>,
    mut reader: Box<dyn floe_core::abi::MediaReader>,
    a: &RestoreArgs,
    set: &floe_core::model::SetRecord,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    use floe_core::restore::plan_tree;
    let steps = plan_tree(set, dir, &a.tree)?;
    if a.dry_run {
        for st in &steps {
            println!(
                "would restore {:<10} {} -> {} ({} bytes)",
                st.item.header.kind.name(),
                st.item.header.item,
                st.dest.display(),
                st.item.trailer.length
            );
        }
        return Ok(());
    }
    let pb = bar(steps.len() as u64);
    let report = if let Some(agent) = &a.agent {
        // On the agent's host: one reader here, the files made there.
        let mut client = connect_agent(agent, &a.ssh)?;
        let host = client.host.clone();
        let r = floe_core::restore::restore_tree_via_agent(
            &mut client,
            reader.as_mut(),
            set,
            dir,
            &a.tree,
            &mut |_| {
                if let Some(pb) = &pb {
                    pb.inc(1);
                }
            },
        )?;
        eprintln!("floe: restored on {host} through its agent");
        r
    } else {
        restore_here(reg, reader, a, set, &steps, pb.as_ref())?
    };
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    println!(
        "restored {} items ({} bytes of file data, verified) of set {} to {}",
        report.items,
        report.bytes,
        set.header.set,
        dir.display()
    );
    if !report.failures.is_empty() {
        for (item, e) in &report.failures {
            eprintln!("  not restored: {item}: {e}");
        }
        bail!("{} item(s) could not be restored", report.failures.len());
    }
    Ok(())
}

/// Restore a tree to a directory on this host, with several media readers
/// in parallel (one for sequential media such as tape).
fn restore_here(
    reg: &Arc<PluginRegistry>,
    reader: Box<dyn floe_core::abi::MediaReader>,
    a: &RestoreArgs,
    set: &floe_core::model::SetRecord,
    steps: &[floe_core::restore::TreeStep],
    pb: Option<&ProgressBar>,
) -> anyhow::Result<floe_core::restore::TreeReport> {
    use floe_core::restore::restore_tree;
    // Several readers of the media, each restoring different files.
    // Tape is read by one reader, in order.
    let sequential = media_info(reg, &a.media).is_some_and(|i| i.sequential_media);
    let workers = if sequential {
        1
    } else {
        std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .clamp(1, 4)
    };
    let mut readers = Vec::with_capacity(workers);
    readers.push(reader);
    for _ in 1..workers {
        readers.push(media_reader(reg, &a.media)?);
    }
    Ok(restore_tree(
        &mut readers,
        set,
        steps,
        &a.tree,
        &mut |_| {
            if let Some(pb) = pb {
                pb.inc(1);
            }
        },
    )?)
}

fn run_restore(
    reg: Arc<PluginRegistry>,
    a: RestoreArgs,
    catalog: Option<&PathBuf>,
) -> anyhow::Result<()> {
    let mut reader = media_reader(&reg, &a.media)?;
    if let Some(dir) = &a.to_dir {
        let set = set_to_restore(reader.as_mut(), &a, catalog)?;
        return run_restore_tree(&reg, reader, &a, &set, dir);
    }
    let set = SetId::new(a.set.clone());
    for t in &a.targets {
        let (item, target) = t
            .split_once('=')
            .ok_or_else(|| anyhow!("--to wants ITEM=TARGET, got {t:?}"))?;
        let item = ItemId::new(item);
        // Find the item before touching the target.
        let rec = reader.open_item(&set, &item)?;
        if a.dry_run {
            println!(
                "would restore {item} ({} bytes, blake3 {}) to {target}",
                rec.trailer.length, rec.trailer.blake3
            );
            continue;
        }
        if let Some(agent) = &a.agent {
            // On the agent's host: an image file or a block device there,
            // under its --allow-restore directories.
            let mut client = connect_agent(agent, &a.ssh)?;
            let host = client.host.clone();
            let n = floe_core::restore::restore_volume_via_agent(
                &mut client,
                reader.as_mut(),
                &set,
                &item,
                std::path::Path::new(target),
            )
            .with_context(|| format!("restore of {item} to {target} on {host} failed"))?;
            println!(
                "restored {item} to {target} on {host} through its agent: {} bytes, blake3 {} (verified there)",
                n, rec.trailer.blake3
            );
            continue;
        }
        let mut tgt = open_target(target)?;
        let mut pb: Option<ProgressBar> = None;
        let mut progress = |p: &Progress| {
            if let Progress::Written { done, size, .. } = p {
                let b = pb.get_or_insert_with(|| bar(size.0).unwrap_or_else(ProgressBar::hidden));
                b.set_position(done.0);
            }
        };
        let r = restore_item(reader.as_mut(), &set, &item, tgt.as_mut(), &mut progress)
            .with_context(|| format!("restore of {item} to {target} failed"))?;
        println!(
            "restored {item} to {target}: {} bytes, blake3 {} (verified)",
            r.bytes, r.blake3
        );
    }
    Ok(())
}

fn catalog_path(cli: Option<&PathBuf>) -> PathBuf {
    cli.cloned()
        .or_else(|| std::env::var_os("FLOE_CATALOG").map(PathBuf::from))
        .unwrap_or_else(|| {
            let home =
                std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
            home.join(".local/share/floe/catalog.db")
        })
}

fn open_catalog(cli: Option<&PathBuf>) -> anyhow::Result<Catalog> {
    Ok(Catalog::open(&catalog_path(cli))?)
}

fn run_list(
    reg: Arc<PluginRegistry>,
    a: ListArgs,
    catalog: Option<&PathBuf>,
) -> anyhow::Result<()> {
    use floe_core::catalog::Summary;
    let summaries: Vec<Summary> = match (&a.media, a.json) {
        (Some(m), json) => {
            let sets = media_reader(&reg, &MediaArgs::plain(m))?.list_sets()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sets)?);
                return Ok(());
            }
            sets.iter().map(|s| Summary::of(m, s)).collect()
        }
        (None, true) => {
            let sets: Vec<_> = open_catalog(catalog)?
                .sets()?
                .into_iter()
                .map(|e| e.record)
                .collect();
            println!("{}", serde_json::to_string_pretty(&sets)?);
            return Ok(());
        }
        // From the catalog's facts, not its records (a tree's is tens of
        // MB of JSON).
        (None, false) => open_catalog(catalog)?.summaries()?,
    };
    // One line per set (`floe ls SET` lists its items).
    for s in &summaries {
        let partial = if s.failures == 0 {
            String::new()
        } else {
            format!("  partial: {} not backed up", s.failures)
        };
        let label = if s.label.is_empty() {
            String::new()
        } else {
            format!("  label {}", s.label)
        };
        println!(
            "{}  {} UTC  {} items  {} bytes{partial}  from {}{label}  sources {}",
            s.set,
            floe_core::retention::utc(s.committed_at),
            s.items,
            s.bytes,
            s.agent,
            s.sources.join(",")
        );
    }
    Ok(())
}

/// Run the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    // Plugin files are found now and loaded as commands need them.
    let reg = registry(&cli.plugin_dirs);
    let lists_refused = matches!(cli.command, Command::Agent(_) | Command::Plugins);
    let done = run_with(cli, reg.clone());
    // A plugin file passed over on the way (an old build early in the
    // search path) is named, whatever the command's outcome.
    if !lists_refused {
        for r in reg.refused_so_far() {
            eprintln!("floe: warning: plugin file passed over: {r}");
        }
    }
    done
}

fn run_with(cli: Cli, reg: Arc<PluginRegistry>) -> anyhow::Result<()> {
    match cli.command {
        Command::SimSan(c) => floe_sim_san::cli::run(c),
        Command::Agent(a) => agent(reg, a),
        Command::Backup(a) => run_backup(reg, *a, cli.catalog.as_ref()),
        Command::Restore(a) => run_restore(reg, a, cli.catalog.as_ref()),
        Command::List(a) => run_list(reg, a, cli.catalog.as_ref()),
        Command::Show { set } => {
            let e = open_catalog(cli.catalog.as_ref())?.set(&SetId::new(set))?;
            println!("{}", serde_json::to_string_pretty(&e)?);
            Ok(())
        }
        Command::Ls { set } => {
            let e = open_catalog(cli.catalog.as_ref())?.set(&SetId::new(set))?;
            for i in &e.record.items {
                // A cartridge label is shown; a disk path already is.
                let medium = if e.media.ends_with(&i.position.medium) {
                    String::new()
                } else {
                    format!("{} ", i.position.medium)
                };
                println!(
                    "{:<8} {:<16} {:>14} bytes  blake3 {}  {} {medium}{}",
                    i.header.kind.name(),
                    i.header.item.as_str(),
                    i.trailer.length.0,
                    i.trailer.blake3,
                    e.media,
                    i.position.locator
                );
            }
            Ok(())
        }
        Command::Verify {
            media,
            set,
            verbose,
        } => {
            let mut reader = media_reader(&reg, &media)?;
            let sets: Vec<SetId> = match set {
                Some(s) => vec![SetId::new(s)],
                None => reader
                    .list_sets()?
                    .into_iter()
                    .map(|s| s.header.set)
                    .collect(),
            };
            let mut damaged = 0usize;
            let mut items = 0usize;
            for s in &sets {
                let (mut n, mut bad, mut bytes) = (0usize, 0usize, 0u64);
                for o in verify_set(reader.as_mut(), s)? {
                    n += 1;
                    bytes += o.bytes;
                    match &o.damage {
                        None if verbose => println!("ok       {s} {} ({} bytes)", o.item, o.bytes),
                        None => {}
                        Some(why) => {
                            bad += 1;
                            println!("DAMAGED  {s} {}: {why}", o.item);
                        }
                    }
                }
                let state = if bad == 0 {
                    "ok".to_string()
                } else {
                    format!("{bad} DAMAGED")
                };
                println!("set      {s}: {n} item(s), {bytes} bytes read, {state}");
                items += n;
                damaged += bad;
            }
            if damaged > 0 {
                bail!("{damaged} of {items} item(s) damaged on {}", media.media);
            }
            println!("{items} item(s) in {} set(s) verified", sets.len());
            Ok(())
        }
        Command::Prune {
            media,
            policy,
            dry_run,
        } => {
            if policy.is_empty() {
                bail!(
                    "say what to keep: --keep-last, --keep-daily, --keep-weekly or --keep-monthly"
                );
            }
            let sets = media_reader(&reg, &media)?.list_sets()?;
            let (keep, forget) = floe_core::retention::plan(&sets, &policy);
            for k in &keep {
                println!("keep    {k}");
            }
            for f in &forget {
                println!("{} {f}", if dry_run { "would forget" } else { "forget " });
            }
            let mut writer = media_writer(&reg, &media)?;
            if dry_run {
                for c in writer.recycle(&forget, true)? {
                    println!("would recycle {c} (every set on it forgotten)");
                }
                return Ok(());
            }
            let mut cat = open_catalog(cli.catalog.as_ref())?;
            let mut stays = Vec::new();
            for f in &forget {
                cat.forget(f)?;
                match writer.delete_set(f) {
                    Ok(()) => {}
                    // Tape cannot drop one set: the catalog forgets it, the
                    // bytes stay until its cartridges are recycled.
                    Err(e) if e.kind() == floe_core::error::ErrorKind::Unsupported => {
                        stays.push(f.clone())
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            checkpoint_or_warn(&cat);
            println!("{} set(s) kept, {} forgotten", keep.len(), forget.len());
            if !stays.is_empty() {
                // A cartridge is recycled only when every set on it is
                // forgotten.
                let freed = writer.recycle(&forget, false)?;
                for c in &freed {
                    println!("recycled {c}: every set on it was forgotten; it takes new sets");
                }
                let left = media_reader(&reg, &media)?
                    .list_sets()?
                    .iter()
                    .filter(|s| stays.contains(&s.header.set))
                    .count();
                if left > 0 {
                    println!(
                        "{left} forgotten set(s) stay on {} until every set on their cartridges is forgotten",
                        media.media
                    );
                }
            }
            Ok(())
        }
        Command::Catalog(CatalogAction::Rebuild { media }) => {
            let mut reader = media_reader(&reg, &media)?;
            let mut cat = open_catalog(cli.catalog.as_ref())?;
            let n = cat.rebuild(&media.media, reader.as_mut())?;
            checkpoint_or_warn(&cat);
            println!("catalog rebuilt from {}: {n} set(s)", media.media);
            Ok(())
        }
        Command::Plugins => {
            for p in reg.plugins() {
                println!(
                    "{:<8} {:<8} {:?}  {}",
                    p.info.name,
                    p.info.version,
                    p.info.interfaces,
                    p.path.display()
                );
            }
            for r in reg.refused() {
                println!("refused: {r}");
            }
            Ok(())
        }
    }
}
