//! `LD_PRELOAD` shim for the Jepsen harness's power-loss nemesis (docs/jepsen.md).
//!
//! A node started with this library preloaded and `RINGKV_SYNC_LOG=<file>` appends one line to
//! that file for every successful `fsync`/`fdatasync` of a regular file (`S\t<size>\t<path>`:
//! the file's size when the sync began, all of which it made durable) and for every successful rename
//! (`R\t<old>\t<new>`, absolute paths). After a `kill -9`, the harness
//! (`ringkv_jepsen::powerloss::drop_unsynced`) cuts every file of the node's data dir back to
//! its last durable size, as a power loss would leave it with the page cache gone: what was
//! written and never fsynced is lost. RocksDB writes its files append-only, so a file's
//! durable content is a prefix of it.
//!
//! Only the calls are intercepted; each is passed on to the real one (`dlsym(RTLD_NEXT)`) and
//! logged only when it succeeded. Nothing here runs unless the node was started with it.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

type SyncFn = unsafe extern "C" fn(c_int) -> c_int;
type RenameFn = unsafe extern "C" fn(*const c_char, *const c_char) -> c_int;
type RenameAtFn = unsafe extern "C" fn(c_int, *const c_char, c_int, *const c_char) -> c_int;

/// The next definition of `name` after this library (libc's), or none.
fn next(name: &CStr) -> *mut c_void {
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name.
    unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) }
}

macro_rules! real {
    ($name:literal, $ty:ty) => {{
        static F: OnceLock<usize> = OnceLock::new();
        let p = *F.get_or_init(|| next($name) as usize);
        assert!(p != 0, "the real {:?} is not found", $name);
        // SAFETY: the symbol is libc's function of that name, whose type is `$ty`.
        unsafe { std::mem::transmute::<usize, $ty>(p) }
    }};
}

/// The log's file descriptor (opened once, append-only), or -1 without `RINGKV_SYNC_LOG`.
fn log_fd() -> c_int {
    static FD: OnceLock<c_int> = OnceLock::new();
    *FD.get_or_init(|| match std::env::var_os("RINGKV_SYNC_LOG") {
        Some(path) => {
            use std::os::unix::ffi::OsStrExt;
            let Ok(c) = std::ffi::CString::new(path.as_bytes()) else {
                return -1;
            };
            // SAFETY: open(2) with a NUL-terminated path.
            unsafe {
                libc::open(
                    c.as_ptr(),
                    libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_CLOEXEC,
                    0o644,
                )
            }
        }
        None => -1,
    })
}

/// Appends one line with a single write(2) (O_APPEND: lines from threads do not interleave).
fn log_line(line: &str) {
    let fd = log_fd();
    if fd >= 0 {
        // SAFETY: write(2) from a live buffer of that length.
        unsafe {
            libc::write(fd, line.as_ptr().cast(), line.len());
        }
    }
}

/// The path an open file descriptor refers to.
fn fd_path(fd: c_int) -> Option<String> {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// The canonical path of `path` as the process sees it, relative to `dirfd` (or the working
/// directory for `AT_FDCWD`): its directory resolved (symlinks, `..`) plus its name, the form
/// `/proc/self/fd` gives for the `S` lines. The directory must exist (it does after a rename).
fn absolute(dirfd: c_int, path: *const c_char) -> Option<String> {
    if path.is_null() {
        return None;
    }
    // SAFETY: a NUL-terminated string from the caller of rename(2).
    let p = unsafe { CStr::from_ptr(path) }
        .to_string_lossy()
        .into_owned();
    let joined = if p.starts_with('/') {
        std::path::PathBuf::from(p)
    } else if dirfd == libc::AT_FDCWD {
        std::env::current_dir().ok()?.join(p)
    } else {
        std::path::PathBuf::from(fd_path(dirfd)?).join(p)
    };
    let dir = std::fs::canonicalize(joined.parent()?).ok()?;
    Some(dir.join(joined.file_name()?).to_string_lossy().into_owned())
}

/// The size of the regular file behind `fd` (`None` for anything else, or without a log),
/// read *before* the sync: bytes appended while it runs may not be covered by it.
fn size_before_sync(fd: c_int) -> Option<i64> {
    if log_fd() < 0 {
        return None;
    }
    // SAFETY: fstat(2) into a zeroed struct it fills.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 || (st.st_mode & libc::S_IFMT) != libc::S_IFREG {
        return None;
    }
    Some(st.st_size)
}

/// Calls the real sync on `fd` and, when it succeeded, logs the size the file had when it
/// began as durable.
///
/// # Safety
/// As fsync(2); `real` is libc's fsync or fdatasync.
unsafe fn logged_sync(fd: c_int, real: SyncFn) -> c_int {
    let size = size_before_sync(fd);
    let r = real(fd);
    if let (0, Some(size), Some(path)) = (r, size, fd_path(fd)) {
        log_line(&format!("S\t{size}\t{path}\n"));
    }
    r
}

fn renamed(olddirfd: c_int, old: *const c_char, newdirfd: c_int, new: *const c_char) {
    if log_fd() < 0 {
        return;
    }
    if let (Some(o), Some(n)) = (absolute(olddirfd, old), absolute(newdirfd, new)) {
        log_line(&format!("R\t{o}\t{n}\n"));
    }
}

/// # Safety
/// As fsync(2).
#[no_mangle]
pub unsafe extern "C" fn fsync(fd: c_int) -> c_int {
    logged_sync(fd, real!(c"fsync", SyncFn))
}

/// # Safety
/// As fdatasync(2).
#[no_mangle]
pub unsafe extern "C" fn fdatasync(fd: c_int) -> c_int {
    logged_sync(fd, real!(c"fdatasync", SyncFn))
}

/// # Safety
/// As rename(2).
#[no_mangle]
pub unsafe extern "C" fn rename(old: *const c_char, new: *const c_char) -> c_int {
    let r = real!(c"rename", RenameFn)(old, new);
    if r == 0 {
        renamed(libc::AT_FDCWD, old, libc::AT_FDCWD, new);
    }
    r
}

/// # Safety
/// As renameat(2).
#[no_mangle]
pub unsafe extern "C" fn renameat(
    olddirfd: c_int,
    old: *const c_char,
    newdirfd: c_int,
    new: *const c_char,
) -> c_int {
    let r = real!(c"renameat", RenameAtFn)(olddirfd, old, newdirfd, new);
    if r == 0 {
        renamed(olddirfd, old, newdirfd, new);
    }
    r
}
