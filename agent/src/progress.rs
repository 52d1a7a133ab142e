//! Terminal progress: a bar per table during the copy (bytes, rate, ETA,
//! rows when done) and one live status line during sync, drawn only when
//! stderr is a terminal and logs are human-readable. Otherwise every call
//! here does nothing and the log lines tell the story.
//!
//! Log lines are printed through [`LogWriter`], which suspends the bars while
//! it writes, so logs and bars never tear each other. Only tables being
//! copied have a bar: a finished one leaves its total as a printed line, so
//! the drawn area stays as small as the copy's workers.

use std::io::Write;
use std::sync::OnceLock;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

static BARS: OnceLock<MultiProgress> = OnceLock::new();

/// Turns progress drawing on; call once, before logging starts.
pub fn enable() {
    let _ = BARS.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4)));
}

/// True when progress is drawn.
pub fn enabled() -> bool {
    BARS.get().is_some()
}

/// A table's copy bar (a no-op when progress is off).
pub fn copy_bar(table: &str, estimated_bytes: u64) -> ProgressBar {
    let Some(multi) = BARS.get() else {
        return ProgressBar::hidden();
    };
    let bar = multi.add(ProgressBar::new(estimated_bytes.max(1)));
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>32.bold} [{bar:30}] {bytes:>10}/~{total_bytes:<10} {bytes_per_sec:>12} ETA {eta:>4} {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(shorten(table, 32));
    bar
}

/// Finishes a copy bar: it leaves the drawn area, and its total stays
/// above it as a printed line. Finished bars kept in the area made it grow
/// with the tables copied until it outgrew the terminal, whose redraws then
/// wiped log lines already printed; and a bar left at the end vanished with
/// the area.
pub fn copy_done(bar: &ProgressBar, rows: u64) {
    let Some(multi) = BARS.get() else {
        return;
    };
    if bar.is_hidden() {
        return;
    }
    let total = format!(
        "{:>32} {rows} rows, {} in {:.1} s",
        bar.prefix(),
        indicatif::HumanBytes(bar.position()),
        bar.elapsed().as_secs_f64()
    );
    bar.finish_and_clear();
    multi.remove(bar);
    let _ = multi.println(total);
}

/// The one-line sync status (a no-op when progress is off).
pub fn sync_line() -> ProgressBar {
    let Some(multi) = BARS.get() else {
        return ProgressBar::hidden();
    };
    let line = multi.add(ProgressBar::new_spinner());
    line.set_style(ProgressStyle::with_template("{spinner} sync: {msg}").expect("a valid template"));
    line.enable_steady_tick(Duration::from_millis(250));
    line
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let tail: String = s
            .chars()
            .rev()
            .take(max - 1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("…{tail}")
    }
}

/// stderr for the log subscriber: while bars are drawn, each write suspends
/// them so the line lands above the bars.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match BARS.get() {
            Some(multi) => multi
                .suspend(|| std::io::stderr().write_all(buf))
                .map(|()| buf.len()),
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        LogWriter
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_keep_their_end() {
        assert_eq!(shorten("public.short", 32), "public.short");
        let s = shorten("public.a_very_long_table_name_that_goes_on_and_on", 20);
        assert_eq!(s.chars().count(), 20);
        assert!(s.starts_with('…') && s.ends_with("and_on"));
    }
}
