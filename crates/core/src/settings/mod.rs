//! Typed, validated settings: what the daemon makes of the embedded `Msvm_ReplicationSettingData`,
//! `Msvm_ReplicationServiceSettingData` and `Msvm_ReplicationAuthorizationSettingData` instances
//! (spec §6, §7, §8). Time-of-day values are seconds since midnight. `validate()` returns the first
//! problem as a [`SettingsError`] whose message names the CIM property and the allowed values.

mod authorization;
mod failover_network;
mod names;
mod replication;
mod service;

use crate::codes::ReturnCode;

pub use authorization::AuthorizationEntry;
pub use failover_network::{
    ipv4_mask, FailoverNetworkSettings, PROTOCOL_IPV4, PROTOCOL_IPV4_V6, PROTOCOL_IPV6,
};
pub use names::{is_dns_host_name, normalize_thumbprint};
pub use replication::ReplicationSettings;
pub use service::ServiceSettings;

/// Seconds in a day: time-of-day settings must be below it.
pub const SECONDS_PER_DAY: u32 = 86_400;

/// A setting that cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// The value is outside what the property allows (→ 32773 Invalid parameter).
    #[error("{property}: {message}")]
    Invalid {
        property: &'static str,
        message: String,
    },
    /// The value is valid in Hyper-V but this implementation does not support it (→ 32770).
    #[error("{property}: {message}")]
    Unsupported {
        property: &'static str,
        message: String,
    },
}

impl SettingsError {
    /// The CIM return code the daemon answers with.
    pub fn return_code(&self) -> ReturnCode {
        match self {
            SettingsError::Invalid { .. } => ReturnCode::InvalidParameter,
            SettingsError::Unsupported { .. } => ReturnCode::NotSupported,
        }
    }

    /// The CIM property the error is about.
    pub fn property(&self) -> &'static str {
        match self {
            SettingsError::Invalid { property, .. }
            | SettingsError::Unsupported { property, .. } => property,
        }
    }

    pub(crate) fn invalid(property: &'static str, message: impl Into<String>) -> Self {
        SettingsError::Invalid {
            property,
            message: message.into(),
        }
    }

    pub(crate) fn unsupported(property: &'static str, message: impl Into<String>) -> Self {
        SettingsError::Unsupported {
            property,
            message: message.into(),
        }
    }
}

/// Checks a time-of-day value (seconds since midnight).
pub(crate) fn check_time_of_day(property: &'static str, seconds: u32) -> Result<(), SettingsError> {
    if seconds >= SECONDS_PER_DAY {
        return Err(SettingsError::invalid(
            property,
            format!("must be a time of day, 0 to 86399 seconds after midnight; got {seconds}."),
        ));
    }
    Ok(())
}

/// Checks a certificate thumbprint that must be present.
pub(crate) fn check_required_thumbprint(
    property: &'static str,
    thumbprint: Option<&str>,
) -> Result<(), SettingsError> {
    let Some(text) = thumbprint.filter(|t| !t.trim().is_empty()) else {
        return Err(SettingsError::invalid(
            property,
            "is required with certificate authentication.",
        ));
    };
    check_thumbprint(property, text)
}

/// Checks the form of a thumbprint that was given.
pub(crate) fn check_thumbprint(property: &'static str, text: &str) -> Result<(), SettingsError> {
    if normalize_thumbprint(text).is_none() {
        return Err(SettingsError::invalid(
            property,
            format!(
                "must be 40 (SHA-1) or 64 (SHA-256) hexadecimal digits, spaces allowed; got \"{text}\"."
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_follow_the_kind() {
        assert_eq!(
            SettingsError::invalid("ReplicationInterval", "x")
                .return_code()
                .code(),
            32773
        );
        assert_eq!(
            SettingsError::unsupported("AuthenticationType", "x")
                .return_code()
                .code(),
            32770
        );
    }

    #[test]
    fn message_names_the_property() {
        let error = SettingsError::invalid("RecoveryHistory", "must be 0 to 24.");
        assert_eq!(error.to_string(), "RecoveryHistory: must be 0 to 24.");
        assert_eq!(error.property(), "RecoveryHistory");
    }

    #[test]
    fn time_of_day_bounds() {
        assert!(check_time_of_day("MonitoringStartTime", 86_399).is_ok());
        assert!(check_time_of_day("MonitoringStartTime", 86_400).is_err());
    }

    #[test]
    fn thumbprint_presence() {
        assert!(check_required_thumbprint("CertificateThumbPrint", None).is_err());
        assert!(check_required_thumbprint("CertificateThumbPrint", Some("  ")).is_err());
        assert!(check_required_thumbprint("CertificateThumbPrint", Some(&"a".repeat(40))).is_ok());
    }
}
