use super::*;
use crate::media::{AudioInfo, VideoInfo};
use proptest::prelude::*;

fn id(n: u64) -> SubscriptionId {
    SubscriptionId(n)
}

/// An AVCDecoderConfigurationRecord around x264's High 3.1 1280x720 SPS and a PPS.
fn avcc_720p() -> Bytes {
    let sps = [
        0x67, 0x64, 0x00, 0x1f, 0xac, 0xd9, 0x40, 0x50, 0x05, 0xbb, 0x01, 0x10, 0x00, 0x00, 0x03,
        0x00, 0x10, 0x00, 0x00, 0x03, 0x03, 0xc0, 0xf1, 0x83, 0x19, 0x60,
    ];
    let mut v = vec![1, 0x64, 0x00, 0x1f, 0xff, 0xe1, 0, sps.len() as u8];
    v.extend_from_slice(&sps);
    v.extend_from_slice(&[1, 0, 4, 0x68, 0xeb, 0xe3, 0xcb]);
    Bytes::from(v)
}

fn h264() -> TrackInfo {
    TrackInfo::from_config(Codec::H264, Some(avcc_720p()))
}

fn aac() -> TrackInfo {
    TrackInfo::from_config(Codec::Aac, Some(Bytes::from_static(&[0x11, 0x90])))
}

fn one(msg: &ControlMessage) -> BytesMut {
    let mut b = BytesMut::new();
    encode_control(msg, &mut b).unwrap();
    b
}

fn decode_all(mut buf: BytesMut) -> Result<Vec<ControlMessage>, WireError> {
    let mut d = ControlDecoder::new();
    let mut out = Vec::new();
    while let Some(m) = d.decode(&mut buf)? {
        out.push(m);
    }
    d.finish(&buf)?;
    Ok(out)
}

fn samples() -> Vec<ControlMessage> {
    vec![
        ControlMessage::Hello {
            version: VERSION,
            token_proof: [7; 32],
            node_id: "edge-1".into(),
            role: "edge".into(),
        },
        ControlMessage::HelloOk {
            node_id: "origin-1".into(),
            token_proof: [9; 32],
        },
        ControlMessage::Error {
            code: ErrorCode::Unauthorized,
            reason: "bad token".into(),
        },
        ControlMessage::GoAway,
        ControlMessage::Subscribe {
            id: id(1),
            broadcast: "live/cam".into(),
        },
        ControlMessage::SubscribeOk {
            id: id(1),
            tracks: vec![
                (TrackId(0), h264()),
                (TrackId(1), aac()),
                (
                    TrackId(2),
                    TrackInfo {
                        rendition: Some("360p".into()),
                        ..h264()
                    },
                ),
            ],
            metadata: vec![
                ("width".into(), MetaValue::Number(1280.0)),
                ("stereo".into(), MetaValue::Bool(true)),
                ("encoder".into(), MetaValue::Text("obs".into())),
            ],
        },
        ControlMessage::SubscribeError {
            id: id(2),
            code: ErrorCode::NotFound,
            reason: "no such broadcast".into(),
        },
        ControlMessage::Unsubscribe { id: id(1) },
        ControlMessage::Ended { id: id(1) },
        ControlMessage::Publish {
            id: id(3),
            broadcast: "live/up".into(),
            tracks: vec![(TrackId(2), TrackInfo::from_config(Codec::Opus, None))],
            metadata: vec![],
        },
        ControlMessage::PublishOk { id: id(3) },
        ControlMessage::PublishError {
            id: id(4),
            code: ErrorCode::AlreadyLive,
            reason: "taken".into(),
        },
        ControlMessage::Announce {
            broadcast: "live/cam".into(),
        },
        ControlMessage::Unannounce {
            broadcast: "live/cam".into(),
        },
    ]
}

#[test]
fn varints_as_in_rfc9000() {
    // RFC 9000 §A.1's examples.
    for (v, bytes) in [
        (37u64, &[0x25][..]),
        (15293, &[0x7b, 0xbd]),
        (494_878_333, &[0x9d, 0x7f, 0x3e, 0x7d]),
        (
            151_288_809_941_952_652,
            &[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c],
        ),
    ] {
        let mut b = BytesMut::new();
        put_varint(&mut b, v, "test").unwrap();
        assert_eq!(&b[..], bytes);
        assert_eq!(Reader::new(bytes).varint(), Ok(v));
    }
    // A non-minimal encoding is still the value.
    assert_eq!(Reader::new(&[0x40, 0x25]).varint(), Ok(37));
    let mut b = BytesMut::new();
    assert_eq!(
        put_varint(&mut b, MAX_VARINT + 1, "x"),
        Err(WireError::ValueTooLarge("x"))
    );
    put_varint(&mut b, MAX_VARINT, "x").unwrap();
    assert_eq!(Reader::new(&b).varint(), Ok(MAX_VARINT));
}

#[test]
fn zigzag_maps_small_magnitudes_to_small_numbers() {
    for (v, z) in [
        (0i64, 0u64),
        (-1, 1),
        (1, 2),
        (-2, 3),
        (i64::MAX, u64::MAX - 1),
    ] {
        assert_eq!(zigzag(v), z);
        assert_eq!(unzigzag(z), v);
    }
    assert_eq!(unzigzag(zigzag(i64::MIN)), i64::MIN);
}

#[test]
fn subscribe_bytes() {
    let b = one(&ControlMessage::Subscribe {
        id: id(300),
        broadcast: "a/b".into(),
    });
    assert_eq!(&b[..], &[0x10, 6, 0x41, 0x2c, 3, b'a', b'/', b'b']);
}

#[test]
fn subscribe_ok_bytes() {
    let b = one(&ControlMessage::SubscribeOk {
        id: id(1),
        tracks: vec![
            (TrackId(0), TrackInfo::from_config(Codec::H264, None)),
            (TrackId(1), aac()),
        ],
        metadata: vec![("n".into(), MetaValue::Bool(false))],
    });
    #[rustfmt::skip]
    let want = [
        0x11, 18,
        1,                             // id
        2,                             // two tracks
        0, 0x01, 0, 0,                 // track 0: H.264, no config, no rendition name
        1, 0x10, 1, 2, 0x11, 0x90, 0,  // track 1: AAC, config of 2 bytes, no rendition name
        1, 1, b'n', 0x01, 0,        // metadata: "n" = false
    ];
    assert_eq!(&b[..], &want);
}

#[test]
fn every_message_round_trips() {
    for m in samples() {
        assert_eq!(decode_all(one(&m)), Ok(vec![m.clone()]), "{}", m.name());
    }
    let mut all = BytesMut::new();
    for m in samples() {
        encode_control(&m, &mut all).unwrap();
    }
    assert_eq!(decode_all(all), Ok(samples()));
}

#[test]
fn decoded_tracks_carry_the_facts_of_their_configs() {
    let m = decode_all(one(&samples()[5])).unwrap();
    let ControlMessage::SubscribeOk { tracks, .. } = &m[0] else {
        panic!("{m:?}");
    };
    let v = tracks[0].1.video.as_ref().unwrap();
    assert_eq!((v.width, v.height, v.profile.as_str()), (1280, 720, "high"));
    assert_eq!(
        tracks[1].1.audio,
        Some(AudioInfo {
            sample_rate: 48_000,
            channels: 2
        })
    );
}

#[test]
fn from_config_per_codec() {
    assert_eq!(
        h264().video,
        Some(VideoInfo {
            width: 1280,
            height: 720,
            profile: "high".into(),
            level: 31
        })
    );
    assert_eq!(TrackInfo::from_config(Codec::H264, None).video, None);
    assert_eq!(
        TrackInfo::from_config(Codec::H265, Some(avcc_720p())).video,
        None
    );
    let opus = |c: Option<Bytes>| TrackInfo::from_config(Codec::Opus, c).audio.unwrap();
    assert_eq!((opus(None).sample_rate, opus(None).channels), (48_000, 2));
    let mut head = b"OpusHead\x01\x01".to_vec();
    head.extend_from_slice(&[0; 9]);
    assert_eq!(opus(Some(Bytes::from(head))).channels, 1);
}

#[test]
fn partial_input_waits_and_consumes_nothing() {
    let full = one(&samples()[0]);
    let mut d = ControlDecoder::new();
    for n in 0..full.len() {
        let mut b = BytesMut::from(&full[..n]);
        assert_eq!(d.decode(&mut b), Ok(None));
        assert_eq!(b.len(), n);
        assert_eq!(d.finish(&b).is_err(), n > 0);
    }
}

#[test]
fn control_errors() {
    let dec = |bytes: &[u8]| ControlDecoder::new().decode(&mut BytesMut::from(bytes));
    assert_eq!(dec(&[0x7f]), Err(WireError::UnknownMessage(0x7f)));
    // Refused from the header: 65537 bytes announced, none sent.
    assert_eq!(
        dec(&[0x10, 0x80, 0x01, 0x00, 0x01]),
        Err(WireError::TooLarge {
            what: "control message",
            size: 65537,
            limit: 65536
        })
    );
    assert_eq!(dec(&[0x04, 1, 0]), Err(WireError::TrailingBytes(1)));
    assert_eq!(dec(&[0x13, 0]), Err(WireError::UnexpectedEnd));
    assert_eq!(dec(&[0x30, 2, 1, 0xff]), Err(WireError::InvalidUtf8));
    assert_eq!(
        dec(&[0x03, 2, 0x3f, 0]),
        Err(WireError::UnknownErrorCode(0x3f))
    );
    // SUBSCRIBE_OK: one track with codec 0x99.
    assert_eq!(
        dec(&[0x11, 5, 1, 1, 0, 0x99, 0]),
        Err(WireError::UnknownCodec(0x99))
    );
    // ... with a config flag of 2.
    assert_eq!(
        dec(&[0x11, 5, 1, 1, 0, 0x01, 2]),
        Err(WireError::InvalidBool(2))
    );
    // ... the same track twice.
    assert_eq!(
        dec(&[0x11, 11, 1, 2, 0, 0x01, 0, 0, 0, 0x01, 0, 0, 0]),
        Err(WireError::DuplicateTrack(0))
    );
    // ... seventeen tracks.
    assert!(matches!(
        dec(&[0x11, 2, 1, 17]),
        Err(WireError::TooLarge {
            what: "track list",
            ..
        })
    ));
    // ... metadata value of kind 9.
    assert_eq!(
        dec(&[0x11, 6, 1, 0, 1, 1, b'k', 9]),
        Err(WireError::UnknownMetaKind(9))
    );
    // A string announcing 1025 bytes.
    assert!(matches!(
        dec(&[0x30, 2, 0x44, 0x01]),
        Err(WireError::TooLarge {
            what: "broadcast name",
            size: 1025,
            ..
        })
    ));
}

#[test]
fn encoder_refuses_what_the_decoder_would_and_leaves_the_buffer() {
    let mut b = BytesMut::from(&b"keep"[..]);
    let long = "x".repeat(MAX_STRING + 1);
    let refused = [
        ControlMessage::Announce { broadcast: long },
        ControlMessage::Unsubscribe {
            id: id(MAX_VARINT + 1),
        },
        ControlMessage::SubscribeOk {
            id: id(1),
            tracks: (0..17).map(|t| (TrackId(t), aac())).collect(),
            metadata: vec![],
        },
        ControlMessage::SubscribeOk {
            id: id(1),
            tracks: vec![(TrackId(0), aac()), (TrackId(0), aac())],
            metadata: vec![],
        },
        ControlMessage::Publish {
            id: id(1),
            broadcast: "b".into(),
            tracks: vec![(
                TrackId(0),
                TrackInfo::from_config(Codec::H264, Some(Bytes::from(vec![0; MAX_CONFIG + 1]))),
            )],
            metadata: vec![],
        },
        // Each config fits, all of them together do not fit one message.
        ControlMessage::SubscribeOk {
            id: id(1),
            tracks: (0..5)
                .map(|t| {
                    let c = Bytes::from(vec![0; MAX_CONFIG]);
                    (TrackId(t), TrackInfo::from_config(Codec::Av1, Some(c)))
                })
                .collect(),
            metadata: vec![],
        },
    ];
    for m in refused {
        assert!(encode_control(&m, &mut b).is_err(), "{m:?}");
        assert_eq!(&b[..], b"keep");
    }
    let f = Frame {
        pts: 1 << 61,
        dts: 0,
        keyframe: false,
        payload: Bytes::new(),
    };
    assert_eq!(
        encode_frame_header(TrackId(0), &f, 0, &mut b),
        Err(WireError::ValueTooLarge("pts"))
    );
    assert_eq!(&b[..], b"keep");
    let f = Frame {
        pts: -(1 << 61),
        ..f
    };
    encode_frame_header(TrackId(0), &f, 0, &mut b).unwrap();
    let header = GroupHeader {
        subscription: id(0),
        sequence: GroupSeq(MAX_VARINT + 1),
    };
    let mut b = BytesMut::new();
    assert!(encode_group_header(&header, &mut b).is_err());
    assert!(b.is_empty());
}

#[test]
fn token_proofs() {
    let ctx: Vec<u8> = (0..32).collect();
    let p = token_proof(b"cluster-secret", Side::Client, &ctx);
    // HMAC-SHA256(b"cluster-secret", b"castnode-cluster/2 client\0" || ctx), from Python's hmac.
    assert_eq!(
        hex(&p),
        "dd094943656bd9bbfa2b77f8ffc4b55380a7dde3ea591f87ba2e017f1985ae2b"
    );
    assert_eq!(
        hex(&token_proof(b"cluster-secret", Side::Server, &ctx)),
        "e7d663dcaadc0574a77532a44955e378cefb07dfc2bb17ca28dc03baf61f00b5"
    );
    assert!(verify_token_proof(
        b"cluster-secret",
        Side::Client,
        &ctx,
        &p
    ));
    assert!(!verify_token_proof(
        b"cluster-secret",
        Side::Server,
        &ctx,
        &p
    ));
    assert!(!verify_token_proof(b"other", Side::Client, &ctx, &p));
    assert!(!verify_token_proof(
        b"cluster-secret",
        Side::Client,
        &ctx[1..],
        &p
    ));
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// --- group streams -------------------------------------------------------------------------

fn frame(pts: i64, dts: i64, keyframe: bool, payload: &'static [u8]) -> Frame {
    Frame {
        pts,
        dts,
        keyframe,
        payload: Bytes::from_static(payload),
    }
}

fn group_events(mut buf: BytesMut) -> Result<Vec<GroupEvent>, WireError> {
    let mut d = GroupDecoder::new();
    let mut out = Vec::new();
    while let Some(e) = d.decode(&mut buf)? {
        out.push(e);
    }
    d.finish(&buf)?;
    Ok(out)
}

#[test]
fn group_bytes() {
    let mut b = BytesMut::new();
    let h = GroupHeader {
        subscription: id(5),
        sequence: GroupSeq(70),
    };
    encode_group_header(&h, &mut b).unwrap();
    let f = frame(-1, 2, true, b"xy");
    encode_frame_header(TrackId(1), &f, 64, &mut b).unwrap();
    b.extend_from_slice(&f.payload);
    encode_config_item(TrackId(1), &aac(), &mut b).unwrap();
    #[rustfmt::skip]
    let want = [
        0x01, 5, 0x40, 70,                  // group, subscription 5, group 70
        1, 0x01, 1, 4, 0x40, 64, 2, b'x', b'y', // track 1, key, pts -1, dts 2, ingest 64, 2 bytes
        1, 0x02, 6, 0x10, 1, 2, 0x11, 0x90, 0, // track 1, config: AAC with 2 bytes, no rendition
    ];
    assert_eq!(&b[..], &want);
    assert_eq!(
        group_events(b),
        Ok(vec![
            GroupEvent::Header(h),
            GroupEvent::Frame(WireFrame {
                track: TrackId(1),
                frame: f,
                ingest_us: 64
            }),
            GroupEvent::Config {
                track: TrackId(1),
                info: Box::new(aac())
            },
        ])
    );
}

#[test]
fn frame_payload_is_split_from_the_input_not_copied() {
    let mut b = BytesMut::new();
    let h = GroupHeader {
        subscription: id(0),
        sequence: GroupSeq(0),
    };
    encode_group_header(&h, &mut b).unwrap();
    let f = Frame {
        payload: Bytes::from(vec![7; 10_000]),
        ..frame(0, 0, true, b"")
    };
    encode_frame_header(TrackId(0), &f, 1, &mut b).unwrap();
    b.extend_from_slice(&f.payload);
    let range = b.as_ptr() as usize..b.as_ptr() as usize + b.len();
    let mut d = GroupDecoder::new();
    assert!(matches!(d.decode(&mut b), Ok(Some(GroupEvent::Header(_)))));
    let Ok(Some(GroupEvent::Frame(w))) = d.decode(&mut b) else {
        panic!("no frame");
    };
    assert_eq!(w.frame, f);
    assert!(range.contains(&(w.frame.payload.as_ptr() as usize)));
    assert_eq!(d.header(), Some(h));
}

#[test]
fn group_errors() {
    let mut ok_header = BytesMut::new();
    let h = GroupHeader {
        subscription: id(1),
        sequence: GroupSeq(2),
    };
    encode_group_header(&h, &mut ok_header).unwrap();
    let dec = |item: &[u8]| {
        let mut b = ok_header.clone();
        b.extend_from_slice(item);
        group_events(b)
    };
    assert_eq!(
        GroupDecoder::new().decode(&mut BytesMut::from(&[0x02, 0, 0][..])),
        Err(WireError::UnknownStreamType(2))
    );
    assert_eq!(dec(&[0, 0x04]), Err(WireError::BadFlags(4)));
    assert_eq!(dec(&[0, 0x03]), Err(WireError::BadFlags(3)));
    // Refused from the header alone: a frame of MAX_FRAME + 1 bytes.
    assert_eq!(
        dec(&[0, 0, 0, 0, 0, 0x80, 0x80, 0x00, 0x01]),
        Err(WireError::TooLarge {
            what: "frame",
            size: MAX_FRAME as u64 + 1,
            limit: MAX_FRAME as u64
        })
    );
    // A config item with a byte after its TrackInfo.
    assert_eq!(
        dec(&[0, 0x02, 4, 0x01, 0, 0, 0]),
        Err(WireError::TrailingBytes(1))
    );
    assert_eq!(dec(&[0, 0x02, 1, 0x01]), Err(WireError::UnexpectedEnd));
    // The stream ends inside a frame, and before its header.
    assert_eq!(dec(&[0, 0, 0, 0, 0, 2, b'x']), Err(WireError::Truncated));
    assert_eq!(group_events(BytesMut::new()), Err(WireError::Truncated));
    assert_eq!(
        group_events(BytesMut::from(&[1, 0][..])),
        Err(WireError::Truncated)
    );
    assert_eq!(dec(&[]), Ok(vec![GroupEvent::Header(h)]));
}

#[test]
fn frame_too_large_is_not_encoded() {
    let f = Frame {
        payload: Bytes::from(vec![0; MAX_FRAME + 1]),
        ..frame(0, 0, false, b"")
    };
    let mut b = BytesMut::new();
    assert!(matches!(
        encode_frame_header(TrackId(0), &f, 0, &mut b),
        Err(WireError::TooLarge { what: "frame", .. })
    ));
    assert!(b.is_empty());
}

// --- properties ----------------------------------------------------------------------------

fn arb_string() -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter)
}

fn arb_id() -> impl Strategy<Value = SubscriptionId> {
    prop_oneof![0..64u64, 0..=MAX_VARINT].prop_map(SubscriptionId)
}

fn arb_codec() -> impl Strategy<Value = Codec> {
    prop::sample::select(vec![
        Codec::H264,
        Codec::H265,
        Codec::Av1,
        Codec::Aac,
        Codec::Opus,
    ])
}

fn arb_track_info() -> impl Strategy<Value = TrackInfo> {
    let config = prop_oneof![
        Just(None),
        Just(Some(avcc_720p())),
        Just(Some(Bytes::from_static(&[0x12, 0x10]))),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(|v| Some(Bytes::from(v))),
    ];
    (arb_codec(), config).prop_map(|(c, cfg)| TrackInfo::from_config(c, cfg))
}

fn arb_tracks() -> impl Strategy<Value = Vec<(TrackId, TrackInfo)>> {
    prop::collection::btree_map(any::<u8>(), arb_track_info(), 0..=MAX_TRACKS)
        .prop_map(|m| m.into_iter().map(|(t, i)| (TrackId(t), i)).collect())
}

fn arb_metadata() -> impl Strategy<Value = Metadata> {
    let value = prop_oneof![
        any::<f64>()
            .prop_filter("NaN is not equal to itself", |v| !v.is_nan())
            .prop_map(MetaValue::Number),
        any::<bool>().prop_map(MetaValue::Bool),
        arb_string().prop_map(MetaValue::Text),
    ];
    prop::collection::vec((arb_string(), value), 0..6)
}

fn arb_code() -> impl Strategy<Value = ErrorCode> {
    (1..=7u64).prop_map(|c| ErrorCode::from_code(c).unwrap())
}

fn arb_message() -> impl Strategy<Value = ControlMessage> {
    prop_oneof![
        (any::<u8>(), any::<[u8; 32]>(), arb_string(), arb_string()).prop_map(
            |(version, token_proof, node_id, role)| ControlMessage::Hello {
                version,
                token_proof,
                node_id,
                role
            }
        ),
        (arb_string(), any::<[u8; 32]>()).prop_map(|(node_id, token_proof)| {
            ControlMessage::HelloOk {
                node_id,
                token_proof,
            }
        }),
        (arb_code(), arb_string())
            .prop_map(|(code, reason)| ControlMessage::Error { code, reason }),
        Just(ControlMessage::GoAway),
        (arb_id(), arb_string())
            .prop_map(|(id, broadcast)| ControlMessage::Subscribe { id, broadcast }),
        (arb_id(), arb_tracks(), arb_metadata()).prop_map(|(id, tracks, metadata)| {
            ControlMessage::SubscribeOk {
                id,
                tracks,
                metadata,
            }
        }),
        (arb_id(), arb_code(), arb_string())
            .prop_map(|(id, code, reason)| { ControlMessage::SubscribeError { id, code, reason } }),
        arb_id().prop_map(|id| ControlMessage::Unsubscribe { id }),
        arb_id().prop_map(|id| ControlMessage::Ended { id }),
        (arb_id(), arb_string(), arb_tracks(), arb_metadata()).prop_map(
            |(id, broadcast, tracks, metadata)| ControlMessage::Publish {
                id,
                broadcast,
                tracks,
                metadata,
            }
        ),
        arb_id().prop_map(|id| ControlMessage::PublishOk { id }),
        (arb_id(), arb_code(), arb_string())
            .prop_map(|(id, code, reason)| { ControlMessage::PublishError { id, code, reason } }),
        arb_string().prop_map(|broadcast| ControlMessage::Announce { broadcast }),
        arb_string().prop_map(|broadcast| ControlMessage::Unannounce { broadcast }),
    ]
}

/// What goes on a group stream after its header.
#[derive(Clone, Debug)]
enum Item {
    Frame(WireFrame),
    Config(TrackId, TrackInfo),
}

const MAX_TIME: i64 = (1 << 61) - 1;

fn arb_item() -> impl Strategy<Value = Item> {
    let time = prop_oneof![0..10_000_000i64, -MAX_TIME - 1..=MAX_TIME];
    let frame = (
        any::<u8>(),
        time.clone(),
        time,
        any::<bool>(),
        0..=MAX_VARINT,
        prop::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(t, pts, dts, keyframe, ingest_us, payload)| {
            Item::Frame(WireFrame {
                track: TrackId(t),
                frame: Frame {
                    pts,
                    dts,
                    keyframe,
                    payload: Bytes::from(payload),
                },
                ingest_us,
            })
        });
    prop_oneof![
        4 => frame,
        1 => (any::<u8>(), arb_track_info()).prop_map(|(t, i)| Item::Config(TrackId(t), i)),
    ]
}

/// Chunk sizes to cut a byte string with; 0 is read as 1.
fn arb_cuts() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(0..40usize, 1..20)
}

/// Feeds `bytes` in chunks of the sizes in `cuts` (cycled), calling `step` after each chunk
/// until it says it has nothing more. Returns what `step` returned on the way.
fn feed<T>(
    bytes: &[u8],
    cuts: &[usize],
    mut step: impl FnMut(&mut BytesMut) -> Result<Option<T>, WireError>,
) -> (Vec<T>, Result<BytesMut, WireError>) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut rest = bytes;
    let mut cut = cuts.iter().cycle();
    while !rest.is_empty() {
        let n = (*cut.next().unwrap_or(&1)).clamp(1, rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        loop {
            match step(&mut buf) {
                Ok(Some(v)) => out.push(v),
                Ok(None) => break,
                Err(e) => return (out, Err(e)),
            }
        }
    }
    (out, Ok(buf))
}

proptest! {
    #[test]
    fn control_messages_round_trip_in_any_chunks(
        msgs in prop::collection::vec(arb_message(), 1..8),
        cuts in arb_cuts(),
    ) {
        let mut bytes = BytesMut::new();
        for m in &msgs {
            encode_control(m, &mut bytes).unwrap();
        }
        let mut d = ControlDecoder::new();
        let (got, rest) = feed(&bytes, &cuts, |b| d.decode(b));
        let rest = rest.unwrap();
        prop_assert_eq!(d.finish(&rest), Ok(()));
        prop_assert_eq!(got, msgs);
    }

    #[test]
    fn group_streams_round_trip_in_any_chunks(
        sub in arb_id(),
        seq in 0..=MAX_VARINT,
        items in prop::collection::vec(arb_item(), 0..12),
        cuts in arb_cuts(),
    ) {
        let header = GroupHeader { subscription: sub, sequence: GroupSeq(seq) };
        let mut bytes = BytesMut::new();
        encode_group_header(&header, &mut bytes).unwrap();
        let mut want = vec![GroupEvent::Header(header)];
        for item in &items {
            match item {
                Item::Frame(w) => {
                    encode_frame_header(w.track, &w.frame, w.ingest_us, &mut bytes).unwrap();
                    bytes.extend_from_slice(&w.frame.payload);
                    want.push(GroupEvent::Frame(w.clone()));
                }
                Item::Config(t, info) => {
                    encode_config_item(*t, info, &mut bytes).unwrap();
                    want.push(GroupEvent::Config { track: *t, info: Box::new(info.clone()) });
                }
            }
        }
        let mut d = GroupDecoder::new();
        let (got, rest) = feed(&bytes, &cuts, |b| d.decode(b));
        let rest = rest.unwrap();
        prop_assert_eq!(d.finish(&rest), Ok(()));
        prop_assert_eq!(got, want);
    }

    #[test]
    fn control_decoder_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..400),
        cuts in arb_cuts(),
    ) {
        let mut d = ControlDecoder::new();
        let (_, rest) = feed(&bytes, &cuts, |b| d.decode(b));
        if let Ok(rest) = rest {
            let _ = d.finish(&rest);
        }
    }

    #[test]
    fn control_decoder_never_panics_on_known_types(
        ty in prop::sample::select(vec![
            0x01u8, 0x02, 0x03, 0x04, 0x10, 0x11, 0x12, 0x13, 0x14, 0x20, 0x21, 0x22, 0x30, 0x31,
        ]),
        body in prop::collection::vec(any::<u8>(), 0..200),
        cuts in arb_cuts(),
    ) {
        // A well-framed message of a known type with a random body reaches the body parsers.
        let mut bytes = vec![ty];
        let mut len = BytesMut::new();
        put_varint(&mut len, body.len() as u64, "len").unwrap();
        bytes.extend_from_slice(&len);
        bytes.extend_from_slice(&body);
        let mut d = ControlDecoder::new();
        let _ = feed(&bytes, &cuts, |b| d.decode(b));
    }

    #[test]
    fn group_decoder_never_panics(
        with_header in any::<bool>(),
        bytes in prop::collection::vec(any::<u8>(), 0..400),
        cuts in arb_cuts(),
    ) {
        let mut input = if with_header { vec![0x01, 0, 0] } else { Vec::new() };
        input.extend_from_slice(&bytes);
        let mut d = GroupDecoder::new();
        let (_, rest) = feed(&input, &cuts, |b| d.decode(b));
        if let Ok(rest) = rest {
            let _ = d.finish(&rest);
        }
    }
}
