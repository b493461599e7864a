//! The RTCP a WebRTC media sender needs (RFC 3550, RFC 4585, RFC 5104): reading a viewer's
//! feedback, writing sender reports.
//!
//! Guarantees: [`parse`] reads a compound (or reduced-size, RFC 5506) packet that has already
//! been authenticated and decrypted, never panics, never allocates beyond the caller's output
//! vector, and skips what it does not use (SDES, BYE, APP) or cannot read. What it reads:
//! NACK, PLI, FIR, the report blocks of receiver and sender reports (loss, jitter, LSR/DLSR for
//! the round-trip time), REMB (draft-alvestrand-rmcat-remb) and transport-wide congestion
//! control feedback (draft-holmer-rmcat-transport-wide-cc-extensions-01), the last as a range of
//! the input that [`transport_cc`] walks without allocating. [`sender_report`] writes an SR with
//! an SDES CNAME, the compound a receiver needs to map RTP timestamps to wall-clock time (lip
//! sync).

/// Feedback from a receiver about one of our streams (`ssrc` is the media source).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Feedback {
    /// Generic NACK (RFC 4585 §6.2.1): packet `pid` and those of `blp`'s set bits
    /// (bit i: `pid + i + 1`) were lost.
    Nack {
        /// The media stream.
        ssrc: u32,
        /// The first lost sequence number.
        pid: u16,
        /// Bitmask of the following 16 lost ones.
        blp: u16,
    },
    /// Picture loss indication (RFC 4585 §6.3.1).
    Pli {
        /// The media stream.
        ssrc: u32,
    },
    /// Full intra request (RFC 5104 §4.3.1).
    Fir {
        /// The media stream.
        ssrc: u32,
    },
    /// A report block of a receiver (or sender) report (RFC 3550 §6.4.1).
    Report {
        /// The media stream reported on.
        ssrc: u32,
        /// Fraction of its packets lost since the previous report, in 1/256.
        fraction_lost: u8,
        /// Interarrival jitter, in the stream's RTP clock units.
        jitter: u32,
        /// The middle 32 bits of the NTP time of the last sender report received (0: none).
        lsr: u32,
        /// Delay since that sender report, in 1/65536 s.
        dlsr: u32,
    },
    /// Receiver estimated maximum bitrate (draft-alvestrand-rmcat-remb), bits per second.
    Remb {
        /// The estimate.
        bps: u64,
    },
    /// Transport-wide congestion control feedback: the whole RTCP packet is `buf[start..end]`
    /// of the parsed buffer, for [`transport_cc`].
    TransportCc {
        /// Where the packet starts in the parsed buffer.
        start: usize,
        /// Where it ends.
        end: usize,
    },
}

impl Feedback {
    /// The sequence numbers a NACK names, in order.
    pub(crate) fn nacked(pid: u16, blp: u16) -> impl Iterator<Item = u16> {
        std::iter::once(pid).chain(
            (0..16)
                .filter(move |i| blp & (1 << i) != 0)
                .map(move |i| pid.wrapping_add(i + 1)),
        )
    }
}

/// Appends the feedback of a plain compound RTCP packet to `out`.
pub(crate) fn parse(buf: &[u8], out: &mut Vec<Feedback>) {
    let mut at = 0;
    while buf.len() >= at + 4 {
        let rest = &buf[at..];
        if rest[0] >> 6 != 2 {
            return;
        }
        let count = rest[0] & 0x1f;
        let kind = rest[1];
        let len = (usize::from(u16::from_be_bytes([rest[2], rest[3]])) + 1) * 4;
        let Some(packet) = rest.get(..len) else {
            return;
        };
        let start = at;
        at += len;
        // Receiver report: header (4), sender SSRC (4), blocks; a sender report has 20 bytes of
        // sender info before its blocks.
        if kind == 200 || kind == 201 {
            let first = if kind == 200 { 28 } else { 8 };
            let blocks = packet.get(first..).unwrap_or_default();
            for b in blocks.chunks_exact(24).take(usize::from(count)) {
                let word = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
                out.push(Feedback::Report {
                    ssrc: word(0),
                    fraction_lost: b[4],
                    jitter: word(12),
                    lsr: word(16),
                    dlsr: word(20),
                });
            }
            continue;
        }
        // Feedback: header (4), sender SSRC (4), media SSRC (4), then the FCI.
        if packet.len() < 12 {
            continue;
        }
        let media = u32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
        let fci = &packet[12..];
        match (kind, count) {
            // RTPFB, generic NACK: entries of PID (2) and BLP (2).
            (205, 1) => {
                for e in fci.chunks_exact(4) {
                    out.push(Feedback::Nack {
                        ssrc: media,
                        pid: u16::from_be_bytes([e[0], e[1]]),
                        blp: u16::from_be_bytes([e[2], e[3]]),
                    });
                }
            }
            // RTPFB, transport-wide CC: read by `transport_cc` when wanted.
            (205, 15) => out.push(Feedback::TransportCc {
                start,
                end: start + len,
            }),
            // PSFB, PLI.
            (206, 1) => out.push(Feedback::Pli { ssrc: media }),
            // PSFB, FIR: entries of SSRC (4), seq (1), reserved (3); the media SSRC field is 0.
            (206, 4) => {
                for e in fci.chunks_exact(8) {
                    out.push(Feedback::Fir {
                        ssrc: u32::from_be_bytes([e[0], e[1], e[2], e[3]]),
                    });
                }
            }
            // PSFB, application layer: REMB is "REMB", SSRC count (1), exponent (6 bits) and
            // mantissa (18 bits), then the SSRCs.
            (206, 15) if fci.len() >= 8 && &fci[..4] == b"REMB" => {
                let exp = u32::from(fci[5] >> 2);
                let mantissa = u64::from(u32::from_be_bytes([0, fci[5] & 3, fci[6], fci[7]]));
                let bps = mantissa.checked_shl(exp).filter(|b| b >> exp == mantissa);
                out.push(Feedback::Remb {
                    bps: bps.unwrap_or(u64::MAX),
                });
            }
            _ => {}
        }
    }
}

/// Walks a transport-wide CC feedback packet (the whole RTCP packet, as
/// [`Feedback::TransportCc`] locates it): `f(sequence number, arrival)` for every packet it
/// reports, in order, the arrival in microseconds on the receiver's clock (its reference time
/// plus the deltas; only differences mean anything) or `None` for a packet not received. False
/// when the packet is malformed; what came before the fault has been passed on.
pub(crate) fn transport_cc(packet: &[u8], mut f: impl FnMut(u16, Option<i64>)) -> bool {
    if packet.len() < 20 {
        return false;
    }
    let base = u16::from_be_bytes([packet[12], packet[13]]);
    let count = usize::from(u16::from_be_bytes([packet[14], packet[15]]));
    // Reference time: 24 bits, signed, in 64 ms.
    let reference = i32::from_be_bytes([packet[16], packet[17], packet[18], 0]) >> 8;
    let mut arrival = i64::from(reference) * 64_000;
    let body = &packet[20..];
    let chunk = |i: usize| {
        body.get(2 * i..2 * i + 2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
    };
    // Status chunks first, then the receive deltas: find where the deltas start.
    let (mut chunks, mut covered) = (0, 0);
    while covered < count {
        let Some(c) = chunk(chunks) else {
            return false;
        };
        covered += chunk_len(c);
        chunks += 1;
    }
    let mut deltas = &body[2 * chunks..];
    let (mut seq, mut left) = (base, count);
    for i in 0..chunks {
        let c = chunk(i).unwrap_or_default();
        for j in 0..chunk_len(c).min(left) {
            let delta = match chunk_symbol(c, j) {
                0 => None,
                1 => {
                    let Some((&d, rest)) = deltas.split_first() else {
                        return false;
                    };
                    deltas = rest;
                    Some(i64::from(d))
                }
                2 => {
                    let [a, b, rest @ ..] = deltas else {
                        return false;
                    };
                    deltas = rest;
                    Some(i64::from(i16::from_be_bytes([*a, *b])))
                }
                _ => return false,
            };
            f(
                seq,
                delta.map(|d| {
                    arrival += d * 250;
                    arrival
                }),
            );
            seq = seq.wrapping_add(1);
            left -= 1;
        }
    }
    true
}

/// How many packets a transport-wide CC status chunk describes.
fn chunk_len(c: u16) -> usize {
    match (c & 0x8000 != 0, c & 0x4000 != 0) {
        // Run length: 13 bits of length.
        (false, _) => usize::from(c & 0x1fff),
        // Status vector of 14 one-bit symbols, or of 7 two-bit symbols.
        (true, false) => 14,
        (true, true) => 7,
    }
}

/// The status symbol of the `j`th packet of chunk `c`: 0 not received, 1 received with a
/// one-byte delta, 2 received with a two-byte (signed) delta, 3 reserved.
fn chunk_symbol(c: u16, j: usize) -> u16 {
    match (c & 0x8000 != 0, c & 0x4000 != 0) {
        (false, _) => (c >> 13) & 3,
        (true, false) => (c >> (13 - j)) & 1,
        (true, true) => (c >> (12 - 2 * j)) & 3,
    }
}

/// What one stream has sent, for its sender report.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SenderInfo {
    /// The stream.
    pub(crate) ssrc: u32,
    /// Wall-clock time the report describes, as 64-bit NTP (seconds since 1900 << 32 | fraction).
    pub(crate) ntp: u64,
    /// The RTP timestamp that corresponds to `ntp`.
    pub(crate) rtp_time: u32,
    /// Packets sent since the stream started.
    pub(crate) packets: u32,
    /// Payload bytes sent since the stream started.
    pub(crate) octets: u32,
}

/// Appends a compound SR (no report blocks) + SDES CNAME for `info` to `out`.
pub(crate) fn sender_report(out: &mut Vec<u8>, info: &SenderInfo, cname: &[u8]) {
    // SR: V=2, RC=0, PT=200, length 6 words (28 bytes).
    out.extend_from_slice(&[0x80, 200, 0, 6]);
    out.extend_from_slice(&info.ssrc.to_be_bytes());
    out.extend_from_slice(&info.ntp.to_be_bytes());
    out.extend_from_slice(&info.rtp_time.to_be_bytes());
    out.extend_from_slice(&info.packets.to_be_bytes());
    out.extend_from_slice(&info.octets.to_be_bytes());
    // SDES: one chunk, CNAME item, null terminator, padded to a word.
    let cname = &cname[..cname.len().min(255)];
    let body = 4 + 2 + cname.len() + 1;
    let padded = body.div_ceil(4) * 4;
    out.extend_from_slice(&[0x81, 202]);
    out.extend_from_slice(&((padded / 4) as u16).to_be_bytes());
    out.extend_from_slice(&info.ssrc.to_be_bytes());
    out.extend_from_slice(&[1, cname.len() as u8]);
    out.extend_from_slice(cname);
    out.resize(out.len() + padded - body + 1, 0);
}

/// `t` as 64-bit NTP time.
pub(crate) fn ntp(t: std::time::SystemTime) -> u64 {
    const UNIX_TO_NTP: u64 = 2_208_988_800;
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() + UNIX_TO_NTP;
    let frac = (u64::from(d.subsec_nanos()) << 32) / 1_000_000_000;
    (secs << 32) | frac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nack_pli_fir_and_skips_the_rest() {
        let mut b = Vec::new();
        // RR with no blocks.
        b.extend_from_slice(&[0x80, 201, 0, 1, 0, 0, 0, 1]);
        // NACK: pid 100, blp 0b101 (101 and 103 lost too).
        b.extend_from_slice(&[0x81, 205, 0, 3, 0, 0, 0, 1, 0, 0, 0, 7, 0, 100, 0, 5]);
        // PLI.
        b.extend_from_slice(&[0x81, 206, 0, 2, 0, 0, 0, 1, 0, 0, 0, 7]);
        // FIR for SSRC 9.
        b.extend_from_slice(&[
            0x84, 206, 0, 4, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9, 1, 0, 0, 0,
        ]);
        // A PSFB fmt 15 that is not REMB: ignored.
        b.extend_from_slice(&[0x8f, 206, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0]);
        let mut out = Vec::new();
        parse(&b, &mut out);
        assert_eq!(
            out,
            vec![
                Feedback::Nack {
                    ssrc: 7,
                    pid: 100,
                    blp: 5
                },
                Feedback::Pli { ssrc: 7 },
                Feedback::Fir { ssrc: 9 },
            ]
        );
        let seqs: Vec<u16> = Feedback::nacked(65535, 1).collect();
        assert_eq!(seqs, vec![65535, 0]);
    }

    #[test]
    fn reads_report_blocks_remb_and_locates_transport_cc() {
        let mut b = Vec::new();
        // RR with one block about SSRC 7: 25% lost, jitter 90, LSR 0x1234_5678, DLSR 65536.
        b.extend_from_slice(&[0x81, 201, 0, 7, 0, 0, 0, 1, 0, 0, 0, 7, 64, 0, 0, 3]);
        b.extend_from_slice(&[
            0, 0, 0x10, 0, 0, 0, 0, 90, 0x12, 0x34, 0x56, 0x78, 0, 1, 0, 0,
        ]);
        // REMB: exponent 2, mantissa 250000 → 1 Mbit/s, one SSRC.
        let m: u32 = 250_000;
        b.extend_from_slice(&[0x8f, 206, 0, 5, 0, 0, 0, 1, 0, 0, 0, 0]);
        b.extend_from_slice(b"REMB");
        b.extend_from_slice(&[1, (2 << 2) | (m >> 16) as u8, (m >> 8) as u8, m as u8]);
        b.extend_from_slice(&[0, 0, 0, 7]);
        let twcc_at = b.len();
        b.extend_from_slice(&twcc_example());
        let mut out = Vec::new();
        parse(&b, &mut out);
        assert_eq!(
            out,
            vec![
                Feedback::Report {
                    ssrc: 7,
                    fraction_lost: 64,
                    jitter: 90,
                    lsr: 0x1234_5678,
                    dlsr: 65536
                },
                Feedback::Remb { bps: 1_000_000 },
                Feedback::TransportCc {
                    start: twcc_at,
                    end: b.len()
                },
            ]
        );
    }

    /// A transport-wide CC feedback: base 65534, 5 packets, reference time 2 (128 ms): a run of
    /// 2 received (small deltas 4 and 8: +1 ms, +2 ms), then a 2-bit vector: lost, large delta
    /// -4 (-1 ms), small delta 0.
    fn twcc_example() -> Vec<u8> {
        let mut b = vec![0x8f, 205, 0, 0, 0, 0, 0, 1, 0, 0, 0, 7];
        b.extend_from_slice(&[0xff, 0xfe, 0, 5, 0, 0, 2, 9]);
        // Run length chunk: T=0, symbol 01, length 2.
        b.extend_from_slice(&(0x2000u16 | 2).to_be_bytes());
        // Status vector, 2-bit: 00 10 01 then padding symbols.
        b.extend_from_slice(&(0xc000u16 | (0b00_10_01 << 8)).to_be_bytes());
        b.extend_from_slice(&[4, 8, 0xff, 0xfc, 0]);
        while b.len() % 4 != 0 {
            b.push(0);
        }
        let words = (b.len() / 4 - 1) as u16;
        b[2..4].copy_from_slice(&words.to_be_bytes());
        b
    }

    #[test]
    fn transport_cc_arrivals_and_losses() {
        let packet = twcc_example();
        let mut seen = Vec::new();
        assert!(transport_cc(&packet, |s, at| seen.push((s, at))));
        assert_eq!(
            seen,
            vec![
                (65534, Some(129_000)),
                (65535, Some(131_000)),
                (0, None),
                (1, Some(130_000)),
                (2, Some(130_000)),
            ]
        );
        // One-bit vectors and a truncated packet.
        let mut b = vec![
            0x8f, 205, 0, 0, 0, 0, 0, 1, 0, 0, 0, 7, 0, 10, 0, 14, 0, 0, 0, 0,
        ];
        b.extend_from_slice(&(0x8000u16 | 0b10_0000_0000_0001).to_be_bytes());
        b.extend_from_slice(&[1, 2]);
        let mut seen = Vec::new();
        assert!(transport_cc(&b, |s, at| seen.push((s, at))));
        assert_eq!(seen.len(), 14);
        assert_eq!(seen[0], (10, Some(250)));
        assert_eq!(seen[13], (23, Some(750)));
        assert!(seen[1..13].iter().all(|(_, at)| at.is_none()));
        assert!(!transport_cc(&b[..b.len() - 1], |_, _| {}));
        assert!(!transport_cc(&b[..21], |_, _| {}));
    }

    #[test]
    fn never_panics_on_junk() {
        let mut out = Vec::new();
        let mut x = 0x1234_5678u32;
        for len in 0..200usize {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    (x as u8 & 0x3f) | 0x80
                })
                .collect();
            parse(&junk, &mut out);
            transport_cc(&junk, |_, _| {});
        }
    }

    #[test]
    fn sender_report_layout() {
        let mut out = Vec::new();
        let info = SenderInfo {
            ssrc: 0xdead_beef,
            ntp: 0x0102_0304_0506_0708,
            rtp_time: 90_000,
            packets: 10,
            octets: 12_000,
        };
        sender_report(&mut out, &info, b"castnode");
        assert_eq!(out.len(), 28 + 20);
        assert_eq!(&out[..4], &[0x80, 200, 0, 6]);
        assert_eq!(&out[28..32], &[0x81, 202, 0, 4]);
        assert_eq!(&out[36..38], &[1, 8]);
        assert_eq!(out.len() % 4, 0);
        let mut fb = Vec::new();
        parse(&out, &mut fb);
        assert!(fb.is_empty());
    }
}
