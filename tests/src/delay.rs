//! Link conditions for the NAT lab: one-way delay, jitter and random loss at the `inet` router.
//!
//! The lab's kernel has no netem (and nftables' `queue` statement is not built in), so the
//! conditions are applied in userspace: an `iptables -j NFQUEUE` rule in `inet`'s FORWARD chain
//! hands every forwarded packet to a [`DelayLine`], a dedicated thread that has entered `inet`'s
//! network namespace and holds the packets' verdicts. It drops a packet at once with the
//! probability of the loss, and otherwise accepts it once its delay (plus jitter) is over.
//! Packets leave in the order they came: a packet is never released before the one ahead of it
//! on the same way through `inet` (same input and output interface), so jitter varies the delay
//! without reordering (as on a real path, where TCP would otherwise see spurious reordering),
//! and a packet never waits for one going another way (say, an ACK for a data segment).
//!
//! Only metadata crosses to userspace (copy range 0) and GSO super-packets are queued whole, so
//! a bulk TCP transfer costs the line one message per super-packet, not one per segment.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::LabError;

/// Conditions applied to every packet the lab's internet router `inet` forwards (see
/// [`crate::LabBuilder::delay`]). Every path between a peer and the server, or between the two
/// peers, crosses `inet` once per direction, so the conditions apply once per direction.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LinkConditions {
    /// One-way delay added to each packet crossing `inet`.
    pub delay: Duration,
    /// Each packet's delay varies uniformly in `delay ± jitter` (never below zero); packets
    /// going the same way through `inet` (same input and output link) still leave in their
    /// order of arrival, so a packet may wait for the one ahead of it.
    pub jitter: Duration,
    /// The probability (0 to 1) that a packet crossing `inet` is dropped.
    pub loss: f64,
}

/// The netfilter queue the lab's rule sends packets to (queues are per network namespace).
pub(crate) const QUEUE_NUM: u16 = 0;
/// How long the line waits at most without a packet due, to notice it should stop.
const TICK: Duration = Duration::from_millis(50);
/// The kernel holds at most this many packets for the line; more are dropped, like a router's
/// full buffer (fail-open is off).
const QUEUE_MAX_LEN: u32 = 100_000;
/// The netlink socket's receive buffer, so bursts of packet messages are not dropped.
const RCVBUF: libc::c_int = 64 << 20;
/// `ioctl` on a socket giving a descriptor of its network namespace (linux/sockios.h).
const SIOCGSKNS: libc::c_ulong = 0x894C;

/// A running delay line: a thread inside a namespace that holds the verdicts of the packets
/// queued to its netfilter queue 0. Dropping it stops the thread, which first accepts every
/// packet it still holds.
#[derive(Debug)]
pub(crate) struct DelayLine {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DelayLine {
    /// Starts a line in namespace `netns` (a name under `/run/netns`). Returns once the queue
    /// is bound, so a rule sending packets to it never finds it without a listener.
    pub(crate) fn start(netns: &str, conditions: LinkConditions) -> Result<Self, LabError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let path = format!("{}/{netns}", crate::lab::NETNS_DIR);
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(format!("delay-line {netns}"))
            .spawn(move || match Line::open(&path, conditions) {
                Ok(mut line) => {
                    let _ = ready_tx.send(Ok(()));
                    line.run(&thread_stop);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|source| error("cannot start the delay line thread", source))?;
        let mut line = Self {
            stop,
            thread: Some(thread),
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(line),
            Ok(Err(e)) => {
                line.stop();
                Err(e)
            }
            Err(_) => {
                line.stop();
                Err(error(
                    "the delay line thread died while starting",
                    io::Error::other("thread panicked"),
                ))
            }
        }
    }

    /// Stops the thread (it accepts what it still holds) and waits for it.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                eprintln!("nat lab: the delay line thread panicked");
            }
        }
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop();
    }
}

fn error(what: impl Into<String>, source: io::Error) -> LabError {
    LabError::DelayLine {
        what: what.into(),
        source,
    }
}

/// A tiny xorshift64* generator: loss and jitter need no more.
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u64;
        Self((nanos ^ tid.rotate_left(32)) | 1)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The packets held on one way through the router: from one interface to another.
struct Way {
    /// Input and output interface indexes.
    key: (u32, u32),
    /// Packets held, in arrival order, with the time each is released (non-decreasing).
    held: VecDeque<(Instant, nfq::Message)>,
    /// When the last packet that went this way is released: no packet leaves before it.
    last_release: Option<Instant>,
}

impl Way {
    fn next_due(&self) -> Option<Instant> {
        self.held.front().map(|(at, _)| *at)
    }
}

/// The line's state, on its own thread.
struct Line {
    queue: nfq::Queue,
    /// The queue's netlink socket (owned by `queue`), for `poll`.
    fd: RawFd,
    conditions: LinkConditions,
    /// Packets held, one FIFO per way through the router.
    ways: Vec<Way>,
    rng: Rng,
    /// Errors reported so far (only the first few are printed).
    errors: u32,
}

impl Line {
    /// Enters the namespace at `path` (this thread only) and binds its queue.
    fn open(path: &str, conditions: LinkConditions) -> Result<Self, LabError> {
        let ns = File::open(path).map_err(|e| error(format!("cannot open {path}"), e))?;
        // SAFETY: a valid namespace descriptor; setns(CLONE_NEWNET) affects the calling thread.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(error(
                format!("cannot enter {path} (setns)"),
                io::Error::last_os_error(),
            ));
        }
        let unavailable = |step: &str| {
            let step = step.to_owned();
            move |e| error(format!("nfnetlink_queue unavailable ({step})"), e)
        };
        let mut queue = nfq::Queue::open().map_err(unavailable("open"))?;
        queue.bind(QUEUE_NUM).map_err(unavailable("bind queue 0"))?;
        queue
            .set_copy_range(QUEUE_NUM, 0)
            .map_err(unavailable("copy range 0"))?;
        queue
            .set_recv_gso(QUEUE_NUM, true)
            .map_err(unavailable("GSO"))?;
        queue
            .set_queue_max_len(QUEUE_NUM, QUEUE_MAX_LEN)
            .map_err(unavailable("queue length"))?;
        queue
            .set_fail_open(QUEUE_NUM, false)
            .map_err(unavailable("fail-open off"))?;
        queue.set_nonblocking(true);
        let fd = queue_fd(&ns).map_err(|e| error("cannot find the queue's netlink socket", e))?;
        // SAFETY: `fd` is the queue's open socket; the option is a c_int.
        let set = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&RCVBUF as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if set != 0 {
            return Err(error(
                "cannot enlarge the queue's receive buffer (SO_RCVBUFFORCE)",
                io::Error::last_os_error(),
            ));
        }
        // Wake up on time (the default timer slack is 50 µs).
        // SAFETY: PR_SET_TIMERSLACK takes a number; it affects this thread only.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
        Ok(Self {
            queue,
            fd,
            conditions,
            ways: Vec::new(),
            rng: Rng::seeded(),
            errors: 0,
        })
    }

    fn run(&mut self, stop: &AtomicBool) {
        loop {
            let now = Instant::now();
            self.release(|at| at <= now);
            if stop.load(Ordering::Acquire) {
                break;
            }
            let wait = self
                .ways
                .iter()
                .filter_map(Way::next_due)
                .min()
                .map_or(TICK, |at| at.saturating_duration_since(now).min(TICK));
            match self.wait_readable(wait) {
                Ok(true) => self.drain(),
                Ok(false) => {}
                Err(e) => {
                    eprintln!("nat lab: delay line stops: poll failed: {e}");
                    break;
                }
            }
        }
        self.release(|_| true);
    }

    /// Waits up to `timeout` for the queue's socket to be readable.
    fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: one valid pollfd, a valid timespec, no signal mask.
        let n = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        Ok(n > 0 && pfd.revents & libc::POLLIN != 0)
    }

    /// Takes every packet waiting in the socket: drops or holds each.
    fn drain(&mut self) {
        loop {
            match self.queue.recv() {
                Ok(msg) => self.take(msg),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // E.g. the kernel refusing a verdict: the datagram is consumed; poll again.
                    self.report("receive", &e);
                    return;
                }
            }
        }
    }

    fn take(&mut self, mut msg: nfq::Message) {
        let c = self.conditions;
        if c.loss > 0.0 && self.rng.next_f64() < c.loss {
            msg.set_verdict(nfq::Verdict::Drop);
            if let Err(e) = self.queue.verdict(msg) {
                self.report("drop verdict", &e);
            }
            return;
        }
        let now = Instant::now();
        let mut nanos = c.delay.as_nanos() as f64;
        if !c.jitter.is_zero() {
            nanos += (self.rng.next_f64() * 2.0 - 1.0) * c.jitter.as_nanos() as f64;
        }
        let due = now + Duration::from_nanos(nanos.max(0.0) as u64);
        let key = (msg.get_indev(), msg.get_outdev());
        let i = match self.ways.iter().position(|w| w.key == key) {
            Some(i) => i,
            None => {
                self.ways.push(Way {
                    key,
                    held: VecDeque::new(),
                    last_release: None,
                });
                self.ways.len() - 1
            }
        };
        let way = &mut self.ways[i];
        // Never before the packet ahead on the same way: order is kept.
        let due = way.last_release.map_or(due, |last| due.max(last));
        way.last_release = Some(due);
        way.held.push_back((due, msg));
    }

    /// Accepts, in order, the packets at the front of each way whose release time passes `due`.
    fn release(&mut self, due: impl Fn(Instant) -> bool) {
        for i in 0..self.ways.len() {
            while self.ways[i].next_due().is_some_and(&due) {
                let Some((_, mut msg)) = self.ways[i].held.pop_front() else {
                    break;
                };
                msg.set_verdict(nfq::Verdict::Accept);
                if let Err(e) = self.queue.verdict(msg) {
                    self.report("accept verdict", &e);
                }
            }
        }
    }

    fn report(&mut self, what: &str, e: &io::Error) {
        self.errors += 1;
        if self.errors <= 5 {
            eprintln!("nat lab: delay line: {what} failed: {e}");
        }
    }
}

/// The descriptor of the queue's netlink socket, which `nfq::Queue` does not expose: the one
/// netfilter netlink socket of this process that lives in namespace `ns` (each lab has its own
/// `inet`, and only its line opens such a socket there).
fn queue_fd(ns: &File) -> io::Result<RawFd> {
    let ns_id = file_id(ns.as_raw_fd())?;
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/thread-self/fd")? {
        let Some(fd) = entry?
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<RawFd>().ok())
        else {
            continue;
        };
        if sockopt(fd, libc::SO_DOMAIN) != Some(libc::AF_NETLINK)
            || sockopt(fd, libc::SO_PROTOCOL) != Some(libc::NETLINK_NETFILTER)
        {
            continue;
        }
        // SAFETY: SIOCGSKNS takes no argument and returns a new descriptor (or -1).
        let sock_ns = unsafe { libc::ioctl(fd, SIOCGSKNS as _) };
        if sock_ns < 0 {
            continue;
        }
        let id = file_id(sock_ns);
        // SAFETY: `sock_ns` is the descriptor the ioctl just opened for us.
        unsafe { libc::close(sock_ns) };
        if id.ok() == Some(ns_id) {
            found.push(fd);
        }
    }
    match found[..] {
        [fd] => Ok(fd),
        _ => Err(io::Error::other(format!(
            "{} netfilter netlink sockets in the namespace, expected 1",
            found.len()
        ))),
    }
}

/// Device and inode of an open file.
fn file_id(fd: RawFd) -> io::Result<(u64, u64)> {
    // SAFETY: fstat fills the zeroed struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid stat buffer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.st_dev, st.st_ino))
}

/// An integer `SOL_SOCKET` option of `fd` (`None` if `fd` is no socket).
fn sockopt(fd: RawFd, name: libc::c_int) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for a c_int option.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_uniform_enough() {
        let mut rng = Rng(12345);
        let n = 100_000;
        let below = (0..n).filter(|_| rng.next_f64() < 0.1).count();
        assert!((9_000..11_000).contains(&below), "{below}");
        assert!((0..1000).all(|_| (0.0..1.0).contains(&rng.next_f64())));
    }
}
