//! A small STUN Binding codec (RFC 5389, with the NAT behaviour discovery attributes of
//! RFC 5780): enough for a peer to learn the public mapping of its UDP socket and the NAT's
//! mapping and filtering behaviour, and for the server to answer.
//!
//! Client side:
//! - [`binding_request`] builds a Binding request with a fresh random 96-bit transaction id;
//!   [`binding_request_with_change`] adds a CHANGE-REQUEST (RFC 5780 §7.2).
//! - [`parse_binding_response`] reads the mapped address out of a Binding success response,
//!   checking the magic cookie and the transaction id (XOR-MAPPED-ADDRESS, IPv4 and IPv6;
//!   the legacy MAPPED-ADDRESS is accepted when no XOR-MAPPED-ADDRESS is present);
//!   [`parse_response`] also reads RESPONSE-ORIGIN and OTHER-ADDRESS, and error responses.
//!
//! Server side:
//! - [`parse_request`] reads a Binding request and its CHANGE-REQUEST flags, and lists the
//!   comprehension-required attributes it does not understand;
//! - [`success_response`] encodes XOR-MAPPED-ADDRESS, MAPPED-ADDRESS and, for an RFC 5780
//!   server, RESPONSE-ORIGIN and OTHER-ADDRESS; [`error_response`] an error (e.g. 420 Unknown
//!   Attribute with UNKNOWN-ATTRIBUTES);
//! - [`answer`] is the whole answer of a server without a second address: a valid Binding
//!   request gets a success response carrying the sender's address, a request with a
//!   CHANGE-REQUEST (or another attribute it must understand and does not) gets 420, anything
//!   else gets nothing.
//!
//! No authentication, no FINGERPRINT, no retransmission logic: callers retry themselves.
//! Every function accepts arbitrary bytes without panicking.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use rand::RngCore;

/// The fixed magic cookie of RFC 5389 messages.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Length of the STUN message header.
pub const HEADER_LEN: usize = 20;

const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const BINDING_ERROR: u16 = 0x0111;
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_CHANGE_REQUEST: u16 = 0x0003;
const ATTR_USERNAME: u16 = 0x0006;
const ATTR_MESSAGE_INTEGRITY: u16 = 0x0008;
const ATTR_ERROR_CODE: u16 = 0x0009;
const ATTR_UNKNOWN_ATTRIBUTES: u16 = 0x000A;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const ATTR_PADDING: u16 = 0x0026;
const ATTR_RESPONSE_ORIGIN: u16 = 0x802B;
const ATTR_OTHER_ADDRESS: u16 = 0x802C;
const CHANGE_IP: u32 = 0x4;
const CHANGE_PORT: u32 = 0x2;
/// The error code of a request carrying a comprehension-required attribute the server does
/// not understand (RFC 5389 §15.6), e.g. a CHANGE-REQUEST to a server without a second address.
pub const ERROR_UNKNOWN_ATTRIBUTE: u16 = 420;
const FAMILY_V4: u8 = 0x01;
const FAMILY_V6: u8 = 0x02;

/// The 96-bit transaction id that ties a response to its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransactionId(pub [u8; 12]);

impl TransactionId {
    /// A fresh random transaction id.
    pub fn random() -> Self {
        let mut id = [0u8; 12];
        rand::thread_rng().fill_bytes(&mut id);
        Self(id)
    }
}

/// A Binding request with a fresh random transaction id, and that id.
pub fn binding_request() -> (TransactionId, Vec<u8>) {
    let id = TransactionId::random();
    (id, encode_header(BINDING_REQUEST, 0, &id))
}

/// A Binding request asking the server to answer from its other IP address (`change_ip`)
/// and/or its other port (`change_port`) (RFC 5780 CHANGE-REQUEST), and its transaction id.
/// Without either flag this is a plain [`binding_request`].
pub fn binding_request_with_change(change_ip: bool, change_port: bool) -> (TransactionId, Vec<u8>) {
    if !change_ip && !change_port {
        return binding_request();
    }
    let id = TransactionId::random();
    let flags = if change_ip { CHANGE_IP } else { 0 } | if change_port { CHANGE_PORT } else { 0 };
    let mut body = Vec::with_capacity(8);
    push_attr(&mut body, ATTR_CHANGE_REQUEST, &flags.to_be_bytes());
    (id, finish(BINDING_REQUEST, &id, &body))
}

/// A parsed Binding request (server side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingRequest {
    /// Its transaction id, to be echoed in the answer.
    pub id: TransactionId,
    /// CHANGE-REQUEST asks for the answer to come from the server's other IP address.
    pub change_ip: bool,
    /// CHANGE-REQUEST asks for the answer to come from the server's other port.
    pub change_port: bool,
    /// Whether a CHANGE-REQUEST attribute was present at all (even with no flag set).
    pub has_change_request: bool,
    /// Comprehension-required attributes (type < 0x8000) this codec does not understand:
    /// the answer must be a 420 error listing them (RFC 5389 §7.3.1).
    pub unknown: Vec<u16>,
}

/// Reads a Binding request; `None` for anything else (a response, another method, a malformed
/// header or attribute section). A CHANGE-REQUEST of the wrong length counts as not understood.
pub fn parse_request(packet: &[u8]) -> Option<BindingRequest> {
    let msg = parse_message(packet)?;
    if msg.kind != BINDING_REQUEST {
        return None;
    }
    let mut req = BindingRequest {
        id: msg.id,
        change_ip: false,
        change_port: false,
        has_change_request: false,
        unknown: Vec::new(),
    };
    let mut seen = 0usize;
    for (kind, value) in attributes(msg.attrs) {
        seen += 4 + ((value.len() + 3) & !3);
        match kind {
            ATTR_CHANGE_REQUEST if value.len() == 4 => {
                let flags = u32::from_be_bytes([value[0], value[1], value[2], value[3]]);
                req.has_change_request = true;
                req.change_ip = flags & CHANGE_IP != 0;
                req.change_port = flags & CHANGE_PORT != 0;
            }
            // Understood and ignored: this server does no authentication, and pads nothing.
            ATTR_USERNAME | ATTR_MESSAGE_INTEGRITY | ATTR_PADDING => {}
            k if k < 0x8000 && !req.unknown.contains(&k) && req.unknown.len() < 16 => {
                req.unknown.push(k);
            }
            _ => {}
        }
    }
    // A malformed attribute section is not a request.
    (seen == msg.attrs.len()).then_some(req)
}

/// The Binding success response to the request `id`: XOR-MAPPED-ADDRESS and MAPPED-ADDRESS
/// carry `mapped` (IPv4-mapped IPv6 addresses are written as IPv4), RESPONSE-ORIGIN the address
/// the answer is sent from and OTHER-ADDRESS the server's other address (RFC 5780: only when
/// the server really has a second IP address).
pub fn success_response(
    id: &TransactionId,
    mapped: SocketAddr,
    response_origin: Option<SocketAddr>,
    other_address: Option<SocketAddr>,
) -> Vec<u8> {
    let mut body = Vec::with_capacity(64);
    body.extend_from_slice(&encode_xor_address(canonical(mapped), id));
    push_address(&mut body, ATTR_MAPPED_ADDRESS, canonical(mapped));
    if let Some(origin) = response_origin {
        push_address(&mut body, ATTR_RESPONSE_ORIGIN, canonical(origin));
    }
    if let Some(other) = other_address {
        push_address(&mut body, ATTR_OTHER_ADDRESS, canonical(other));
    }
    finish(BINDING_SUCCESS, id, &body)
}

/// A Binding error response to the request `id` with `code` (300..=699) and a reason; with
/// `unknown` attribute types listed in UNKNOWN-ATTRIBUTES (for 420).
pub fn error_response(id: &TransactionId, code: u16, reason: &str, unknown: &[u16]) -> Vec<u8> {
    let mut value = vec![0, 0, (code / 100) as u8 & 0x7, (code % 100) as u8];
    // Reasons are short ASCII here; keep them well under the 763-byte limit anyway.
    value.extend(reason.bytes().take(128));
    let mut body = Vec::with_capacity(value.len() + 8 + 2 * unknown.len());
    push_attr(&mut body, ATTR_ERROR_CODE, &value);
    if !unknown.is_empty() {
        let list: Vec<u8> = unknown.iter().flat_map(|k| k.to_be_bytes()).collect();
        push_attr(&mut body, ATTR_UNKNOWN_ATTRIBUTES, &list);
    }
    finish(BINDING_ERROR, id, &body)
}

/// A Binding response, as the client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindingResponse {
    /// A success response.
    Success {
        /// The sender's address as the server saw it (XOR-MAPPED-ADDRESS, or MAPPED-ADDRESS).
        mapped: SocketAddr,
        /// Where the server says it sent the answer from (RFC 5780 RESPONSE-ORIGIN).
        response_origin: Option<SocketAddr>,
        /// The server's other address (RFC 5780 OTHER-ADDRESS); present only on a server
        /// that supports the behaviour discovery tests.
        other_address: Option<SocketAddr>,
    },
    /// An error response with its code (e.g. 420 for an unsupported CHANGE-REQUEST).
    Error {
        /// The error code (300..=699); 0 if the response carried no ERROR-CODE.
        code: u16,
    },
}

/// Reads a Binding response (success or error) to the request with id `id`; `None` for
/// anything else (another transaction, a success without a mapped address, garbage).
pub fn parse_response(packet: &[u8], id: &TransactionId) -> Option<BindingResponse> {
    let msg = parse_message(packet)?;
    if msg.id != *id {
        return None;
    }
    match msg.kind {
        BINDING_ERROR => {
            let code = attributes(msg.attrs)
                .find(|(k, v)| *k == ATTR_ERROR_CODE && v.len() >= 4)
                .map(|(_, v)| u16::from(v[2] & 0x7) * 100 + u16::from(v[3]))
                .unwrap_or(0);
            Some(BindingResponse::Error { code })
        }
        BINDING_SUCCESS => {
            let (mut xor, mut plain, mut origin, mut other) = (None, None, None, None);
            for (kind, value) in attributes(msg.attrs) {
                match kind {
                    ATTR_XOR_MAPPED_ADDRESS if xor.is_none() => {
                        xor = decode_address(value, Some(&msg.id))
                    }
                    ATTR_MAPPED_ADDRESS if plain.is_none() => plain = decode_address(value, None),
                    ATTR_RESPONSE_ORIGIN if origin.is_none() => {
                        origin = decode_address(value, None)
                    }
                    ATTR_OTHER_ADDRESS if other.is_none() => other = decode_address(value, None),
                    _ => {}
                }
            }
            Some(BindingResponse::Success {
                mapped: xor.or(plain)?,
                response_origin: origin,
                other_address: other,
            })
        }
        _ => None,
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Appends one attribute (type, length, value, padding to 4 bytes) to `body`.
fn push_attr(body: &mut Vec<u8>, kind: u16, value: &[u8]) {
    body.extend_from_slice(&kind.to_be_bytes());
    body.extend_from_slice(&(value.len() as u16).to_be_bytes());
    body.extend_from_slice(value);
    body.resize(body.len() + (4 - value.len() % 4) % 4, 0);
}

/// Appends a plain (not XORed) address attribute.
fn push_address(body: &mut Vec<u8>, kind: u16, addr: SocketAddr) {
    let port = addr.port().to_be_bytes();
    let mut value = Vec::with_capacity(20);
    match addr.ip() {
        IpAddr::V4(v4) => {
            value.extend_from_slice(&[0, FAMILY_V4, port[0], port[1]]);
            value.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            value.extend_from_slice(&[0, FAMILY_V6, port[0], port[1]]);
            value.extend_from_slice(&v6.octets());
        }
    }
    push_attr(body, kind, &value);
}

/// A whole message: header with the body's length, then the body.
fn finish(kind: u16, id: &TransactionId, body: &[u8]) -> Vec<u8> {
    let mut out = encode_header(kind, body.len() as u16, id);
    out.extend_from_slice(body);
    out
}

fn encode_header(kind: u16, body_len: u16, id: &TransactionId) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + usize::from(body_len));
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&body_len.to_be_bytes());
    out.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out.extend_from_slice(&id.0);
    out
}

/// A parsed header: message type, transaction id and the attribute section.
struct Message<'a> {
    kind: u16,
    id: TransactionId,
    attrs: &'a [u8],
}

/// Parses the header of an RFC 5389 message; `None` for anything that is not one.
fn parse_message(packet: &[u8]) -> Option<Message<'_>> {
    if packet.len() < HEADER_LEN {
        return None;
    }
    let kind = u16::from_be_bytes([packet[0], packet[1]]);
    if kind & 0xC000 != 0 {
        return None; // the two most significant bits of a STUN message are zero
    }
    let len = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    if len % 4 != 0 || packet.len() != HEADER_LEN + len {
        return None;
    }
    if packet[4..8] != MAGIC_COOKIE.to_be_bytes() {
        return None;
    }
    let mut id = [0u8; 12];
    id.copy_from_slice(&packet[8..20]);
    Some(Message {
        kind,
        id: TransactionId(id),
        attrs: &packet[HEADER_LEN..],
    })
}

/// Iterates the attributes (type, value) of an attribute section; stops at the first
/// malformed one.
fn attributes(mut attrs: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if attrs.len() < 4 {
            return None;
        }
        let kind = u16::from_be_bytes([attrs[0], attrs[1]]);
        let len = usize::from(u16::from_be_bytes([attrs[2], attrs[3]]));
        let padded = len.checked_add(3)? & !3;
        if attrs.len() < 4 + padded {
            attrs = &[];
            return None;
        }
        let value = &attrs[4..4 + len];
        attrs = &attrs[4 + padded..];
        Some((kind, value))
    })
}

/// The mapped address of a Binding success response to the request with id `id`; `None` for
/// anything else (another transaction, an error response, garbage).
pub fn parse_binding_response(packet: &[u8], id: &TransactionId) -> Option<SocketAddr> {
    match parse_response(packet, id)? {
        BindingResponse::Success { mapped, .. } => Some(mapped),
        BindingResponse::Error { .. } => None,
    }
}

/// The XOR mask of an address: the cookie, then (for IPv6) the transaction id.
fn xor_mask(id: &TransactionId) -> [u8; 16] {
    let mut mask = [0u8; 16];
    mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    mask[4..].copy_from_slice(&id.0);
    mask
}

fn decode_address(value: &[u8], xor: Option<&TransactionId>) -> Option<SocketAddr> {
    if value.len() < 4 {
        return None;
    }
    let mask = xor.map(xor_mask).unwrap_or([0u8; 16]);
    let port = u16::from_be_bytes([value[2] ^ mask[0], value[3] ^ mask[1]]);
    let ip: IpAddr = match (value[1], value.len()) {
        (FAMILY_V4, 8) => {
            let mut b = [0u8; 4];
            for (i, x) in b.iter_mut().enumerate() {
                *x = value[4 + i] ^ mask[i];
            }
            Ipv4Addr::from(b).into()
        }
        (FAMILY_V6, 20) => {
            let mut b = [0u8; 16];
            for (i, x) in b.iter_mut().enumerate() {
                *x = value[4 + i] ^ mask[i];
            }
            Ipv6Addr::from(b).into()
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn encode_xor_address(addr: SocketAddr, id: &TransactionId) -> Vec<u8> {
    let mask = xor_mask(id);
    let (family, ip): (u8, Vec<u8>) = match addr.ip().to_canonical() {
        IpAddr::V4(v4) => (FAMILY_V4, v4.octets().to_vec()),
        IpAddr::V6(v6) => (FAMILY_V6, v6.octets().to_vec()),
    };
    let port = addr.port().to_be_bytes();
    let mut value = vec![0, family, port[0] ^ mask[0], port[1] ^ mask[1]];
    value.extend(ip.iter().zip(mask.iter()).map(|(b, m)| b ^ m));
    let mut attr = Vec::with_capacity(4 + value.len());
    attr.extend_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    attr.extend_from_slice(&(value.len() as u16).to_be_bytes());
    attr.extend_from_slice(&value);
    attr
}

/// The server side of a server with one address: the Binding success response to `packet`
/// if it is a valid Binding request, telling the sender its address `from` (IPv4-mapped IPv6
/// addresses are reported as IPv4); a 420 error if the request carries a CHANGE-REQUEST (this
/// server has no other address to answer from) or another comprehension-required attribute it
/// does not understand. `None` for anything else.
pub fn answer(packet: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
    let mut req = parse_request(packet)?;
    if req.has_change_request {
        req.unknown.insert(0, ATTR_CHANGE_REQUEST);
    }
    if !req.unknown.is_empty() {
        return Some(unknown_attributes(&req));
    }
    Some(success_response(&req.id, from, None, None))
}

/// The 420 answer to a request listing its not-understood attributes.
pub fn unknown_attributes(req: &BindingRequest) -> Vec<u8> {
    error_response(
        &req.id,
        ERROR_UNKNOWN_ATTRIBUTE,
        "Unknown Attribute",
        &req.unknown,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn request_answer_parse_round_trip_v4_and_v6() {
        for from in ["198.51.100.7:40000", "[2001:db8::1234]:65535", "10.0.0.1:1"] {
            let from: SocketAddr = from.parse().unwrap();
            let (id, req) = binding_request();
            assert_eq!(req.len(), HEADER_LEN);
            let resp = answer(&req, from).expect("a binding request is answered");
            assert_eq!(parse_binding_response(&resp, &id), Some(from));
            // Another transaction's response is not ours.
            assert_eq!(
                parse_binding_response(&resp, &TransactionId::random()),
                None
            );
            // A response is not a request.
            assert_eq!(answer(&resp, from), None);
        }
    }

    #[test]
    fn mapped_v6_is_reported_as_v4() {
        let (id, req) = binding_request();
        let from: SocketAddr = "[::ffff:192.0.2.9]:1234".parse().unwrap();
        let resp = answer(&req, from).unwrap();
        assert_eq!(
            parse_binding_response(&resp, &id),
            Some("192.0.2.9:1234".parse().unwrap())
        );
    }

    #[test]
    fn rfc5769_sample_ipv4_response_parses() {
        // RFC 5769 §2.2 (software, mapped address, integrity and fingerprint attributes).
        let hex = "0101003c2112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220\
                   002000080001a147e112a643000800149ae8c5c7b3cf8a1fd0d0fe2b2a66e2d12fa0ea5c\
                   80280004c07d4c96";
        let packet = hex::decode(hex).unwrap();
        let mut id = [0u8; 12];
        id.copy_from_slice(&packet[8..20]);
        assert_eq!(
            parse_binding_response(&packet, &TransactionId(id)),
            Some("192.0.2.1:32853".parse().unwrap())
        );
    }

    #[test]
    fn truncated_and_corrupted_messages_are_ignored() {
        let from: SocketAddr = "192.0.2.1:5".parse().unwrap();
        let (id, req) = binding_request();
        let resp = answer(&req, from).unwrap();
        for n in 0..resp.len() {
            assert_eq!(parse_binding_response(&resp[..n], &id), None, "len {n}");
        }
        for n in 0..req.len() {
            assert_eq!(answer(&req[..n], from), None, "len {n}");
        }
        let mut bad_cookie = req.clone();
        bad_cookie[5] ^= 1;
        assert_eq!(answer(&bad_cookie, from), None);
        let mut bad_len = req.clone();
        bad_len[3] = 4;
        assert_eq!(answer(&bad_len, from), None);
        let mut not_stun = req.clone();
        not_stun[0] = 0xc0;
        assert_eq!(answer(&not_stun, from), None);
        // A request whose attribute claims more bytes than there are.
        let mut bad_attr = req;
        bad_attr[3] = 8;
        bad_attr.extend_from_slice(&[0x80, 0x22, 0x00, 0x20, 0, 0, 0, 0]);
        assert_eq!(answer(&bad_attr, from), None);
    }

    #[test]
    fn change_request_flags_parse() {
        for (ip, port) in [(false, true), (true, false), (true, true)] {
            let (id, req) = binding_request_with_change(ip, port);
            assert_eq!(req.len(), HEADER_LEN + 8);
            let parsed = parse_request(&req).expect("a binding request");
            assert_eq!(parsed.id, id);
            assert_eq!((parsed.change_ip, parsed.change_port), (ip, port));
            assert!(parsed.has_change_request);
            assert!(parsed.unknown.is_empty());
        }
        let (_, plain) = binding_request_with_change(false, false);
        let parsed = parse_request(&plain).unwrap();
        assert!(!parsed.has_change_request && !parsed.change_ip && !parsed.change_port);
        // Wire bytes of RFC 5780 §7.2: change IP = 0x4, change port = 0x2, in the last byte.
        let (_, both) = binding_request_with_change(true, true);
        assert_eq!(&both[20..28], &[0x00, 0x03, 0x00, 0x04, 0, 0, 0, 0x06]);
        // A CHANGE-REQUEST of the wrong length is not understood (420).
        let mut bad = both.clone();
        bad[23] = 2;
        let parsed = parse_request(&bad).unwrap();
        assert!(!parsed.has_change_request && !parsed.change_ip);
        assert_eq!(parsed.unknown, vec![ATTR_CHANGE_REQUEST]);
    }

    #[test]
    fn response_origin_and_other_address_round_trip() {
        let (id, _) = binding_request();
        let mapped: SocketAddr = "198.51.100.2:40001".parse().unwrap();
        let origin: SocketAddr = "203.0.113.11:3479".parse().unwrap();
        let other: SocketAddr = "[2001:db8::11]:3479".parse().unwrap();
        let resp = success_response(&id, mapped, Some(origin), Some(other));
        assert_eq!(
            parse_response(&resp, &id),
            Some(BindingResponse::Success {
                mapped,
                response_origin: Some(origin),
                other_address: Some(other),
            })
        );
        // Wire form of RESPONSE-ORIGIN (0x802b): plain, not XORed.
        let pos = resp
            .windows(2)
            .position(|w| w == [0x80, 0x2b])
            .expect("RESPONSE-ORIGIN present");
        assert_eq!(
            &resp[pos..pos + 12],
            &[0x80, 0x2b, 0, 8, 0, 1, 0x0d, 0x97, 203, 0, 113, 11]
        );
        // Without RFC 5780 data, neither attribute is sent.
        let plain = success_response(&id, mapped, None, None);
        assert_eq!(
            parse_response(&plain, &id),
            Some(BindingResponse::Success {
                mapped,
                response_origin: None,
                other_address: None,
            })
        );
        assert!(!plain.windows(2).any(|w| w == [0x80, 0x2c]));
    }

    #[test]
    fn a_server_without_a_second_address_refuses_change_request_with_420() {
        let from: SocketAddr = "192.0.2.1:5".parse().unwrap();
        let (id, req) = binding_request_with_change(false, true);
        let resp = answer(&req, from).expect("answered with an error");
        assert_eq!(
            parse_response(&resp, &id),
            Some(BindingResponse::Error { code: 420 })
        );
        assert_eq!(parse_binding_response(&resp, &id), None);
        // UNKNOWN-ATTRIBUTES names CHANGE-REQUEST.
        assert!(resp.windows(6).any(|w| w == [0x00, 0x0a, 0, 2, 0x00, 0x03]));
        // An unknown optional attribute (SOFTWARE, 0x8022) is ignored; an unknown
        // comprehension-required one (RESPONSE-PORT, 0x0027) gets 420.
        let (id, req) = binding_request();
        let mut with_software = req.clone();
        with_software[3] = 8;
        with_software.extend_from_slice(&[0x80, 0x22, 0, 3, b'a', b'b', b'c', 0]);
        assert_eq!(
            parse_binding_response(&answer(&with_software, from).unwrap(), &id),
            Some(from)
        );
        let mut with_port = req;
        with_port[3] = 8;
        with_port.extend_from_slice(&[0x00, 0x27, 0, 4, 0x12, 0x34, 0, 0]);
        assert_eq!(
            parse_response(&answer(&with_port, from).unwrap(), &id),
            Some(BindingResponse::Error { code: 420 })
        );
    }

    #[test]
    fn random_bytes_never_panic_and_are_not_answered() {
        let mut rng = rand::thread_rng();
        let from: SocketAddr = "192.0.2.1:5".parse().unwrap();
        let id = TransactionId::random();
        for _ in 0..20_000 {
            let len = rng.gen_range(0..200);
            let mut buf = vec![0u8; len];
            rng.fill(&mut buf[..]);
            assert_eq!(answer(&buf, from), None);
            assert_eq!(parse_binding_response(&buf, &id), None);
        }
        // Random bodies behind a valid header: must not panic either way.
        for _ in 0..20_000 {
            let body_len = rng.gen_range(0..16usize) * 4;
            let mut buf = encode_header(
                if rng.gen() {
                    BINDING_REQUEST
                } else {
                    BINDING_SUCCESS
                },
                body_len as u16,
                &id,
            );
            let mut body = vec![0u8; body_len];
            rng.fill(&mut body[..]);
            buf.extend_from_slice(&body);
            let _ = answer(&buf, from);
            let _ = parse_request(&buf);
            let _ = parse_response(&buf, &id);
            let _ = parse_binding_response(&buf, &id);
        }
        // Valid responses and change requests with random bytes flipped or cut off.
        let (rid, req) = binding_request_with_change(true, true);
        let resp = success_response(
            &rid,
            "198.51.100.2:1".parse().unwrap(),
            Some("203.0.113.10:3478".parse().unwrap()),
            Some("203.0.113.11:3479".parse().unwrap()),
        );
        let err = error_response(&rid, 420, "Unknown Attribute", &[3, 0x27]);
        for base in [&req, &resp, &err] {
            for _ in 0..5_000 {
                let mut buf = base.clone();
                for _ in 0..rng.gen_range(1..4) {
                    let i = rng.gen_range(0..buf.len());
                    buf[i] = rng.gen();
                }
                buf.truncate(rng.gen_range(0..=buf.len()));
                let _ = answer(&buf, from);
                let _ = parse_request(&buf);
                let _ = parse_response(&buf, &rid);
            }
        }
    }
}
