//! Segment names. Clients may only refer to segments by a bare name of the form
//! `azm_<uid>_<pid>_<seq>`, which the daemon looks up in `/dev/shm` itself; it never
//! opens a path a client sends.

use std::path::PathBuf;

/// Where POSIX shared-memory objects live on Linux.
pub const SHM_DIR: &str = "/dev/shm";

/// Longest name we accept (NAME_MAX); anything longer cannot be a real segment.
const MAX_NAME_LEN: usize = 255;

/// The parts of a well-formed segment name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentName {
    pub uid: u32,
    pub pid: u64,
    pub seq: u64,
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Parses `azm_<digits>_<digits>_<digits>` exactly; `None` for anything else
/// (slashes, dots, signs, empty parts, extra parts, overlong numbers).
pub fn parse(name: &str) -> Option<SegmentName> {
    if name.len() > MAX_NAME_LEN {
        return None;
    }
    let rest = name.strip_prefix("azm_")?;
    let mut parts = rest.split('_');
    let (uid, pid, seq) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || ![uid, pid, seq].iter().all(|p| all_digits(p)) {
        return None;
    }
    Some(SegmentName {
        uid: uid.parse().ok()?,
        pid: pid.parse().ok()?,
        seq: seq.parse().ok()?,
    })
}

/// Accepts `name` only if it is well formed and its uid part is `uid` written the
/// canonical way (no leading zeros), i.e. exactly `^azm_<uid>_\d+_\d+$`.
pub fn validate_for_uid(name: &str, uid: u32) -> Result<SegmentName, String> {
    let parsed = parse(name)
        .ok_or_else(|| format!("segment name {name:?} is not of the form azm_<uid>_<pid>_<seq>"))?;
    let expected_prefix = format!("azm_{uid}_");
    if parsed.uid != uid || !name.starts_with(&expected_prefix) {
        return Err(format!(
            "segment {name:?} does not belong to the connected user (uid {uid})"
        ));
    }
    Ok(parsed)
}

/// The file backing a (validated) segment name.
pub fn path_of(name: &str) -> PathBuf {
    PathBuf::from(SHM_DIR).join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_well_formed_names() {
        assert_eq!(
            parse("azm_1000_42_7"),
            Some(SegmentName {
                uid: 1000,
                pid: 42,
                seq: 7
            })
        );
        assert!(validate_for_uid("azm_0_1_0", 0).is_ok());
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "",
            "azm_",
            "azm_1_2",
            "azm_1_2_3_4",
            "azm_1_2_",
            "azm__2_3",
            "azm_1_2_3/x",
            "../etc/passwd",
            "/dev/shm/azm_1_2_3",
            "azm_1_2_3.",
            "azm_1_+2_3",
            "azm_1_-2_3",
            "xazm_1_2_3",
            "azm_1 _2_3",
            "azm_99999999999_2_3",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(parse(&format!("azm_1_2_{}", "9".repeat(300))), None);
    }

    #[test]
    fn uid_must_match_exactly() {
        assert!(validate_for_uid("azm_1000_2_3", 1001).is_err());
        assert!(validate_for_uid("azm_01000_2_3", 1000).is_err());
        assert!(validate_for_uid("azm_1000_2_3", 1000).is_ok());
    }
}
