//! RTP packetization done once per frame and shared by every WebRTC viewer of a track.
//!
//! Guarantees:
//! - A frame becomes an [`RtpFrame`]: the RTP *payloads* of its packets in one buffer, without
//!   RTP headers. Headers (SSRC, payload type, sequence number, timestamp) differ per viewer and
//!   are written when a viewer's copy is encrypted, so the payloads are built once per frame
//!   (memoized in the hub entry) and viewers only hold references to them.
//! - H.264 follows RFC 6184 packetization mode 1 and is built straight from the hub's
//!   length-prefixed NAL units (no start-code scan): NAL units that fit go alone or, when
//!   several small ones follow each other (SPS, PPS, SEI), together in a STAP-A; larger ones
//!   are cut into FU-A fragments of equal size (the last may be shorter), so the packets of a
//!   frame leave in one GSO send. A keyframe without its own SPS/PPS gets those of the track's
//!   configuration first; access unit delimiters and filler data are dropped.
//! - Opus (RFC 7587) is one packet per frame (at most 1,275 bytes by its own definition).
//! - Every H.264 payload is at most [`MAX_PAYLOAD`] bytes; malformed NAL lengths end the frame at the
//!   last whole NAL unit; nothing panics on any input.

use crate::codec::h264;

/// The largest RTP payload: with the 12-byte header and a 16-byte SRTP tag, a packet stays
/// within the 1,200 bytes WebRTC stacks assume fit every path.
pub(crate) const MAX_PAYLOAD: usize = 1_160;

/// The RTP payloads of one frame. The marker bit goes on the last packet.
#[derive(Debug, Default)]
pub struct RtpFrame {
    data: Vec<u8>,
    /// End offset of each packet's payload in `data`.
    ends: Vec<u32>,
}

impl RtpFrame {
    /// Number of packets.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// No packets (nothing to send).
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Payload of packet `i`.
    pub(crate) fn packet(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.data[start..self.ends[i] as usize]
    }

    /// Bytes of payload in all packets.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.data.len()
    }

    fn end_packet(&mut self) {
        self.ends.push(self.data.len() as u32);
    }

    /// One Opus frame: one packet.
    pub fn opus(payload: &[u8]) -> RtpFrame {
        let mut f = RtpFrame {
            data: Vec::with_capacity(payload.len()),
            ends: Vec::with_capacity(1),
        };
        if !payload.is_empty() {
            f.data.extend_from_slice(payload);
            f.end_packet();
        }
        f
    }

    /// One H.264 access unit of length-prefixed NAL units (the hub's form); `avcc` is the
    /// track's AVCDecoderConfigurationRecord (NAL length size, SPS/PPS for keyframes).
    pub fn h264(frame: &[u8], avcc: Option<&[u8]>, keyframe: bool) -> RtpFrame {
        let sets = avcc.and_then(h264::avcc_parameter_sets);
        let length_size = sets.as_ref().map_or(4, |(l, _)| *l);
        // 9: access unit delimiter, 12: filler data; neither is needed by a receiver.
        let mut nals: Vec<&[u8]> = h264::avcc_nal_units(frame, length_size)
            .filter(|nal| !matches!(nal[0] & 0x1f, 9 | 12))
            .collect();
        if keyframe && !nals.iter().any(|n| n[0] & 0x1f == 7) {
            let sets: Vec<&[u8]> = sets
                .iter()
                .flat_map(|(_, s)| s.iter().copied())
                .filter(|s| !s.is_empty())
                .collect();
            nals.splice(0..0, sets);
        }
        let total: usize = nals.iter().map(|n| n.len() + 3).sum();
        let mut f = RtpFrame {
            data: Vec::with_capacity(total),
            ends: Vec::with_capacity(total / MAX_PAYLOAD + 2),
        };
        let mut i = 0;
        while i < nals.len() {
            let nal = nals[i];
            if nal.len() > MAX_PAYLOAD {
                f.fu_a(nal);
                i += 1;
                continue;
            }
            // As many following small NAL units as fit one STAP-A (1 + Σ(2 + len)).
            let mut j = i + 1;
            let mut size = 1 + 2 + nal.len();
            while j < nals.len() && size + 2 + nals[j].len() <= MAX_PAYLOAD {
                size += 2 + nals[j].len();
                j += 1;
            }
            if j == i + 1 {
                f.data.extend_from_slice(nal);
            } else {
                // STAP-A header: F and the highest NRI of the aggregated units, type 24.
                let nri = nals[i..j].iter().map(|n| n[0] & 0x60).max().unwrap_or(0);
                let forbidden = nals[i..j].iter().fold(0, |a, n| a | (n[0] & 0x80));
                f.data.push(forbidden | nri | 24);
                for n in &nals[i..j] {
                    f.data.extend_from_slice(&(n.len() as u16).to_be_bytes());
                    f.data.extend_from_slice(n);
                }
            }
            f.end_packet();
            i = j;
        }
        f
    }

    /// Cuts one NAL unit into FU-A fragments of equal size (RFC 6184 §5.8).
    fn fu_a(&mut self, nal: &[u8]) {
        let header = nal[0];
        let body = &nal[1..];
        let room = MAX_PAYLOAD - 2;
        let count = body.len().div_ceil(room);
        // Equal fragments (the last may be shorter), so the frame's packets batch in one send.
        let size = body.len().div_ceil(count);
        for (k, chunk) in body.chunks(size).enumerate() {
            let start = if k == 0 { 0x80 } else { 0 };
            let end = if k + 1 == count { 0x40 } else { 0 };
            self.data.push((header & 0xe0) | 28);
            self.data.push(start | end | (header & 0x1f));
            self.data.extend_from_slice(chunk);
            self.end_packet();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn avcc_frame(nals: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for n in nals {
            out.extend_from_slice(&(n.len() as u32).to_be_bytes());
            out.extend_from_slice(n);
        }
        out
    }

    /// Reassembles the NAL units of a packetized frame (a receiver's view).
    fn depacketize(f: &RtpFrame) -> Vec<Vec<u8>> {
        let mut nals = Vec::new();
        let mut fu: Option<Vec<u8>> = None;
        for i in 0..f.len() {
            let p = f.packet(i);
            assert!(p.len() <= MAX_PAYLOAD);
            match p[0] & 0x1f {
                24 => {
                    let mut rest = &p[1..];
                    while rest.len() >= 2 {
                        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                        nals.push(rest[2..2 + len].to_vec());
                        rest = &rest[2 + len..];
                    }
                    assert!(rest.is_empty());
                }
                28 => {
                    let (s, e) = (p[1] & 0x80 != 0, p[1] & 0x40 != 0);
                    if s {
                        fu = Some(vec![(p[0] & 0xe0) | (p[1] & 0x1f)]);
                    }
                    fu.as_mut().unwrap().extend_from_slice(&p[2..]);
                    if e {
                        nals.push(fu.take().unwrap());
                    }
                }
                _ => nals.push(p.to_vec()),
            }
        }
        assert!(fu.is_none());
        nals
    }

    #[test]
    fn keyframe_gets_parameter_sets_and_round_trips() {
        let sps = [0x67, 0x64, 0x00, 0x1f, 0xac, 0xd9];
        let pps = [0x68, 0xeb, 0xe3, 0xcb];
        let avcc = h264::avcc_record(&sps, &pps).unwrap();
        let sei = vec![0x06u8; 40];
        let mut idr = vec![0x65u8];
        idr.extend((0..10_000u32).map(|i| i as u8));
        let aud = [0x09, 0xf0];
        let filler = [0x0c, 0xff, 0xff];
        let frame = avcc_frame(&[&aud, &sei, &idr, &filler]);
        let f = RtpFrame::h264(&frame, Some(&avcc), true);
        // SPS + PPS + SEI in one STAP-A, then the IDR in FU-As.
        assert_eq!(f.packet(0)[0] & 0x1f, 24);
        assert_eq!(f.len(), 1 + 10_000usize.div_ceil(MAX_PAYLOAD - 2));
        let sizes: Vec<usize> = (1..f.len() - 1).map(|i| f.packet(i).len()).collect();
        assert!(sizes.windows(2).all(|w| w[0] == w[1]), "equal fragments");
        assert!(f.packet(f.len() - 1).len() <= sizes[0]);
        let nals = depacketize(&f);
        assert_eq!(nals, vec![sps.to_vec(), pps.to_vec(), sei, idr]);
    }

    #[test]
    fn delta_frame_without_sets_and_single_nal() {
        let p = [0x41u8, 1, 2, 3];
        let f = RtpFrame::h264(&avcc_frame(&[&p]), None, false);
        assert_eq!(f.len(), 1);
        assert_eq!(f.packet(0), &p);
        assert_eq!(f.bytes(), 4);
    }

    #[test]
    fn malformed_lengths_stop_at_last_whole_nal() {
        let mut frame = avcc_frame(&[&[0x41, 9, 9]]);
        frame.extend_from_slice(&[0, 0, 0x10, 0, 0x41]);
        let f = RtpFrame::h264(&frame, None, false);
        assert_eq!(depacketize(&f), vec![vec![0x41, 9, 9]]);
        for n in 0..64u8 {
            let junk: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37).wrapping_add(n)).collect();
            let _ = RtpFrame::h264(&junk, Some(&junk), true);
        }
    }

    #[test]
    fn opus_is_one_packet() {
        let f = RtpFrame::opus(&[0xfc, 1, 2]);
        assert_eq!(f.len(), 1);
        assert_eq!(f.packet(0), &[0xfc, 1, 2]);
        assert!(RtpFrame::opus(&[]).is_empty());
    }
}
