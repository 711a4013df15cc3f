//! The catalog: an SQLite database of committed sets and where their items
//! are. It is an index, never the truth: every set is recorded only after
//! its media committed it (the catalog commit is last), and the catalog can
//! be rebuilt by scanning media, so losing it loses nothing.
//! Schema (version 1): `meta(key, value)`, `sets(...)`, `items(...)`.

use crate::abi::MediaReader;
use crate::error::{Error, ErrorKind, Result};
use crate::model::{SetId, SetRecord};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};

/// The schema version this build reads and writes.
pub const SCHEMA_VERSION: i64 = 1;
const MAGIC: &str = "floe-catalog";

/// One catalogued set and the media it is on.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    /// The media spec (`disk:/backup`).
    pub media: String,
    /// The set as its media committed it.
    pub record: SetRecord,
}

/// An open catalog.
pub struct Catalog {
    conn: Connection,
    path: PathBuf,
}

fn db_err(path: &Path, what: &str, e: rusqlite::Error) -> Error {
    Error::new(ErrorKind::Io, format!("catalog {what} failed"))
        .path(path)
        .source(e)
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
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS sets (
                 set_id TEXT PRIMARY KEY, media TEXT NOT NULL, label TEXT NOT NULL, agent TEXT NOT NULL,
                 image TEXT NOT NULL, frozen_at INTEGER NOT NULL, committed_at INTEGER NOT NULL,
                 record TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS items (
                 set_id TEXT NOT NULL REFERENCES sets(set_id) ON DELETE CASCADE, idx INTEGER NOT NULL,
                 item TEXT NOT NULL, kind TEXT NOT NULL, size INTEGER NOT NULL, blake3 TEXT NOT NULL,
                 config TEXT NOT NULL, remaps INTEGER NOT NULL, captured_after_freeze INTEGER NOT NULL,
                 medium TEXT NOT NULL, locator TEXT NOT NULL, PRIMARY KEY (set_id, idx));",
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
                if v != SCHEMA_VERSION.to_string() {
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
        })
    }

    /// Record a set its media committed (in one transaction; replaces an
    /// earlier record of the same set).
    pub fn record(&mut self, media: &str, set: &SetRecord) -> Result<()> {
        let path = self.path.clone();
        let e = |what: &str| {
            let p = path.clone();
            let w = what.to_string();
            move |err| db_err(&p, &w, err)
        };
        let tx = self.conn.transaction().map_err(e("begin"))?;
        let json = serde_json::to_string(set)
            .map_err(|err| Error::new(ErrorKind::Io, "cannot encode set").source(err))?;
        let h = &set.header;
        tx.execute(
            "DELETE FROM sets WHERE set_id = ?1",
            params![h.set.as_str()],
        )
        .map_err(e("delete"))?;
        tx.execute(
            "INSERT INTO sets VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                h.set.as_str(),
                media,
                h.label,
                h.agent,
                h.image.as_str(),
                sql_int(h.frozen_at)?,
                sql_int(set.committed_at)?,
                json
            ],
        )
        .map_err(e("insert set"))?;
        // One prepared statement for every item (a tree has 70,000).
        let mut insert = tx
            .prepare("INSERT INTO items VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)")
            .map_err(e("prepare item insert"))?;
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
                .map_err(e("insert item"))?;
        }
        drop(insert);
        failpoint("catalog-before-commit");
        tx.commit().map_err(e("commit"))
    }

    fn decode(media: String, json: String) -> Result<Entry> {
        let record = serde_json::from_str(&json).map_err(|e| {
            Error::new(ErrorKind::Io, "malformed set record in the catalog").source(e)
        })?;
        Ok(Entry { media, record })
    }

    /// Every set, oldest first.
    pub fn sets(&self) -> Result<Vec<Entry>> {
        let mut st = self
            .conn
            .prepare("SELECT media, record FROM sets ORDER BY committed_at, set_id")
            .map_err(|e| db_err(&self.path, "query", e))?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(|e| db_err(&self.path, "query", e))?;
        let mut out = Vec::new();
        for row in rows {
            let (m, j) = row.map_err(|e| db_err(&self.path, "query", e))?;
            out.push(Self::decode(m, j)?);
        }
        Ok(out)
    }

    /// One set.
    pub fn set(&self, id: &SetId) -> Result<Entry> {
        let row: Option<(String, String)> = self
            .conn
            .query_row(
                "SELECT media, record FROM sets WHERE set_id = ?1",
                params![id.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| db_err(&self.path, "query", e))?;
        let (m, j) = row.ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("no set {id} in the catalog {}", self.path.display()),
            )
        })?;
        Self::decode(m, j)
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
