//! Continuum's chaos harness: proof that nothing acknowledged is ever lost.
//!
//! - [`blocks`]: stamped block contents and the block checker (what a read may return under
//!   NBD's durability rules);
//! - [`linear`]: a WGL linearizability checker for meta's key-value histories;
//! - [`live`]: live mode, real `continuum` processes in network namespaces with real NBD and
//!   meta workloads and a seeded schedule of process, network and disk faults;
//! - [`sim`]: simulation mode, the protocol cores in one thread with virtual time and seeded
//!   faults, many seeds per second.
//!
//! Design and how to read a report: `docs/chaos.md`.

pub mod blocks;
pub mod linear;
pub mod live;
pub mod sim;
