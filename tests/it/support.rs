//! Shared fixtures for tests of the real `funnelhouse` binary: start it on port 0,
//! find the address it logs, kill it (-9) or stop it (SIGTERM), read what it stored.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray};
use funnelhouse_storage::Manifest;
use funnelhouse_storage::parquet_file::read_file;

/// The binary under test: this build's, or `$FUNNELHOUSE_BIN` (the long crash loop runs
/// the release build, whose flushes keep pace with a kill every half second).
pub fn bin() -> String {
    std::env::var("FUNNELHOUSE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_funnelhouse").into())
}

pub fn funnelhouse() -> Command {
    let mut cmd = Command::new(bin());
    cmd.env_remove("FUNNELHOUSE_DATA_DIR")
        .env_remove("FUNNELHOUSE_HTTP_ADDR")
        .env_remove("FUNNELHOUSE_CONFIG")
        .env_remove("FUNNELHOUSE_PG_ADDR")
        .env_remove("FUNNELHOUSE_TOKEN")
        .env("FUNNELHOUSE_LOG", "info");
    cmd
}

/// `funnelhouse ARGS` run to its end, which must be a success: its stdout.
pub fn run_ok(args: &[&str]) -> String {
    let out = funnelhouse().args(args).output().expect("run funnelhouse");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "funnelhouse {args:?}: {stderr}");
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// `funnelhouse serve` on 127.0.0.1, ports picked free.
pub fn serve_on_loopback() -> Command {
    let mut cmd = funnelhouse();
    cmd.args([
        "serve",
        "--http-addr",
        "127.0.0.1:0",
        "--pg-addr",
        "127.0.0.1:0",
    ]);
    cmd
}

/// [`serve_on_loopback`] over `dir`.
pub fn serve_command(dir: &Path) -> Command {
    let mut cmd = serve_on_loopback();
    cmd.arg("--data-dir").arg(dir);
    cmd
}

pub struct Server {
    child: Child,
    pub url: String,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// `funnelhouse serve` on 127.0.0.1:0 over `dir`, waiting until /readyz answers 200.
    pub async fn start(dir: &Path, extra: &[&str]) -> Server {
        let mut cmd = serve_command(dir);
        cmd.args(extra);
        Self::spawn(cmd).await
    }

    /// [`Self::spawn_unready`], then wait until /readyz answers 200.
    pub async fn spawn(cmd: Command) -> Server {
        let server = Self::spawn_unready(cmd).await;
        server.wait_ready().await;
        server
    }

    /// Start it and wait only for the address it listens on.
    pub async fn spawn_unready(mut cmd: Command) -> Server {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn funnelhouse");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(i) = line.find("listening on http://") {
                    let _ = tx.send(line[i + "listening on ".len()..].trim().to_string());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no 'listening on' line; log: {:?}", log.lock().unwrap()));
        Server { child, url, log }
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let http = reqwest::Client::new();
        loop {
            if let Ok(r) = http.get(format!("{}/readyz", self.url)).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not ready: {:?}",
                self.log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// event_ids of all committed Parquet rows of a data dir.
pub fn stored_ids(dir: &Path) -> Vec<String> {
    let manifest = Manifest::load(dir).unwrap();
    let mut ids = Vec::new();
    for f in &manifest.files {
        for b in read_file(&dir.join(&f.path), Some(&[0])).unwrap() {
            let col = b.column(0).as_string_view();
            ids.extend((0..col.len()).map(|i| col.value(i).to_string()));
        }
    }
    ids
}

pub fn event_line(id: &str) -> String {
    format!(
        r#"{{"event_id":"{id}","event":"scan","user_id":"u-{id}","campaign":"parcel-lottery","channel":"jd","ts":"2026-11-11T10:00:00Z"}}"#
    )
}

pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}
