//! A minimal logger: one line per event on standard error, filtered by `MW_LOG`.
//!
//! `MW_LOG` is `off`, `warn` (the default), `info` or `debug`. Warnings are things an operator
//! should see (a refused connection, a broken world); info and debug trace formation and
//! progress. Lines start with `multiworld[pid]` so that logs of many processes can be told
//! apart.
//!
//! **Logging never blocks the caller.** Standard error may be a pipe that nobody drains (a
//! stalled log shipper), and a write to a full pipe blocks; a world that logs its own break
//! from a progress-pool thread, a formation that logs a refused connection, must not stall on
//! that. So a line is only queued here, and one thread of the logger's own writes the queue
//! out. Past [`MAX_QUEUED`] lines waiting, new lines are dropped and counted; the count is
//! written once standard error drains. Lines still queued when the process exits are lost.

#[cfg(not(loom))]
use std::collections::VecDeque;
use std::io::Write;
use std::sync::OnceLock;

#[cfg(not(loom))]
use crate::sys::sync::{lock, Condvar, Mutex};

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

/// Lines that may wait for standard error before new ones are dropped.
#[cfg_attr(loom, allow(dead_code))]
pub(crate) const MAX_QUEUED: usize = 4096;

fn format_line(level: Level, args: std::fmt::Arguments<'_>) -> Option<String> {
    let tag = match level {
        Level::Warn => "WARN",
        Level::Info => "INFO",
        Level::Debug => "DEBUG",
        Level::Off => return None,
    };
    Some(format!("multiworld[{}] {tag} {args}\n", std::process::id()))
}

pub(crate) fn write(level: Level, args: std::fmt::Arguments<'_>) {
    if let Some(line) = format_line(level, args) {
        queue(line);
    }
}

/// Under loom the logger's lock would be a model's; the models log nothing worth a thread.
#[cfg(loom)]
fn queue(line: String) {
    let _ = std::io::stderr().write_all(line.as_bytes());
}

#[cfg(not(loom))]
#[derive(Default)]
struct Queue {
    lines: VecDeque<String>,
    dropped: u64,
    /// The writer thread could not be started: callers write themselves.
    direct: bool,
}

#[cfg(not(loom))]
struct Logger {
    queue: Mutex<Queue>,
    cond: Condvar,
}

#[cfg(not(loom))]
impl Logger {
    /// A logger whose writer thread writes to `out` (lives as long as the process).
    fn start(out: impl Write + Send + 'static) -> &'static Logger {
        let l: &'static Logger =
            Box::leak(Box::new(Logger { queue: Mutex::new(Queue::default()), cond: Condvar::new() }));
        let mut out = out;
        let started = std::thread::Builder::new().name("mw-log".into()).spawn(move || writer(l, &mut out));
        if started.is_err() {
            lock(&l.queue).direct = true;
        }
        l
    }

    /// Queues a line; gives it back where the caller must write it itself (no writer thread).
    fn push(&self, line: String) -> Option<String> {
        let mut q = lock(&self.queue);
        if q.direct {
            return Some(line);
        }
        if q.lines.len() >= MAX_QUEUED {
            q.dropped += 1;
        } else {
            q.lines.push_back(line);
        }
        drop(q);
        self.cond.notify_one();
        None
    }
}

#[cfg(not(loom))]
fn logger() -> &'static Logger {
    static L: OnceLock<&'static Logger> = OnceLock::new();
    L.get_or_init(|| Logger::start(std::io::stderr()))
}

/// Starts the writer thread now (a manager does, so that its thread is there from the start
/// rather than appearing at the first line).
pub(crate) fn start() {
    #[cfg(not(loom))]
    if level() > Level::Off {
        logger();
    }
}

#[cfg(not(loom))]
fn queue(line: String) {
    if let Some(line) = logger().push(line) {
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}

/// The writer thread: takes what is queued and writes it out; only this thread ever waits for
/// standard error.
#[cfg(not(loom))]
fn writer(l: &Logger, out: &mut dyn Write) {
    loop {
        let (lines, dropped) = {
            let mut q = lock(&l.queue);
            while q.lines.is_empty() && q.dropped == 0 {
                q = l.cond.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            (std::mem::take(&mut q.lines), std::mem::take(&mut q.dropped))
        };
        for line in lines {
            let _ = out.write_all(line.as_bytes());
        }
        if dropped > 0 {
            let note = format!(
                "multiworld[{}] WARN {dropped} log lines dropped: standard error did not keep up\n",
                std::process::id()
            );
            let _ = out.write_all(note.as_bytes());
        }
    }
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

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sys::sync::Arc;
    use std::time::{Duration, Instant};

    /// A standard error that blocks (a pipe nobody reads) holds up only the writer thread: a
    /// caller queues its line and goes on, lines past the bound are counted, and the count is
    /// written once the output drains.
    #[test]
    fn a_blocked_output_never_blocks_a_caller() {
        /// Whether the output is open, and what came out; a write waits while it is closed.
        type Shared = (std::sync::Mutex<(bool, Vec<u8>)>, std::sync::Condvar);
        struct Gate(Arc<Shared>);
        impl Write for Gate {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                let (m, c) = &*self.0;
                let mut g = m.lock().unwrap();
                while !g.0 {
                    g = c.wait(g).unwrap();
                }
                g.1.extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let gate = Arc::new((std::sync::Mutex::new((false, Vec::new())), std::sync::Condvar::new()));
        let l = Logger::start(Gate(gate.clone()));
        let push = |line: String| assert!(l.push(line).is_none());
        let t = Instant::now();
        for i in 0..MAX_QUEUED * 3 {
            push(format!("line {i}\n"));
        }
        assert!(t.elapsed() < Duration::from_secs(5), "queueing took {:?}", t.elapsed());
        // Open the gate: everything queued comes out, then the count of what was dropped.
        {
            let (m, c) = &*gate;
            m.lock().unwrap().0 = true;
            c.notify_all();
        }
        // Everything queued comes out, and every line dropped is counted in a note (one per
        // batch the writer took while lines were being dropped).
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let text = String::from_utf8_lossy(&gate.0.lock().unwrap().1).into_owned();
            let kept = text.lines().filter(|l| l.starts_with("line ")).count();
            let dropped: usize = text
                .lines()
                .filter(|l| l.contains("log lines dropped"))
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<usize>().ok())
                .sum();
            if kept + dropped == MAX_QUEUED * 3 {
                assert!(text.starts_with("line 0\n"), "{}", &text[..40.min(text.len())]);
                assert!(dropped > 0, "nothing was dropped");
                assert!(kept >= MAX_QUEUED, "{kept} lines kept");
                break;
            }
            assert!(Instant::now() < end, "kept {kept} and dropped {dropped} of {}", MAX_QUEUED * 3);
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
