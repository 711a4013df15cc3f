//! The catalog: sets are catalogued only after their media committed them,
//! the catalog can be rebuilt from media, and a writer killed during the
//! catalog commit leaves it consistent.

use floe_tests::{floe_cmd, SimSanProcess};
use std::path::Path;
use std::process::Output;

fn floe(catalog: &Path, args: &[&str]) -> Output {
    let mut c = floe_cmd();
    c.arg("--catalog").arg(catalog).args(args);
    c.output().unwrap()
}

/// `floe backup` of `sources` through an agent on stdio, catalogued.
fn backup_cmd(
    san: &SimSanProcess,
    catalog: &Path,
    media: &str,
    sources: &[&str],
) -> std::process::Command {
    let agent = format!(
        "exec:{} agent --stdio --allow-source 'array:*' --plugin-opt array.control={}",
        floe_tests::floe_bin().display(),
        san.control
    );
    let mut c = floe_cmd();
    c.arg("--catalog").arg(catalog);
    c.args([
        "backup",
        "--agent",
        &agent,
        "--san",
        &format!("nbd://{}", san.nbd),
        "--allow-any-device",
    ]);
    for s in sources {
        c.args(["--source", s]);
    }
    c.args(["--media", media, "--json"]);
    c
}

fn backup(san: &SimSanProcess, catalog: &Path, media: &str, failpoint: Option<&str>) -> Output {
    let mut c = backup_cmd(san, catalog, media, &["array:vol0", "array:vol1"]);
    if let Some(f) = failpoint {
        c.env("FLOE_FAILPOINT", f);
    }
    c.output().unwrap()
}

fn listing(catalog: &Path) -> serde_json::Value {
    let out = floe(catalog, &["list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn lab() -> SimSanProcess {
    let san = SimSanProcess::start(&["lun0=64M"], &[]);
    san.volumes(&[("vol0", 2 << 20), ("vol1", 2 << 20)], 30);
    san
}

#[test]
fn sets_are_catalogued_listed_shown_and_rebuilt_from_media() {
    let san = lab();
    let d = tempfile::tempdir().unwrap();
    let (cat, media) = (
        d.path().join("catalog.db"),
        format!("disk:{}", d.path().join("media").display()),
    );
    let mut sets = Vec::new();
    for _ in 0..2 {
        let out = backup(&san, &cat, &media, None);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        sets.push(r["set"]["header"]["set"].as_str().unwrap().to_string());
        std::thread::sleep(std::time::Duration::from_millis(1100)); // distinct set ids
    }
    let before = listing(&cat);
    assert_eq!(before.as_array().unwrap().len(), 2);
    // The text listing (from the catalog's facts) says what the records
    // say, one line per set, oldest first; the media's listing the same.
    let lines = |out: std::process::Output| -> Vec<String> {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    };
    let text = lines(floe(&cat, &["list"]));
    let want: Vec<String> = before
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{}  {} UTC  2 items  {} bytes  from {}  sources array:vol0,array:vol1",
                r["header"]["set"].as_str().unwrap(),
                floe_core::retention::utc(r["committed_at"].as_u64().unwrap()),
                4u64 << 20,
                r["header"]["agent"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(text, want);
    assert_eq!(lines(floe(&cat, &["list", "--media", &media])), want);
    let show = floe(&cat, &["show", &sets[0]]);
    let shown: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(shown["media"].as_str(), Some(media.as_str()));
    assert_eq!(shown["record"]["items"].as_array().unwrap().len(), 2);
    let ls = String::from_utf8_lossy(&floe(&cat, &["ls", &sets[1]]).stdout).to_string();
    assert!(
        ls.contains("vol0") && ls.contains("vol1") && ls.contains("items/000001.img"),
        "{ls}"
    );
    let missing = floe(&cat, &["show", "nosuch"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no set nosuch in the catalog"));

    // Losing the catalog loses nothing.
    std::fs::remove_file(&cat).unwrap();
    let _ = std::fs::remove_file(cat.with_extension("db-wal"));
    let _ = std::fs::remove_file(cat.with_extension("db-shm"));
    assert!(listing(&cat).as_array().unwrap().is_empty());
    let out = floe(&cat, &["catalog", "rebuild", "--media", &media]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("2 set(s)"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        listing(&cat),
        before,
        "the same listing, rebuilt from media"
    );
}

#[test]
fn a_writer_killed_during_the_catalog_commit_leaves_the_catalog_consistent() {
    let san = lab();
    let d = tempfile::tempdir().unwrap();
    let (cat, media) = (
        d.path().join("catalog.db"),
        format!("disk:{}", d.path().join("media").display()),
    );
    // Killed inside the catalog transaction: the set is durable on media,
    // the catalog does not have it, and the catalog still opens.
    let out = backup(&san, &cat, &media, Some("catalog-before-commit"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("failpoint catalog-before-commit"));
    assert!(listing(&cat).as_array().unwrap().is_empty());
    let on_media = floe(&cat, &["list", "--media", &media, "--json"]);
    let on_media: serde_json::Value = serde_json::from_slice(&on_media.stdout).unwrap();
    assert_eq!(on_media.as_array().unwrap().len(), 1);
    let out = floe(&cat, &["catalog", "rebuild", "--media", &media]);
    assert!(out.status.success());
    assert_eq!(listing(&cat), on_media);

    // Killed before the media commit: nothing anywhere points at it.
    let out = backup(&san, &cat, &media, Some("disk-commit-before-rename"));
    assert!(!out.status.success());
    assert_eq!(
        listing(&cat).as_array().unwrap().len(),
        1,
        "the catalog never points at media that is not durable"
    );
}

#[test]
fn verify_names_exactly_the_damaged_item() {
    let san = lab();
    let d = tempfile::tempdir().unwrap();
    let (cat, dir) = (d.path().join("catalog.db"), d.path().join("media"));
    let media = format!("disk:{}", dir.display());
    let out = backup(&san, &cat, &media, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let set = r["set"]["header"]["set"].as_str().unwrap().to_string();
    let ok = floe(&cat, &["verify", "--media", &media]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(text.contains("2 item(s) in 1 set(s) verified"), "{text}");
    // A line for the set, none per intact item unless asked.
    assert!(
        text.contains(&format!(
            "set      {set}: 2 item(s), {} bytes read, ok",
            4u64 << 20
        )),
        "{text}"
    );
    assert!(!text.contains("ok       "), "{text}");

    // Flip one byte in the middle of vol1's record on the media.
    let file = dir.join(&set).join("items/000001.img");
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let bad = floe(&cat, &["verify", "--media", &media, "--set", &set, "-v"]);
    assert_eq!(bad.status.code(), Some(1));
    let text = String::from_utf8_lossy(&bad.stdout);
    assert!(text.contains(&format!("ok       {set} vol0")), "{text}");
    assert!(
        text.contains(&format!("DAMAGED  {set} vol1: BLAKE3")),
        "{text}"
    );
    assert!(
        text.contains(&format!("set      {set}: 2 item(s), ")) && text.contains(", 1 DAMAGED"),
        "{text}"
    );
    assert!(String::from_utf8_lossy(&bad.stderr).contains("1 of 2 item(s) damaged"));
    // Restore refuses the damaged item too.
    let target = d.path().join("vol1.img");
    let out = floe(
        &cat,
        &[
            "restore",
            "--media",
            &media,
            "--set",
            &set,
            "--to",
            &format!("vol1={}", target.display()),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("[checksum_mismatch]"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn prune_keeps_what_the_policy_says_and_forgets_the_rest_everywhere() {
    let san = lab();
    let d = tempfile::tempdir().unwrap();
    let (cat, media) = (
        d.path().join("catalog.db"),
        format!("disk:{}", d.path().join("media").display()),
    );
    let mut sets = Vec::new();
    for _ in 0..3 {
        let out = backup(&san, &cat, &media, None);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        sets.push(r["set"]["header"]["set"].as_str().unwrap().to_string());
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    let none = floe(&cat, &["prune", "--media", &media]);
    assert_eq!(
        none.status.code(),
        Some(1),
        "a policy that keeps nothing is refused"
    );
    let dry = floe(
        &cat,
        &["prune", "--media", &media, "--keep-last", "1", "--dry-run"],
    );
    let text = String::from_utf8_lossy(&dry.stdout);
    assert_eq!(text.matches("would forget").count(), 2, "{text}");
    assert_eq!(
        listing(&cat).as_array().unwrap().len(),
        3,
        "a dry run changes nothing"
    );
    let out = floe(&cat, &["prune", "--media", &media, "--keep-last", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left = listing(&cat);
    assert_eq!(left.as_array().unwrap().len(), 1);
    assert_eq!(
        left[0]["header"]["set"].as_str(),
        Some(sets[2].as_str()),
        "the newest is kept"
    );
    let on_media: serde_json::Value =
        serde_json::from_slice(&floe(&cat, &["list", "--media", &media, "--json"]).stdout).unwrap();
    assert_eq!(on_media, left, "the media and the catalog agree");
    assert_eq!(
        std::fs::read_dir(d.path().join("media")).unwrap().count(),
        1,
        "the forgotten sets' bytes are gone"
    );
}

#[test]
fn a_media_commit_that_fails_leaves_no_staged_rows_in_the_catalog() {
    // The catalog stages a set's rows while its media commit; the tar
    // writer's fsync fails there (EIO): nothing of the set may stay.
    let san = lab();
    let d = tempfile::tempdir().unwrap();
    let cat = d.path().join("catalog.db");
    let media = format!("tar:{}", d.path().join("media").display());
    let out = backup_cmd(&san, &cat, &media, &["array:vol0"])
        .env("FLOE_ERRPOINT", "tar-sync")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("fsync archive"), "{err}");
    let set = err
        .lines()
        .find_map(|l| l.strip_prefix("floe: set "))
        .and_then(|l| l.split_whitespace().next())
        .expect("the set was begun")
        .to_string();
    assert!(listing(&cat).as_array().unwrap().is_empty());
    let c = floe_core::catalog::Catalog::open(&cat).unwrap();
    assert_eq!(c.item_rows(&floe_core::model::SetId::new(set)).unwrap(), 0);

    // And a backup that commits stages and records every row.
    let out = backup(&san, &cat, &media, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let set = v["set"]["header"]["set"].as_str().unwrap();
    assert_eq!(listing(&cat).as_array().unwrap().len(), 1);
    let c = floe_core::catalog::Catalog::open(&cat).unwrap();
    assert_eq!(c.item_rows(&floe_core::model::SetId::new(set)).unwrap(), 2);
}
