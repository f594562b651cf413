//! CNI versions this plugin speaks, and version negotiation.
//!
//! Source: CNI spec 1.1.0, "Version" (`VERSION` verb, `supportedVersions`) and the
//! network configuration list's `cniVersions` field.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

/// A CNI spec version, e.g. `1.0.0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CniVersion {
    major: u16,
    minor: u16,
    patch: u16,
}

impl CniVersion {
    /// Version 0.3.0, the oldest one this plugin accepts.
    pub const V0_3_0: CniVersion = CniVersion::new(0, 3, 0);
    /// Version 0.3.1.
    pub const V0_3_1: CniVersion = CniVersion::new(0, 3, 1);
    /// Version 0.4.0, which introduced CHECK.
    pub const V0_4_0: CniVersion = CniVersion::new(0, 4, 0);
    /// Version 1.0.0, which dropped the per-IP `version` field from results.
    pub const V1_0_0: CniVersion = CniVersion::new(1, 0, 0);
    /// Version 1.1.0, which introduced STATUS and GC.
    pub const V1_1_0: CniVersion = CniVersion::new(1, 1, 0);

    /// Every version this plugin supports, oldest first (the `supportedVersions` answer).
    pub const SUPPORTED: [CniVersion; 5] = [
        Self::V0_3_0,
        Self::V0_3_1,
        Self::V0_4_0,
        Self::V1_0_0,
        Self::V1_1_0,
    ];

    /// The newest supported version.
    pub const LATEST: CniVersion = Self::V1_1_0;

    const fn new(major: u16, minor: u16, patch: u16) -> Self {
        CniVersion {
            major,
            minor,
            patch,
        }
    }

    /// Whether this plugin supports the version.
    pub fn is_supported(self) -> bool {
        Self::SUPPORTED.contains(&self)
    }

    /// Whether results of this version carry the per-IP `version` field (spec < 1.0.0).
    pub fn has_ip_version_field(self) -> bool {
        self < Self::V1_0_0
    }

    /// Picks the version to use from a `cniVersions` list: the newest one that this plugin
    /// supports. Entries that do not parse are ignored. `None` when there is no overlap.
    pub fn negotiate<'a>(offered: impl IntoIterator<Item = &'a str>) -> Option<CniVersion> {
        offered
            .into_iter()
            .filter_map(|v| v.parse::<CniVersion>().ok())
            .filter(|v| v.is_supported())
            .max()
    }
}

impl Ord for CniVersion {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.major, self.minor, self.patch).cmp(&(other.major, other.minor, other.patch))
    }
}

impl PartialOrd for CniVersion {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// A version string that is not `MAJOR.MINOR.PATCH`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a CNI version (expected MAJOR.MINOR.PATCH, e.g. 1.0.0)")]
pub struct ParseVersionError(String);

impl FromStr for CniVersion {
    type Err = ParseVersionError;

    /// Parses `MAJOR.MINOR.PATCH`. A missing patch (`0.3`) is read as `.0`, as libcni does.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseVersionError(s.to_owned());
        let mut parts = s.split('.');
        let mut next = |required: bool| -> Result<u16, ParseVersionError> {
            match parts.next() {
                Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                    p.parse().map_err(|_| err())
                }
                None if !required => Ok(0),
                _ => Err(err()),
            }
        };
        let v = CniVersion::new(next(true)?, next(true)?, next(false)?);
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_orders() {
        let v: CniVersion = "0.3.1".parse().unwrap();
        assert_eq!(v, CniVersion::V0_3_1);
        assert_eq!("0.4".parse::<CniVersion>().unwrap(), CniVersion::V0_4_0);
        assert!(CniVersion::V0_4_0 < CniVersion::V1_0_0);
        assert_eq!(CniVersion::V1_1_0.to_string(), "1.1.0");
        for bad in ["", "1", "1.x.0", "1.0.0.0", "v1.0.0", "-1.0.0", "1..0"] {
            assert!(bad.parse::<CniVersion>().is_err(), "{bad}");
        }
    }

    #[test]
    fn negotiates_newest_common_version() {
        assert_eq!(
            CniVersion::negotiate(["0.3.1", "1.0.0", "2.0.0", "junk"]),
            Some(CniVersion::V1_0_0)
        );
        assert_eq!(CniVersion::negotiate(["0.2.0", "9.9.9"]), None);
    }

    #[test]
    fn ip_version_field_only_before_1_0() {
        assert!(CniVersion::V0_4_0.has_ip_version_field());
        assert!(!CniVersion::V1_0_0.has_ip_version_field());
    }
}
