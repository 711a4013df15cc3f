//! Two hosts: the agent runs on an "application host" — its own network
//! namespace with a real OpenSSH server — and the mover reaches it with
//! `floe backup --agent ssh://root@HOST:PORT`, pinning the host key with a
//! known_hosts file. The mover reads the SAN itself; only the map crosses
//! ssh.

use floe_core::units::Bytes;
use floe_sim_san::control::Op;
use floe_sim_san::SimSan;
use floe_tests::{floe_bin, floe_cmd, have, is_root, skip};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A network namespace joined to this one by a veth pair; removed (with
/// both ends of the pair) when dropped.
struct AppHost {
    ns: String,
    host_ip: String,
    app_ip: String,
}

fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .status()
        .is_ok_and(|s| s.success())
}

impl AppHost {
    fn create() -> Option<AppHost> {
        let id = std::process::id();
        let ns = format!("floeapp{id}");
        let (a, b) = (
            format!("fva{}", id % 100_000),
            format!("fvb{}", id % 100_000),
        );
        let net = id % 250;
        let (host_ip, app_ip) = (format!("10.231.{net}.1"), format!("10.231.{net}.2"));
        if !sh(&["ip", "netns", "add", &ns]) {
            return None;
        }
        let me = AppHost {
            ns: ns.clone(),
            host_ip: host_ip.clone(),
            app_ip: app_ip.clone(),
        };
        let ok = sh(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b])
            && sh(&["ip", "link", "set", &b, "netns", &ns])
            && sh(&["ip", "addr", "add", &format!("{host_ip}/30"), "dev", &a])
            && sh(&["ip", "link", "set", &a, "up"])
            && sh(&[
                "ip",
                "netns",
                "exec",
                &ns,
                "ip",
                "addr",
                "add",
                &format!("{app_ip}/30"),
                "dev",
                &b,
            ])
            && sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", &b, "up"])
            && sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
        ok.then_some(me)
    }
}

impl Drop for AppHost {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth end in it, and so the pair.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// sshd in the application host's namespace, killed (by pid) when dropped.
struct Sshd(Child);

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn keygen(path: &Path) {
    assert!(sh(&[
        "ssh-keygen",
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-f",
        path.to_str().unwrap()
    ]));
}

#[test]
fn backup_through_an_agent_reached_over_ssh_on_another_host() {
    let name = "backup_through_an_agent_reached_over_ssh_on_another_host";
    if !is_root() || !have("sshd") || !have("ssh") || !have("ip") {
        return skip(
            name,
            "needs root, sshd and ssh (Debian openssh-server, openssh-client) and ip (iproute2)",
        );
    }
    let Some(app) = AppHost::create() else {
        return skip(name, "cannot create a network namespace with a veth pair");
    };
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // The SAN: NBD for the mover on loopback, control for the agent on the
    // host side of the veth pair.
    let san = SimSan::start(
        &d.join("san"),
        3,
        "127.0.0.1:0",
        &format!("{}:0", app.host_ip),
    )
    .unwrap();
    san.array.create_lun("lun0", Bytes(64 << 20)).unwrap();
    let mut ctl = san.client().unwrap();
    ctl.call(Op::CreateVolume {
        name: "vol0".into(),
        size: Bytes(8 << 20),
        max_run_chunks: Some(4),
        luns: None,
    })
    .unwrap();
    ctl.call(Op::Workload {
        target: "vol0".into(),
        seed: 1,
        writes: 200,
        max_length: Bytes(1 << 20),
    })
    .unwrap();
    let want = ctl
        .call(Op::Checksum {
            target: "vol0".into(),
            offset: None,
            length: None,
        })
        .unwrap()["blake3"]
        .as_str()
        .unwrap()
        .to_string();

    // sshd on the application host, with its own host key and one
    // authorized client key.
    keygen(&d.join("host_key"));
    keygen(&d.join("client_key"));
    std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let port = 2222;
    let cfg = format!(
        "Port {port}\nListenAddress {}\nHostKey {}\nAuthorizedKeysFile {}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile {}\n",
        app.app_ip,
        d.join("host_key").display(),
        d.join("authorized_keys").display(),
        d.join("sshd.pid").display()
    );
    std::fs::write(d.join("sshd_config"), cfg).unwrap();
    let _sshd = Sshd(
        Command::new("ip")
            .args(["netns", "exec", &app.ns, "/usr/sbin/sshd", "-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The mover pins the application host's key.
    let host_pub = std::fs::read_to_string(d.join("host_key.pub")).unwrap();
    let mut fields = host_pub.split_whitespace();
    let known = format!(
        "[{}]:{port} {} {}\n",
        app.app_ip,
        fields.next().unwrap(),
        fields.next().unwrap()
    );
    std::fs::write(d.join("known_hosts"), known).unwrap();
    for _ in 0..100 {
        if std::net::TcpStream::connect((app.app_ip.as_str(), port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let media = d.join("media");
    let wwn = san.array.luns()[0].wwn.clone();
    let remote_args = format!(
        "--allow-source 'array:vol*' --plugin-opt array.control={}",
        san.control_addr
    );
    let backup = |known_hosts: &Path| {
        floe_cmd()
            .args([
                "backup",
                "--agent",
                &format!("ssh://root@{}:{port}", app.app_ip),
            ])
            .arg("--ssh-identity")
            .arg(d.join("client_key"))
            .arg("--ssh-known-hosts")
            .arg(known_hosts)
            .args([
                "--remote-floe",
                floe_bin().to_str().unwrap(),
                "--remote-agent-args",
                &remote_args,
            ])
            .args([
                "--san",
                &format!("nbd://{}", san.nbd_addr),
                "--allow-device",
                &wwn,
                "--source",
                "array:vol0",
                "--json",
            ])
            .arg("--media")
            .arg(format!("disk:{}", media.display()))
            .output()
            .unwrap()
    };
    let out = backup(&d.join("known_hosts"));
    assert!(
        out.status.success(),
        "backup over ssh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["set"]["items"][0]["trailer"]["blake3"].as_str(),
        Some(want.as_str())
    );
    assert_eq!(
        report["set"]["header"]["agent"]
            .as_str()
            .map(|s| !s.is_empty()),
        Some(true)
    );

    // A host key that is not the pinned one: ssh refuses, floe fails.
    std::fs::write(d.join("wrong_known_hosts"), format!("[{}]:{port} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE1Qmtb3D1YqjTd2hpx4nEpV0ZLZlHpbdiCdVCVOmGaP\n", app.app_ip)).unwrap();
    let out = backup(&d.join("wrong_known_hosts"));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("hung up") || err.contains("Host key verification failed"),
        "{err}"
    );
}
