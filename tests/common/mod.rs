//! A real `agentca serve` on 127.0.0.1, started from the built binary, and real clients.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentca::grpc::pb;
use tonic::transport::Channel;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Copies the sample bundle (not its tests) into `dir`.
pub fn copy_sample(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(root().join("policies")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
}

/// A running server; killed (SIGKILL) when dropped if still running.
pub struct Server {
    pub child: Child,
    pub addr: String,
    pub stderr: Arc<Mutex<String>>,
    /// The metrics listener's address, if started with `--metrics-listen`.
    pub metrics_addr: Option<String>,
    /// The thread reading stderr: it ends with the process's last line.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Starts `agentca serve --listen 127.0.0.1:0 ARGS…` and waits for its listening line.
    pub fn start(args: &[&str]) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_agentca"));
        command.arg("serve").args(["--listen", "127.0.0.1:0"]).args(args);
        Server::start_command(&mut command)
    }

    /// Starts a server from `command` (say, a shell that sets limits and execs agentca) and
    /// waits for its listening line.
    pub fn start_command(command: &mut Command) -> Server {
        if !command.get_envs().any(|(k, _)| k == "RUST_LOG") {
            command.env("RUST_LOG", "info");
        }
        let mut child = command
            .current_dir(root())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        let metrics = Arc::new(Mutex::new(None));
        let metrics_addr = metrics.clone();
        let reader = std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = announced(&line, "agentca metrics listening on ") {
                    *metrics_addr.lock().unwrap() = Some(addr);
                } else if let Some(addr) = announced(&line, "agentca listening on ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr);
                }
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!("the server did not start:\n{}", log.lock().unwrap());
            }
        };
        // The metrics line comes before the gRPC one.
        let metrics_addr = metrics.lock().unwrap().clone();
        Server { child, addr, stderr: log, metrics_addr, reader: Some(reader) }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url()).unwrap().connect().await.unwrap()
    }

    pub async fn decisions(&self) -> pb::decision_service_client::DecisionServiceClient<Channel> {
        pb::decision_service_client::DecisionServiceClient::new(self.channel().await)
    }

    pub async fn admin(&self) -> pb::admin_service_client::AdminServiceClient<Channel> {
        pb::admin_service_client::AdminServiceClient::new(self.channel().await)
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit (and `log` to hold its last line); returns its exit code.
    pub fn wait(&mut self) -> Option<i32> {
        let code = self.child.wait().unwrap().code();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        code
    }

    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address of a line `WHAT ADDR`, plain or as the `message` of a JSON log line.
fn announced(line: &str, what: &str) -> Option<String> {
    if line.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        v["message"].as_str()?.strip_prefix(what)?;
        return v["addr"].as_str().map(str::to_string);
    }
    line.strip_prefix(what).map(|a| a.trim().to_string())
}

/// Counts the answers that load tasks receive, so that a test waits until its load has been
/// answered so many times, not for a stretch of time that a loaded machine may not fill.
#[derive(Clone)]
pub struct Answered(Arc<tokio::sync::watch::Sender<usize>>);

impl Answered {
    pub fn new() -> Answered {
        Answered(Arc::new(tokio::sync::watch::Sender::new(0)))
    }

    /// One more answer.
    pub fn add(&self) {
        self.0.send_modify(|n| *n += 1);
    }

    pub fn count(&self) -> usize {
        *self.0.borrow()
    }

    /// Waits until `n` answers in all have come (a minute at most).
    pub async fn reach(&self, n: usize) {
        let mut counts = self.0.subscribe();
        let reached = tokio::time::timeout(Duration::from_secs(60), async {
            // The guard `wait_for` returns is dropped here: load tasks cannot count while it lives.
            counts.wait_for(|&c| c >= n).await.is_ok()
        })
        .await;
        assert!(matches!(reached, Ok(true)), "only {} of {n} answers within a minute", self.count());
    }

    /// Waits for `more` answers after those counted so far. As each task counts an answer
    /// before it sends its next request, once a task has `k` of them, `k - 1` were sent after
    /// this call: with more answers than tasks, some request was sent after it.
    pub async fn more(&self, more: usize) {
        self.reach(self.count() + more).await;
    }
}

/// The proto request of a JSON request (as for `agentca eval`).
pub fn proto_request(v: &serde_json::Value) -> pb::EvaluateRequest {
    pb::EvaluateRequest::from(agentca::request::RawRequest::from_json(v).unwrap())
}

pub fn token_request(agent: &str, resource: &str, scope: &str) -> pb::EvaluateRequest {
    pb::EvaluateRequest {
        agent: agent.into(),
        resource: resource.into(),
        scopes: vec![scope.into()],
        client_ip: "10.1.2.3".into(),
        time: "2026-11-25T10:00:00Z".into(),
        ..Default::default()
    }
}

pub fn is_allow(d: &pb::Decision) -> bool {
    d.decision == pb::Verdict::Allow as i32
}

/// Fills a FIFO that nobody reads to the brim, as a reader that stopped reading leaves it: a
/// write of even one byte then waits.
pub fn fill_fifo(fifo: &Path) {
    use std::io::Write;
    let sender = tokio::net::unix::pipe::OpenOptions::new().open_sender(fifo).unwrap();
    let mut pipe = std::fs::File::from(sender.into_nonblocking_fd().unwrap());
    // Pages first, then single bytes until not even one fits.
    for chunk in [&[0u8; 4096][..], &[0u8][..]] {
        let full = loop {
            if let Err(e) = pipe.write(chunk) {
                break e;
            }
        };
        assert_eq!(full.kind(), std::io::ErrorKind::WouldBlock, "{full}");
    }
}

/// A small tmpfs mounted for a test (a disk that can fill up), unmounted when dropped.
pub struct Tmpfs {
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs with `options` (e.g. "size=256k"); None, with the reason printed, where
    /// mounting is not allowed (not root).
    pub fn mount(options: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let out =
            Command::new("mount").args(["-t", "tmpfs", "-o", options, "tmpfs", dir.path().to_str().unwrap()]).output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            Ok(o) => {
                eprintln!("skipped: cannot mount a tmpfs (needs root): {}", String::from_utf8_lossy(&o.stderr).trim());
                None
            }
            Err(e) => {
                eprintln!("skipped: cannot run mount: {e}");
                None
            }
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the disk with `name` until a write fails; returns the filler's path.
    pub fn fill(&self, name: &str) -> PathBuf {
        use std::io::Write;
        let path = self.path().join(name);
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        // Single bytes until not even one fits.
        while f.write_all(&[0]).is_ok() {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// A copy of the sample bundle in a temporary folder, with room for the audit log and the
/// signal journal beside it.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        copy_sample(&dir.path().join("policies"));
        Env { dir }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    /// `serve` on this bundle, audit log and state folder (no folder watching), plus `extra`.
    pub fn start(&self, extra: &[&str]) -> Server {
        let (policies, audit, state) = (self.path("policies"), self.path("audit.jsonl"), self.path("state"));
        let mut args = vec!["--policies", &policies, "--audit", &audit, "--state", &state, "--no-watch"];
        args.extend_from_slice(extra);
        Server::start(&args)
    }
}

/// The body of `GET /metrics` from the metrics listener at `addr` (asserting a 200).
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: agentca\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}
pub mod nats;
