//! Which points pruning keeps: a pure function of the points, the policy, the clock and the
//! overlays, so it is tested with tables and never touches a file.

use std::collections::BTreeSet;

use super::meta::{PointInfo, PointKind};

const HOUR_MICROS: i64 = 3_600_000_000;

/// The relationship's recovery-point settings (Hyper-V's `RecoveryHistory` and
/// `ApplicationConsistentSnapshotInterval` being non-zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Additional hourly points to keep besides the latest (0: only the latest).
    pub recovery_history: u32,
    /// Keep every application-consistent point inside the history window.
    pub keep_app_consistent: bool,
}

/// The sequences to keep at `now_micros`:
///
/// - the latest point (highest sequence);
/// - every point in `pinned` (the base of an overlay);
/// - for each of the last `recovery_history` hours `[now - (k+1)h, now - k·h)`, k = 0 .. N-1, the
///   newest point taken in that hour (points stamped after `now` count as hour 0);
/// - with `keep_app_consistent`, every application-consistent point taken within the last
///   `recovery_history` hours.
pub fn points_to_keep(
    points: &[PointInfo],
    policy: &RetentionPolicy,
    now_micros: i64,
    pinned: &BTreeSet<u64>,
) -> BTreeSet<u64> {
    let mut keep: BTreeSet<u64> = points
        .iter()
        .map(|p| p.sequence)
        .filter(|s| pinned.contains(s))
        .collect();
    if let Some(latest) = points.iter().map(|p| p.sequence).max() {
        keep.insert(latest);
    }
    let hours = i64::from(policy.recovery_history);
    let mut newest_per_hour: Vec<Option<&PointInfo>> = vec![None; policy.recovery_history as usize];
    for p in points {
        let age = now_micros.saturating_sub(p.time_micros).max(0);
        let hour = age / HOUR_MICROS;
        if hour >= hours {
            continue;
        }
        if policy.keep_app_consistent && p.kind == PointKind::ApplicationConsistent {
            keep.insert(p.sequence);
        }
        let slot = &mut newest_per_hour[hour as usize];
        if slot.is_none_or(|q| (p.time_micros, p.sequence) > (q.time_micros, q.sequence)) {
            *slot = Some(p);
        }
    }
    keep.extend(newest_per_hour.into_iter().flatten().map(|p| p.sequence));
    keep
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::points::meta::PointDisk;

    const MIN: i64 = 60_000_000;
    const NOW: i64 = 1_700_000_000_000_000;

    fn p(sequence: u64, minutes_ago: i64, kind: PointKind) -> PointInfo {
        PointInfo {
            sequence,
            log_parent: sequence.saturating_sub(1),
            time_micros: NOW - minutes_ago * MIN,
            kind,
            full_image: sequence == 1,
            disks: vec![PointDisk {
                id: "d0".into(),
                virtual_size: 1,
            }],
            log_hash: String::new(),
            log_bytes: 0,
        }
    }

    fn keep(points: &[PointInfo], hours: u32, app: bool, pinned: &[u64]) -> Vec<u64> {
        let policy = RetentionPolicy {
            recovery_history: hours,
            keep_app_consistent: app,
        };
        points_to_keep(points, &policy, NOW, &pinned.iter().copied().collect())
            .into_iter()
            .collect()
    }

    #[test]
    fn hand_written_cases() {
        use PointKind::{ApplicationConsistent as A, Standard as S};
        // Points every 25 minutes for five hours, newest first in time: seq 13 is 0 min old.
        let points: Vec<_> = (1..=13)
            .map(|s| p(s, (13 - s as i64) * 25, if s % 4 == 0 { A } else { S }))
            .collect();
        // Ages: 13:0 12:25 11:50 10:75 9:100 8:125 7:150 6:175 5:200 4:225 3:250 2:275 1:300 minutes.
        assert_eq!(
            keep(&points, 0, true, &[]),
            vec![13],
            "no history: only the latest"
        );
        assert_eq!(
            keep(&points, 1, false, &[]),
            vec![13],
            "hour 0 holds 13, 12, 11; 13 is newest"
        );
        assert_eq!(
            keep(&points, 2, false, &[]),
            vec![10, 13],
            "hour 1 (60..120 min) holds 10, 9"
        );
        assert_eq!(
            keep(&points, 3, false, &[]),
            vec![8, 10, 13],
            "hour 2 (120..180) holds 8, 7, 6"
        );
        assert_eq!(
            keep(&points, 3, true, &[]),
            vec![8, 10, 12, 13],
            "app-consistent 12 is in the window; 4 is not"
        );
        assert_eq!(
            keep(&points, 1, false, &[2, 99]),
            vec![2, 13],
            "overlay bases stay; unknown pins are ignored"
        );
        assert_eq!(
            keep(&points, 24, true, &[]),
            vec![1, 3, 4, 5, 8, 10, 12, 13],
            "hour 3 holds 5, 4 (5 newer; 4 is app-consistent), hour 4 holds 3, 2, hour 5 holds 1"
        );
    }

    #[test]
    fn the_latest_always_stays_and_future_points_count_as_now() {
        let points = [
            p(1, 600, PointKind::Standard),
            p(2, -30, PointKind::Standard),
        ];
        assert_eq!(keep(&points, 0, true, &[]), vec![2]);
        assert_eq!(keep(&points[..1], 0, true, &[]), vec![1]);
        assert!(keep(&[], 5, true, &[]).is_empty());
    }
}
