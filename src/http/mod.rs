//! butler's own HTTP/1.1 intake (SPEC §2): `httparse` for request heads, strict
//! body framing, bounded buffers, a deadline on every wait, and a response
//! writer that flushes each chunk. Protocol logic ([`head`], [`target`],
//! [`chunked`]) is pure and unit-tested; [`conn`], [`exchange`] and [`server`]
//! are the thin I/O glue around it.

pub mod chunked;
pub mod collect;
pub mod conn;
pub mod exchange;
pub mod head;
pub mod server;
pub mod socket;
pub mod target;

pub use exchange::{BodyError, BodyLen, Exchange};
pub use head::{Head, Version};
pub use server::{Options, Server, Service, ShutdownHandle};
pub use socket::TlsConfig;
