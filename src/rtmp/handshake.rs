//! The RTMP handshake (RTMP spec §5.2), plain version 3: C0 C1 / S0 S1 S2 / C2.
//!
//! Clients that offer the digest ("complex") handshake accept a plain reply: ffmpeg and OBS
//! (librtmp) only verify the server's digest when the server's version field asks for it, and
//! ours is zero.

/// Size of C1/S1/C2/S2.
pub(crate) const PACKET: usize = 1536;
/// The RTMP version castnode speaks.
pub(crate) const VERSION: u8 = 3;

/// Fills a handshake packet: 4 bytes time, 4 zero bytes (no digest), then filler.
pub(crate) fn packet(time: u32, seed: u64) -> Vec<u8> {
    let mut p = vec![0u8; PACKET];
    p[..4].copy_from_slice(&time.to_be_bytes());
    // The filler only has to differ between sessions; xorshift is enough.
    let mut x = seed | 1;
    for b in &mut p[8..] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    p
}
