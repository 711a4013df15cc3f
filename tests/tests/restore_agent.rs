//! Restore back through the agent to the original host: the mover reads
//! the media and sends each item; the agent makes the files on its host,
//! only under directories it allows (`--allow-restore`), never through a
//! symlink; the tree comes back exactly.

use floe_tests::floe_cmd;
use floe_tests::hostfs::{compare_trees, floe_backup, set_of, tree_host, LoopFs};
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
