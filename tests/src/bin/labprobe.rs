//! `labprobe`: a tiny network probe run inside NAT-lab namespaces by the lab self-tests.
//!
//! Every subcommand prints one line per event to stdout, first word first, so tests can parse
//! the output with `split_whitespace`:
//!
//! - `tcp-listen PORT [--timeout-ms N]`: prints `listening <local>`, accepts one connection,
//!   prints `accepted <peer as seen>` and exits (or prints `timeout` and exits 1).
//! - `tcp-connect ADDR [--from-port P] [--timeout-ms N] [--ttl T] [--raise-ttl-after-ms N]
//!   [--no-recverr]`: prints one of `connected <local>`, `refused`, `timeout`,
//!   `ttl-exceeded from <router>`, `unreachable code=<c> from <router>`, `host-unreachable`,
//!   `error <text>`. The socket has `SO_REUSEADDR`/`SO_REUSEPORT` (so `--from-port` can be
//!   reused at once) and `IP_RECVERR` unless `--no-recverr`; `--raise-ttl-after-ms` sets the
//!   TTL back to 64 that long after the connect started (the low-TTL-first-SYN trick).
//! - `udp-echo PORT [--count N] [--timeout-ms N]`: prints `listening <local>`, then for each
//!   datagram `from <src>`, answering it with `observed <src>`; exits after N datagrams.
//! - `udp-send ADDR... [--from-port P] [--timeout-ms N] [--ttl T]`: from one socket, sends a
//!   datagram to each ADDR in turn and prints `reply <addr> <observed>`, `refused <addr>`,
//!   `timeout <addr>`, `ttl-exceeded <addr> from <router>`, `unreachable <addr> code=<c> from
//!   <router>` or `error <addr> <text>`.

use std::io::{self, Write};
use std::mem;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::process::exit;
use std::time::Duration;

struct Args {
    positional: Vec<String>,
    from_port: u16,
    timeout: Duration,
    ttl: Option<u32>,
    count: usize,
    recverr: bool,
    raise_ttl_after: Option<Duration>,
}

fn usage() -> ! {
    eprintln!(
        "usage: labprobe tcp-listen PORT | tcp-connect ADDR | udp-echo PORT | udp-send ADDR...\n\
         options: --from-port P --timeout-ms N --ttl T --count N --raise-ttl-after-ms N \
         --no-recverr"
    );
    exit(2)
}

fn parse_args(raw: &[String]) -> Args {
    let mut args = Args {
        positional: Vec::new(),
        from_port: 0,
        timeout: Duration::from_millis(2000),
        ttl: None,
        count: 1,
        recverr: true,
        raise_ttl_after: None,
    };
    let mut it = raw.iter();
    while let Some(a) = it.next() {
        let mut value = || -> u64 {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| usage())
        };
        match a.as_str() {
            "--from-port" => args.from_port = value() as u16,
            "--timeout-ms" => args.timeout = Duration::from_millis(value()),
            "--ttl" => args.ttl = Some(value() as u32),
            "--count" => args.count = value() as usize,
            "--no-recverr" => args.recverr = false,
            "--raise-ttl-after-ms" => args.raise_ttl_after = Some(Duration::from_millis(value())),
            s if s.starts_with("--") => usage(),
            _ => args.positional.push(a.clone()),
        }
    }
    args
}

fn say(line: &str) {
    let mut out = io::stdout().lock();
    // A closed stdout only means nobody listens any more.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn parse_addr(s: &str) -> SocketAddrV4 {
    s.parse().unwrap_or_else(|_| {
        eprintln!("labprobe: bad IPv4 socket address {s:?}");
        exit(2)
    })
}

/// Exits the process with `timeout` after `d`, whatever the main thread is blocked in.
fn watchdog(d: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(d);
        say("timeout");
        exit(1);
    });
}

fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    // SAFETY: fd is a valid socket and the option value is a c_int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        say(&format!("error setsockopt: {}", io::Error::last_os_error()));
        exit(1);
    }
}

/// An ICMP error taken from the socket's error queue (needs `IP_RECVERR`).
struct IcmpError {
    icmp_type: u8,
    code: u8,
    offender: Ipv4Addr,
}

impl IcmpError {
    fn describe(&self) -> String {
        match self.icmp_type {
            11 => format!("ttl-exceeded from {}", self.offender),
            3 => format!("unreachable code={} from {}", self.code, self.offender),
            t => format!("icmp type={t} code={} from {}", self.code, self.offender),
        }
    }
}

fn read_icmp_error(fd: RawFd) -> Option<IcmpError> {
    let mut data = [0u8; 512];
    let mut control = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; all pointers below point at live local buffers.
    unsafe {
        let mut msg: libc::msghdr = mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = mem::size_of_val(&control);
        if libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) < 0 {
            return None;
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::IPPROTO_IP && (*cmsg).cmsg_type == libc::IP_RECVERR {
                let ee = libc::CMSG_DATA(cmsg) as *const libc::sock_extended_err;
                let ee = ee.read_unaligned();
                if ee.ee_origin != libc::SO_EE_ORIGIN_ICMP {
                    return None;
                }
                let sin = (libc::CMSG_DATA(cmsg) as *const libc::sock_extended_err).add(1)
                    as *const libc::sockaddr_in;
                let sin = sin.read_unaligned();
                return Some(IcmpError {
                    icmp_type: ee.ee_type,
                    code: ee.ee_code,
                    offender: Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                });
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    None
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
    let mut sin: libc::sockaddr_in = unsafe { mem::zeroed() };
    sin.sin_family = libc::AF_INET as libc::sa_family_t;
    sin.sin_port = a.port().to_be();
    sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
    sin
}

fn tcp_listen(args: &Args) {
    let port: u16 = args
        .positional
        .first()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| usage());
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap_or_else(|e| {
        say(&format!("error bind: {e}"));
        exit(1)
    });
    say(&format!(
        "listening {}",
        listener.local_addr().expect("local addr")
    ));
    watchdog(args.timeout);
    match listener.accept() {
        Ok((_stream, peer)) => say(&format!("accepted {peer}")),
        Err(e) => {
            say(&format!("error accept: {e}"));
            exit(1)
        }
    }
}

fn tcp_connect(args: &Args) {
    let dest = parse_addr(args.positional.first().unwrap_or_else(|| usage()));
    // SAFETY: plain socket(2) call; the fd is owned by `stream` below right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        say(&format!("error socket: {}", io::Error::last_os_error()));
        exit(1);
    }
    // SAFETY: fd is a fresh, owned TCP socket.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1);
    if args.recverr {
        setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_RECVERR, 1);
    }
    if let Some(ttl) = args.ttl {
        setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_TTL, ttl as libc::c_int);
    }
    // A blocking connect gives up with EINPROGRESS after SO_SNDTIMEO.
    let tv = libc::timeval {
        tv_sec: args.timeout.as_secs() as libc::time_t,
        tv_usec: args.timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: valid fd, timeval of the right size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    let len = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    if args.from_port != 0 {
        let local = sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, args.from_port));
        // SAFETY: valid fd and sockaddr_in.
        if unsafe { libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) } != 0 {
            say(&format!("error bind: {}", io::Error::last_os_error()));
            exit(1);
        }
    }
    if let Some(after) = args.raise_ttl_after {
        std::thread::spawn(move || {
            std::thread::sleep(after);
            setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_TTL, 64);
        });
    }
    let remote = sockaddr(dest);
    // SAFETY: valid fd and sockaddr_in.
    let rc = unsafe { libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) };
    if rc == 0 {
        say(&format!(
            "connected {}",
            stream.local_addr().expect("local addr")
        ));
        return;
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ECONNREFUSED) => say("refused"),
        Some(libc::EINPROGRESS) | Some(libc::ETIMEDOUT) | Some(libc::EAGAIN) => say("timeout"),
        _ => match read_icmp_error(fd) {
            Some(icmp) => say(&icmp.describe()),
            None if err.raw_os_error() == Some(libc::EHOSTUNREACH) => say("host-unreachable"),
            None => say(&format!("error {err}")),
        },
    }
    exit(1);
}

fn udp_echo(args: &Args) {
    let port: u16 = args
        .positional
        .first()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| usage());
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap_or_else(|e| {
        say(&format!("error bind: {e}"));
        exit(1)
    });
    say(&format!(
        "listening {}",
        socket.local_addr().expect("local addr")
    ));
    watchdog(args.timeout);
    let mut buf = [0u8; 1500];
    for _ in 0..args.count {
        match socket.recv_from(&mut buf) {
            Ok((_, src)) => {
                let _ = socket.send_to(format!("observed {src}").as_bytes(), src);
                say(&format!("from {src}"));
            }
            Err(e) => {
                say(&format!("error recv: {e}"));
                exit(1)
            }
        }
    }
}

fn udp_send(args: &Args) {
    if args.positional.is_empty() {
        usage();
    }
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, args.from_port)).unwrap_or_else(|e| {
        say(&format!("error bind: {e}"));
        exit(1)
    });
    let fd = socket.as_raw_fd();
    setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_RECVERR, 1);
    if let Some(ttl) = args.ttl {
        socket.set_ttl(ttl).expect("set ttl");
    }
    socket
        .set_read_timeout(Some(args.timeout))
        .expect("read timeout");
    let mut buf = [0u8; 1500];
    for dest in &args.positional {
        let dest = SocketAddr::V4(parse_addr(dest));
        let result = socket
            .connect(dest)
            .and_then(|()| socket.send(b"labprobe"))
            .and_then(|_| socket.recv(&mut buf));
        match result {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                let observed = text.strip_prefix("observed ").unwrap_or(&text);
                say(&format!("reply {dest} {observed}"));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                say(&format!("timeout {dest}"))
            }
            Err(e) => {
                let icmp = read_icmp_error(fd);
                match icmp {
                    Some(i) if i.icmp_type == 3 && i.code == 3 => say(&format!("refused {dest}")),
                    Some(i) if i.icmp_type == 11 => {
                        say(&format!("ttl-exceeded {dest} from {}", i.offender))
                    }
                    Some(i) => say(&format!(
                        "unreachable {dest} code={} from {}",
                        i.code, i.offender
                    )),
                    None if e.kind() == io::ErrorKind::ConnectionRefused => {
                        say(&format!("refused {dest}"))
                    }
                    None => say(&format!("error {dest} {e}")),
                }
            }
        }
    }
}

fn main() {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = raw.split_first() else {
        usage()
    };
    let args = parse_args(rest);
    match cmd.as_str() {
        "tcp-listen" => tcp_listen(&args),
        "tcp-connect" => tcp_connect(&args),
        "udp-echo" => udp_echo(&args),
        "udp-send" => udp_send(&args),
        _ => usage(),
    }
}
