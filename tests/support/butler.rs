//! Running the butler binary under test.
//!
//! Integration tests treat butler as a black box: write a YAML file, start the real binary
//! (`CARGO_BIN_EXE_butler`), learn its port from the `listening` log line (tests configure
//! `listen: "127.0.0.1:0"` so parallel tests never collide), then talk HTTP to it and read its
//! JSON log lines. Every wait has a deadline, and a failure message carries the process output.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// Path of the binary under test, built by cargo for integration tests.
pub const BUTLER_BIN: &str = env!("CARGO_BIN_EXE_butler");

/// How long `Butler::start` waits for the `listening` line.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `run_cli` lets a command run.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(20);

/// Environment variables that would silently change the configuration under test; removed
/// from every child unless a test passes them explicitly.
const SCRUBBED_ENV: &[&str] = &["BUTLER_LISTEN", "BUTLER_UPSTREAM", "BUTLER_CONFIG"];

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// TempDir
// ---------------------------------------------------------------------------------------------

/// A fresh directory under the system temp dir, removed (recursively) on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos =
            SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "butler-test-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to `name` inside the directory and returns the file's path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path.join(name);
        std::fs::write(&path, contents).expect("write temp file");
        path
    }

    /// Writes via a temporary file and a rename, so a reader (butler's config watcher) never
    /// sees a half-written file.
    pub fn write_atomic(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path.join(name);
        let tmp = self.path.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, contents).expect("write temp file");
        std::fs::rename(&tmp, &path).expect("rename temp file");
        path
    }
}

impl Default for TempDir {
    fn default() -> TempDir {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------------------------
// Process plumbing shared by Butler and run_cli
// ---------------------------------------------------------------------------------------------

/// The exit status of a child, filled in by the thread that waits for it.
#[derive(Default)]
struct ExitState {
    status: Mutex<Option<ExitStatus>>,
    cv: Condvar,
}

impl ExitState {
    fn wait(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let mut status = lock(&self.status);
        loop {
            if let Some(s) = *status {
                return Some(s);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            status =
                self.cv.wait_timeout(status, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn get(&self) -> Option<ExitStatus> {
        *lock(&self.status)
    }
}

/// Sends a signal with the system `kill` command (no libc dependency), unless the process has
/// already been reaped: its pid may then belong to someone else.
fn send_signal(pid: u32, exit: &ExitState, signal: &str) {
    let status = lock(&exit.status);
    if status.is_some() {
        return;
    }
    let _ = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    drop(status);
}

/// A child's captured output. Lines are kept forever so failure messages can show everything.
#[derive(Default)]
struct Output {
    state: Mutex<OutputState>,
    cv: Condvar,
}

#[derive(Default)]
struct OutputState {
    stdout: Vec<LogLine>,
    stderr: Vec<String>,
    stdout_closed: bool,
    stderr_closed: bool,
}

/// One stdout line and, when it is a JSON object, its parsed form.
#[derive(Clone, Debug)]
pub struct LogLine {
    pub raw: String,
    pub json: Option<Value>,
}

impl Output {
    fn describe(&self) -> String {
        let state = lock(&self.state);
        let stdout: Vec<&str> = state.stdout.iter().map(|l| l.raw.as_str()).collect();
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            stdout.join("\n"),
            state.stderr.join("\n")
        )
    }
}

fn spawn_reader(output: Arc<Output>, pipe: impl Read + Send + 'static, is_stdout: bool) {
    thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line).trim_end().to_string();
                    let mut state = lock(&output.state);
                    if is_stdout {
                        let json =
                            serde_json::from_str::<Value>(&text).ok().filter(Value::is_object);
                        state.stdout.push(LogLine { raw: text, json });
                    } else {
                        state.stderr.push(text);
                    }
                    output.cv.notify_all();
                }
            }
        }
        let mut state = lock(&output.state);
        if is_stdout {
            state.stdout_closed = true;
        } else {
            state.stderr_closed = true;
        }
        output.cv.notify_all();
    });
}

fn command(args: &[&str], envs: &[(&str, &str)], dir: &Path) -> Command {
    let mut cmd = Command::new(BUTLER_BIN);
    cmd.args(args).current_dir(dir);
    for name in SCRUBBED_ENV {
        cmd.env_remove(name);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

// ---------------------------------------------------------------------------------------------
// Butler
// ---------------------------------------------------------------------------------------------

/// A running butler process. Killed (SIGKILL) on drop if still running; its temp dir (holding
/// the config, and the working directory of the process) is removed unless the test owns it.
pub struct Butler {
    pid: u32,
    addr: SocketAddr,
    config_path: PathBuf,
    dir_path: PathBuf,
    /// Removed when the fields drop, i.e. after `Drop::drop` has killed the process.
    owned_dir: Option<TempDir>,
    output: Arc<Output>,
    exit: Arc<ExitState>,
}

impl Butler {
    /// Starts butler with `yaml` as its config (`--config <tmp>/butler.yaml`) and waits for the
    /// `listening` log line; panics with the process output if that does not come.
    pub fn start(yaml: &str) -> Butler {
        Butler::start_with(yaml, &[], &[])
    }

    /// Like [`Butler::start`] with extra command-line arguments (after `--config PATH`) and
    /// environment variables.
    pub fn start_with(yaml: &str, extra_args: &[&str], envs: &[(&str, &str)]) -> Butler {
        Butler::try_start(None, yaml, extra_args, envs).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts in a directory the test owns (kept after this butler ends), e.g. to restart with
    /// the same `state_file`. The config is written to `dir/butler.yaml`.
    pub fn start_in(
        dir: &TempDir,
        yaml: &str,
        extra_args: &[&str],
        envs: &[(&str, &str)],
    ) -> Butler {
        Butler::try_start(Some(dir.path()), yaml, extra_args, envs)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts butler with its open-file limit (`RLIMIT_NOFILE`, soft and hard) set to `files`,
    /// so that it cannot raise it: for tests of the connection cap that derives from it.
    pub fn start_with_open_files(yaml: &str, files: u64) -> Butler {
        Butler::try_start_opts(None, yaml, &[], &[], Some(files)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The fallible form: `Err` carries a description and the process output, for tests that
    /// expect startup to fail.
    pub fn try_start(
        dir: Option<&Path>,
        yaml: &str,
        extra_args: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<Butler, String> {
        Butler::try_start_opts(dir, yaml, extra_args, envs, None)
    }

    fn try_start_opts(
        dir: Option<&Path>,
        yaml: &str,
        extra_args: &[&str],
        envs: &[(&str, &str)],
        open_files: Option<u64>,
    ) -> Result<Butler, String> {
        let owned_dir = if dir.is_none() { Some(TempDir::new()) } else { None };
        let dir_path = dir
            .map(Path::to_path_buf)
            .or_else(|| owned_dir.as_ref().map(|d| d.path().to_path_buf()))
            .expect("a directory");
        let config_path = dir_path.join("butler.yaml");
        std::fs::write(&config_path, yaml).map_err(|e| format!("writing config: {e}"))?;

        let config_arg = config_path.to_string_lossy().into_owned();
        let mut args = vec!["--config", config_arg.as_str()];
        args.extend_from_slice(extra_args);
        let mut cmd = command(&args, envs, &dir_path);
        if let Some(files) = open_files {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit { rlim_cur: files, rlim_max: files };
            // SAFETY: only setrlimit, which is async-signal-safe, runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawning {BUTLER_BIN}: {e}"))?;

        let pid = child.id();
        let output = Arc::new(Output::default());
        spawn_reader(Arc::clone(&output), child.stdout.take().expect("stdout"), true);
        spawn_reader(Arc::clone(&output), child.stderr.take().expect("stderr"), false);
        let exit = Arc::new(ExitState::default());
        {
            let exit = Arc::clone(&exit);
            thread::spawn(move || {
                let status = child.wait().ok();
                *lock(&exit.status) = status;
                exit.cv.notify_all();
            });
        }

        let mut butler = Butler {
            pid,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            config_path,
            dir_path,
            owned_dir,
            output,
            exit,
        };
        match butler.wait_listening(START_TIMEOUT) {
            Ok(addr) => {
                butler.addr = addr;
                Ok(butler)
            }
            Err(why) => {
                // Give a dying process a moment to finish writing, then report everything.
                let status = butler.wait_exit(Duration::from_secs(2));
                Err(format!(
                    "butler did not start: {why} (exit status: {status:?})\n{}",
                    butler.output.describe()
                ))
            }
        }
    }

    /// Waits for the `listening` line and returns the address to connect to.
    fn wait_listening(&self, timeout: Duration) -> Result<SocketAddr, String> {
        let deadline = Instant::now() + timeout;
        let mut state = lock(&self.output.state);
        let mut checked = 0;
        loop {
            for line in &state.stdout[checked..] {
                if let Some(addr) = listening_addr(line) {
                    return Ok(addr);
                }
            }
            checked = state.stdout.len();
            if state.stdout_closed {
                return Err("stdout closed before a `listening` line".into());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("no `listening` line within {timeout:?}"));
            }
            state = self
                .output
                .cv
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The process's working directory (holds the config; relative paths land here).
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// Replaces the config file atomically (write + rename), e.g. before [`Butler::sighup`] or
    /// to trigger butler's file watcher.
    pub fn rewrite_config(&self, yaml: &str) {
        let tmp = self.dir_path.join(".butler.yaml.tmp");
        std::fs::write(&tmp, yaml).expect("write new config");
        std::fs::rename(&tmp, &self.config_path).expect("replace config");
    }

    /// Every stdout line that is a JSON object, in order.
    pub fn logs(&self) -> Vec<Value> {
        lock(&self.output.state).stdout.iter().filter_map(|l| l.json.clone()).collect()
    }

    /// Every stdout line, raw.
    pub fn stdout_lines(&self) -> Vec<String> {
        lock(&self.output.state).stdout.iter().map(|l| l.raw.clone()).collect()
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        lock(&self.output.state).stderr.join("\n")
    }

    /// Stdout and stderr, formatted for a failure message.
    pub fn output(&self) -> String {
        self.output.describe()
    }

    /// JSON log lines whose `msg` equals `msg`.
    pub fn logs_with_msg(&self, msg: &str) -> Vec<Value> {
        self.logs()
            .into_iter()
            .filter(|v| v.get("msg").and_then(Value::as_str) == Some(msg))
            .collect()
    }

    /// A position in the log; pass to [`Butler::wait_log_since`] to consider only later lines.
    pub fn log_mark(&self) -> usize {
        lock(&self.output.state).stdout.len()
    }

    /// The first JSON log line (since the start) matching `pred`, waiting up to `timeout`.
    /// Returns `None` early if stdout closed (the process exited).
    pub fn wait_log(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Option<Value> {
        self.wait_log_since(0, pred, timeout)
    }

    /// Like [`Butler::wait_log`], counting only lines at or after `mark`.
    pub fn wait_log_since(
        &self,
        mark: usize,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        let mut state = lock(&self.output.state);
        let mut checked = mark.min(state.stdout.len());
        loop {
            let found =
                state.stdout[checked..].iter().filter_map(|l| l.json.as_ref()).find(|v| pred(v));
            if let Some(v) = found {
                return Some(v.clone());
            }
            checked = state.stdout.len();
            let now = Instant::now();
            if state.stdout_closed || now >= deadline {
                return None;
            }
            state = self
                .output
                .cv
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for a log line with this `msg`.
    pub fn wait_log_msg(&self, msg: &str, timeout: Duration) -> Option<Value> {
        self.wait_log(|v| v.get("msg").and_then(Value::as_str) == Some(msg), timeout)
    }

    /// Sends a signal by name (`TERM`, `HUP`, `INT`, `KILL`, ...), if still running.
    pub fn signal(&self, name: &str) {
        send_signal(self.pid, &self.exit, name);
    }

    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    pub fn sighup(&self) {
        self.signal("HUP");
    }

    pub fn sigint(&self) {
        self.signal("INT");
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        self.exit.wait(timeout)
    }

    pub fn is_running(&self) -> bool {
        self.exit.get().is_none()
    }
}

impl Drop for Butler {
    fn drop(&mut self) {
        if self.is_running() {
            send_signal(self.pid, &self.exit, "KILL");
            let _ = self.exit.wait(Duration::from_secs(5));
        }
        // `owned_dir` is dropped after this, once the process no longer uses it.
    }
}

/// Recognises the `listening` log line and extracts a connectable address from it.
/// JSON logs: `{"msg":"listening","addr":"127.0.0.1:PORT"}`. As a fallback for
/// `log_format: text`, any line mentioning `listening` that contains a socket address.
/// An unspecified address (`0.0.0.0`, `[::]`) is mapped to loopback.
pub fn listening_addr(line: &LogLine) -> Option<SocketAddr> {
    let addr = match &line.json {
        Some(v) => {
            if v.get("msg").and_then(Value::as_str) != Some("listening") {
                return None;
            }
            v.get("addr").and_then(Value::as_str).and_then(|a| a.parse::<SocketAddr>().ok())?
        }
        None => {
            if !line.raw.contains("listening") {
                return None;
            }
            line.raw
                .split(|c: char| c.is_whitespace() || matches!(c, '=' | '"' | ',' | '\''))
                .find_map(|t| t.parse::<SocketAddr>().ok())?
        }
    };
    Some(connectable(addr))
}

fn connectable(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    addr
}

// ---------------------------------------------------------------------------------------------
// run_cli
// ---------------------------------------------------------------------------------------------

/// Runs butler to completion (`butler check`, `init`, `gen-key`, `--version`, ...) in a fresh
/// temp dir, feeding `stdin` if given. Returns (exit code, stdout, stderr); a death by signal
/// is exit code -1. Panics if it runs longer than 20 s.
pub fn run_cli(args: &[&str], envs: &[(&str, &str)], stdin: Option<&str>) -> (i32, String, String) {
    let dir = TempDir::new();
    run_cli_in(dir.path(), args, envs, stdin)
}

/// Like [`run_cli`] with the given working directory (e.g. where `butler init` writes).
pub fn run_cli_in(
    dir: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
    stdin: Option<&str>,
) -> (i32, String, String) {
    let mut child = command(args, envs, dir)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {BUTLER_BIN}: {e}"));
    let pid = child.id();

    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let input = input.to_string();
        // A writer thread, so a child that never reads cannot block the test.
        thread::spawn(move || {
            let _ = pipe.write_all(input.as_bytes());
        });
    }
    let collect = |mut pipe: Box<dyn Read + Send>| {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
        });
        rx
    };
    let stdout_rx = collect(Box::new(child.stdout.take().expect("stdout")));
    let stderr_rx = collect(Box::new(child.stderr.take().expect("stderr")));

    let exit = Arc::new(ExitState::default());
    {
        let exit = Arc::clone(&exit);
        thread::spawn(move || {
            let status = child.wait().ok();
            *lock(&exit.status) = status;
            exit.cv.notify_all();
        });
    }
    let Some(status) = exit.wait(CLI_TIMEOUT) else {
        send_signal(pid, &exit, "KILL");
        panic!("butler {args:?} did not finish within {CLI_TIMEOUT:?}");
    };
    // The pipes close when the process exits (unless it left children holding them).
    let stdout = stdout_rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
    let stderr = stderr_rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
    (status.code().unwrap_or(-1), stdout, stderr)
}
