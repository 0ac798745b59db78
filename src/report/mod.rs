//! How results and progress reach people and scripts. Logic never prints; it hands data here.

pub mod events;
pub mod finding;
pub mod progress;
pub mod sync_report;

/// A byte count for people, in binary units (`23.44 KiB`, `1.50 GiB`): the units of the
/// progress bar, used by every line that shows a size so they can be compared.
pub fn size(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}

/// `YYYY-MM-DD HH:MM:SS UTC` for Unix seconds (civil-from-days, H. Hinnant's algorithm).
pub fn utc(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `text` safe to print on a terminal: control and other non-printable characters (ESC,
/// CR, bidi overrides) become Rust escapes such as `\u{1b}`. For text from outside, like
/// DNS records, which could otherwise move the cursor or recolour what the operator reads.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            // `escape_debug` would also escape quotes and backslashes, common in TXT values.
            '"' | '\'' | '\\' => c.to_string(),
            c => c.escape_debug().to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{printable, utc};

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_795_000_000), "2026-11-18 11:06:40 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
    }

    #[test]
    fn printable_escapes_terminal_controls_and_keeps_ordinary_record_text() {
        assert_eq!(
            printable("v=DKIM1; k=rsa; p=\"AB/+\\\""),
            "v=DKIM1; k=rsa; p=\"AB/+\\\""
        );
        assert_eq!(
            printable("ok\u{1b}[2J\r\nfake\u{202e}"),
            "ok\\u{1b}[2J\\r\\nfake\\u{202e}"
        );
    }
}
