//! Durable storage of the cluster document in redb: a snapshot plus the
//! incremental changes appended since, each write committed before it is
//! acknowledged.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use uc_crdt::ClusterState;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");
const SNAPSHOT_KEY: &str = "snapshot";
const FORMAT_KEY: &str = "format";
const FORMAT: &[u8] = b"uc-state-v1";
/// After this many appended chunks the store rewrites one snapshot.
const COMPACT_AFTER: u64 = 512;

/// Errors of the state store; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "opening state file {path}: {source}; the file was left untouched: move it away to start over, or restore a backup"
    )]
    Open {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "state file {path} is not a uc state file or is damaged ({detail}); the file was left untouched"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error("writing state file {path}: {source}")]
    Write {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The redb-backed store of one agent.
pub struct Store {
    db: Database,
    path: PathBuf,
    next_seq: u64,
    chunks: u64,
    /// Some commits since the last durable one were made without fsync.
    lazy: bool,
}

fn boxed<E: std::error::Error + Send + Sync + 'static>(
    e: E,
) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(e)
}

impl Store {
    /// True when `path` holds a state file (it may still be unreadable).
    pub fn exists(path: &Path) -> bool {
        path.exists()
    }

    /// Creates a new store holding `doc`. Fails if the file already exists.
    pub fn create(path: &Path, doc: &mut ClusterState) -> Result<Store, StoreError> {
        if path.exists() {
            return Err(StoreError::Open {
                path: path.into(),
                source: "a state file already exists there".into(),
            });
        }
        let db = Database::create(path).map_err(|e| StoreError::Open {
            path: path.into(),
            source: boxed(e),
        })?;
        let mut store = Store {
            db,
            path: path.into(),
            next_seq: 0,
            chunks: 0,
            lazy: false,
        };
        store.write_snapshot(doc)?;
        Ok(store)
    }

    /// Opens an existing store and loads the document, with `actor` as this
    /// process's automerge actor.
    pub fn open(path: &Path, actor: [u8; 16]) -> Result<(Store, ClusterState), StoreError> {
        if !path.exists() {
            return Err(StoreError::Open {
                path: path.into(),
                source: "no such file".into(),
            });
        }
        let corrupt = |detail: String| StoreError::Corrupt {
            path: path.into(),
            detail,
        };
        let db = Database::open(path).map_err(|e| match e {
            redb::DatabaseError::Storage(redb::StorageError::Corrupted(d)) => corrupt(d),
            other => StoreError::Open {
                path: path.into(),
                source: boxed(other),
            },
        })?;
        let read = db.begin_read().map_err(|e| corrupt(e.to_string()))?;
        let meta = read
            .open_table(META)
            .map_err(|e| corrupt(format!("no metadata table: {e}")))?;
        let format = meta.get(FORMAT_KEY).map_err(|e| corrupt(e.to_string()))?;
        if format.as_ref().map(|v| v.value()) != Some(FORMAT) {
            return Err(corrupt("unknown format marker".into()));
        }
        let snapshot = meta
            .get(SNAPSHOT_KEY)
            .map_err(|e| corrupt(e.to_string()))?
            .ok_or_else(|| corrupt("no snapshot".into()))?;
        let mut doc = ClusterState::load(snapshot.value(), actor)
            .map_err(|e| corrupt(format!("cluster document does not load: {e}")))?;
        let changes = read
            .open_table(CHANGES)
            .map_err(|e| corrupt(e.to_string()))?;
        let mut next_seq = 0;
        let mut chunks = 0;
        for entry in changes.iter().map_err(|e| corrupt(e.to_string()))? {
            let (k, v) = entry.map_err(|e| corrupt(e.to_string()))?;
            doc.load_incremental(v.value())
                .map_err(|e| corrupt(format!("change {} does not load: {e}", k.value())))?;
            next_seq = k.value() + 1;
            chunks += 1;
        }
        drop((meta, changes, read));
        Ok((
            Store {
                db,
                path: path.into(),
                next_seq,
                chunks,
                lazy: false,
            },
            doc,
        ))
    }

    /// Durably appends the document's changes since the last save (and makes
    /// every earlier `persist_lazily` durable too). Returns once they are
    /// committed to disk; only then may a write be acknowledged.
    pub fn persist(&mut self, doc: &mut ClusterState) -> Result<(), StoreError> {
        self.append(doc, true)
    }

    /// Appends the changes without waiting for the disk: for changes received
    /// from peers, which other machines hold too. They become durable with
    /// the next `persist` or `flush`; a crash before that loses only them,
    /// and they come back with the next sync.
    pub fn persist_lazily(&mut self, doc: &mut ClusterState) -> Result<(), StoreError> {
        self.append(doc, false)
    }

    /// Makes lazily persisted changes durable, if there are any.
    pub fn flush(&mut self, doc: &mut ClusterState) -> Result<(), StoreError> {
        if self.lazy {
            self.append(doc, true)?;
            if self.lazy {
                // Nothing new to append: commit an empty durable transaction,
                // which makes the earlier ones durable.
                let w = self.write_error();
                let txn = self.db.begin_write().map_err(|e| w(&e))?;
                txn.commit().map_err(|e| w(&e))?;
                self.lazy = false;
            }
        }
        Ok(())
    }

    fn append(&mut self, doc: &mut ClusterState, durable: bool) -> Result<(), StoreError> {
        if self.chunks >= COMPACT_AFTER {
            return self.write_snapshot(doc);
        }
        let bytes = doc.save_incremental();
        if bytes.is_empty() {
            return Ok(());
        }
        let w = self.write_error();
        let mut txn = self.db.begin_write().map_err(|e| w(&e))?;
        if !durable {
            txn.set_durability(redb::Durability::None)
                .map_err(|e| w(&e))?;
        }
        {
            let mut t = txn.open_table(CHANGES).map_err(|e| w(&e))?;
            t.insert(self.next_seq, bytes.as_slice())
                .map_err(|e| w(&e))?;
        }
        txn.commit().map_err(|e| w(&e))?;
        self.next_seq += 1;
        self.chunks += 1;
        self.lazy = !durable;
        Ok(())
    }

    /// Rewrites the whole document as one snapshot and drops the appended
    /// changes, in one transaction.
    pub fn write_snapshot(&mut self, doc: &mut ClusterState) -> Result<(), StoreError> {
        let bytes = doc.save();
        let w = self.write_error();
        let txn = self.db.begin_write().map_err(|e| w(&e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| w(&e))?;
            meta.insert(FORMAT_KEY, FORMAT).map_err(|e| w(&e))?;
            meta.insert(SNAPSHOT_KEY, bytes.as_slice())
                .map_err(|e| w(&e))?;
            let mut changes = txn.open_table(CHANGES).map_err(|e| w(&e))?;
            if changes.len().map_err(|e| w(&e))? > 0 {
                changes.retain(|_, _| false).map_err(|e| w(&e))?;
            }
        }
        txn.commit().map_err(|e| w(&e))?;
        self.chunks = 0;
        self.lazy = false;
        Ok(())
    }

    /// Turns a redb error into a `StoreError::Write` naming this file.
    fn write_error(&self) -> impl Fn(&dyn std::fmt::Display) -> StoreError + use<> {
        let path = self.path.clone();
        move |e| StoreError::Write {
            path: path.clone(),
            source: e.to_string().into(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uc_proto::{ServiceId, Subnet};

    fn doc() -> ClusterState {
        let net: Subnet = "10.210.0.0/16".parse().unwrap();
        ClusterState::new_cluster("c1", net, [1; 16], 1000).unwrap()
    }

    fn put(doc: &mut ClusterState, i: u16) {
        let mut bytes = [7u8; 16];
        bytes[..2].copy_from_slice(&i.to_be_bytes());
        let id = ServiceId::from_bytes(bytes);
        doc.put_service(
            id,
            &format!("svc-{i}"),
            serde_json::json!({"i": i}),
            1000 + u64::from(i),
        )
        .unwrap();
    }

    #[test]
    fn reopens_with_every_persisted_change_and_compacts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let mut d = doc();
        let mut store = Store::create(&path, &mut d).unwrap();
        // Past the compaction threshold, so both the snapshot rewrite and
        // the changes appended after it are exercised.
        for i in 0..(COMPACT_AFTER as u16 + 20) {
            put(&mut d, i);
            store.persist(&mut d).unwrap();
        }
        assert!(store.chunks < COMPACT_AFTER, "compaction never ran");
        let want = d.to_json();
        drop(store);
        let (_, mut loaded) = Store::open(&path, [2; 16]).unwrap();
        assert_eq!(loaded.to_json(), want);
        assert_eq!(loaded.heads_digest(), d.heads_digest());
        assert!(
            Store::create(&path, &mut d).is_err(),
            "create must never overwrite"
        );
    }

    #[test]
    fn lazy_changes_become_durable_with_the_next_durable_commit_or_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let mut d = doc();
        let mut store = Store::create(&path, &mut d).unwrap();
        put(&mut d, 1);
        store.persist_lazily(&mut d).unwrap();
        assert!(store.lazy);
        put(&mut d, 2);
        store.persist(&mut d).unwrap();
        assert!(!store.lazy);
        put(&mut d, 3);
        store.persist_lazily(&mut d).unwrap();
        store.flush(&mut d).unwrap();
        assert!(!store.lazy);
        let want = d.to_json();
        drop(store);
        let (_, loaded) = Store::open(&path, [2; 16]).unwrap();
        assert_eq!(loaded.to_json(), want);
        assert_eq!(loaded.services().len(), 3);
    }

    #[test]
    fn corrupt_or_truncated_files_give_an_error_naming_the_file_and_stay_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let mut d = doc();
        let mut store = Store::create(&path, &mut d).unwrap();
        put(&mut d, 1);
        store.persist(&mut d).unwrap();
        drop(store);
        let good = std::fs::read(&path).unwrap();

        // Truncated to half.
        std::fs::write(&path, &good[..good.len() / 2]).unwrap();
        let before = std::fs::read(&path).unwrap();
        let err = Store::open(&path, [3; 16])
            .err()
            .expect("a truncated file must not load")
            .to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "the file must be left untouched"
        );

        // Not a redb file at all.
        std::fs::write(
            &path,
            b"this is not a database, just some text that got here",
        )
        .unwrap();
        let err = Store::open(&path, [3; 16])
            .err()
            .expect("garbage must not load")
            .to_string();
        assert!(err.contains("state.redb"), "{err}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"this is not a database, just some text that got here"
        );
    }

    #[test]
    fn a_valid_redb_file_without_our_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        drop(Database::create(&path).unwrap());
        let err = Store::open(&path, [3; 16]).err().unwrap().to_string();
        assert!(
            err.contains("not a uc state file") && err.contains("state.redb"),
            "{err}"
        );
    }
}
