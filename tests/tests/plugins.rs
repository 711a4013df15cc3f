//! The plugin loader: ABI versions are checked, several plugins of one
//! interface load side by side.

use floe_core::abi::{Interface, MediaWriter};
use floe_core::loader::{LoadedPlugin, PluginRegistry};
use floe_core::model::*;
use floe_core::units::Bytes;
use floe_core::ErrorKind;
use floe_tests::build_dir;
use std::path::Path;

fn fixture() -> std::path::PathBuf {
    let p = build_dir().join("libfloe_fixture_abi_mismatch.so");
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (`cargo xtask test` does)",
        p.display()
    );
    p
}

#[test]
fn a_plugin_built_for_another_abi_version_is_refused_naming_file_and_versions() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("libfloe_plugin_mismatch.so");
    std::fs::copy(fixture(), &plugin).unwrap();
    let err = LoadedPlugin::load(&plugin).err().expect("must be refused");
    assert_eq!(err.kind(), ErrorKind::AbiMismatch);
    let msg = err.to_string();
    let ours = floe_core::abi::ABI_VERSION;
    assert!(msg.contains(&plugin.display().to_string()), "{msg}");
    assert!(
        msg.contains(&format!("ABI version {}", ours + 1000)),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("this floe speaks ABI version {ours}")),
        "{msg}"
    );

    // In a directory, it is refused and the others still load.
    std::fs::copy(
        build_dir().join("libfloe_plugin_disk.so"),
        dir.path().join("libfloe_plugin_disk.so"),
    )
    .unwrap();
    let reg = PluginRegistry::load_dirs(&[dir.path().to_path_buf()]);
    assert_eq!(reg.loaded(), 0, "plugins load when first needed");
    assert!(reg.get("disk").is_some());
    assert_eq!(reg.loaded(), 1, "only the plugin named was loaded");
    assert!(reg.get("mismatch").is_none());
    assert_eq!(reg.refused().len(), 1);
    assert_eq!(reg.refused()[0].kind(), ErrorKind::AbiMismatch);

    // The CLI says so too.
    let out = std::process::Command::new(floe_tests::floe_bin())
        .args(["--plugin-dir", dir.path().to_str().unwrap(), "plugins"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("libfloe_plugin_mismatch.so was built for Floe plugin ABI version"),
        "{text}"
    );
}

#[test]
fn a_refused_file_passed_over_for_a_good_plugin_is_named_in_a_warning() {
    // An old build early in the search path: the command works with the
    // good plugin found later, and says which file it passed over.
    let dir = tempfile::tempdir().unwrap();
    let early = dir.path().join("early");
    std::fs::create_dir_all(&early).unwrap();
    std::fs::create_dir_all(dir.path().join("media")).unwrap();
    std::fs::copy(fixture(), early.join("libfloe_plugin_disk.so")).unwrap();
    let run = |plugin_dir: &Path| {
        std::process::Command::new(floe_tests::floe_bin())
            .arg("--plugin-dir")
            .arg(plugin_dir)
            .arg("--catalog")
            .arg(dir.path().join("catalog.db"))
            .args(["list", "--media"])
            .arg(format!("disk:{}", dir.path().join("media").display()))
            .output()
            .unwrap()
    };
    let out = run(&early);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning: plugin file passed over")
            && err.contains(&early.join("libfloe_plugin_disk.so").display().to_string())
            && err.contains("ABI version"),
        "{err}"
    );
    // Nothing passed over, nothing said.
    let out = run(dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !err.contains("passed over"),
        "{err}"
    );
}

#[test]
fn a_file_that_is_not_a_plugin_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libfloe_plugin_fake.so");
    std::fs::write(&fake, b"not an ELF file").unwrap();
    let err = LoadedPlugin::load(&fake).err().expect("refused");
    assert_eq!(err.kind(), ErrorKind::PluginLoad);
    assert!(err.to_string().contains("libfloe_plugin_fake.so"), "{err}");
}

/// Write a set of one item: where it landed, and what the commit said.
fn one_item(w: &mut dyn MediaWriter, set: &str, data: &[u8]) -> (MediaPosition, Committed) {
    w.begin_set(&SetHeader {
        set: SetId::new(set),
        label: String::new(),
        agent: "h".into(),
        sources: vec![],
        image: ImageId::new("i"),
        frozen_at: 0,
        started_at: 0,
    })
    .unwrap();
    w.begin_item(&ItemHeader {
        item: ItemId::new("v"),
        kind: ItemKind::Volume,
        size: Bytes(data.len() as u64),
        config: ConfigId::new("c"),
        meta: Default::default(),
        holes: Vec::new(),
        file: None,
    })
    .unwrap();
    w.write(data).unwrap();
    let at = w
        .end_item(&ItemTrailer {
            length: Bytes(data.len() as u64),
            blake3: blake3::hash(data).to_hex().to_string(),
            config: ConfigId::new("c"),
            remaps: 0,
            captured_after_freeze: false,
        })
        .unwrap();
    (at, w.commit().unwrap())
}

#[test]
fn two_plugins_of_one_interface_load_side_by_side() {
    // abi_stable's RootModule::load_from* would hand back the first library
    // for the second; the loader must not.
    let dir = tempfile::tempdir().unwrap();
    for p in ["disk", "null"] {
        let name = format!("libfloe_plugin_{p}.so");
        std::fs::copy(build_dir().join(&name), dir.path().join(&name)).unwrap();
    }
    let reg = PluginRegistry::load_dirs(&[dir.path().to_path_buf()]);
    assert!(
        reg.refused().is_empty(),
        "{:?}",
        reg.refused()
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
    );
    let writers: Vec<&str> = reg
        .plugins()
        .iter()
        .filter(|p| p.provides(Interface::MediaWriter))
        .map(|p| p.name())
        .collect();
    assert_eq!(writers, vec!["disk", "null"]);

    let media = dir.path().join("media");
    let mut disk = reg
        .get("disk")
        .unwrap()
        .media_writer(&serde_json::json!({"dir": media}))
        .unwrap();
    let mut null = reg
        .get("null")
        .unwrap()
        .media_writer(&serde_json::json!({}))
        .unwrap();
    let (a, a_commit) = one_item(disk.as_mut(), "a", b"disk bytes");
    let (b, b_commit) = one_item(null.as_mut(), "b", b"null bytes");
    assert_eq!(a.locator, "items/000000.img");
    assert_eq!(b.medium, "null");
    assert_eq!((a_commit.items, b_commit.items), (1, 1));
    assert!(a_commit.positions.is_empty() && a_commit.committed_at > 0);
    assert_eq!(
        std::fs::read(media.join("a/items/000000.img")).unwrap(),
        b"disk bytes"
    );
    assert!(!media.join("b").exists(), "null keeps nothing");
}

#[test]
fn an_installed_floe_finds_its_plugins_in_lib_floe_plugins() {
    // The layout `cargo xtask dist` packs: bin/floe, lib/floe/plugins/*.so.
    let root = tempfile::tempdir().unwrap();
    let (bin, plugins) = (
        root.path().join("bin"),
        root.path().join("lib/floe/plugins"),
    );
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(floe_tests::floe_bin(), bin.join("floe")).unwrap();
    for p in ["array", "disk", "null"] {
        let f = format!("libfloe_plugin_{p}.so");
        std::fs::copy(build_dir().join(&f), plugins.join(&f)).unwrap();
    }
    let out = std::process::Command::new(bin.join("floe"))
        .arg("plugins")
        .env_remove("FLOE_PLUGIN_DIR")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for p in ["array", "disk", "null"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(p))
            .unwrap_or_else(|| panic!("{p} not found:\n{text}"));
        assert!(line.contains("lib/floe/plugins/libfloe_plugin_"), "{line}");
    }
}

#[test]
fn a_plugin_is_found_by_the_name_it_declares_whatever_its_file_is_called() {
    // Looked for by file name first, but a file is only ever the plugin
    // it says it is.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        build_dir().join("libfloe_plugin_null.so"),
        dir.path().join("libfloe_plugin_disk.so"),
    )
    .unwrap();
    let reg = PluginRegistry::load_dirs(&[dir.path().to_path_buf()]);
    assert!(reg.get("disk").is_none(), "the file named disk is null");
    let null = reg.get("null").expect("found by its declared name");
    assert_eq!(null.path, dir.path().join("libfloe_plugin_disk.so"));
    let e = reg.require("disk", Interface::MediaWriter).err().unwrap();
    assert!(
        e.to_string()
            .contains("no plugin named \"disk\" (loaded: null)"),
        "{e}"
    );
}

/// Write and read back one set of `data` on `plugin`'s media at `media`.
fn round_trip_on(p: &LoadedPlugin, plugin: &str, media: &Path, set: &str, data: &[u8]) {
    let cfg = serde_json::json!({"dir": media});
    let mut w = p.media_writer(&cfg).unwrap();
    one_item(w.as_mut(), set, data);
    drop(w);
    let mut r = p.media_reader(&cfg).unwrap();
    let sets = r.list_sets().unwrap();
    assert_eq!(sets.len(), 1, "{plugin}: one set on {}", media.display());
    r.open_item(&SetId::new(set), &ItemId::new("v")).unwrap();
    let mut got = Vec::new();
    loop {
        let chunk = r.read(1 << 20).unwrap();
        if chunk.is_empty() {
            break;
        }
        got.extend_from_slice(&chunk);
    }
    assert!(got == data, "{plugin}: the item read back differs");
}

/// Media plugins allocate on threads of the host's that they never saw
/// before, many at once (a restore's workers, the mover's pipeline), after
/// the thread that loaded and first used them has ended (a test's thread,
/// an agent connection's): each thread's first allocation inside the
/// plugin initialises its allocator's per-thread state. mimalloc
/// v3.3.0–3.3.2 (libmimalloc-sys 0.1.49's default) crashed there with
/// SIGSEGV (microsoft/mimalloc#1287), and with its initial-exec TLS a
/// process could load only a handful of such plugins ("cannot allocate
/// memory in static TLS block"): every round loads a fresh copy.
#[test]
fn media_plugins_serve_many_new_threads_after_their_first_thread_ended() {
    const THREADS: usize = 8;
    const ROUNDS: usize = 6;
    let dir = tempfile::tempdir().unwrap();
    let data = |t: usize| -> Vec<u8> {
        (0..100_000usize)
            .map(|i| u8::try_from((i * 7 + t) % 251).unwrap())
            .collect()
    };
    for plugin in ["disk", "tar"] {
        for round in 0..ROUNDS {
            let lib = dir.path().join(format!("lib-{plugin}-{round}"));
            std::fs::create_dir_all(&lib).unwrap();
            let name = format!("libfloe_plugin_{plugin}.so");
            std::fs::copy(build_dir().join(&name), lib.join(&name)).unwrap();
            // Loaded and first used by a thread that then ends.
            let (at, first) = (lib.clone(), dir.path().join(format!("{plugin}-{round}")));
            let reg = std::thread::spawn(move || {
                let reg = PluginRegistry::load_dirs(std::slice::from_ref(&at));
                let p = reg.get(plugin).unwrap_or_else(|| {
                    let refused: Vec<String> =
                        reg.refused().iter().map(|e| e.to_string()).collect();
                    panic!("{plugin} (copy {round}) does not load: {refused:?}")
                });
                round_trip_on(p, plugin, &first, "first", &data(99));
                reg
            })
            .join()
            .unwrap();
            let p = reg.get(plugin).unwrap();
            let barrier = std::sync::Barrier::new(THREADS);
            std::thread::scope(|sc| {
                for t in 0..THREADS {
                    let (barrier, dir, data) = (&barrier, dir.path(), &data);
                    sc.spawn(move || {
                        let media = dir.join(format!("{plugin}-{round}-{t}"));
                        let bytes = data(t);
                        barrier.wait();
                        round_trip_on(p, plugin, &media, &format!("s{round}-{t}"), &bytes);
                    });
                }
            });
        }
    }
}
