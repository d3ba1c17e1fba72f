//! A real etcd server for the tests that need one: started on free loopback ports with a
//! temporary data directory, stopped (and its directory removed) when dropped. Where no `etcd`
//! binary is installed, [`Server::start`] says so and the test skips (CI installs
//! `etcd-server` from Debian).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    child: Child,
    dir: std::path::PathBuf,
    pub port: u16,
}

impl Server {
    /// A fresh server, or `None` (after printing the skip line for `test`) without `etcd`.
    pub fn start(test: &str) -> Option<Server> {
        let bin = std::env::var("MW_TEST_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        if Command::new(&bin).arg("--version").output().is_err() {
            super::skipped(test, "needs an etcd server binary (Debian's etcd-server; CI installs it)");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("mw-etcd-{}-{}", std::process::id(), super::free_port()));
        let (port, peer) = (super::free_port(), super::free_port());
        let client = format!("http://127.0.0.1:{port}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.with_extension("log")).expect("etcd log");
        let child = Command::new(&bin)
            .args(["--name", "mw-test", "--data-dir"])
            .arg(&dir)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("mw-test={peer_url}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("starting etcd");
        let s = Server { child, dir, port };
        let end = Instant::now() + Duration::from_secs(20);
        while !s.answers() {
            assert!(Instant::now() < end, "etcd did not start on port {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(s)
    }

    /// True when a range request gets a 200.
    pub fn answers(&self) -> bool {
        let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
        let body = r#"{"key":"AA=="}"#;
        let req = format!(
            "POST /v3/kv/range HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        if c.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out.starts_with("HTTP/1.1 200")
    }

    /// The etcd address of a prefix on this server.
    pub fn url(&self, prefix: &str) -> String {
        format!("etcd://127.0.0.1:{}/{prefix}", self.port)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.pid(), sig) };
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(self.dir.with_extension("log"));
    }
}
