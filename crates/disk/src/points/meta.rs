//! What the store records about a point and an overlay: small JSON files, written atomically.
//! These are the rows the daemon mirrors into its catalog (and that `Msvm_VirtualSystemSettingData`
//! recovery snapshots show).

use serde::{Deserialize, Serialize};
use wire::{LogHeader, LogSummary, PointType};

/// How a point was taken (the log header's point type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PointKind {
    Standard,
    ApplicationConsistent,
    PlannedFailover,
}

impl From<PointType> for PointKind {
    fn from(t: PointType) -> Self {
        match t {
            PointType::Standard => PointKind::Standard,
            PointType::ApplicationConsistent => PointKind::ApplicationConsistent,
            PointType::PlannedFailover => PointKind::PlannedFailover,
        }
    }
}

/// One disk of a point, as the log's disk table named it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointDisk {
    pub id: String,
    pub virtual_size: u64,
}

/// A committed recovery point (the content of `p<seq>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointInfo {
    /// The log's sequence number; also the point's id within the VM.
    pub sequence: u64,
    /// The sequence the log was a delta on (0 for a full image). The layer's backing file is the
    /// previous *retained* point, which differs once pruning merged the parent away.
    pub log_parent: u64,
    /// When the primary took the point, microseconds since the Unix epoch (UTC).
    pub time_micros: i64,
    pub kind: PointKind,
    pub full_image: bool,
    pub disks: Vec<PointDisk>,
    /// BLAKE3 of the log (its trailer hash), lowercase hex: tells a re-sent log from a different
    /// log that claims the same sequence.
    pub log_hash: String,
    pub log_bytes: u64,
}

impl PointInfo {
    /// The point a log will be once applied, from its header alone: `log_hash` and `log_bytes`
    /// are only known at the trailer (see [`PointInfo::from_summary`]) and are left empty.
    pub(crate) fn from_header(h: &LogHeader) -> PointInfo {
        PointInfo {
            sequence: h.sequence,
            log_parent: h.parent,
            time_micros: h.point_time_micros,
            kind: h.point_type.into(),
            full_image: h.full_image,
            disks: h
                .disks
                .iter()
                .map(|d| PointDisk {
                    id: d.id.clone(),
                    virtual_size: d.virtual_size,
                })
                .collect(),
            log_hash: String::new(),
            log_bytes: 0,
        }
    }

    /// The point of a verified log.
    pub(crate) fn from_summary(summary: &LogSummary) -> PointInfo {
        PointInfo {
            log_hash: hex(&summary.hash),
            log_bytes: summary.bytes,
            ..PointInfo::from_header(&summary.header)
        }
    }
}

/// An overlay (the content of `overlays/<name>/overlay.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlayInfo {
    pub name: String,
    /// The point the overlay starts from; pruning keeps it while the overlay exists.
    pub base: u64,
    pub disks: usize,
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lowercase_and_padded() {
        assert_eq!(hex(&[0x00, 0xab, 0x0f]), "00ab0f");
    }

    #[test]
    fn point_json_round_trips_and_rejects_unknown_fields() {
        let p = PointInfo {
            sequence: 3,
            log_parent: 2,
            time_micros: -1,
            kind: PointKind::ApplicationConsistent,
            full_image: false,
            disks: vec![PointDisk {
                id: "scsi0".into(),
                virtual_size: 1 << 20,
            }],
            log_hash: "00".into(),
            log_bytes: 245,
        };
        let text = serde_json::to_string(&p).expect("json");
        assert_eq!(serde_json::from_str::<PointInfo>(&text).expect("parse"), p);
        let extra = text.replacen('{', "{\"x\":1,", 1);
        assert!(serde_json::from_str::<PointInfo>(&extra).is_err());
    }
}
