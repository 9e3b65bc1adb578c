//! Small files written so that a crash leaves either the old one or the new one, never a torn one.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` durably: a temporary file beside it (`<path>.tmp`) synced, renamed
/// over `path`, the directory synced.
pub fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Syncs directory `dir`, so that names created, renamed or removed in it last.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
