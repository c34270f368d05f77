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
pub fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
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
}
