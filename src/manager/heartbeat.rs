//! Load reports as UDP datagrams (sans-IO codec): the cheap path for a node's once-a-second
//! heartbeat. Registration, lookups and everything else stay on HTTP; a report too large for
//! one datagram goes over HTTP too (`PUT /api/v1/nodes/{id}/load`).
//!
//! Wire format (written down in `docs/manager-api.md`), all integers big-endian:
//!
//! ```text
//! report: "CNH1" | kind u8 (0x01, or 0x04 asking for an answer) | seq u64 | id_len u8 | node id
//!         | load report JSON | HMAC-SHA256 (32)
//! reply:  "CNH1" | kind u8 (0x02 unknown node, 0x03 draining, 0x05 taken) | seq u64 (the
//!         report's) | drain deadline s u32 | id_len u8 | node id | HMAC-SHA256 (32)
//! ```
//!
//! The HMAC key is the cluster token; it covers every byte before it.
//!
//! Guarantees:
//! - Nothing unauthenticated is acted on. A report or reply with a wrong or missing MAC, a bad
//!   layout, or a node id that is not 1 to 128 printable ASCII bytes decodes to an error. MACs
//!   are compared in constant time.
//! - The manager accepts a node's reports only with a sequence number above the last one it
//!   took from that node, so a replayed datagram is ignored. Nodes use their wall clock in
//!   microseconds, which keeps rising across restarts.
//! - The manager answers only an authenticated report, and only when the node must act (it is
//!   unknown, or it is draining) or asked for an answer (a node asks on every tenth report, to
//!   find out whether its datagrams arrive at all), with a reply as small as the report's
//!   header. The port can therefore not be used to amplify traffic.
//! - A node takes a reply only if it is for its own id and echoes the sequence number of a
//!   report it sent.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::names::name_ok;

/// The datagrams' first bytes.
pub(crate) const MAGIC: &[u8; 4] = b"CNH1";
/// Largest report datagram a node sends (larger reports go over HTTP).
pub(crate) const MAX_DATAGRAM: usize = 1400;
const KIND_REPORT: u8 = 1;
const KIND_UNKNOWN: u8 = 2;
const KIND_DRAINING: u8 = 3;
const KIND_REPORT_ANSWER: u8 = 4;
const KIND_TAKEN: u8 = 5;
const MAC_LEN: usize = 32;

/// Why a datagram was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HeartbeatError {
    /// Too short, wrong magic, wrong kind or a bad id.
    #[error("malformed heartbeat datagram")]
    Malformed,
    /// The MAC does not match the cluster token.
    #[error("heartbeat datagram not signed with the cluster token")]
    BadMac,
}

/// A decoded report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Report<'a> {
    /// The reporting node.
    pub(crate) node: &'a str,
    /// Its sequence number (rising).
    pub(crate) seq: u64,
    /// The load report, JSON.
    pub(crate) body: &'a [u8],
    /// The node wants an answer even when it need not act.
    pub(crate) answer: bool,
}

/// What the manager tells a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Directive {
    /// The manager does not know the node: register again (over HTTP).
    Unknown,
    /// The node is draining; seconds left before its last viewers are cut.
    Draining(u32),
    /// Taken, nothing to do (only to a report that asked for an answer).
    Taken,
}

fn mac(token: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length, so this cannot fail.
    <Hmac<Sha256> as KeyInit>::new_from_slice(token)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"))
}

fn sign(token: &[u8], mut out: Vec<u8>) -> Vec<u8> {
    let mut m = mac(token);
    m.update(&out);
    out.extend_from_slice(&m.finalize().into_bytes());
    out
}

/// Checks the MAC at the end of `datagram`; the signed part before it.
fn verified<'a>(token: &[u8], datagram: &'a [u8]) -> Result<&'a [u8], HeartbeatError> {
    if datagram.len() < MAGIC.len() + 1 + MAC_LEN || &datagram[..4] != MAGIC {
        return Err(HeartbeatError::Malformed);
    }
    let (signed, tag) = datagram.split_at(datagram.len() - MAC_LEN);
    let mut m = mac(token);
    m.update(signed);
    m.verify_slice(tag).map_err(|_| HeartbeatError::BadMac)?;
    Ok(signed)
}

/// Reads `id_len u8 | id` at the start of `b`; the id and the rest.
fn node_id(b: &[u8]) -> Result<(&str, &[u8]), HeartbeatError> {
    let (&len, rest) = b.split_first().ok_or(HeartbeatError::Malformed)?;
    let len = usize::from(len);
    if rest.len() < len {
        return Err(HeartbeatError::Malformed);
    }
    let id = std::str::from_utf8(&rest[..len]).map_err(|_| HeartbeatError::Malformed)?;
    if !name_ok(id) {
        return Err(HeartbeatError::Malformed);
    }
    Ok((id, &rest[len..]))
}

fn put_id(out: &mut Vec<u8>, node: &str) {
    let id = &node.as_bytes()[..node.len().min(255)];
    out.push(id.len() as u8);
    out.extend_from_slice(id);
}

/// A report datagram (`answer`: ask for an answer even when there is nothing to do); `None`
/// when it would exceed [`MAX_DATAGRAM`] (send it over HTTP).
pub(crate) fn encode_report(
    token: &[u8],
    node: &str,
    seq: u64,
    body: &[u8],
    answer: bool,
) -> Option<Vec<u8>> {
    let len = MAGIC.len() + 1 + 8 + 1 + node.len() + body.len() + MAC_LEN;
    if len > MAX_DATAGRAM || node.len() > 255 {
        return None;
    }
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(MAGIC);
    out.push(if answer {
        KIND_REPORT_ANSWER
    } else {
        KIND_REPORT
    });
    out.extend_from_slice(&seq.to_be_bytes());
    put_id(&mut out, node);
    out.extend_from_slice(body);
    Some(sign(token, out))
}

/// Decodes and authenticates a report datagram.
pub(crate) fn decode_report<'a>(
    token: &[u8],
    datagram: &'a [u8],
) -> Result<Report<'a>, HeartbeatError> {
    let signed = verified(token, datagram)?;
    let rest = &signed[4..];
    if rest.len() < 1 + 8 || !matches!(rest[0], KIND_REPORT | KIND_REPORT_ANSWER) {
        return Err(HeartbeatError::Malformed);
    }
    let seq = u64::from_be_bytes(
        rest[1..9]
            .try_into()
            .map_err(|_| HeartbeatError::Malformed)?,
    );
    let (node, body) = node_id(&rest[9..])?;
    Ok(Report {
        node,
        seq,
        body,
        answer: rest[0] == KIND_REPORT_ANSWER,
    })
}

/// A reply datagram to node `node`'s report `seq`.
pub(crate) fn encode_reply(token: &[u8], node: &str, seq: u64, d: Directive) -> Vec<u8> {
    let (kind, deadline) = match d {
        Directive::Unknown => (KIND_UNKNOWN, 0),
        Directive::Draining(s) => (KIND_DRAINING, s),
        Directive::Taken => (KIND_TAKEN, 0),
    };
    let mut out = Vec::with_capacity(4 + 1 + 8 + 4 + 1 + node.len() + MAC_LEN);
    out.extend_from_slice(MAGIC);
    out.push(kind);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&deadline.to_be_bytes());
    put_id(&mut out, node);
    sign(token, out)
}

/// Decodes and authenticates a reply: (node, seq, directive).
pub(crate) fn decode_reply<'a>(
    token: &[u8],
    datagram: &'a [u8],
) -> Result<(&'a str, u64, Directive), HeartbeatError> {
    let signed = verified(token, datagram)?;
    let rest = &signed[4..];
    if rest.len() < 1 + 8 + 4 {
        return Err(HeartbeatError::Malformed);
    }
    let seq = u64::from_be_bytes(
        rest[1..9]
            .try_into()
            .map_err(|_| HeartbeatError::Malformed)?,
    );
    let deadline = u32::from_be_bytes(
        rest[9..13]
            .try_into()
            .map_err(|_| HeartbeatError::Malformed)?,
    );
    let d = match rest[0] {
        KIND_UNKNOWN => Directive::Unknown,
        KIND_DRAINING => Directive::Draining(deadline),
        KIND_TAKEN => Directive::Taken,
        _ => return Err(HeartbeatError::Malformed),
    };
    let (node, tail) = node_id(&rest[13..])?;
    if !tail.is_empty() {
        return Err(HeartbeatError::Malformed);
    }
    Ok((node, seq, d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T: &[u8] = b"cluster-token-0123456789";

    #[test]
    fn reports_and_replies_round_trip() {
        for answer in [false, true] {
            let d = encode_report(T, "edge-1", 42, b"{\"viewers\":3}", answer).unwrap();
            let r = decode_report(T, &d).unwrap();
            assert_eq!(
                r,
                Report {
                    node: "edge-1",
                    seq: 42,
                    body: b"{\"viewers\":3}",
                    answer,
                }
            );
        }
        for dir in [
            Directive::Unknown,
            Directive::Draining(97),
            Directive::Taken,
        ] {
            let d = encode_reply(T, "edge-1", 42, dir);
            assert_eq!(decode_reply(T, &d).unwrap(), ("edge-1", 42, dir));
            // A reply is not a report, and the other way round.
            assert_eq!(decode_report(T, &d), Err(HeartbeatError::Malformed));
        }
        assert!(decode_reply(T, &encode_report(T, "e", 1, b"{}", false).unwrap()).is_err());
    }

    #[test]
    fn an_origin_with_transcoded_broadcasts_still_fits_a_datagram() {
        // Eight broadcasts, each with a transcoder's ladder: one datagram. Fifteen do not fit:
        // such a report goes over HTTP (`Remote::report` when this answers None).
        let report = |n: usize| {
            let load = crate::manager::LoadReport {
                cpu: 1.25,
                cores: 16.0,
                memory: 1 << 30,
                bandwidth_in: 123_456_789.0,
                bandwidth_out: 987_654_321.0,
                connections: 1000,
                viewers: 990,
                broadcasts: (0..n)
                    .map(|i| crate::manager::BroadcastLoad {
                        name: format!("live/stream-{i:04}"),
                        viewers: 100,
                        node_subscriptions: 12,
                        publishing: true,
                        ladder_from: Some(format!("transcoder-host-{i:05}")),
                    })
                    .collect(),
            };
            let body = serde_json::to_vec(&load).unwrap();
            encode_report(T, "origin-host-12345", u64::MAX, &body, true)
        };
        assert!(report(8).is_some());
        assert!(report(15).is_none());
    }

    #[test]
    fn forged_or_broken_datagrams_are_refused() {
        let d = encode_report(T, "edge-1", 7, b"{}", false).unwrap();
        assert_eq!(
            decode_report(b"another-token-000000", &d),
            Err(HeartbeatError::BadMac)
        );
        let mut flipped = d.clone();
        flipped[6] ^= 1;
        assert_eq!(decode_report(T, &flipped), Err(HeartbeatError::BadMac));
        assert_eq!(
            decode_report(T, &d[..d.len() - 1]),
            Err(HeartbeatError::BadMac)
        );
        assert_eq!(decode_report(T, &d[..20]), Err(HeartbeatError::Malformed));
        assert_eq!(decode_report(T, b"CNH1"), Err(HeartbeatError::Malformed));
        assert_eq!(decode_report(T, b""), Err(HeartbeatError::Malformed));
        // A signed datagram with a bad id is still refused.
        let bad = sign(
            T,
            [&MAGIC[..], &[KIND_REPORT], &[0; 8], &[2, b' ', b'x']].concat(),
        );
        assert_eq!(decode_report(T, &bad), Err(HeartbeatError::Malformed));
        // Too large for one datagram: the caller uses HTTP.
        assert!(encode_report(T, "e", 1, &[b' '; MAX_DATAGRAM], false).is_none());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_report(T, &bytes);
            let _ = decode_reply(T, &bytes);
            let mut signed = bytes.clone();
            signed.splice(0..0, MAGIC.iter().copied());
            let signed = sign(T, signed);
            let _ = decode_report(T, &signed);
            let _ = decode_reply(T, &signed);
        }
    }
}
