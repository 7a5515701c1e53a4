//! A client connection: a non-blocking socket with a read buffer, and reads and
//! writes that wait with `poll(2)` so that every wait has a deadline. A client
//! that stops sending (slow loris) or stops reading cannot hold a worker
//! forever.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::socket::Socket;

/// Bytes read from the socket per call; also the most a head read adds at once.
const READ_CHUNK: usize = 16 * 1024;

pub struct Conn {
    pub socket: Socket,
    pub peer: SocketAddr,
    /// Received bytes not yet consumed start at `pos`.
    buf: Vec<u8>,
    pos: usize,
}

/// Waits until `fd` is ready for `events` (POLLIN/POLLOUT) or `timeout` passes.
/// Returns `Ok(false)` on timeout.
pub fn wait_ready(fd: &impl AsRawFd, events: libc::c_short, timeout: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as libc::c_int;
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 };
        // SAFETY: one valid pollfd, count 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if rc > 0 {
            return Ok(true);
        }
        if left.is_zero() {
            return Ok(false);
        }
    }
}

impl Conn {
    /// Wraps an accepted socket (already non-blocking) with bytes already read.
    pub fn new(socket: Socket, peer: SocketAddr, buf: Vec<u8>) -> Conn {
        Conn { socket, peer, buf, pos: 0 }
    }

    /// Unconsumed received bytes.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    pub fn consume(&mut self, n: usize) {
        self.pos += n;
        debug_assert!(self.pos <= self.buf.len());
    }

    /// Hands back the unconsumed bytes, compacted, and the socket.
    pub fn into_parts(mut self) -> (Socket, SocketAddr, Vec<u8>) {
        self.buf.drain(..self.pos);
        (self.socket, self.peer, self.buf)
    }

    /// Reads once from the socket into the buffer, waiting at most `timeout`.
    /// `Ok(0)` means the peer closed; a timeout is `ErrorKind::TimedOut`.
    pub fn fill(&mut self, timeout: Duration) -> io::Result<usize> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let start = self.buf.len();
        self.buf.resize(start + READ_CHUNK, 0);
        let result = self.read_socket(start, timeout);
        let n = *result.as_ref().unwrap_or(&0);
        self.buf.truncate(start + n);
        result
    }

    fn read_socket(&mut self, start: usize, timeout: Duration) -> io::Result<usize> {
        loop {
            match self.socket.read(&mut self.buf[start..]) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !wait_ready(self.socket.tcp(), libc::POLLIN, timeout)? {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads into `out`, from the buffer first, else straight from the socket
    /// (no copy through the buffer for large bodies).
    pub fn read_into(&mut self, out: &mut [u8], timeout: Duration) -> io::Result<usize> {
        let buffered = self.buffered();
        if !buffered.is_empty() {
            let n = buffered.len().min(out.len());
            out[..n].copy_from_slice(&buffered[..n]);
            self.consume(n);
            return Ok(n);
        }
        loop {
            match self.socket.read(out) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !wait_ready(self.socket.tcp(), libc::POLLIN, timeout)? {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes all of `data` (and, through TLS, every encrypted byte of it),
    /// waiting at most `stall` each time the client's socket buffer is full.
    pub fn write_all(&mut self, mut data: &[u8], stall: Duration) -> io::Result<()> {
        while !data.is_empty() || self.socket.wants_write() {
            let step = if data.is_empty() {
                self.socket.flush().map(|()| 0)
            } else {
                self.socket.write(data)
            };
            match step {
                Ok(0) if !data.is_empty() => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !wait_ready(self.socket.tcp(), libc::POLLOUT, stall)? {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
