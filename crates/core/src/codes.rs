//! Method return codes of every replication method (spec §2.1).

use std::fmt;

use serde::{Deserialize, Serialize};

/// The `uint32` a CIM method returns. 0 and 4096 are success; everything from 32768 up is a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u32)]
pub enum ReturnCode {
    Completed = 0,
    JobStarted = 4096,
    Failed = 32768,
    AccessDenied = 32769,
    NotSupported = 32770,
    StatusUnknown = 32771,
    Timeout = 32772,
    InvalidParameter = 32773,
    SystemInUse = 32774,
    InvalidState = 32775,
    IncorrectDataType = 32776,
    SystemNotAvailable = 32777,
    OutOfMemory = 32778,
    FileNotFound = 32779,
}

impl ReturnCode {
    /// Every code, in numeric order.
    pub const ALL: [ReturnCode; 14] = [
        ReturnCode::Completed,
        ReturnCode::JobStarted,
        ReturnCode::Failed,
        ReturnCode::AccessDenied,
        ReturnCode::NotSupported,
        ReturnCode::StatusUnknown,
        ReturnCode::Timeout,
        ReturnCode::InvalidParameter,
        ReturnCode::SystemInUse,
        ReturnCode::InvalidState,
        ReturnCode::IncorrectDataType,
        ReturnCode::SystemNotAvailable,
        ReturnCode::OutOfMemory,
        ReturnCode::FileNotFound,
    ];

    /// The number on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The code for a number, if it is one of the documented codes.
    pub fn from_u32(value: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.code() == value)
    }

    /// The meaning documented in spec §2.1.
    pub fn description(self) -> &'static str {
        match self {
            ReturnCode::Completed => "Completed with no error",
            ReturnCode::JobStarted => "Method parameters checked, job started",
            ReturnCode::Failed => "Failed",
            ReturnCode::AccessDenied => "Access denied",
            ReturnCode::NotSupported => "Not supported",
            ReturnCode::StatusUnknown => "Status is unknown",
            ReturnCode::Timeout => "Timeout",
            ReturnCode::InvalidParameter => "Invalid parameter",
            ReturnCode::SystemInUse => "System is in use",
            ReturnCode::InvalidState => "Invalid state for this operation",
            ReturnCode::IncorrectDataType => "Incorrect data type",
            ReturnCode::SystemNotAvailable => "System is not available",
            ReturnCode::OutOfMemory => "Out of memory",
            ReturnCode::FileNotFound => "File not found",
        }
    }

    /// True for 0 and 4096.
    pub fn is_success(self) -> bool {
        matches!(self, ReturnCode::Completed | ReturnCode::JobStarted)
    }
}

impl fmt::Display for ReturnCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.code(), self.description())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Spec §2.1, written out by hand.
    #[test]
    fn numbers_match_the_spec() {
        assert_eq!(ReturnCode::Completed.code(), 0);
        assert_eq!(ReturnCode::JobStarted.code(), 4096);
        assert_eq!(ReturnCode::Failed.code(), 32768);
        assert_eq!(ReturnCode::AccessDenied.code(), 32769);
        assert_eq!(ReturnCode::NotSupported.code(), 32770);
        assert_eq!(ReturnCode::InvalidParameter.code(), 32773);
        assert_eq!(ReturnCode::SystemInUse.code(), 32774);
        assert_eq!(ReturnCode::InvalidState.code(), 32775);
        assert_eq!(ReturnCode::FileNotFound.code(), 32779);
    }

    #[test]
    fn descriptions_match_the_spec() {
        assert_eq!(ReturnCode::SystemInUse.description(), "System is in use");
        assert_eq!(
            ReturnCode::InvalidState.description(),
            "Invalid state for this operation"
        );
        assert_eq!(
            ReturnCode::JobStarted.description(),
            "Method parameters checked, job started"
        );
    }

    #[test]
    fn from_u32_round_trips_and_rejects_unknown() {
        for code in ReturnCode::ALL {
            assert_eq!(ReturnCode::from_u32(code.code()), Some(code));
        }
        assert_eq!(ReturnCode::from_u32(1), None);
        assert_eq!(ReturnCode::from_u32(32780), None);
    }

    #[test]
    fn display_shows_number_and_meaning() {
        assert_eq!(
            ReturnCode::InvalidState.to_string(),
            "32775 (Invalid state for this operation)"
        );
    }
}
