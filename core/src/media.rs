//! Media writer decorators: a dry-run sink that keeps nothing, and a
//! counter that wraps any writer.

use crate::abi::MediaWriter;
use crate::error::{Error, ErrorKind, Result};
use crate::model::{
    now_secs, Committed, ItemFailure, ItemHeader, ItemTrailer, MediaPosition, SetHeader, SetId,
    SetRecord,
};

/// A media writer that stores nothing: for `--dry-run` and for measuring
/// the read side alone. Its sets are never "committed" anywhere durable,
/// and its position says so.
#[derive(Default)]
pub struct NullMediaWriter {
    begun: bool,
    in_item: bool,
    items: u64,
}

impl MediaWriter for NullMediaWriter {
    fn begin_set(&mut self, _header: &SetHeader) -> Result<()> {
        self.begun = true;
        self.items = 0;
        Ok(())
    }
    fn resume_set(&mut self, set: &SetId) -> Result<SetRecord> {
        Err(Error::new(
            ErrorKind::NotFound,
            format!("the null media keeps nothing: set {set} cannot be resumed"),
        ))
    }
    fn begin_item(&mut self, _header: &ItemHeader) -> Result<()> {
        self.in_item = true;
        Ok(())
    }
    fn write(&mut self, _data: &[u8]) -> Result<()> {
        Ok(())
    }
    fn end_item(&mut self, _trailer: &ItemTrailer) -> Result<MediaPosition> {
        if !std::mem::take(&mut self.in_item) {
            return Err(Error::new(ErrorKind::Media, "end_item without begin_item"));
        }
        self.items += 1;
        Ok(MediaPosition {
            medium: "null".into(),
            locator: "discarded".into(),
        })
    }
    fn fail_item(&mut self, _failure: &ItemFailure) -> Result<()> {
        Ok(())
    }
    fn commit(&mut self) -> Result<Committed> {
        if !std::mem::take(&mut self.begun) {
            return Err(Error::new(ErrorKind::Media, "commit without begin_set"));
        }
        Ok(Committed {
            committed_at: now_secs(),
            items: self.items,
            positions: Vec::new(),
        })
    }
    fn abort(&mut self) -> Result<()> {
        *self = NullMediaWriter::default();
        Ok(())
    }
    fn delete_set(&mut self, set: &SetId) -> Result<()> {
        Err(Error::new(
            ErrorKind::NotFound,
            format!("the null media keeps nothing: no set {set}"),
        ))
    }
}

/// Counts what passes through to the wrapped writer.
pub struct CountingMediaWriter<W: MediaWriter> {
    inner: W,
    /// Bytes written.
    pub bytes: u64,
    /// Items finished.
    pub items: u64,
}

impl<W: MediaWriter> CountingMediaWriter<W> {
    /// Wrap a writer.
    pub fn new(inner: W) -> Self {
        CountingMediaWriter {
            inner,
            bytes: 0,
            items: 0,
        }
    }
    /// The wrapped writer.
    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: MediaWriter> MediaWriter for CountingMediaWriter<W> {
    fn begin_set(&mut self, header: &SetHeader) -> Result<()> {
        self.inner.begin_set(header)
    }
    fn resume_set(&mut self, set: &SetId) -> Result<SetRecord> {
        self.inner.resume_set(set)
    }
    fn begin_item(&mut self, header: &ItemHeader) -> Result<()> {
        self.inner.begin_item(header)
    }
    fn write(&mut self, data: &[u8]) -> Result<()> {
        self.inner.write(data)?;
        self.bytes += data.len() as u64;
        Ok(())
    }
    fn end_item(&mut self, trailer: &ItemTrailer) -> Result<MediaPosition> {
        let p = self.inner.end_item(trailer)?;
        self.items += 1;
        Ok(p)
    }
    fn fail_item(&mut self, failure: &ItemFailure) -> Result<()> {
        self.inner.fail_item(failure)
    }
    fn commit(&mut self) -> Result<Committed> {
        self.inner.commit()
    }
    fn abort(&mut self) -> Result<()> {
        self.inner.abort()
    }
    fn delete_set(&mut self, set: &SetId) -> Result<()> {
        self.inner.delete_set(set)
    }
    fn recycle(&mut self, forgotten: &[SetId], dry_run: bool) -> Result<Vec<String>> {
        self.inner.recycle(forgotten, dry_run)
    }
}

impl MediaWriter for Box<dyn MediaWriter> {
    fn begin_set(&mut self, header: &SetHeader) -> Result<()> {
        (**self).begin_set(header)
    }
    fn resume_set(&mut self, set: &SetId) -> Result<SetRecord> {
        (**self).resume_set(set)
    }
    fn begin_item(&mut self, header: &ItemHeader) -> Result<()> {
        (**self).begin_item(header)
    }
    fn write(&mut self, data: &[u8]) -> Result<()> {
        (**self).write(data)
    }
    fn end_item(&mut self, trailer: &ItemTrailer) -> Result<MediaPosition> {
        (**self).end_item(trailer)
    }
    fn fail_item(&mut self, failure: &ItemFailure) -> Result<()> {
        (**self).fail_item(failure)
    }
    fn commit(&mut self) -> Result<Committed> {
        (**self).commit()
    }
    fn abort(&mut self) -> Result<()> {
        (**self).abort()
    }
    fn delete_set(&mut self, set: &SetId) -> Result<()> {
        (**self).delete_set(set)
    }
    fn recycle(&mut self, forgotten: &[SetId], dry_run: bool) -> Result<Vec<String>> {
        (**self).recycle(forgotten, dry_run)
    }
}

/// An OS error of a media operation: `media_full` and `media_read_only`
/// keep their kinds, anything else is `media`.
pub fn media_io_error(op: &str, path: &std::path::Path, e: std::io::Error) -> Error {
    let err = Error::io(op, e).path(path);
    match err.kind() {
        ErrorKind::MediaFull | ErrorKind::MediaReadOnly => err,
        _ => err.with_kind(ErrorKind::Media),
    }
}

/// The error of a set that media in `dir` do not hold (`path`, where it
/// would be, could not be opened).
pub fn no_set_error(
    set: &SetId,
    dir: &std::path::Path,
    path: &std::path::Path,
    e: std::io::Error,
) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("no set {set} on media {}", dir.display()),
    )
    .path(path)
    .source(e)
}

/// fsync a directory (after creating, renaming or removing in it).
pub fn fsync_dir(dir: &std::path::Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| media_io_error("fsync directory", dir, e))
}

/// Crash injection for tests: when `FLOE_FAILPOINT` names this point, the
/// process dies here at once (as a power cut or kill -9 would), leaving
/// media and catalog exactly as far as they got.
pub fn failpoint(name: &str) {
    if std::env::var("FLOE_FAILPOINT").is_ok_and(|v| v == name) {
        eprintln!("floe: failpoint {name}: dying now");
        std::process::abort();
    }
}

/// Drop `t` on a thread of its own: a set's records (70,000 items are
/// about a million allocations) are freed after a commit answers, not
/// before.
pub fn drop_later<T: Send + 'static>(t: T) {
    let _ = std::thread::Builder::new()
        .name("floe-drop".into())
        .spawn(move || drop(t));
}

/// Error injection for tests: true when `FLOE_ERRPOINT` names this
/// point; the caller then fails the way the real fault would.
pub fn errpoint(name: &str) -> bool {
    std::env::var("FLOE_ERRPOINT").is_ok_and(|v| v == name)
}

/// Pause injection for tests: when `FLOE_PAUSEPOINT` names this point
/// (`NAME`, or `NAME:MILLIS`), the process says so on stderr
/// (`floe: pausepoint NAME: waiting`) and waits here — until it is killed,
/// or for MILLIS — so a test can act at exactly this moment.
pub fn pausepoint(name: &str) {
    let Ok(v) = std::env::var("FLOE_PAUSEPOINT") else {
        return;
    };
    let (point, millis) = match v.split_once(':') {
        Some((p, m)) => (p.to_string(), m.parse::<u64>().ok()),
        None => (v.clone(), None),
    };
    if point != name {
        return;
    }
    eprintln!("floe: pausepoint {name}: waiting");
    match millis {
        Some(ms) => std::thread::sleep(std::time::Duration::from_millis(ms)),
        None => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
    }
}

/// One JSON line, newline included: a record of an append-only journal.
pub fn json_line<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    let mut b = serde_json::to_vec(v)
        .map_err(|e| Error::new(ErrorKind::Media, "cannot encode journal").source(e))?;
    b.push(b'\n');
    Ok(b)
}

/// The complete, non-empty lines of an append-only journal. A last line
/// without its newline was torn by a crash and is left out; `None` when
/// not one line is complete.
pub fn complete_lines(bytes: &[u8]) -> Option<impl Iterator<Item = &[u8]>> {
    let end = bytes.iter().rposition(|&b| b == b'\n')?;
    Some(
        bytes[..=end]
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty()),
    )
}

/// A set id that is safe as a file name on media (no `/`, not hidden).
pub fn checked_set_name(set: &SetId) -> Result<&str> {
    let s = set.as_str();
    if s.is_empty() || s.contains('/') || s.starts_with('.') {
        return Err(Error::new(ErrorKind::Config, format!("bad set id {s:?}")));
    }
    Ok(s)
}

/// A committed set with its items found by id: what a media reader keeps
/// between `open_item` calls (a set of 70,000 files is opened item by
/// item).
#[derive(Clone, Debug)]
pub struct SetIndex {
    /// The set.
    pub record: SetRecord,
    by_item: std::collections::HashMap<crate::model::ItemId, usize>,
}

impl SetIndex {
    /// Index `record`'s items.
    pub fn new(record: SetRecord) -> SetIndex {
        let by_item = record
            .items
            .iter()
            .enumerate()
            .map(|(k, r)| (r.header.item.clone(), k))
            .collect();
        SetIndex { record, by_item }
    }

    /// The set's id.
    pub fn set(&self) -> &SetId {
        &self.record.header.set
    }

    /// One item's record, or `NotFound` naming set and item.
    pub fn item(&self, item: &crate::model::ItemId) -> Result<crate::model::ItemRecord> {
        self.by_item
            .get(item)
            .map(|&k| self.record.items[k].clone())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("set {} has no item {item}", self.set()),
                )
                .item(item)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ConfigId, ImageId, ItemId, ItemKind, ItemRecord};
    use crate::units::Bytes;

    #[test]
    fn a_set_index_finds_items_and_names_a_missing_one() {
        let rec = |name: &str| ItemRecord {
            header: ItemHeader {
                item: ItemId::new(name),
                kind: ItemKind::Volume,
                size: Bytes(1),
                config: ConfigId::new("c"),
                meta: Default::default(),
                holes: Vec::new(),
                file: None,
            },
            trailer: ItemTrailer {
                length: Bytes(1),
                blake3: String::new(),
                config: ConfigId::new("c"),
                remaps: 0,
                captured_after_freeze: false,
            },
            position: MediaPosition {
                medium: "m".into(),
                locator: name.into(),
            },
        };
        let index = SetIndex::new(SetRecord {
            header: SetHeader {
                set: SetId::new("s1"),
                label: String::new(),
                agent: "h".into(),
                sources: vec![],
                image: ImageId::new("i"),
                frozen_at: 1,
                started_at: 1,
            },
            items: vec![rec("a"), rec("b")],
            failures: vec![],
            committed_at: 1,
        });
        assert_eq!(index.set().as_str(), "s1");
        assert_eq!(index.item(&ItemId::new("b")).unwrap().position.locator, "b");
        let e = index.item(&ItemId::new("zz")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().contains("set s1 has no item zz"), "{e}");
    }
}
