//! The express relay: relay-first's first link in the fewest round trips.
//!
//! The classic relay link costs about 16 round trips after the join at a distance: measuring
//! the server's round trip, the plan offer, the relay offer, a new TCP connection to attach,
//! TLS end to end through the relay, SPAKE2 and its confirmation, the result exchange and the
//! session's HELLO. The express relay does the same work in the join's own round trip:
//!
//! 1. Beside its TLS control connection a peer opens a plain relay connection at once and
//!    sends a random ticket on it ([`ClientToServer::RelayTicket`]). Its join carries the same
//!    ticket and its first SPAKE2 message (symmetric SPAKE2 over Ed25519 on the session's
//!    [`LinkKey`]: the message is blinded by the password, so neither the server nor an
//!    observer can test guesses against it).
//! 2. When the server pairs two such joins it hands each peer the other's SPAKE2 message in
//!    [`ServerToClient::Paired`] and splices the two relay connections. Both peers hold the
//!    link key the moment they are paired.
//! 3. The link is a record layer keyed from the SPAKE2 key ([`SealedStream`]: AES-256-GCM,
//!    one key per direction from HKDF over the key and a transcript of the session, the
//!    pairing id and both messages). Each side's first record is its key confirmation; the
//!    data and the session's HELLO follow in the same flight. A receiver hands out nothing
//!    before the peer's confirmation record has opened with the right key
//!    ([`Confirmation`] tells whoever watches).
//!
//! What the server sees: two SPAKE2 messages and ciphertext. A server (or anyone) that
//! substitutes its own SPAKE2 message gets one online guess of the password, and the victim
//! sees the confirmation fail (a code session then burns its nameplate, as before). With B
//! waiting, A's first byte reaches B's output four round trips after A starts: TCP and TLS to
//! the server (2), the join and its answer (1), the data through the relay (1).
//!
//! [`ClientToServer::RelayTicket`]: crate::protocol::ClientToServer::RelayTicket
//! [`ServerToClient::Paired`]: crate::protocol::ServerToClient::Paired

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use rand::RngCore;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::hkdf;
use sha2::{Digest, Sha256};
use spake2::{Ed25519Group, Identity, Password, Spake2};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use std::net::SocketAddr;

use tokio::net::TcpStream;

use crate::handshake::{HandshakeError, LinkKey};
use crate::protocol::{
    ClientToServer, ExpressJoin, FramedConn, Role, DEFAULT_MAX_FRAME_LEN, PROTOCOL_VERSION,
};
use crate::relay::RelayStream;

/// SPAKE2 identity of the symmetric exchange (both sides use the same).
const IDENTITY: &[u8] = b"nettool express relay v1";
/// Length of a symmetric SPAKE2 message over Ed25519 (side byte + point).
const PAKE_MSG_LEN: usize = 33;
/// Most plaintext bytes in one record.
pub const MAX_PLAIN: usize = 64 * 1024;
const TAG_LEN: usize = 16;
/// Sealed bytes held before they are written without a flush.
const DRAIN_AT: usize = 32 * 1024;
const HEADER_LEN: usize = 4;
/// The confirmation record's plaintext: magic, version, the sender's role.
const CONFIRM_MAGIC: &[u8; 4] = b"NTLX";
const CONFIRM_VERSION: u8 = 1;
const CONFIRM_LEN: usize = 6;

/// Test-only switch: key the records from the password alone, without the SPAKE2 exchange,
/// so the tests can show that a server which swaps the PAKE messages then reads and forges
/// the link (with the exchange it cannot). Compiled only with the dev-only
/// `insecure-test-switches` feature, which no released binary enables.
#[cfg(feature = "insecure-test-switches")]
pub mod insecure {
    use std::sync::atomic::{AtomicBool, Ordering};

    static PAKE_OFF: AtomicBool = AtomicBool::new(false);

    /// Keys the records from the password alone (`true`) or through SPAKE2 again.
    pub fn set_pake_off(off: bool) {
        PAKE_OFF.store(off, Ordering::SeqCst);
    }

    pub(crate) fn pake_off() -> bool {
        PAKE_OFF.load(Ordering::SeqCst)
    }
}

#[cfg(not(feature = "insecure-test-switches"))]
mod insecure {
    pub(crate) fn pake_off() -> bool {
        false
    }
}

/// A peer's half of the express exchange, made before the join.
pub struct ExpressStart {
    pake: Spake2<Ed25519Group>,
    msg: Vec<u8>,
    ticket: String,
    key: LinkKey,
}

impl std::fmt::Debug for ExpressStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpressStart")
            .field("ticket", &self.ticket)
            .finish_non_exhaustive()
    }
}

impl ExpressStart {
    /// Starts the SPAKE2 exchange on `key` and draws a relay ticket.
    pub fn new(key: &LinkKey) -> Self {
        let password = Password::new(key.bytes());
        let (pake, msg) =
            Spake2::<Ed25519Group>::start_symmetric(&password, &Identity::new(IDENTITY));
        let mut ticket = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut ticket);
        Self {
            pake,
            msg,
            ticket: hex::encode(ticket),
            key: key.clone(),
        }
    }

    /// What the join carries.
    pub fn join(&self) -> ExpressJoin {
        ExpressJoin {
            pake: hex::encode(&self.msg),
            ticket: self.ticket.clone(),
            offers: None,
        }
    }

    /// The relay connection's ticket.
    pub fn ticket(&self) -> &str {
        &self.ticket
    }

    /// What a join carries that asks for no express relay, only the exchange: the PAKE
    /// message, no ticket. Every link of that connect then keys its handshake with the
    /// agreed key ([`Self::agreed_only`]) instead of running SPAKE2 of its own.
    pub fn join_pake_only(&self) -> ExpressJoin {
        ExpressJoin {
            pake: hex::encode(&self.msg),
            ticket: String::new(),
            offers: None,
        }
    }

    /// The exchange's key schedule with the peer's message (`peer_pake`, hex, untrusted).
    fn schedule(
        self,
        session: &str,
        pair_id: &str,
        role: Role,
        peer_pake: &str,
    ) -> Result<hkdf::Prk, HandshakeError> {
        let theirs = hex::decode(peer_pake).map_err(|_| HandshakeError::NotAPeer)?;
        // A reflected message (our own, sent back) would key both directions alike.
        if theirs.len() != PAKE_MSG_LEN || theirs == self.msg {
            return Err(HandshakeError::NotAPeer);
        }
        let secret = if insecure::pake_off() {
            self.key.bytes().to_vec()
        } else {
            self.pake
                .finish(&theirs)
                .map_err(|_| HandshakeError::NotAPeer)?
        };
        let (first, second) = match role {
            Role::First => (&self.msg, &theirs),
            Role::Second => (&theirs, &self.msg),
        };
        let mut h = Sha256::new();
        h.update(b"nettool express transcript v1\0");
        for part in [session.as_bytes(), pair_id.as_bytes(), first, second] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        let transcript: [u8; 32] = h.finalize().into();
        Ok(hkdf::Salt::new(hkdf::HKDF_SHA256, &transcript).extract(&secret))
    }

    /// Finishes the exchange with the peer's message (`peer_pake`, hex, untrusted) and wraps
    /// `stream` (the spliced relay connection) in the link's record layer.
    pub fn finish<S>(
        self,
        session: &str,
        pair_id: &str,
        role: Role,
        peer_pake: &str,
        stream: S,
    ) -> Result<SealedStream<S>, HandshakeError> {
        let prk = self.schedule(session, pair_id, role, peer_pake)?;
        let (send, recv) = match role {
            Role::First => (b"first to second", b"second to first"),
            Role::Second => (b"second to first", b"first to second"),
        };
        let key = |label: &[u8]| -> Result<LessSafeKey, HandshakeError> {
            let info = [label];
            let okm = prk
                .expand(&info, &AES_256_GCM)
                .map_err(|_| HandshakeError::NotAPeer)?;
            Ok(LessSafeKey::new(UnboundKey::from(okm)))
        };
        Ok(SealedStream::new(stream, key(send)?, key(recv)?, role))
    }

    /// Finishes the exchange of a join that asked for no relay ([`Self::join_pake_only`]):
    /// the key the connect's link handshakes are keyed with (they confirm it).
    pub fn agreed_only(
        self,
        session: &str,
        pair_id: &str,
        role: Role,
        peer_pake: &str,
    ) -> Result<crate::handshake::AgreedKey, HandshakeError> {
        agreed_from(&self.schedule(session, pair_id, role, peer_pake)?)
    }
}

/// The key the connect's links key their handshakes with ([`crate::handshake::AgreedKey`];
/// those handshakes confirm it).
fn agreed_from(prk: &hkdf::Prk) -> Result<crate::handshake::AgreedKey, HandshakeError> {
    let mut agreed = [0u8; 32];
    prk.expand(&[b"agreed key for other links"], hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut agreed))
        .map_err(|_| HandshakeError::NotAPeer)?;
    Ok(crate::handshake::AgreedKey(agreed))
}

/// What is known of the peer's key confirmation on a [`SealedStream`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not yet arrived.
    Pending,
    /// The peer's confirmation record opened with the link key: it holds the same password.
    Confirmed,
    /// It did not (wrong secret or code, or someone else's PAKE message), or the peer closed
    /// before confirming; the words say which.
    Failed(String),
}

/// Watches the peer's key confirmation of a [`SealedStream`].
#[derive(Debug, Clone)]
pub struct Confirmation(pub(crate) watch::Receiver<Verdict>);

impl Confirmation {
    /// Waits until the confirmation is decided (or the stream is gone: then the last value).
    pub async fn decided(&mut self) -> Verdict {
        let _ = self.0.wait_for(|v| *v != Verdict::Pending).await;
        let v = self.0.borrow().clone();
        v
    }

    /// The verdict now.
    pub fn now(&self) -> Verdict {
        self.0.borrow().clone()
    }
}

/// The express link's record layer over a byte stream: each record is a 4-byte big-endian
/// length and an AES-256-GCM ciphertext (the length is its associated data, the nonce a
/// counter per direction). Each side's first record is its key confirmation (sent with the
/// first write); nothing is read out before the peer's has opened.
pub struct SealedStream<S> {
    inner: S,
    seal: LessSafeKey,
    open: LessSafeKey,
    peer: Role,
    sent: u64,
    opened: u64,
    /// Sealed bytes not yet written to `inner`, from `out_pos`.
    out: Vec<u8>,
    out_pos: usize,
    /// Bytes read from `inner`: `rbuf[rstart..rend]`.
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    /// Opened plaintext inside `rbuf`, not yet read out.
    plain: std::ops::Range<usize>,
    verdict: watch::Sender<Verdict>,
    /// What [`Self::confirmation`] hands out instead of `verdict`, when set.
    settled: Option<Confirmation>,
    eof: bool,
    failed: Option<String>,
}

impl<S> std::fmt::Debug for SealedStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedStream")
            .field("sent", &self.sent)
            .field("opened", &self.opened)
            .finish_non_exhaustive()
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

impl<S> SealedStream<S> {
    fn new(inner: S, seal: LessSafeKey, open: LessSafeKey, role: Role) -> Self {
        let (verdict, _) = watch::channel(Verdict::Pending);
        let mut s = Self {
            inner,
            seal,
            open,
            peer: role.other(),
            sent: 0,
            opened: 0,
            out: Vec::with_capacity(HEADER_LEN + MAX_PLAIN + TAG_LEN),
            out_pos: 0,
            rbuf: vec![0; 2 * (HEADER_LEN + MAX_PLAIN + TAG_LEN)],
            rstart: 0,
            rend: 0,
            plain: 0..0,
            verdict,
            settled: None,
            eof: false,
            failed: None,
        };
        let mut confirm = Vec::with_capacity(CONFIRM_LEN);
        confirm.extend_from_slice(CONFIRM_MAGIC);
        confirm.push(CONFIRM_VERSION);
        confirm.push(match role {
            Role::First => 1,
            Role::Second => 2,
        });
        s.seal_record(&confirm)
            .expect("the first record's nonce is fresh");
        s
    }

    /// Watches the peer's key confirmation (or what [`Self::settle_through`] set).
    pub fn confirmation(&self) -> Confirmation {
        match &self.settled {
            Some(c) => c.clone(),
            None => Confirmation(self.verdict.subscribe()),
        }
    }

    /// Makes [`Self::confirmation`] watch `settled` instead: a verdict passed on once what
    /// follows from it is done (a wrong code reported to the server).
    pub fn settle_through(&mut self, settled: Confirmation) {
        self.settled = Some(settled);
    }

    /// The stream below.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Appends one sealed record of `plain` to the output.
    fn seal_record(&mut self, plain: &[u8]) -> io::Result<()> {
        let counter = self.sent;
        self.sent = counter
            .checked_add(1)
            .ok_or_else(|| io::Error::other("the express link's record counter ran out"))?;
        let len = u32::try_from(plain.len() + TAG_LEN).expect("records are small");
        let header = len.to_be_bytes();
        self.out.extend_from_slice(&header);
        let start = self.out.len();
        self.out.extend_from_slice(plain);
        let tag = self
            .seal
            .seal_in_place_separate_tag(nonce(counter), Aad::from(header), &mut self.out[start..])
            .map_err(|_| io::Error::other("sealing a record failed"))?;
        self.out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    fn fail(&mut self, why: String) -> io::Error {
        if *self.verdict.borrow() == Verdict::Pending {
            self.verdict.send_replace(Verdict::Failed(why.clone()));
        }
        self.failed = Some(why.clone());
        io::Error::new(io::ErrorKind::PermissionDenied, why)
    }

    /// Opens the next whole record in `rbuf`, if there is one: `Ok(true)` when it did.
    fn open_record(&mut self) -> io::Result<bool> {
        let avail = self.rend - self.rstart;
        if avail < HEADER_LEN {
            return Ok(false);
        }
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&self.rbuf[self.rstart..self.rstart + HEADER_LEN]);
        let len = u32::from_be_bytes(header) as usize;
        if !(TAG_LEN..=MAX_PLAIN + TAG_LEN).contains(&len) {
            return Err(self.fail(format!(
                "the peer sent a malformed express record ({len} bytes)"
            )));
        }
        if avail < HEADER_LEN + len {
            return Ok(false);
        }
        let body = self.rstart + HEADER_LEN..self.rstart + HEADER_LEN + len;
        let counter = self.opened;
        let opened = self
            .open
            .open_in_place(
                nonce(counter),
                Aad::from(header),
                &mut self.rbuf[body.clone()],
            )
            .map(|p| p.len());
        let Ok(plain_len) = opened else {
            let why = if counter == 0 {
                HandshakeError::BadProof.to_string()
            } else {
                "an express record failed authentication (the relay or the path altered it)"
                    .to_owned()
            };
            return Err(self.fail(why));
        };
        self.opened += 1;
        self.rstart = body.end;
        let plain = body.start..body.start + plain_len;
        if counter == 0 {
            let want_role = match self.peer {
                Role::First => 1,
                Role::Second => 2,
            };
            let p = &self.rbuf[plain];
            if p.len() != CONFIRM_LEN
                || &p[..4] != CONFIRM_MAGIC
                || p[4] != CONFIRM_VERSION
                || p[5] != want_role
            {
                return Err(self.fail(HandshakeError::BadProof.to_string()));
            }
            self.verdict.send_replace(Verdict::Confirmed);
            return Ok(true);
        }
        self.plain = plain;
        Ok(true)
    }
}

impl<S: AsyncWrite + Unpin> SealedStream<S> {
    /// Writes out what is sealed and not yet written.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.out.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        self.out.clear();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SealedStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(buf.remaining());
                buf.put_slice(&this.rbuf[this.plain.start..this.plain.start + n]);
                this.plain.start += n;
                return Poll::Ready(Ok(()));
            }
            if let Some(why) = &this.failed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    why.clone(),
                )));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.open_record()? {
                continue;
            }
            // Room for a whole record after what is buffered.
            if this.rstart > 0 && this.rbuf.len() - this.rstart < HEADER_LEN + MAX_PLAIN + TAG_LEN {
                this.rbuf.copy_within(this.rstart..this.rend, 0);
                this.rend -= this.rstart;
                this.rstart = 0;
            }
            let mut rb = ReadBuf::new(&mut this.rbuf[this.rend..]);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                if this.opened == 0 {
                    return Poll::Ready(Err(
                        this.fail("the peer closed the link before confirming the key".to_owned())
                    ));
                }
                if this.rend > this.rstart {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the express link closed in the middle of a record",
                    )));
                }
                this.eof = true;
                continue;
            }
            this.rend += n;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SealedStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Records gather until a flush or [`DRAIN_AT`] bytes: small frames written one by
        // one (HELLO, ACK, a DATA header) would each take a segment, and a new connection's
        // first round trip carries ten segments, not ten segments' worth of bytes.
        if this.out.len() - this.out_pos >= DRAIN_AT {
            ready!(this.poll_drain(cx))?;
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = buf.len().min(MAX_PLAIN);
        this.seal_record(&buf[..n])?;
        if this.out.len() - this.out_pos >= DRAIN_AT {
            // Start writing; what the socket does not take now goes with the next call.
            if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// The relay connection of an express join, ticketed and waiting for the pairing.
#[derive(Debug)]
pub struct TicketedRelay {
    framed: FramedConn<TcpStream>,
    local: SocketAddr,
    server: SocketAddr,
    connect_rtt: std::time::Duration,
}

/// Opens the express relay connection to `server` and sends `ticket` on it (plain TCP: its
/// bytes are the link's own records; the ticket only ties it to the join).
pub async fn attach(
    server: SocketAddr,
    ticket: &str,
    deadline: std::time::Instant,
) -> Result<TicketedRelay, String> {
    let began = std::time::Instant::now();
    let stream = tokio::time::timeout_at(deadline.into(), TcpStream::connect(server))
        .await
        .map_err(|_| format!("connecting to the relay at {server}: timed out"))?
        .map_err(|e| format!("connecting to the relay at {server}: {e}"))?;
    let connect_rtt = began.elapsed();
    let _ = stream.set_nodelay(true);
    let local = stream
        .local_addr()
        .map_err(|e| format!("reading the relay connection's address: {e}"))?;
    let mut framed = FramedConn::new(stream, DEFAULT_MAX_FRAME_LEN);
    framed
        .send(&ClientToServer::RelayTicket {
            version: PROTOCOL_VERSION,
            ticket: ticket.to_owned(),
        })
        .await
        .map_err(|e| format!("attaching to the relay: {e}"))?;
    Ok(TicketedRelay {
        framed,
        local,
        server,
        connect_rtt,
    })
}

impl TicketedRelay {
    /// How long its TCP handshake took: a round trip to the server.
    pub fn connect_rtt(&self) -> std::time::Duration {
        self.connect_rtt
    }

    /// Waits for the server's [`ServerToClient::Relaying`](crate::protocol::ServerToClient::Relaying) (both relay connections spliced):
    /// the relay stream, this end's address and the server's.
    pub async fn relaying(
        self,
        deadline: std::time::Instant,
    ) -> Result<(RelayStream, SocketAddr, SocketAddr), String> {
        let Self {
            framed,
            local,
            server,
            ..
        } = self;
        let stream = crate::relay::await_relaying(framed, deadline)
            .await
            .map_err(|e| e.to_string())?;
        Ok((stream, local, server))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pair(
        a_key: &LinkKey,
        b_key: &LinkKey,
    ) -> (
        Result<SealedStream<tokio::io::DuplexStream>, HandshakeError>,
        Result<SealedStream<tokio::io::DuplexStream>, HandshakeError>,
    ) {
        let (x, y) = tokio::io::duplex(1 << 20);
        let a = ExpressStart::new(a_key);
        let b = ExpressStart::new(b_key);
        let (ja, jb) = (a.join(), b.join());
        (
            a.finish("s", "p", Role::First, &jb.pake, x),
            b.finish("s", "p", Role::Second, &ja.pake, y),
        )
    }

    #[tokio::test]
    async fn same_password_links_both_ways_and_confirms() {
        let k = LinkKey::derive("s", "k");
        let (a, b) = pair(&k, &k);
        let (mut a, mut b) = (a.unwrap(), b.unwrap());
        let (mut ca, mut cb) = (a.confirmation(), b.confirmation());
        let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let send = big.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&send).await.unwrap();
            a.shutdown().await.unwrap();
            let mut back = Vec::new();
            a.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, big);
        b.write_all(b"pong").await.unwrap();
        b.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"pong");
        assert_eq!(cb.decided().await, Verdict::Confirmed);
        assert_eq!(ca.decided().await, Verdict::Confirmed);
    }

    #[tokio::test]
    async fn a_wrong_password_reads_nothing_and_says_why() {
        let (a, b) = pair(&LinkKey::derive("s", "k"), &LinkKey::derive("s", "guess"));
        let (mut a, mut b) = (a.unwrap(), b.unwrap());
        let mut cb = b.confirmation();
        a.write_all(b"secret data").await.unwrap();
        a.flush().await.unwrap();
        let mut buf = [0u8; 64];
        let err = b.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("failed authentication"), "{err}");
        assert!(matches!(cb.decided().await, Verdict::Failed(_)));
    }

    /// An observer (the server, say) that holds everything on the wire (both PAKE messages,
    /// the session, the pairing id, the first record) and even the right password cannot
    /// open the confirmation record: the key needs a SPAKE2 secret scalar. So recording a
    /// code session gives nothing to test guesses of the code against offline. (Keyed from
    /// the password alone, as the test-only `pake_off` switch does, it opens at once.)
    #[tokio::test]
    async fn the_wire_carries_nothing_to_test_guesses_against() {
        let k = LinkKey::derive("s", "right");
        let (x, mut wire) = tokio::io::duplex(1 << 16);
        let a = ExpressStart::new(&k);
        let b = ExpressStart::new(&k);
        let (ja, jb) = (a.join(), b.join());
        let mut sa = a.finish("s", "p", Role::First, &jb.pake, x).unwrap();
        sa.flush().await.unwrap();
        let mut rec = vec![0u8; HEADER_LEN + CONFIRM_LEN + TAG_LEN];
        wire.read_exact(&mut rec).await.unwrap();
        // The observer's best: the public transcript and a guess (here the right password).
        let (first, second) = (
            hex::decode(&ja.pake).unwrap(),
            hex::decode(&jb.pake).unwrap(),
        );
        let mut h = Sha256::new();
        h.update(b"nettool express transcript v1\0");
        for part in [&b"s"[..], b"p", &first, &second] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        let transcript: [u8; 32] = h.finalize().into();
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &transcript).extract(k.bytes());
        let info = [&b"first to second"[..]];
        let okm = prk.expand(&info, &AES_256_GCM).unwrap();
        let key = LessSafeKey::new(UnboundKey::from(okm));
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&rec[..HEADER_LEN]);
        let opened = key.open_in_place(nonce(0), Aad::from(header), &mut rec[HEADER_LEN..]);
        assert!(
            opened.is_err(),
            "the confirmation opened with a key derived from the password and the wire alone"
        );
        drop(b);
    }

    #[tokio::test]
    async fn a_reflected_message_is_refused() {
        let k = LinkKey::derive("s", "k");
        let a = ExpressStart::new(&k);
        let own = a.join().pake;
        let (x, _y) = tokio::io::duplex(64);
        assert!(a.finish("s", "p", Role::First, &own, x).is_err());
    }

    #[tokio::test]
    async fn a_flipped_bit_in_a_record_is_refused() {
        let k = LinkKey::derive("s", "k");
        let (x, y) = tokio::io::duplex(1 << 16);
        let (mut relay_in, relay_out) = tokio::io::duplex(1 << 16);
        let a = ExpressStart::new(&k);
        let b = ExpressStart::new(&k);
        let (ja, jb) = (a.join(), b.join());
        let mut a = a.finish("s", "p", Role::First, &jb.pake, x).unwrap();
        let mut b = b
            .finish("s", "p", Role::Second, &ja.pake, relay_out)
            .unwrap();
        a.write_all(b"hello").await.unwrap();
        a.flush().await.unwrap();
        // A relay in the middle that flips one bit of the data record.
        let mut y = y;
        let mut wire = vec![0u8; 4 + CONFIRM_LEN + TAG_LEN + 4 + 5 + TAG_LEN];
        y.read_exact(&mut wire).await.unwrap();
        let last = wire.len() - TAG_LEN - 1;
        wire[last] ^= 1;
        relay_in.write_all(&wire).await.unwrap();
        let mut buf = [0u8; 16];
        let err = b.read(&mut buf).await.unwrap_err();
        assert!(err.to_string().contains("altered"), "{err}");
        drop(relay_in);
    }
}
