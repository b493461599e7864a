//! Two sessions connected in memory: quinn-proto endpoints exchanging datagrams through a
//! simulated network (latency, loss, reordering, a cut) on a virtual clock. No socket, no
//! sleep: a second of the protocol runs in milliseconds.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn_proto::{ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig};

use super::*;
use crate::cluster::groups::GROUP_STALL;
use crate::cluster::tls::{self, TlsFiles};
use crate::cluster::wire::{GroupHeader, GroupSeq};
use crate::media::hub::testing::track;
use crate::media::{BroadcastProducer, Codec, Frame, Hub, Item};

const NO_FILES: TlsFiles = TlsFiles {
    cert: None,
    key: None,
    ca: None,
};

/// What a test sees of a session's events (the requests are answered as a node would).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Ready(String),
    Failed(String),
    Subscribe(u64),
    Publish(u64),
    SubscribeOk(u64),
    SubscribeError(u64, ErrorCode),
    PublishOk(u64),
    PublishError(u64, ErrorCode),
    /// A received flow ended: with or without its producer.
    InEnded(u64, FlowEnd, bool),
    OutEnded(u64, FlowEnd),
    Closed,
}

/// One end: an endpoint, its sessions, and a hub it answers requests from.
struct End {
    endpoint: Endpoint,
    addr: SocketAddr,
    hub: Hub,
    config: Arc<SessionConfig>,
    sessions: HashMap<ConnectionHandle, Session>,
    seen: Vec<Seen>,
    /// Sinks and consumers given back.
    sinks: Vec<Sink>,
    consumers: Vec<BroadcastConsumer>,
    /// Readers of broadcasts that arrived here, attached before their first frame.
    readers: Vec<BroadcastConsumer>,
    /// What they read: (track, dts in ms).
    got: Vec<(u8, i64)>,
}

impl End {
    fn new(server: bool, token: &str, port: u16) -> Self {
        let server =
            server.then(|| Arc::new(tls::server_config("test", &NO_FILES).expect("server config")));
        Self {
            endpoint: Endpoint::new(Arc::new(EndpointConfig::default()), server, true, None),
            addr: SocketAddr::from(([10, 0, 0, (port % 250) as u8], port)),
            hub: Hub::default(),
            config: Arc::new(SessionConfig {
                token: token.as_bytes().to_vec(),
                node_id: format!("node-{port}"),
                role: "test".into(),
                stats: Arc::new(ClusterStats::default()),
            }),
            sessions: HashMap::new(),
            seen: Vec::new(),
            sinks: Vec::new(),
            consumers: Vec::new(),
            readers: Vec::new(),
            got: Vec::new(),
        }
    }

    fn session(&mut self) -> &mut Session {
        self.sessions.values_mut().next().expect("a session")
    }

    /// Timers, events, answers and datagrams out of every session.
    fn service(&mut self, now: Instant, out: &mut Vec<(SocketAddr, Bytes)>) {
        let mut buf = Vec::new();
        for (ch, s) in self.sessions.iter_mut() {
            s.handle_timeout(now);
            while let Some(ev) = s.poll_endpoint_event() {
                if let Some(back) = self.endpoint.handle_event(*ch, ev) {
                    s.handle_event(back);
                }
            }
            s.process(now);
            s.pump_all();
            while let Some(ev) = s.poll_event() {
                let seen = answer(
                    &self.hub,
                    s,
                    ev,
                    now,
                    &mut self.sinks,
                    &mut self.consumers,
                    &mut self.readers,
                );
                self.seen.push(seen);
            }
            loop {
                buf.clear();
                let Some(t) = s.poll_transmit(now, 10, &mut buf) else {
                    break;
                };
                let seg = t.segment_size.unwrap_or(t.size);
                for d in buf[..t.size].chunks(seg) {
                    out.push((t.destination, Bytes::copy_from_slice(d)));
                }
            }
        }
    }

    fn deliver(
        &mut self,
        now: Instant,
        from: SocketAddr,
        data: Bytes,
        out: &mut Vec<(SocketAddr, Bytes)>,
    ) {
        let mut buf = Vec::new();
        match self
            .endpoint
            .handle(now, from, None, None, BytesMut::from(&data[..]), &mut buf)
        {
            Some(DatagramEvent::NewConnection(incoming)) => {
                buf.clear();
                if let Ok((ch, conn)) = self.endpoint.accept(incoming, now, &mut buf, None) {
                    self.sessions
                        .insert(ch, Session::server(conn, self.config.clone(), now));
                }
            }
            Some(DatagramEvent::ConnectionEvent(ch, ev)) => {
                if let Some(s) = self.sessions.get_mut(&ch) {
                    s.handle_event(ev);
                }
            }
            Some(DatagramEvent::Response(t)) => {
                out.push((t.destination, Bytes::copy_from_slice(&buf[..t.size])));
            }
            None => {}
        }
    }

    fn next_timeout(&mut self) -> Option<Instant> {
        self.sessions
            .values_mut()
            .filter_map(|s| s.poll_timeout())
            .min()
    }

    /// What the readers of this end's broadcasts read so far, as (track, dts in ms). They read
    /// at every step, as a player would (a reader that waits joins at the newest group).
    fn read(&mut self) -> Vec<(u8, i64)> {
        self.take_reads();
        self.got.clone()
    }

    fn take_reads(&mut self) {
        let mut entries = Vec::new();
        for r in &mut self.readers {
            while let ReadOutcome::Read(n) = r.read(&mut entries, 1024) {
                if n == 0 {
                    break;
                }
            }
        }
        for e in &entries {
            if let Item::Frame { track, frame } = &e.item {
                self.got.push((track.0, frame.dts / 1000));
            }
        }
    }
}

/// Answers a session's event as a node does ([`super::super::driver`]): SUBSCRIBE from the
/// hub, PUBLISH into it, SUBSCRIBE_OK into a new producer (or the sink's, after a failover).
fn answer(
    hub: &Hub,
    s: &mut Session,
    ev: SessionEvent,
    now: Instant,
    sinks: &mut Vec<Sink>,
    consumers: &mut Vec<BroadcastConsumer>,
    readers: &mut Vec<BroadcastConsumer>,
) -> Seen {
    match ev {
        SessionEvent::Ready { peer } => Seen::Ready(peer),
        SessionEvent::Failed(e) => Seen::Failed(e.to_string()),
        SessionEvent::Subscribe { id, broadcast } => {
            match hub.subscribe_as(&broadcast, crate::media::ConsumerKind::Node) {
                Some(c) => {
                    let _ = s.serve(id, c);
                }
                None => s.not_found(id, &broadcast),
            }
            Seen::Subscribe(id)
        }
        SessionEvent::Publish {
            id,
            broadcast,
            tracks,
            ..
        } => {
            if tracks.iter().all(|(t, _)| t.is_ladder()) {
                // A transcoder's ladder, as the driver takes it (`driver.rs`).
                let mut ladder = hub.ladder_writer(&broadcast, "peer").expect("live");
                for (t, info) in tracks {
                    ladder.set_track(t, info);
                }
                if let Some(sink) = s.sink_mut(id) {
                    sink.ladder = Some(ladder);
                }
                s.feed(id, None, now);
                return Seen::Publish(id);
            }
            let mut p = hub.publish(&broadcast, now).expect("publish");
            for (t, info) in tracks {
                p.set_track(t, info);
            }
            readers.extend(hub.subscribe(&broadcast));
            s.feed(id, Some(p), now);
            Seen::Publish(id)
        }
        SessionEvent::SubscribeOk {
            id,
            broadcast,
            tracks,
            ..
        } => {
            let kept = s.sink_mut(id).is_some_and(|k| k.producer.is_some());
            let fresh = (!kept).then(|| {
                let mut p = hub.publish(&broadcast, now).expect("publish");
                for (t, info) in tracks {
                    p.set_track(t, info);
                }
                readers.extend(hub.subscribe(&broadcast));
                p
            });
            s.feed(id, fresh, now);
            Seen::SubscribeOk(id)
        }
        SessionEvent::SubscribeError { id, code, .. } => Seen::SubscribeError(id, code),
        SessionEvent::PublishOk { id } => Seen::PublishOk(id),
        SessionEvent::PublishError { id, code, .. } => Seen::PublishError(id, code),
        SessionEvent::InEnded { id, sink, end } => {
            let has = sink.producer.is_some();
            sinks.push(sink);
            Seen::InEnded(id, end, has)
        }
        SessionEvent::OutEnded { id, consumer, end } => {
            consumers.push(consumer);
            Seen::OutEnded(id, end)
        }
        SessionEvent::Closed { .. } => Seen::Closed,
    }
}

/// A client and a server joined by a simulated network.
struct Net {
    now: Instant,
    client: End,
    server: End,
    /// Datagrams on their way: arrival, towards the server, from, bytes.
    wire: Vec<(Instant, bool, SocketAddr, Bytes)>,
    /// One-way delay.
    latency: Duration,
    /// Whether the datagram numbered so is lost.
    lose: Box<dyn FnMut(u64) -> bool>,
    sent: u64,
    /// Datagrams due at once are delivered in reverse order.
    reorder: bool,
}

impl Net {
    fn new(client_token: &str, server_token: &str) -> Self {
        Self {
            now: Instant::now(),
            client: End::new(false, client_token, 5000),
            server: End::new(true, server_token, 4433),
            wire: Vec::new(),
            latency: Duration::from_millis(5),
            lose: Box::new(|_| false),
            sent: 0,
            reorder: false,
        }
    }

    /// Opens a connection from the client and runs until both ends are ready (or `limit`).
    fn connect(&mut self) {
        let config = tls::client_config(&NO_FILES).expect("client config");
        let (ch, conn) = self
            .client
            .endpoint
            .connect(self.now, config, self.server.addr, "castnode")
            .expect("connect");
        let session = Session::client(conn, self.client.config.clone(), self.now);
        self.client.sessions.insert(ch, session);
        self.run(Duration::from_millis(100));
    }

    /// Both ends' timers and output, then what arrived by now, until nothing moves at this
    /// instant.
    fn step(&mut self) {
        for _ in 0..1000 {
            let mut out = Vec::new();
            self.client.service(self.now, &mut out);
            self.send(false, &mut out);
            self.server.service(self.now, &mut out);
            self.send(true, &mut out);
            self.client.take_reads();
            self.server.take_reads();
            let (mut due, rest): (Vec<_>, Vec<_>) =
                self.wire.drain(..).partition(|(t, ..)| *t <= self.now);
            self.wire = rest;
            if due.is_empty() {
                return;
            }
            if self.reorder {
                due.reverse();
            }
            for (_, to_server, from, data) in due {
                let end = if to_server {
                    &mut self.server
                } else {
                    &mut self.client
                };
                end.deliver(self.now, from, data, &mut out);
                self.send(!to_server, &mut out);
            }
        }
    }

    fn send(&mut self, from_server: bool, out: &mut Vec<(SocketAddr, Bytes)>) {
        let from = if from_server {
            self.server.addr
        } else {
            self.client.addr
        };
        for (_, d) in out.drain(..) {
            self.sent += 1;
            if (self.lose)(self.sent) {
                continue;
            }
            self.wire
                .push((self.now + self.latency, !from_server, from, d));
        }
    }

    /// Runs the virtual clock forward by `d`, from deadline to deadline.
    fn run(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            self.step();
            let next = [
                self.client.next_timeout(),
                self.server.next_timeout(),
                self.wire.iter().map(|(t, ..)| *t).min(),
            ]
            .into_iter()
            .flatten()
            .min();
            let next = next.map_or(end, |t| t.min(end));
            if self.now >= end {
                return;
            }
            self.now = next.max(self.now + Duration::from_micros(100));
        }
    }
}

/// A frame of `len` bytes at `ms`.
fn frame(ms: i64, key: bool, len: usize) -> Frame {
    Frame {
        pts: ms * 1000,
        dts: ms * 1000,
        keyframe: key,
        payload: Bytes::from(vec![(ms % 251) as u8; len]),
    }
}

/// A live broadcast with a video and an audio track.
fn broadcast(hub: &Hub, name: &str) -> BroadcastProducer {
    let mut p = hub.publish(name, Instant::now()).expect("publish");
    p.set_track(TrackId(0), track(Codec::H264));
    p.set_track(TrackId(1), track(Codec::Aac));
    p
}

/// One GOP from `ms`: 10 video frames 33 ms apart (a big keyframe first) with audio between;
/// what was pushed, as (track, ms).
fn gop(p: &mut BroadcastProducer, ms: i64, keyframe_len: usize) -> Vec<(u8, i64)> {
    let mut pushed = Vec::new();
    for i in 0..10 {
        let t = ms + i * 33;
        p.push(
            TrackId(0),
            frame(t, i == 0, if i == 0 { keyframe_len } else { 900 }),
        );
        pushed.push((0, t));
        p.push(TrackId(1), frame(t + 1, true, 200));
        pushed.push((1, t + 1));
    }
    pushed
}

#[test]
fn hello_then_a_subscription_carries_every_frame_in_order_until_the_end() {
    let mut net = Net::new("secret", "secret");
    net.connect();
    assert_eq!(net.client.seen, [Seen::Ready("node-4433".into())]);
    assert_eq!(net.server.seen, [Seen::Ready("node-5000".into())]);
    let mut p = broadcast(&net.server.hub, "live/a");
    net.client
        .session()
        .subscribe(1, "live/a", Sink::new(None), net.now);
    net.run(Duration::from_millis(50));
    assert!(net.server.seen.contains(&Seen::Subscribe(1)));
    assert!(net.client.seen.contains(&Seen::SubscribeOk(1)));
    let mut pushed = Vec::new();
    for g in 0..3 {
        pushed.extend(gop(&mut p, g * 330, 20_000));
        net.run(Duration::from_millis(330));
    }
    assert_eq!(net.client.read(), pushed);
    let stats = &net.client.config.stats;
    assert!(stats.bytes_in.load(Relaxed) > 60_000);
    assert_eq!(stats.groups_reset.load(Relaxed), 0);
    // The broadcast ends at the origin: ENDED, and the sink (with its producer) comes back.
    drop(p);
    net.server.hub.reap(net.now + Duration::from_secs(3600));
    net.run(Duration::from_millis(50));
    assert!(
        net.server.seen.contains(&Seen::OutEnded(1, FlowEnd::Ended)),
        "{:?}",
        net.server.seen
    );
    assert!(
        net.client
            .seen
            .contains(&Seen::InEnded(1, FlowEnd::Ended, true)),
        "{:?}",
        net.client.seen
    );
}

#[test]
fn an_unknown_broadcast_is_refused_and_a_wrong_token_too() {
    let mut net = Net::new("secret", "secret");
    net.connect();
    net.client
        .session()
        .subscribe(7, "live/none", Sink::new(None), net.now);
    net.run(Duration::from_millis(50));
    assert_eq!(
        net.client.seen[1..],
        [
            Seen::SubscribeError(7, ErrorCode::NotFound),
            Seen::InEnded(7, FlowEnd::Stopped, false)
        ]
    );

    let mut net = Net::new("guess", "secret");
    net.connect();
    assert_eq!(net.server.config.stats.refused.load(Relaxed), 1);
    assert!(
        matches!(&net.client.seen[0], Seen::Failed(why) if why.contains("Unauthorized")),
        "{:?}",
        net.client.seen
    );
    assert!(!net.server.seen.iter().any(|s| matches!(s, Seen::Ready(_))));
    net.run(Duration::from_secs(2));
    assert!(net.client.sessions.values().all(|s| s.is_drained()));
}

#[test]
fn a_publication_from_the_client_lands_in_the_servers_hub() {
    let mut net = Net::new("secret", "secret");
    net.connect();
    let mut p = broadcast(&net.client.hub, "live/up");
    let consumer = net.client.hub.subscribe("live/up").unwrap();
    net.client.session().publish(3, consumer, false);
    net.run(Duration::from_millis(50));
    assert!(net.server.seen.contains(&Seen::Publish(3)));
    assert!(net.client.seen.contains(&Seen::PublishOk(3)));
    let mut pushed = Vec::new();
    for g in 0..2 {
        pushed.extend(gop(&mut p, g * 330, 5_000));
        net.run(Duration::from_millis(330));
    }
    assert_eq!(net.server.read(), pushed);
    assert!(net.server.hub.subscribe("live/up").is_some());
}

/// A transcoder's publication: only the ladder's rungs go, and they join the server's live
/// broadcast of that name (the server's own source untouched); unpublishing withdraws them.
#[test]
fn a_ladder_publication_adds_its_rungs_to_the_servers_live_broadcast() {
    let mut net = Net::new("secret", "secret");
    net.connect();
    let mut origin = broadcast(&net.server.hub, "live/abr");
    net.server
        .readers
        .extend(net.server.hub.subscribe("live/abr"));
    // The transcoder's copy of the source, with two rungs made there.
    let mut copy = broadcast(&net.client.hub, "live/abr");
    let bc = copy.broadcast().clone();
    let rung = |name: &str| TrackInfo {
        rendition: Some(name.into()),
        ..track(Codec::H264)
    };
    let mut r360 = bc
        .add_ladder_rendition(&net.client.hub, rung("360p"))
        .unwrap();
    let mut r240 = bc
        .add_ladder_rendition(&net.client.hub, rung("240p"))
        .unwrap();
    let consumer = net.client.hub.subscribe("live/abr").unwrap();
    net.client.session().publish(4, consumer, true);
    net.run(Duration::from_millis(50));
    assert!(net.server.seen.contains(&Seen::Publish(4)));
    assert!(net.client.seen.contains(&Seen::PublishOk(4)));
    let server_bc = net
        .server
        .hub
        .subscribe("live/abr")
        .unwrap()
        .broadcast()
        .clone();
    assert_eq!(server_bc.ladder_from().as_deref(), Some("peer"));
    let mut want = Vec::new();
    for g in 0..2 {
        let ms = g * 330;
        want.extend(gop(&mut origin, ms, 5_000));
        // The transcoder's source copy goes nowhere; its rungs follow it, keyframe first.
        gop(&mut copy, ms, 5_000);
        for i in 0..10 {
            r360.push(frame(ms + i * 33, i == 0, 300));
            r240.push(frame(ms + i * 33, i == 0, 200));
            want.push((2, ms + i * 33));
            want.push((3, ms + i * 33));
        }
        net.run(Duration::from_millis(330));
    }
    let mut got = net.server.read();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want);
    let names: Vec<Option<String>> = server_bc
        .renditions()
        .iter()
        .map(|(_, t)| t.rendition.as_deref().map(str::to_owned))
        .collect();
    assert_eq!(names, [Some("360p".into()), Some("240p".into())]);

    net.client.session().unpublish(4);
    net.run(Duration::from_millis(50));
    assert!(net.client.seen.contains(&Seen::OutEnded(4, FlowEnd::Ended)));
    assert!(
        net.server
            .seen
            .contains(&Seen::InEnded(4, FlowEnd::Ended, false))
    );
    // The driver drops an ended publication's sink; so does this test.
    net.server.sinks.clear();
    assert!(server_bc.renditions().is_empty());
    assert_eq!(server_bc.ladder_from(), None);
    assert!(server_bc.is_live(), "the source goes on");
}

#[test]
fn loss_and_reordering_still_deliver_every_frame_in_order() {
    let mut net = Net::new("secret", "secret");
    net.connect();
    let mut p = broadcast(&net.server.hub, "live/l");
    // One datagram in seven is lost, both ways; datagrams due together arrive reversed.
    net.lose = Box::new(|n| n % 7 == 0);
    net.reorder = true;
    net.latency = Duration::from_millis(20);
    net.client
        .session()
        .subscribe(1, "live/l", Sink::new(None), net.now);
    net.run(Duration::from_secs(1));
    assert!(
        net.client.seen.contains(&Seen::SubscribeOk(1)),
        "{:?}",
        net.client.seen
    );
    let mut pushed = Vec::new();
    for g in 0..4 {
        pushed.extend(gop(&mut p, g * 330, 30_000));
        net.run(Duration::from_millis(330));
    }
    net.run(Duration::from_millis(500));
    assert_eq!(net.client.read(), pushed);
}

#[test]
fn a_group_two_back_is_reset_and_the_receiver_goes_on_with_the_newer_ones() {
    let mut net = Net::new("secret", "secret");
    net.connect();
    let mut p = broadcast(&net.server.hub, "live/r");
    net.client
        .session()
        .subscribe(1, "live/r", Sink::new(None), net.now);
    net.run(Duration::from_millis(50));
    // The link is cut while three groups start: when the third starts, the first (not
    // received yet) is reset; then the link is back.
    net.lose = Box::new(|_| true);
    let mut pushed = Vec::new();
    for g in 0..3 {
        pushed.extend(gop(&mut p, g * 330, 200_000));
        net.run(Duration::from_millis(10));
    }
    net.lose = Box::new(|_| false);
    net.run(Duration::from_secs(2));
    let got = net.client.read();
    let resets = net.server.config.stats.groups_reset.load(Relaxed);
    assert_eq!(resets, 1, "{:?}", net.client.read());
    // The newest group whole; before it, frames of the older groups in order (the first was
    // reset; the second may have stalled behind the retransmissions); nothing twice.
    assert!(got.ends_with(&pushed[40..]), "{got:?}");
    let at: Vec<usize> = got
        .iter()
        .map(|f| pushed.iter().position(|p| p == f).expect("a frame pushed"))
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{got:?}");
}

#[test]
fn a_stalled_group_is_dropped_when_a_newer_one_waits() {
    let mut net = Net::new("secret", "secret");
    net.connect();
    // The client publishes an empty broadcast, then writes two groups by hand: the first stops
    // in the middle of a frame, the second is whole.
    let p = broadcast(&net.client.hub, "live/s");
    let consumer = net.client.hub.subscribe("live/s").unwrap();
    net.client.session().publish(9, consumer, false);
    net.run(Duration::from_millis(50));
    assert!(net.client.seen.contains(&Seen::PublishOk(9)));
    let group = |seq: u64, ms: i64, cut: usize| {
        let mut b = BytesMut::new();
        let header = GroupHeader {
            subscription: SubscriptionId(9),
            sequence: GroupSeq(seq),
        };
        wire::encode_group_header(&header, &mut b).unwrap();
        let f = frame(ms, true, 1000);
        wire::encode_frame_header(TrackId(0), &f, 0, &mut b).unwrap();
        b.extend_from_slice(&f.payload[..1000 - cut]);
        b.freeze()
    };
    let conn = net.client.session().conn_mut();
    let first = conn.streams().open(Dir::Uni).unwrap();
    conn.send_stream(first).write(&group(0, 0, 10)).unwrap();
    let second = conn.streams().open(Dir::Uni).unwrap();
    conn.send_stream(second).write(&group(1, 500, 0)).unwrap();
    conn.send_stream(second).finish().unwrap();
    net.run(Duration::from_millis(100));
    assert_eq!(net.server.read(), [], "the first group is still current");
    net.run(GROUP_STALL);
    assert_eq!(net.server.read(), [(0, 500)]);
    assert_eq!(net.server.config.stats.groups_reset.load(Relaxed), 1);
    drop(p);
}

#[test]
fn a_peer_that_stops_answering_gives_every_flow_back() {
    let mut net = Net::new("secret", "secret");
    net.connect();
    let mut p = broadcast(&net.server.hub, "live/d");
    let mut up = broadcast(&net.client.hub, "live/u");
    net.client
        .session()
        .subscribe(1, "live/d", Sink::new(None), net.now);
    let consumer = net.client.hub.subscribe("live/u").unwrap();
    net.client.session().publish(2, consumer, false);
    net.run(Duration::from_millis(50));
    gop(&mut p, 0, 5_000);
    gop(&mut up, 0, 5_000);
    net.run(Duration::from_millis(330));
    // Everything is lost from now on: the idle timeout (750 ms) ends the connection at both
    // ends, and each flow's sink or consumer comes back for a failover.
    net.lose = Box::new(|_| true);
    net.run(Duration::from_secs(2));
    for end in [&net.client, &net.server] {
        assert_eq!(end.seen.last(), Some(&Seen::Closed), "{:?}", end.seen);
    }
    assert!(
        net.client
            .seen
            .contains(&Seen::InEnded(1, FlowEnd::Lost, true))
    );
    assert!(net.client.seen.contains(&Seen::OutEnded(2, FlowEnd::Lost)));
    assert!(net.server.seen.contains(&Seen::OutEnded(1, FlowEnd::Lost)));
    assert!(
        net.server
            .seen
            .contains(&Seen::InEnded(2, FlowEnd::Lost, true))
    );
    // The producer given back still feeds the client's hub: its broadcast is live.
    assert!(
        net.client.sinks[0]
            .producer
            .as_ref()
            .is_some_and(|p| p.broadcast().is_live())
    );
    assert_eq!(net.client.consumers.len(), 1);
}

#[test]
fn a_malformed_control_message_closes_only_that_connection() {
    let mut net = Net::new("secret", "secret");
    net.connect();
    // An unknown message type on the control stream (stream 0, the client's first).
    let conn = net.client.session().conn_mut();
    conn.send_stream(quinn_proto::StreamId::new(
        quinn_proto::Side::Client,
        Dir::Bi,
        0,
    ))
    .write(&[0x7f, 0x00])
    .unwrap();
    net.run(Duration::from_millis(200));
    assert_eq!(
        net.server.seen.last(),
        Some(&Seen::Closed),
        "{:?}",
        net.server.seen
    );
    assert_eq!(
        net.client.seen.last(),
        Some(&Seen::Closed),
        "{:?}",
        net.client.seen
    );
}

#[test]
fn ladder_rungs_travel_with_the_broadcast_and_a_nodes_own_renditions_do_not() {
    let mut net = Net::new("secret", "secret");
    net.connect();
    let mut p = broadcast(&net.server.hub, "live/abr");
    let bc = p.broadcast().clone();
    let rung = TrackInfo {
        rendition: Some("360p".into()),
        ..track(Codec::H264)
    };
    let mut ladder = bc.add_ladder_rendition(&net.server.hub, rung).unwrap();
    let mut opus = bc.add_rendition(&net.server.hub, track(Codec::Opus));
    net.client
        .session()
        .subscribe(1, "live/abr", Sink::new(None), net.now);
    net.run(Duration::from_millis(50));
    let mut pushed = Vec::new();
    for i in 0..10 {
        let ms = i * 33;
        p.push(TrackId(0), frame(ms, i == 0, 500));
        pushed.push((0, ms));
        ladder.push(frame(ms, i == 0, 100));
        pushed.push((ladder.track().0, ms));
        opus.push(frame(ms, true, 50));
        net.run(Duration::from_millis(33));
    }
    assert_eq!(net.client.read(), pushed);
    let fetched = net.client.hub.subscribe("live/abr").unwrap();
    let tracks = fetched.broadcast().tracks();
    let names: Vec<(u8, Option<&str>)> = tracks
        .iter()
        .map(|(t, i)| (t.0, i.rendition.as_deref()))
        .collect();
    assert_eq!(names, [(0, None), (1, None), (2, Some("360p"))]);
}
