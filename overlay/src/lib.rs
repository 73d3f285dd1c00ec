//! Continuum's overlay: the WireGuard protocol (so stock WireGuard peers interoperate) linking
//! every site.
//!
//! - [`crypto`], [`messages`], [`noise`], [`cookie`], [`replay`]: the protocol's pieces.
//! - [`peer`], [`device`]: the sans-IO core — sessions, timers, cryptokey routing, load —
//!   driven with time, packets and a seeded RNG as inputs.
//! - [`config`]: wg-quick-style configuration files; [`control`]: registration in meta, the
//!   peer list from meta and its cache, the key file; [`driver`]: UDP socket + kernel TUN;
//!   [`mss`]: TCP MSS clamping to the inner MTU.

pub mod config;
pub mod control;
pub mod cookie;
pub mod crypto;
pub mod device;
pub mod driver;
pub mod fuzzing;
pub mod keys;
pub mod messages;
pub mod mss;
pub mod noise;
pub mod peer;
pub mod replay;
pub mod udp;
pub mod userspace;
