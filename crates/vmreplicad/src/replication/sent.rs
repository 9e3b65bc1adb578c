//! The block-hash maps of the last log a primary built, kept until it knows whether the replica
//! committed it.
//!
//! A cycle's new maps become the baseline only when the replica's answer to the commit arrives.
//! When the answer is lost (the connection broke for longer than a cycle's retries, or this daemon
//! died first), the replica holds log `c` while this host's chain and maps are still those of
//! `c - 1`. A log `c + 1` built against those maps is *not* a superset of what the replica lacks: a
//! block that log `c` changed and the guest then wrote back to its `c - 1` content hashes equal to
//! the old map and would be skipped, leaving the replica with log `c`'s bytes for good.
//!
//! So before the commit can be sent, the new maps are kept as `disk<i>.hashes.sent-<seq>` with a
//! record of the log (`sent.json`: sequence and hash), durably. The next cycle that finds the
//! replica at `c` above its chain adopts them when the record names `c` with the hash the replica
//! holds (`PrimarySide::adopt_sent`, which then moves the chain to `c`); any other
//! replica ahead of the chain needs a resynchronization.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const RECORD: &str = "sent.json";

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SentLog {
    pub sequence: u64,
    pub log_hash: String,
    /// Its size and point time (Unix microseconds), for its statistics once adopted (0 in a
    /// record an older build wrote).
    #[serde(default)]
    pub log_bytes: u64,
    #[serde(default)]
    pub point_time: i64,
}

/// Where disk `map`'s new map for log `seq` is kept.
pub fn sent_map(map: &Path, seq: u64) -> PathBuf {
    let mut name = map.as_os_str().to_owned();
    name.push(format!(".sent-{seq}"));
    PathBuf::from(name)
}

/// Keeps the new maps of log `seq` (hash `log_hash`) in `tracking`: each `(tmp, map)` pair's
/// finished temporary map (already synced) is renamed to [`sent_map`] and the pair now names it;
/// the record goes last. What an older log kept goes first.
pub fn keep(
    tracking: &Path,
    (seq, log_hash, log_bytes, point_time): (u64, &str, u64, i64),
    maps: &mut [(PathBuf, PathBuf)],
) -> io::Result<()> {
    match std::fs::remove_file(tracking.join(RECORD)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    crate::durable::sync_dir(tracking)?;
    forget_maps(tracking);
    for (tmp, map) in maps.iter_mut() {
        let sent = sent_map(map, seq);
        std::fs::rename(&*tmp, &sent)?;
        *tmp = sent;
    }
    let record = SentLog {
        sequence: seq,
        log_hash: log_hash.to_string(),
        log_bytes,
        point_time,
    };
    let json = serde_json::to_vec(&record).map_err(io::Error::other)?;
    crate::durable::write_file(&tracking.join(RECORD), &json)
}

/// The kept log, if any.
pub fn record(tracking: &Path) -> Option<SentLog> {
    let bytes = std::fs::read(tracking.join(RECORD)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Deletes every kept map (not the record).
fn forget_maps(tracking: &Path) {
    let Ok(entries) = std::fs::read_dir(tracking) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().contains(".hashes.sent-") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_maps_replace_older_ones_and_the_record_names_the_log() {
        let dir = crate::store::tests::tempdir::Dir::new();
        let t = dir.path.as_path();
        let map = t.join("disk0.hashes");
        std::fs::write(t.join("disk0.hashes.sent-4"), b"old").expect("old");
        std::fs::write(map.with_extension("hashes.tmp"), b"new").expect("tmp");
        let mut maps = vec![(map.with_extension("hashes.tmp"), map.clone())];
        keep(t, (5, "abc", 4096, 7_000_000), &mut maps).expect("keep");
        assert_eq!(maps[0].0, t.join("disk0.hashes.sent-5"));
        assert_eq!(std::fs::read(&maps[0].0).expect("sent"), b"new");
        assert!(!t.join("disk0.hashes.sent-4").exists());
        assert_eq!(
            record(t),
            Some(SentLog {
                sequence: 5,
                log_hash: "abc".into(),
                log_bytes: 4096,
                point_time: 7_000_000,
            })
        );
        std::fs::write(t.join("disk0.hashes.tmp"), b"newer").expect("tmp");
        let mut maps = vec![(t.join("disk0.hashes.tmp"), map)];
        keep(t, (6, "def", 1, 1), &mut maps).expect("keep");
        assert!(!t.join("disk0.hashes.sent-5").exists());
        assert_eq!(record(t).map(|r| r.sequence), Some(6));
    }
}
