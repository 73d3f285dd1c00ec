//! Fuzz entry points (run by cargo-fuzz in `fuzz/` and as property tests in CI): arbitrary
//! client bytes through the negotiation and the transmission decoder must never panic, and
//! every item decoded must encode a reply.

use bytes::BytesMut;

use crate::handshake::{Event, ExportEntry, Handshake, TlsMode};
use crate::mem::export_info;
use crate::transmission::{self, Incoming, Params, Transmission};

/// Feeds `data` to a negotiation in pieces (the first byte picks the TLS mode and the piece
/// size), answering every event as a server would. True when negotiation reached an export.
pub fn handshake(data: &[u8]) -> bool {
    let Some((&first, rest)) = data.split_first() else {
        return false;
    };
    let mode = match first % 3 {
        0 => TlsMode::Off,
        1 => TlsMode::Optional,
        _ => TlsMode::Required,
    };
    let piece = 1 + (first as usize >> 2);
    let mut hs = Handshake::new(mode);
    for chunk in rest.chunks(piece) {
        hs.handle_input(chunk);
        while let Some(event) = hs.poll_event() {
            match event {
                Event::Export { name, .. } => {
                    if name == "disk" {
                        hs.handle_export(Ok(export_info("disk", "", 1 << 20)));
                    } else {
                        hs.handle_export(Err(crate::handshake::Refusal::unknown(&name)));
                    }
                }
                Event::List => hs.handle_list(&[ExportEntry {
                    name: "disk".into(),
                    description: String::new(),
                }]),
                Event::StartTls => hs.handle_tls_started(),
                Event::Serve(_) => return true,
                Event::Close { .. } => return false,
            }
        }
        let _ = hs.take_output();
    }
    false
}

/// Feeds `data` to a request decoder (the first byte picks the parameters) and encodes a
/// reply for each item. Returns how many requests were accepted (not refused).
pub fn transmission(data: &[u8]) -> usize {
    let Some((&first, rest)) = data.split_first() else {
        return 0;
    };
    let params = Params {
        size: 1 << (10 + (first & 15)),
        read_only: first & 16 != 0,
        structured: first & 32 != 0,
        base_allocation: (first & 64 != 0).then_some(1),
        fast_zero: first & 128 != 0,
    };
    let mut t = Transmission::new(params, BytesMut::new());
    let mut out = BytesMut::new();
    let mut accepted = 0;
    for chunk in rest.chunks(7) {
        t.handle_input(chunk);
        while let Some(item) = t.poll() {
            match item {
                Incoming::Request(r) => {
                    accepted += 1;
                    transmission::encode_ok(&mut out, r.cookie);
                }
                Incoming::Reject {
                    cookie,
                    error,
                    message,
                    ..
                } => {
                    transmission::encode_error(&mut out, params.structured, cookie, error, message)
                }
                Incoming::Disconnect | Incoming::Violation { .. } => return accepted,
            }
        }
    }
    accepted
}
