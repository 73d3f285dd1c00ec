//! NBD wire formats (the protocol as published: `doc/proto.md` of the NetworkBlockDevice
//! project, fixed newstyle negotiation, simple and structured replies).
//!
//! Parsing never panics: every parser takes untrusted bytes and returns `None` when there are
//! not enough of them yet, or a [`WireError`]. Emitting never fails. All integers are
//! big-endian ("network byte order") as the protocol defines.

use bytes::{BufMut, BytesMut};

/// "NBDMAGIC": first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": the newstyle magic, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a (compact) transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server → client, 16 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (client → server, 32 bits).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option numbers.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR + 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR + 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;

/// Information types of `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags (16 bits, sent with the export's size).
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Command types.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply chunk flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// `base:allocation` extent flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Byte lengths of the fixed headers.
pub const GREETING_LEN: usize = 18;
pub const OPTION_HEADER_LEN: usize = 16;
pub const REQUEST_HEADER_LEN: usize = 28;

/// NBD error values (errno numbering, as the protocol fixes them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad magic {found:#x} (expected {expected:#x})")]
    BadMagic { expected: u64, found: u64 },
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

/// The server's first message: magics and handshake flags.
pub fn emit_greeting(out: &mut BytesMut, flags: u16) {
    out.put_u64(NBD_MAGIC);
    out.put_u64(IHAVEOPT);
    out.put_u16(flags);
}

/// An option request's header: `IHAVEOPT`, option, data length (the data follows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    /// `Ok(None)` while fewer than [`OPTION_HEADER_LEN`] bytes are there.
    pub fn parse(b: &[u8]) -> Result<Option<Self>, WireError> {
        if b.len() < OPTION_HEADER_LEN {
            return Ok(None);
        }
        let magic = be_u64(&b[0..8]);
        if magic != IHAVEOPT {
            return Err(WireError::BadMagic {
                expected: IHAVEOPT,
                found: magic,
            });
        }
        Ok(Some(Self {
            option: be_u32(&b[8..12]),
            length: be_u32(&b[12..16]),
        }))
    }

    pub fn emit(&self, out: &mut BytesMut) {
        out.put_u64(IHAVEOPT);
        out.put_u32(self.option);
        out.put_u32(self.length);
    }
}

/// One option reply: header and data.
pub fn emit_option_reply(out: &mut BytesMut, option: u32, reply: u32, data: &[u8]) {
    out.put_u64(OPT_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// A transmission request header (the payload of a WRITE follows it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    /// `Ok(None)` while fewer than [`REQUEST_HEADER_LEN`] bytes are there.
    pub fn parse(b: &[u8]) -> Result<Option<Self>, WireError> {
        if b.len() < REQUEST_HEADER_LEN {
            return Ok(None);
        }
        let magic = be_u32(&b[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(WireError::BadMagic {
                expected: REQUEST_MAGIC as u64,
                found: magic as u64,
            });
        }
        Ok(Some(Self {
            flags: be_u16(&b[4..6]),
            command: be_u16(&b[6..8]),
            cookie: be_u64(&b[8..16]),
            offset: be_u64(&b[16..24]),
            length: be_u32(&b[24..28]),
        }))
    }

    pub fn emit(&self, out: &mut BytesMut) {
        out.put_u32(REQUEST_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.command);
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        out.put_u32(self.length);
    }
}

/// A simple reply's header (READ data follows it).
pub fn emit_simple_reply(out: &mut BytesMut, cookie: u64, error: u32) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
}

/// A structured reply chunk's header; `length` bytes of chunk payload follow it.
pub fn emit_chunk_header(out: &mut BytesMut, flags: u16, kind: u16, cookie: u64, length: u32) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(flags);
    out.put_u16(kind);
    out.put_u64(cookie);
    out.put_u32(length);
}

/// Reads a length-prefixed (u32) string at `at`; `None` if it does not fit or is not UTF-8.
pub fn parse_string(b: &[u8], at: usize) -> Option<(String, usize)> {
    let len = be_u32(b.get(at..at + 4)?) as usize;
    let s = b.get(at + 4..(at + 4).checked_add(len)?)?;
    Some((String::from_utf8(s.to_vec()).ok()?, at + 4 + len))
}

/// Reads a u16 at `at`.
pub fn parse_u16(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(be_u16)
}

/// Reads a u32 at `at`.
pub fn parse_u32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4).map(be_u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn request_header_roundtrip(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
            let h = RequestHeader { flags, command, cookie, offset, length };
            let mut b = BytesMut::new();
            h.emit(&mut b);
            prop_assert_eq!(b.len(), REQUEST_HEADER_LEN);
            prop_assert_eq!(RequestHeader::parse(&b).unwrap(), Some(h));
            prop_assert_eq!(RequestHeader::parse(&b[..REQUEST_HEADER_LEN - 1]).unwrap(), None);
        }

        #[test]
        fn option_header_roundtrip(option: u32, length: u32) {
            let h = OptionHeader { option, length };
            let mut b = BytesMut::new();
            h.emit(&mut b);
            prop_assert_eq!(OptionHeader::parse(&b).unwrap(), Some(h));
        }

        #[test]
        fn parsers_never_panic(bytes: Vec<u8>, at in 0usize..64) {
            let _ = RequestHeader::parse(&bytes);
            let _ = OptionHeader::parse(&bytes);
            let _ = parse_string(&bytes, at);
            let _ = parse_u16(&bytes, at);
        }
    }

    #[test]
    fn greeting_bytes() {
        let mut b = BytesMut::new();
        emit_greeting(&mut b, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(&b[..8], b"NBDMAGIC");
        assert_eq!(&b[8..16], b"IHAVEOPT");
        assert_eq!(&b[16..], &[0, 3]);
        assert_eq!(b.len(), GREETING_LEN);
    }

    #[test]
    fn bad_magic_is_an_error() {
        let mut b = BytesMut::new();
        RequestHeader {
            flags: 0,
            command: 0,
            cookie: 1,
            offset: 0,
            length: 0,
        }
        .emit(&mut b);
        b[0] ^= 1;
        assert!(RequestHeader::parse(&b).is_err());
    }
}
