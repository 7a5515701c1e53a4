//! A client socket: plain TCP, or TLS over TCP (`tls:` in the config, SPEC §11).
//!
//! The intake drives every socket non-blocking and waits with `poll(2)` on its
//! file descriptor, so TLS must keep one promise for that to stay correct:
//! [`Socket::read`] returns `WouldBlock` only when nothing is left to hand out —
//! no decrypted bytes and no complete TLS record waiting inside rustls — so a
//! poll on the descriptor is a valid wait. Callers that stop reading before
//! `WouldBlock` (a head is complete, a buffer is full) must ask
//! [`Socket::has_pending`] before they poll.
//!
//! Writes through TLS are encrypted into rustls' buffer and sent as far as the
//! socket takes them; [`Socket::wants_write`] tells a writer that encrypted
//! bytes are still waiting, and [`Socket::flush`] sends them.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, RwLock};

/// Most plaintext handed to rustls per write, so its send buffer never grows
/// past a record or two beyond what the socket has taken.
const TLS_WRITE_CHUNK: usize = 16 * 1024;

pub enum Socket {
    Plain(TcpStream),
    Tls(Box<Tls>),
}

pub struct Tls {
    tcp: TcpStream,
    session: rustls::ServerConnection,
}

/// The TLS settings new connections get. A configuration reload replaces
/// them, so renewed certificate files take effect without a restart;
/// connections already open keep the session they have.
#[derive(Clone)]
pub struct TlsConfig(Arc<RwLock<Arc<rustls::ServerConfig>>>);

impl TlsConfig {
    pub fn new(config: Arc<rustls::ServerConfig>) -> TlsConfig {
        TlsConfig(Arc::new(RwLock::new(config)))
    }

    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn replace(&self, config: Arc<rustls::ServerConfig>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = config;
    }
}

impl Socket {
    /// Wraps an accepted, non-blocking connection; with `tls`, the handshake
    /// runs as the connection is read.
    pub fn new(tcp: TcpStream, tls: Option<&TlsConfig>) -> io::Result<Socket> {
        match tls {
            None => Ok(Socket::Plain(tcp)),
            Some(config) => {
                let session = rustls::ServerConnection::new(config.current())
                    .map_err(|e| io::Error::other(e.to_string()))?;
                Ok(Socket::Tls(Box::new(Tls { tcp, session })))
            }
        }
    }

    /// The TCP connection underneath (for `poll`, `shutdown` and lingering).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Socket::Plain(s) => s,
            Socket::Tls(t) => &t.tcp,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Socket::Tls(_))
    }

    /// Whether a response can be written yet: a TLS connection still in its
    /// handshake has no keys to write one with.
    pub fn can_respond(&self) -> bool {
        match self {
            Socket::Plain(_) => true,
            Socket::Tls(t) => !t.session.is_handshaking(),
        }
    }

    /// Reads received bytes (decrypted, for TLS). `Ok(0)` is the end of the
    /// connection; `WouldBlock` means nothing is buffered anywhere, so it is
    /// safe to poll the descriptor.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Plain(s) => s.read(buf),
            Socket::Tls(t) => t.read(buf),
        }
    }

    /// Whether [`Socket::read`] would return data (or an error) without
    /// waiting for the network. Always false for plain TCP.
    pub fn has_pending(&mut self) -> bool {
        match self {
            Socket::Plain(_) => false,
            Socket::Tls(t) => match t.session.process_new_packets() {
                Ok(state) => state.plaintext_bytes_to_read() > 0 || state.peer_has_closed(),
                // Reading reports the error.
                Err(_) => true,
            },
        }
    }

    /// Writes some of `data`; through TLS, the bytes are encrypted and sent as
    /// far as the socket takes them (see [`Socket::wants_write`]).
    pub fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Plain(s) => s.write(data),
            Socket::Tls(t) => t.write(data),
        }
    }

    /// Encrypted bytes are waiting to be sent.
    pub fn wants_write(&self) -> bool {
        match self {
            Socket::Plain(_) => false,
            Socket::Tls(t) => t.session.wants_write(),
        }
    }

    /// Sends waiting encrypted bytes; `WouldBlock` if the socket is full.
    pub fn flush(&mut self) -> io::Result<()> {
        match self {
            Socket::Plain(_) => Ok(()),
            Socket::Tls(t) => t.flush(),
        }
    }

    /// Writes `data` once, without waiting: for short canned answers to
    /// connections that are being dropped anyway.
    pub fn write_now(&mut self, data: &[u8]) {
        if self.can_respond() {
            let _ = self.write(data);
        }
    }

    /// Ends the connection and hands back the TCP connection alone, for
    /// lingering. With `clean`, a TLS `close_notify` goes first (if the
    /// socket takes it now); without, the peer sees a truncation, as it must
    /// when a response was cut short.
    pub fn into_tcp(self, clean: bool) -> TcpStream {
        match self {
            Socket::Plain(s) => s,
            Socket::Tls(mut t) => {
                if clean && !t.session.is_handshaking() {
                    t.session.send_close_notify();
                }
                let _ = t.flush();
                t.tcp
            }
        }
    }
}

impl Tls {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // Handshake messages and session tickets go out as soon as
            // possible; a full socket keeps them for the next write.
            let _ = self.flush();
            match self.session.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed without close_notify: for HTTP/1.1, whose
                // messages are framed, that is an ordinary end.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            // Records read earlier but not yet decrypted come first.
            match self.session.process_new_packets() {
                Ok(state) if state.plaintext_bytes_to_read() > 0 || state.peer_has_closed() => {
                    continue;
                }
                Ok(_) => {}
                Err(e) => return Err(self.fail(e)),
            }
            match self.session.read_tls(&mut self.tcp) {
                Ok(0) => return Ok(0),
                Ok(_) => {
                    if let Err(e) = self.session.process_new_packets() {
                        return Err(self.fail(e));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A protocol error: the alert rustls queued is sent if possible.
    fn fail(&mut self, e: rustls::Error) -> io::Error {
        let _ = self.flush();
        io::Error::new(io::ErrorKind::InvalidData, e.to_string())
    }

    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        // Earlier bytes first, so rustls' buffer stays small.
        self.flush()?;
        let take = data.len().min(TLS_WRITE_CHUNK);
        let n = self.session.writer().write(&data[..take])?;
        match self.flush() {
            Ok(()) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
            Err(e) => Err(e),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        while self.session.wants_write() {
            if self.session.write_tls(&mut self.tcp)? == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        Ok(())
    }
}

/// Builds the TLS settings from PEM files: the certificate chain (leaf first)
/// and its private key (PKCS#8, PKCS#1 or SEC1). HTTP/1.1 is the only
/// protocol offered through ALPN.
pub fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<rustls::ServerConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot read the certificate: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate found".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("cannot read the private key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the certificate and key do not fit together: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
