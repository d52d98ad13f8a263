//! Operator tables: aligned columns and the small formatters `status` and `usage` share.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use serde_json::Value;

/// A cell as it may reach a terminal: control characters from what an upstream said (a model
/// name, say) escaped, so it can neither move the cursor nor end the row and forge the next.
pub(crate) fn plain(cell: &str) -> String {
    crate::proxy::scrub::OneLine(cell).to_string()
}

/// Renders rows under a header as aligned columns (two spaces apart; the last column unpadded).
/// Cells are made [`plain`].
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|c| plain(c)).collect())
        .collect();
    let rows = rows.as_slice();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let width = widths.get(i).copied().unwrap_or(0);
                let pad = width.saturating_sub(cell.chars().count());
                let _ = write!(line, "{cell}{}  ", " ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `12 ms`, `1.4 ms`, `2.3 s`.
pub(crate) fn fmt_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else if ms >= 10.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

pub(crate) fn fmt_secs(secs: u64) -> String {
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// An RFC 3339 time relative to now: `2m 3s ago`, `in 8s`, `now`.
pub(crate) fn relative(rfc3339: &str) -> String {
    let Ok(t) = humantime::parse_rfc3339_weak(rfc3339) else {
        return rfc3339.to_string();
    };
    let now = SystemTime::now();
    match t.duration_since(now) {
        Ok(ahead) if ahead.as_secs() > 0 => format!("in {}", fmt_secs(ahead.as_secs())),
        Ok(_) => "now".into(),
        Err(e) if e.duration().as_secs() == 0 => "now".into(),
        Err(e) => format!("{} ago", fmt_secs(e.duration().as_secs())),
    }
}

pub(crate) fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

pub(crate) fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn tables_align_and_trim() {
        let t = table(
            &["A", "BB", "C"],
            &[
                vec!["xxx".into(), "y".into(), "z".into()],
                vec!["1".into(), "".into(), "".into()],
            ],
        );
        assert_eq!(t, "A    BB  C\nxxx  y   z\n1\n");
    }

    #[test]
    fn cells_cannot_reach_the_terminal() {
        let t = table(&["M", "N"], &[vec!["a\u{1b}[2J\nb".into(), "1".into()]]);
        assert_eq!(t, "M              N\na\\u{1b}[2J\\nb  1\n");
    }
}
