//! WireGuard's four message types, exactly as on the wire (little-endian integers), parsed
//! without copying. Parsing never panics: a datagram of the wrong size or type is an error
//! value (the overlay drops it).

/// Message type codes (the first byte; three reserved zero bytes follow).
pub const TYPE_INITIATION: u8 = 1;
pub const TYPE_RESPONSE: u8 = 2;
pub const TYPE_COOKIE_REPLY: u8 = 3;
pub const TYPE_DATA: u8 = 4;

pub const INITIATION_LEN: usize = 148;
pub const RESPONSE_LEN: usize = 92;
pub const COOKIE_REPLY_LEN: usize = 64;
/// Type, receiver index and counter before the encrypted payload of a data message.
pub const DATA_HEADER_LEN: usize = 16;
/// The smallest data message: an empty (keepalive) payload and its tag.
pub const DATA_MIN_LEN: usize = DATA_HEADER_LEN + crate::crypto::TAG_LEN;

/// Where mac1 and mac2 start in the two handshake messages.
pub const INITIATION_MAC1: usize = 116;
pub const RESPONSE_MAC1: usize = 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("datagram of {0} bytes is too short for any message")]
    TooShort(usize),
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("reserved bytes are not zero")]
    Reserved,
    #[error("message type {kind} must be {expected} bytes, got {got}")]
    BadLength {
        kind: u8,
        expected: usize,
        got: usize,
    },
}

/// A parsed datagram, borrowing its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    Initiation(Initiation<'a>),
    Response(Response<'a>),
    CookieReply(CookieReply<'a>),
    Data(Data<'a>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Initiation<'a> {
    pub raw: &'a [u8],
    pub sender: u32,
    pub ephemeral: &'a [u8; 32],
    pub encrypted_static: &'a [u8; 48],
    pub encrypted_timestamp: &'a [u8; 28],
    pub mac1: &'a [u8; 16],
    pub mac2: &'a [u8; 16],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response<'a> {
    pub raw: &'a [u8],
    pub sender: u32,
    pub receiver: u32,
    pub ephemeral: &'a [u8; 32],
    pub encrypted_nothing: &'a [u8; 16],
    pub mac1: &'a [u8; 16],
    pub mac2: &'a [u8; 16],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CookieReply<'a> {
    pub receiver: u32,
    pub nonce: &'a [u8; 24],
    pub encrypted_cookie: &'a [u8; 32],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Data<'a> {
    pub receiver: u32,
    pub counter: u64,
    /// Ciphertext and tag.
    pub payload: &'a [u8],
}

fn arr<const N: usize>(b: &[u8], at: usize) -> &[u8; N] {
    b[at..at + N]
        .try_into()
        .expect("length checked by the caller")
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(*arr(b, at))
}

/// Parses one datagram.
pub fn parse(b: &[u8]) -> Result<Packet<'_>, PacketError> {
    if b.len() < 4 {
        return Err(PacketError::TooShort(b.len()));
    }
    if b[1..4] != [0, 0, 0] {
        return Err(PacketError::Reserved);
    }
    let exact = |expected: usize| {
        if b.len() == expected {
            Ok(())
        } else {
            Err(PacketError::BadLength {
                kind: b[0],
                expected,
                got: b.len(),
            })
        }
    };
    match b[0] {
        TYPE_INITIATION => {
            exact(INITIATION_LEN)?;
            Ok(Packet::Initiation(Initiation {
                raw: b,
                sender: u32_at(b, 4),
                ephemeral: arr(b, 8),
                encrypted_static: arr(b, 40),
                encrypted_timestamp: arr(b, 88),
                mac1: arr(b, 116),
                mac2: arr(b, 132),
            }))
        }
        TYPE_RESPONSE => {
            exact(RESPONSE_LEN)?;
            Ok(Packet::Response(Response {
                raw: b,
                sender: u32_at(b, 4),
                receiver: u32_at(b, 8),
                ephemeral: arr(b, 12),
                encrypted_nothing: arr(b, 44),
                mac1: arr(b, 60),
                mac2: arr(b, 76),
            }))
        }
        TYPE_COOKIE_REPLY => {
            exact(COOKIE_REPLY_LEN)?;
            Ok(Packet::CookieReply(CookieReply {
                receiver: u32_at(b, 4),
                nonce: arr(b, 8),
                encrypted_cookie: arr(b, 32),
            }))
        }
        TYPE_DATA => {
            if b.len() < DATA_MIN_LEN {
                return Err(PacketError::BadLength {
                    kind: TYPE_DATA,
                    expected: DATA_MIN_LEN,
                    got: b.len(),
                });
            }
            Ok(Packet::Data(Data {
                receiver: u32_at(b, 4),
                counter: u64::from_le_bytes(*arr(b, 8)),
                payload: &b[DATA_HEADER_LEN..],
            }))
        }
        t => Err(PacketError::UnknownType(t)),
    }
}

/// Writes a data message header (type, receiver, counter) into `out[..16]`.
pub fn write_data_header(out: &mut [u8], receiver: u32, counter: u64) {
    out[..4].copy_from_slice(&[TYPE_DATA, 0, 0, 0]);
    out[4..8].copy_from_slice(&receiver.to_le_bytes());
    out[8..16].copy_from_slice(&counter.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_types_are_checked() {
        assert_eq!(parse(&[]), Err(PacketError::TooShort(0)));
        assert_eq!(parse(&[9, 0, 0, 0]), Err(PacketError::UnknownType(9)));
        assert_eq!(parse(&[1, 1, 0, 0]), Err(PacketError::Reserved));
        assert!(matches!(
            parse(&[1, 0, 0, 0]),
            Err(PacketError::BadLength { kind: 1, .. })
        ));
        assert!(matches!(
            parse(&[4; 31].map(|_| 0)),
            Err(PacketError::UnknownType(0))
        ));
        let mut d = vec![0u8; 32];
        write_data_header(&mut d, 0x01020304, 9);
        match parse(&d).unwrap() {
            Packet::Data(x) => {
                assert_eq!(
                    (x.receiver, x.counter, x.payload.len()),
                    (0x01020304, 9, 16)
                );
            }
            p => panic!("{p:?}"),
        }
        assert!(parse(&d[..31]).is_err());
    }
}
