//! A small tmpfs standing in for a node's disk, so tests and the `disk` nemesis can fill it:
//! a full disk through the real binary. Mounting needs root.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Name of the file that takes up the free space of a filled disk.
pub const BALLAST: &str = "ballast.fill";

/// A tmpfs mounted over a directory; unmounted on drop.
#[derive(Debug)]
pub struct SmallDisk {
    dir: PathBuf,
}

/// True when this process can mount filesystems (root).
pub fn can_mount() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl SmallDisk {
    /// Mounts a `size_mb` MiB tmpfs on `dir` (created). `None` when not root; a failed mount
    /// as root is an error.
    pub fn mount(dir: &Path, size_mb: u32) -> Result<Option<SmallDisk>, String> {
        if !can_mount() {
            return Ok(None);
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mb}m"),
                "ringkv-test",
            ])
            .arg(dir)
            .status()
            .map_err(|e| format!("run mount: {e}"))?;
        if !status.success() {
            return Err(format!(
                "mount a {size_mb} MiB tmpfs on {}: {status}",
                dir.display()
            ));
        }
        Ok(Some(SmallDisk {
            dir: dir.to_path_buf(),
        }))
    }

    /// Fills the disk: a ballast file takes every free byte. Returns the bytes written.
    pub fn fill(&self) -> Result<u64, String> {
        fill(&self.dir)
    }

    /// Frees what `fill` took.
    pub fn free(&self) -> Result<(), String> {
        free(&self.dir)
    }
}

/// Writes a ballast file in `dir` until its filesystem is full (ENOSPC).
pub fn fill(dir: &Path) -> Result<u64, String> {
    let path = dir.join(BALLAST);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    let mut size = chunk.len();
    // Shrink the chunk at the end so even the last partial page is taken.
    while size > 0 {
        match f.write(&chunk[..size]) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => size /= 2,
            Err(e) => return Err(format!("fill {}: {e}", path.display())),
        }
    }
    let _ = f.sync_all();
    Ok(written)
}

/// Removes the ballast file of `dir`, if any.
pub fn free(dir: &Path) -> Result<(), String> {
    match std::fs::remove_file(dir.join(BALLAST)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("free {}: {e}", dir.display())),
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}
