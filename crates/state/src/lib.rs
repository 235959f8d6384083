//! The vessel daemon's persistent state: one SQLite database (`state.db`
//! under the state directory) in WAL mode, so a daemon killed at any
//! moment leaves the last committed transaction and nothing half-written.
//! The schema is versioned with SQLite's `user_version`; [`Store::open`]
//! applies the migrations a database lacks, each in its own transaction,
//! and refuses a database newer than this program.
//!
//! What is stored is what must survive the daemon: each instance's name,
//! kind, configuration (JSON, as the API defines it), whether it should be
//! running, and whether it starts with the host. What an instance is doing
//! right now is asked of its supervisor, not stored.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

/// The schema, one migration per version (index 0 takes version 0 to 1).
const MIGRATIONS: &[&str] = &[
    // 1: instances, and a key-value table for the daemon's own facts.
    "CREATE TABLE instances (
        name TEXT PRIMARY KEY NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('container', 'vm')),
        config TEXT NOT NULL,
        running INTEGER NOT NULL DEFAULT 0 CHECK (running IN (0, 1)),
        autostart INTEGER NOT NULL DEFAULT 0 CHECK (autostart IN (0, 1)),
        created_at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE meta (
        key TEXT PRIMARY KEY NOT NULL,
        value TEXT NOT NULL
    ) STRICT;",
];

/// The schema version this program writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database {path}: {error}")]
    Open {
        path: String,
        error: rusqlite::Error,
    },
    #[error("state database {path} has schema version {found}, newer than this vessel's {SCHEMA_VERSION}: upgrade vessel")]
    TooNew { path: String, found: u32 },
    #[error("an instance named {0:?} already exists")]
    Exists(String),
    #[error("no instance named {0:?}")]
    NotFound(String),
    #[error("state database: {0}")]
    Sql(#[from] rusqlite::Error),
}

pub type Result<T> = std::result::Result<T, StateError>;

/// One instance's lasting record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRecord {
    pub name: String,
    /// `container` or `vm`.
    pub kind: String,
    /// The configuration as JSON text (the API's `InstanceConfig`).
    pub config: String,
    /// Whether it should be running: set by start, cleared by stop.
    pub running: bool,
    pub autostart: bool,
    /// Unix seconds.
    pub created_at: i64,
}

/// The open database.
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating if missing) the database at `path` and brings its
    /// schema up to date.
    pub fn open(path: &Path) -> Result<Store> {
        let shown = path.display().to_string();
        let open_err = |error| StateError::Open {
            path: shown.clone(),
            error,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        // WAL: readers never block the writer, and a crash loses at most
        // the transaction in flight. synchronous=FULL: a committed change
        // survives a power cut too (the daemon writes rarely).
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        let mut store = Store { conn };
        store.migrate(&shown)?;
        Ok(store)
    }

    fn migrate(&mut self, shown: &str) -> Result<()> {
        let version: u32 = self
            .conn
            .pragma_query_value(None, "user_version", |row| row.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StateError::TooNew {
                path: shown.to_owned(),
                found: version,
            });
        }
        for (index, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", index as u32 + 1)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<u32> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |row| row.get(0))?)
    }

    /// Adds an instance; [`StateError::Exists`] if the name is taken.
    pub fn insert(&mut self, record: &InstanceRecord) -> Result<()> {
        let result = self.conn.execute(
            "INSERT INTO instances (name, kind, config, running, autostart, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                record.name,
                record.kind,
                record.config,
                record.running,
                record.autostart,
                record.created_at
            ],
        );
        match result {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StateError::Exists(record.name.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn get(&self, name: &str) -> Result<Option<InstanceRecord>> {
        Ok(self
            .conn
            .query_row(
                "SELECT name, kind, config, running, autostart, created_at
                 FROM instances WHERE name = ?1",
                [name],
                row_to_record,
            )
            .optional()?)
    }

    /// Every instance, by name.
    pub fn list(&self) -> Result<Vec<InstanceRecord>> {
        let mut statement = self.conn.prepare(
            "SELECT name, kind, config, running, autostart, created_at
             FROM instances ORDER BY name",
        )?;
        let rows = statement.query_map([], row_to_record)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Records whether `name` should be running.
    pub fn set_running(&mut self, name: &str, running: bool) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE instances SET running = ?2 WHERE name = ?1",
            params![name, running],
        )?;
        if n == 0 {
            return Err(StateError::NotFound(name.to_owned()));
        }
        Ok(())
    }

    pub fn delete(&mut self, name: &str) -> Result<()> {
        let n = self
            .conn
            .execute("DELETE FROM instances WHERE name = ?1", [name])?;
        if n == 0 {
            return Err(StateError::NotFound(name.to_owned()));
        }
        Ok(())
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |row| {
                row.get(0)
            })
            .optional()?)
    }

    pub fn set_meta(&mut self, key: &str, value: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [key, value],
        )?;
        Ok(())
    }
}

fn row_to_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<InstanceRecord> {
    Ok(InstanceRecord {
        name: row.get(0)?,
        kind: row.get(1)?,
        config: row.get(2)?,
        running: row.get(3)?,
        autostart: row.get(4)?,
        created_at: row.get(5)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> InstanceRecord {
        InstanceRecord {
            name: name.into(),
            kind: "container".into(),
            config: r#"{"kind":"container","image":"busybox"}"#.into(),
            running: false,
            autostart: true,
            created_at: 1_700_000_000,
        }
    }

    #[test]
    fn instances_are_kept_across_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let mut store = Store::open(&path).unwrap();
            assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
            store.insert(&record("web")).unwrap();
            store.insert(&record("db")).unwrap();
            assert!(matches!(
                store.insert(&record("web")),
                Err(StateError::Exists(n)) if n == "web"
            ));
            store.set_running("web", true).unwrap();
            store.set_meta("boot_id", "abc").unwrap();
            store.set_meta("boot_id", "def").unwrap();
        }
        let mut store = Store::open(&path).unwrap();
        let all = store.list().unwrap();
        assert_eq!(
            all.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["db", "web"]
        );
        assert!(store.get("web").unwrap().unwrap().running);
        assert_eq!(store.meta("boot_id").unwrap().as_deref(), Some("def"));
        store.delete("db").unwrap();
        assert!(store.get("db").unwrap().is_none());
        assert!(matches!(store.delete("db"), Err(StateError::NotFound(_))));
        assert!(matches!(
            store.set_running("nope", true),
            Err(StateError::NotFound(_))
        ));
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
                .unwrap();
        }
        let e = Store::open(&path).err().expect("refused").to_string();
        assert!(e.contains("newer than this vessel"), "{e}");
    }

    #[test]
    fn a_file_that_is_not_a_database_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        std::fs::write(&path, vec![0x55u8; 8192]).unwrap();
        let e = Store::open(&path).err().expect("refused").to_string();
        assert!(e.contains("state.db"), "{e}");
    }

    #[test]
    fn the_database_is_in_wal_mode() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let mode: String = store
            .conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }
}
