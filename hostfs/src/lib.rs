//! Floe's host side for real Linux storage: file system sources and their
//! walk, FIEMAP maps, FIFREEZE with a thaw guard that outlives the agent,
//! device identity from sysfs, and btrfs's chunk tree. Shared by the
//! `fsflush`, `fiemap` and `btrfs` plugins (each a cdylib of its own).

pub mod btrfs;
pub mod clone;
pub mod ext4;
pub mod filemap;
pub mod identity;
pub mod le;
pub mod lvm;
pub mod mapper;
pub mod meta;
pub mod ondisk;
pub mod source;
pub mod sys;
pub mod volume;
pub mod warm;
pub mod watch;
