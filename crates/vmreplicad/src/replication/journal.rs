//! What a primary remembers of the logs it sent, for a later failback (docs/protocol.md §5.8).
//!
//! After an unplanned failover to point F, the old primary's disks may differ from F only in the
//! blocks of its logs F+1…L (sent, never applied over there) and in what it wrote after log L.
//! So every committed delta leaves its changed blocks here (`sent_blocks`, as runs of block
//! numbers, kept [`KEEP_SECS`]: a failover point is at most 24 hourly points old), and a turned-off
//! VM's point leaves each disk's file fingerprint beside its block-hash map: a disk whose file is
//! unchanged since then holds exactly point L.

use std::path::Path;

use disk::scan::hashmap::MapReader;
use rusqlite::params;
use uuid::Uuid;

use crate::store::{Store, StoreResult};

/// How long the changed blocks of a sent log are kept: RecoveryHistory's 24 hourly points and a
/// margin.
pub const KEEP_SECS: i64 = 26 * 3600;

/// Sorted, disjoint runs of block numbers: (first block, count).
pub type Runs = Vec<(u64, u64)>;

/// Adds block `b` to sorted runs built in increasing order.
pub fn push_block(runs: &mut Runs, b: u64) {
    match runs.last_mut() {
        Some((first, count)) if *first + *count == b => *count += 1,
        Some((first, count)) if *first + *count > b => {}
        _ => runs.push((b, 1)),
    }
}

/// The union of sorted disjoint runs.
pub fn union(a: &[(u64, u64)], b: &[(u64, u64)]) -> Runs {
    let mut all: Vec<(u64, u64)> = a.iter().chain(b).copied().collect();
    all.sort_unstable();
    let mut out: Runs = Vec::with_capacity(all.len());
    for (first, count) in all {
        match out.last_mut() {
            Some((f, c)) if *f + *c >= first => *c = (*c).max(first + count - *f),
            _ => out.push((first, count)),
        }
    }
    out
}

/// Blocks covered by `runs`.
pub fn blocks(runs: &[(u64, u64)]) -> u64 {
    runs.iter().map(|(_, c)| c).sum()
}

/// The blocks whose hashes differ between two maps of one disk; every block when they do not
/// describe the same disk.
pub fn map_diff(old: &Path, new: &Path) -> Result<Runs, String> {
    let mut a = MapReader::open(old).map_err(|e| e.to_string())?;
    let mut b = MapReader::open(new).map_err(|e| e.to_string())?;
    let mut runs = Runs::new();
    let same_shape = a.block_size == b.block_size && a.disk_size == b.disk_size;
    let mut block = 0u64;
    loop {
        let (x, y) = (
            a.next_hash().map_err(|e| e.to_string())?,
            b.next_hash().map_err(|e| e.to_string())?,
        );
        match (x, y) {
            (None, None) => break,
            (Some(x), Some(y)) if same_shape && x == y => {}
            (_, None) if !same_shape => break,
            _ => push_block(&mut runs, block),
        }
        block += 1;
    }
    Ok(runs)
}

/// Copies map `src` to `dst` with the hashes of the blocks in `runs` made to match nothing (a
/// byte flipped): a comparison against `dst` finds those blocks different, whatever they hold.
pub fn force_map(src: &Path, dst: &Path, runs: &[(u64, u64)]) -> Result<(), String> {
    let mut reader = MapReader::open(src).map_err(|e| e.to_string())?;
    let mut writer =
        disk::scan::hashmap::MapWriter::create(dst, reader.block_size, reader.disk_size)
            .map_err(|e| e.to_string())?;
    let mut block = 0u64;
    let mut next = 0;
    while let Some(mut h) = reader.next_hash().map_err(|e| e.to_string())? {
        while runs.get(next).is_some_and(|(f, c)| f + c <= block) {
            next += 1;
        }
        if runs.get(next).is_some_and(|(f, _)| *f <= block) {
            h[0] ^= 0xff;
        }
        writer.push(&h).map_err(|e| e.to_string())?;
        block += 1;
    }
    let tmp = writer.finish().map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, dst).map_err(|e| e.to_string())
}

fn encode(runs: &[(u64, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(runs.len() * 16);
    for (f, c) in runs {
        out.extend_from_slice(&f.to_le_bytes());
        out.extend_from_slice(&c.to_le_bytes());
    }
    out
}

fn decode(bytes: &[u8]) -> Runs {
    bytes
        .chunks_exact(16)
        .map(|c| {
            let mut f = [0u8; 8];
            let mut n = [0u8; 8];
            f.copy_from_slice(&c[..8]);
            n.copy_from_slice(&c[8..]);
            (u64::from_le_bytes(f), u64::from_le_bytes(n))
        })
        .collect()
}

impl Store {
    /// Records the changed blocks of log `sequence` of `vm`, disk by disk, and forgets those older
    /// than [`KEEP_SECS`].
    pub fn record_sent_blocks(&self, vm: Uuid, sequence: u64, disks: &[Runs]) -> StoreResult<()> {
        let now = crate::clock::now();
        let seq = i64::try_from(sequence).unwrap_or(i64::MAX);
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for (i, runs) in disks.iter().enumerate() {
            tx.execute(
                "INSERT OR REPLACE INTO sent_blocks (vm, sequence, disk, runs, time)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![vm.to_string(), seq, i as i64, encode(runs), now],
            )?;
        }
        tx.execute(
            "DELETE FROM sent_blocks WHERE vm = ?1 AND time < ?2",
            params![vm.to_string(), now - KEEP_SECS],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The union of the changed blocks of logs `after`+1 ..= `last` on disk `disk`; None when one of
    /// those logs left no record (sent before this existed, or forgotten).
    pub fn sent_blocks_since(
        &self,
        vm: Uuid,
        after: u64,
        last: u64,
        disk: usize,
    ) -> StoreResult<Option<Runs>> {
        if last == after {
            return Ok(Some(Runs::new()));
        }
        if last < after {
            // The failover point is a log this host never recorded as sent.
            return Ok(None);
        }
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT sequence, runs FROM sent_blocks
             WHERE vm = ?1 AND disk = ?2 AND sequence > ?3 AND sequence <= ?4 ORDER BY sequence",
        )?;
        let rows = stmt
            .query_map(
                params![
                    vm.to_string(),
                    disk as i64,
                    i64::try_from(after).unwrap_or(i64::MAX),
                    i64::try_from(last).unwrap_or(i64::MAX)
                ],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)),
            )?
            .collect::<Result<Vec<_>, _>>()?;
        if rows.len() as u64 != last - after {
            return Ok(None);
        }
        let mut all = Runs::new();
        for (_, bytes) in rows {
            all = union(&all, &decode(&bytes));
        }
        Ok(Some(all))
    }
}

/// The fingerprints of a turned-off VM's disk files, to be taken just before its point is read:
/// None for a file that cannot be read, or that changed less than [`SETTLE`] ago — its times may
/// then not move for a write later in the same clock tick (coarse file-system timestamps), so a
/// failback must not trust them to say "unchanged" (engine::offline's bitmap says instead).
pub fn fingerprints_before_read(images: &[String]) -> Vec<Option<disk::fingerprint::Fingerprint>> {
    images
        .iter()
        .map(|image| settled_fingerprint(Path::new(image)))
        .collect()
}

/// The fingerprint of `path` if it was left alone for [`SETTLE`] (see above).
pub fn settled_fingerprint(path: &Path) -> Option<disk::fingerprint::Fingerprint> {
    let fp = disk::fingerprint::Fingerprint::of(path).ok()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX))
        .ok()?;
    (now - fp.mtime_ns.max(fp.ctime_ns) >= SETTLE.as_nanos() as i128).then_some(fp)
}

/// How long a file must have been left alone for its fingerprint to be trusted.
pub const SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// Records the fingerprints of a turned-off VM's disk files, taken before its point was read
/// ([`fingerprints_before_read`]), as `tracking/disk<i>.fingerprint.json`; a disk without one (and
/// every disk with `None`: a running VM's point, whose files change under it) has its file removed.
pub fn record_fingerprints(
    tracking: &Path,
    prints: Option<&[Option<disk::fingerprint::Fingerprint>]>,
    disks: usize,
) {
    for i in 0..disks {
        let file = tracking.join(format!("disk{i}.fingerprint.json"));
        match prints.and_then(|p| p.get(i)).and_then(Option::as_ref) {
            Some(fp) => {
                if let Ok(json) = serde_json::to_vec(fp) {
                    let _ = std::fs::write(&file, json);
                }
            }
            None => {
                let _ = std::fs::remove_file(&file);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge() {
        let mut r = Runs::new();
        for b in [1, 2, 3, 7, 8, 20] {
            push_block(&mut r, b);
        }
        assert_eq!(r, vec![(1, 3), (7, 2), (20, 1)]);
        assert_eq!(
            union(&r, &[(0, 1), (4, 3), (19, 1), (30, 2)]),
            vec![(0, 9), (19, 2), (30, 2)]
        );
        assert_eq!(union(&[(0, 10)], &[(2, 3)]), vec![(0, 10)]);
        assert_eq!(blocks(&[(0, 10), (20, 2)]), 12);
        assert_eq!(decode(&encode(&r)), r);
    }

    #[test]
    fn a_forced_map_differs_exactly_at_its_runs() {
        let dir = std::env::temp_dir().join(format!("vmr-force-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("a.hashes");
        let mut w = disk::scan::hashmap::MapWriter::create(&src, 65536, 10 * 65536).unwrap();
        for b in 0..10u8 {
            w.push(&[b; 16]).unwrap();
        }
        std::fs::rename(w.finish().unwrap(), &src).unwrap();
        let dst = dir.join("b.hashes");
        force_map(&src, &dst, &[(2, 3), (9, 1)]).unwrap();
        assert_eq!(map_diff(&src, &dst).unwrap(), vec![(2, 3), (9, 1)]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_blocks_of_sent_logs_are_found_again_and_gaps_are_unknown() {
        let (_dir, store) = crate::store::tests::temp_store();
        let vm = Uuid::new_v4();
        store
            .record_sent_blocks(vm, 3, &[vec![(1, 2)], vec![]])
            .unwrap();
        store
            .record_sent_blocks(vm, 4, &[vec![(2, 5)], vec![(9, 1)]])
            .unwrap();
        assert_eq!(
            store.sent_blocks_since(vm, 2, 4, 0).unwrap(),
            Some(vec![(1, 6)])
        );
        assert_eq!(
            store.sent_blocks_since(vm, 3, 4, 1).unwrap(),
            Some(vec![(9, 1)])
        );
        assert_eq!(store.sent_blocks_since(vm, 4, 4, 0).unwrap(), Some(vec![]));
        assert_eq!(store.sent_blocks_since(vm, 1, 4, 0).unwrap(), None);
        assert_eq!(store.sent_blocks_since(vm, 5, 4, 0).unwrap(), None);
    }
}
