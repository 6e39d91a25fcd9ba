//! Tables for people, JSON for scripts, and a progress line only on a terminal.

use std::io::{IsTerminal, Write};
use std::time::SystemTime;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// RFC 3339 UTC, or `-`.
pub fn when(t: Option<SystemTime>) -> String {
    t.and_then(|t| OffsetDateTime::from(t).format(&Rfc3339).ok())
        .unwrap_or_else(|| "-".into())
}

/// RFC 3339 UTC or JSON null.
pub fn when_json(t: Option<SystemTime>) -> serde_json::Value {
    t.and_then(|t| OffsetDateTime::from(t).format(&Rfc3339).ok())
        .map_or(serde_json::Value::Null, serde_json::Value::String)
}

/// Prints rows as aligned columns under `header`.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// A progress counter on stderr, drawn only when stderr is a terminal.
pub struct Progress {
    what: &'static str,
    total: usize,
    done: usize,
    on: bool,
}

impl Progress {
    /// Starts counting `total` steps of `what`.
    pub fn new(what: &'static str, total: usize) -> Self {
        Self {
            what,
            total,
            done: 0,
            on: std::io::stderr().is_terminal() && total > 0,
        }
    }

    /// One more step.
    pub fn tick(&mut self) {
        self.done += 1;
        if self.on {
            let width = 30;
            let filled = width * self.done / self.total.max(1);
            let mut err = std::io::stderr();
            let _ = write!(
                err,
                "\r[{}{}] {}/{} {}",
                "#".repeat(filled),
                " ".repeat(width - filled),
                self.done,
                self.total,
                self.what
            );
            let _ = err.flush();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if self.on {
            let _ = writeln!(std::io::stderr());
        }
    }
}

/// Asks a yes/no question on the terminal; `false` when stdin is not one.
pub fn confirm(question: &str) -> bool {
    if !std::io::stdin().is_terminal() {
        return false;
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).is_ok()
        && matches!(answer.trim(), "y" | "Y" | "yes" | "YES")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_times_are_rfc3339() {
        let out = table(
            &["ID", "STATE"],
            &[vec!["x509-CA-A".into(), "active".into()]],
        );
        assert_eq!(out, "ID         STATE\nx509-CA-A  active\n");
        assert_eq!(when(Some(SystemTime::UNIX_EPOCH)), "1970-01-01T00:00:00Z");
        assert_eq!(when(None), "-");
    }
}
