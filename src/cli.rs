//! The command line (SPEC §3): run, `check`, `init`, `gen-key`,
//! `hash-password`. Exit codes: 0 ok, 1 config or startup error, 2 usage error.

use std::io::{BufRead, IsTerminal, Write};
use std::net::TcpListener;
use std::sync::Arc;

use crate::app::App;
use crate::config::Config;
use crate::http::{Options, Server, TlsConfig};
use crate::reload::Live;

const USAGE: &str = "\
butler — access-control reverse proxy for Ollama

Usage:
  butler [--config PATH]          run the proxy
  butler check [--config PATH]    validate the config and print a summary
  butler init [PATH]              write a new config with a fresh admin key
  butler gen-key                  print a new API key and its key_sha256
  butler hash-password            read a password on stdin, print a bcrypt hash
  butler --version | --help

The config path defaults to $BUTLER_CONFIG, else butler.yaml.
BUTLER_LISTEN and BUTLER_UPSTREAM override `listen` and `upstream`.
";

/// bcrypt cost for `hash-password`: slow enough for passwords, fast enough
/// that a login does not stall a worker (the config refuses costs above 14).
const BCRYPT_COST: u32 = 10;

enum Command {
    Run(String),
    Check(String),
    Init(String),
    GenKey,
    HashPassword,
    Version,
    Help,
}

/// Runs the command line and returns the process exit code.
pub fn main() -> i32 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match parse_args(&args) {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("butler: {msg}\n\n{USAGE}");
            return 2;
        }
    };
    if !matches!(command, Command::Run(_)) {
        // One-shot commands print to a terminal or a pipe: `butler check | head`
        // should end quietly, not panic on a closed pipe. (The server keeps
        // Rust's default of ignoring SIGPIPE, so a vanished client is an
        // error on its socket, not a signal.)
        // SAFETY: resetting a signal disposition before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match command {
        Command::Help => {
            print!("{USAGE}");
            0
        }
        Command::Version => {
            println!("butler {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Command::GenKey => gen_key(),
        Command::HashPassword => hash_password(),
        Command::Init(path) => init(&path),
        Command::Check(path) => check(&path),
        Command::Run(path) => run(&path),
    }
}

fn default_config_path() -> String {
    std::env::var("BUTLER_CONFIG")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "butler.yaml".into())
}

fn parse_args(args: &[String]) -> Result<Command, String> {
    let mut it = args.iter().map(String::as_str);
    let mut config: Option<String> = None;
    let mut positional: Vec<&str> = Vec::new();
    while let Some(arg) = it.next() {
        match arg {
            "-h" | "--help" | "-help" => return Ok(Command::Help),
            "-V" | "--version" | "-version" => return Ok(Command::Version),
            "-c" | "--config" | "-config" => {
                let v = it.next().ok_or_else(|| format!("{arg} needs a path"))?;
                config = Some(v.to_owned());
            }
            _ if arg.starts_with("--config=") || arg.starts_with("-config=") => {
                config = Some(arg.split_once('=').map(|(_, v)| v.to_owned()).unwrap_or_default());
            }
            _ if arg.starts_with('-') => return Err(format!("unknown option {arg}")),
            _ => positional.push(arg),
        }
    }
    let (sub, rest) = match positional.split_first() {
        Some((&s @ ("check" | "init" | "gen-key" | "hash-password"), rest)) => (Some(s), rest),
        _ => (None, &positional[..]),
    };
    let no_extra = |c: Command| match rest.first() {
        None => Ok(c),
        Some(extra) => Err(format!("unexpected argument {extra}")),
    };
    match sub {
        None => no_extra(Command::Run(config.unwrap_or_else(default_config_path))),
        Some("check") => no_extra(Command::Check(config.unwrap_or_else(default_config_path))),
        Some("init") => {
            if rest.len() > 1 || (config.is_some() && !rest.is_empty()) {
                return Err("init takes one path".into());
            }
            let path = rest.first().map(|p| p.to_string()).or(config);
            Ok(Command::Init(path.unwrap_or_else(|| "butler.yaml".into())))
        }
        Some("gen-key") if config.is_none() => no_extra(Command::GenKey),
        Some("hash-password") if config.is_none() => no_extra(Command::HashPassword),
        Some(s) => Err(format!("{s} takes no --config")),
    }
}

fn load(path: &str) -> Result<Config, Vec<String>> {
    Config::load_for_run(path)
}

fn print_errors(path: &str, errors: &[String]) {
    eprintln!("butler: invalid configuration {path}:");
    for e in errors {
        eprintln!("  {e}");
    }
}

fn check(path: &str) -> i32 {
    match load(path) {
        Ok(c) => {
            println!("{path}: OK");
            println!("  listen:    {}", c.listen);
            println!("  upstream:  {}{}", c.upstream.origin, c.upstream.base_path);
            println!("  auth mode: {}", c.auth.mode.as_str());
            println!("  clients:   {}", c.clients.len());
            println!("  users:     {}", c.users.len());
            println!("  roles:     {}", c.role_policies.len());
            println!("  tls:       {}", if c.tls.is_some() { "on" } else { "off" });
            0
        }
        Err(errors) => {
            print_errors(path, &errors);
            1
        }
    }
}

/// glibc gives every thread that allocates its own malloc arena (up to eight
/// per core), which multiplies resident memory with a pool of connection
/// threads; two arenas are plenty for butler's short-lived allocations.
///
/// Large blocks (a request body of up to 8 MiB, its edited copy) are always
/// mapped on their own and unmapped when freed, so RSS falls back after a big
/// request (SPEC §11 "Memory"). glibc would otherwise raise this threshold to
/// the size of the largest block freed (up to 32 MiB) and keep such blocks
/// in its heaps afterwards; setting it fixes it (and the trim threshold with
/// it). 256 KiB keeps everything an ordinary request allocates on the heap.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

fn run(path: &str) -> i32 {
    limit_malloc_arenas();
    let config = match load(path) {
        Ok(c) => c,
        Err(errors) => {
            print_errors(path, &errors);
            return 1;
        }
    };
    crate::logging::init(config.log_format);
    let listener = match TcpListener::bind(&config.listen) {
        Ok(l) => l,
        Err(e) => {
            log::error!(listen = config.listen.as_str(), error:% = e; "cannot listen");
            eprintln!("butler: cannot listen on {}: {e}", config.listen);
            return 1;
        }
    };
    let tls = config.tls.clone().map(TlsConfig::new);
    let app = match App::new(&config, None) {
        Ok(a) => Arc::new(Live::new(a, &config, path, tls.clone())),
        Err(e) => {
            eprintln!("butler: startup failed: {e}");
            return 1;
        }
    };
    let t = config.timeouts;
    let opts = Options {
        workers: config.workers,
        request_header: t.request_header,
        request_body: t.request_body,
        idle: t.idle,
        queue: t.queue,
        shutdown_drain: t.shutdown_drain,
    };
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let server = match Server::new(listener, opts, app.clone(), tls) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("butler: startup failed: {e}");
            return 1;
        }
    };
    if let Err(e) = app.watch_file().and_then(|()| app.save_periodically()) {
        eprintln!("butler: cannot start the config watcher: {e}");
        return 1;
    }
    if let Err(e) = watch_signals(server.shutdown_handle(), app.clone()) {
        eprintln!("butler: cannot install signal handlers: {e}");
        return 1;
    }
    log::info!(
        addr = addr.as_str(),
        scheme = if config.tls.is_some() { "https" } else { "http" },
        upstream = format!("{}{}", config.upstream.origin, config.upstream.base_path).as_str(),
        version = env!("CARGO_PKG_VERSION");
        "listening"
    );
    server.run();
    app.save_state();
    log::info!("stopped");
    0
}

/// SIGTERM/SIGINT start a graceful shutdown; a second one exits at once.
/// SIGHUP reloads the configuration.
fn watch_signals(handle: crate::http::ShutdownHandle, live: Arc<Live>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::Builder::new().name("butler-signals".into()).spawn(move || {
        for signal in signals.forever() {
            if signal == SIGHUP {
                live.reload("SIGHUP");
                continue;
            }
            if handle.is_triggered() {
                log::warn!(signal = signal; "second signal, exiting now");
                std::process::exit(1);
            }
            log::info!(signal = signal; "shutting down");
            handle.trigger();
        }
    })?;
    Ok(())
}

fn gen_key() -> i32 {
    match crate::auth::keys::generate() {
        Ok((key, digest)) => {
            println!("key: {key}");
            println!("key_sha256: \"{digest}\"");
            0
        }
        Err(e) => {
            eprintln!("butler: cannot read OS randomness: {e}");
            1
        }
    }
}

fn init(path: &str) -> i32 {
    let (key, digest) = match crate::auth::keys::generate() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("butler: cannot read OS randomness: {e}");
            return 1;
        }
    };
    let text = init_config(&digest);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let written = options.open(path).and_then(|mut f| f.write_all(text.as_bytes()));
    match written {
        Ok(()) => {
            println!("wrote {path} with one admin client.");
            println!("Its API key (shown once, only its SHA-256 digest is stored):");
            println!();
            println!("  {key}");
            println!();
            println!("Use it as: Authorization: Bearer {key}");
            0
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            eprintln!("butler: {path} already exists; not overwriting it");
            1
        }
        Err(e) => {
            eprintln!("butler: cannot write {path}: {e}");
            1
        }
    }
}

fn init_config(digest: &str) -> String {
    format!(
        "# butler configuration, written by `butler init`.\n\
         # Reference: butler.example.yaml and docs/configuration.md.\n\
         listen: \"127.0.0.1:8080\"\n\
         upstream: \"http://127.0.0.1:11434\"\n\
         clients:\n\
         \x20 - name: admin\n\
         \x20   # SHA-256 of the key printed by `butler init`; the key itself is not stored.\n\
         \x20   key_sha256: \"{digest}\"\n\
         \x20   # The owner's key: every model, and pull/delete/create. Give other\n\
         \x20   # clients only what they need (policy fields: docs/policy.md).\n\
         \x20   allow_models: [\"*\"]\n\
         \x20   allow_manage: true\n"
    )
}

fn hash_password() -> i32 {
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    let read = |prompt: &str| -> std::io::Result<String> {
        if tty {
            eprint!("{prompt}");
            let _ = std::io::stderr().flush();
        }
        let _echo = if tty { EchoOff::new() } else { None };
        let mut line = String::new();
        stdin.lock().read_line(&mut line)?;
        if tty {
            eprintln!();
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    };
    let password = match read("Password: ") {
        Ok(p) => p,
        Err(e) => {
            eprintln!("butler: cannot read password: {e}");
            return 1;
        }
    };
    if password.is_empty() {
        eprintln!("butler: empty password");
        return 1;
    }
    if tty && read("Again: ").ok().as_deref() != Some(password.as_str()) {
        eprintln!("butler: passwords do not match");
        return 1;
    }
    match bcrypt::hash(&password, BCRYPT_COST) {
        Ok(h) => {
            println!("{h}");
            0
        }
        Err(e) => {
            eprintln!("butler: cannot hash password: {e}");
            1
        }
    }
}

/// Turns terminal echo off on stdin until dropped.
struct EchoOff(libc::termios);

impl EchoOff {
    fn new() -> Option<EchoOff> {
        // SAFETY: termios calls on fd 0 with a zero-initialised struct that
        // tcgetattr fills in before use.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            let saved = t;
            t.c_lflag &= !libc::ECHO;
            if libc::tcsetattr(0, libc::TCSANOW, &t) != 0 {
                return None;
            }
            Some(EchoOff(saved))
        }
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read in `new`.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_command_lines() {
        assert!(
            matches!(parse_args(&args("--config x.yaml")), Ok(Command::Run(p)) if p == "x.yaml")
        );
        assert!(matches!(parse_args(&args("-c x.yaml")), Ok(Command::Run(p)) if p == "x.yaml"));
        assert!(
            matches!(parse_args(&args("-config x.yaml")), Ok(Command::Run(p)) if p == "x.yaml")
        );
        assert!(
            matches!(parse_args(&args("--config=x.yaml")), Ok(Command::Run(p)) if p == "x.yaml")
        );
        assert!(matches!(parse_args(&args("check -c y")), Ok(Command::Check(p)) if p == "y"));
        assert!(matches!(parse_args(&args("-c y check")), Ok(Command::Check(p)) if p == "y"));
        assert!(matches!(parse_args(&args("init")), Ok(Command::Init(p)) if p == "butler.yaml"));
        assert!(
            matches!(parse_args(&args("init my.yaml")), Ok(Command::Init(p)) if p == "my.yaml")
        );
        assert!(matches!(parse_args(&args("gen-key")), Ok(Command::GenKey)));
        assert!(matches!(parse_args(&args("--version")), Ok(Command::Version)));
        assert!(parse_args(&args("--bogus")).is_err());
        assert!(parse_args(&args("--config")).is_err());
        assert!(parse_args(&args("run extra")).is_err());
        assert!(parse_args(&args("gen-key --config x")).is_err());
    }

    #[test]
    fn init_config_is_valid() {
        let digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let c = Config::parse(&init_config(digest), &|_| None).unwrap();
        assert_eq!(c.clients.len(), 1);
        assert!(c.clients[0].policy.models.permits_all());
        assert!(c.clients[0].policy.allow_manage);
        assert_eq!(c.upstream.origin, "http://127.0.0.1:11434");
    }
}
