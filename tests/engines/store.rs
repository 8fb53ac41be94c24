//! The candidates, each used the way a durable queue must use it: one durable transaction per
//! `put`, returning only once the commit is on disk; and the self-checking records.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use sha2::{Digest, Sha256};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Engine {
    Sled,
    Redb,
    Sqlite,
    /// The baseline: a plain file, appended to and fdatasync'd (benchmark only).
    File,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Sled => "sled",
            Engine::Redb => "redb",
            Engine::Sqlite => "sqlite",
            Engine::File => "file",
        }
    }

    /// How the store is opened and committed, for the report.
    pub fn settings(self) -> &'static str {
        match self {
            Engine::Sled => {
                "`sled::open(dir)` (default `Config`: 1 GiB cache, `flush_every_ms` 500 in the \
                 background), the default tree, key = sequence number as 8 big-endian bytes; \
                 a transaction is `insert` (or `apply_batch` for a group) followed by \
                 `Db::flush()`, which returns after sled's fsync"
            }
            Engine::Redb => {
                "`Database::create(dir/queue.redb)` (default `Builder`), a table \
                 `TableDefinition<u64, &[u8]>`; a transaction is `begin_write`, \
                 `set_durability(Durability::Immediate)`, `insert` (8 for a group), `commit()`; \
                 the checker also runs `Database::check_integrity()`"
            }
            Engine::Sqlite => {
                "rusqlite with its bundled SQLite, `dir/queue.db`, `PRAGMA journal_mode=WAL`, \
                 `PRAGMA synchronous=FULL`, `CREATE TABLE q(seq INTEGER PRIMARY KEY, v BLOB NOT \
                 NULL)`; a transaction is one autocommit `INSERT` (`BEGIN IMMEDIATE` .. 8 inserts \
                 .. `COMMIT` for a group), a prepared statement; the checker also runs \
                 `PRAGMA integrity_check`"
            }
            Engine::File => {
                "one file opened for append (created and its directory fsynced before timing); \
                 a transaction is `write_all` of each record then one `fdatasync`"
            }
        }
    }
}

/// A store under test.
pub trait Store {
    /// One durable transaction holding all of `records`; returns once it is durable.
    fn put(&mut self, records: &[(u64, Vec<u8>)]) -> Result<()>;
    /// Every record, in key order.
    fn scan(&mut self, f: &mut dyn FnMut(u64, &[u8])) -> Result<()>;
    /// The engine's own consistency check, where it has one: `Some(problem)` when it failed.
    fn integrity(&mut self) -> Result<Option<String>> {
        Ok(None)
    }
}

pub fn open(engine: Engine, dir: &Path) -> Result<Box<dyn Store>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(match engine {
        Engine::Sled => Box::new(SledStore(
            sled::open(dir).with_context(|| format!("sled::open({})", dir.display()))?,
        )),
        Engine::Redb => Box::new(RedbStore::open(dir)?),
        Engine::Sqlite => Box::new(SqliteStore::open(dir)?),
        Engine::File => Box::new(FileStore::open(dir)?),
    })
}

struct SledStore(sled::Db);

impl Store for SledStore {
    fn put(&mut self, records: &[(u64, Vec<u8>)]) -> Result<()> {
        if let [(k, v)] = records {
            self.0.insert(k.to_be_bytes(), v.as_slice())?;
        } else {
            let mut batch = sled::Batch::default();
            for (k, v) in records {
                batch.insert(&k.to_be_bytes(), v.as_slice());
            }
            self.0.apply_batch(batch)?;
        }
        self.0.flush()?;
        Ok(())
    }

    fn scan(&mut self, f: &mut dyn FnMut(u64, &[u8])) -> Result<()> {
        for item in self.0.iter() {
            let (k, v) = item?;
            let key: [u8; 8] = k
                .as_ref()
                .try_into()
                .with_context(|| format!("a key of {} bytes", k.len()))?;
            f(u64::from_be_bytes(key), &v);
        }
        Ok(())
    }
}

const REDB_TABLE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("queue");

struct RedbStore(redb::Database);

impl RedbStore {
    fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("queue.redb");
        let db = redb::Database::create(&path)
            .with_context(|| format!("redb::Database::create({})", path.display()))?;
        Ok(RedbStore(db))
    }
}

impl Store for RedbStore {
    fn put(&mut self, records: &[(u64, Vec<u8>)]) -> Result<()> {
        let mut tx = self.0.begin_write()?;
        tx.set_durability(redb::Durability::Immediate)?;
        {
            let mut table = tx.open_table(REDB_TABLE)?;
            for (k, v) in records {
                table.insert(*k, v.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn scan(&mut self, f: &mut dyn FnMut(u64, &[u8])) -> Result<()> {
        use redb::{ReadableDatabase, ReadableTable};
        let tx = self.0.begin_read()?;
        let table = match tx.open_table(REDB_TABLE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        for item in table.iter()? {
            let (k, v) = item?;
            f(k.value(), v.value());
        }
        Ok(())
    }

    fn integrity(&mut self) -> Result<Option<String>> {
        Ok(match self.0.check_integrity()? {
            true => None,
            false => Some("redb check_integrity found damage (and repaired it)".into()),
        })
    }
}

struct SqliteStore(rusqlite::Connection);

impl SqliteStore {
    fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("queue.db");
        let c = rusqlite::Connection::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let mode: String = c.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            bail!("journal_mode is {mode}, not wal");
        }
        c.pragma_update(None, "synchronous", "FULL")?;
        c.execute_batch("CREATE TABLE IF NOT EXISTS q(seq INTEGER PRIMARY KEY, v BLOB NOT NULL)")?;
        Ok(SqliteStore(c))
    }
}

impl Store for SqliteStore {
    fn put(&mut self, records: &[(u64, Vec<u8>)]) -> Result<()> {
        let insert = "INSERT INTO q(seq, v) VALUES (?1, ?2)";
        if let [(k, v)] = records {
            self.0
                .prepare_cached(insert)?
                .execute(rusqlite::params![i64::try_from(*k)?, v])?;
        } else {
            let tx = self
                .0
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            {
                let mut stmt = tx.prepare_cached(insert)?;
                for (k, v) in records {
                    stmt.execute(rusqlite::params![i64::try_from(*k)?, v])?;
                }
            }
            tx.commit()?;
        }
        Ok(())
    }

    fn scan(&mut self, f: &mut dyn FnMut(u64, &[u8])) -> Result<()> {
        let mut stmt = self.0.prepare("SELECT seq, v FROM q ORDER BY seq")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let k: i64 = row.get(0)?;
            let v = row.get_ref(1)?.as_blob()?;
            f(u64::try_from(k)?, v);
        }
        Ok(())
    }

    fn integrity(&mut self) -> Result<Option<String>> {
        let mut stmt = self.0.prepare("PRAGMA integrity_check")?;
        let lines: Vec<String> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok((lines != ["ok"]).then(|| format!("integrity_check: {}", lines.join("; "))))
    }
}

struct FileStore(File);

impl FileStore {
    fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("queue.log");
        let f = OpenOptions::new().create(true).append(true).open(&path)?;
        f.sync_all()?;
        File::open(dir)?.sync_all()?;
        Ok(FileStore(f))
    }
}

impl Store for FileStore {
    fn put(&mut self, records: &[(u64, Vec<u8>)]) -> Result<()> {
        for (_, v) in records {
            self.0.write_all(v)?;
        }
        self.0.sync_data()?;
        Ok(())
    }

    fn scan(&mut self, _: &mut dyn FnMut(u64, &[u8])) -> Result<()> {
        bail!("the file baseline is for the benchmark only")
    }
}

/// SplitMix64: small, seeded, good enough for sizes, payloads and timings.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

const MAGIC: &[u8; 4] = b"EQR1";
const HEADER: usize = 4 + 8 + 4;
const DIGEST: usize = 32;
pub const MIN_RECORD: usize = 2 * 1024;
pub const MAX_RECORD: usize = 100 * 1024;

/// The record for `seq` in a power-cut run: 2 KB to 100 KB, seeded.
pub fn record(seed: u64, seq: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed ^ seq.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    let len = rng.range(MIN_RECORD as u64, MAX_RECORD as u64) as usize;
    record_of_len(&mut rng, seq, len)
}

/// A self-checking record of exactly `len` bytes: magic, its key, its payload length, seeded
/// bytes, and SHA-256 of all that.
pub fn record_of_len(rng: &mut Rng, seq: u64, len: usize) -> Vec<u8> {
    let payload = len.saturating_sub(HEADER + DIGEST);
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend_from_slice(&(payload as u32).to_le_bytes());
    while v.len() < HEADER + payload {
        let word = rng.next_u64().to_le_bytes();
        let n = (HEADER + payload - v.len()).min(8);
        v.extend_from_slice(&word[..n]);
    }
    let digest = Sha256::digest(&v);
    v.extend_from_slice(&digest);
    v
}

/// Checks a stored record against its key; the reason when it is not intact.
pub fn validate(key: u64, v: &[u8]) -> std::result::Result<(), String> {
    if v.len() < HEADER + DIGEST {
        return Err(format!("{} bytes, shorter than a record", v.len()));
    }
    if &v[..4] != MAGIC {
        return Err("bad magic".into());
    }
    let seq = u64::from_le_bytes(v[4..12].try_into().map_err(|_| "header")?);
    if seq != key {
        return Err(format!("holds record {seq}"));
    }
    let payload = u32::from_le_bytes(v[12..16].try_into().map_err(|_| "header")?) as usize;
    if v.len() != HEADER + payload + DIGEST {
        return Err(format!(
            "{} bytes, the header says {}",
            v.len(),
            HEADER + payload + DIGEST
        ));
    }
    let (body, digest) = v.split_at(HEADER + payload);
    if Sha256::digest(body).as_slice() != digest {
        return Err("SHA-256 mismatch".into());
    }
    Ok(())
}
