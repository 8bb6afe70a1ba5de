//! Durations (`90s`, `15m`, `24h`, `7d`, `2w`) and UTC timestamps (RFC 3339, `Z` only),
//! without a date library: the CLI only needs whole seconds in UTC.

use anyhow::{bail, Context, Result};

/// Seconds since the Unix epoch, now.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Parses `<n><unit>` with unit s, m, h, d or w.
pub fn parse_duration(text: &str) -> Result<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .with_context(|| format!("duration {text:?} needs a unit: s, m, h, d or w (e.g. 24h)"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .with_context(|| format!("duration {text:?} must start with a whole number"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => bail!("duration {text:?}: unit must be s, m, h, d or w"),
    };
    n.checked_mul(scale)
        .with_context(|| format!("duration {text:?} is too long"))
}

/// The last instant a time may name, 9999-12-31T23:59:59Z: the store keeps signed 64-bit
/// seconds, and an instant beyond them must be an error, never a silent "no expiry".
pub const MAX_INSTANT: u64 = 253_402_300_799;

/// `now` plus a duration (`24h`, `90d`), within [`MAX_INSTANT`].
pub fn after(now: u64, duration: &str) -> Result<u64> {
    let seconds = parse_duration(duration)?;
    now.checked_add(seconds)
        .filter(|&at| at <= MAX_INSTANT)
        .with_context(|| format!("duration {duration:?} reaches past 9999-12-31T23:59:59Z"))
}

/// Parses `YYYY-MM-DDTHH:MM:SSZ` or whole Unix seconds, up to [`MAX_INSTANT`].
pub fn parse_instant(text: &str) -> Result<u64> {
    let seconds = parse_instant_unchecked(text)?;
    if seconds > MAX_INSTANT {
        bail!("{text:?} is after 9999-12-31T23:59:59Z, the last time tokengate keeps");
    }
    Ok(seconds)
}

fn parse_instant_unchecked(text: &str) -> Result<u64> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse::<u64>()
            .with_context(|| format!("{text:?} is out of range"));
    }
    let bad = || format!("{text:?} is not a UTC time like 2027-01-31T00:00:00Z or Unix seconds");
    let b = text.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
    {
        bail!(bad());
    }
    let field = |range: std::ops::Range<usize>| text[range].parse::<i64>().with_context(bad);
    let (year, month, day) = (field(0..4)?, field(5..7)?, field(8..10)?);
    let (hour, minute, second) = (field(11..13)?, field(14..16)?, field(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 59
    {
        bail!(bad());
    }
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second;
    u64::try_from(seconds).with_context(bad)
}

/// Formats Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_instant(seconds: u64) -> String {
    let days = (seconds / 86_400) as i64;
    let rem = seconds % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// Howard Hinnant's algorithms for the proleptic Gregorian calendar.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap(), 90);
        assert_eq!(parse_duration("24h").unwrap(), 86_400);
        assert_eq!(parse_duration("7d").unwrap(), 604_800);
        assert!(parse_duration("7").is_err());
        assert!(parse_duration("d").is_err());
        assert!(parse_duration("5y").is_err());
    }

    #[test]
    fn instants_round_trip() {
        assert_eq!(
            parse_instant("2026-01-01T00:00:00Z").unwrap(),
            1_767_225_600
        );
        assert_eq!(format_instant(1_767_225_600), "2026-01-01T00:00:00Z");
        assert_eq!(format_instant(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(
            parse_instant(&format_instant(4_102_444_799)).unwrap(),
            4_102_444_799
        );
        assert!(parse_instant("2026-13-01T00:00:00Z").is_err());
        assert!(parse_instant("yesterday").is_err());
    }
}
