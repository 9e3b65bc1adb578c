//! The resources of docs/protocol.md §1, parsed from a request's method and path before anything
//! is looked up. Only GUIDs and decimal numbers become values; every other segment is refused.

use uuid::Uuid;

/// A request the replica serves (protocol version 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `POST /vmreplica/hello`.
    Hello,
    /// `POST /vmreplica/v1/test`.
    Test,
    /// `PUT /vmreplica/v1/vms/{vm}`.
    PutVm(Uuid),
    /// `GET /vmreplica/v1/vms/{vm}`.
    GetVm(Uuid),
    /// `PATCH /vmreplica/v1/vms/{vm}/logs/{seq}`.
    UploadLog(Uuid, u64),
    /// `GET /vmreplica/v1/vms/{vm}/logs/{seq}`.
    LogStatus(Uuid, u64),
    /// `POST /vmreplica/v1/vms/{vm}/logs/{seq}/commit`.
    CommitLog(Uuid, u64),
    /// `POST /vmreplica/v1/vms/{vm}/compare`.
    BeginCompare(Uuid),
    /// `GET /vmreplica/v1/vms/{vm}/compare/{id}`.
    CompareStatus(Uuid, Uuid),
    /// `DELETE /vmreplica/v1/vms/{vm}/compare/{id}`.
    CancelCompare(Uuid, Uuid),
    /// `POST /vmreplica/v1/vms/{vm}/compare/{id}/ranges`.
    CompareRange(Uuid, Uuid),
    /// `GET /vmreplica/v1/vms/{vm}/compare/{id}/base/{disk}`: a failback compare's candidate
    /// blocks and block-hash map of one disk (§5.8).
    CompareBase(Uuid, Uuid, u32),
    /// `POST /vmreplica/v1/vms/{vm}/failback`: the old primary asks this host (the new primary)
    /// to bring it back (§5.8).
    StartFailback(Uuid),
    /// `GET /vmreplica/v1/vms/{vm}/failback`.
    FailbackStatus(Uuid),
    /// `DELETE /vmreplica/v1/vms/{vm}/failback`: cancels it.
    CancelFailback(Uuid),
}

/// Why a path is not a [`Route`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// A `{vm}`, `{id}` or `{seq}` segment is not a GUID or a decimal sequence number (400
    /// `BadRequest`).
    #[error("path segment {segment:?} is not {expected}")]
    BadSegment {
        segment: String,
        expected: &'static str,
    },
    /// `/vmreplica/v{n}/` with a version this build does not speak (400 `UnsupportedVersion`).
    #[error("protocol version {0} is not supported")]
    UnsupportedVersion(String),
    /// A path or method this version does not serve, the reserved ones included (404
    /// `UnknownResource`).
    #[error("no such resource")]
    Unknown,
}

/// Longest path considered; anything longer is not a resource of ours.
const MAX_PATH: usize = 256;

/// A GUID in 36-character hyphenated text, any case, nothing else.
pub fn parse_guid(segment: &str) -> Option<Uuid> {
    let b = segment.as_bytes();
    if b.len() != 36 {
        return None;
    }
    for (i, c) in b.iter().enumerate() {
        let hyphen = matches!(i, 8 | 13 | 18 | 23);
        if hyphen != (*c == b'-') || (!hyphen && !c.is_ascii_hexdigit()) {
            return None;
        }
    }
    Uuid::parse_str(segment).ok()
}

/// Most disks a VM may have (the disk index of a route is below it).
pub const MAX_DISKS: u32 = 64;

/// A disk index: decimal `0 ..= 63` without sign or leading zeros.
pub fn parse_disk_index(segment: &str) -> Option<u32> {
    let b = segment.as_bytes();
    if b.is_empty() || b.len() > 2 || (b.len() > 1 && b[0] == b'0') {
        return None;
    }
    if !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    segment.parse().ok().filter(|d| *d < MAX_DISKS)
}

/// A sequence number: decimal `u64` ≥ 1 without sign or leading zeros.
pub fn parse_sequence(segment: &str) -> Option<u64> {
    let b = segment.as_bytes();
    if b.is_empty() || b.len() > 20 || b[0] == b'0' || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    segment.parse().ok().filter(|s| *s >= 1)
}

impl Route {
    /// The route of `method` (upper case, as HTTP sends it) and `path` (without query).
    pub fn parse(method: &str, path: &str) -> Result<Route, RouteError> {
        if path.len() > MAX_PATH {
            return Err(RouteError::Unknown);
        }
        let Some(rest) = path.strip_prefix("/vmreplica/") else {
            return Err(RouteError::Unknown);
        };
        if rest == "hello" {
            return match method {
                "POST" => Ok(Route::Hello),
                _ => Err(RouteError::Unknown),
            };
        }
        let (version, rest) = rest.split_once('/').unwrap_or((rest, ""));
        match version {
            "v1" => {}
            v if v.len() > 1
                && v.starts_with('v')
                && v[1..].bytes().all(|c| c.is_ascii_digit()) =>
            {
                return Err(RouteError::UnsupportedVersion(v[1..].to_string()))
            }
            _ => return Err(RouteError::Unknown),
        }
        let segments: Vec<&str> = rest.split('/').collect();
        let vm = |s: &str| {
            parse_guid(s).ok_or_else(|| RouteError::BadSegment {
                segment: s.chars().take(64).collect(),
                expected: "a GUID",
            })
        };
        let seq = |s: &str| {
            parse_sequence(s).ok_or_else(|| RouteError::BadSegment {
                segment: s.chars().take(64).collect(),
                expected: "a sequence number",
            })
        };
        match (method, segments.as_slice()) {
            ("POST", ["test"]) => Ok(Route::Test),
            (_, ["vms", id]) => {
                let id = vm(id)?;
                match method {
                    "PUT" => Ok(Route::PutVm(id)),
                    "GET" => Ok(Route::GetVm(id)),
                    _ => Err(RouteError::Unknown),
                }
            }
            (_, ["vms", id, "logs", s]) => {
                let (id, s) = (vm(id)?, seq(s)?);
                match method {
                    "PATCH" => Ok(Route::UploadLog(id, s)),
                    "GET" => Ok(Route::LogStatus(id, s)),
                    _ => Err(RouteError::Unknown),
                }
            }
            ("POST", ["vms", id, "logs", s, "commit"]) => Ok(Route::CommitLog(vm(id)?, seq(s)?)),
            ("POST", ["vms", id, "compare"]) => Ok(Route::BeginCompare(vm(id)?)),
            (_, ["vms", id, "compare", c]) => {
                let (id, c) = (vm(id)?, vm(c)?);
                match method {
                    "GET" => Ok(Route::CompareStatus(id, c)),
                    "DELETE" => Ok(Route::CancelCompare(id, c)),
                    _ => Err(RouteError::Unknown),
                }
            }
            ("POST", ["vms", id, "compare", c, "ranges"]) => {
                Ok(Route::CompareRange(vm(id)?, vm(c)?))
            }
            ("GET", ["vms", id, "compare", c, "base", d]) => {
                let (id, c) = (vm(id)?, vm(c)?);
                let d = parse_disk_index(d).ok_or_else(|| RouteError::BadSegment {
                    segment: d.chars().take(64).collect(),
                    expected: "a disk index",
                })?;
                Ok(Route::CompareBase(id, c, d))
            }
            (_, ["vms", id, "failback"]) => {
                let id = vm(id)?;
                match method {
                    "POST" => Ok(Route::StartFailback(id)),
                    "GET" => Ok(Route::FailbackStatus(id)),
                    "DELETE" => Ok(Route::CancelFailback(id)),
                    _ => Err(RouteError::Unknown),
                }
            }
            (_, ["vms", id, ..]) => {
                vm(id)?;
                Err(RouteError::Unknown)
            }
            _ => Err(RouteError::Unknown),
        }
    }

    /// The path of this route (what the primary requests).
    pub fn path(&self) -> String {
        match self {
            Route::Hello => "/vmreplica/hello".into(),
            Route::Test => "/vmreplica/v1/test".into(),
            Route::PutVm(vm) | Route::GetVm(vm) => format!("/vmreplica/v1/vms/{vm}"),
            Route::UploadLog(vm, s) | Route::LogStatus(vm, s) => {
                format!("/vmreplica/v1/vms/{vm}/logs/{s}")
            }
            Route::CommitLog(vm, s) => format!("/vmreplica/v1/vms/{vm}/logs/{s}/commit"),
            Route::BeginCompare(vm) => format!("/vmreplica/v1/vms/{vm}/compare"),
            Route::CompareStatus(vm, c) | Route::CancelCompare(vm, c) => {
                format!("/vmreplica/v1/vms/{vm}/compare/{c}")
            }
            Route::CompareRange(vm, c) => format!("/vmreplica/v1/vms/{vm}/compare/{c}/ranges"),
            Route::CompareBase(vm, c, d) => format!("/vmreplica/v1/vms/{vm}/compare/{c}/base/{d}"),
            Route::StartFailback(vm) | Route::FailbackStatus(vm) | Route::CancelFailback(vm) => {
                format!("/vmreplica/v1/vms/{vm}/failback")
            }
        }
    }

    /// The HTTP method of this route.
    pub fn method(&self) -> &'static str {
        match self {
            Route::Hello
            | Route::Test
            | Route::CommitLog(..)
            | Route::BeginCompare(_)
            | Route::CompareRange(..)
            | Route::StartFailback(_) => "POST",
            Route::PutVm(_) => "PUT",
            Route::GetVm(_)
            | Route::LogStatus(..)
            | Route::CompareStatus(..)
            | Route::CompareBase(..)
            | Route::FailbackStatus(_) => "GET",
            Route::CancelCompare(..) | Route::CancelFailback(_) => "DELETE",
            Route::UploadLog(..) => "PATCH",
        }
    }

    /// The VM the route names, if any (authorization binds it, §2.3 step 3).
    pub fn vm(&self) -> Option<Uuid> {
        match self {
            Route::Hello | Route::Test => None,
            Route::PutVm(vm)
            | Route::GetVm(vm)
            | Route::UploadLog(vm, _)
            | Route::LogStatus(vm, _)
            | Route::CommitLog(vm, _)
            | Route::BeginCompare(vm)
            | Route::CompareStatus(vm, _)
            | Route::CancelCompare(vm, _)
            | Route::CompareRange(vm, _)
            | Route::CompareBase(vm, _, _)
            | Route::StartFailback(vm)
            | Route::FailbackStatus(vm)
            | Route::CancelFailback(vm) => Some(*vm),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM: &str = "5c3e4e2a-9f1b-4d5e-8a7b-1c2d3e4f5a6b";

    #[test]
    fn every_route_round_trips() {
        let vm = Uuid::parse_str(VM).unwrap();
        for r in [
            Route::Hello,
            Route::Test,
            Route::PutVm(vm),
            Route::GetVm(vm),
            Route::UploadLog(vm, 42),
            Route::LogStatus(vm, 1),
            Route::CommitLog(vm, u64::MAX),
            Route::BeginCompare(vm),
            Route::CompareStatus(vm, vm),
            Route::CancelCompare(vm, vm),
            Route::CompareRange(vm, vm),
            Route::CompareBase(vm, vm, 0),
            Route::CompareBase(vm, vm, 63),
            Route::StartFailback(vm),
            Route::FailbackStatus(vm),
            Route::CancelFailback(vm),
        ] {
            assert_eq!(Route::parse(r.method(), &r.path()), Ok(r));
        }
    }

    #[test]
    fn segments_that_are_not_guids_or_numbers_are_refused() {
        for path in [
            "/vmreplica/v1/vms/..%2F..%2Fetc",
            "/vmreplica/v1/vms/../../etc",
            "/vmreplica/v1/vms/{5c3e4e2a-9f1b-4d5e-8a7b-1c2d3e4f5a6b}",
            "/vmreplica/v1/vms/5c3e4e2a9f1b4d5e8a7b1c2d3e4f5a6b",
        ] {
            assert!(
                matches!(
                    Route::parse("PUT", path),
                    Err(RouteError::BadSegment { .. })
                ),
                "{path}"
            );
        }
        for seq in ["0", "01", "+1", "-1", "18446744073709551616", "1e3", ""] {
            let path = format!("/vmreplica/v1/vms/{VM}/logs/{seq}");
            assert!(
                matches!(
                    Route::parse("PATCH", &path),
                    Err(RouteError::BadSegment { .. })
                ),
                "{seq}"
            );
        }
        for d in ["64", "00", "01", "-1", "x", ""] {
            let path = format!("/vmreplica/v1/vms/{VM}/compare/{VM}/base/{d}");
            assert!(
                matches!(
                    Route::parse("GET", &path),
                    Err(RouteError::BadSegment { .. })
                ),
                "{d}"
            );
        }
        assert_eq!(
            Route::parse("GET", &format!("/vmreplica/v1/vms/{}", VM.to_uppercase())),
            Ok(Route::GetVm(Uuid::parse_str(VM).unwrap()))
        );
    }

    #[test]
    fn unknown_versions_and_reserved_paths() {
        assert_eq!(
            Route::parse("POST", "/vmreplica/v2/test"),
            Err(RouteError::UnsupportedVersion("2".into()))
        );
        for (m, p) in [
            ("GET", "/vmreplica/hello"),
            ("DELETE", &format!("/vmreplica/v1/vms/{VM}") as &str),
            ("POST", &format!("/vmreplica/v1/vms/{VM}/reverse")),
            ("PUT", &format!("/vmreplica/v1/vms/{VM}/failback")),
            ("GET", "/"),
            ("GET", "/vmreplica/v1"),
        ] {
            assert_eq!(Route::parse(m, p), Err(RouteError::Unknown), "{m} {p}");
        }
    }
}
