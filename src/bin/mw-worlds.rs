//! `mw-worlds`: the worlds formed through etcd under a prefix, with their generation, state and
//! members (feature `etcd`).
//!
//! ```text
//! mw-worlds --etcd etcd://host:port[,host:port...]/prefix [--watch] [--timeout-ms N]
//! ```
//!
//! Without `--watch` it prints the directory once; with it, the directory again after every
//! change, each time preceded by a line with the time.

use std::time::Duration;

use multiworld::etcd::{self, WorldEntry};

fn usage() -> ! {
    eprintln!("usage: mw-worlds --etcd etcd://host:port[,host:port...]/prefix [--watch] [--timeout-ms N]");
    std::process::exit(2)
}

fn print(worlds: &[WorldEntry]) {
    if worlds.is_empty() {
        println!("(no worlds)");
        return;
    }
    println!("{:<24} {:>10} {:>5} {:<8} members (rank host pid addr)", "world", "generation", "size", "state");
    for w in worlds {
        let members: Vec<String> =
            w.members.iter().map(|m| format!("{}:{}:{}:{}", m.rank, m.host, m.pid, m.addr)).collect();
        println!("{:<24} {:>10} {:>5} {:<8} {}", w.name, w.generation, w.size, w.state.name(), members.join(" "));
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut url, mut watch, mut timeout) = (None, false, Duration::from_secs(5));
    while let Some(a) = args.next() {
        match a.as_str() {
            "--etcd" => url = Some(args.next().unwrap_or_else(|| usage())),
            "--watch" => watch = true,
            "--timeout-ms" => {
                let ms = args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| usage());
                timeout = Duration::from_millis(ms);
            }
            _ => usage(),
        }
    }
    let url = url.unwrap_or_else(|| usage());
    let r = if watch {
        etcd::watch(&url, timeout, |worlds| {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            println!("# {}.{:03} s since the epoch", t.as_secs(), t.subsec_millis());
            print(worlds);
            true
        })
    } else {
        etcd::list(&url, timeout).map(|w| print(&w))
    };
    if let Err(e) = r {
        eprintln!("mw-worlds: {e}");
        std::process::exit(1);
    }
}
