//! The RocksDB engine. This is the only file that imports `rocksdb`
//! (see shared/notes/rocksdb.md for the choices: one DB, fixed column families, shared block
//! cache, bloom filters, WAL always on).

use std::path::{Path, PathBuf};

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, ErrorKind, Options, ReadOptions, ReadTier,
    SliceTransform, WriteBatch, WriteOptions, DB,
};

use super::{
    key_after, Batch, BatchOp, Cached, Cf, Engine, ScanBatch, ScanRange, StorageError,
    MAX_SCAN_BATCH,
};

/// Engine tuning, from the node config.
#[derive(Debug, Clone)]
pub struct RocksConfig {
    /// One block cache shared by every column family.
    pub block_cache_bytes: usize,
    /// Memtable size of the data CF; small CFs get a quarter.
    pub write_buffer_bytes: usize,
}

impl Default for RocksConfig {
    fn default() -> Self {
        RocksConfig {
            block_cache_bytes: 256 << 20,
            write_buffer_bytes: 64 << 20,
        }
    }
}

pub struct RocksEngine {
    db: DB,
    /// The stale-incarnation mark: a file of its own in the db dir (RocksDB ignores names it
    /// does not know), written with plain file I/O.
    stale_mark: PathBuf,
}

/// The file name of the stale-incarnation mark in the db dir.
pub const STALE_INCARNATION_FILE: &str = "RINGKV_STALE_INCARNATION";

fn map_err(op: &'static str, e: rocksdb::Error) -> StorageError {
    let cause = e.to_string();
    if e.kind() == ErrorKind::IOError && (cause.contains("No space") || cause.contains("ENOSPC")) {
        StorageError::NoSpace { op, cause }
    } else {
        StorageError::Io { op, cause }
    }
}

impl RocksEngine {
    pub fn open(path: &Path, cfg: &RocksConfig) -> Result<RocksEngine, StorageError> {
        let open_err = |e: rocksdb::Error| StorageError::Open {
            dir: path.display().to_string(),
            cause: e.to_string(),
        };
        let cache = Cache::new_lru_cache(cfg.block_cache_bytes);
        // Every mutation comes from the store's one writer thread, so RocksDB's concurrent
        // memtable inserts buy nothing; turning them off allows in-place updates below.
        let mut db_opts = Options::default();
        db_opts.set_allow_concurrent_memtable_write(false);
        let cf_options = |write_buffer: usize| {
            let mut block = BlockBasedOptions::default();
            block.set_block_cache(&cache);
            block.set_bloom_filter(10.0, false);
            let mut o = Options::default();
            o.set_block_based_table_factory(&block);
            o.set_write_buffer_size(write_buffer);
            o
        };
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.increase_parallelism(2);
        db_opts.set_bytes_per_sync(1 << 20);
        db_opts.set_keep_log_file_num(5);
        db_opts.set_max_log_file_size(16 << 20);
        // A WAL file lives until every column family with data in it has flushed; a rarely
        // written one (`meta`) would hold them all up to this budget. Four data memtables
        // (256 MiB at the default 64 MiB): beyond it RocksDB flushes the column families
        // holding the oldest file. A fixed 256 MiB filled a 64 MiB disk whatever the
        // memtable size (found by the Jepsen full profile).
        db_opts.set_max_total_wal_size(wal_budget(cfg.write_buffer_bytes));
        let small = (cfg.write_buffer_bytes / 4).max(1 << 20);
        let mut descriptors = vec![ColumnFamilyDescriptor::new("default", cf_options(small))];
        for cf in Cf::ALL {
            let wb = if cf == Cf::Data {
                cfg.write_buffer_bytes
            } else {
                small
            };
            let mut o = cf_options(wb);
            if cf == Cf::Data {
                // Data keys start with the key's 8-byte ring position: the prefix extractor
                // gives SST files position-prefix filters. The memtable is RocksDB's default
                // skiplist, not the hash memtable it was until anti-entropy: digest scans over
                // ring ranges (anti-entropy, transfers) need a total-order iterator, which a
                // hash memtable builds by sorting every entry it holds, per scan (a third of
                // foreground throughput with exchanges every second; docs/benchmarks.md). The
                // hash memtable's gain on point reads was within noise (same document).
                o.set_prefix_extractor(SliceTransform::create_fixed_prefix(8));
                // The writer rewrites a hot key's whole state on every update, usually at the
                // same size: updating the memtable entry in place (when the new value is not
                // larger) keeps one entry per key instead of one per version, so lookups and
                // inserts stay short and memtables fill (and flush) slower. Single node,
                // workload A: +4..10% ops/s, -7..11% CPU/op, p99 -20% (docs/benchmarks.md).
                // Costs nothing here: no snapshots, one writer; a range scan may see a state
                // being rewritten (digest scans tolerate it: `Store::scan_digests`).
                o.set_inplace_update_support(true);
            }
            if cf == Cf::Aae {
                // Tree leaves are rewritten on every write of a key in them, always 8 bytes:
                // in place, a leaf keeps one memtable entry instead of one per write, so the
                // column family flushes (and compacts) a fraction as often.
                o.set_inplace_update_support(true);
            }
            descriptors.push(ColumnFamilyDescriptor::new(cf.name(), o));
        }
        let db = DB::open_cf_descriptors(&db_opts, path, descriptors).map_err(open_err)?;
        Ok(RocksEngine {
            db,
            stale_mark: path.join(STALE_INCARNATION_FILE),
        })
    }

    fn cf(&self, cf: Cf) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(cf.name())
            .expect("every column family is created at open")
    }
}

impl Engine for RocksEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.db
            .get_pinned_cf(self.cf(cf), key)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|e| map_err("get", e))
    }

    fn get_cached(&self, cf: Cf, key: &[u8]) -> Result<Cached, StorageError> {
        // RocksDB's non-blocking read: with the block-cache tier it answers from memtables and
        // cached blocks, or returns `Incomplete` where it would have read a file.
        let mut ro = ReadOptions::default();
        ro.set_read_tier(ReadTier::BlockCache);
        match self.db.get_pinned_cf_opt(self.cf(cf), key, &ro) {
            Ok(v) => Ok(Cached::Hit(v.map(|v| v.to_vec()))),
            Err(e) if e.kind() == ErrorKind::Incomplete => Ok(Cached::Miss),
            Err(e) => Err(map_err("get", e)),
        }
    }

    fn write(&self, batch: Batch, sync: bool) -> Result<(), StorageError> {
        let mut wb = WriteBatch::default();
        for op in &batch.ops {
            match op {
                BatchOp::Put(cf, k, v) => wb.put_cf(self.cf(*cf), k, v),
                BatchOp::Delete(cf, k) => wb.delete_cf(self.cf(*cf), k),
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(wb, &wo).map_err(|e| map_err("write", e))
    }

    fn sync_wal(&self) -> Result<(), StorageError> {
        self.db.flush_wal(true).map_err(|e| map_err("sync_wal", e))
    }

    fn flush_memtables(&self) -> Result<(), StorageError> {
        let mut fo = rocksdb::FlushOptions::default();
        fo.set_wait(true);
        let cfs: Vec<_> = Cf::ALL.iter().map(|cf| self.cf(*cf)).collect();
        self.db
            .flush_cfs_opt(&cfs, &fo)
            .map_err(|e| map_err("flush", e))
    }

    fn scan(&self, cf: Cf, range: &ScanRange, limit: usize) -> Result<ScanBatch, StorageError> {
        let limit = limit.clamp(1, MAX_SCAN_BATCH);
        let mut ro = ReadOptions::default();
        // The data column family has a prefix extractor (its hash memtable): without total
        // order seek an iterator would stay inside the first key's prefix. Total order over a
        // hash memtable merges its buckets when the iterator is created (docs/architecture.md
        // "Range scans"), which is why a batch is bounded and the caller keeps a cursor.
        ro.set_total_order_seek(true);
        ro.fill_cache(false);
        ro.set_iterate_lower_bound(range.start.clone());
        if let Some(end) = &range.end {
            ro.set_iterate_upper_bound(end.clone());
        }
        let mut it = self.db.raw_iterator_cf_opt(self.cf(cf), ro);
        it.seek(&range.start);
        let mut entries = Vec::with_capacity(limit.min(1024));
        while it.valid() {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            if entries.len() == limit {
                let last: &(Vec<u8>, Vec<u8>) = entries.last().expect("limit >= 1");
                return Ok(ScanBatch {
                    resume: Some(key_after(&last.0)),
                    entries,
                });
            }
            entries.push((k.to_vec(), v.to_vec()));
            it.next();
        }
        it.status().map_err(|e| map_err("scan", e))?;
        Ok(ScanBatch {
            entries,
            resume: None,
        })
    }

    fn property(&self, cf: Cf, name: &str) -> Option<u64> {
        self.db
            .property_int_value_cf(self.cf(cf), name)
            .ok()
            .flatten()
    }

    fn property_text(&self, cf: Cf, name: &str) -> Option<String> {
        self.db.property_value_cf(self.cf(cf), name).ok().flatten()
    }

    fn mark_stale_incarnation(&self) -> Result<(), StorageError> {
        let io = |e: std::io::Error| StorageError::Io {
            op: "mark_stale_incarnation",
            cause: format!("{}: {e}", self.stale_mark.display()),
        };
        std::fs::File::create(&self.stale_mark)
            .and_then(|f| f.sync_all())
            .map_err(io)?;
        self.sync_dir().map_err(io)
    }

    fn stale_incarnation(&self) -> bool {
        self.stale_mark.exists()
    }

    fn clear_stale_incarnation(&self) -> Result<(), StorageError> {
        let io = |e: std::io::Error| StorageError::Io {
            op: "clear_stale_incarnation",
            cause: format!("{}: {e}", self.stale_mark.display()),
        };
        match std::fs::remove_file(&self.stale_mark) {
            Ok(()) => self.sync_dir().map_err(io),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(e)),
        }
    }
}

/// The write-ahead log's budget for a data memtable of `write_buffer` bytes: four of them.
pub fn wal_budget(write_buffer: usize) -> u64 {
    4 * write_buffer as u64
}

impl RocksEngine {
    /// Makes the db dir's entries (a created or removed mark) durable.
    fn sync_dir(&self) -> std::io::Result<()> {
        std::fs::File::open(self.db.path())?.sync_all()
    }
}

/// The count `field` of RocksDB's write-stall statistics text (`rocksdb.cf-write-stall-stats`:
/// "Write Stall (count): l0-file-count-limit-delays: 0, ..., total-delays: 3, total-stops: 0").
pub fn stall_count(text: &str, field: &str) -> Option<u64> {
    text.split([',', '\n'])
        .filter_map(|part| part.rsplit_once(':'))
        .find(|(name, _)| name.trim().rsplit(' ').next() == Some(field))
        .and_then(|(_, n)| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::data_key;

    /// Over the hash memtable (total-order seek) and SST files alike.
    #[test]
    fn range_scans_follow_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        let e = RocksEngine::open(dir.path(), &RocksConfig::default()).unwrap();
        super::super::check_scan_contract(&e, &|| {
            e.db.flush_cf(e.cf(Cf::Data)).unwrap();
        });
    }

    /// The stale-incarnation mark survives a reopen (RocksDB leaves a file it does not know
    /// in its dir alone, flushes and compactions included) until it is cleared.
    #[test]
    fn the_stale_incarnation_mark_survives_a_reopen_until_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let e = RocksEngine::open(dir.path(), &RocksConfig::default()).unwrap();
        assert!(!e.stale_incarnation());
        e.mark_stale_incarnation().unwrap();
        put(&e, b"k", b"v");
        e.db.flush_cf(e.cf(Cf::Data)).unwrap();
        e.db.compact_range_cf(e.cf(Cf::Data), None::<&[u8]>, None::<&[u8]>);
        drop(e);
        let e = RocksEngine::open(dir.path(), &RocksConfig::default()).unwrap();
        assert!(e.stale_incarnation());
        e.clear_stale_incarnation().unwrap();
        e.clear_stale_incarnation().unwrap();
        drop(e);
        let e = RocksEngine::open(dir.path(), &RocksConfig::default()).unwrap();
        assert!(!e.stale_incarnation());
    }

    fn put(e: &RocksEngine, k: &[u8], v: &[u8]) {
        let mut b = Batch::default();
        b.put(Cf::Data, k.to_vec(), v.to_vec());
        e.write(b, false).expect("write");
    }

    #[test]
    fn write_stall_counts_parse_from_rocksdb_and_from_its_documented_text() {
        let text =
            "Write Stall (count): cf-l0-file-count-limit-delays-with-ongoing-compaction: 4, \
                    l0-file-count-limit-delays: 1, memtable-limit-stops: 2, total-delays: 3, \
                    total-stops: 7";
        assert_eq!(stall_count(text, "total-delays"), Some(3));
        assert_eq!(stall_count(text, "total-stops"), Some(7));
        assert_eq!(stall_count(text, "l0-file-count-limit-delays"), Some(1));
        assert_eq!(stall_count(text, "missing"), None);
        // The RocksDB this node is built with still reports both totals for every column
        // family (a format change would silently drop the `rocksdb_write_stalls` series).
        let dir = tempfile::tempdir().unwrap();
        let e = RocksEngine::open(dir.path(), &RocksConfig::default()).unwrap();
        for cf in Cf::ALL {
            let text = e
                .property_text(cf, "rocksdb.cf-write-stall-stats")
                .unwrap_or_else(|| panic!("no write-stall stats for {}", cf.name()));
            assert_eq!(stall_count(&text, "total-delays"), Some(0), "{text}");
            assert_eq!(stall_count(&text, "total-stops"), Some(0), "{text}");
        }
    }

    #[test]
    fn in_place_memtable_updates_keep_the_latest_value_across_sizes_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = RocksConfig::default();
        let e = RocksEngine::open(dir.path(), &cfg).unwrap();
        let read = |e: &RocksEngine, k: &[u8]| e.get(Cf::Data, k).unwrap();
        // Data keys as the store writes them: ring position prefix + key.
        let (hot, other) = (data_key(b"hot"), data_key(b"other"));
        // Same size (updated in place), smaller (in place), larger (a new entry), same again.
        for v in [
            &b"value-01"[..],
            b"value-02",
            b"v3",
            b"a longer value 4",
            b"value-05",
        ] {
            put(&e, &hot, v);
            put(&e, &other, v);
            assert_eq!(read(&e, &hot).as_deref(), Some(v));
            let cached = e.get_cached(Cf::Data, &hot).unwrap();
            assert!(matches!(cached, Cached::Hit(Some(ref x)) if x == v));
        }
        // 10 puts, but only the first and the one that grew added memtable entries per key.
        let entries = e.property(Cf::Data, "rocksdb.num-entries-active-mem-table");
        assert_eq!(entries, Some(4), "updates were applied in place");
        drop(e);
        // The WAL replays every version in order: the latest wins.
        let e = RocksEngine::open(dir.path(), &cfg).unwrap();
        assert_eq!(read(&e, &hot).as_deref(), Some(&b"value-05"[..]));
        assert_eq!(read(&e, &other).as_deref(), Some(&b"value-05"[..]));
    }
}
