//! The sans-IO transmission phase: decoding and validating requests, encoding replies.
//!
//! [`Transmission`] takes the client's bytes and yields [`Incoming`] items: a validated
//! [`Request`] for the export to serve, a [`Incoming::Reject`] the driver answers at once with
//! an error (out of range, bad flags, no metadata context, ...), or the end of the connection.
//! A WRITE's payload is split off the input buffer without copying. A WRITE larger than the
//! maximum payload is read and discarded, then refused, so the connection's other requests go
//! on (the spec's rule: never disconnect for a payload below 32 MiB).
//!
//! Reply encoders follow the spec's rules for structured replies: READ and BLOCK_STATUS always
//! use chunks once structured replies are negotiated; errors then travel as ERROR chunks with
//! a message; other successes use simple replies.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::wire::{self, ErrorCode, RequestHeader};

/// Largest READ/WRITE payload a client may send (the spec's recommended minimum maximum).
pub const MAX_PAYLOAD_BYTES: u32 = 32 << 20;
/// Largest WRITE payload that is read and discarded when refused; beyond it the connection is
/// dropped as a denial of service.
pub const MAX_DISCARD_BYTES: u32 = 256 << 20;
/// Most extents one BLOCK_STATUS reply carries.
pub const MAX_EXTENTS: usize = 8192;

/// What the export behind the connection allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub size: u64,
    pub read_only: bool,
    pub structured: bool,
    /// `base:allocation` context id when selected.
    pub base_allocation: Option<u32>,
    pub fast_zero: bool,
}

/// A validated command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        length: u32,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        fua: bool,
        no_hole: bool,
        fast: bool,
    },
    Cache {
        offset: u64,
        length: u32,
    },
    BlockStatus {
        offset: u64,
        length: u32,
        req_one: bool,
        context: u32,
    },
}

impl Command {
    /// The command's wire number (for replies and logs).
    pub fn code(&self) -> u16 {
        match self {
            Command::Read { .. } => wire::CMD_READ,
            Command::Write { .. } => wire::CMD_WRITE,
            Command::Flush => wire::CMD_FLUSH,
            Command::Trim { .. } => wire::CMD_TRIM,
            Command::WriteZeroes { .. } => wire::CMD_WRITE_ZEROES,
            Command::Cache { .. } => wire::CMD_CACHE,
            Command::BlockStatus { .. } => wire::CMD_BLOCK_STATUS,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub cookie: u64,
    pub command: Command,
}

/// What the decoder yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    Request(Request),
    /// Refused before reaching the export: answer with [`encode_error`].
    Reject {
        cookie: u64,
        command: u16,
        error: ErrorCode,
        message: &'static str,
    },
    /// NBD_CMD_DISC: finish what is in flight, then close.
    Disconnect,
    /// The byte stream is not NBD any more (bad magic, a DoS-sized payload): close now.
    Violation {
        reason: String,
    },
}

#[derive(Clone, Copy, Debug)]
enum Rx {
    Header,
    Payload(RequestHeader),
    Discard {
        remaining: u32,
        header: RequestHeader,
        error: ErrorCode,
        message: &'static str,
    },
    Closed,
}

/// The request decoder of one connection (see the module doc).
#[derive(Debug)]
pub struct Transmission {
    params: Params,
    input: BytesMut,
    rx: Rx,
}

impl Transmission {
    /// Starts decoding; `leftover` is what the client sent right after negotiation.
    pub fn new(params: Params, leftover: BytesMut) -> Self {
        Self {
            params,
            input: leftover,
            rx: Rx::Header,
        }
    }

    /// Feeds bytes from the client.
    pub fn handle_input(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
    }

    /// The input buffer, for drivers that read straight into it.
    pub fn input_buffer(&mut self) -> &mut BytesMut {
        &mut self.input
    }

    /// Bytes the decoder wants before it can yield more (a hint for read sizes).
    pub fn wanted(&self) -> usize {
        match self.rx {
            Rx::Payload(h) => (wire::REQUEST_HEADER_LEN + h.length as usize)
                .saturating_sub(wire::REQUEST_HEADER_LEN + self.input.len()),
            _ => wire::REQUEST_HEADER_LEN,
        }
    }

    /// The next decoded item, or `None` until more bytes arrive.
    pub fn poll(&mut self) -> Option<Incoming> {
        loop {
            match self.rx {
                Rx::Closed => return None,
                Rx::Header => {
                    let header = match RequestHeader::parse(&self.input) {
                        Ok(Some(h)) => h,
                        Ok(None) => return None,
                        Err(e) => {
                            self.rx = Rx::Closed;
                            return Some(Incoming::Violation {
                                reason: e.to_string(),
                            });
                        }
                    };
                    self.input.advance(wire::REQUEST_HEADER_LEN);
                    if let Some(item) = self.header(header) {
                        return Some(item);
                    }
                }
                Rx::Payload(h) => {
                    if self.input.len() < h.length as usize {
                        return None;
                    }
                    let data = self.input.split_to(h.length as usize).freeze();
                    self.rx = Rx::Header;
                    return Some(Incoming::Request(Request {
                        cookie: h.cookie,
                        command: Command::Write {
                            offset: h.offset,
                            data,
                            fua: h.flags & wire::CMD_FLAG_FUA != 0,
                        },
                    }));
                }
                Rx::Discard {
                    remaining,
                    header,
                    error,
                    message,
                } => {
                    let n = (remaining as usize).min(self.input.len());
                    self.input.advance(n);
                    let remaining = remaining - n as u32;
                    if remaining > 0 {
                        self.rx = Rx::Discard {
                            remaining,
                            header,
                            error,
                            message,
                        };
                        return None;
                    }
                    self.rx = Rx::Header;
                    return Some(reject(&header, error, message));
                }
            }
        }
    }

    /// Validates a header; `None` when a WRITE payload must be read first.
    fn header(&mut self, h: RequestHeader) -> Option<Incoming> {
        let p = self.params;
        let known = wire::CMD_FLAG_FUA
            | wire::CMD_FLAG_NO_HOLE
            | wire::CMD_FLAG_DF
            | wire::CMD_FLAG_REQ_ONE
            | wire::CMD_FLAG_FAST_ZERO;
        // FUA is valid on every command (the spec: accept it, even by ignoring it); the others
        // only on the commands they are defined for.
        let allowed = wire::CMD_FLAG_FUA
            | match h.command {
                wire::CMD_READ if p.structured => wire::CMD_FLAG_DF,
                wire::CMD_WRITE_ZEROES => wire::CMD_FLAG_NO_HOLE | wire::CMD_FLAG_FAST_ZERO,
                wire::CMD_BLOCK_STATUS => wire::CMD_FLAG_REQ_ONE,
                _ => 0,
            };
        let end = h.offset.checked_add(h.length as u64);
        let in_range = end.is_some_and(|e| e <= p.size);
        let fua = h.flags & wire::CMD_FLAG_FUA != 0;
        if h.command == wire::CMD_WRITE {
            let refusal = if h.length > MAX_PAYLOAD_BYTES {
                Some((ErrorCode::Inval, "write larger than the maximum payload"))
            } else if h.flags & !allowed != 0 {
                Some((ErrorCode::Inval, "flag not valid for WRITE"))
            } else if p.read_only {
                Some((ErrorCode::Perm, "export is read-only"))
            } else if !in_range {
                Some((ErrorCode::NoSpc, "write beyond the end of the export"))
            } else {
                None
            };
            return match refusal {
                None => {
                    self.rx = Rx::Payload(h);
                    None
                }
                Some(_) if h.length > MAX_DISCARD_BYTES => {
                    self.rx = Rx::Closed;
                    Some(Incoming::Violation {
                        reason: format!("write payload of {} bytes", h.length),
                    })
                }
                Some((error, message)) => {
                    self.rx = Rx::Discard {
                        remaining: h.length,
                        header: h,
                        error,
                        message,
                    };
                    None
                }
            };
        }
        if h.flags & !known != 0 || h.flags & !allowed != 0 {
            return Some(reject(
                &h,
                ErrorCode::Inval,
                "flag not valid for this command",
            ));
        }
        let r = |command| {
            Some(Incoming::Request(Request {
                cookie: h.cookie,
                command,
            }))
        };
        match h.command {
            wire::CMD_READ => {
                if h.length > MAX_PAYLOAD_BYTES {
                    Some(reject(
                        &h,
                        ErrorCode::Inval,
                        "read larger than the maximum payload",
                    ))
                } else if !in_range {
                    Some(reject(
                        &h,
                        ErrorCode::Inval,
                        "read beyond the end of the export",
                    ))
                } else {
                    r(Command::Read {
                        offset: h.offset,
                        length: h.length,
                    })
                }
            }
            wire::CMD_DISC => {
                self.rx = Rx::Closed;
                Some(Incoming::Disconnect)
            }
            wire::CMD_FLUSH => r(Command::Flush),
            wire::CMD_TRIM | wire::CMD_WRITE_ZEROES if p.read_only => {
                Some(reject(&h, ErrorCode::Perm, "export is read-only"))
            }
            wire::CMD_TRIM if !in_range => Some(reject(
                &h,
                ErrorCode::Inval,
                "trim beyond the end of the export",
            )),
            wire::CMD_TRIM => r(Command::Trim {
                offset: h.offset,
                length: h.length,
                fua,
            }),
            wire::CMD_WRITE_ZEROES => {
                let fast = h.flags & wire::CMD_FLAG_FAST_ZERO != 0;
                if !in_range {
                    Some(reject(
                        &h,
                        ErrorCode::NoSpc,
                        "zeroing beyond the end of the export",
                    ))
                } else if fast && !p.fast_zero {
                    Some(reject(&h, ErrorCode::Inval, "FAST_ZERO not offered"))
                } else {
                    r(Command::WriteZeroes {
                        offset: h.offset,
                        length: h.length,
                        fua,
                        no_hole: h.flags & wire::CMD_FLAG_NO_HOLE != 0,
                        fast,
                    })
                }
            }
            wire::CMD_CACHE if !in_range => Some(reject(
                &h,
                ErrorCode::Inval,
                "cache beyond the end of the export",
            )),
            wire::CMD_CACHE => r(Command::Cache {
                offset: h.offset,
                length: h.length,
            }),
            wire::CMD_BLOCK_STATUS => match p.base_allocation {
                None => Some(reject(&h, ErrorCode::Inval, "no metadata context selected")),
                Some(_) if !in_range || h.length == 0 => Some(reject(
                    &h,
                    ErrorCode::Inval,
                    "block status outside the export",
                )),
                Some(context) => r(Command::BlockStatus {
                    offset: h.offset,
                    length: h.length,
                    req_one: h.flags & wire::CMD_FLAG_REQ_ONE != 0,
                    context,
                }),
            },
            _ => Some(reject(&h, ErrorCode::Inval, "unknown command")),
        }
    }
}

fn reject(h: &RequestHeader, error: ErrorCode, message: &'static str) -> Incoming {
    Incoming::Reject {
        cookie: h.cookie,
        command: h.command,
        error,
        message,
    }
}

/// Success of a command without payload.
pub fn encode_ok(out: &mut BytesMut, cookie: u64) {
    wire::emit_simple_reply(out, cookie, 0);
}

/// An error reply: an ERROR chunk (with `message`) when structured replies are on, else a
/// simple reply.
pub fn encode_error(
    out: &mut BytesMut,
    structured: bool,
    cookie: u64,
    error: ErrorCode,
    message: &str,
) {
    if !structured {
        return wire::emit_simple_reply(out, cookie, error as u32);
    }
    let msg = &message.as_bytes()[..message.len().min(4096)];
    wire::emit_chunk_header(
        out,
        wire::REPLY_FLAG_DONE,
        wire::REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    out.put_u32(error as u32);
    out.put_u16(msg.len() as u16);
    out.put_slice(msg);
}

/// The header of a successful READ reply; `data` (exactly the requested length) follows it on
/// the wire. One OFFSET_DATA chunk when structured (which also satisfies DF). A zero-length
/// structured read is answered with a NONE chunk (there is no content chunk of 0 bytes).
pub fn encode_read_header(
    out: &mut BytesMut,
    structured: bool,
    cookie: u64,
    offset: u64,
    len: u32,
) {
    if !structured {
        return wire::emit_simple_reply(out, cookie, 0);
    }
    if len == 0 {
        return wire::emit_chunk_header(
            out,
            wire::REPLY_FLAG_DONE,
            wire::REPLY_TYPE_NONE,
            cookie,
            0,
        );
    }
    wire::emit_chunk_header(
        out,
        wire::REPLY_FLAG_DONE,
        wire::REPLY_TYPE_OFFSET_DATA,
        cookie,
        8 + len,
    );
    out.put_u64(offset);
}

/// One extent of `base:allocation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub length: u32,
    /// `wire::STATE_HOLE` | `wire::STATE_ZERO`.
    pub flags: u32,
}

/// `base:allocation` extents of `[offset, offset + length)` for a store that allocates in
/// `chunk`-byte pieces: a piece for which `allocated(index)` is false is a hole that reads as
/// zeros.
pub fn extents_by_chunk(
    offset: u64,
    length: u32,
    chunk: u64,
    allocated: impl Fn(u64) -> bool,
) -> Vec<Extent> {
    let end = offset + length as u64;
    let mut out = Vec::new();
    let mut at = offset;
    while at < end {
        let index = at / chunk;
        let n = ((index + 1) * chunk).min(end) - at;
        let flags = if allocated(index) {
            0
        } else {
            wire::STATE_HOLE | wire::STATE_ZERO
        };
        out.push(Extent {
            length: n as u32,
            flags,
        });
        at += n;
    }
    out
}

/// A BLOCK_STATUS reply: one chunk for the context. Adjacent extents with equal flags are
/// merged; at most [`MAX_EXTENTS`] (or one with `req_one`, clipped to `length`) are sent.
pub fn encode_block_status(
    out: &mut BytesMut,
    cookie: u64,
    context: u32,
    length: u32,
    req_one: bool,
    extents: &[Extent],
) {
    let mut merged: Vec<Extent> = Vec::new();
    for e in extents.iter().filter(|e| e.length > 0) {
        match merged.last_mut() {
            Some(last) if last.flags == e.flags && last.length.checked_add(e.length).is_some() => {
                last.length += e.length
            }
            _ => merged.push(*e),
        }
    }
    if merged.is_empty() {
        // Status 0 (allocated, data) is always a correct answer.
        merged.push(Extent { length, flags: 0 });
    }
    if req_one {
        merged.truncate(1);
        merged[0].length = merged[0].length.min(length);
    }
    merged.truncate(MAX_EXTENTS);
    wire::emit_chunk_header(
        out,
        wire::REPLY_FLAG_DONE,
        wire::REPLY_TYPE_BLOCK_STATUS,
        cookie,
        4 + 8 * merged.len() as u32,
    );
    out.put_u32(context);
    for e in merged {
        out.put_u32(e.length);
        out.put_u32(e.flags);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Params {
        Params {
            size: 1 << 20,
            read_only: false,
            structured: true,
            base_allocation: Some(1),
            fast_zero: true,
        }
    }

    fn req(command: u16, flags: u16, offset: u64, length: u32) -> BytesMut {
        let mut b = BytesMut::new();
        RequestHeader {
            flags,
            command,
            cookie: 7,
            offset,
            length,
        }
        .emit(&mut b);
        b
    }

    #[test]
    fn write_payload_is_split_without_loss_across_reads() {
        let mut t = Transmission::new(params(), BytesMut::new());
        let mut b = req(wire::CMD_WRITE, wire::CMD_FLAG_FUA, 4096, 5);
        b.put_slice(b"hello");
        b.put_slice(&req(wire::CMD_FLUSH, 0, 0, 0));
        let mut items = Vec::new();
        for chunk in b.chunks(3) {
            t.handle_input(chunk);
            items.extend(std::iter::from_fn(|| t.poll()));
        }
        assert_eq!(
            items,
            vec![
                Incoming::Request(Request {
                    cookie: 7,
                    command: Command::Write {
                        offset: 4096,
                        data: Bytes::from_static(b"hello"),
                        fua: true
                    }
                }),
                Incoming::Request(Request {
                    cookie: 7,
                    command: Command::Flush
                }),
            ]
        );
    }

    #[test]
    fn out_of_range_and_bad_flags_are_rejected_and_decoding_goes_on() {
        let mut t = Transmission::new(params(), BytesMut::new());
        t.handle_input(&req(wire::CMD_READ, 0, (1 << 20) - 1, 2));
        t.handle_input(&req(wire::CMD_READ, wire::CMD_FLAG_REQ_ONE, 0, 2));
        t.handle_input(&req(
            wire::CMD_READ,
            wire::CMD_FLAG_FUA | wire::CMD_FLAG_DF,
            0,
            2,
        ));
        let mut w = req(wire::CMD_WRITE, 0, 1 << 20, 3);
        w.put_slice(b"abc");
        t.handle_input(&w);
        t.handle_input(&req(99, 0, 0, 0));
        let errs: Vec<_> = std::iter::from_fn(|| t.poll())
            .map(|i| match i {
                Incoming::Reject { error, .. } => Some(error),
                _ => None,
            })
            .collect();
        assert_eq!(
            errs,
            vec![
                Some(ErrorCode::Inval),
                Some(ErrorCode::Inval),
                None,
                Some(ErrorCode::NoSpc),
                Some(ErrorCode::Inval)
            ]
        );
    }

    #[test]
    fn oversized_write_is_discarded_then_refused() {
        let mut t = Transmission::new(params(), BytesMut::new());
        let len = MAX_PAYLOAD_BYTES + 1;
        t.handle_input(&req(wire::CMD_WRITE, 0, 0, len));
        assert!(t.poll().is_none());
        t.handle_input(&vec![0u8; len as usize]);
        t.handle_input(&req(wire::CMD_FLUSH, 0, 0, 0));
        assert!(matches!(
            t.poll(),
            Some(Incoming::Reject {
                error: ErrorCode::Inval,
                ..
            })
        ));
        assert!(matches!(
            t.poll(),
            Some(Incoming::Request(Request {
                command: Command::Flush,
                ..
            }))
        ));
    }

    #[test]
    fn bad_magic_is_a_violation() {
        let mut t = Transmission::new(params(), BytesMut::new());
        let mut b = req(wire::CMD_READ, 0, 0, 1);
        b[0] = 0;
        t.handle_input(&b);
        assert!(matches!(t.poll(), Some(Incoming::Violation { .. })));
        assert!(t.poll().is_none());
    }

    #[test]
    fn block_status_needs_a_context() {
        let mut p = params();
        p.base_allocation = None;
        let mut t = Transmission::new(p, BytesMut::new());
        t.handle_input(&req(wire::CMD_BLOCK_STATUS, 0, 0, 4096));
        assert!(matches!(t.poll(), Some(Incoming::Reject { .. })));
    }

    #[test]
    fn read_only_refuses_writes_with_eperm() {
        let mut p = params();
        p.read_only = true;
        let mut t = Transmission::new(p, BytesMut::new());
        let mut w = req(wire::CMD_WRITE, 0, 0, 1);
        w.put_u8(1);
        t.handle_input(&w);
        t.handle_input(&req(wire::CMD_TRIM, 0, 0, 1));
        for _ in 0..2 {
            assert!(matches!(
                t.poll(),
                Some(Incoming::Reject {
                    error: ErrorCode::Perm,
                    ..
                })
            ));
        }
    }

    #[test]
    fn block_status_merges_and_clips() {
        let mut out = BytesMut::new();
        let e = |length, flags| Extent { length, flags };
        encode_block_status(
            &mut out,
            1,
            1,
            8192,
            false,
            &[e(4096, 3), e(4096, 3), e(4096, 0)],
        );
        assert_eq!(out.len(), 20 + 4 + 16);
        let mut out = BytesMut::new();
        encode_block_status(&mut out, 1, 1, 1000, true, &[e(4096, 3), e(4096, 0)]);
        assert_eq!(&out[24..28], &1000u32.to_be_bytes());
    }
}
