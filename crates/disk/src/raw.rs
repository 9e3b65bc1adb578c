//! Raw disks get persistent dirty bitmaps through a qcow2 *metadata overlay*: a small qcow2 whose
//! external data file is the raw image (`data_file_raw=on`), so the raw file stays a plain,
//! byte-identical raw image while the qcow2 carries the bitmaps.
//!
//! Creating it needs care: `qemu-img create -o data_file=<existing raw>` truncates that file
//! (seen with qemu-img 10.0.2: the data is gone). So the overlay is created over a scratch data
//! file and then pointed at the real one with `qemu-img amend`, which does not touch data.

use std::path::Path;
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum OverlayCreateError {
    #[error("{path} already exists; refusing to overwrite it")]
    Exists { path: String },
    #[error("qemu-img {step} failed: {why}")]
    QemuImg { step: &'static str, why: String },
}

fn qemu_img(step: &'static str, args: &[&str]) -> Result<(), OverlayCreateError> {
    let out =
        Command::new("qemu-img")
            .args(args)
            .output()
            .map_err(|e| OverlayCreateError::QemuImg {
                step,
                why: e.to_string(),
            })?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(OverlayCreateError::QemuImg { step, why });
    }
    Ok(())
}

/// Creates `meta` (qcow2) as a metadata overlay of the existing raw image `raw`, leaving `raw`
/// byte for byte as it was.
pub fn create_metadata_overlay(raw: &Path, meta: &Path) -> Result<(), OverlayCreateError> {
    if meta.exists() {
        return Err(OverlayCreateError::Exists {
            path: meta.display().to_string(),
        });
    }
    let size = std::fs::metadata(raw)
        .map_err(|e| OverlayCreateError::QemuImg {
            step: "create",
            why: format!("{}: {e}", raw.display()),
        })?
        .len();
    let mut scratch = meta.as_os_str().to_owned();
    scratch.push(".scratch-data");
    let scratch = std::path::PathBuf::from(scratch);
    let (raw_s, meta_s, scratch_s) = (
        raw.display().to_string(),
        meta.display().to_string(),
        scratch.display().to_string(),
    );
    let create_opts = format!("data_file={scratch_s},data_file_raw=on");
    let result = qemu_img(
        "create",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &create_opts,
            &meta_s,
            &size.to_string(),
        ],
    )
    .and_then(|()| {
        let amend_opts = format!("data_file={raw_s},data_file_raw=on");
        qemu_img(
            "amend",
            &["amend", "-f", "qcow2", "-o", &amend_opts, &meta_s],
        )
    });
    let _ = std::fs::remove_file(&scratch);
    if result.is_err() {
        let _ = std::fs::remove_file(meta);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_raw_image_keeps_its_bytes_and_reads_the_same_through_the_overlay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let raw = dir.path().join("disk.raw");
        let data: Vec<u8> = (0..4u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(&raw, &data).expect("write");
        let meta = dir.path().join("disk.meta.qcow2");
        create_metadata_overlay(&raw, &meta).expect("overlay");
        assert_eq!(
            std::fs::read(&raw).expect("read"),
            data,
            "the raw image changed"
        );
        let same = Command::new("qemu-img")
            .args(["compare", "-q", "-f", "qcow2", "-F", "raw"])
            .arg(&meta)
            .arg(&raw)
            .status()
            .expect("compare");
        assert!(
            same.success(),
            "the overlay does not show the raw image's bytes"
        );
        assert!(matches!(
            create_metadata_overlay(&raw, &meta),
            Err(OverlayCreateError::Exists { .. })
        ));
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers.len(), 2, "{leftovers:?}");
    }
}
