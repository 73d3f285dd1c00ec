//! The sans-IO negotiation phase of an NBD server (fixed newstyle).
//!
//! Drive it with bytes from the client ([`Handshake::handle_input`]) and answer the events it
//! yields ([`Handshake::poll_event`]): look up an export, list exports, start TLS. Whatever it
//! wants sent is in [`Handshake::take_output`]. It never blocks, reads no clock and does no I/O;
//! the driver (`server.rs`) owns the socket.
//!
//! Invariants:
//! - With TLS required, nothing about exports is revealed before TLS: every option except
//!   STARTTLS and ABORT is answered `NBD_REP_ERR_TLS_REQD`, and `EXPORT_NAME` disconnects.
//! - Bytes the client sent after STARTTLS in plaintext are never interpreted (a plaintext
//!   injection attack): the connection is closed instead.
//! - Option payloads are bounded ([`MAX_OPTION_BYTES`]); larger ones are skipped and refused.

use std::collections::VecDeque;

use bytes::{Buf, BufMut, BytesMut};

use crate::wire::{self, OptionHeader, WireError};

/// Largest option payload this server reads (names are ≤ 4096 bytes by the spec).
pub const MAX_OPTION_BYTES: u32 = 64 * 1024;
/// Context id of `base:allocation` on a connection that selected it.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Whether TLS is offered, and whether it is required.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS configured: STARTTLS is refused as unsupported.
    Off,
    /// STARTTLS is accepted; plain clients are served too.
    Optional,
    /// Nothing but STARTTLS (and ABORT) is accepted before TLS.
    Required,
}

/// What a client learns about an export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size: u64,
    /// Transmission flags (`wire::TFLAG_*`); `HAS_FLAGS` is added on the wire.
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
}

/// An export entry of `NBD_OPT_LIST`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportEntry {
    pub name: String,
    pub description: String,
}

/// Why an export lookup failed (the reply sent to INFO/GO).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// An `NBD_REP_ERR_*` value.
    pub reply: u32,
    pub message: String,
}

impl Refusal {
    pub fn unknown(name: &str) -> Self {
        Self {
            reply: wire::REP_ERR_UNKNOWN,
            message: format!("no export named {name:?}"),
        }
    }
}

/// What the negotiation settled on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    pub export: ExportInfo,
    pub structured: bool,
    /// The `base:allocation` context id, if the client selected it for this export.
    pub base_allocation: Option<u32>,
    pub tls: bool,
}

/// What the driver must do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Look the export up: to describe it (`open == false`, INFO) or to serve it (GO,
    /// EXPORT_NAME). Answer with [`Handshake::handle_export`].
    Export { name: String, open: bool },
    /// List the exports; answer with [`Handshake::handle_list`].
    List,
    /// Send the output, then run a TLS server handshake on the connection and call
    /// [`Handshake::handle_tls_started`]; feed decrypted bytes from then on.
    StartTls,
    /// Negotiation is done: send the output, then serve (see [`Handshake::into_leftover`]).
    Serve(Negotiated),
    /// Send the output, then close the connection.
    Close { reason: String },
}

#[derive(Clone, Debug)]
enum Pending {
    Export {
        option: u32,
        name: String,
        info_requests: Vec<u16>,
    },
    List,
}

#[derive(Clone, Debug)]
enum State {
    ClientFlags,
    Options,
    /// Skipping the payload of an oversized option, then refusing it.
    Skip {
        option: u32,
        remaining: u32,
    },
    Waiting(Pending),
    Tls,
    Finished,
}

/// The negotiation state machine of one connection (see the module doc).
#[derive(Debug)]
pub struct Handshake {
    tls_mode: TlsMode,
    tls_active: bool,
    no_zeroes: bool,
    structured: bool,
    /// The export name `SET_META_CONTEXT` selected `base:allocation` for.
    meta_export: Option<String>,
    state: State,
    input: BytesMut,
    output: BytesMut,
    events: VecDeque<Event>,
}

impl Handshake {
    /// Starts a negotiation: the greeting is already in the output.
    pub fn new(tls_mode: TlsMode) -> Self {
        let mut output = BytesMut::with_capacity(256);
        wire::emit_greeting(
            &mut output,
            wire::FLAG_FIXED_NEWSTYLE | wire::FLAG_NO_ZEROES,
        );
        Self {
            tls_mode,
            tls_active: false,
            no_zeroes: false,
            structured: false,
            meta_export: None,
            state: State::ClientFlags,
            input: BytesMut::new(),
            output,
            events: VecDeque::new(),
        }
    }

    /// Feeds bytes the client sent.
    pub fn handle_input(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
        self.advance();
    }

    /// The input buffer, for drivers that read straight into it; call
    /// [`Handshake::handle_input`] with `&[]` afterwards.
    pub fn input_buffer(&mut self) -> &mut BytesMut {
        &mut self.input
    }

    /// The next thing the driver must do, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Bytes to send to the client, in order.
    pub fn take_output(&mut self) -> BytesMut {
        self.output.split()
    }

    /// Bytes the client sent after negotiation finished (its first requests).
    pub fn into_leftover(self) -> BytesMut {
        self.input
    }

    /// Answers an [`Event::Export`].
    pub fn handle_export(&mut self, result: Result<ExportInfo, Refusal>) {
        let State::Waiting(Pending::Export {
            option,
            name,
            info_requests,
        }) = std::mem::replace(&mut self.state, State::Options)
        else {
            debug_assert!(false, "handle_export without a pending lookup");
            return;
        };
        match (option, result) {
            (wire::OPT_EXPORT_NAME, Ok(info)) => {
                self.output.put_u64(info.size);
                self.output.put_u16(info.flags | wire::TFLAG_HAS_FLAGS);
                if !self.no_zeroes {
                    self.output.put_bytes(0, 124);
                }
                self.serve(info);
            }
            (wire::OPT_EXPORT_NAME, Err(r)) => self.close(r.message),
            (_, Ok(info)) => {
                self.info_reply(option, &info, &info_requests);
                wire::emit_option_reply(&mut self.output, option, wire::REP_ACK, &[]);
                if option == wire::OPT_GO {
                    self.serve(info);
                }
            }
            (_, Err(r)) => {
                tracing::debug!(export = name, reason = r.message, "export refused");
                wire::emit_option_reply(&mut self.output, option, r.reply, r.message.as_bytes());
            }
        }
        self.advance();
    }

    /// Answers an [`Event::List`].
    pub fn handle_list(&mut self, exports: &[ExportEntry]) {
        if !matches!(self.state, State::Waiting(Pending::List)) {
            debug_assert!(false, "handle_list without a pending list");
            return;
        }
        self.state = State::Options;
        for e in exports {
            let mut data = BytesMut::new();
            data.put_u32(e.name.len() as u32);
            data.put_slice(e.name.as_bytes());
            data.put_slice(e.description.as_bytes());
            wire::emit_option_reply(&mut self.output, wire::OPT_LIST, wire::REP_SERVER, &data);
        }
        wire::emit_option_reply(&mut self.output, wire::OPT_LIST, wire::REP_ACK, &[]);
        self.advance();
    }

    /// TLS is up: negotiation starts over inside it (options negotiated in plaintext are void).
    pub fn handle_tls_started(&mut self) {
        debug_assert!(matches!(self.state, State::Tls));
        self.tls_active = true;
        self.structured = false;
        self.meta_export = None;
        self.state = State::Options;
        self.advance();
    }

    fn serve(&mut self, export: ExportInfo) {
        let base_allocation = (self.structured
            && self.meta_export.as_deref() == Some(export.name.as_str()))
        .then_some(BASE_ALLOCATION_ID);
        self.state = State::Finished;
        self.events.push_back(Event::Serve(Negotiated {
            export,
            structured: self.structured,
            base_allocation,
            tls: self.tls_active,
        }));
    }

    fn close(&mut self, reason: String) {
        self.state = State::Finished;
        self.events.push_back(Event::Close { reason });
    }

    fn reply(&mut self, option: u32, reply: u32, message: &str) {
        wire::emit_option_reply(&mut self.output, option, reply, message.as_bytes());
    }

    fn advance(&mut self) {
        loop {
            match self.state.clone() {
                State::ClientFlags => {
                    if self.input.len() < 4 {
                        return;
                    }
                    let flags = self.input.get_u32();
                    let known = wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES;
                    if flags & !known != 0 {
                        return self.close(format!("unknown client flags {flags:#x}"));
                    }
                    if flags & wire::FLAG_C_FIXED_NEWSTYLE == 0 {
                        return self.close("client does not speak fixed newstyle".into());
                    }
                    self.no_zeroes = flags & wire::FLAG_C_NO_ZEROES != 0;
                    self.state = State::Options;
                }
                State::Options => {
                    let header = match OptionHeader::parse(&self.input) {
                        Ok(Some(h)) => h,
                        Ok(None) => return,
                        Err(WireError::BadMagic { found, .. }) => {
                            return self.close(format!("bad option magic {found:#x}"))
                        }
                    };
                    if header.length > MAX_OPTION_BYTES {
                        self.input.advance(wire::OPTION_HEADER_LEN);
                        if header.option == wire::OPT_EXPORT_NAME {
                            return self.close("export name too long".into());
                        }
                        self.state = State::Skip {
                            option: header.option,
                            remaining: header.length,
                        };
                        continue;
                    }
                    let total = wire::OPTION_HEADER_LEN + header.length as usize;
                    if self.input.len() < total {
                        return;
                    }
                    self.input.advance(wire::OPTION_HEADER_LEN);
                    let data = self.input.split_to(header.length as usize);
                    self.option(header.option, &data);
                }
                State::Skip { option, remaining } => {
                    let n = (remaining as usize).min(self.input.len());
                    self.input.advance(n);
                    let remaining = remaining - n as u32;
                    if remaining > 0 {
                        self.state = State::Skip { option, remaining };
                        return;
                    }
                    self.state = State::Options;
                    self.reply(option, wire::REP_ERR_TOO_BIG, "option payload too large");
                }
                State::Waiting(_) | State::Tls | State::Finished => return,
            }
        }
    }

    fn tls_missing(&self) -> bool {
        self.tls_mode == TlsMode::Required && !self.tls_active
    }

    /// Handles one complete option (payload `data`).
    fn option(&mut self, option: u32, data: &[u8]) {
        match option {
            wire::OPT_ABORT => {
                self.reply(option, wire::REP_ACK, "");
                self.close("client aborted".into());
            }
            wire::OPT_STARTTLS => self.starttls(data),
            _ if self.tls_missing() => {
                if option == wire::OPT_EXPORT_NAME {
                    return self.close("TLS required; EXPORT_NAME before STARTTLS".into());
                }
                self.reply(option, wire::REP_ERR_TLS_REQD, "TLS is required");
            }
            wire::OPT_EXPORT_NAME => {
                let Ok(name) = String::from_utf8(data.to_vec()) else {
                    return self.close("export name is not UTF-8".into());
                };
                self.lookup(option, name, Vec::new(), true);
            }
            wire::OPT_LIST => {
                if !data.is_empty() {
                    return self.reply(option, wire::REP_ERR_INVALID, "LIST takes no data");
                }
                self.state = State::Waiting(Pending::List);
                self.events.push_back(Event::List);
            }
            wire::OPT_INFO | wire::OPT_GO => match parse_info_request(data) {
                Some((name, requests)) => {
                    self.lookup(option, name, requests, option == wire::OPT_GO)
                }
                None => self.reply(option, wire::REP_ERR_INVALID, "malformed INFO/GO request"),
            },
            wire::OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.reply(
                        option,
                        wire::REP_ERR_INVALID,
                        "STRUCTURED_REPLY takes no data",
                    )
                } else if self.structured {
                    self.reply(
                        option,
                        wire::REP_ERR_INVALID,
                        "structured replies already on",
                    )
                } else {
                    self.structured = true;
                    self.reply(option, wire::REP_ACK, "");
                }
            }
            wire::OPT_LIST_META_CONTEXT | wire::OPT_SET_META_CONTEXT => {
                self.meta_context(option, data)
            }
            _ => self.reply(option, wire::REP_ERR_UNSUP, "option not supported"),
        }
    }

    fn starttls(&mut self, data: &[u8]) {
        let option = wire::OPT_STARTTLS;
        if !data.is_empty() {
            return self.reply(option, wire::REP_ERR_INVALID, "STARTTLS takes no data");
        }
        if self.tls_mode == TlsMode::Off {
            return self.reply(option, wire::REP_ERR_POLICY, "TLS is not configured");
        }
        if self.tls_active {
            return self.reply(option, wire::REP_ERR_INVALID, "TLS is already on");
        }
        self.reply(option, wire::REP_ACK, "");
        if !self.input.is_empty() {
            return self.close("data sent after STARTTLS before the TLS handshake".into());
        }
        self.state = State::Tls;
        self.events.push_back(Event::StartTls);
    }

    fn lookup(&mut self, option: u32, name: String, info_requests: Vec<u16>, open: bool) {
        self.state = State::Waiting(Pending::Export {
            option,
            name: name.clone(),
            info_requests,
        });
        self.events.push_back(Event::Export { name, open });
    }

    fn info_reply(&mut self, option: u32, info: &ExportInfo, requests: &[u16]) {
        let mut d = BytesMut::new();
        d.put_u16(wire::INFO_EXPORT);
        d.put_u64(info.size);
        d.put_u16(info.flags | wire::TFLAG_HAS_FLAGS);
        wire::emit_option_reply(&mut self.output, option, wire::REP_INFO, &d);
        if requests.contains(&wire::INFO_NAME) {
            let mut d = BytesMut::new();
            d.put_u16(wire::INFO_NAME);
            d.put_slice(info.name.as_bytes());
            wire::emit_option_reply(&mut self.output, option, wire::REP_INFO, &d);
        }
        if requests.contains(&wire::INFO_DESCRIPTION) && !info.description.is_empty() {
            let mut d = BytesMut::new();
            d.put_u16(wire::INFO_DESCRIPTION);
            d.put_slice(info.description.as_bytes());
            wire::emit_option_reply(&mut self.output, option, wire::REP_INFO, &d);
        }
        // Sent whether or not it was asked for: clients that did not ask may ignore it, and
        // those that honour it avoid sub-block writes (which cost a read-modify-write).
        let mut d = BytesMut::new();
        d.put_u16(wire::INFO_BLOCK_SIZE);
        d.put_u32(info.min_block);
        d.put_u32(info.preferred_block);
        d.put_u32(info.max_block);
        wire::emit_option_reply(&mut self.output, option, wire::REP_INFO, &d);
    }

    fn meta_context(&mut self, option: u32, data: &[u8]) {
        let set = option == wire::OPT_SET_META_CONTEXT;
        if set && !self.structured {
            return self.reply(
                option,
                wire::REP_ERR_INVALID,
                "SET_META_CONTEXT needs structured replies first",
            );
        }
        let Some((export, queries)) = parse_meta_request(data) else {
            return self.reply(
                option,
                wire::REP_ERR_INVALID,
                "malformed meta context request",
            );
        };
        let matches = if queries.is_empty() {
            // LIST with no query lists everything; SET with none selects nothing.
            !set
        } else {
            queries
                .iter()
                .any(|q| q == wire::BASE_ALLOCATION || (!set && q == "base:"))
        };
        if set {
            self.meta_export = matches.then_some(export);
        }
        if matches {
            let mut d = BytesMut::new();
            d.put_u32(if set { BASE_ALLOCATION_ID } else { 0 });
            d.put_slice(wire::BASE_ALLOCATION.as_bytes());
            wire::emit_option_reply(&mut self.output, option, wire::REP_META_CONTEXT, &d);
        }
        self.reply(option, wire::REP_ACK, "");
    }
}

/// INFO/GO payload: u32 name length, name, u16 count, count × u16 information requests.
fn parse_info_request(d: &[u8]) -> Option<(String, Vec<u16>)> {
    let (name, at) = wire::parse_string(d, 0)?;
    let n = wire::parse_u16(d, at)? as usize;
    if d.len() != at + 2 + 2 * n {
        return None;
    }
    let requests = (0..n)
        .map(|i| wire::parse_u16(d, at + 2 + 2 * i))
        .collect::<Option<Vec<u16>>>()?;
    Some((name, requests))
}

/// Meta context payload: u32 name length, export name, u32 count, count × (u32 length, query).
fn parse_meta_request(d: &[u8]) -> Option<(String, Vec<String>)> {
    let (name, mut at) = wire::parse_string(d, 0)?;
    let n = wire::parse_u32(d, at)? as usize;
    at += 4;
    let mut queries = Vec::new();
    for _ in 0..n {
        let (q, next) = wire::parse_string(d, at)?;
        queries.push(q);
        at = next;
    }
    (at == d.len()).then_some((name, queries))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ExportInfo {
        ExportInfo {
            name: "disk".into(),
            description: "a disk".into(),
            size: 1 << 20,
            flags: wire::TFLAG_SEND_FLUSH,
            min_block: 1,
            preferred_block: 4096,
            max_block: 32 << 20,
        }
    }

    fn option(out: &mut BytesMut, option: u32, data: &[u8]) {
        OptionHeader {
            option,
            length: data.len() as u32,
        }
        .emit(out);
        out.put_slice(data);
    }

    fn go_payload(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut d = BytesMut::new();
        d.put_u32(name.len() as u32);
        d.put_slice(name.as_bytes());
        d.put_u16(requests.len() as u16);
        for r in requests {
            d.put_u16(*r);
        }
        d.to_vec()
    }

    fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = BytesMut::new();
        d.put_u32(name.len() as u32);
        d.put_slice(name.as_bytes());
        d.put_u32(queries.len() as u32);
        for q in queries {
            d.put_u32(q.len() as u32);
            d.put_slice(q.as_bytes());
        }
        d.to_vec()
    }

    /// Option replies in `out`: (option, reply type, data).
    fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut r = Vec::new();
        while out.len() >= 20 {
            assert_eq!(out.get_u64(), wire::OPT_REPLY_MAGIC);
            let (o, t, n) = (out.get_u32(), out.get_u32(), out.get_u32() as usize);
            r.push((o, t, out[..n].to_vec()));
            out.advance(n);
        }
        assert!(out.is_empty());
        r
    }

    fn started(mode: TlsMode) -> Handshake {
        let mut h = Handshake::new(mode);
        let greeting = h.take_output();
        assert_eq!(greeting.len(), wire::GREETING_LEN);
        h.handle_input(&(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES).to_be_bytes());
        h
    }

    #[test]
    fn go_with_structured_replies_and_base_allocation() {
        let mut h = started(TlsMode::Off);
        let mut b = BytesMut::new();
        option(&mut b, wire::OPT_STRUCTURED_REPLY, &[]);
        option(
            &mut b,
            wire::OPT_SET_META_CONTEXT,
            &meta_payload("disk", &["base:allocation", "qemu:dirty-bitmap:x"]),
        );
        option(
            &mut b,
            wire::OPT_GO,
            &go_payload("disk", &[wire::INFO_NAME]),
        );
        h.handle_input(&b);
        assert_eq!(
            h.poll_event(),
            Some(Event::Export {
                name: "disk".into(),
                open: true
            })
        );
        h.handle_export(Ok(info()));
        let Some(Event::Serve(n)) = h.poll_event() else {
            panic!("not serving")
        };
        assert!(n.structured);
        assert_eq!(n.base_allocation, Some(BASE_ALLOCATION_ID));
        let r = replies(&h.take_output());
        let kinds: Vec<u32> = r.iter().map(|x| x.1).collect();
        assert_eq!(
            kinds,
            vec![
                wire::REP_ACK,
                wire::REP_META_CONTEXT,
                wire::REP_ACK,
                wire::REP_INFO,
                wire::REP_INFO,
                wire::REP_INFO,
                wire::REP_ACK
            ]
        );
        // NBD_INFO_EXPORT: size and flags with HAS_FLAGS.
        let e = &r[3].2;
        assert_eq!(u16::from_be_bytes([e[0], e[1]]), wire::INFO_EXPORT);
        assert_eq!(&e[2..10], &(1u64 << 20).to_be_bytes());
        assert_eq!(
            u16::from_be_bytes([e[10], e[11]]),
            wire::TFLAG_SEND_FLUSH | wire::TFLAG_HAS_FLAGS
        );
    }

    #[test]
    fn meta_context_for_another_export_is_not_used() {
        let mut h = started(TlsMode::Off);
        let mut b = BytesMut::new();
        option(&mut b, wire::OPT_STRUCTURED_REPLY, &[]);
        option(
            &mut b,
            wire::OPT_SET_META_CONTEXT,
            &meta_payload("other", &["base:allocation"]),
        );
        option(&mut b, wire::OPT_GO, &go_payload("disk", &[]));
        h.handle_input(&b);
        h.poll_event();
        h.handle_export(Ok(info()));
        let Some(Event::Serve(n)) = h.poll_event() else {
            panic!()
        };
        assert_eq!(n.base_allocation, None);
    }

    #[test]
    fn set_meta_context_needs_structured_replies() {
        let mut h = started(TlsMode::Off);
        let mut b = BytesMut::new();
        option(
            &mut b,
            wire::OPT_SET_META_CONTEXT,
            &meta_payload("disk", &["base:allocation"]),
        );
        h.handle_input(&b);
        let r = replies(&h.take_output());
        assert_eq!(r[0].1, wire::REP_ERR_INVALID);
    }

    #[test]
    fn list_meta_context_without_queries_lists_base_allocation() {
        let mut h = started(TlsMode::Off);
        let mut b = BytesMut::new();
        option(
            &mut b,
            wire::OPT_LIST_META_CONTEXT,
            &meta_payload("disk", &[]),
        );
        h.handle_input(&b);
        let r = replies(&h.take_output());
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].1, wire::REP_META_CONTEXT);
        assert_eq!(&r[0].2[4..], wire::BASE_ALLOCATION.as_bytes());
    }

    #[test]
    fn export_name_reply_and_leftover_requests() {
        let mut h = Handshake::new(TlsMode::Off);
        h.take_output();
        let mut b = BytesMut::new();
        b.put_u32(wire::FLAG_C_FIXED_NEWSTYLE);
        option(&mut b, wire::OPT_EXPORT_NAME, b"disk");
        b.put_slice(b"REQ");
        h.handle_input(&b);
        assert!(matches!(
            h.poll_event(),
            Some(Event::Export { open: true, .. })
        ));
        h.handle_export(Ok(info()));
        assert!(matches!(h.poll_event(), Some(Event::Serve(_))));
        let out = h.take_output();
        // size, flags, 124 zero bytes (the client did not ask for NO_ZEROES).
        assert_eq!(out.len(), 8 + 2 + 124);
        assert_eq!(&h.into_leftover()[..], b"REQ");
    }

    #[test]
    fn unknown_export_on_go_is_an_error_reply_and_negotiation_goes_on() {
        let mut h = started(TlsMode::Off);
        let mut b = BytesMut::new();
        option(&mut b, wire::OPT_GO, &go_payload("nope", &[]));
        h.handle_input(&b);
        h.poll_event();
        h.handle_export(Err(Refusal::unknown("nope")));
        let r = replies(&h.take_output());
        assert_eq!(r[0].1, wire::REP_ERR_UNKNOWN);
        let mut b = BytesMut::new();
        option(&mut b, wire::OPT_LIST, &[]);
        h.handle_input(&b);
        assert_eq!(h.poll_event(), Some(Event::List));
        h.handle_list(&[ExportEntry {
            name: "disk".into(),
            description: String::new(),
        }]);
        let r = replies(&h.take_output());
        assert_eq!(r[0].1, wire::REP_SERVER);
        assert_eq!(r[1].1, wire::REP_ACK);
    }

    #[test]
    fn unknown_option_and_oversized_option() {
        let mut h = started(TlsMode::Off);
        let mut b = BytesMut::new();
        option(&mut b, 99, b"xyz");
        OptionHeader {
            option: 98,
            length: MAX_OPTION_BYTES + 1,
        }
        .emit(&mut b);
        h.handle_input(&b);
        h.handle_input(&vec![0u8; MAX_OPTION_BYTES as usize + 1]);
        let r = replies(&h.take_output());
        assert_eq!(
            r[0],
            (99, wire::REP_ERR_UNSUP, b"option not supported".to_vec())
        );
        assert_eq!(r[1].1, wire::REP_ERR_TOO_BIG);
        assert!(h.poll_event().is_none());
    }

    #[test]
    fn tls_required_refuses_everything_but_starttls() {
        let mut h = started(TlsMode::Required);
        let mut b = BytesMut::new();
        option(&mut b, wire::OPT_LIST, &[]);
        option(&mut b, wire::OPT_GO, &go_payload("disk", &[]));
        option(&mut b, wire::OPT_STARTTLS, &[]);
        h.handle_input(&b);
        let r = replies(&h.take_output());
        assert_eq!(r[0].1, wire::REP_ERR_TLS_REQD);
        assert_eq!(r[1].1, wire::REP_ERR_TLS_REQD);
        assert_eq!(r[2].1, wire::REP_ACK);
        assert_eq!(h.poll_event(), Some(Event::StartTls));
        h.handle_tls_started();
        let mut b = BytesMut::new();
        option(&mut b, wire::OPT_GO, &go_payload("disk", &[]));
        h.handle_input(&b);
        assert!(matches!(h.poll_event(), Some(Event::Export { .. })));
        h.handle_export(Ok(info()));
        let Some(Event::Serve(n)) = h.poll_event() else {
            panic!()
        };
        assert!(n.tls);
    }

    #[test]
    fn tls_required_export_name_disconnects() {
        let mut h = started(TlsMode::Required);
        let mut b = BytesMut::new();
        option(&mut b, wire::OPT_EXPORT_NAME, b"disk");
        h.handle_input(&b);
        assert!(matches!(h.poll_event(), Some(Event::Close { .. })));
    }

    #[test]
    fn plaintext_after_starttls_closes() {
        let mut h = started(TlsMode::Optional);
        let mut b = BytesMut::new();
        option(&mut b, wire::OPT_STARTTLS, &[]);
        option(&mut b, wire::OPT_GO, &go_payload("disk", &[]));
        h.handle_input(&b);
        assert!(matches!(h.poll_event(), Some(Event::Close { .. })));
    }

    #[test]
    fn unknown_client_flags_close() {
        let mut h = Handshake::new(TlsMode::Off);
        h.handle_input(&0x8000_0001u32.to_be_bytes());
        assert!(matches!(h.poll_event(), Some(Event::Close { .. })));
    }

    #[test]
    fn malformed_go_is_invalid() {
        let mut h = started(TlsMode::Off);
        let mut b = BytesMut::new();
        option(&mut b, wire::OPT_GO, &[0, 0, 0, 9, b'a']);
        h.handle_input(&b);
        let r = replies(&h.take_output());
        assert_eq!(r[0].1, wire::REP_ERR_INVALID);
    }
}
