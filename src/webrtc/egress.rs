//! The WebRTC socket's sending side: datagrams are batched in one buffer and leave in as few
//! system calls as the kernel allows.
//!
//! Guarantees:
//! - Consecutive datagrams to the same peer with the same size (the packets of one video frame),
//!   and a last shorter one, form one GSO batch: one message the kernel cuts into datagrams.
//! - Batches are queued, and sent together with `sendmmsg`: one system call for up to
//!   [`MMSG`] batches of the same segment size (every viewer's copy of a frame has the same
//!   sizes), when the queue is full, the buffer holds [`SEND_AT`] bytes, or on [`Egress::flush`].
//!   Order is kept: per peer, datagrams leave in the order they were committed.
//! - A full socket buffer drops datagrams, which peers recover from like any loss: nothing here
//!   waits on the socket.
//! - Every datagram leaves from the local address it is given (the address its peer's packets
//!   arrived at, `IP_PKTINFO` / `IPV6_PKTINFO`), so a socket bound to a wildcard address answers
//!   from the address a peer reached, not from whichever one the kernel's route prefers: ICE
//!   drops answers from any other. A batch and a `sendmmsg` run share one source address.
//! - Without GSO (an old kernel), every datagram is sent on its own.
//! - On an IPv6 socket (`[::]`, dual stack), IPv4 peers and sources are written as IPv4-mapped
//!   addresses; callers always pass plain IPv4 ones.
//! - [`Out`] is what the session table writes through: [`Egress`] is one, a test's buffer
//!   another.

use std::io::IoSlice;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

use nix::libc;
use nix::sys::socket::{ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, sendmmsg};
use tokio::net::UdpSocket;
use tracing::debug;

/// Batches per `sendmmsg` call at the most.
pub(crate) const MMSG: usize = 64;
/// Queued bytes that trigger a send.
pub(crate) const SEND_AT: usize = 1 << 20;
/// Kernel buffers of the WebRTC socket: a burst of viewers' packets (a keyframe for each) must
/// not overflow them.
const SOCKET_BUFFER: usize = 8 << 20;

/// A GSO batch waiting in the buffer.
struct Queued {
    dest: SocketAddr,
    src: Option<IpAddr>,
    start: usize,
    end: usize,
    segment: usize,
}

/// The socket and its send batches.
pub(crate) struct Egress {
    /// The node's WebRTC socket (the driver receives on it too).
    pub(crate) socket: UdpSocket,
    /// quinn-udp's view of the socket (it turned on GRO and `IP_PKTINFO` / `IPV6_RECVPKTINFO`):
    /// what the driver receives with. `None` where the platform refused it.
    pub(crate) state: Option<quinn_udp::UdpSocketState>,
    gso: bool,
    max_segments: usize,
    /// The socket is IPv6: IPv4 addresses are sent as IPv4-mapped ones.
    v6: bool,
    /// Datagrams to send: the queued batches, then the open one. Senders append a datagram at
    /// the end and [`Egress::commit`] it.
    pub(crate) buf: Vec<u8>,
    queued: Vec<Queued>,
    /// The open batch: destination, source, first byte, segment size, datagrams.
    dest: Option<SocketAddr>,
    src: Option<IpAddr>,
    start: usize,
    segment: usize,
    count: usize,
    /// The last datagram of the open batch was shorter than `segment`: nothing may follow it.
    closed: bool,
    addrs: Vec<Option<SockaddrStorage>>,
}

impl Egress {
    /// Egress on `socket`, with its kernel buffers enlarged.
    pub(crate) fn new(socket: UdpSocket) -> Self {
        let state = quinn_udp::UdpSocketState::new((&socket).into()).ok();
        if let Some(st) = &state {
            let _ = st.set_send_buffer_size((&socket).into(), SOCKET_BUFFER);
            let _ = st.set_recv_buffer_size((&socket).into(), SOCKET_BUFFER);
        }
        let max_segments = state.as_ref().map_or(1, |s| s.max_gso_segments()).max(1);
        debug!(max_segments, "WebRTC egress");
        let v6 = socket.local_addr().is_ok_and(|a| a.is_ipv6());
        Self {
            socket,
            state,
            gso: max_segments > 1,
            max_segments,
            v6,
            buf: Vec::with_capacity(SEND_AT + (64 << 10)),
            queued: Vec::with_capacity(MMSG),
            dest: None,
            src: None,
            start: 0,
            segment: 0,
            count: 0,
            closed: false,
            addrs: Vec::with_capacity(MMSG),
        }
    }

    /// Appends one datagram to `dest`, to leave from `src` (`None`: the address the kernel
    /// picks).
    pub(crate) fn push(&mut self, dest: SocketAddr, src: Option<IpAddr>, data: &[u8]) {
        let start = self.buf.len();
        self.buf.extend_from_slice(data);
        self.commit(dest, src, start);
    }

    /// The datagram written at the end of the buffer from `start` on is complete: it joins the
    /// open batch, or starts the next one (queuing the open one, and sending the queue when it
    /// is full). It leaves from `src` (`None`: the address the kernel picks).
    pub(crate) fn commit(&mut self, dest: SocketAddr, src: Option<IpAddr>, start: usize) {
        let len = self.buf.len() - start;
        let fits = self.count > 0
            && self.dest == Some(dest)
            && self.src == src
            && !self.closed
            && len <= self.segment
            && self.count < self.max_segments
            && self.buf.len() - self.start <= 65_000;
        if !fits {
            self.close(start);
            let mut start = start;
            if self.queued.len() >= MMSG || start >= SEND_AT {
                self.send_queued();
                self.buf.copy_within(start.., 0);
                self.buf.truncate(len);
                start = 0;
            }
            self.dest = Some(dest);
            self.src = src;
            self.start = start;
            self.segment = len;
        }
        self.count += 1;
        self.closed = len < self.segment;
    }

    /// Sends everything.
    pub(crate) fn flush(&mut self) {
        self.close(self.buf.len());
        self.send_queued();
        self.buf.clear();
    }

    /// Queues the open batch, which ends at `end`.
    fn close(&mut self, end: usize) {
        if let Some(dest) = self.dest.take()
            && self.count > 0
        {
            self.queued.push(Queued {
                dest,
                src: self.src,
                start: self.start,
                end,
                segment: self.segment,
            });
        }
        self.count = 0;
        self.closed = false;
    }

    /// Sends the queued batches: runs of the same segment size (with GSO) and source address
    /// in one `sendmmsg` each.
    fn send_queued(&mut self) {
        let Self {
            socket,
            buf,
            queued,
            addrs,
            gso,
            v6,
            ..
        } = self;
        let (gso, v6) = (*gso, *v6);
        let fd = socket.as_raw_fd();
        // Not kept in `self`: they hold raw pointers, and the driver's future must be `Send`.
        // Three allocations per kind of control messages used in a call of up to MMSG batches.
        // One set per kind: the kernel reads a message's whole control buffer, so it must hold
        // exactly the messages sent (trailing space reads as a malformed one: EINVAL).
        let mut headers: [Option<MultiHeaders<SockaddrStorage>>; 6] = Default::default();
        let mut i = 0;
        while i < queued.len() {
            let (segment, src) = (queued[i].segment, queued[i].src);
            // Without GSO every batch is one datagram (`max_segments` is 1): only the source
            // has to match.
            let same = |q: &Queued| q.src == src && (!gso || q.segment == segment);
            let mut j = i + 1;
            while j < queued.len() && j - i < MMSG && same(&queued[j]) {
                j += 1;
            }
            let run = &queued[i..j];
            let slices: Vec<[IoSlice<'_>; 1]> = run
                .iter()
                .map(|q| [IoSlice::new(&buf[q.start..q.end])])
                .collect();
            addrs.clear();
            addrs.extend(
                run.iter()
                    .map(|q| Some(SockaddrStorage::from(socket_addr(q.dest, v6)))),
            );
            let segment = u16::try_from(segment).unwrap_or(u16::MAX);
            let info = src.map(|ip| PacketInfo::new(ip, v6));
            let kind = match &info {
                None => 0,
                Some(PacketInfo::V4(_)) => 2,
                Some(PacketInfo::V6(_)) => 4,
            } + usize::from(gso);
            let headers = headers[kind].get_or_insert_with(|| {
                let space = match kind {
                    1 => nix::cmsg_space!(u16),
                    2 => nix::cmsg_space!(libc::in_pktinfo),
                    3 => nix::cmsg_space!(u16, libc::in_pktinfo),
                    4 => nix::cmsg_space!(libc::in6_pktinfo),
                    5 => nix::cmsg_space!(u16, libc::in6_pktinfo),
                    _ => Vec::new(),
                };
                MultiHeaders::preallocate(MMSG, (!space.is_empty()).then_some(space))
            });
            let mut cmsgs = Vec::with_capacity(2);
            if gso {
                cmsgs.push(ControlMessage::UdpGsoSegments(&segment));
            }
            match &info {
                Some(PacketInfo::V4(pi)) => cmsgs.push(ControlMessage::Ipv4PacketInfo(pi)),
                Some(PacketInfo::V6(pi)) => cmsgs.push(ControlMessage::Ipv6PacketInfo(pi)),
                None => {}
            }
            // A full socket (EAGAIN) drops what was not sent, as a lossy network would.
            if let Err(e) = sendmmsg(
                fd,
                headers,
                &slices,
                &*addrs,
                &cmsgs,
                MsgFlags::MSG_DONTWAIT,
            ) && e != nix::errno::Errno::EAGAIN
            {
                debug!(error = %e, batches = run.len(), ?src, "WebRTC send failed");
            }
            i = j;
        }
        queued.clear();
    }
}

/// Where the WebRTC session table ([`super::table`]) writes its datagrams: the [`Egress`] in the
/// driver, a plain buffer in tests. Generic, not `dyn`: a datagram costs no indirect call.
pub(crate) trait Out {
    /// The buffer datagrams are written at the end of, each then [`Out::commit`]ted.
    fn buf(&mut self) -> &mut Vec<u8>;
    /// The datagram written at the end of the buffer from `start` on is complete: it goes to
    /// `dest`, from `src` (`None`: the address the kernel picks).
    fn commit(&mut self, dest: SocketAddr, src: Option<IpAddr>, start: usize);
    /// Sends what was committed.
    fn flush(&mut self);
    /// Appends one datagram to `dest`, from `src`.
    fn push(&mut self, dest: SocketAddr, src: Option<IpAddr>, data: &[u8]) {
        let start = self.buf().len();
        self.buf().extend_from_slice(data);
        self.commit(dest, src, start);
    }
}

impl Out for Egress {
    #[inline]
    fn buf(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    #[inline]
    fn commit(&mut self, dest: SocketAddr, src: Option<IpAddr>, start: usize) {
        Egress::commit(self, dest, src, start)
    }

    #[inline]
    fn flush(&mut self) {
        Egress::flush(self)
    }

    #[inline]
    fn push(&mut self, dest: SocketAddr, src: Option<IpAddr>, data: &[u8]) {
        Egress::push(self, dest, src, data)
    }
}

/// `addr` as the socket's family needs it: IPv4-mapped on an IPv6 socket.
fn socket_addr(addr: SocketAddr, v6: bool) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if v6 => SocketAddr::new(IpAddr::V6(a.ip().to_ipv6_mapped()), a.port()),
        a => a,
    }
}

/// The source-address control message of one send.
enum PacketInfo {
    V4(libc::in_pktinfo),
    V6(libc::in6_pktinfo),
}

impl PacketInfo {
    /// Datagrams that leave from `ip` (on an IPv6 socket when `v6`).
    fn new(ip: IpAddr, v6: bool) -> Self {
        match ip {
            IpAddr::V4(ip) if !v6 => PacketInfo::V4(libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from_ne_bytes(ip.octets()),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            }),
            ip => {
                let ip = match ip {
                    IpAddr::V4(ip) => ip.to_ipv6_mapped(),
                    IpAddr::V6(ip) => ip,
                };
                PacketInfo::V6(libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: ip.octets(),
                    },
                    ipi6_ifindex: 0,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every datagram arrives, in order per peer, whatever the batching.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_arrive_whole_and_in_order() {
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut egress = Egress::new(tx);
        // Per round: a 5-packet "frame" of 1000 bytes + a 300-byte tail to each peer, then a
        // small datagram each (6 batches a round: the queue fills every 11 rounds).
        const ROUNDS: u32 = 30;
        let datagram = |round: u32, p: usize, k: u32| -> Vec<u8> {
            match k {
                0..=4 => (0..1000)
                    .map(|i| (i ^ round ^ k ^ p as u32) as u8)
                    .collect(),
                5 => vec![(round ^ p as u32) as u8; 300],
                _ => vec![round as u8; 40 + p],
            }
        };
        let mut readers = Vec::new();
        let mut addrs = Vec::new();
        for p in 0..3usize {
            let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let _ = socket2::SockRef::from(&peer).set_recv_buffer_size(4 << 20);
            addrs.push(peer.local_addr().unwrap());
            readers.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                for round in 0..ROUNDS {
                    for k in 0..7 {
                        let got = tokio::time::timeout(
                            std::time::Duration::from_secs(5),
                            peer.recv(&mut buf),
                        )
                        .await
                        .unwrap_or_else(|_| panic!("peer {p}: round {round} datagram {k} missing"))
                        .unwrap();
                        assert_eq!(
                            &buf[..got],
                            &datagram(round, p, k)[..],
                            "peer {p}, round {round}, datagram {k}"
                        );
                    }
                }
            }));
        }
        for round in 0..ROUNDS {
            for (p, addr) in addrs.iter().enumerate() {
                for k in 0..6 {
                    egress.push(*addr, None, &datagram(round, p, k));
                }
            }
            for (p, addr) in addrs.iter().enumerate() {
                egress.push(*addr, None, &datagram(round, p, 6));
            }
            if round == 20 {
                egress.flush();
            }
        }
        egress.flush();
        for r in readers {
            r.await.unwrap();
        }
    }

    /// From a wildcard socket (IPv4, and dual-stack IPv6 sending to an IPv4 peer), datagrams
    /// with a source address leave from it, batched (GSO) or not; without one they arrive too.
    #[tokio::test]
    async fn datagrams_leave_from_the_source_given() {
        for bind in ["0.0.0.0:0", "[::]:0"] {
            let Ok(tx) = UdpSocket::bind(bind).await else {
                continue;
            };
            let port = tx.local_addr().unwrap().port();
            let mut egress = Egress::new(tx);
            let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let to = peer.local_addr().unwrap();
            let src = IpAddr::from([127, 0, 0, 1]);
            for (i, len) in [1000usize, 1000, 1000, 300, 40].into_iter().enumerate() {
                egress.push(to, (i < 4).then_some(src), &vec![i as u8; len]);
            }
            egress.flush();
            let mut buf = [0u8; 2048];
            for (i, len) in [1000usize, 1000, 1000, 300, 40].into_iter().enumerate() {
                let (n, from) = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    peer.recv_from(&mut buf),
                )
                .await
                .unwrap_or_else(|_| panic!("{bind}: datagram {i} missing"))
                .unwrap();
                assert_eq!((n, buf[0]), (len, i as u8), "{bind}: datagram {i}");
                assert_eq!(from, SocketAddr::new(src, port), "{bind}");
            }
        }
    }
}
