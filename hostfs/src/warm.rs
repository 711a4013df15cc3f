//! Reading a tree's directories ahead of its listing, while the freezer
//! waits: `syncfs` (writing back what is dirty, seconds on a busy host)
//! and `FIFREEZE` (writing back the journal) leave the cores idle, and
//! the listing that follows them — under the freeze, holding the
//! application's writes — waits on each cold directory's blocks and
//! inode. A [`DirectoryWarmer`] lists the directories in the meantime,
//! so the kernel holds them when the frozen listing asks; what it reads
//! is thrown away (the map is made from the listing under the freeze,
//! never from this one), so a directory that changes meanwhile costs
//! only a read.
//!
//! It is stopped as soon as the file systems are frozen: it must not
//! compete with the listing it prepares. Directories are opened with
//! `O_NOATIME` (no access-time update to write back in `FIFREEZE`) by
//! path, one per thread at a time (the queue holds paths, not
//! descriptors: a large tree must not exhaust the agent's descriptors);
//! a subdirectory is `lstat`ed through its parent's descriptor and read
//! only if it is on the root's file system (no symlink followed).

use rustix::fs::{openat, statat, AtFlags, Dir, FileType, Mode, OFlags, CWD};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// Threads reading directories at once (as the listing's).
const WARM_THREADS: usize = 8;

/// Entries read between two looks at the stop flag (a huge directory does
/// not hold up the stop for long).
const STOP_EVERY: usize = 512;

struct Queue {
    /// Directories to read, by path: at most a reader's few descriptors
    /// are open at once (a queue of descriptors would hold one per
    /// directory found, past the agent's descriptor limit on a large
    /// tree).
    dirs: Vec<PathBuf>,
    /// Directories being read (each may add more).
    busy: usize,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    stop: AtomicBool,
    read: AtomicU64,
    /// Threads not ended yet, and a signal when one ends.
    alive: Mutex<usize>,
    ended: Condvar,
}

/// How long [`DirectoryWarmer::stop`] waits for its threads: a thread
/// stuck in a read of a failing device is left to end on its own rather
/// than hold up the freeze (whose listing then meets the same device).
const STOP_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// Directories being read ahead on threads of their own, until
/// [`DirectoryWarmer::stop`].
pub struct DirectoryWarmer {
    shared: Arc<Shared>,
}

fn open_dir(at: impl std::os::fd::AsFd, name: &std::ffi::CStr) -> Option<OwnedFd> {
    let at = at.as_fd();
    openat(
        at,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOATIME,
        Mode::empty(),
    )
    // Not the owner nor CAP_FOWNER: O_NOATIME is refused, open without.
    .or_else(|_| {
        openat(
            at,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
    })
    .ok()
}

impl DirectoryWarmer {
    /// Start reading the directories under `roots` (each only on its own
    /// file system). Roots that cannot be opened are passed over: the
    /// listing under the freeze reports them.
    pub fn start(roots: &[PathBuf]) -> DirectoryWarmer {
        let dirs = roots.to_vec();
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue { dirs, busy: 0 }),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            read: AtomicU64::new(0),
            alive: Mutex::new(0),
            ended: Condvar::new(),
        });
        for _ in 0..WARM_THREADS {
            let s = shared.clone();
            let mut alive = shared.alive.lock().unwrap_or_else(|p| p.into_inner());
            let spawned = std::thread::Builder::new()
                .name("floe-warm".into())
                .spawn(move || {
                    warm(&s);
                    let mut alive = s.alive.lock().unwrap_or_else(|p| p.into_inner());
                    *alive -= 1;
                    s.ended.notify_all();
                });
            if spawned.is_ok() {
                *alive += 1;
            }
        }
        DirectoryWarmer { shared }
    }

    /// Stop: the threads end within a directory's [`STOP_EVERY`] entries
    /// (waited for up to [`STOP_WAIT`]). The directories read.
    pub fn stop(self) -> u64 {
        self.halt();
        self.shared.read.load(Ordering::Relaxed)
    }

    fn halt(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake.notify_all();
        let alive = self.shared.alive.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self
            .shared
            .ended
            .wait_timeout_while(alive, STOP_WAIT, |n| *n > 0);
    }

    /// Threads still running (tests).
    #[cfg(test)]
    fn running(&self) -> usize {
        *self.shared.alive.lock().unwrap()
    }
}

impl Drop for DirectoryWarmer {
    fn drop(&mut self) {
        self.halt();
    }
}

fn warm(s: &Shared) {
    let mut q = s.queue.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if s.stop.load(Ordering::Relaxed) {
            return;
        }
        if let Some(dir) = q.dirs.pop() {
            q.busy += 1;
            drop(q);
            let found = read_dir(s, &dir);
            if found.is_some() {
                s.read.fetch_add(1, Ordering::Relaxed);
            }
            q = s.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.busy -= 1;
            q.dirs.extend(found.unwrap_or_default());
            s.wake.notify_all();
        } else if q.busy == 0 {
            return;
        } else {
            q = s.wake.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// One directory's entries read; its subdirectories on the same file
/// system (their inodes read for that), to read next. `None` if it
/// could not be read.
fn read_dir(s: &Shared, path: &Path) -> Option<Vec<PathBuf>> {
    let mut found = Vec::new();
    let dir = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .ok()
        .and_then(|c| open_dir(CWD, &c))?;
    let dev = rustix::fs::fstat(&dir).ok()?.st_dev;
    let entries = Dir::read_from(&dir).ok()?;
    for (n, ent) in entries.enumerate() {
        if n % STOP_EVERY == STOP_EVERY - 1 && s.stop.load(Ordering::Relaxed) {
            break;
        }
        let Ok(ent) = ent else { break };
        let name = ent.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        if !matches!(ent.file_type(), FileType::Directory | FileType::Unknown) {
            continue;
        }
        // As the listing does: a directory's inode is read (its device
        // says whether to descend), so it is warm too. Not followed
        // through a symlink.
        let Ok(st) = statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory && st.st_dev == dev {
            found.push(path.join(std::ffi::OsStr::from_bytes(name.to_bytes())));
        }
    }
    Some(found)
}

/// The roots worth reading ahead for these paths: directories, once each.
pub fn roots<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for p in paths {
        if p.is_dir() && !out.iter().any(|o| p.starts_with(o)) {
            out.retain(|o| !o.starts_with(p));
            out.push(p.to_path_buf());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_directory_of_a_tree_is_read_once() {
        let t = tempfile::tempdir().unwrap();
        let mut dirs = 1;
        for a in 0..5 {
            for b in 0..4 {
                let d = t.path().join(format!("a{a}")).join(format!("b{b}"));
                std::fs::create_dir_all(&d).unwrap();
                std::fs::write(d.join("f"), b"x").unwrap();
                dirs += 1;
            }
            dirs += 1;
        }
        std::os::unix::fs::symlink(t.path().join("a0"), t.path().join("link")).unwrap();
        let w = DirectoryWarmer::start(&[t.path().to_path_buf()]);
        // Nothing stops it: its threads end when the tree is read.
        for _ in 0..500 {
            if w.running() == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(w.running(), 0);
        // The symlink to a directory is not followed.
        assert_eq!(w.stop(), dirs);
    }

    #[test]
    fn a_stopped_warmer_ends_and_a_missing_root_reads_nothing() {
        let t = tempfile::tempdir().unwrap();
        let w = DirectoryWarmer::start(&[t.path().join("missing")]);
        for _ in 0..500 {
            if w.running() == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(w.stop(), 0);
        for i in 0..64 {
            std::fs::create_dir_all(t.path().join(format!("d{i}/e"))).unwrap();
        }
        let w = DirectoryWarmer::start(&[t.path().to_path_buf()]);
        let shared = w.shared.clone();
        let n = w.stop();
        assert!(n <= 129, "{n}");
        assert_eq!(*shared.alive.lock().unwrap(), 0, "stopped threads ended");
    }

    #[test]
    fn nested_roots_are_read_once() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("a/b")).unwrap();
        std::fs::write(t.path().join("a/f"), b"x").unwrap();
        let a = t.path().join("a");
        let b = t.path().join("a/b");
        let f = t.path().join("a/f");
        assert_eq!(
            roots([b.as_path(), a.as_path(), f.as_path()]),
            vec![a.clone()]
        );
        assert_eq!(roots([a.as_path(), b.as_path()]), vec![a]);
    }
}
