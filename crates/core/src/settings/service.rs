//! `Msvm_ReplicationServiceSettingData`: this host as a recovery server (spec §7).

use serde::{Deserialize, Serialize};

use super::{check_required_thumbprint, check_thumbprint, check_time_of_day, SettingsError};

/// Shortest monitoring window: 1 hour (docs; the MOF's 4 h is not used, spec §16.8).
pub const MIN_MONITORING_INTERVAL: u32 = 3600;
/// Longest monitoring window: 7 days.
pub const MAX_MONITORING_INTERVAL: u32 = 7 * 86_400;

/// Recovery-server settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSettings {
    pub recovery_server_enabled: bool,
    /// 0 not defined, 1 Kerberos, 2 Certificate, 3 Certificate + Kerberos.
    pub allowed_authentication_type: u16,
    pub certificate_thumbprint: Option<String>,
    pub http_port: u16,
    pub https_port: u16,
    /// Seconds.
    pub monitoring_interval: u32,
    /// Seconds since midnight, UTC.
    pub monitoring_start_time: u32,
}

impl Default for ServiceSettings {
    /// Hyper-V's defaults (spec §7): disabled, authentication type 0, no certificate, ports 80/443.
    /// DISCREPANCY choices (spec §16.8): the monitoring window is 43200 s (12 h), as the docs say and a
    /// real host reports (the MOF says 24 h), starting at 09:00 (the docs' local time, which a real
    /// host matched; the MOF says 10:00 UTC). Here 09:00 is stored as-is, i.e. 09:00 UTC, because the
    /// core has no time zone; the daemon converts local time when it builds this value.
    fn default() -> Self {
        ServiceSettings {
            recovery_server_enabled: false,
            allowed_authentication_type: 0,
            certificate_thumbprint: None,
            http_port: 80,
            https_port: 443,
            monitoring_interval: 43_200,
            monitoring_start_time: 9 * 3600,
        }
    }
}

impl ServiceSettings {
    /// Checks the rules of spec §7 this implementation enforces; the first problem is returned.
    pub fn validate(&self) -> Result<(), SettingsError> {
        self.check_authentication()?;
        check_port("HttpPort", self.http_port)?;
        check_port("HttpsPort", self.https_port)?;
        self.check_monitoring()?;
        check_time_of_day("MonitoringStartTime", self.monitoring_start_time)
    }

    fn check_authentication(&self) -> Result<(), SettingsError> {
        const PROPERTY: &str = "AllowedAuthenticationType";
        let kind = self.allowed_authentication_type;
        let uses_certificate = match kind {
            2 | 3 => true,
            1 if self.recovery_server_enabled => {
                return Err(SettingsError::unsupported(
                    PROPERTY,
                    "1 (Kerberos) is not supported; use 2 (Certificate) or 3 (Certificate and Kerberos, of \
                     which only certificates are served).",
                ))
            }
            0 if self.recovery_server_enabled => {
                return Err(SettingsError::invalid(
                    PROPERTY,
                    "must be 2 (Certificate) or 3 (Certificate and Kerberos) when RecoveryServerEnabled is \
                     true; got 0.",
                ))
            }
            0 | 1 => false,
            _ => {
                return Err(SettingsError::invalid(
                    PROPERTY,
                    format!("must be 0, 1 (Kerberos), 2 (Certificate) or 3 (both); got {kind}."),
                ))
            }
        };
        match (
            &self.certificate_thumbprint,
            uses_certificate && self.recovery_server_enabled,
        ) {
            (thumbprint, true) => {
                check_required_thumbprint("CertificateThumbPrint", thumbprint.as_deref())
            }
            (Some(text), false) if !text.trim().is_empty() => {
                check_thumbprint("CertificateThumbPrint", text)
            }
            _ => Ok(()),
        }
    }

    /// The monitoring window (spec §10) that Unix time `t` falls in, as (start, end) in Unix
    /// seconds: windows of `MonitoringInterval` follow one another from `MonitoringStartTime` of
    /// 1970-01-01 (UTC), so with a window that divides a day one starts at that time every day.
    pub fn monitoring_window(&self, t: i64) -> (i64, i64) {
        let interval = i64::from(self.monitoring_interval.max(1));
        let anchor = i64::from(self.monitoring_start_time % 86_400);
        let start = anchor + (t - anchor).div_euclid(interval) * interval;
        (start, start + interval)
    }

    fn check_monitoring(&self) -> Result<(), SettingsError> {
        let interval = self.monitoring_interval;
        if !(MIN_MONITORING_INTERVAL..=MAX_MONITORING_INTERVAL).contains(&interval) {
            return Err(SettingsError::invalid(
                "MonitoringInterval",
                format!("must be 3600 (1 hour) to 604800 (7 days) seconds; got {interval}."),
            ));
        }
        Ok(())
    }
}

fn check_port(property: &'static str, port: u16) -> Result<(), SettingsError> {
    if port == 0 {
        return Err(SettingsError::invalid(
            property,
            "must be a TCP port, 1 to 65535; got 0.",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codes::ReturnCode;

    #[test]
    fn monitoring_windows_follow_one_another_from_the_start_time() {
        let s = ServiceSettings::default(); // 12 h from 09:00 UTC
        let day = 20_000 * 86_400; // some midnight, UTC
        let h = 3600;
        assert_eq!(
            s.monitoring_window(day + 9 * h),
            (day + 9 * h, day + 21 * h)
        );
        assert_eq!(
            s.monitoring_window(day + 14 * h),
            (day + 9 * h, day + 21 * h)
        );
        assert_eq!(
            s.monitoring_window(day + 21 * h),
            (day + 21 * h, day + 33 * h)
        );
        assert_eq!(s.monitoring_window(day + 3 * h), (day - 3 * h, day + 9 * h));
        let week = ServiceSettings {
            monitoring_interval: 604_800,
            monitoring_start_time: 0,
            ..s
        };
        let (start, end) = week.monitoring_window(day + 5);
        assert!(start <= day + 5 && day + 5 < end && end - start == 604_800);
        assert_eq!(start % 604_800, 0);
        assert_eq!(week.monitoring_window(-1).1, 0); // before 1970 too
    }

    fn enabled() -> ServiceSettings {
        ServiceSettings {
            recovery_server_enabled: true,
            allowed_authentication_type: 2,
            certificate_thumbprint: Some("0123456789abcdef0123456789abcdef01234567".into()),
            ..ServiceSettings::default()
        }
    }

    fn error_of(settings: ServiceSettings) -> (ReturnCode, &'static str) {
        match settings.validate() {
            Ok(()) => panic!("expected an error"),
            Err(e) => (e.return_code(), e.property()),
        }
    }

    // Spec §7 defaults; §16.8 discrepancy resolved to the docs.
    #[test]
    fn defaults() {
        let d = ServiceSettings::default();
        assert!(!d.recovery_server_enabled);
        assert_eq!(
            (d.allowed_authentication_type, d.http_port, d.https_port),
            (0, 80, 443)
        );
        assert_eq!(
            (d.monitoring_interval, d.monitoring_start_time),
            (43_200, 32_400)
        );
        assert_eq!(d.validate(), Ok(()));
    }

    #[test]
    fn enabled_with_certificate_is_valid() {
        assert_eq!(enabled().validate(), Ok(()));
        assert_eq!(
            ServiceSettings {
                allowed_authentication_type: 3,
                ..enabled()
            }
            .validate(),
            Ok(())
        );
    }

    #[test]
    fn kerberos_only_is_not_supported_when_enabled() {
        let kerberos = ServiceSettings {
            allowed_authentication_type: 1,
            ..enabled()
        };
        assert_eq!(
            error_of(kerberos),
            (ReturnCode::NotSupported, "AllowedAuthenticationType")
        );
        let disabled = ServiceSettings {
            allowed_authentication_type: 1,
            ..ServiceSettings::default()
        };
        assert_eq!(disabled.validate(), Ok(()));
        let undefined = ServiceSettings {
            allowed_authentication_type: 0,
            ..enabled()
        };
        assert_eq!(
            error_of(undefined),
            (ReturnCode::InvalidParameter, "AllowedAuthenticationType")
        );
        let four = ServiceSettings {
            allowed_authentication_type: 4,
            ..ServiceSettings::default()
        };
        assert_eq!(error_of(four).0, ReturnCode::InvalidParameter);
    }

    #[test]
    fn certificate_needs_a_thumbprint_when_enabled() {
        let missing = ServiceSettings {
            certificate_thumbprint: None,
            ..enabled()
        };
        assert_eq!(
            error_of(missing),
            (ReturnCode::InvalidParameter, "CertificateThumbPrint")
        );
        let malformed = ServiceSettings {
            certificate_thumbprint: Some("xyz".into()),
            ..enabled()
        };
        assert_eq!(error_of(malformed).1, "CertificateThumbPrint");
    }

    #[test]
    fn ports_must_be_non_zero() {
        assert_eq!(
            error_of(ServiceSettings {
                http_port: 0,
                ..enabled()
            })
            .1,
            "HttpPort"
        );
        assert_eq!(
            error_of(ServiceSettings {
                https_port: 0,
                ..enabled()
            })
            .1,
            "HttpsPort"
        );
    }

    #[test]
    fn monitoring_window_is_1_hour_to_7_days() {
        assert_eq!(
            ServiceSettings {
                monitoring_interval: 3600,
                ..enabled()
            }
            .validate(),
            Ok(())
        );
        assert_eq!(
            ServiceSettings {
                monitoring_interval: 604_800,
                ..enabled()
            }
            .validate(),
            Ok(())
        );
        assert_eq!(
            error_of(ServiceSettings {
                monitoring_interval: 3599,
                ..enabled()
            })
            .1,
            "MonitoringInterval"
        );
        assert_eq!(
            error_of(ServiceSettings {
                monitoring_interval: 604_801,
                ..enabled()
            })
            .1,
            "MonitoringInterval"
        );
        assert_eq!(
            error_of(ServiceSettings {
                monitoring_start_time: 86_400,
                ..enabled()
            })
            .1,
            "MonitoringStartTime"
        );
    }
}
