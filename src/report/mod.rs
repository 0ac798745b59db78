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
    use super::printable;

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
