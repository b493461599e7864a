//! Enhanced RTMP: HEVC (FourCC `hvc1`) published with castnode's own client (FFmpeg 5.1 cannot
//! publish enhanced RTMP) is carried through the hub and read back, tag for tag, over HTTP-FLV
//! and RTMP; the API reports the codec.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use castnode::rtmp::client::ClientEvent;
use castnode::rtmp::flv::{FlvReader, TAG_VIDEO};
use common::*;

/// (hvcC config, access units as length-prefixed NAL units with a keyframe flag).
fn hevc_stream(annexb: &[u8]) -> (Bytes, Vec<(bool, Bytes)>) {
    let mut params: Vec<(u8, &[u8])> = Vec::new();
    let mut aus: Vec<(bool, BytesMut)> = Vec::new();
    let mut pending = BytesMut::new();
    for nal in castnode::codec::h264::annexb_nal_units(annexb) {
        let kind = (nal[0] >> 1) & 0x3f;
        match kind {
            32..=34 => {
                if !params.iter().any(|(k, _)| *k == kind) {
                    params.push((kind, nal));
                }
                continue;
            }
            0..=31 if nal.len() > 2 && nal[2] & 0x80 != 0 => {
                // The first slice of a picture starts a new access unit.
                aus.push((false, std::mem::take(&mut pending)));
            }
            _ => {}
        }
        if (16..=23).contains(&kind) {
            aus.last_mut().unwrap().0 = true;
        }
        let target = if kind <= 31 {
            &mut aus.last_mut().unwrap().1
        } else {
            &mut pending
        };
        target.put_u32(nal.len() as u32);
        target.put_slice(nal);
    }
    // hvcC: version 1, the SPS's profile/tier/level bytes, then the parameter set arrays.
    let sps = params.iter().find(|(k, _)| *k == 33).unwrap().1;
    let mut c = BytesMut::new();
    c.put_u8(1);
    c.put_slice(&sps[3..15]);
    c.put_slice(&[0xF0, 0x00, 0xFC, 0xFD, 0xF8, 0xF8, 0x00, 0x00, 0x0F]);
    c.put_u8(params.len() as u8);
    for (kind, nal) in &params {
        c.put_u8(0x80 | kind);
        c.put_u16(1);
        c.put_u16(nal.len() as u16);
        c.put_slice(nal);
    }
    (
        c.freeze(),
        aus.into_iter().map(|(k, b)| (k, b.freeze())).collect(),
    )
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(p) = raw.windows(2).position(|w| w == b"\r\n") {
        let Ok(len) =
            usize::from_str_radix(std::str::from_utf8(&raw[..p]).unwrap_or("x").trim(), 16)
        else {
            break;
        };
        if len == 0 || raw.len() < p + 2 + len {
            break;
        }
        out.extend_from_slice(&raw[p + 2..p + 2 + len]);
        raw = &raw[(p + 4 + len).min(raw.len())..];
    }
    out
}

#[test]
fn hevc_over_enhanced_rtmp_is_carried_through() {
    let server = Server::start(&[]);
    let (config, aus) = hevc_stream(&std::fs::read(fixture("hevc.h265")).unwrap());
    assert!(aus.len() >= 140 && aus[0].0, "{} access units", aus.len());
    let mut sent = vec![[&[0x90u8, b'h', b'v', b'c', b'1'][..], &config].concat()];
    for (key, au) in &aus {
        let b0 = 0x80 | if *key { 0x10 } else { 0x20 } | 3;
        sent.push([&[b0, b'h', b'v', b'c', b'1'][..], au].concat());
    }

    let mut publisher = RtmpClient::connect(server.rtmp_port, "hevc", true);
    // Players join before the first frame, so they see the whole stream.
    let mut flv = TcpStream::connect(("127.0.0.1", server.http_port)).unwrap();
    write!(flv, "GET /live/hevc.flv HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut rtmp = RtmpClient::connect(server.rtmp_port, "hevc", false);
    let joined = wait_until(Duration::from_secs(10), || {
        let (_, _, body) = server.get("/api/v1/broadcasts");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["broadcasts"].as_array().is_some_and(|a| {
            a.iter()
                .any(|b| b["name"] == "live/hevc" && b["players"] == 2)
        })
    });
    assert!(
        joined,
        "the two players were not counted:\n{}",
        server.log()
    );
    for (i, body) in sent.iter().enumerate() {
        publisher
            .conn
            .send_media(9, (i as u32).saturating_sub(1) * 33, &[body]);
        publisher.flush();
        std::thread::sleep(Duration::from_millis(2));
    }

    // RTMP: the video messages, in order, byte for byte.
    let mut got = Vec::new();
    while got.len() < sent.len() {
        for e in rtmp.read_events() {
            match e {
                ClientEvent::Media {
                    type_id: 9, body, ..
                } => got.push(body.to_vec()),
                ClientEvent::Ended => panic!("RTMP player ended after {} messages", got.len()),
                _ => {}
            }
        }
    }
    assert!(
        got == sent,
        "RTMP: video messages differ from those published"
    );

    // HTTP-FLV: the same tag bodies.
    flv.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 65536];
    // Reads until every video tag came (players write in batches, so the last ones may come a
    // few milliseconds after the RTMP player's), or the stream stops.
    let video_tags = |raw: &[u8]| -> Vec<Vec<u8>> {
        let Some(body_start) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
            return Vec::new();
        };
        let Some(reader) = FlvReader::new(Bytes::from(dechunk(&raw[body_start + 4..]))) else {
            return Vec::new();
        };
        reader
            .filter(|t| t.tag_type == TAG_VIDEO)
            .map(|t| t.body.to_vec())
            .collect()
    };
    let mut tags = Vec::new();
    while tags.len() < sent.len() {
        match flv.read(&mut buf) {
            Ok(n) if n > 0 => raw.extend_from_slice(&buf[..n]),
            _ => break,
        }
        tags = video_tags(&raw);
    }
    assert_eq!(
        tags.len(),
        sent.len(),
        "HTTP-FLV: {} video tags",
        tags.len()
    );
    assert!(
        tags == sent,
        "HTTP-FLV: video tags differ from those published"
    );

    let (_, _, api) = server.get("/api/v1/broadcasts");
    let v: serde_json::Value = serde_json::from_str(&api).unwrap();
    assert_eq!(v["broadcasts"][0]["tracks"][0]["codec"], "h265");
    println!(
        "{} HEVC access units carried byte-identical over RTMP and HTTP-FLV",
        aus.len()
    );
}
