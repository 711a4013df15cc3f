//! Restore back through the agent to the original host: the mover reads
//! the media and sends each item; the agent makes the files on its host,
//! only under directories it allows (`--allow-restore`), never through a
//! symlink; the tree comes back exactly.

use floe_tests::floe_cmd;
use floe_tests::hostfs::{compare_trees, floe_backup, set_of, tree_host, AgentProcess, LoopFs};
use floe_tests::skip;

#[test]
fn a_tree_restores_through_the_agent_only_where_it_allows() {
    let name = "a_tree_restores_through_the_agent_only_where_it_allows";
    // The "original host": an agent allowed to back up a file system and
    // to restore under one directory of another file system.
    let dst = match LoopFs::new("ext4", 1, 256, &[], "") {
        Ok(f) => f,
        Err(why) => return skip(name, &why),
    };
    let allowed = dst.mnt.join("restores");
    std::fs::create_dir_all(&allowed).unwrap();
    let Some((src, agent, _)) = tree_host(
        name,
        256,
        400,
        21,
        &["--allow-restore", allowed.to_str().unwrap()],
    ) else {
        return;
    };
    let media = src.dir.path().join("media");
    let (code, out, err) = floe_backup(
        &agent.addr,
        &[format!("fsflush:{}", src.mnt.display())],
        &media,
        &src.device_args(),
    );
    assert_eq!(code, 0, "backup failed:\n{out}\n{err}");
    let set = set_of(&out);
    let restore = |to: &std::path::Path, extra: &[&str]| {
        floe_cmd()
            .args(["restore", "--media"])
            .arg(format!("disk:{}", media.display()))
            .args(["--set", &set, "--agent", &agent.addr, "--to-dir"])
            .arg(to)
            .args(extra)
            .output()
            .unwrap()
    };

    // The whole tree, on the agent's host, exactly.
    let to = allowed.join("tree");
    let r = restore(&to, &[]);
    assert!(
        r.status.success(),
        "{}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(String::from_utf8_lossy(&r.stderr).contains("through its agent"));
    let diffs = compare_trees(&src.mnt, &to);
    assert!(
        diffs.is_empty(),
        "{} differences, first: {:#?}",
        diffs.len(),
        &diffs[..diffs.len().min(20)]
    );

    // Synced on the agent's host as it goes (every 16 KiB of file data
    // here): the same tree.
    let synced = allowed.join("synced");
    let r = restore(&synced, &["--sync-every", "16K"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(compare_trees(&src.mnt, &synced).is_empty());
    // A sync on the way that fails fails the restore, named, though the
    // final sync succeeds (the kernel reports a writeback error once).
    let backs_up = format!("fsflush:{}*", src.mnt.display());
    let failing = AgentProcess::start(
        &[
            "--allow-source",
            &backs_up,
            "--allow-restore",
            allowed.to_str().unwrap(),
        ],
        &[("FLOE_ERRPOINT", "restore-sync")],
    );
    let r = floe_cmd()
        .args(["restore", "--media"])
        .arg(format!("disk:{}", media.display()))
        .args(["--set", &set, "--agent", &failing.addr, "--to-dir"])
        .arg(allowed.join("sync-fails"))
        .args(["--sync-every", "16K"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_ne!(r.status.code(), Some(0), "{err}");
    assert!(err.contains("sync") && err.contains("sync-fails"), "{err}");
    drop(failing);

    // Anywhere else is refused, and nothing is written there.
    let elsewhere = dst.mnt.join("not-allowed");
    let r = restore(&elsewhere, &[]);
    assert_ne!(r.status.code(), Some(0));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("not under this agent's --allow-restore"),
        "{err}"
    );
    assert!(!elsewhere.exists());
    let r = restore(&allowed.join("../escape"), &[]);
    assert_ne!(r.status.code(), Some(0));

    // A symlink in the destination does not carry items outside it: an
    // item below it is refused; a directory item replaces it.
    let trap = allowed.join("trap");
    std::fs::create_dir_all(&trap).unwrap();
    let outside = dst.mnt.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::set_permissions(
        &outside,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    std::os::unix::fs::symlink(&outside, trap.join("links")).unwrap();
    let r = restore(&trap, &["--path", "links/target.txt", "--path", "sparse"]);
    assert_ne!(r.status.code(), Some(0));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("symlink") && err.contains("links/target.txt"),
        "{err}"
    );
    assert!(
        trap.join("sparse/islands.img").exists(),
        "the rest is restored"
    );
    let r = restore(&trap, &[]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(!std::fs::symlink_metadata(trap.join("links"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(compare_trees(&src.mnt, &trap).is_empty());
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "written through the symlink"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&outside).unwrap().permissions(),
    );
    assert_eq!(
        mode & 0o7777,
        0o700,
        "the symlink's target was given the directory's metadata"
    );
}

/// A loop device this test attached, detached when dropped.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

fn losetup(file: &std::path::Path) -> Option<Loop> {
    let out = std::process::Command::new("losetup")
        .args(["-f", "--show"])
        .arg(file)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| Loop(String::from_utf8_lossy(&out.stdout).trim().to_string()))
}

/// A block device node at `path` for the loop device `dev`.
fn block_node(path: &std::path::Path, dev: &Loop) -> std::path::PathBuf {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(&dev.0).unwrap().rdev();
    let ok = std::process::Command::new("mknod")
        .arg(path)
        .arg("b")
        .arg(((rdev >> 8) & 0xfff).to_string())
        .arg((rdev & 0xff | ((rdev >> 12) & 0xfff00)).to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "mknod {}", path.display());
    path.to_path_buf()
}

/// A volume restores through the agent to an image file or a block device
/// on its host — only under `--allow-restore`, never through a symlink, and
/// never onto a device too small — checked against its BLAKE3 there.
#[test]
fn a_volume_restores_through_the_agent_to_an_image_or_a_block_device() {
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;
    let name = "a_volume_restores_through_the_agent_to_an_image_or_a_block_device";
    let dst = match LoopFs::new("ext4", 1, 256, &[], "") {
        Ok(f) => f,
        Err(why) => return skip(name, &why),
    };
    let allowed = dst.mnt.join("restores");
    std::fs::create_dir_all(&allowed).unwrap();
    let Some((src, agent, _)) = tree_host(
        name,
        64,
        120,
        23,
        &["--allow-restore", allowed.to_str().unwrap()],
    ) else {
        return;
    };
    let media = src.dir.path().join("media");
    let source = format!("fsflush:{}?volume=allocated", src.mnt.display());
    let (code, out, err) = floe_backup(
        &agent.addr,
        std::slice::from_ref(&source),
        &media,
        &src.device_args(),
    );
    assert_eq!(code, 0, "backup failed:\n{out}\n{err}");
    let set = set_of(&out);
    let item = src.mnt.display().to_string();
    let size = 64u64 << 20;
    let restore = |target: &std::path::Path, via_agent: bool| {
        let mut c = floe_cmd();
        c.args(["restore", "--media"])
            .arg(format!("disk:{}", media.display()))
            .args(["--set", &set, "--to"])
            .arg(format!("{item}={}", target.display()));
        if via_agent {
            c.args(["--agent", &agent.addr]);
        }
        c.output().unwrap()
    };
    // Here, for reference.
    let here = src.dir.path().join("here.img");
    let r = restore(&here, false);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));

    // An image file on the agent's host: the same bytes, sparse.
    let img = allowed.join("vol.img");
    let r = restore(&img, true);
    let text = String::from_utf8_lossy(&r.stdout).to_string();
    assert!(
        r.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(text.contains("through its agent"), "{text}");
    let cmp = Command::new("cmp").arg(&here).arg(&img).output().unwrap();
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    let m = std::fs::metadata(&img).unwrap();
    assert_eq!(m.len(), size);
    assert!(
        m.blocks() * 512 < size / 2,
        "not sparse: {} bytes",
        m.blocks() * 512
    );

    // A block device there (a node in the allowed directory for a loop
    // device over a file holding old bytes): written whole, zeros included.
    let backing = src.dir.path().join("disk.raw");
    std::fs::write(&backing, vec![0xA5u8; usize::try_from(size).unwrap()]).unwrap();
    let Some(dev) = losetup(&backing) else {
        return skip(name, "losetup failed");
    };
    let node = block_node(&allowed.join("disk"), &dev);
    let r = restore(&node, true);
    assert!(
        r.status.success(),
        "{}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    let cmp = Command::new("cmp").arg(&here).arg(&dev.0).output().unwrap();
    assert!(
        cmp.status.success(),
        "device differs: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );

    // Refused: outside the allowed directories, through a symlink, onto a
    // device too small.
    let outside = src.dir.path().join("elsewhere.img");
    let r = restore(&outside, true);
    assert!(!r.status.success());
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("--allow-restore"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(!outside.exists());
    let link = allowed.join("link.img");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let r = restore(&link, true);
    assert!(!r.status.success());
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("symlink"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(!outside.exists(), "written through a symlink");
    let small = src.dir.path().join("small.raw");
    std::fs::File::create(&small)
        .unwrap()
        .set_len(size / 2)
        .unwrap();
    let Some(sdev) = losetup(&small) else {
        return skip(name, "losetup failed");
    };
    let snode = block_node(&allowed.join("small"), &sdev);
    let r = restore(&snode, true);
    assert!(!r.status.success());
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("the device holds"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
}
