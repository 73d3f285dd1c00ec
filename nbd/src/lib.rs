//! Continuum's NBD server (the protocol as published by the NetworkBlockDevice project, fixed
//! newstyle), so QEMU, qemu-img, qemu-io, fio and libnbd's tools attach Continuum volumes.
//!
//! - [`wire`]: message layouts and numbers; parsers of untrusted bytes that never panic.
//! - [`handshake`]: the sans-IO negotiation (options, TLS, exports, metadata contexts).
//! - [`transmission`]: the sans-IO request decoder/validator and reply encoders.
//! - [`server`]: the tokio driver (TCP, Unix sockets, rustls), with the [`server::Export`] and
//!   [`server::Catalog`] traits a backend implements.
//! - [`mem`]: an in-memory export (tests, fuzzing, and the benches' protocol-only baseline).
//!
//! Architecture Invariant: nbd knows nothing of volumes or meta; the gateway (cli) adapts the
//! blockstore's volume client to [`server::Export`].

pub mod fuzzing;
pub mod handshake;
pub mod mem;
pub mod server;
pub mod tls;
pub mod transmission;
pub mod wire;
