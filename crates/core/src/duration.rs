//! Durations as people write them in zaps: `500ms`, `90s`, `15m`, `1h30m`,
//! `2d`.

use std::time::Duration;

/// Reads `text`: one or more whole numbers, each with a unit (`ms`, `s`,
/// `m`, `h`, `d`).
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let invalid = || format!("{text:?} is not a duration; write e.g. 500ms, 90s, 15m, 1h30m, 2d");
    if text.is_empty() {
        return Err(invalid());
    }
    let mut total = 0u64;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        let unit_len = rest[digits..]
            .chars()
            .take_while(char::is_ascii_alphabetic)
            .count();
        let (number, unit) = (&rest[..digits], &rest[digits..digits + unit_len]);
        let millis_per_unit = match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(invalid()),
        };
        let number: u64 = number.parse().map_err(|_| invalid())?;
        total = number
            .checked_mul(millis_per_unit)
            .and_then(|millis| total.checked_add(millis))
            .ok_or_else(|| format!("{text:?} is too long"))?;
        rest = &rest[digits + unit_len..];
    }
    Ok(Duration::from_millis(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_units_and_sums() {
        let cases = [
            ("500ms", 500),
            ("90s", 90_000),
            ("15m", 900_000),
            ("1h30m", 5_400_000),
            ("2d", 172_800_000),
            (" 2s ", 2000),
        ];
        for (text, millis) in cases {
            assert_eq!(parse(text), Ok(Duration::from_millis(millis)), "{text}");
        }
    }

    #[test]
    fn refuses_what_is_not_a_duration() {
        for text in [
            "",
            "5",
            "s",
            "5 s",
            "5w",
            "-5s",
            "1.5h",
            "99999999999999999999d",
        ] {
            assert!(parse(text).is_err(), "{text}");
        }
    }
}
