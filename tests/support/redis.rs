#![allow(dead_code)]
//! A real `redis-server` for the cluster suites, on a free loopback port, with a temporary
//! directory and no persistence (`--save '' --appendonly no`), killed when dropped.
//!
//! Redis cannot bind port 0 and report the port, so [`RedisServer::start`] picks a port the kernel
//! just handed out (bind `127.0.0.1:0`, drop it), starts the server there, and retries on another
//! port if the server exits (port taken meanwhile). Readiness is proven by asking the server on
//! that port for its `process_id` and matching it with the child's pid, so a server another test
//! started on the same port is never mistaken for ours. [`RedisServer::kill`] and
//! [`RedisServer::restart`] (same port, empty) drive outage tests.
//!
//! Needs `redis-server` on `PATH`: `scripts/test.sh` installs it. Std only (plus `tempfile`), so
//! it can be included by path (`#[path = "support/redis.rs"] mod redis_server;`) or as
//! `support::redis`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to answer after being started.
const READY: Duration = Duration::from_secs(20);

/// A running `redis-server` owned by the test.
pub struct RedisServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl RedisServer {
    /// Starts a server on a free loopback port. Panics with the way out when `redis-server` is
    /// missing.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory for redis");
        for _ in 0..10 {
            let port = free_port();
            if let Some(child) = spawn_on(port, dir.path()) {
                return Self {
                    child: Some(child),
                    dir,
                    port,
                };
            }
        }
        panic!("could not start redis-server on a free port after 10 attempts");
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL: no goodbye to clients) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the server is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the server again on the same port, empty (nothing is persisted).
    pub fn restart(&mut self) {
        self.kill();
        let until = Instant::now() + READY;
        loop {
            if let Some(child) = spawn_on(self.port, self.dir.path()) {
                self.child = Some(child);
                return;
            }
            assert!(
                Instant::now() < until,
                "could not restart redis-server on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs one inline command (e.g. `FLUSHALL`, `DBSIZE`) and returns the raw reply.
    pub fn command(&self, line: &str) -> String {
        raw_command(self.port, line).unwrap_or_else(|e| panic!("redis {line}: {e}"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port the kernel just considered free.
fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Starts redis-server on `port`; `None` when it exited before answering (port taken).
fn spawn_on(port: u16, dir: &std::path::Path) -> Option<Child> {
    let mut child = match Command::new("redis-server")
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "redis-server is not installed: run the tests with `scripts/test.sh` (it installs \
             redis-server), or `apt-get install -y redis-server`"
        ),
        Err(e) => panic!("could not run redis-server: {e}"),
    };
    let pid = child.id();
    let until = Instant::now() + READY;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return None;
        }
        if let Ok(info) = raw_command(port, "INFO server")
            && info.contains(&format!("process_id:{pid}\r"))
        {
            return Some(child);
        }
        // Another test's server answers on this port: ours will fail to bind.
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends one inline command and reads one reply (simple, error, integer or bulk).
fn raw_command(port: u16, line: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("{line}\r\n").as_bytes())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if reply_complete(&buf) {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn reply_complete(buf: &[u8]) -> bool {
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    match buf.first() {
        Some(b'$') => {
            let len: i64 = std::str::from_utf8(&buf[1..eol])
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            len < 0 || buf.len() >= eol + 2 + len as usize + 2
        }
        _ => true,
    }
}
