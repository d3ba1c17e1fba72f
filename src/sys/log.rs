//! A minimal logger: one line per event on standard error, filtered by `MW_LOG`.
//!
//! `MW_LOG` is `off`, `warn` (the default), `info` or `debug`. Warnings are things an operator
//! should see (a refused connection, a broken world); info and debug trace formation and
//! progress. Lines start with `multiworld[pid]` so that logs of many processes can be told
//! apart.

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Level {
    Off = 0,
    Warn = 1,
    Info = 2,
    Debug = 3,
}

pub(crate) fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| match std::env::var("MW_LOG").as_deref() {
        Ok("off") | Ok("0") => Level::Off,
        Ok("info") => Level::Info,
        Ok("debug") => Level::Debug,
        _ => Level::Warn,
    })
}

pub(crate) fn write(level: Level, args: std::fmt::Arguments<'_>) {
    let tag = match level {
        Level::Warn => "WARN",
        Level::Info => "INFO",
        Level::Debug => "DEBUG",
        Level::Off => return,
    };
    eprintln!("multiworld[{}] {tag} {args}", std::process::id());
}

macro_rules! log_at {
    ($level:expr, $($arg:tt)*) => {
        if $crate::sys::log::level() >= $level {
            $crate::sys::log::write($level, format_args!($($arg)*));
        }
    };
}

macro_rules! warn {
    ($($arg:tt)*) => { log_at!($crate::sys::log::Level::Warn, $($arg)*) };
}

macro_rules! info {
    ($($arg:tt)*) => { log_at!($crate::sys::log::Level::Info, $($arg)*) };
}

macro_rules! debug {
    ($($arg:tt)*) => { log_at!($crate::sys::log::Level::Debug, $($arg)*) };
}
