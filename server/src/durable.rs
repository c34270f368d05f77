//! Small files a node keeps beside its database (the layout, the saved ring, its generation,
//! the transfer checkpoint), written so that a crash or a power loss leaves the old content or
//! the new, never an empty or partial file: a temp file is written and fsynced, renamed over
//! the old one, and the directory fsynced (without the fsyncs a power loss can leave the
//! renamed file empty: found by the Jepsen `powerloss` nemesis, where every node of a cluster
//! that lost power at once came back with an empty layout and none served again).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

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

/// Writes one file's newest content on a thread of its own, durably (as [`write_file`]), for a
/// caller that must not wait for the disk: content submitted while a write runs replaces any
/// not written yet, so a burst of changes costs one or two writes. Dropped, it writes what is
/// pending, then its thread ends.
///
/// The membership worker saves the ring with it (found in review: two fsyncs on the gossip
/// task at about every member's metadata change of a ring change, and an fsync stalled past
/// ~2.5 s on a busy disk would stop this node's heartbeats, so peers could take it out of
/// routing). The saved ring is best effort (a restarted node learns the ring from its peers);
/// the layout, whose save must come before this node acts on it, is still written in line.
pub struct BackgroundFile {
    shared: Arc<(Mutex<Slot>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Slot {
    pending: Option<Vec<u8>>,
    writing: bool,
    closed: bool,
}

type WriteFn = Box<dyn FnMut(&[u8]) + Send>;

impl BackgroundFile {
    /// Writes `path` with [`write_file`]'s durability; `on_error` is called (on the writer's
    /// thread) with each failed write's error.
    pub fn new(
        path: PathBuf,
        mut on_error: impl FnMut(&Path, &std::io::Error) + Send + 'static,
    ) -> std::io::Result<Self> {
        Self::with_writer(Box::new(move |bytes: &[u8]| {
            if let Err(e) = write_file_now(&path, bytes) {
                on_error(&path, &e);
            }
        }))
    }

    fn with_writer(mut write: WriteFn) -> std::io::Result<Self> {
        let shared = Arc::new((Mutex::new(Slot::default()), Condvar::new()));
        let theirs = shared.clone();
        let thread = std::thread::Builder::new()
            .name("file-writer".into())
            .spawn(move || {
                let (slot, cond) = &*theirs;
                let mut s = slot.lock().expect("file writer lock poisoned");
                loop {
                    if let Some(bytes) = s.pending.take() {
                        s.writing = true;
                        drop(s);
                        write(&bytes);
                        s = slot.lock().expect("file writer lock poisoned");
                        s.writing = false;
                        cond.notify_all();
                    } else if s.closed {
                        return;
                    } else {
                        s = cond.wait(s).expect("file writer lock poisoned");
                    }
                }
            })?;
        Ok(BackgroundFile {
            shared,
            thread: Some(thread),
        })
    }

    /// Queues `bytes` as the file's next content (replacing any not written yet) and returns
    /// at once.
    pub fn submit(&self, bytes: Vec<u8>) {
        let (slot, cond) = &*self.shared;
        slot.lock().expect("file writer lock poisoned").pending = Some(bytes);
        cond.notify_all();
    }

    /// Waits until everything submitted so far is written (or failed).
    pub fn flush(&self) {
        let (slot, cond) = &*self.shared;
        let mut s = slot.lock().expect("file writer lock poisoned");
        while s.pending.is_some() || s.writing {
            s = cond.wait(s).expect("file writer lock poisoned");
        }
    }
}

impl Drop for BackgroundFile {
    fn drop(&mut self) {
        {
            let (slot, cond) = &*self.shared;
            slot.lock().expect("file writer lock poisoned").closed = true;
            cond.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Submitting never waits for a write in progress, a burst submitted meanwhile costs one
    /// more write (its newest content), and what is pending when the writer is dropped is
    /// still written.
    #[test]
    fn a_background_file_takes_the_newest_content_without_waiting_for_the_disk() {
        let written = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let log = written.clone();
        let w = BackgroundFile::with_writer(Box::new(move |b: &[u8]| {
            let _ = started_tx.send(());
            // The first write stalls (a slow fsync) until released.
            let _ = gate.recv();
            log.lock().unwrap().push(b.to_vec());
        }))
        .unwrap();
        w.submit(b"first".to_vec());
        started.recv().unwrap();
        // The disk is stalled: these return at once (this thread would hang otherwise).
        w.submit(b"second".to_vec());
        w.submit(b"third".to_vec());
        release.send(()).unwrap();
        release.send(()).unwrap();
        w.flush();
        assert_eq!(
            *written.lock().unwrap(),
            vec![b"first".to_vec(), b"third".to_vec()]
        );
        w.submit(b"last".to_vec());
        release.send(()).unwrap();
        drop(w);
        assert_eq!(written.lock().unwrap().last().unwrap(), b"last");

        // Through the real writer: the file holds the newest content, and no temp file is left.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ring");
        let errors = Arc::new(Mutex::new(0));
        let seen = errors.clone();
        let failures = errors.clone();
        let w = BackgroundFile::new(path.clone(), move |_, _| *seen.lock().unwrap() += 1).unwrap();
        for i in 0..50 {
            w.submit(format!("v{i}").into_bytes());
        }
        w.flush();
        assert_eq!(std::fs::read(&path).unwrap(), b"v49");
        let bad = BackgroundFile::new(dir.path().join("missing/x"), move |_, _| {
            *errors.lock().unwrap() += 1
        })
        .unwrap();
        bad.submit(b"x".to_vec());
        drop(bad);
        drop(w);
        assert_eq!(*failures.lock().unwrap(), 1, "a failed write is reported");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

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
