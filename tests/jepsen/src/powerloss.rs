//! The power-loss nemesis's disk model (docs/jepsen.md, `powerloss`). A node runs with the
//! `ringkv-powerloss` shim preloaded (`tests/powerloss`), which logs the size of every file it
//! fsyncs and every rename; a power loss is `kill -9` followed by `drop_unsynced`, which cuts
//! every file of the node's data dir back to its last durable size: what was written and
//! never fsynced is lost, as with the page cache gone. A file never fsynced is left empty.
//! Renames, creations and deletions are taken as durable (the journal of a file system such
//! as ext4 commits them within seconds); RocksDB writes its files append-only, so the durable
//! part of a file is a prefix of it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::process::{bin_path, NodeProcess};

/// The environment variable naming a node's sync log (read by the shim).
pub const SYNC_LOG_ENV: &str = "RINGKV_SYNC_LOG";
/// The shim's file name, next to the workspace's binaries.
pub const SHIM: &str = "libringkv_powerloss.so";
/// The sync log's name, in the node's data dir.
pub const LOG_NAME: &str = "ringkv.synclog";
/// Files in a data dir that are not the node's own: its stderr, captured by the harness, and
/// the sync log.
const NOT_THE_NODES: [&str; 2] = ["node.log", LOG_NAME];

pub fn shim_path() -> PathBuf {
    bin_path(SHIM)
}

/// Where a node's sync log lives (in its data dir; never cut).
pub fn log_path(data_dir: &Path) -> PathBuf {
    data_dir.join(LOG_NAME)
}

/// The environment that makes a node log its fsyncs (`LD_PRELOAD` holding the shim, after
/// what `preload` already holds, e.g. libfaketime).
pub fn env(data_dir: &Path, preload: Option<&str>) -> Vec<(String, String)> {
    let shim = shim_path().display().to_string();
    vec![
        (
            "LD_PRELOAD".into(),
            preload.map_or(shim.clone(), |p| format!("{p}:{shim}")),
        ),
        (
            SYNC_LOG_ENV.into(),
            log_path(data_dir).display().to_string(),
        ),
    ]
}

/// Every regular file of the node's under `dir` with its size (paths as the node sees them:
/// canonical).
fn files(dir: &Path) -> Result<Vec<(PathBuf, u64)>, String> {
    let mut out = Vec::new();
    let mut stack =
        vec![std::fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))?;
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file()
                && !NOT_THE_NODES.contains(&entry.file_name().to_string_lossy().as_ref())
            {
                out.push((entry.path(), meta.len()));
            }
        }
    }
    Ok(out)
}

/// Starts a node's log afresh: every file of its data dir is durable as it is now (the node
/// is not running: it stopped cleanly, or a power loss already cut its files).
pub fn baseline(data_dir: &Path, log: &Path) -> Result<(), String> {
    std::fs::create_dir_all(data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
    let text: String = files(data_dir)?
        .into_iter()
        .map(|(p, size)| format!("S\t{size}\t{}\n", p.display()))
        .collect();
    std::fs::write(log, text).map_err(|e| format!("{}: {e}", log.display()))
}

/// Each file's durable size from a sync log: `S` lines set it, `R` lines move it to the new
/// name (a file renamed before it was ever synced has none, and neither has what it
/// replaced).
pub fn durable_sizes(log: &str) -> HashMap<String, u64> {
    let mut sizes = HashMap::new();
    for line in log.lines() {
        let mut f = line.splitn(3, '\t');
        match (f.next(), f.next(), f.next()) {
            (Some("S"), Some(size), Some(path)) => {
                if let Ok(size) = size.parse::<u64>() {
                    sizes.insert(path.to_string(), size);
                }
            }
            (Some("R"), Some(old), Some(new)) => match sizes.remove(old) {
                Some(size) => {
                    sizes.insert(new.to_string(), size);
                }
                None => {
                    sizes.remove(new);
                }
            },
            _ => {}
        }
    }
    sizes
}

/// The power loss itself, on a node already killed: cuts every file of its data dir to its
/// durable size (a file never synced to nothing), then starts its log afresh. Returns the
/// bytes dropped.
pub fn drop_unsynced(data_dir: &Path, log: &Path) -> Result<u64, String> {
    let text = match std::fs::read_to_string(log) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("{}: {e}", log.display())),
    };
    let sizes = durable_sizes(&text);
    let mut dropped = 0;
    for (path, size) in files(data_dir)? {
        let durable = sizes
            .get(path.to_string_lossy().as_ref())
            .copied()
            .unwrap_or(0);
        if size > durable {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(durable))
                .map_err(|e| format!("cut {} to {durable} bytes: {e}", path.display()))?;
            dropped += size - durable;
        }
    }
    baseline(data_dir, log)?;
    Ok(dropped)
}

/// A power loss of a running node: `kill -9`, then its unsynced bytes dropped.
pub fn power_loss(node: &mut NodeProcess) -> Result<u64, String> {
    node.kill9();
    drop_unsynced(&node.data_dir, &log_path(&node.data_dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_sizes_follow_syncs_and_renames() {
        let log = "S\t10\t/d/a\nS\t25\t/d/a\nS\t4\t/d/tmp\nR\t/d/tmp\t/d/CURRENT\nR\t/d/never\t/d/b\nS\t3\t/d/b\nR\t/d/unsynced\t/d/b\nbad line\n";
        let s = durable_sizes(log);
        assert_eq!(s.get("/d/a"), Some(&25));
        assert_eq!(s.get("/d/CURRENT"), Some(&4));
        assert_eq!(s.get("/d/tmp"), None);
        // Replaced by a file never synced: nothing of it is durable.
        assert_eq!(s.get("/d/b"), None);
    }

    #[test]
    fn a_power_loss_cuts_files_to_what_was_synced_and_keeps_the_harness_log() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("n1");
        std::fs::create_dir_all(data.join("db")).unwrap();
        let log = log_path(&data);
        assert_eq!(log, data.join(LOG_NAME));
        std::fs::write(data.join("db/old.sst"), vec![1u8; 100]).unwrap();
        baseline(&data, &log).unwrap();
        // This life: old.sst grows unsynced; a WAL synced at 30 then written to 50; a file
        // never synced; the node's captured stderr.
        std::fs::write(data.join("db/old.sst"), vec![1u8; 120]).unwrap();
        std::fs::write(data.join("db/wal"), vec![2u8; 50]).unwrap();
        std::fs::write(data.join("fresh"), b"abc").unwrap();
        std::fs::write(data.join("node.log"), b"log lines").unwrap();
        let canon = std::fs::canonicalize(&data).unwrap();
        let mut text = std::fs::read_to_string(&log).unwrap();
        text.push_str(&format!("S\t30\t{}\n", canon.join("db/wal").display()));
        std::fs::write(&log, text).unwrap();
        let dropped = drop_unsynced(&data, &log).unwrap();
        assert_eq!(dropped, 20 + 20 + 3);
        let len = |p: &str| std::fs::metadata(data.join(p)).unwrap().len();
        assert_eq!(len("db/old.sst"), 100);
        assert_eq!(len("db/wal"), 30);
        assert_eq!(len("fresh"), 0);
        assert_eq!(len("node.log"), 9);
        // The log starts afresh: a second loss right away drops nothing.
        assert_eq!(drop_unsynced(&data, &log).unwrap(), 0);
    }
}
