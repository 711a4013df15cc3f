//! The agent daemon over mutual TLS: both sides pin each other's
//! certificate fingerprint, like ssh's known_hosts.

use floe_tests::{floe_cmd, SimSanProcess};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Output, Stdio};

fn init(dir: &Path, name: &str) -> String {
    let out = floe_cmd()
        .args([
            "agent",
            "init",
            "--dir",
            dir.to_str().unwrap(),
            "--name",
            name,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

struct AgentProc(Child);

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn mutual_tls_with_pinned_fingerprints_both_ways() {
    let d = tempfile::tempdir().unwrap();
    let (agent_dir, mover_dir, stranger_dir) = (
        d.path().join("agent"),
        d.path().join("mover"),
        d.path().join("stranger"),
    );
    let agent_fp = init(&agent_dir, "agent");
    let mover_fp = init(&mover_dir, "mover");
    let stranger_fp = init(&stranger_dir, "mover");
    assert!(
        agent_fp.starts_with("SHA256:") && agent_fp.len() == 7 + 64,
        "{agent_fp}"
    );
    assert_ne!(mover_fp, stranger_fp);
    let mode = std::fs::metadata(agent_dir.join("agent.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the private key is the owner's alone");
    let again = floe_cmd()
        .args(["agent", "init", "--dir", agent_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        !again.status.success()
            && String::from_utf8_lossy(&again.stderr).contains("not overwriting")
    );

    let san = SimSanProcess::start(&["lun0=64M"], &[]);
    san.ctl(r#"{"op":"create_volume","name":"vol0","size":8388608}"#);
    san.ctl(r#"{"op":"workload","target":"vol0","seed":4,"writes":100,"max_length":262144}"#);
    let want = san.ctl(r#"{"op":"checksum","target":"vol0"}"#)["blake3"]
        .as_str()
        .unwrap()
        .to_string();

    let mut child = floe_cmd()
        .args([
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--allow-source",
            "array:*",
            "--plugin-opt",
        ])
        .arg(format!("array.control={}", san.control))
        .arg("--tls-dir")
        .arg(&agent_dir)
        .args(["--trust-mover", &mover_fp])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let _agent = AgentProc(child);
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("mutual TLS"), "{line}");
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();
    std::thread::spawn(move || for _ in err.lines() {});

    let media = d.path().join("media");
    let backup = |key_dir: &Path, pin: &str| -> Output {
        floe_cmd()
            .args([
                "backup",
                "--agent",
                &format!("tls://{addr}"),
                "--tls-dir",
                key_dir.to_str().unwrap(),
                "--agent-fingerprint",
                pin,
            ])
            .args([
                "--san",
                &format!("nbd://{}", san.nbd),
                "--allow-any-device",
                "--source",
                "array:vol0",
                "--json",
            ])
            .arg("--media")
            .arg(format!("disk:{}", media.display()))
            .output()
            .unwrap()
    };
    let out = backup(&mover_dir, &agent_fp);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["set"]["items"][0]["trailer"]["blake3"].as_str(),
        Some(want.as_str())
    );

    // The mover does not trust an agent with another certificate.
    let out = backup(&mover_dir, &stranger_fp);
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("TLS handshake with the agent") && e.contains("not one this side trusts"),
        "{e}"
    );

    // The agent does not serve a mover it does not trust.
    let out = backup(&stranger_dir, &agent_fp);
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("[denied]") || e.contains("[protocol]") || e.contains("[remote]"),
        "{e}"
    );

    // Plain TCP to the TLS port gets no protocol frames.
    let out = floe_cmd()
        .args([
            "backup",
            "--agent",
            &addr,
            "--san",
            &format!("nbd://{}", san.nbd),
            "--allow-any-device",
            "--source",
            "array:vol0",
        ])
        .arg("--media")
        .arg(format!("disk:{}", media.display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let sets = floe_cmd()
        .args(["list", "--media", &format!("disk:{}", media.display())])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&sets.stdout)
            .lines()
            .filter(|l| l.starts_with("array-"))
            .count(),
        1,
        "only the trusted backup landed"
    );
}
