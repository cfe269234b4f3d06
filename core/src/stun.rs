//! A minimal STUN Binding codec (RFC 5389): just enough for a peer to learn the public mapping
//! of its UDP socket from the rendezvous server, and for the server to answer.
//!
//! - [`binding_request`] builds a Binding request with a fresh random 96-bit transaction id.
//! - [`parse_binding_response`] reads the mapped address out of a Binding success response,
//!   checking the magic cookie and the transaction id (XOR-MAPPED-ADDRESS, IPv4 and IPv6;
//!   the legacy MAPPED-ADDRESS is accepted when no XOR-MAPPED-ADDRESS is present).
//! - [`answer`] is the server side: a valid Binding request gets a success response carrying
//!   the sender's address; anything else gets nothing.
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
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
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
    let msg = parse_message(packet)?;
    if msg.kind != BINDING_SUCCESS || msg.id != *id {
        return None;
    }
    let mut plain = None;
    for (kind, value) in attributes(msg.attrs) {
        match kind {
            ATTR_XOR_MAPPED_ADDRESS => return decode_address(value, Some(&msg.id)),
            ATTR_MAPPED_ADDRESS if plain.is_none() => plain = decode_address(value, None),
            _ => {}
        }
    }
    plain
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

/// The server side: the Binding success response to `packet` if it is a valid Binding
/// request, telling the sender its address `from` (IPv4-mapped IPv6 addresses are reported as
/// IPv4). `None` for anything else.
pub fn answer(packet: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
    let msg = parse_message(packet)?;
    if msg.kind != BINDING_REQUEST {
        return None;
    }
    // Attributes of a request are not needed; still refuse a malformed attribute section.
    let mut seen = 0usize;
    for (_, value) in attributes(msg.attrs) {
        seen += 4 + ((value.len() + 3) & !3);
    }
    if seen != msg.attrs.len() {
        return None;
    }
    let from = SocketAddr::new(from.ip().to_canonical(), from.port());
    let attr = encode_xor_address(from, &msg.id);
    let mut out = encode_header(BINDING_SUCCESS, attr.len() as u16, &msg.id);
    out.extend_from_slice(&attr);
    Some(out)
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
            let _ = parse_binding_response(&buf, &id);
        }
    }
}
