//! The catalog: an SQLite database of committed sets and where their items
//! are. It is an index, never the truth: every set is recorded only after
//! its media committed it (the catalog commit is last), and the catalog can
//! be rebuilt by scanning media, so losing it loses nothing.
//! Schema (version 2; `docs/formats/catalog.md`): `meta(key, value)`,
//! `sets(...)` — each set's record as zstd-compressed JSON —, `items(...)`,
//! `set_facts(...)` — what a listing shows of each set.

use crate::abi::MediaReader;
use crate::error::{Error, ErrorKind, Result};
use crate::model::{SetId, SetRecord};
use crate::mover::Recorder;
use rusqlite::{config::DbConfig, params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};

/// The schema version this build reads and writes.
pub const SCHEMA_VERSION: i64 = 2;

/// zstd level of set records: the fastest (a 70,000-file set's 55 MB of
/// JSON become 5 MB in 0.1 s; stored raw, SQLite's copies, pages, WAL and
/// checkpoint of it were two thirds of the mover's page faults).
const RECORD_LEVEL: i32 = 1;

/// Encode a set's record for its row: its JSON, zstd-compressed, streamed
/// (never one string of the whole record).
pub fn encode_record(set: &SetRecord) -> Result<Vec<u8>> {
    let bad = |e: std::io::Error| Error::new(ErrorKind::Io, "cannot encode set").source(e);
    let mut z =
        zstd::stream::Encoder::new(Vec::with_capacity(1 << 16), RECORD_LEVEL).map_err(bad)?;
    serde_json::to_writer(std::io::BufWriter::with_capacity(1 << 16, &mut z), set)
        .map_err(|e| Error::new(ErrorKind::Io, "cannot encode set").source(e))?;
    z.finish().map_err(bad)
}

/// Decode a row's record: a BLOB is zstd-compressed JSON (schema 2), TEXT
/// is JSON (rows written by schema 1).
pub fn decode_record(value: rusqlite::types::Value) -> Result<SetRecord> {
    let malformed = "malformed set record in the catalog";
    match value {
        rusqlite::types::Value::Text(json) => {
            serde_json::from_str(&json).map_err(|e| Error::new(ErrorKind::Io, malformed).source(e))
        }
        rusqlite::types::Value::Blob(z) => {
            let json = zstd::stream::decode_all(z.as_slice())
                .map_err(|e| Error::new(ErrorKind::Io, malformed).source(e))?;
            serde_json::from_slice(&json)
                .map_err(|e| Error::new(ErrorKind::Io, malformed).source(e))
        }
        other => Err(Error::new(
            ErrorKind::Io,
            format!("{malformed}: a {:?} instead of JSON", other.data_type()),
        )),
    }
}
const MAGIC: &str = "floe-catalog";

/// One catalogued set and the media it is on.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    /// The media spec (`disk:/backup`).
    pub media: String,
    /// The set as its media committed it.
    pub record: SetRecord,
}

/// What a listing shows of a set: a line's worth, kept in the `set_facts`
/// table so that listing a catalog does not decode every record.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    /// The set.
    pub set: SetId,
    /// The media spec it is on.
    pub media: String,
    /// Its label.
    pub label: String,
    /// The agent's host.
    pub agent: String,
    /// When its media committed it (seconds since the epoch).
    pub committed_at: u64,
    /// Items backed up.
    pub items: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Items that could not be backed up (the set is partial if any).
    pub failures: u64,
    /// The sources it was made of.
    pub sources: Vec<String>,
}

impl Summary {
    /// The summary of `record` on `media`.
    pub fn of(media: &str, record: &SetRecord) -> Summary {
        Summary {
            set: record.header.set.clone(),
            media: media.to_string(),
            label: record.header.label.clone(),
            agent: record.header.agent.clone(),
            committed_at: record.committed_at,
            items: record.items.len() as u64,
            bytes: record.items.iter().map(|i| i.trailer.length.0).sum(),
            failures: record.failures.len() as u64,
            sources: record.header.sources.clone(),
        }
    }
}

/// An open catalog.
pub struct Catalog {
    conn: Connection,
    path: PathBuf,
    /// The commit time the staged set's row was written with.
    staged_at: Option<u64>,
}

fn db_err(path: &Path, what: &str, e: rusqlite::Error) -> Error {
    Error::new(ErrorKind::Io, format!("catalog {what} failed"))
        .path(path)
        .source(e)
}

/// A passive checkpoint of the WAL into the database on `conn`.
fn checkpoint_conn(conn: &Connection, path: &Path) -> Result<()> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        .map_err(|e| db_err(path, "checkpoint", e))
}

/// SQLite integers are signed: refuse values that do not fit rather than
/// store them wrapped.
fn sql_int(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::new(ErrorKind::Io, format!("{v} does not fit the catalog")))
}

use crate::media::failpoint;

impl Catalog {
    /// Open (or create) the catalog at `path`.
    pub fn open(path: &Path) -> Result<Catalog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io("create catalog directory", e).path(dir))?;
        }
        let conn = Connection::open(path).map_err(|e| db_err(path, "open", e))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|e| db_err(path, "open", e))?;
        // A commit is a WAL append and its fsync; the copy of the WAL into
        // the database (checkpoint) is not part of it, nor of closing:
        // [`Catalog::checkpoint`] does it when a command asks (a backup
        // asks at its start, on a thread, while the agent freezes). On
        // the 70,000-file tree the checkpoint in the commit was 0.05 s
        // of the backup's last stretch.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
            .map_err(|e| db_err(path, "open", e))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;
             PRAGMA wal_autocheckpoint=0; PRAGMA journal_size_limit=67108864;
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS sets (
                 set_id TEXT PRIMARY KEY, media TEXT NOT NULL, label TEXT NOT NULL, agent TEXT NOT NULL,
                 image TEXT NOT NULL, frozen_at INTEGER NOT NULL, committed_at INTEGER NOT NULL,
                 record BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS items (
                 set_id TEXT NOT NULL REFERENCES sets(set_id) ON DELETE CASCADE, idx INTEGER NOT NULL,
                 item TEXT NOT NULL, kind TEXT NOT NULL, size INTEGER NOT NULL, blake3 TEXT NOT NULL,
                 config TEXT NOT NULL, remaps INTEGER NOT NULL, captured_after_freeze INTEGER NOT NULL,
                 medium TEXT NOT NULL, locator TEXT NOT NULL, PRIMARY KEY (set_id, idx));
             CREATE TABLE IF NOT EXISTS set_facts (
                 set_id TEXT PRIMARY KEY REFERENCES sets(set_id) ON DELETE CASCADE,
                 items INTEGER NOT NULL, bytes INTEGER NOT NULL, failures INTEGER NOT NULL,
                 sources TEXT NOT NULL);",
        )
        .map_err(|e| db_err(path, "schema", e))?;
        let magic: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key='magic'", [], |r| r.get(0))
            .optional()
            .map_err(|e| db_err(path, "read meta", e))?;
        match magic {
            None => {
                conn.execute(
                    "INSERT INTO meta VALUES ('magic', ?1), ('schema_version', ?2)",
                    params![MAGIC, SCHEMA_VERSION.to_string()],
                )
                .map_err(|e| db_err(path, "write meta", e))?;
            }
            Some(m) if m != MAGIC => {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("{} is not a Floe catalog", path.display()),
                )
                .path(path))
            }
            Some(_) => {
                let v: String = conn
                    .query_row(
                        "SELECT value FROM meta WHERE key='schema_version'",
                        [],
                        |r| r.get(0),
                    )
                    .map_err(|e| db_err(path, "read meta", e))?;
                if v == "1" {
                    // Version 1 differs only in its records being TEXT
                    // (JSON), which version 2 reads: upgraded in place.
                    conn.execute(
                        "UPDATE meta SET value = ?1 WHERE key = 'schema_version'",
                        params![SCHEMA_VERSION.to_string()],
                    )
                    .map_err(|e| db_err(path, "upgrade schema", e))?;
                } else if v != SCHEMA_VERSION.to_string() {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!("catalog schema version {v} is not {SCHEMA_VERSION}: rebuild it from media"),
                    )
                    .path(path));
                }
            }
        }
        Ok(Catalog {
            conn,
            path: path.to_path_buf(),
            staged_at: None,
        })
    }

    /// Copy what the WAL holds into the database (a passive checkpoint:
    /// it waits for no reader or writer, and leaves what they still need
    /// for the next one). Commits never do it themselves.
    pub fn checkpoint(&self) -> Result<()> {
        checkpoint_conn(&self.conn, &self.path)
    }

    /// [`Catalog::checkpoint`] on a connection and thread of its own, for
    /// a command that goes on meanwhile (a backup, while the agent
    /// freezes and maps). Join it before the process ends.
    pub fn checkpoint_in_background(&self) -> std::thread::JoinHandle<Result<()>> {
        let path = self.path.clone();
        std::thread::spawn(move || {
            let conn = Connection::open(&path).map_err(|e| db_err(&path, "open", e))?;
            conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
                .and_then(|_| conn.busy_timeout(std::time::Duration::from_secs(10)))
                .map_err(|e| db_err(&path, "open", e))?;
            checkpoint_conn(&conn, &path)
        })
    }

    /// Record a set its media committed (in one transaction; replaces an
    /// earlier record of the same set).
    pub fn record(&mut self, media: &str, set: &SetRecord) -> Result<()> {
        self.stage(media, set)?;
        self.commit_staged(media, set, false)
    }

    fn exec(&self, what: &str, sql: &str, set: &SetId) -> Result<()> {
        self.conn
            .execute(sql, params![set.as_str()])
            .map(|_| ())
            .map_err(|e| db_err(&self.path, what, e))
    }

    /// Insert the rows of `set`'s items (inside the open transaction).
    fn insert_items(&self, set: &SetRecord) -> Result<()> {
        let h = &set.header;
        // One prepared statement for every item (a tree has 70,000).
        let mut insert = self
            .conn
            .prepare_cached(
                "INSERT INTO items VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )
            .map_err(|e| db_err(&self.path, "prepare item insert", e))?;
        for (i, it) in set.items.iter().enumerate() {
            insert
                .execute(params![
                    h.set.as_str(),
                    sql_int(i as u64)?,
                    it.header.item.as_str(),
                    it.header.kind.name(),
                    sql_int(it.header.size.0)?,
                    it.trailer.blake3,
                    it.trailer.config.as_str(),
                    i64::from(it.trailer.remaps),
                    i64::from(it.trailer.captured_after_freeze),
                    it.position.medium,
                    it.position.locator
                ])
                .map_err(|e| db_err(&self.path, "insert item", e))?;
        }
        Ok(())
    }

    /// The set's row: its record (the JSON of every item, tens of MB for
    /// a tree, compressed) and columns to query by.
    fn insert_set(&self, media: &str, set: &SetRecord) -> Result<()> {
        self.insert_set_encoded(media, set, encode_record(set)?)
    }

    /// [`Catalog::insert_set`] with the record encoded already; and the
    /// set's facts, for listing without decoding the record.
    fn insert_set_encoded(&self, media: &str, set: &SetRecord, record: Vec<u8>) -> Result<()> {
        let h = &set.header;
        self.conn
            .execute(
                "INSERT INTO sets VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    h.set.as_str(),
                    media,
                    h.label,
                    h.agent,
                    h.image.as_str(),
                    sql_int(h.frozen_at)?,
                    sql_int(set.committed_at)?,
                    record
                ],
            )
            .map_err(|e| db_err(&self.path, "insert set", e))?;
        let f = Summary::of(media, set);
        let sources = serde_json::to_string(&f.sources)
            .map_err(|e| Error::new(ErrorKind::Io, "cannot encode sources").source(e))?;
        self.conn
            .execute(
                "INSERT OR REPLACE INTO set_facts VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    h.set.as_str(),
                    sql_int(f.items)?,
                    sql_int(f.bytes)?,
                    sql_int(f.failures)?,
                    sources
                ],
            )
            .map(|_| ())
            .map_err(|e| db_err(&self.path, "insert set facts", e))
    }

    /// Stage `set` on `media` while its media commit it: its row and item
    /// rows, in a transaction left open — nothing is visible until
    /// [`Catalog::commit_staged`]. The row carries `set.committed_at` as
    /// the mover expects it; if the media say another time, the
    /// `committed_at` column (which decoding takes over the record's) is
    /// updated then.
    pub fn stage(&mut self, media: &str, set: &SetRecord) -> Result<()> {
        self.staged_at = Some(set.committed_at);
        self.conn
            .execute_batch("BEGIN IMMEDIATE; PRAGMA defer_foreign_keys = ON;")
            .map_err(|e| db_err(&self.path, "begin", e))?;
        let id = &set.header.set;
        // The record is encoded on a thread of its own while the item rows
        // go in (70,000 items: 0.15 s and 0.11 s, one after the other on
        // the backup's last stretch before).
        let r = std::thread::scope(|sc| {
            let record = sc.spawn(|| encode_record(set));
            let rows = self
                .exec("delete", "DELETE FROM sets WHERE set_id = ?1", id)
                .and_then(|()| self.exec("delete", "DELETE FROM items WHERE set_id = ?1", id))
                .and_then(|()| self.insert_items(set));
            let record = record.join().unwrap_or_else(|_| {
                Err(Error::new(
                    ErrorKind::Io,
                    "encoding the set record panicked",
                ))
            });
            rows.and_then(|()| self.insert_set_encoded(media, set, record?))
        });
        if r.is_err() {
            self.discard_staged();
        }
        r
    }

    /// The media committed the staged set: its commit time, its rows again
    /// if media moved its items, and the commit — the catalog's, last.
    pub fn commit_staged(&mut self, media: &str, set: &SetRecord, moved: bool) -> Result<()> {
        let r = (|| {
            let h = &set.header;
            if moved {
                self.exec("delete", "DELETE FROM sets WHERE set_id = ?1", &h.set)?;
                self.exec("delete", "DELETE FROM items WHERE set_id = ?1", &h.set)?;
                self.insert_items(set)?;
                self.insert_set(media, set)?;
            } else if self.staged_at != Some(set.committed_at) {
                // (Rewrites the row and its record: rare, the mover stages
                // with the time media take, to the second.)
                self.conn
                    .execute(
                        "UPDATE sets SET committed_at = ?2 WHERE set_id = ?1",
                        params![h.set.as_str(), sql_int(set.committed_at)?],
                    )
                    .map_err(|e| db_err(&self.path, "update set", e))?;
            }
            failpoint("catalog-before-commit");
            self.conn
                .execute_batch("COMMIT")
                .map_err(|e| db_err(&self.path, "commit", e))
        })();
        if r.is_err() {
            self.discard_staged();
        }
        r
    }

    /// Rows the catalog holds for a set's items (the `items` table, for
    /// SQL queries across sets).
    pub fn item_rows(&self, id: &SetId) -> Result<u64> {
        self.conn
            .query_row(
                "SELECT count(*) FROM items WHERE set_id = ?1",
                params![id.as_str()],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| u64::try_from(n).unwrap_or(0))
            .map_err(|e| db_err(&self.path, "query", e))
    }

    /// Forget what was staged (the media commit failed).
    pub fn discard_staged(&mut self) {
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }

    /// A row's set: its record, committed when the `committed_at` column
    /// says (a staged row's record was written before the media commit).
    fn decode(media: String, record: rusqlite::types::Value, committed_at: i64) -> Result<Entry> {
        let mut record = decode_record(record)?;
        record.committed_at = u64::try_from(committed_at).unwrap_or(0);
        Ok(Entry { media, record })
    }

    /// Every set, oldest first.
    pub fn sets(&self) -> Result<Vec<Entry>> {
        let mut st = self
            .conn
            .prepare("SELECT media, record, committed_at FROM sets ORDER BY committed_at, set_id")
            .map_err(|e| db_err(&self.path, "query", e))?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, rusqlite::types::Value>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .map_err(|e| db_err(&self.path, "query", e))?;
        let mut out = Vec::new();
        for row in rows {
            let (m, j, at) = row.map_err(|e| db_err(&self.path, "query", e))?;
            out.push(Self::decode(m, j, at)?);
        }
        Ok(out)
    }

    /// Every set in a line's worth of facts, oldest first, without
    /// decoding the records (a tree's is tens of MB of JSON) — except a
    /// set recorded by a build before the `set_facts` table, whose record
    /// is decoded for them.
    pub fn summaries(&self) -> Result<Vec<Summary>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT s.set_id, s.media, s.label, s.agent, s.committed_at,
                        f.items, f.bytes, f.failures, f.sources
                 FROM sets s LEFT JOIN set_facts f ON f.set_id = s.set_id
                 ORDER BY s.committed_at, s.set_id",
            )
            .map_err(|e| db_err(&self.path, "query", e))?;
        type Row = (
            String,
            String,
            String,
            String,
            i64,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            Option<String>,
        );
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                ))
            })
            .map_err(|e| db_err(&self.path, "query", e))?;
        let count = |v: i64| u64::try_from(v).unwrap_or(0);
        let mut out = Vec::new();
        for row in rows {
            let (set, media, label, agent, at, items, bytes, failures, sources): Row =
                row.map_err(|e| db_err(&self.path, "query", e))?;
            let sources = sources.and_then(|s| serde_json::from_str::<Vec<String>>(&s).ok());
            match (items, bytes, failures, sources) {
                (Some(items), Some(bytes), Some(failures), Some(sources)) => out.push(Summary {
                    set: SetId::new(set),
                    media,
                    label,
                    agent,
                    committed_at: count(at),
                    items: count(items),
                    bytes: count(bytes),
                    failures: count(failures),
                    sources,
                }),
                // No facts (a build before them wrote the row): the record.
                _ => {
                    let e = self.set(&SetId::new(set))?;
                    out.push(Summary::of(&e.media, &e.record));
                }
            }
        }
        Ok(out)
    }

    /// One set.
    pub fn set(&self, id: &SetId) -> Result<Entry> {
        let row: Option<(String, rusqlite::types::Value, i64)> = self
            .conn
            .query_row(
                "SELECT media, record, committed_at FROM sets WHERE set_id = ?1",
                params![id.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(|e| db_err(&self.path, "query", e))?;
        let (m, j, at) = row.ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("no set {id} in the catalog {}", self.path.display()),
            )
        })?;
        Self::decode(m, j, at)
    }

    /// Forget a set (before its media deletes it: the catalog never points
    /// at what is gone).
    pub fn forget(&mut self, id: &SetId) -> Result<()> {
        self.conn
            .execute("DELETE FROM sets WHERE set_id = ?1", params![id.as_str()])
            .map_err(|e| db_err(&self.path, "delete", e))?;
        Ok(())
    }

    /// Make the catalog's view of `media` equal what is on it: record every
    /// set found, forget sets of that media that are not there. The number
    /// of sets found.
    pub fn rebuild(&mut self, media: &str, reader: &mut dyn MediaReader) -> Result<usize> {
        let found = reader.list_sets()?;
        for s in &found {
            self.record(media, s)?;
        }
        let ids: Vec<String> = found.iter().map(|s| s.header.set.0.clone()).collect();
        for e in self.sets()?.into_iter().filter(|e| e.media == media) {
            if !ids.contains(&e.record.header.set.0) {
                self.conn
                    .execute(
                        "DELETE FROM sets WHERE set_id = ?1",
                        params![e.record.header.set.as_str()],
                    )
                    .map_err(|err| db_err(&self.path, "delete", err))?;
            }
        }
        Ok(found.len())
    }
}

/// The catalog as the mover's [`Recorder`] of sets on `media`.
pub struct CatalogRecorder<'a> {
    /// The catalog.
    pub catalog: &'a mut Catalog,
    /// The media spec the sets are on.
    pub media: &'a str,
}

impl Recorder for CatalogRecorder<'_> {
    fn stage(&mut self, record: &SetRecord) -> Result<()> {
        self.catalog.stage(self.media, record)
    }
    fn commit(&mut self, record: &SetRecord, moved: bool) -> Result<()> {
        self.catalog.commit_staged(self.media, record, moved)
    }
    fn discard(&mut self) {
        self.catalog.discard_staged();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use crate::units::Bytes;

    fn set(id: &str, items: usize, committed_at: u64) -> SetRecord {
        SetRecord {
            header: SetHeader {
                set: SetId::new(id),
                label: String::new(),
                agent: "h".into(),
                sources: vec![],
                image: ImageId::new("i"),
                frozen_at: 1,
                started_at: 1,
            },
            items: (0..items)
                .map(|k| ItemRecord {
                    header: ItemHeader {
                        item: ItemId::new(format!("v{k}")),
                        kind: ItemKind::Volume,
                        size: Bytes(1),
                        config: ConfigId::new("c"),
                        meta: Default::default(),
                        file: None,
                        holes: vec![],
                    },
                    trailer: ItemTrailer {
                        length: Bytes(1),
                        blake3: "b".into(),
                        config: ConfigId::new("c"),
                        remaps: 0,
                        captured_after_freeze: false,
                    },
                    position: MediaPosition {
                        medium: "m".into(),
                        locator: format!("@{k}"),
                    },
                })
                .collect(),
            failures: vec![],
            committed_at,
        }
    }

    #[test]
    fn summaries_come_from_the_facts_and_from_the_record_where_there_are_none() {
        let d = tempfile::tempdir().unwrap();
        let mut c = Catalog::open(&d.path().join("c.db")).unwrap();
        let mut a = set("a", 3, 10);
        a.header.label = "nightly".into();
        a.header.sources = vec!["fsflush:/srv".into(), "fsflush:/home".into()];
        a.failures = vec![ItemFailure {
            item: ItemId::new("/srv/gone"),
            error: "vanished".into(),
        }];
        a.items[1].trailer.length = Bytes(5000);
        let b = set("b", 0, 20);
        c.record("disk:/m", &a).unwrap();
        c.record("tar:/t", &b).unwrap();
        let want = vec![Summary::of("disk:/m", &a), Summary::of("tar:/t", &b)];
        assert_eq!(want[0].items, 3);
        assert_eq!(want[0].bytes, 5002);
        assert_eq!(want[0].failures, 1);
        assert_eq!(c.summaries().unwrap(), want);
        let facts = |c: &Catalog| -> i64 {
            c.conn
                .query_row("SELECT count(*) FROM set_facts", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(facts(&c), 2);
        // Rows from a build before the facts: the same, from the records.
        c.conn.execute("DELETE FROM set_facts", []).unwrap();
        assert_eq!(c.summaries().unwrap(), want);
        // Forgetting a set forgets its facts; recording it again replaces
        // them; a new commit time shows.
        c.record("disk:/m", &a).unwrap();
        c.forget(&SetId::new("b")).unwrap();
        assert_eq!(facts(&c), 1);
        a.committed_at = 30;
        c.record("disk:/m", &a).unwrap();
        assert_eq!(c.summaries().unwrap(), vec![Summary::of("disk:/m", &a)]);
    }

    #[test]
    fn commits_leave_the_wal_to_a_checkpoint_and_nothing_is_lost_meanwhile() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("c.db");
        let wal = d.path().join("c.db-wal");
        let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        // More than SQLite's default of 1,000 pages for an automatic
        // checkpoint (rows of about 500 bytes).
        let mut big = set("big", 12_000, 10);
        for (k, it) in big.items.iter_mut().enumerate() {
            it.trailer.blake3 = format!("{k:064x}");
            it.trailer.config = ConfigId::new(format!("{k:0>300}"));
        }
        {
            let mut c = Catalog::open(&path).unwrap();
            c.record("disk:/m", &big).unwrap();
        }
        // Committed and closed: the set is in the WAL, the database file
        // has not grown by it (neither the commit nor the close copied it).
        let (db_before, wal_before) = (size(&path), size(&wal));
        assert!(
            wal_before > 200_000 && db_before < wal_before / 4,
            "WAL holds {wal_before} bytes, the database file {db_before}"
        );
        // Everything committed is there for the next opener.
        let c = Catalog::open(&path).unwrap();
        assert_eq!(c.set(&SetId::new("big")).unwrap().record, big);
        assert_eq!(c.item_rows(&SetId::new("big")).unwrap(), 12_000);
        // A checkpoint copies it into the database, in the background as
        // in the foreground.
        c.checkpoint_in_background().join().unwrap().unwrap();
        assert!(
            size(&path) > db_before + wal_before / 4,
            "database file is {} bytes",
            size(&path)
        );
        c.checkpoint().unwrap();
        drop(c);
        let c = Catalog::open(&path).unwrap();
        assert_eq!(c.set(&SetId::new("big")).unwrap().record, big);
    }

    #[test]
    fn a_staged_set_is_invisible_until_committed_and_gone_when_discarded() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("c.db");
        let mut c = Catalog::open(&path).unwrap();
        // Staged, then discarded: nothing, not even item rows.
        c.stage("disk:/m", &set("a", 3, 10)).unwrap();
        assert!(Catalog::open(&path).unwrap().sets().unwrap().is_empty());
        c.discard_staged();
        assert_eq!(c.item_rows(&SetId::new("a")).unwrap(), 0);
        assert!(c.sets().unwrap().is_empty());
        // Staged at 10, media said 11: the catalog says 11.
        c.stage("disk:/m", &set("b", 3, 10)).unwrap();
        let mut done = set("b", 3, 11);
        c.commit_staged("disk:/m", &done, false).unwrap();
        let e = Catalog::open(&path).unwrap().set(&SetId::new("b")).unwrap();
        assert_eq!(e.record, done);
        // Moved positions (tape): rows and record rewritten.
        c.stage("disk:/m", &set("t", 2, 20)).unwrap();
        done = set("t", 2, 20);
        done.items[1].position.locator = "file=3,record=9".into();
        c.commit_staged("disk:/m", &done, true).unwrap();
        let e = c.set(&SetId::new("t")).unwrap();
        assert_eq!(e.record.items[1].position.locator, "file=3,record=9");
        assert_eq!(c.item_rows(&SetId::new("t")).unwrap(), 2);
        let order: Vec<String> = c
            .sets()
            .unwrap()
            .iter()
            .map(|e| e.record.header.set.to_string())
            .collect();
        assert_eq!(order, ["b", "t"]);
    }

    #[test]
    fn a_version_1_catalog_is_read_and_upgraded_in_place() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("c.db");
        drop(Catalog::open(&path).unwrap());
        // What version 1 wrote: its record as JSON text.
        let old = set("old", 2, 5);
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute(
                "UPDATE meta SET value = '1' WHERE key = 'schema_version'",
                [],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO sets VALUES ('old', 'disk:/m', '', 'h', 'i', 1, 5, ?1)",
                params![serde_json::to_string(&old).unwrap()],
            )
            .unwrap();
        }
        let mut c = Catalog::open(&path).unwrap();
        assert_eq!(c.set(&SetId::new("old")).unwrap().record, old);
        let text =
            |c: &Catalog, sql: &str| -> String { c.conn.query_row(sql, [], |r| r.get(0)).unwrap() };
        assert_eq!(
            text(&c, "SELECT value FROM meta WHERE key = 'schema_version'"),
            SCHEMA_VERSION.to_string()
        );
        // New rows are compressed, and both kinds list together.
        c.record("disk:/m", &set("new", 3, 6)).unwrap();
        assert_eq!(
            text(&c, "SELECT typeof(record) FROM sets WHERE set_id = 'new'"),
            "blob"
        );
        assert_eq!(c.sets().unwrap().len(), 2);
        // A version this build does not know: refused, named.
        c.conn
            .execute(
                "UPDATE meta SET value = '9' WHERE key = 'schema_version'",
                [],
            )
            .unwrap();
        drop(c);
        let e = Catalog::open(&path).err().expect("version 9 refused");
        assert!(e.to_string().contains("schema version 9 is not 2"), "{e}");
    }

    #[test]
    fn a_malformed_record_fails_as_malformed() {
        use rusqlite::types::Value;
        for v in [
            Value::Blob(b"not zstd".to_vec()),
            Value::Blob(zstd::bulk::compress(b"{\"header\":", 1).unwrap()),
            Value::Text("{".into()),
            Value::Integer(7),
        ] {
            let e = decode_record(v).unwrap_err();
            assert!(e.to_string().contains("malformed set record"), "{e}");
        }
    }

    proptest::proptest! {
        #[test]
        fn records_decode_as_encoded_and_any_bytes_fail_cleanly(
            items in 0usize..40,
            at in 0u64..1 << 40,
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        ) {
            let s = set("p", items, at);
            let z = encode_record(&s).unwrap();
            proptest::prop_assert_eq!(decode_record(rusqlite::types::Value::Blob(z)).unwrap(), s);
            // Never a panic; a record only if the bytes happen to be one.
            let _ = decode_record(rusqlite::types::Value::Blob(bytes));
        }
    }
}
