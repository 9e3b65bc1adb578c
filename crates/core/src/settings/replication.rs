//! `Msvm_ReplicationSettingData` as a typed value (spec §6).

use serde::{Deserialize, Serialize};

use super::names::{is_dns_host_name, is_ip_literal};
use super::{check_required_thumbprint, check_time_of_day, SettingsError};
use crate::state::AuthenticationType;

/// Replication intervals Hyper-V accepts, in seconds (spec §6, DESIGN §6).
pub const REPLICATION_INTERVALS: [u16; 3] = [30, 300, 900];
/// Most extra hourly recovery points (spec §6; the MOF's 16 was the WS2012 limit).
pub const MAX_RECOVERY_HISTORY: u16 = 24;
/// Longest interval between application-consistent points, in hours.
pub const MAX_APPLICATION_CONSISTENT_INTERVAL: u16 = 12;

/// Per-VM, per-relationship replication settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationSettings {
    pub recovery_connection_point: String,
    pub recovery_server_port_number: u16,
    pub authentication_type: u16,
    pub certificate_thumbprint: Option<String>,
    pub compression_enabled: bool,
    pub bypass_proxy_server: bool,
    pub replicate_host_kvp_items: bool,
    /// Hours; 0 = no application-consistent points.
    pub application_consistent_snapshot_interval: u16,
    pub recovery_history: u16,
    pub included_disks: Vec<String>,
    pub auto_resynchronize_enabled: bool,
    /// Seconds since midnight, local time.
    pub auto_resynchronize_interval_start: u32,
    /// Seconds since midnight, local time.
    pub auto_resynchronize_interval_end: u32,
    pub enable_write_order_preservation_across_disks: bool,
    pub replication_provider: Option<String>,
    /// Seconds: 30, 300 or 900.
    pub replication_interval: u16,
    pub additional_settings: Option<String>,
}

impl Default for ReplicationSettings {
    /// Hyper-V's defaults (spec §6), with two deliberate differences:
    /// - port 443 and certificate authentication (2), because certificate authentication is the only
    ///   mode supported here (the MOF default port is 0, which PowerShell refuses anyway);
    /// - `AutoResynchronizeEnabled` true: DISCREPANCY (spec §16.7) between the docs (false) and the MOF
    ///   default and description (TRUE); we follow the MOF, which is what a live host reports.
    ///
    /// The window is 18:30–06:00, the interval 300 s, no extra history, no app-consistent points,
    /// compression and host KVP replication on, write order preserved (always true since 8.1).
    fn default() -> Self {
        ReplicationSettings {
            recovery_connection_point: String::new(),
            recovery_server_port_number: 443,
            authentication_type: AuthenticationType::Certificate.as_u16(),
            certificate_thumbprint: None,
            compression_enabled: true,
            bypass_proxy_server: false,
            replicate_host_kvp_items: true,
            application_consistent_snapshot_interval: 0,
            recovery_history: 0,
            included_disks: Vec::new(),
            auto_resynchronize_enabled: true,
            auto_resynchronize_interval_start: 18 * 3600 + 30 * 60,
            auto_resynchronize_interval_end: 6 * 3600,
            enable_write_order_preservation_across_disks: true,
            replication_provider: None,
            replication_interval: 300,
            additional_settings: None,
        }
    }
}

impl ReplicationSettings {
    /// Checks every rule of spec §6 this implementation enforces; the first problem is returned.
    pub fn validate(&self) -> Result<(), SettingsError> {
        self.check_interval()?;
        self.check_history()?;
        self.check_authentication()?;
        check_port(self.recovery_server_port_number)?;
        check_connection_point(&self.recovery_connection_point)?;
        check_time_of_day(
            "AutoResynchronizeIntervalStart",
            self.auto_resynchronize_interval_start,
        )?;
        check_time_of_day(
            "AutoResynchronizeIntervalEnd",
            self.auto_resynchronize_interval_end,
        )
    }

    fn check_interval(&self) -> Result<(), SettingsError> {
        if !REPLICATION_INTERVALS.contains(&self.replication_interval) {
            return Err(SettingsError::invalid(
                "ReplicationInterval",
                format!(
                    "must be 30, 300 or 900 seconds; got {}.",
                    self.replication_interval
                ),
            ));
        }
        Ok(())
    }

    fn check_history(&self) -> Result<(), SettingsError> {
        if self.recovery_history > MAX_RECOVERY_HISTORY {
            return Err(SettingsError::invalid(
                "RecoveryHistory",
                format!(
                    "must be 0 to 24 recovery points; got {}.",
                    self.recovery_history
                ),
            ));
        }
        let vss = self.application_consistent_snapshot_interval;
        if vss > MAX_APPLICATION_CONSISTENT_INTERVAL {
            return Err(SettingsError::invalid(
                "ApplicationConsistentSnapshotInterval",
                format!("must be 0 (disabled) to 12 hours; got {vss}."),
            ));
        }
        if vss > 0 && self.recovery_history == 0 {
            return Err(SettingsError::invalid(
                "ApplicationConsistentSnapshotInterval",
                format!("must be 0 when RecoveryHistory is 0 (no extra recovery points to keep them in); got {vss}."),
            ));
        }
        Ok(())
    }

    fn check_authentication(&self) -> Result<(), SettingsError> {
        match AuthenticationType::from_u16(self.authentication_type) {
            Some(AuthenticationType::Certificate) => check_required_thumbprint(
                "CertificateThumbPrint",
                self.certificate_thumbprint.as_deref(),
            ),
            Some(AuthenticationType::Kerberos) => Err(SettingsError::unsupported(
                "AuthenticationType",
                "1 (Kerberos) is not supported; use 2 (Certificate).",
            )),
            None => Err(SettingsError::invalid(
                "AuthenticationType",
                format!(
                    "must be 1 (Kerberos) or 2 (Certificate); got {}.",
                    self.authentication_type
                ),
            )),
        }
    }
}

fn check_port(port: u16) -> Result<(), SettingsError> {
    if port == 0 {
        return Err(SettingsError::invalid(
            "RecoveryServerPortNumber",
            "must be a TCP port, 1 to 65535; got 0.",
        ));
    }
    Ok(())
}

fn check_connection_point(name: &str) -> Result<(), SettingsError> {
    if name.is_empty() {
        return Err(SettingsError::invalid(
            "RecoveryConnectionPoint",
            "must name the recovery server (a DNS host name or an IP address); it is empty.",
        ));
    }
    if !is_dns_host_name(name) && !is_ip_literal(name) {
        return Err(SettingsError::invalid(
            "RecoveryConnectionPoint",
            format!(
                "must be a DNS host name (labels of letters, digits and '-', 1 to 63 characters each, \
                 253 in all) or an IP address; got \"{name}\"."
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codes::ReturnCode;

    fn valid() -> ReplicationSettings {
        ReplicationSettings {
            recovery_connection_point: "replica.contoso.com".into(),
            certificate_thumbprint: Some("0123456789abcdef0123456789abcdef01234567".into()),
            ..ReplicationSettings::default()
        }
    }

    fn error_of(settings: ReplicationSettings) -> (ReturnCode, &'static str) {
        match settings.validate() {
            Ok(()) => panic!("expected an error"),
            Err(e) => (e.return_code(), e.property()),
        }
    }

    #[test]
    fn defaults_follow_spec_6() {
        let d = ReplicationSettings::default();
        assert_eq!(d.replication_interval, 300);
        assert_eq!(d.recovery_server_port_number, 443);
        assert_eq!(d.authentication_type, 2);
        assert_eq!(d.auto_resynchronize_interval_start, 66_600); // 18:30
        assert_eq!(d.auto_resynchronize_interval_end, 21_600); // 06:00
        assert!(
            d.auto_resynchronize_enabled && d.compression_enabled && d.replicate_host_kvp_items
        );
        assert!(d.enable_write_order_preservation_across_disks);
        assert_eq!(
            (
                d.recovery_history,
                d.application_consistent_snapshot_interval
            ),
            (0, 0)
        );
        assert!(d.recovery_connection_point.is_empty());
    }

    #[test]
    fn a_complete_setting_is_valid() {
        assert_eq!(valid().validate(), Ok(()));
        let by_ip = ReplicationSettings {
            recovery_connection_point: "192.0.2.10".into(),
            ..valid()
        };
        assert_eq!(by_ip.validate(), Ok(()));
    }

    #[test]
    fn replication_interval_is_30_300_or_900() {
        for ok in [30, 300, 900] {
            assert_eq!(
                ReplicationSettings {
                    replication_interval: ok,
                    ..valid()
                }
                .validate(),
                Ok(())
            );
        }
        for bad in [0, 60, 299, 901] {
            let got = error_of(ReplicationSettings {
                replication_interval: bad,
                ..valid()
            });
            assert_eq!(got, (ReturnCode::InvalidParameter, "ReplicationInterval"));
        }
    }

    #[test]
    fn recovery_history_is_0_to_24() {
        assert_eq!(
            ReplicationSettings {
                recovery_history: 24,
                ..valid()
            }
            .validate(),
            Ok(())
        );
        let got = error_of(ReplicationSettings {
            recovery_history: 25,
            ..valid()
        });
        assert_eq!(got, (ReturnCode::InvalidParameter, "RecoveryHistory"));
    }

    #[test]
    fn app_consistent_points_need_history() {
        let got = error_of(ReplicationSettings {
            application_consistent_snapshot_interval: 1,
            ..valid()
        });
        assert_eq!(
            got,
            (
                ReturnCode::InvalidParameter,
                "ApplicationConsistentSnapshotInterval"
            )
        );
        let with_history = ReplicationSettings {
            application_consistent_snapshot_interval: 12,
            recovery_history: 4,
            ..valid()
        };
        assert_eq!(with_history.validate(), Ok(()));
        let too_long = ReplicationSettings {
            application_consistent_snapshot_interval: 13,
            recovery_history: 4,
            ..valid()
        };
        assert_eq!(error_of(too_long).0, ReturnCode::InvalidParameter);
    }

    #[test]
    fn kerberos_is_not_supported_and_other_types_are_invalid() {
        let kerberos = ReplicationSettings {
            authentication_type: 1,
            certificate_thumbprint: None,
            ..valid()
        };
        assert_eq!(
            error_of(kerberos),
            (ReturnCode::NotSupported, "AuthenticationType")
        );
        for bad in [0, 3] {
            let got = error_of(ReplicationSettings {
                authentication_type: bad,
                ..valid()
            });
            assert_eq!(got, (ReturnCode::InvalidParameter, "AuthenticationType"));
        }
    }

    #[test]
    fn certificate_needs_a_well_formed_thumbprint() {
        let missing = ReplicationSettings {
            certificate_thumbprint: None,
            ..valid()
        };
        assert_eq!(
            error_of(missing),
            (ReturnCode::InvalidParameter, "CertificateThumbPrint")
        );
        let short = ReplicationSettings {
            certificate_thumbprint: Some("abc".into()),
            ..valid()
        };
        assert_eq!(
            error_of(short),
            (ReturnCode::InvalidParameter, "CertificateThumbPrint")
        );
        let spaced = ReplicationSettings {
            certificate_thumbprint: Some(
                "01 23 45 67 89 AB CD EF 01 23 45 67 89 AB CD EF 01 23 45 67".into(),
            ),
            ..valid()
        };
        assert_eq!(spaced.validate(), Ok(()));
        let sha256 = ReplicationSettings {
            certificate_thumbprint: Some("A".repeat(64)),
            ..valid()
        };
        assert_eq!(sha256.validate(), Ok(()));
    }

    #[test]
    fn port_and_connection_point() {
        let no_port = ReplicationSettings {
            recovery_server_port_number: 0,
            ..valid()
        };
        assert_eq!(
            error_of(no_port),
            (ReturnCode::InvalidParameter, "RecoveryServerPortNumber")
        );
        for bad in ["", "bad_name.example", "a..b", "host."] {
            let got = error_of(ReplicationSettings {
                recovery_connection_point: bad.into(),
                ..valid()
            });
            assert_eq!(
                got,
                (ReturnCode::InvalidParameter, "RecoveryConnectionPoint"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn resync_window_is_a_time_of_day() {
        let late = ReplicationSettings {
            auto_resynchronize_interval_end: 86_400,
            ..valid()
        };
        assert_eq!(
            error_of(late),
            (ReturnCode::InvalidParameter, "AutoResynchronizeIntervalEnd")
        );
        let early = ReplicationSettings {
            auto_resynchronize_interval_start: 90_000,
            ..valid()
        };
        assert_eq!(error_of(early).1, "AutoResynchronizeIntervalStart");
    }

    #[test]
    fn messages_name_the_allowed_values() {
        let err = ReplicationSettings {
            replication_interval: 60,
            ..valid()
        }
        .validate();
        assert_eq!(
            err.map_err(|e| e.to_string()),
            Err("ReplicationInterval: must be 30, 300 or 900 seconds; got 60.".to_string())
        );
    }
}
