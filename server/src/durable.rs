//! Small files a node keeps beside its database (the layout, the saved ring, its generation,
//! the transfer checkpoint), written so that a crash or a power loss leaves the old content or
//! the new, never an empty or partial file: a temp file is written and fsynced, renamed over
//! the old one, and the directory fsynced (without the fsyncs a power loss can leave the
//! renamed file empty: found by the Jepsen `powerloss` nemesis, where every node of a cluster
//! that lost power at once came back with an empty layout and none served again).

use std::io::Write;
use std::path::Path;

/// Replaces `path` with `bytes` durably (see the module doc). The temp file is
/// `.<name>.tmp` in the same directory.
///
/// Its fsyncs block (milliseconds, seconds on a saturated disk). Called from a task of a
/// multi-threaded runtime (the membership worker saving the ring or the layout, a voter saving
/// its grant), the write runs under `block_in_place`: the tasks queued on that worker thread
/// move to another instead of waiting for the disk. Elsewhere (a current-thread runtime, as in
/// unit tests; a blocking-pool thread; no runtime) it runs as it is.
pub fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| write_file_now(path, bytes))
        }
        _ => write_file_now(path, bytes),
    }
}

fn write_file_now(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map_or("file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_replaced_whole_and_no_temp_file_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layout.json");
        write_file(&path, b"first").unwrap();
        write_file(&path, b"second, longer").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second, longer");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["layout.json".to_string()]);
        let err = write_file(&dir.path().join("missing/x"), b"x").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    }

    /// From a task of either runtime flavor, and from a blocking-pool thread: `block_in_place`
    /// would panic on a current-thread runtime, and the node's runtime is multi-threaded.
    #[test]
    fn a_file_is_written_from_a_task_of_either_runtime_flavor() {
        let dir = tempfile::tempdir().unwrap();
        let current = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        for (name, rt) in [("current", &current), ("multi", &multi)] {
            let path = dir.path().join(format!("{name}.json"));
            let in_task = path.clone();
            rt.block_on(async move {
                tokio::spawn(async move { write_file(&in_task, b"from a task") })
                    .await
                    .unwrap()
            })
            .unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), b"from a task");
            let in_pool = path.clone();
            rt.block_on(rt.spawn_blocking(move || write_file(&in_pool, b"from the pool")))
                .unwrap()
                .unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), b"from the pool");
        }
    }
}
