//! A `redis-server` child process per test, on a free loopback port.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server`, killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// The data folder (kept for restarts; AOF on when `durable`).
    dir: tempfile::TempDir,
    durable: bool,
}

impl RedisServer {
    /// A server without persistence, or `None` (printing why) when
    /// `redis-server` is not installed and services are not required
    /// (`SMOLKIT_REQUIRE_SERVICES` unset).
    pub fn start() -> Option<Self> {
        Self::start_with(false)
    }

    /// A server whose data survives [`restart`](Self::restart): an
    /// append-only file synced on every write.
    pub fn start_durable() -> Option<Self> {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> Option<Self> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            assert!(
                std::env::var("SMOLKIT_REQUIRE_SERVICES").is_err(),
                "redis-server is not installed but services are required"
            );
            eprintln!("redis-server not installed; skipping (apt-get install redis-server)");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = RedisServer {
            port,
            child: None,
            dir: tempfile::tempdir().unwrap(),
            durable,
        };
        s.spawn();
        Some(s)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", ""])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.durable {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        self.child = Some(cmd.spawn().expect("start redis-server"));
        // Bounded wait for it to answer.
        let start = Instant::now();
        loop {
            if self.cli(&["PING"]).is_some_and(|r| r.trim() == "PONG") {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "redis-server on port {} did not answer",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server (SIGKILL) and starts it again on the same port.
    pub fn restart(&mut self, down_for: Duration) {
        self.stop();
        std::thread::sleep(down_for);
        self.spawn();
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs `redis-cli` against it; its output, or `None` if it failed.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
