//! The control channel's TLS on the server: rustls runs the handshake, then hands over the
//! traffic secrets (its kernel-TLS interface, `dangerous_extract_secrets`), and this module
//! protects the records itself (TLS 1.3's record layer, RFC 8446 §5).
//!
//! Why: a waiting peer's connection sits idle for minutes, and rustls keeps about 7.6 KB per
//! connection after its handshake (a 4 KiB receive buffer, both directions' expanded AES
//! keys, its state machine). Here an idle connection holds the two traffic keys and IVs as
//! bytes and no buffer at all: a record's buffer exists while the record is in flight, and
//! the AEAD key is expanded for each record (control frames are few and small).
//!
//! The handshake is fed one whole record at a time and stops at the record that completes
//! it, so nothing the client sent after its Finished is left inside rustls when the secrets
//! are taken. After the handshake the client may send application data and close_notify;
//! any other record (a KeyUpdate, an alert other than close_notify) ends the connection with
//! an error naming it. The server issues no session tickets.

use std::io::{self, Read};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use ring::aead;
use rustls::{ConnectionTrafficSecrets, ServerConnection};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Content types (RFC 8446 §5.1).
const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;

/// The largest plaintext of a record, and the most a ciphertext may exceed it (RFC 8446 §5.2).
const MAX_PLAIN: usize = 1 << 14;
const MAX_EXPANSION: usize = 256;

/// Runs the TLS handshake on `io` as the server, then continues with this module's record
/// layer ([`SealedTls`]).
pub(crate) async fn accept(
    mut io: TcpStream,
    config: Arc<rustls::ServerConfig>,
) -> io::Result<SealedTls> {
    let mut conn = ServerConnection::new(config).map_err(io::Error::other)?;
    // What was read and not yet fed to rustls: whole records go to it one at a time, so
    // what follows the handshake's last record stays here, for the record layer.
    let mut input = Vec::new();
    loop {
        send_pending(&mut conn, &mut io).await?;
        if !conn.is_handshaking() {
            break;
        }
        let len = match whole_record(&input)? {
            Some(len) => len,
            None => {
                let have = input.len();
                input.resize(have + READ_CHUNK, 0);
                let n = io.read(&mut input[have..]).await?;
                input.truncate(have + n);
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection closed during the TLS handshake",
                    ));
                }
                continue;
            }
        };
        let fed = conn.read_tls(&mut &input[..len])?;
        debug_assert_eq!(fed, len);
        input.drain(..len);
        if let Err(e) = conn.process_new_packets() {
            // The alert rustls queued for it, then the error.
            let _ = send_pending(&mut conn, &mut io).await;
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
    }
    // The handshake's last record carried nothing else.
    let mut early = Vec::new();
    match conn.reader().read_to_end(&mut early) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    let secrets = conn
        .dangerous_extract_secrets()
        .map_err(|e| io::Error::other(format!("taking over the TLS records: {e}")))?;
    if input.is_empty() {
        input = Vec::new();
    }
    Ok(SealedTls {
        io,
        rx: Direction::new(secrets.rx)?,
        tx: Direction::new(secrets.tx)?,
        input,
        plain: early,
        plain_pos: 0,
        out: Vec::new(),
        out_pos: 0,
        closed: false,
    })
}

/// How much a read asks for beyond the record it completes (a handshake flight, a frame or
/// two): fewer reads, and the buffer is freed once empty.
const READ_CHUNK: usize = 2048;

/// Writes what rustls has to send.
async fn send_pending(conn: &mut ServerConnection, io: &mut TcpStream) -> io::Result<()> {
    while conn.wants_write() {
        let mut out = Vec::new();
        conn.write_tls(&mut out)?;
        io.write_all(&out).await?;
    }
    Ok(())
}

/// The length of the whole record at the start of `input` (header included), when it is all
/// there.
fn whole_record(input: &[u8]) -> io::Result<Option<usize>> {
    let Some(header) = input.first_chunk::<5>() else {
        return Ok(None);
    };
    let len = 5 + record_len(header)?;
    Ok((input.len() >= len).then_some(len))
}

/// The length a record header announces, checked against the protocol's bound.
fn record_len(header: &[u8; 5]) -> io::Result<usize> {
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if len > MAX_PLAIN + MAX_EXPANSION {
        return Err(bad(format!("a TLS record of {len} bytes (at most 16,640)")));
    }
    Ok(len)
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// One direction's traffic secret: the AEAD, its key and IV as bytes, the record count.
struct Direction {
    algorithm: &'static aead::Algorithm,
    key: [u8; 32],
    iv: [u8; 12],
    seq: u64,
}

impl Direction {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> io::Result<Self> {
        let (algorithm, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => {
                return Err(io::Error::other(
                    "a TLS cipher suite this server cannot seal",
                ))
            }
        };
        let mut k = [0u8; 32];
        let key = key.as_ref();
        k[..key.len()].copy_from_slice(key);
        let iv: [u8; 12] = iv
            .as_ref()
            .try_into()
            .map_err(|_| io::Error::other("a TLS IV that is not 12 bytes"))?;
        Ok(Self {
            algorithm,
            key: k,
            iv,
            seq,
        })
    }

    /// The key for one record (expanded afresh: an idle connection keeps only the bytes).
    fn key(&self) -> aead::LessSafeKey {
        let len = self.algorithm.key_len();
        let unbound =
            aead::UnboundKey::new(self.algorithm, &self.key[..len]).expect("the key's length");
        aead::LessSafeKey::new(unbound)
    }

    /// The next record's nonce: the IV with the sequence number XORed into its end.
    fn nonce(&mut self) -> io::Result<aead::Nonce> {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| io::Error::other("TLS record sequence exhausted"))?;
        Ok(aead::Nonce::assume_unique_for_key(nonce))
    }
}

/// A TLS 1.3 connection after the handshake: this module's record layer over the socket.
pub(crate) struct SealedTls {
    io: TcpStream,
    rx: Direction,
    tx: Direction,
    /// Records received and not yet opened (empty, without capacity, when there are none).
    input: Vec<u8>,
    /// Plaintext received and not yet read.
    plain: Vec<u8>,
    plain_pos: usize,
    /// Sealed records not yet written.
    out: Vec<u8>,
    out_pos: usize,
    /// The client sent close_notify.
    closed: bool,
}

impl std::fmt::Debug for SealedTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedTls")
            .field("io", &self.io)
            .finish_non_exhaustive()
    }
}

impl SealedTls {
    /// Reads until `self.input` starts with a whole record: its length, or `None` at a
    /// clean end of stream between records.
    fn poll_record(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<usize>>> {
        loop {
            let need = match self.input.first_chunk::<5>() {
                None => 5,
                Some(header) => match record_len(header)? {
                    0 => return Poll::Ready(Err(bad("an empty TLS record".into()))),
                    len => 5 + len,
                },
            };
            if self.input.len() >= need && need > 5 {
                return Poll::Ready(Ok(Some(need)));
            }
            let have = self.input.len();
            self.input.resize(need.max(have + READ_CHUNK), 0);
            let mut buf = ReadBuf::new(&mut self.input[have..]);
            let polled = Pin::new(&mut self.io).poll_read(cx, &mut buf);
            let n = buf.filled().len();
            self.input.truncate(have + n);
            if self.input.is_empty() {
                self.input = Vec::new();
            }
            ready!(polled)?;
            if n == 0 {
                if self.input.is_empty() {
                    return Poll::Ready(Ok(None));
                }
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection closed in the middle of a TLS record",
                )));
            }
        }
    }

    /// Opens the whole record of `len` bytes at the start of `self.input`: its plaintext
    /// goes to `self.plain`.
    fn open_record(&mut self, len: usize) -> io::Result<()> {
        let header: [u8; 5] = self.input[..5].try_into().expect("five bytes");
        if header[0] != APPLICATION_DATA {
            return Err(bad(format!(
                "a TLS record of type {} after the handshake",
                header[0]
            )));
        }
        let nonce = self.rx.nonce()?;
        let key = self.rx.key();
        let opened = key
            .open_in_place(nonce, aead::Aad::from(header), &mut self.input[5..len])
            .map_err(|_| bad("a TLS record that does not decrypt".into()))?;
        // The inner plaintext: content, its type, zero padding.
        let Some(at) = opened.iter().rposition(|&b| b != 0) else {
            return Err(bad("a TLS record without a content type".into()));
        };
        let kind = opened[at];
        let content = &opened[..at];
        match kind {
            APPLICATION_DATA => {
                if self.plain_pos == self.plain.len() {
                    self.plain.clear();
                    self.plain_pos = 0;
                }
                self.plain.extend_from_slice(content);
            }
            ALERT if content == [1, 0] => self.closed = true,
            ALERT => return Err(bad(format!("a TLS alert from the peer: {content:?}"))),
            HANDSHAKE => {
                return Err(bad(
                    "a TLS handshake message after the handshake (a key update: not supported \
                     on the control channel)"
                        .into(),
                ))
            }
            other => return Err(bad(format!("a TLS record of inner type {other}"))),
        }
        self.input.drain(..len);
        if self.input.is_empty() {
            self.input = Vec::new();
        }
        Ok(())
    }

    /// Seals `data` (at most a record's worth) as one application-data record into `out`.
    fn seal(&mut self, kind: u8, data: &[u8]) -> io::Result<()> {
        let tag = self.tx.algorithm.tag_len();
        let len = data.len() + 1 + tag;
        let start = self.out.len();
        self.out.extend_from_slice(&[APPLICATION_DATA, 3, 3]);
        self.out
            .extend_from_slice(&u16::try_from(len).expect("a record").to_be_bytes());
        self.out.extend_from_slice(data);
        self.out.push(kind);
        let header: [u8; 5] = self.out[start..start + 5].try_into().expect("five bytes");
        let nonce = self.tx.nonce()?;
        let tag = self
            .tx
            .key()
            .seal_in_place_separate_tag(nonce, aead::Aad::from(header), &mut self.out[start + 5..])
            .map_err(|_| io::Error::other("sealing a TLS record failed"))?;
        self.out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Writes the sealed records; frees the buffer once all are out.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        self.out = Vec::new();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for SealedTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain_pos < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.plain_pos);
                buf.put_slice(&this.plain[this.plain_pos..this.plain_pos + n]);
                this.plain_pos += n;
                if this.plain_pos == this.plain.len() {
                    this.plain = Vec::new();
                    this.plain_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.closed || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.poll_record(cx))? {
                Some(len) => this.open_record(len)?,
                // The socket ended without close_notify: an end of stream all the same (the
                // control protocol's frames are whole lines).
                None => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl AsyncWrite for SealedTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = buf.len().min(MAX_PLAIN);
        this.seal(APPLICATION_DATA, &buf[..n])?;
        // Start writing; what the socket does not take now goes with the next call.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        if this.tx.seq != u64::MAX {
            // close_notify, once: the sequence number marks it sent.
            this.seal(ALERT, &[1, 0])?;
            this.tx.seq = u64::MAX;
            ready!(this.poll_drain(cx))?;
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;
    use tokio::net::TcpListener;

    /// A server accepting one connection through [`accept`], and a rustls client to it
    /// (offering only `suite` when given).
    async fn pair(
        suite: Option<rustls::SupportedCipherSuite>,
    ) -> (SealedTls, tokio_rustls::client::TlsStream<TcpStream>) {
        let identity = crate::ServerIdentity::ephemeral().unwrap();
        let config = identity.tls_config().unwrap();
        // The server's own (self-signed) certificate is the client's trust anchor.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(identity.certificate()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut provider = nettool_core::secure::provider().as_ref().clone();
        if let Some(suite) = suite {
            provider.cipher_suites = vec![suite];
        }
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let (server, client) = tokio::join!(
            async {
                let (s, _) = listener.accept().await.unwrap();
                accept(s, config).await.unwrap()
            },
            async {
                let s = TcpStream::connect(addr).await.unwrap();
                let name = ServerName::try_from("nettool-rendezvous").unwrap();
                connector.connect(name, s).await.unwrap()
            }
        );
        (server, client)
    }

    /// Lines cross both ways, records larger than one and small ones, for each TLS 1.3 suite;
    /// the client's close_notify is the end of the stream; between records the server holds
    /// no buffer.
    #[tokio::test]
    async fn records_cross_both_ways_with_every_suite_and_idle_holds_no_buffer() {
        use rustls::crypto::ring::cipher_suite as cs;
        for suite in [
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            let (mut server, mut client) = pair(Some(suite)).await;
            let big: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
            client.write_all(b"join\n").await.unwrap();
            client.write_all(&big).await.unwrap();
            client.flush().await.unwrap();
            let mut got = vec![0u8; 5 + big.len()];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(&got[..5], b"join\n", "{suite:?}");
            assert_eq!(&got[5..], &big[..], "{suite:?}");
            assert_eq!(
                (
                    server.input.capacity(),
                    server.plain.capacity(),
                    server.out.capacity()
                ),
                (0, 0, 0),
                "an idle connection holds no buffer ({suite:?})"
            );
            server.write_all(b"waiting\n").await.unwrap();
            server.write_all(&big).await.unwrap();
            server.flush().await.unwrap();
            assert_eq!(server.out.capacity(), 0);
            let mut back = vec![0u8; 8 + big.len()];
            client.read_exact(&mut back).await.unwrap();
            assert_eq!(&back[..8], b"waiting\n");
            assert_eq!(&back[8..], &big[..]);
            // The client's close_notify ends the server's stream; the server's own reaches it.
            client.shutdown().await.unwrap();
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            server.shutdown().await.unwrap();
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        }
    }

    /// A key update from the client, a tampered record and an oversized one end the
    /// connection with an error that names them.
    #[tokio::test]
    async fn a_key_update_a_tampered_record_and_an_oversized_one_are_refused_by_name() {
        let (mut server, mut client) = pair(None).await;
        client.get_mut().1.refresh_traffic_keys().unwrap();
        client.write_all(b"x").await.unwrap();
        client.flush().await.unwrap();
        let e = server.read(&mut [0u8; 8]).await.unwrap_err();
        assert!(e.to_string().contains("key update"), "{e}");

        let (mut server, client) = pair(None).await;
        let (mut raw, _) = client.into_inner();
        let mut record = vec![APPLICATION_DATA, 3, 3, 0, 20];
        record.extend_from_slice(&[7u8; 20]);
        raw.write_all(&record).await.unwrap();
        let e = server.read(&mut [0u8; 8]).await.unwrap_err();
        assert!(e.to_string().contains("does not decrypt"), "{e}");

        let (mut server, client) = pair(None).await;
        let (mut raw, _) = client.into_inner();
        raw.write_all(&[APPLICATION_DATA, 3, 3, 0xff, 0xff])
            .await
            .unwrap();
        let e = server.read(&mut [0u8; 8]).await.unwrap_err();
        assert!(e.to_string().contains("65535 bytes"), "{e}");
    }
}
