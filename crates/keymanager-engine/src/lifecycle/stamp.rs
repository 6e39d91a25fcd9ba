//! The liveness-stamp codec: Unix seconds in decimal, as KMS tags and labels hold them.
//!
//! Anyone who may tag one key of the account can write any text into a stamp, so parsing
//! is total: text that is not a plain decimal number of seconds between the epoch and the
//! year 9999 is no evidence at all, never a panic or an overflow.

use std::time::{Duration, SystemTime};

/// 9999-12-31T23:59:59Z: no clock writes a later stamp; anything beyond is junk.
const LATEST: u64 = 253_402_300_799;

/// The stamp text for `at` (`"1795450839"`). Times before the epoch stamp as `0`.
pub fn stamp_text(at: SystemTime) -> String {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        .to_string()
}

/// Reads a stamp written by [`stamp_text`]; anything else (signs, spaces, fractions,
/// absurd values) is `None`: no evidence.
pub fn parse_stamp(text: &str) -> Option<SystemTime> {
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: u64 = text.parse().ok()?;
    if secs > LATEST {
        return None;
    }
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_450_839);
        assert_eq!(stamp_text(at), "1795450839");
        assert_eq!(parse_stamp("1795450839"), Some(at));
        assert_eq!(parse_stamp("0"), Some(SystemTime::UNIX_EPOCH));
        assert_eq!(
            parse_stamp(&LATEST.to_string()).map(stamp_text),
            Some(LATEST.to_string())
        );
    }

    #[test]
    fn overflowing_negative_and_junk_stamps_are_no_evidence() {
        for junk in [
            "18446744073709551615", // u64::MAX: valid tag and label text; once a panic
            "18446744073709551616",
            "99999999999999999999999",
            "253402300800",
            "-1",
            "+5",
            " 5",
            "5 ",
            "1.5",
            "1e9",
            "",
            "yesterday",
            "0x10",
            "١٢٣", // Arabic-Indic digits are not ASCII digits
        ] {
            assert_eq!(parse_stamp(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn no_input_panics() {
        // A cheap exhaustive-ish sweep of short strings over the interesting alphabet.
        let alphabet = ['0', '1', '9', '-', '+', ' ', 'e', '.', '\u{0}'];
        let mut inputs = vec![String::new()];
        for _ in 0..4 {
            let mut next = Vec::new();
            for s in &inputs {
                for c in alphabet {
                    let mut t = s.clone();
                    t.push(c);
                    next.push(t);
                }
            }
            inputs.extend(next);
        }
        for s in inputs {
            let _ = parse_stamp(&s);
        }
        for n in [u64::MAX, u64::MAX / 2, LATEST, LATEST + 1, 1 << 40] {
            let _ = parse_stamp(&n.to_string());
        }
    }
}
