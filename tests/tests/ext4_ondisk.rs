//! The agent reads a frozen ext4 file system's metadata from its device
//! (`floe_hostfs::ondisk`) instead of asking the kernel file by file. On
//! real ext4 file systems on loop devices, frozen with FIFREEZE, every file
//! is mapped both ways — from the device, and through the kernel (open by
//! handle, fstat, xattrs, FIEMAP) — and the two maps must be equal item by
//! item: metadata, extents, holes, config ids. After the thaw, the
//! kernel's checks (what the mover asks before it trusts a read) must
//! agree with every config id the device gave.

use floe_core::abi::{Mapper, ValidityIndicator};
use floe_core::model::{FrozenImage, FrozenItem, ImageId, Item, ItemId, ItemKind};
use floe_hostfs::identity::{fs_device, mount_of};
use floe_hostfs::mapper::{FileMapper, FileValidity, SourceHandle, Translate};
use floe_hostfs::ondisk::Ext4Disk;
use floe_tests::hostfs::{make_tree, LoopFs, Rng};
use floe_tests::skip;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn translator(h: &SourceHandle) -> floe_core::Result<Box<dyn Translate>> {
    let (_, _, dev) = mount_of(&h.frozen)?;
    Ok(Box::new(fs_device(dev)?))
}

fn set_times(p: &Path, atime: (i64, i64), mtime: (i64, i64)) {
    let ts = |(s, n): (i64, i64)| rustix::fs::Timespec {
        tv_sec: s,
        tv_nsec: n,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &rustix::fs::Timestamps {
            last_access: ts(atime),
            last_modification: ts(mtime),
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .expect("utimensat");
}

/// Run `command` on `path`; it must succeed.
fn run(command: &[&str], path: &Path) {
    let ok = Command::new(command[0])
        .args(&command[1..])
        .arg(path)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "{command:?} {} failed", path.display());
}

/// Attributes on the files with many (more than fit the inode; as many
/// as fit a block of the file system's size).
fn attrs(big: bool) -> usize {
    if big {
        24
    } else {
        8
    }
}

/// What stresses a decoder of ext4 metadata beyond a source tree.
fn make_hard_cases(root: &Path, big: bool) {
    let d = root.join("hard");
    std::fs::create_dir_all(&d).unwrap();
    let mut rng = Rng::new(99);
    // Extent trees of depth 1 and 2: a sparse file of 2,000 islands (an
    // extent each; a tree block holds 340).
    let f = std::fs::File::create(d.join("islands-2000")).unwrap();
    for k in 0..2000u64 {
        f.write_all_at(&rng.bytes(4096), k * 8192).unwrap();
    }
    let f = std::fs::File::create(d.join("islands-300")).unwrap();
    for k in 0..300u64 {
        f.write_all_at(&rng.bytes(4096), k * 12288 + 4096).unwrap();
    }
    drop(f);
    if big {
        // Runs longer than one extent can be (32,768 blocks written,
        // 32,767 unwritten): several extents of the tree, contiguous.
        let f = std::fs::File::create(d.join("written-160m")).unwrap();
        let chunk = rng.bytes(1 << 20);
        for k in 0..160u64 {
            f.write_all_at(&chunk, k << 20).unwrap();
        }
        f.sync_all().unwrap();
        run(&["fallocate", "-l", "300M"], &d.join("unwritten-300m"));
    }
    // Preallocated past its end (FALLOC_FL_KEEP_SIZE).
    std::fs::write(d.join("prealloc"), rng.bytes(5000)).unwrap();
    run(
        &["fallocate", "-n", "-o", "0", "-l", "1M"],
        &d.join("prealloc"),
    );
    // Times before 1970 and after 2038, nanoseconds; owners past 16 bits.
    std::fs::write(d.join("old"), b"from 1960").unwrap();
    set_times(
        &d.join("old"),
        (-315_619_200, 5),
        (-315_619_100, 999_999_999),
    );
    std::fs::write(d.join("future"), b"from 2100").unwrap();
    set_times(
        &d.join("future"),
        (4_102_444_800, 1),
        (4_102_444_801, 123_456_789),
    );
    std::fs::write(d.join("owned-32bit"), b"uid 100000").unwrap();
    rustix::fs::chownat(
        rustix::fs::CWD,
        d.join("owned-32bit"),
        Some(rustix::fs::Uid::from_raw(100_000)),
        Some(rustix::fs::Gid::from_raw(200_000)),
        rustix::fs::AtFlags::empty(),
    )
    .unwrap();
    // Attributes in the inode, in a block, and one block shared by two
    // files; security and trusted ones; ACLs.
    std::fs::write(d.join("one-xattr"), b"x").unwrap();
    rustix::fs::setxattr(
        d.join("one-xattr"),
        "user.small",
        b"in the inode",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    for name in ["many-xattrs-a", "many-xattrs-b"] {
        let p = d.join(name);
        std::fs::write(&p, b"attributes spill into a block").unwrap();
        for k in 0..attrs(big) {
            let value = format!("value {k} ").repeat(if big { 10 } else { 4 });
            rustix::fs::setxattr(
                &p,
                format!("user.attr{k:02}").as_str(),
                value.as_bytes(),
                rustix::fs::XattrFlags::empty(),
            )
            .unwrap();
        }
        for (n, v) in [
            ("security.floe", &b"label"[..]),
            ("trusted.floe", b"\x00\x01\x02"),
        ] {
            rustix::fs::setxattr(&p, n, v, rustix::fs::XattrFlags::empty()).unwrap();
        }
    }
    if floe_tests::have("setfacl") {
        std::fs::write(d.join("acl"), b"with an ACL").unwrap();
        run(
            &[
                "setfacl",
                "-m",
                "u:1234:rw,u:100000:r,g:5678:r,g:200000:rw,m:rw",
            ],
            &d.join("acl"),
        );
    }
}

/// Whether the reader finds the mount at `mnt` shows ACLs, and the
/// attributes of `hard/acl` (else `hard/many-xattrs-a`) as it reads them
/// with ACLs shown and hidden.
fn acl_views(
    dev: u64,
    mnt: &Path,
) -> (
    bool,
    std::collections::BTreeMap<String, String>,
    std::collections::BTreeMap<String, String>,
) {
    let file = ["hard/acl", "hard/many-xattrs-a"]
        .iter()
        .map(|r| mnt.join(r))
        .find(|p| p.exists())
        .unwrap();
    let ino = std::fs::metadata(&file).unwrap().ino();
    // A probe that cannot ask the kernel fails, naming where it asked.
    let gone = mnt.join("no-such-dir");
    let err = Ext4Disk::open(dev)
        .unwrap()
        .acls_as_mounted(&gone)
        .expect_err("probed a path that is not there");
    assert!(
        err.to_string().contains("probe ACLs") && err.to_string().contains("no-such-dir"),
        "{err}"
    );
    let disk = Ext4Disk::open(dev).unwrap().acls_as_mounted(mnt).unwrap();
    let probed = disk.acls();
    let mut reader = floe_hostfs::ondisk::InodeReader::default();
    let inode = reader.inode(&disk, ino).unwrap();
    let with = disk.xattrs(&inode, &mut reader.xattrs).unwrap();
    let disk = disk.without_acls();
    let mut cache = floe_hostfs::ondisk::XattrCache::default();
    let without = disk.xattrs(&inode, &mut cache).unwrap();
    (probed, with, without)
}

/// Items of a map by id, each as JSON (what goes to the mover).
fn by_id(items: &[Item]) -> std::collections::BTreeMap<String, serde_json::Value> {
    items
        .iter()
        .map(|i| (i.id.to_string(), serde_json::to_value(i).unwrap()))
        .collect()
}

/// What the device reader must do with a file system.
#[derive(Clone, Copy, PartialEq)]
enum Expect {
    /// Map every regular file from the device.
    AllFromDevice,
    /// Leave this many files to the kernel (what it does not take), the
    /// rest from the device.
    ToKernel(u64),
    /// Refuse the file system whole, naming this.
    Refused(&'static str),
}

/// A value too large for an inode or an attribute block: with `ea_inode`,
/// ext4 puts it in an inode of its own.
const EA_INODE_VALUE: usize = 16 << 10;

fn device_and_kernel_agree(
    name: &str,
    mkfs: &[&str],
    tree_files: usize,
    big: bool,
    expect: Expect,
) {
    let src = match LoopFs::new("ext4", 1, 1024, mkfs, "") {
        Ok(f) => f,
        Err(why) => return skip(name, &why),
    };
    if tree_files > 0 {
        make_tree(&src.mnt, tree_files, 11);
    }
    make_hard_cases(&src.mnt, big);
    if mkfs.contains(&"ea_inode") {
        let p = src.mnt.join("hard/ea-inode");
        std::fs::write(&p, b"an attribute in an inode of its own").unwrap();
        let value = Rng::new(5).bytes(EA_INODE_VALUE);
        rustix::fs::setxattr(&p, "user.big", &value, rustix::fs::XattrFlags::empty()).unwrap();
    }
    src.sync();
    let root = src.mnt.display().to_string();
    let image = FrozenImage {
        id: ImageId::new(format!("{name}-image")),
        plugin: "fsflush".into(),
        items: vec![FrozenItem {
            id: ItemId::new(root.clone()),
            source: format!("fsflush:{root}"),
            handle: serde_json::to_value(SourceHandle {
                spec: root.clone(),
                frozen: src.mnt.clone(),
                snapshot: false,
                fstype: "ext4".into(),
                skip: Vec::new(),
                volume: None,
            })
            .unwrap(),
        }],
        frozen_at: 0,
        mapper: Some("fiemap".into()),
        writes_held: true,
    };
    let mut device = FileMapper::configured(translator, &serde_json::json!({})).unwrap();
    let mut kernel =
        FileMapper::configured(translator, &serde_json::json!({"on_disk": false})).unwrap();

    // Not frozen: the journal is not written back, so the device is not
    // read (every file through the kernel).
    let live = device.map(&image).expect("map while not frozen");
    assert!(!live.items.is_empty());
    assert_eq!(
        device.on_disk_counts().0,
        0,
        "read a live file system's device"
    );
    let dev = std::fs::metadata(&src.mnt).unwrap().dev();
    let err = Ext4Disk::open(dev).expect_err("a live ext4's device was taken as current");
    assert!(err.to_string().contains("not frozen"), "{err}");

    let dir = std::fs::File::open(&src.mnt).unwrap();
    let guard = floe_hostfs::sys::ThawGuard::spawn(&[dir.as_raw_fd()], Duration::from_secs(120))
        .expect("thaw guard");
    floe_hostfs::sys::freeze(&dir).expect("FIFREEZE");
    let from_device = device.map(&image);
    let from_kernel = kernel.map(&image);
    let disk = Ext4Disk::open(dev);
    let flushed_while_frozen = disk
        .as_ref()
        .map(Ext4Disk::still_flushed)
        .map_err(ToString::to_string);
    let acl_views = disk.as_ref().ok().map(|_| acl_views(dev, &src.mnt));
    floe_hostfs::sys::thaw(&dir).expect("FITHAW");
    guard.finish();
    let (from_device, from_kernel) = (from_device.unwrap(), from_kernel.unwrap());
    // The thaw is seen: a reader opened while frozen stops trusting the
    // device (the superblock says the journal is in use again).
    if let Some((probed, with, without)) = acl_views {
        // The mount shows ACLs, and so does the reader; one that is told
        // the mount hides them (`noacl`) leaves out only those.
        assert!(probed, "the ACL probe found none on an ext4 mount");
        let acl = "system.posix_acl_access";
        if floe_tests::have("setfacl") {
            assert!(with.contains_key(acl), "{with:?}");
        }
        let mut expected = with.clone();
        expected.remove(acl);
        assert_eq!(without, expected);
    }
    if let Expect::Refused(what) = expect {
        let err = disk.expect_err("a file system the reader refuses was opened");
        assert!(err.to_string().contains(what), "{err}");
    } else {
        let disk = disk.expect("the frozen device opened");
        assert!(matches!(flushed_while_frozen, Ok(Ok(()))));
        let err = disk.still_flushed().expect_err("the thaw went unseen");
        assert!(err.to_string().contains("not frozen"), "{err}");
    }

    assert!(
        from_device.failures.is_empty(),
        "{:?}",
        from_device.failures
    );
    assert!(
        from_kernel.failures.is_empty(),
        "{:?}",
        from_kernel.failures
    );
    let files = from_device
        .items
        .iter()
        .filter(|i| i.kind == ItemKind::File)
        .count() as u64;
    assert!(files as usize > tree_files + 10, "{files} files");
    // (A file system refused whole counts neither way: the reader never
    // took it.)
    let counts = match expect {
        Expect::AllFromDevice => (files, 0),
        Expect::ToKernel(n) => (files - n, n),
        Expect::Refused(_) => (0, 0),
    };
    assert_eq!(
        device.on_disk_counts(),
        counts,
        "regular files from the device, and left to the kernel"
    );
    assert_eq!(kernel.on_disk_counts(), (0, 0));
    let (a, b) = (by_id(&from_device.items), by_id(&from_kernel.items));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "the same items"
    );
    let diffs: Vec<String> = a
        .iter()
        .filter(|(id, v)| b[*id] != **v)
        .map(|(id, v)| format!("{id}:\n device {v}\n kernel {}", b[id]))
        .collect();
    assert!(
        diffs.is_empty(),
        "{} of {} items differ, first:\n{}",
        diffs.len(),
        a.len(),
        diffs.iter().take(3).cloned().collect::<Vec<_>>().join("\n")
    );
    // What the hard cases are made of is in the map (the comparison above
    // is not of empty maps).
    let item = |rel: &str| &a[&format!("{root}/hard/{rel}")];
    assert_eq!(item("old")["file"]["mtime"]["sec"], -315_619_100);
    if !mkfs.contains(&"-I") {
        // (128-byte inodes keep seconds to 2038 and no nanoseconds.)
        assert_eq!(item("future")["file"]["mtime"]["sec"], 4_102_444_801i64);
        assert_eq!(item("future")["file"]["mtime"]["nsec"], 123_456_789);
    }
    assert_eq!(item("owned-32bit")["file"]["uid"], 100_000);
    let xattrs = item("many-xattrs-a")["file"]["xattrs"].as_object().unwrap();
    assert_eq!(xattrs.len(), attrs(big) + 2, "{xattrs:?}");
    assert!(xattrs.contains_key("trusted.floe") && xattrs.contains_key("security.floe"));
    if floe_tests::have("setfacl") {
        assert!(item("acl")["file"]["xattrs"]
            .as_object()
            .unwrap()
            .contains_key("system.posix_acl_access"));
    }
    if mkfs.contains(&"ea_inode") {
        let big = item("ea-inode")["file"]["xattrs"]["user.big"]
            .as_str()
            .unwrap();
        assert_eq!(big.len(), 2 * EA_INODE_VALUE, "hex of the whole value");
    }
    assert!(
        item("islands-2000")["extents"].as_array().unwrap().len() == 3999,
        "2,000 islands and their holes: {}",
        item("islands-2000")["extents"]
            .to_string()
            .chars()
            .take(600)
            .collect::<String>()
    );

    // After the thaw, the kernel's checks give the config id the device
    // gave, for every file (what the mover checks: items with bytes).
    let checked: Vec<&Item> = from_device
        .items
        .iter()
        .filter(|i| i.kind == ItemKind::File)
        .collect();
    let ids: Vec<ItemId> = checked.iter().map(|i| i.id.clone()).collect();
    let mut validity = FileValidity::new(translator);
    let now = validity.config_ids(&image, &ids).unwrap();
    let stale: Vec<String> = checked
        .iter()
        .zip(&now)
        .filter(|(i, c)| i.config != **c)
        .map(|(i, c)| format!("{}: mapped {} checked {}", i.id, i.config, c))
        .collect();
    assert!(
        stale.is_empty(),
        "{} checks disagree, first: {:?}",
        stale.len(),
        &stale[..stale.len().min(3)]
    );
}

#[test]
fn ext4_metadata_read_from_the_device_is_what_the_kernel_says() {
    device_and_kernel_agree(
        "ext4_metadata_read_from_the_device_is_what_the_kernel_says",
        &[],
        1500,
        true,
        Expect::AllFromDevice,
    );
}

#[test]
fn ext4_of_1k_blocks_128_byte_inodes_and_32_bit_descriptors_reads_the_same() {
    // No nanoseconds or extra time bits in 128-byte inodes; 1 KiB blocks
    // put the group descriptors in block 2; no 64bit feature.
    device_and_kernel_agree(
        "ext4_of_1k_blocks_128_byte_inodes_and_32_bit_descriptors_reads_the_same",
        &["-b", "1024", "-I", "128", "-O", "^64bit"],
        200,
        false,
        Expect::AllFromDevice,
    );
}

#[test]
fn ext4_with_values_in_ea_inodes_leaves_those_files_to_the_kernel() {
    // The one file whose attribute value lives in an EA inode goes
    // through the kernel; every other file still comes from the device.
    device_and_kernel_agree(
        "ext4_with_values_in_ea_inodes_leaves_those_files_to_the_kernel",
        &["-O", "ea_inode"],
        100,
        false,
        Expect::ToKernel(1),
    );
}

#[test]
fn ext4_with_meta_bg_is_refused_whole_and_mapped_through_the_kernel() {
    // Group descriptors spread over the groups (`meta_bg`): the reader
    // does not find them, says so, and the kernel maps every file.
    device_and_kernel_agree(
        "ext4_with_meta_bg_is_refused_whole_and_mapped_through_the_kernel",
        &["-O", "meta_bg,^resize_inode"],
        100,
        false,
        Expect::Refused("meta_bg"),
    );
}

#[test]
fn a_device_that_is_not_ext4_is_refused_by_name() {
    // Zeros: no superblock magic.
    let f = tempfile::tempfile().unwrap();
    f.set_len(1 << 20).unwrap();
    let err = Ext4Disk::from_file(f, "zeros.img".into()).expect_err("zeros taken for ext4");
    let text = err.to_string();
    assert!(
        text.contains("no ext2/3/4 superblock magic") && text.contains("zeros.img"),
        "{text}"
    );
    // Cut short before its superblock ends.
    let f = tempfile::tempfile().unwrap();
    f.set_len(1500).unwrap();
    let err = Ext4Disk::from_file(f, "short.img".into()).expect_err("a short device taken");
    assert!(err.to_string().contains("read superblock"), "{err}");
}
