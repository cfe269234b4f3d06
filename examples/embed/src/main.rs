//! What a third party writes with `nettool-peer`: stdin to the peer and the peer to stdout
//! over the durable stream; exit 0 only when the peer confirmed every byte.
//! `nettool-embed --server HOST:PORT --session S --secret K`
use std::process::ExitCode;
use tokio::io::AsyncWriteExt;

#[tokio::main]
async fn main() -> ExitCode {
    let mut peer = nettool_peer::Peer::builder();
    let mut args = std::env::args().skip(1);
    while let (Some(flag), Some(value)) = (args.next(), args.next()) {
        peer = match flag.as_str() {
            "--server" => peer.server(value),
            "--session" => peer.session(value),
            "--secret" => peer.secret(value),
            _ => {
                eprintln!("usage: nettool-embed --server HOST:PORT --session S --secret K");
                return ExitCode::from(2);
            }
        };
    }
    let peer = peer.on_event(|e| eprintln!("nettool-embed: {e:?}"));
    let connection = match peer.connect().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nettool-embed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (stream, completion) = connection.into_stream();
    let (mut from_peer, mut to_peer) = tokio::io::split(stream);
    let send = async {
        tokio::io::copy(&mut tokio::io::stdin(), &mut to_peer).await?;
        to_peer.shutdown().await
    };
    let receive = async {
        let mut stdout = tokio::io::stdout();
        tokio::io::copy(&mut from_peer, &mut stdout).await?;
        stdout.flush().await
    };
    let (sent, received) = tokio::join!(send, receive);
    let done = completion.finished().await;
    let end = &done.end;
    eprintln!(
        "nettool-embed: {:?}: sent {} (confirmed {}), received {}",
        end.kind, end.sent, end.confirmed, end.received
    );
    if sent.is_ok() && received.is_ok() && done.succeeded() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
