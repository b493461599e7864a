//! The RTCP a WebRTC media sender needs (RFC 3550, RFC 4585, RFC 5104): reading a viewer's
//! feedback, writing sender reports.
//!
//! Guarantees: [`parse`] reads a compound (or reduced-size, RFC 5506) packet that has already
//! been authenticated and decrypted, never panics, never allocates beyond the caller's output
//! vector, and skips what it does not use (receiver reports' blocks, SDES, BYE, transport-wide
//! feedback, REMB) or cannot read; [`sender_report`] writes an SR with an SDES CNAME, the
//! compound a receiver needs to map RTP timestamps to wall-clock time (lip sync).

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
pub(crate) fn parse(mut buf: &[u8], out: &mut Vec<Feedback>) {
    while buf.len() >= 4 {
        if buf[0] >> 6 != 2 {
            return;
        }
        let count = buf[0] & 0x1f;
        let kind = buf[1];
        let len = (usize::from(u16::from_be_bytes([buf[2], buf[3]])) + 1) * 4;
        let Some(packet) = buf.get(..len) else {
            return;
        };
        buf = &buf[len..];
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
            _ => {}
        }
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
        // REMB (PSFB fmt 15): ignored.
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
