//! Starts real `atoll` processes and talks to them over loopback.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running `atoll dev` process; killed on drop.
pub struct Dev {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    /// The threads copying stdout and stderr; they end when the process does.
    pumps: Vec<std::thread::JoinHandle<()>>,
    /// The project directory the handlers live in.
    pub dir: tempfile::TempDir,
}

/// Files of a test project: `(relative path, contents)`.
pub type Files<'a> = &'a [(&'a str, &'a str)];

impl Dev {
    /// Writes `files` into a fresh directory and runs `atoll dev` there with `args`
    /// (entries are relative to that directory).
    pub fn start(files: Files<'_>, args: &[&str]) -> Dev {
        let mut full = vec!["dev", "--port", "0"];
        if !args.contains(&"--threads") {
            full.extend(["--threads", "2"]);
        }
        full.extend(args);
        Self::spawn(files, &full)
    }

    /// Writes `files` and runs `atoll node --config node.toml` there.
    pub fn start_node(files: Files<'_>) -> Dev {
        Self::spawn(files, &["node", "--config", "node.toml"])
    }

    /// Writes `files` into a fresh directory and runs `atoll ARGS…` there
    /// until it prints its listening address.
    pub fn spawn(files: Files<'_>, args: &[&str]) -> Dev {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in files {
            write(dir.path(), name, text);
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_atoll"))
            .args(args)
            .current_dir(dir.path())
            .env("ATOLL_LOG", "info,atoll::console=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn atoll dev");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let pumps = vec![
            pump(child.stdout.take().expect("stdout"), stdout.clone()),
            pump(child.stderr.take().expect("stderr"), stderr.clone()),
        ];
        let started = Instant::now();
        let base = loop {
            if let Some(line) = stdout
                .lock()
                .expect("lock")
                .lines()
                .find(|l| l.contains("listening on http"))
            {
                let url = line.split("listening on ").nth(1).expect("url").trim();
                break url.to_string();
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "atoll dev exited with {status}\nstdout:\n{}\nstderr:\n{}",
                    stdout.lock().expect("lock"),
                    stderr.lock().expect("lock")
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "atoll dev did not start in 60 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Dev {
            child,
            base,
            stdout,
            stderr,
            pumps,
            dir,
        }
    }

    /// `base` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// The listening socket address (of an `http://` or `https://` base).
    pub fn addr(&self) -> std::net::SocketAddr {
        self.base
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .parse()
            .expect("listening address")
    }

    /// The admin listener's base URL, as `atoll node` printed it (the line
    /// may come just after the listeners' lines that `start` waits for).
    pub async fn admin(&self) -> String {
        self.wait_for("the admin address on stdout", |dev| {
            dev.out()
                .lines()
                .find_map(|l| l.strip_prefix("atoll node: admin on ").map(str::to_string))
        })
        .await
    }

    /// Everything the process wrote to stderr (its log) so far.
    pub fn log(&self) -> String {
        self.stderr.lock().expect("lock").clone()
    }

    /// Everything the process wrote to stdout so far.
    pub fn out(&self) -> String {
        self.stdout.lock().expect("lock").clone()
    }

    /// Waits until stdout contains `needle`.
    pub async fn wait_for_out(&self, needle: &str) -> String {
        self.wait_for(&format!("{needle:?} on stdout"), |dev| {
            let out = dev.out();
            out.contains(needle).then_some(out)
        })
        .await
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_for_log(&self, needle: &str) -> String {
        self.wait_for(&format!("{needle:?} in the log"), |dev| {
            let log = dev.log();
            log.contains(needle).then_some(log)
        })
        .await
    }

    /// Polls `found` until it gives a value; fails the test after 20 s,
    /// naming `what` and showing the process's output.
    async fn wait_for<T>(&self, what: &str, found: impl Fn(&Dev) -> Option<T>) -> T {
        let started = Instant::now();
        loop {
            if let Some(value) = found(self) {
                return value;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no {what} within 20 s; stdout:\n{}\nlog:\n{}",
                self.out(),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM and waits (up to 30 s) for the process to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        self.wait_exit()
    }

    /// Sends the signal named `name` (`TERM`, `INT`, …) to the process.
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status();
    }

    /// Waits (up to 30 s) for the process to exit.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Its last lines may still be in the pipes: read them all.
                for pump in self.pumps.drain(..) {
                    let _ = pump.join();
                }
                return status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "atoll did not exit within 30 s of being told to stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Rewrites a project file.
    pub fn write(&self, name: &str, text: &str) {
        write(self.dir.path(), name, text);
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write(dir: &Path, name: &str, text: &str) {
    let path: PathBuf = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("mkdir");
    }
    std::fs::write(path, text).expect("write file");
}

fn pump(
    src: impl std::io::Read + Send + 'static,
    into: Arc<Mutex<String>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(src).lines() {
            let Ok(line) = line else { break };
            let mut s = into.lock().expect("lock");
            s.push_str(&line);
            s.push('\n');
        }
    })
}

/// Writes `files` and runs `atoll ARGS…` to completion.
/// A node.toml that serves `entry` for every host on an ephemeral port,
/// with `limits` as the body of its `[limits]` table.
pub fn single_script_config(limits: &str, entry: &str) -> String {
    format!(
        r#"
[[listen]]
addr = "127.0.0.1:0"

[admin]
addr = "127.0.0.1:0"

[limits]
{limits}

[[scripts]]
name = "only"
entry = "{entry}"

[[routes]]
pattern = "*"
script = "only"
"#
    )
}

pub fn run_to_exit(files: Files<'_>, args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in files {
        write(dir.path(), name, text);
    }
    Command::new(env!("CARGO_BIN_EXE_atoll"))
        .args(args)
        .current_dir(dir.path())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run atoll")
}

/// GETs `url` (with `host` as the Host header, if given) and returns the body.
pub async fn get_text(c: &reqwest::Client, url: &str, host: Option<&str>) -> String {
    let mut req = c.get(url);
    if let Some(h) = host {
        req = req.header("host", h);
    }
    req.send()
        .await
        .expect("request")
        .text()
        .await
        .expect("text")
}

/// GETs `url`: status and body text.
pub async fn get_status(c: &reqwest::Client, url: impl reqwest::IntoUrl) -> (u16, String) {
    let resp = c.get(url).send().await.expect("request");
    (resp.status().as_u16(), resp.text().await.expect("text"))
}

/// An HTTP client for loopback tests.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// A CA, and a leaf certificate for `host` signed by it: (CA PEM, leaf PEM, leaf key PEM).
pub fn ca_and_leaf(host: &str) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{host} test CA"));
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().expect("key");
    let leaf = rcgen::CertificateParams::new(vec![host.to_string()])
        .expect("params")
        .signed_by(&leaf_key, &issuer)
        .expect("leaf cert");
    (ca_cert.pem(), leaf.pem(), leaf_key.serialize_pem())
}
