//! The intake's threads: one acceptor thread and a bounded pool of connection
//! threads (SPEC §2, §11).
//!
//! The acceptor owns every connection that is *not* being served: new ones
//! whose request head is still arriving, idle keep-alive ones, and ones being
//! closed. It watches them all with one `poll(2)` and hands a connection to a
//! worker only once a complete request head has arrived. So silent or
//! half-open connections, slow-loris heads and idle keep-alives cost a file
//! descriptor and a small buffer, never a thread; workers only ever wait on
//! request bodies (bounded by `timeouts.request_body`) and on the upstream.
//!
//! A connection with a complete head that finds no free worker waits up to
//! `timeouts.queue`, then gets 503 `{"error":"server busy"}` from the acceptor.
//!
//! Every open connection holds a [`Ticket`] in the connection table from
//! accept to close, wherever it is (acceptor, queue, worker), so the caps of
//! SPEC §11 count exactly: at most [`connection_cap`] in all, and at most the
//! service's [`Service::connection_limit`] from one peer address. When the
//! table is full, a new connection displaces one that is already closing,
//! else the oldest idle keep-alive connection, else the oldest one still
//! sending its request.
//!
//! A request whose body the service wants whole before handling it
//! ([`Service::collect_body`], `/auth/login`) stays with the acceptor until the
//! body is in (see [`super::collect`]), so a client without a credential
//! never holds a worker while it sends slowly.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use super::collect::{Collector, Progress};
use super::conn::Conn;
use super::exchange::{Exchange, canned};
use super::head::{self, Head, HeadError, MAX_HEAD, Parsed};
use super::socket::{Socket, TlsConfig};

/// How long a closing connection is read and discarded after its last
/// response, so that unread request bytes don't turn the close into a reset
/// that destroys the response before the client reads it.
const LINGER: Duration = Duration::from_secs(2);
/// Most bytes discarded while lingering.
const LINGER_BYTES: usize = 1 << 20;
/// How long a worker keeps waiting for the next request on a kept-alive
/// connection before handing it to the acceptor. While workers are free this
/// makes butler thread-per-connection (fewest context switches); as soon as
/// a connection waits for a worker, the `pressure` signal makes every such
/// waiting worker give its idle connection back at once, so idle keep-alive
/// connections yield to new requests first.
const KEEPALIVE_GRACE: Duration = Duration::from_secs(1);
/// Pending connections the kernel may queue for the acceptor.
const LISTEN_BACKLOG: libc::c_int = 4096;
/// Stack for connection threads; parsing is iterative and bounded.
const WORKER_STACK: usize = 1 << 20;

/// What the intake needs from the application.
pub trait Service: Send + Sync + 'static {
    /// Serves one request; must answer through `ex`.
    fn handle(&self, ex: &mut Exchange<'_>);
    /// A request refused by the intake itself (for logs and metrics).
    fn refused(&self, peer: SocketAddr, status: u16, reason: &str);
    /// Most connections the peer address `ip` may hold open at once; `None`
    /// for no cap (a trusted proxy speaks for many clients).
    fn connection_limit(&self, ip: IpAddr) -> Option<usize>;
    /// A new connection was closed at once: its address is at its cap.
    fn too_many_connections(&self, peer: SocketAddr);
    /// Whether the intake must receive this request's whole body (of at most
    /// the returned size; a larger one is answered 413) before a worker
    /// handles it, within `timeouts.request_header` of the head.
    fn collect_body(&self, head: &Head) -> Option<u64>;
}

/// Open client connections, in all and per peer address (SPEC §11).
#[derive(Default)]
struct Table {
    open: usize,
    /// Only addresses with open connections: bounded by the connection cap.
    per_ip: HashMap<IpAddr, usize>,
}

/// Whether a new connection may be opened.
#[derive(Debug, PartialEq, Eq)]
enum Admission {
    Admit,
    /// Its address already holds as many as it may: close it at once.
    PeerFull,
    /// The table is full: make room or refuse.
    TableFull,
}

impl Table {
    /// The decision for a new connection from `ip` (pure).
    fn admission(&self, ip: IpAddr, per_ip: Option<usize>, cap: usize) -> Admission {
        if per_ip.is_some_and(|max| self.per_ip.get(&ip).copied().unwrap_or(0) >= max) {
            Admission::PeerFull
        } else if self.open >= cap {
            Admission::TableFull
        } else {
            Admission::Admit
        }
    }
}

/// One open connection's place in the [`Table`], given back when dropped
/// (whichever thread closes the connection).
struct Ticket {
    table: Arc<Mutex<Table>>,
    ip: IpAddr,
}

impl Ticket {
    fn take(table: &Arc<Mutex<Table>>, ip: IpAddr) -> Ticket {
        let mut t = lock(table);
        t.open += 1;
        *t.per_ip.entry(ip).or_insert(0) += 1;
        Ticket { table: table.clone(), ip }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut t = lock(&self.table);
        t.open = t.open.saturating_sub(1);
        if let Some(n) = t.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                t.per_ip.remove(&self.ip);
            }
        }
    }
}

/// Connections whose worker is busy upstream, watched by the acceptor for the
/// client hanging up, so the upstream request can be cut at once rather than
/// at the next write to the client (SPEC §8: Ollama stops generating).
#[derive(Default)]
pub struct Watches {
    next_id: AtomicU64,
    list: Mutex<Vec<Watch>>,
}

struct Watch {
    id: u64,
    fd: RawFd,
    on_hangup: Box<dyn FnOnce() + Send>,
}

/// Unregisters a hang-up watch when dropped.
pub struct WatchGuard<'a> {
    watches: &'a Watches,
    id: u64,
}

impl Watches {
    /// Calls `on_hangup` once if the peer of `fd` closes its connection while
    /// the guard lives. The caller must keep `fd` open until the guard drops.
    pub fn watch(&self, fd: RawFd, on_hangup: Box<dyn FnOnce() + Send>) -> WatchGuard<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.list).push(Watch { id, fd, on_hangup });
        WatchGuard { watches: self, id }
    }

    fn snapshot(&self) -> Vec<(u64, RawFd)> {
        lock(&self.list).iter().map(|w| (w.id, w.fd)).collect()
    }

    /// Runs the watch's callback with the list locked, so that once a
    /// guard has been dropped (which takes the same lock) its callback is
    /// neither running nor will run: a worker that finished its request can
    /// trust what it sees afterwards.
    fn fire(&self, id: u64) {
        let mut list = lock(&self.list);
        if let Some(i) = list.iter().position(|w| w.id == id) {
            let w = list.swap_remove(i);
            (w.on_hangup)();
        }
    }
}

impl Drop for WatchGuard<'_> {
    fn drop(&mut self) {
        lock(&self.watches.list).retain(|w| w.id != self.id);
    }
}

/// Poll events meaning "the peer closed its side".
#[cfg(target_os = "linux")]
const HANGUP: libc::c_short = libc::POLLRDHUP;
#[cfg(not(target_os = "linux"))]
const HANGUP: libc::c_short = 0;

/// Longest the acceptor sleeps, so new hang-up watches are polled promptly
/// without waking it for each one.
const WATCH_TICK: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub workers: usize,
    pub request_header: Duration,
    pub request_body: Duration,
    pub idle: Duration,
    pub queue: Duration,
    pub shutdown_drain: Duration,
}

/// Starts a graceful shutdown of a running server (SIGTERM, SIGINT).
#[derive(Clone)]
pub struct ShutdownHandle {
    flag: Arc<AtomicBool>,
    wake: Arc<UnixStream>,
}

impl ShutdownHandle {
    pub fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        wake(&self.wake);
    }

    pub fn is_triggered(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

fn wake(w: &UnixStream) {
    // Non-blocking: a full pipe already means a wake-up is pending.
    let _ = (&*w).write(&[1]);
}

/// Why the intake answers a request itself.
#[derive(Debug)]
enum Reject {
    Head(HeadError),
    /// A body collected by the intake was over its limit: 413.
    BodyTooLarge,
}

/// A complete head and its length, or the intake's refusal.
type Request = Result<(Box<Head>, usize), Reject>;

/// A complete head (or a head error) waiting for a worker.
struct Job {
    conn: Conn,
    ticket: Ticket,
    parsed: Request,
    queued_at: Instant,
}

struct Queue {
    jobs: VecDeque<Job>,
    idle_workers: usize,
    /// Jobs are waiting and no worker is free: workers holding idle
    /// keep-alive connections must give them back (the `pressure` pipe is
    /// readable while this is set).
    pressure: bool,
    spawned: usize,
    stop: bool,
}

/// A connection handed back from a worker to the acceptor.
enum Returned {
    /// Keep-alive: waiting for the next request (possibly partly received).
    Idle(Conn, Ticket),
    /// Closing: discard input for a moment, then close.
    Linger(TcpStream, Ticket),
}

struct Shared {
    opts: Options,
    /// Native HTTPS (`tls:`); `None` serves plain HTTP.
    tls: Option<TlsConfig>,
    service: Arc<dyn Service>,
    queue: Mutex<Queue>,
    ready: Condvar,
    table: Arc<Mutex<Table>>,
    returned: Mutex<Vec<Returned>>,
    wake: Arc<UnixStream>,
    shutdown: Arc<AtomicBool>,
    /// Workers currently serving a connection.
    busy: AtomicUsize,
    watches: Watches,
    /// Readable while [`Queue::pressure`] is set; polled by workers waiting
    /// on an idle keep-alive connection.
    pressure_rx: UnixStream,
    pressure_tx: UnixStream,
}

impl Shared {
    /// Sets or clears the pressure signal; call with the queue locked.
    fn set_pressure(&self, q: &mut Queue, on: bool) {
        // Once draining, it stays on: every idle keep-alive connection goes.
        if q.pressure == on || (!on && self.shutdown.load(Ordering::SeqCst)) {
            return;
        }
        q.pressure = on;
        if on {
            let _ = (&self.pressure_tx).write(&[1]);
        } else {
            let mut sink = [0u8; 16];
            while matches!((&self.pressure_rx).read(&mut sink), Ok(n) if n > 0) {}
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic never happens while these locks are held; if one did, the data
    // (queues of sockets) is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
    wake_rx: UnixStream,
}

impl Server {
    pub fn new(
        listener: TcpListener,
        opts: Options,
        service: Arc<dyn Service>,
        tls: Option<TlsConfig>,
    ) -> io::Result<Server> {
        listener.set_nonblocking(true)?;
        // std listens with a backlog of 128: a burst of new connections (a
        // flood, or many clients at once) then overflows the kernel's accept
        // queue before the acceptor wakes, and a client whose SYN is dropped
        // waits a second for its retry. Ask for more; the kernel caps it at
        // net.core.somaxconn. (Listening again only changes the backlog.)
        // SAFETY: listen(2) on a socket this listener owns.
        if unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let (wake_rx, wake_tx) = UnixStream::pair()?;
        let (pressure_rx, pressure_tx) = UnixStream::pair()?;
        for s in [&wake_rx, &wake_tx, &pressure_rx, &pressure_tx] {
            s.set_nonblocking(true)?;
        }
        let shared = Arc::new(Shared {
            opts,
            tls,
            service,
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                idle_workers: 0,
                pressure: false,
                spawned: 0,
                stop: false,
            }),
            ready: Condvar::new(),
            table: Arc::default(),
            returned: Mutex::new(Vec::new()),
            wake: Arc::new(wake_tx),
            shutdown: Arc::new(AtomicBool::new(false)),
            busy: AtomicUsize::new(0),
            watches: Watches::default(),
            pressure_rx,
            pressure_tx,
        });
        Ok(Server { listener, shared, wake_rx })
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle { flag: self.shared.shutdown.clone(), wake: self.shared.wake.clone() }
    }

    /// Serves until shutdown is triggered and in-flight requests have finished
    /// (or `shutdown_drain` has passed).
    pub fn run(self) {
        let max_conns = connection_cap(self.shared.opts.workers);
        let mut acceptor = Acceptor {
            listener: Some(self.listener),
            shared: self.shared,
            wake_rx: self.wake_rx,
            conns: Vec::new(),
            max_conns,
            accept_paused_until: None,
            drain_deadline: None,
        };
        acceptor.run();
        let mut q = lock(&acceptor.shared.queue);
        q.stop = true;
        drop(q);
        acceptor.shared.ready.notify_all();
    }
}

/// Raises the open-files limit to its hard maximum and derives how many client
/// connections may be open at once (see [`cap_for`]).
fn connection_cap(workers: usize) -> usize {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on a stack struct.
    let files = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            if lim.rlim_cur < lim.rlim_max {
                let want = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                    lim.rlim_cur = lim.rlim_max;
                }
            }
            usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
        } else {
            1024
        }
    };
    cap_for(workers, files)
}

/// SPEC §11: `workers + 1024`, or fewer when the open-file limit `files`
/// leaves less after 64 descriptors for butler itself (listener, log, config,
/// state file, wake-up pipes) and two per worker (the upstream socket of each
/// busy worker, and one spare for its reconnect). Never below 16, so a tiny
/// limit still serves someone (accept then fails with EMFILE and pauses,
/// which butler survives).
fn cap_for(workers: usize, files: usize) -> usize {
    let budget = files.saturating_sub(64 + 2 * workers).max(16);
    (workers + 1024).min(budget)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A request head is arriving (or, for TLS, the handshake); 408 at the
    /// deadline.
    Head,
    /// The head is complete and the body is being collected before dispatch
    /// (see [`Service::collect_body`]); 408 at the deadline.
    Body,
    /// Keep-alive, nothing received yet; closed silently at the deadline.
    Idle,
    /// Closing; input discarded until EOF or the deadline.
    Linger,
}

/// The connection to displace when the table is full (SPEC §11): one already
/// closing, else the oldest idle keep-alive connection, else the oldest one
/// still sending its request. Among connections in the same state, the
/// earliest deadline is the oldest (they all got the same timeout). `None`
/// when every connection is with a worker.
fn victim(conns: impl Iterator<Item = (State, Instant)>) -> Option<usize> {
    let rank = |s: State| match s {
        State::Linger => 0,
        State::Idle => 1,
        State::Head | State::Body => 2,
    };
    conns.enumerate().min_by_key(|(_, (state, deadline))| (rank(*state), *deadline)).map(|(i, _)| i)
}

/// A request whose head is complete, with its body being collected.
struct Collecting {
    head: Box<Head>,
    head_len: usize,
    collector: Collector,
}

struct Held {
    socket: Socket,
    peer: Option<SocketAddr>,
    ticket: Ticket,
    buf: Vec<u8>,
    state: State,
    deadline: Instant,
    /// In state [`State::Body`]: the request being completed.
    collecting: Option<Box<Collecting>>,
    /// Bytes thrown away while lingering.
    discarded: usize,
}

impl Held {
    fn new(
        socket: Socket,
        peer: SocketAddr,
        ticket: Ticket,
        buf: Vec<u8>,
        state: State,
        deadline: Instant,
    ) -> Held {
        Held {
            socket,
            peer: Some(peer),
            ticket,
            buf,
            state,
            deadline,
            collecting: None,
            discarded: 0,
        }
    }

    /// Most bytes worth reading now: the rest of the largest head allowed
    /// (plus one, to see it overflow), or what the collected body may still
    /// take.
    fn room(&self) -> usize {
        match &self.collecting {
            Some(c) => c.collector.room(),
            None => (MAX_HEAD + 1).saturating_sub(self.buf.len()),
        }
    }
}

/// What to do with a held connection after reading from it.
enum Action {
    Keep,
    Drop,
    Dispatch(Request),
}

struct Acceptor {
    listener: Option<TcpListener>,
    shared: Arc<Shared>,
    wake_rx: UnixStream,
    conns: Vec<Held>,
    max_conns: usize,
    accept_paused_until: Option<Instant>,
    drain_deadline: Option<Instant>,
}

impl Acceptor {
    fn run(&mut self) {
        let mut fds: Vec<libc::pollfd> = Vec::new();
        loop {
            let now = Instant::now();
            if self.shared.shutdown.load(Ordering::SeqCst) && self.drain_deadline.is_none() {
                self.begin_drain(now);
            }
            if let Some(deadline) = self.drain_deadline {
                let idle = self.shared.busy.load(Ordering::SeqCst) == 0
                    && lock(&self.shared.queue).jobs.is_empty();
                if idle || now >= deadline {
                    return;
                }
            }
            let accepting =
                self.listener.is_some() && self.accept_paused_until.is_none_or(|t| now >= t);
            if accepting {
                self.accept_paused_until = None;
            }

            fds.clear();
            fds.push(pollfd(&self.wake_rx));
            let listener_slot = accepting.then(|| {
                fds.push(pollfd(self.listener.as_ref().expect("accepting implies a listener")));
                fds.len() - 1
            });
            let first_conn = fds.len();
            // A TLS connection may hold decrypted bytes the descriptor no
            // longer signals, and may owe the peer handshake bytes.
            let mut pending = false;
            for c in &mut self.conns {
                let mut fd = pollfd(c.socket.tcp());
                if c.socket.wants_write() {
                    fd.events |= libc::POLLOUT;
                }
                pending |= c.state != State::Linger && c.socket.has_pending();
                fds.push(fd);
            }
            let first_watch = fds.len();
            let watched = self.shared.watches.snapshot();
            for (_, fd) in &watched {
                fds.push(libc::pollfd { fd: *fd, events: HANGUP, revents: 0 });
            }

            let timeout = self.next_timeout(now).map_or(WATCH_TICK, |t| t.min(WATCH_TICK));
            let ms = if pending { 0 } else { timeout.as_millis().max(1) as libc::c_int };
            // SAFETY: `fds` is a valid, initialised slice of pollfd.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            if rc < 0 {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    log::error!(error:% = err; "poll failed");
                    thread::sleep(Duration::from_millis(10));
                }
                continue;
            }

            // Readable connections first, before the list changes; then apply
            // the outcomes from the highest index down so swap_remove keeps
            // the remaining indices valid.
            let mut outcomes = Vec::new();
            for i in 0..self.conns.len() {
                if fds[first_conn + i].revents != 0
                    || (pending
                        && self.conns[i].state != State::Linger
                        && self.conns[i].socket.has_pending())
                {
                    match self.on_readable(i) {
                        Action::Keep => {}
                        other => outcomes.push((i, other)),
                    }
                }
            }
            for (i, action) in outcomes.into_iter().rev() {
                let held = self.conns.swap_remove(i);
                if let Action::Dispatch(parsed) = action {
                    self.dispatch(held, parsed);
                }
            }
            for (i, (id, _)) in watched.iter().enumerate() {
                if fds[first_watch + i].revents != 0 {
                    self.shared.watches.fire(*id);
                }
            }
            if fds[0].revents != 0 {
                self.collect_returned();
            }
            if listener_slot.is_some_and(|s| fds[s].revents != 0) {
                self.accept_all();
            }
            self.expire(Instant::now());
        }
    }

    fn begin_drain(&mut self, now: Instant) {
        self.drain_deadline = Some(now + self.shared.opts.shutdown_drain);
        // Workers waiting on idle keep-alive connections let them go.
        self.shared.set_pressure(&mut lock(&self.shared.queue), true);
        // Closing the listener makes new connections fail at once.
        self.listener = None;
        // Idle keep-alive connections have no request in flight: close them.
        self.conns.retain(|c| c.state != State::Idle);
    }

    fn next_timeout(&self, now: Instant) -> Option<Duration> {
        let mut next: Option<Instant> = self.conns.iter().map(|c| c.deadline).min();
        let queue_timeout = self.shared.opts.queue;
        if let Some(job) = lock(&self.shared.queue).jobs.front() {
            let t = job.queued_at + queue_timeout;
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        for t in [self.accept_paused_until, self.drain_deadline].into_iter().flatten() {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        if self.drain_deadline.is_some() {
            // Re-check the in-flight count regularly while draining.
            let t = now + Duration::from_millis(20);
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        next.map(|t| t.saturating_duration_since(now))
    }

    fn accept_all(&mut self) {
        for _ in 0..256 {
            let accepted = match &self.listener {
                Some(listener) => listener.accept(),
                None => return,
            };
            match accepted {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    // EMFILE/ENFILE and friends: the listener stays readable, so
                    // pause accepting briefly instead of spinning.
                    log::error!(error:% = e; "accept failed");
                    self.accept_paused_until = Some(Instant::now() + Duration::from_millis(100));
                    return;
                }
            }
        }
    }

    /// Takes a new connection into the table, or closes it (SPEC §11): at
    /// once if its address is at `max_connections_per_ip`; with 503 if the
    /// table is full and nothing can be displaced.
    fn admit(&mut self, stream: TcpStream, peer: SocketAddr) {
        let ip = peer.ip().to_canonical();
        let per_ip = self.shared.service.connection_limit(ip);
        let admission = lock(&self.shared.table).admission(ip, per_ip, self.max_conns);
        match admission {
            Admission::Admit => {}
            Admission::PeerFull => {
                self.shared.service.too_many_connections(peer);
                return;
            }
            Admission::TableFull => {
                if !self.evict() {
                    self.shared.service.refused(peer, 503, "server busy");
                    // Through TLS nothing can be said before a handshake.
                    if self.shared.tls.is_none() && stream.set_nonblocking(true).is_ok() {
                        let _ = (&stream).write(&SERVER_BUSY);
                    }
                    return;
                }
            }
        }
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let _ = stream.set_nodelay(true);
        let Ok(socket) = Socket::new(stream, self.shared.tls.as_ref()) else {
            return;
        };
        let ticket = Ticket::take(&self.shared.table, ip);
        let deadline = Instant::now() + self.shared.opts.request_header;
        self.conns.push(Held::new(socket, peer, ticket, Vec::new(), State::Head, deadline));
    }

    /// Closes the connection [`victim`] picks; false if every connection is
    /// with a worker. One still sending its request is told 503 first (a TLS
    /// handshake in progress cannot be told anything).
    fn evict(&mut self) -> bool {
        let Some(i) = victim(self.conns.iter().map(|c| (c.state, c.deadline))) else {
            return false;
        };
        let mut c = self.conns.swap_remove(i);
        if matches!(c.state, State::Head | State::Body) {
            c.socket.write_now(&SERVER_BUSY);
        }
        true
    }

    /// Reads what a connection has and decides what becomes of it. Reads until
    /// the socket has nothing more (or the request is complete), so that no
    /// decrypted TLS bytes are left where `poll` cannot see them.
    fn on_readable(&mut self, i: usize) -> Action {
        let c = &mut self.conns[i];
        let mut chunk = [0u8; 16 * 1024];
        if c.state == State::Linger {
            return match c.socket.tcp().read(&mut chunk) {
                Ok(0) => Action::Drop,
                Ok(n) => {
                    c.discarded += n;
                    if c.discarded >= LINGER_BYTES { Action::Drop } else { Action::Keep }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Action::Keep,
                Err(_) => Action::Drop,
            };
        }
        loop {
            let c = &mut self.conns[i];
            let room = c.room().clamp(1, chunk.len());
            let n = match c.socket.read(&mut chunk[..room]) {
                Ok(0) => return Action::Drop,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Action::Keep,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Action::Drop,
            };
            let fed = c.buf.len();
            c.buf.extend_from_slice(&chunk[..n]);
            if c.state == State::Idle {
                c.state = State::Head;
                c.deadline = Instant::now() + self.shared.opts.request_header;
            }
            match self.advance(i, fed) {
                Action::Keep => {}
                other => return other,
            }
        }
    }

    /// Looks at a connection's buffer after bytes from `fed` on arrived: is
    /// the head complete, is a collected body complete?
    fn advance(&mut self, i: usize, fed: usize) -> Action {
        let shared = &*self.shared;
        let c = &mut self.conns[i];
        if c.state == State::Head {
            let (head, len) = match head::parse(&c.buf) {
                Ok(Parsed::Partial) => return Action::Keep,
                Ok(Parsed::Complete(h, len)) => (h, len),
                Err(e) => return Action::Dispatch(Err(Reject::Head(e))),
            };
            let Some(limit) = shared.service.collect_body(&head) else {
                return Action::Dispatch(Ok((head, len)));
            };
            let collector = Collector::new(head.framing, limit);
            if collector.progress() == Progress::More && head.expect_continue && c.buf.len() == len
            {
                // The client waits for this before it sends the body.
                c.socket.write_now(b"HTTP/1.1 100 Continue\r\n\r\n");
            }
            c.state = State::Body;
            c.deadline = Instant::now() + shared.opts.request_header;
            c.collecting = Some(Box::new(Collecting { head, head_len: len, collector }));
            return self.advance(i, len);
        }
        let Some(collecting) = c.collecting.as_mut() else {
            return Action::Keep;
        };
        let new = c.buf.get(fed.max(collecting.head_len)..).unwrap_or_default();
        match collecting.collector.feed(new) {
            Progress::More => Action::Keep,
            Progress::TooLarge => Action::Dispatch(Err(Reject::BodyTooLarge)),
            // A broken body is the worker's to report (it reads it from the
            // buffer without waiting).
            Progress::Complete | Progress::Malformed => {
                let Collecting { head, head_len, .. } =
                    *c.collecting.take().expect("checked above");
                Action::Dispatch(Ok((head, head_len)))
            }
        }
    }

    fn dispatch(&self, held: Held, parsed: Request) {
        let peer = held.peer.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let job = Job {
            conn: Conn::new(held.socket, peer, held.buf),
            ticket: held.ticket,
            parsed,
            queued_at: Instant::now(),
        };
        let mut q = lock(&self.shared.queue);
        q.jobs.push_back(job);
        // Idle workers that were notified but have not woken yet still count
        // in `idle_workers`, so compare with the queue length: every queued
        // job needs a worker of its own.
        let short = q.jobs.len() > q.idle_workers;
        if short && q.spawned < self.shared.opts.workers {
            q.spawned += 1;
            let shared = self.shared.clone();
            let spawned = thread::Builder::new()
                .name("butler-worker".into())
                .stack_size(WORKER_STACK)
                .spawn(move || worker(shared));
            if let Err(e) = spawned {
                q.spawned -= 1;
                log::error!(error:% = e; "cannot start a worker thread");
            }
        } else if short {
            self.shared.set_pressure(&mut q, true);
        }
        drop(q);
        self.shared.ready.notify_one();
    }

    fn collect_returned(&mut self) {
        let mut sink = [0u8; 64];
        while matches!((&self.wake_rx).read(&mut sink), Ok(n) if n > 0) {}
        let returned = std::mem::take(&mut *lock(&self.shared.returned));
        let now = Instant::now();
        for r in returned {
            match r {
                Returned::Idle(conn, ticket) => {
                    if self.drain_deadline.is_some() {
                        continue;
                    }
                    let (socket, peer, buf) = conn.into_parts();
                    if buf.is_empty() {
                        let deadline = now + self.shared.opts.idle;
                        self.conns.push(Held::new(
                            socket,
                            peer,
                            ticket,
                            buf,
                            State::Idle,
                            deadline,
                        ));
                        continue;
                    }
                    // Part of the next request is here already, perhaps a
                    // whole head whose body the intake must collect.
                    let deadline = now + self.shared.opts.request_header;
                    self.conns.push(Held::new(socket, peer, ticket, buf, State::Head, deadline));
                    let i = self.conns.len() - 1;
                    match self.advance(i, 0) {
                        Action::Keep => {}
                        Action::Drop => drop(self.conns.swap_remove(i)),
                        Action::Dispatch(parsed) => {
                            let held = self.conns.swap_remove(i);
                            self.dispatch(held, parsed);
                        }
                    }
                }
                Returned::Linger(stream, ticket) => self.conns.push(Held {
                    socket: Socket::Plain(stream),
                    peer: None,
                    ticket,
                    buf: Vec::new(),
                    state: State::Linger,
                    deadline: now + LINGER,
                    collecting: None,
                    discarded: 0,
                }),
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.conns.len() {
            if self.conns[i].deadline > now {
                i += 1;
                continue;
            }
            let mut c = self.conns.swap_remove(i);
            if matches!(c.state, State::Head | State::Body) {
                if let Some(peer) = c.peer {
                    let reason = match c.state {
                        State::Body => "request body timeout",
                        _ => "request header timeout",
                    };
                    self.shared.service.refused(peer, 408, reason);
                }
                c.socket.write_now(&REQUEST_TIMEOUT);
                linger_now(c.socket, c.ticket, &mut self.conns, now);
            }
        }
        // Connections that waited too long for a worker.
        let mut expired = Vec::new();
        {
            let mut q = lock(&self.shared.queue);
            while q.jobs.front().is_some_and(|j| now >= j.queued_at + self.shared.opts.queue) {
                expired.extend(q.jobs.pop_front());
            }
            if q.jobs.is_empty() {
                self.shared.set_pressure(&mut q, false);
            }
        }
        for job in expired {
            self.shared.service.refused(job.conn.peer, 503, "server busy");
            let (mut socket, _, _) = job.conn.into_parts();
            socket.write_now(&SERVER_BUSY);
            linger_now(socket, job.ticket, &mut self.conns, now);
        }
    }
}

/// The intake's own answers, built once by [`canned`].
static SERVER_BUSY: LazyLock<Vec<u8>> = LazyLock::new(|| canned(503, "server busy"));
static REQUEST_TIMEOUT: LazyLock<Vec<u8>> = LazyLock::new(|| canned(408, "request timeout"));

fn linger_now(socket: Socket, ticket: Ticket, conns: &mut Vec<Held>, now: Instant) {
    let stream = socket.into_tcp(true);
    let _ = stream.shutdown(Shutdown::Write);
    conns.push(Held {
        socket: Socket::Plain(stream),
        peer: None,
        ticket,
        buf: Vec::new(),
        state: State::Linger,
        deadline: now + LINGER,
        collecting: None,
        discarded: 0,
    });
}

fn pollfd(fd: &impl AsRawFd) -> libc::pollfd {
    libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }
}

fn worker(shared: Arc<Shared>) {
    loop {
        let job = {
            let mut q = lock(&shared.queue);
            loop {
                if let Some(job) = q.jobs.pop_front() {
                    if q.jobs.is_empty() {
                        shared.set_pressure(&mut q, false);
                    }
                    // Counted as busy before the lock is released, so a drain
                    // never sees "queue empty, nobody busy" in between.
                    shared.busy.fetch_add(1, Ordering::SeqCst);
                    break job;
                }
                if q.stop {
                    return;
                }
                q.idle_workers += 1;
                q = shared.ready.wait(q).unwrap_or_else(|e| e.into_inner());
                q.idle_workers -= 1;
            }
        };
        serve(&shared, job);
        shared.busy.fetch_sub(1, Ordering::SeqCst);
        wake(&shared.wake);
    }
}

/// Serves requests on one connection while their heads are already buffered,
/// then hands the connection back to the acceptor (idle or closing).
fn serve(shared: &Shared, job: Job) {
    let Job { mut conn, ticket, mut parsed, .. } = job;
    let service = &*shared.service;
    loop {
        let started = Instant::now();
        let (head, len) = match parsed {
            Ok(p) => p,
            Err(e) => {
                let (status, reason) = match e {
                    Reject::Head(HeadError::TooLarge) => (431, "request header fields too large"),
                    Reject::Head(HeadError::Bad(r)) => (400, r),
                    Reject::Head(HeadError::Target(t)) => (400, t.reason()),
                    Reject::Head(HeadError::Expectation) => (417, "expectation failed"),
                    Reject::BodyTooLarge => (413, "request body too large"),
                };
                service.refused(conn.peer, status, reason);
                let response = match status {
                    400 => canned(status, &format!("bad request: {reason}")),
                    _ => canned(status, reason),
                };
                let _ = conn.write_all(&response, shared.opts.request_body);
                return close(shared, conn, ticket, true);
            }
        };
        conn.consume(len);
        let draining = shared.shutdown.load(Ordering::SeqCst);
        let mut ex = Exchange::new(
            &mut conn,
            *head,
            started,
            shared.opts.request_body,
            !draining,
            &shared.watches,
        );
        if draining {
            let _ = ex.respond_json(503, "{\"error\":\"shutting down\"}\n");
        } else {
            let outcome = catch_unwind(AssertUnwindSafe(|| service.handle(&mut ex)));
            if outcome.is_err() {
                log::error!(path:% = ex.head.target.path; "request handler panicked");
                if ex.response_started() {
                    ex.abort();
                } else {
                    let _ = ex.respond_json(500, "{\"error\":\"internal error\"}\n");
                }
            }
            if !ex.response_started() {
                let _ = ex.respond_json(500, "{\"error\":\"internal error\"}\n");
            }
        }
        let (keep, clean) = (ex.keep_alive(), !ex.aborted());
        drop(ex);
        if !keep {
            return close(shared, conn, ticket, clean);
        }
        match next_head(shared, &mut conn) {
            Some(next) => parsed = next,
            None => {
                lock(&shared.returned).push(Returned::Idle(conn, ticket));
                wake(&shared.wake);
                return;
            }
        }
    }
}

/// The next request head on a kept-alive connection, if it is already here
/// or arrives within [`KEEPALIVE_GRACE`] while no other connection waits for
/// a worker (see [`KEEPALIVE_GRACE`]). A request whose body the intake must
/// collect is served here only if that body is here whole; otherwise the
/// connection goes back to the acceptor, which waits for the body without a
/// worker.
fn next_head(shared: &Shared, conn: &mut Conn) -> Option<Request> {
    let mut waited = false;
    loop {
        match head::parse(conn.buffered()) {
            Ok(Parsed::Complete(h, len)) => {
                if let Some(limit) = shared.service.collect_body(&h) {
                    let mut collector = Collector::new(h.framing, limit);
                    let body = conn.buffered().get(len..).unwrap_or_default();
                    if matches!(collector.feed(body), Progress::More | Progress::TooLarge) {
                        return None;
                    }
                }
                return Some(Ok((h, len)));
            }
            Err(e) => return Some(Err(Reject::Head(e))),
            Ok(Parsed::Partial) => {}
        }
        if waited || lock(&shared.queue).pressure {
            return None;
        }
        waited = true;
        if !conn.socket.has_pending() {
            let mut fds = [pollfd(conn.socket.tcp()), pollfd(&shared.pressure_rx)];
            let grace = KEEPALIVE_GRACE.min(shared.opts.idle).as_millis() as libc::c_int;
            // SAFETY: two valid pollfds.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, grace) };
            if rc <= 0 || fds[1].revents != 0 {
                return None;
            }
        }
        // A closed or failed connection is handed back too; the acceptor
        // notices and drops it.
        if !matches!(conn.fill(Duration::ZERO), Ok(n) if n > 0) {
            return None;
        }
    }
}

/// Closes after a final response: shut our side, then let the acceptor
/// discard whatever the client still sends.
fn close(shared: &Shared, conn: Conn, ticket: Ticket, clean: bool) {
    let (socket, _, _) = conn.into_parts();
    let stream = socket.into_tcp(clean);
    if stream.shutdown(Shutdown::Write).is_ok() {
        lock(&shared.returned).push(Returned::Linger(stream, ticket));
        wake(&shared.wake);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_cap_follows_the_open_file_limit() {
        assert_eq!(cap_for(128, 1 << 20), 1152);
        assert_eq!(cap_for(8, 20_000), 1032);
        // 1024 files, 128 workers: 1024 - 64 - 256.
        assert_eq!(cap_for(128, 1024), 704);
        assert_eq!(cap_for(128, 100), 16);
    }

    #[test]
    fn admission_counts_per_address_and_in_all() {
        let table = Arc::new(Mutex::new(Table::default()));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let tickets: Vec<Ticket> = (0..2).map(|_| Ticket::take(&table, a)).collect();
        let t = lock(&table);
        assert_eq!(t.admission(a, Some(2), 10), Admission::PeerFull);
        assert_eq!(t.admission(a, Some(3), 10), Admission::Admit);
        assert_eq!(t.admission(a, None, 10), Admission::Admit);
        assert_eq!(t.admission(b, Some(2), 10), Admission::Admit);
        assert_eq!(t.admission(b, Some(2), 2), Admission::TableFull);
        // The address cap is checked first: a capped address displaces nobody.
        assert_eq!(t.admission(a, Some(2), 2), Admission::PeerFull);
        drop(t);
        drop(tickets);
        let t = lock(&table);
        assert_eq!(t.open, 0);
        assert!(t.per_ip.is_empty(), "addresses without connections are forgotten");
    }

    #[test]
    fn the_victim_is_closing_then_idle_then_oldest_sending() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let pick = |list: &[(State, Instant)]| victim(list.iter().copied());
        assert_eq!(pick(&[]), None);
        let list = [(State::Head, at(1)), (State::Idle, at(9)), (State::Linger, at(50))];
        assert_eq!(pick(&list), Some(2));
        let list = [(State::Head, at(1)), (State::Idle, at(9)), (State::Idle, at(5))];
        assert_eq!(pick(&list), Some(2));
        let list = [(State::Head, at(7)), (State::Body, at(3)), (State::Head, at(5))];
        assert_eq!(pick(&list), Some(1));
    }
}
