//! The block protocol's frame layer. Every message on a block-server connection is one frame:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `CTBK` |
//! | 4 | 1 | version (1) |
//! | 5 | 1 | kind: 1 request, 2 response |
//! | 6 | 2 | flags (reserved, 0) |
//! | 8 | 8 | request id (responses echo it; many requests are in flight per connection) |
//! | 16 | 4 | header length (prost-encoded message header) ≤ [`MAX_HEADER_BYTES`] |
//! | 20 | 4 | payload length (shard data) ≤ [`MAX_PAYLOAD_BYTES`] |
//! | 24 | 4 | CRC-32 of bytes 0..24 and the header (the payload has per-4 KiB checksums of its own) |
//! | 28 | … | header, then payload |
//!
//! Integers are big-endian. [`Frame`] is the checked view of untrusted bytes (smoltcp's
//! `Packet` style), [`FrameRepr`] the owned form (`parse`/`emit`/`buffer_len`), and
//! [`FrameDecoder`] cuts frames out of a byte stream without copying payloads. Parsing never
//! panics; it returns [`WireError`].

use bytes::{Buf, Bytes, BytesMut};

pub const MAGIC: [u8; 4] = *b"CTBK";
pub const VERSION: u8 = 1;
/// Length of the fixed part of a frame.
pub const FIXED_LEN: usize = 28;
/// Largest prost header in a frame.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Largest payload in a frame (a shard chunk).
pub const MAX_PAYLOAD_BYTES: usize = 8 * 1024 * 1024;

mod field {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..4;
    pub const VERSION: usize = 4;
    pub const KIND: usize = 5;
    pub const FLAGS: Range<usize> = 6..8;
    pub const REQUEST_ID: Range<usize> = 8..16;
    pub const HEADER_LEN: Range<usize> = 16..20;
    pub const PAYLOAD_LEN: Range<usize> = 20..24;
    pub const CRC: Range<usize> = 24..28;
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum WireError {
    #[error("frame truncated: need {needed} bytes, have {have}")]
    Truncated { needed: usize, have: usize },
    #[error("not a Continuum block frame (bad magic)")]
    BadMagic,
    #[error("unsupported frame version {version}")]
    BadVersion { version: u8 },
    #[error("unknown frame kind {kind}")]
    BadKind { kind: u8 },
    #[error("reserved flags set: {flags:#x}")]
    BadFlags { flags: u16 },
    #[error("frame header of {len} bytes exceeds the limit of {MAX_HEADER_BYTES}")]
    HeaderTooLarge { len: usize },
    #[error("frame payload of {len} bytes exceeds the limit of {MAX_PAYLOAD_BYTES}")]
    PayloadTooLarge { len: usize },
    #[error("frame checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Request = 1,
    Response = 2,
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// A checked view of one frame at the start of a buffer.
#[derive(Debug)]
pub struct Frame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Frame<T> {
    /// Checks that `buffer` starts with a whole, valid frame (magic, version, kind, flags,
    /// limits, lengths, checksum).
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let f = Frame { buffer };
        let b = f.buffer.as_ref();
        if b.len() < FIXED_LEN {
            return Err(WireError::Truncated {
                needed: FIXED_LEN,
                have: b.len(),
            });
        }
        if b[field::MAGIC] != MAGIC {
            return Err(WireError::BadMagic);
        }
        if b[field::VERSION] != VERSION {
            return Err(WireError::BadVersion {
                version: b[field::VERSION],
            });
        }
        if f.kind().is_none() {
            return Err(WireError::BadKind {
                kind: b[field::KIND],
            });
        }
        let flags = be_u16(&b[field::FLAGS]);
        if flags != 0 {
            return Err(WireError::BadFlags { flags });
        }
        let (h, p) = (f.header_len(), f.payload_len());
        if h > MAX_HEADER_BYTES {
            return Err(WireError::HeaderTooLarge { len: h });
        }
        if p > MAX_PAYLOAD_BYTES {
            return Err(WireError::PayloadTooLarge { len: p });
        }
        let total = FIXED_LEN + h + p;
        if b.len() < total {
            return Err(WireError::Truncated {
                needed: total,
                have: b.len(),
            });
        }
        let stored = be_u32(&b[field::CRC]);
        let computed = checksum(&b[..field::CRC.start], &b[FIXED_LEN..FIXED_LEN + h]);
        if stored != computed {
            return Err(WireError::Checksum { stored, computed });
        }
        Ok(f)
    }

    pub fn kind(&self) -> Option<Kind> {
        match self.buffer.as_ref()[field::KIND] {
            1 => Some(Kind::Request),
            2 => Some(Kind::Response),
            _ => None,
        }
    }
    pub fn request_id(&self) -> u64 {
        be_u64(&self.buffer.as_ref()[field::REQUEST_ID])
    }
    pub fn header_len(&self) -> usize {
        be_u32(&self.buffer.as_ref()[field::HEADER_LEN]) as usize
    }
    pub fn payload_len(&self) -> usize {
        be_u32(&self.buffer.as_ref()[field::PAYLOAD_LEN]) as usize
    }
    /// Total bytes of this frame.
    pub fn total_len(&self) -> usize {
        FIXED_LEN + self.header_len() + self.payload_len()
    }
    pub fn header(&self) -> &[u8] {
        &self.buffer.as_ref()[FIXED_LEN..FIXED_LEN + self.header_len()]
    }
    pub fn payload(&self) -> &[u8] {
        let start = FIXED_LEN + self.header_len();
        &self.buffer.as_ref()[start..start + self.payload_len()]
    }
}

fn checksum(fixed: &[u8], header: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(fixed);
    h.update(header);
    h.finalize()
}

/// An owned frame. `header` is a prost message's bytes; `payload` is shard data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameRepr {
    pub kind: Kind,
    pub request_id: u64,
    pub header: Bytes,
    pub payload: Bytes,
}

impl FrameRepr {
    /// Parses a checked frame (copies its header and payload; [`FrameDecoder`] does not).
    pub fn parse<T: AsRef<[u8]>>(frame: &Frame<T>) -> Result<Self, WireError> {
        let kind = frame.kind().ok_or(WireError::BadKind {
            kind: frame.buffer.as_ref()[field::KIND],
        })?;
        Ok(FrameRepr {
            kind,
            request_id: frame.request_id(),
            header: Bytes::copy_from_slice(frame.header()),
            payload: Bytes::copy_from_slice(frame.payload()),
        })
    }

    /// Bytes [`FrameRepr::emit`] writes.
    pub fn buffer_len(&self) -> usize {
        FIXED_LEN + self.header.len() + self.payload.len()
    }

    /// Whether the frame respects the limits (emitting an oversized frame is a programmer error).
    pub fn check_limits(&self) -> Result<(), WireError> {
        if self.header.len() > MAX_HEADER_BYTES {
            return Err(WireError::HeaderTooLarge {
                len: self.header.len(),
            });
        }
        if self.payload.len() > MAX_PAYLOAD_BYTES {
            return Err(WireError::PayloadTooLarge {
                len: self.payload.len(),
            });
        }
        Ok(())
    }

    /// Writes the fixed part and the header into `buf` (at least `FIXED_LEN + header.len()`
    /// bytes). The payload is sent after it as is (vectored I/O, no copy).
    pub fn emit_head(&self, buf: &mut [u8]) {
        assert!(
            self.check_limits().is_ok(),
            "emitting a frame over the protocol limits"
        );
        buf[field::MAGIC].copy_from_slice(&MAGIC);
        buf[field::VERSION] = VERSION;
        buf[field::KIND] = self.kind as u8;
        buf[field::FLAGS].copy_from_slice(&0u16.to_be_bytes());
        buf[field::REQUEST_ID].copy_from_slice(&self.request_id.to_be_bytes());
        buf[field::HEADER_LEN].copy_from_slice(&(self.header.len() as u32).to_be_bytes());
        buf[field::PAYLOAD_LEN].copy_from_slice(&(self.payload.len() as u32).to_be_bytes());
        buf[FIXED_LEN..FIXED_LEN + self.header.len()].copy_from_slice(&self.header);
        let crc = checksum(&buf[..field::CRC.start], &self.header);
        buf[field::CRC].copy_from_slice(&crc.to_be_bytes());
    }

    /// Writes the whole frame into `buf` (at least [`FrameRepr::buffer_len`] bytes).
    pub fn emit(&self, buf: &mut [u8]) {
        self.emit_head(buf);
        let start = FIXED_LEN + self.header.len();
        buf[start..start + self.payload.len()].copy_from_slice(&self.payload);
    }
}

/// Cuts frames out of a byte stream. Payloads are split off the receive buffer, not copied.
#[derive(Debug, Default)]
pub struct FrameDecoder;

impl FrameDecoder {
    /// The next whole frame in `buf`, if there is one; the bytes are consumed. An error means
    /// the stream is corrupt and the connection must be closed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<FrameRepr>, WireError> {
        if buf.len() < FIXED_LEN {
            return Ok(None);
        }
        // Validate the fixed part early: a bad length must not make us wait for 4 GiB.
        let total = {
            let b = &buf[..];
            if b[field::MAGIC] != MAGIC {
                return Err(WireError::BadMagic);
            }
            let h = be_u32(&b[field::HEADER_LEN]) as usize;
            let p = be_u32(&b[field::PAYLOAD_LEN]) as usize;
            if h > MAX_HEADER_BYTES {
                return Err(WireError::HeaderTooLarge { len: h });
            }
            if p > MAX_PAYLOAD_BYTES {
                return Err(WireError::PayloadTooLarge { len: p });
            }
            FIXED_LEN + h + p
        };
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let (kind, request_id, header_len) = {
            let f = Frame::new_checked(&buf[..total])?;
            (
                f.kind().ok_or(WireError::BadKind { kind: 0 })?,
                f.request_id(),
                f.header_len(),
            )
        };
        let mut frame = buf.split_to(total);
        frame.advance(FIXED_LEN);
        let header = frame.split_to(header_len).freeze();
        let payload = frame.freeze();
        Ok(Some(FrameRepr {
            kind,
            request_id,
            header,
            payload,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames() -> impl Strategy<Value = FrameRepr> {
        (
            prop_oneof![Just(Kind::Request), Just(Kind::Response)],
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..300),
            proptest::collection::vec(any::<u8>(), 0..5000),
        )
            .prop_map(|(kind, request_id, h, p)| FrameRepr {
                kind,
                request_id,
                header: h.into(),
                payload: p.into(),
            })
    }

    fn bytes_of(f: &FrameRepr) -> Vec<u8> {
        let mut buf = vec![0u8; f.buffer_len()];
        f.emit(&mut buf);
        buf
    }

    proptest! {
        #[test]
        fn parse_emit_roundtrip(f in frames()) {
            let buf = bytes_of(&f);
            let frame = Frame::new_checked(&buf[..]).unwrap();
            prop_assert_eq!(frame.total_len(), buf.len());
            prop_assert_eq!(FrameRepr::parse(&frame).unwrap(), f);
        }

        #[test]
        fn a_stream_split_anywhere_decodes_the_same(fs in proptest::collection::vec(frames(), 1..5), cut in any::<usize>()) {
            let stream: Vec<u8> = fs.iter().flat_map(bytes_of).collect();
            let cut = cut % (stream.len() + 1);
            let mut dec = FrameDecoder;
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for part in [&stream[..cut], &stream[cut..]] {
                buf.extend_from_slice(part);
                while let Some(f) = dec.decode(&mut buf).unwrap() {
                    out.push(f);
                }
            }
            prop_assert_eq!(out, fs);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Frame::new_checked(&bytes[..]);
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = FrameDecoder.decode(&mut buf);
        }

        #[test]
        fn a_flipped_bit_before_the_payload_is_detected(f in frames(), bit in any::<usize>()) {
            let mut buf = bytes_of(&f);
            let protected = FIXED_LEN + f.header.len();
            let bit = bit % (protected * 8);
            buf[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(Frame::new_checked(&buf[..]).is_err());
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let f = FrameRepr {
            kind: Kind::Request,
            request_id: 7,
            header: Bytes::from_static(b"h"),
            payload: Bytes::from_static(b"payload"),
        };
        let buf = bytes_of(&f);
        assert_eq!(
            Frame::new_checked(&buf[..10]).unwrap_err(),
            WireError::Truncated {
                needed: FIXED_LEN,
                have: 10
            }
        );
        assert!(matches!(
            Frame::new_checked(&buf[..buf.len() - 1]),
            Err(WireError::Truncated { .. })
        ));
        let mut bad = buf.clone();
        bad[0] = b'X';
        assert_eq!(
            Frame::new_checked(&bad[..]).unwrap_err(),
            WireError::BadMagic
        );
        let mut huge = buf.clone();
        huge[field::PAYLOAD_LEN].copy_from_slice(&u32::MAX.to_be_bytes());
        let mut stream = BytesMut::from(&huge[..]);
        assert!(matches!(
            FrameDecoder.decode(&mut stream),
            Err(WireError::PayloadTooLarge { .. })
        ));
    }
}
