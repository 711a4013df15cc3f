//! Lines in a process's log (its stderr) that never panic: `eprintln!`
//! panics when stderr is gone (a pipe whose reader closed it), and an
//! agent — or a plugin inside it — must keep serving then.

/// Write `line` and a newline to stderr, ignoring a failure to.
pub fn line(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// `eprintln!` that never panics ([`line`]).
#[macro_export]
macro_rules! log_line {
    ($($arg:tt)*) => {
        $crate::log::line(format_args!($($arg)*))
    };
}
