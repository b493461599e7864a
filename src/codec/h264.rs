//! H.264: the AVCDecoderConfigurationRecord and the sequence parameter set (resolution, profile).

use bytes::{BufMut, Bytes, BytesMut};

use super::VideoInfo;
use super::bits::{BitReader, unescape_rbsp};

/// The first SPS of an AVCDecoderConfigurationRecord (ISO 14496-15 5.3.3.1).
pub(crate) fn avcc_first_sps(avcc: &[u8]) -> Option<&[u8]> {
    if avcc.len() < 8 || avcc[0] != 1 || avcc[5] & 0x1f == 0 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([avcc[6], avcc[7]]));
    avcc.get(8..8 + len)
}

/// Resolution, profile and level from an AVCDecoderConfigurationRecord.
pub(crate) fn parse_avcc(avcc: &[u8]) -> Option<VideoInfo> {
    parse_sps(avcc_first_sps(avcc)?)
}

/// The NAL length size (1, 2 or 4 bytes) and the SPS/PPS NAL units of an
/// AVCDecoderConfigurationRecord.
pub(crate) fn avcc_parameter_sets(avcc: &[u8]) -> Option<(usize, Vec<&[u8]>)> {
    let mut sets = Vec::new();
    let length_size = walk_parameter_sets(avcc, |set| sets.push(set))?;
    Some((length_size, sets))
}

/// Calls `each` with every SPS and PPS of an AVCDecoderConfigurationRecord, in order, and gives
/// its NAL length size; `None` (after calling `each` for the sets before the fault) when the
/// record is malformed.
fn walk_parameter_sets<'a>(avcc: &'a [u8], mut each: impl FnMut(&'a [u8])) -> Option<usize> {
    if avcc.len() < 7 || avcc[0] != 1 {
        return None;
    }
    let length_size = usize::from(avcc[4] & 3) + 1;
    let mut pos = 5;
    for count_mask in [0x1f, 0xff] {
        let count = *avcc.get(pos)? & count_mask;
        pos += 1;
        for _ in 0..count {
            let len = usize::from(u16::from_be_bytes([*avcc.get(pos)?, *avcc.get(pos + 1)?]));
            each(avcc.get(pos + 2..pos + 2 + len)?);
            pos += 2 + len;
        }
    }
    Some(length_size)
}

/// The non-empty NAL units of a frame of `length_size`-byte length-prefixed NAL units (the
/// hub's form); a malformed length ends them at the last whole unit.
pub(crate) fn avcc_nal_units(frame: &[u8], length_size: usize) -> impl Iterator<Item = &[u8]> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        while pos + length_size <= frame.len() {
            let len = frame[pos..pos + length_size]
                .iter()
                .fold(0usize, |a, &b| (a << 8) | usize::from(b));
            pos += length_size;
            let nal = frame.get(pos..pos + len)?;
            pos += len;
            if !nal.is_empty() {
                return Some(nal);
            }
        }
        None
    })
}

/// Converts a frame of length-prefixed NAL units to Annex B (start codes). On a keyframe without
/// its own SPS/PPS, those of `avcc` go first: WebRTC receivers need them in band before every
/// IDR. Malformed lengths end the conversion at the last whole NAL unit.
#[cfg(test)]
pub(crate) fn avcc_to_annexb(frame: &[u8], avcc: Option<&[u8]>, keyframe: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.len() + 64);
    avcc_to_annexb_into(frame, avcc, keyframe, &mut out);
    out
}

/// A length-prefixed access unit as Annex B, written into `out` (cleared first), with the
/// record's SPS and PPS in band before a keyframe that lacks them; a caller converting every
/// frame reuses one buffer, and nothing is allocated once `out` is large enough.
pub fn avcc_to_annexb_into(frame: &[u8], avcc: Option<&[u8]>, keyframe: bool, out: &mut Vec<u8>) {
    out.clear();
    // A record that does not parse whole counts for nothing, its length size included.
    let (avcc, length_size) = match avcc.and_then(|a| Some((a, walk_parameter_sets(a, |_| {})?))) {
        Some((a, l)) => (Some(a), l),
        None => (None, 4),
    };
    if let Some(avcc) = avcc
        && keyframe
        && !avcc_nal_units(frame, length_size).any(|n| n[0] & 0x1f == 7)
    {
        walk_parameter_sets(avcc, |set| {
            out.extend_from_slice(&[0, 0, 0, 1]);
            out.extend_from_slice(set);
        });
    }
    for nal in avcc_nal_units(frame, length_size) {
        out.extend_from_slice(&[0, 0, 0, 1]);
        out.extend_from_slice(nal);
    }
}

/// An AVCDecoderConfigurationRecord for one SPS and one PPS.
pub(crate) fn avcc_record(sps: &[u8], pps: &[u8]) -> Option<Bytes> {
    if sps.len() < 4 {
        return None;
    }
    let mut c = BytesMut::with_capacity(11 + sps.len() + pps.len());
    c.put_slice(&[1, sps[1], sps[2], sps[3], 0xFF, 0xE1]);
    c.put_u16(sps.len() as u16);
    c.put_slice(sps);
    c.put_u8(1);
    c.put_u16(pps.len() as u16);
    c.put_slice(pps);
    Some(c.freeze())
}

/// What an Annex B access unit held (see [`annexb_to_avcc`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct AccessUnit<'a> {
    /// It has an IDR slice.
    pub(crate) idr: bool,
    /// Its last sequence parameter set.
    pub(crate) sps: Option<&'a [u8]>,
    /// Its last picture parameter set.
    pub(crate) pps: Option<&'a [u8]>,
}

/// Appends the NAL units of Annex B `data` to `out`, each behind a 4-byte length (the form
/// frames have in the hub); parameter sets stay in-band and are also returned.
pub(crate) fn annexb_to_avcc<'a>(data: &'a [u8], out: &mut BytesMut) -> AccessUnit<'a> {
    let mut au = AccessUnit::default();
    for nal in annexb_nal_units(data) {
        match nal.first().map(|b| b & 0x1f) {
            Some(5) => au.idr = true,
            Some(7) => au.sps = Some(nal),
            Some(8) => au.pps = Some(nal),
            _ => {}
        }
        out.put_u32(nal.len() as u32);
        out.put_slice(nal);
    }
    au
}

/// The NAL units of an Annex B byte stream (start codes of 3 or 4 bytes, trailing zeros dropped).
pub fn annexb_nal_units(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= data.len() {
        if data[i..i + 3] == [0, 0, 1] {
            starts.push(i + 3);
            i += 3;
        } else {
            i += 1;
        }
    }
    (0..starts.len()).map(move |k| {
        let s = starts[k];
        let mut end = starts.get(k + 1).map_or(data.len(), |&n| n - 3);
        while end > s && data[end - 1] == 0 {
            end -= 1;
        }
        &data[s..end]
    })
}

fn profile_name(idc: u32) -> &'static str {
    match idc {
        66 => "baseline",
        77 => "main",
        88 => "extended",
        100 => "high",
        110 => "high10",
        122 => "high422",
        244 => "high444",
        _ => "other",
    }
}

/// Parses an SPS NAL unit (with its one-byte header) far enough for the picture size.
pub(crate) fn parse_sps(nal: &[u8]) -> Option<VideoInfo> {
    if nal.first()? & 0x1f != 7 {
        return None;
    }
    let rbsp = unescape_rbsp(&nal[1..]);
    let mut r = BitReader::new(&rbsp);
    let profile_idc = r.bits(8)?;
    let _constraints = r.bits(8)?;
    let level_idc = r.bits(8)?;
    let _sps_id = r.ue()?;
    let mut chroma_format_idc = 1;
    let mut separate_colour_plane = false;
    if matches!(
        profile_idc,
        100 | 110 | 122 | 244 | 44 | 83 | 86 | 118 | 128 | 138 | 139 | 134 | 135
    ) {
        chroma_format_idc = r.ue()?;
        if chroma_format_idc == 3 {
            separate_colour_plane = r.bit()?;
        }
        let _bit_depth_luma = r.ue()?;
        let _bit_depth_chroma = r.ue()?;
        let _qpprime = r.bit()?;
        if r.bit()? {
            let lists = if chroma_format_idc == 3 { 12 } else { 8 };
            for i in 0..lists {
                if r.bit()? {
                    let size = if i < 6 { 16 } else { 64 };
                    let (mut last, mut next) = (8i32, 8i32);
                    for _ in 0..size {
                        if next != 0 {
                            next = (last + r.se()? + 256) % 256;
                        }
                        last = if next == 0 { last } else { next };
                    }
                }
            }
        }
    }
    let _log2_max_frame_num = r.ue()?;
    match r.ue()? {
        0 => {
            let _ = r.ue()?;
        }
        1 => {
            r.bit()?;
            r.se()?;
            r.se()?;
            let n = r.ue()?;
            if n > 255 {
                return None;
            }
            for _ in 0..n {
                r.se()?;
            }
        }
        _ => {}
    }
    let _max_ref_frames = r.ue()?;
    r.bit()?;
    let width_mbs = r.ue()?.checked_add(1)?;
    let height_units = r.ue()?.checked_add(1)?;
    let frame_mbs_only = r.bit()?;
    if !frame_mbs_only {
        r.bit()?;
    }
    r.bit()?;
    let (mut cl, mut cr, mut ct, mut cb) = (0, 0, 0, 0);
    if r.bit()? {
        cl = r.ue()?;
        cr = r.ue()?;
        ct = r.ue()?;
        cb = r.ue()?;
    }
    let chroma = if separate_colour_plane {
        0
    } else {
        chroma_format_idc
    };
    let (sub_w, sub_h) = match chroma {
        1 => (2, 2),
        2 => (2, 1),
        _ => (1, 1),
    };
    let frame_factor = if frame_mbs_only { 1 } else { 2 };
    let (crop_x, crop_y) = if chroma == 0 {
        (1, frame_factor)
    } else {
        (sub_w, sub_h * frame_factor)
    };
    let width = (width_mbs * 16).checked_sub(crop_x * (cl + cr))?;
    let height = (frame_factor * height_units * 16).checked_sub(crop_y * (ct + cb))?;
    Some(VideoInfo {
        width,
        height,
        profile: profile_name(profile_idc).to_owned(),
        level: level_idc as u8,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annexb_to_avcc_and_record() {
        let data = [
            0, 0, 0, 1, 0x67, 1, 2, 3, 0, 0, 1, 0x68, 9, 0, 0, 1, 0x65, 7,
        ];
        let nals: Vec<&[u8]> = annexb_nal_units(&data).collect();
        assert_eq!(
            nals,
            vec![&[0x67, 1, 2, 3][..], &[0x68, 9][..], &[0x65, 7][..]]
        );
        let mut out = BytesMut::new();
        let au = annexb_to_avcc(&data, &mut out);
        assert!(au.idr);
        assert_eq!(
            &out[..],
            &[
                0, 0, 0, 4, 0x67, 1, 2, 3, 0, 0, 0, 2, 0x68, 9, 0, 0, 0, 2, 0x65, 7
            ][..]
        );
        let rec = avcc_record(au.sps.unwrap(), au.pps.unwrap()).unwrap();
        assert_eq!(
            &rec[..],
            &[
                1, 1, 2, 3, 0xFF, 0xE1, 0, 4, 0x67, 1, 2, 3, 1, 0, 2, 0x68, 9
            ][..]
        );
        assert!(avcc_parameter_sets(&rec).is_some());
        assert_eq!(avcc_to_annexb(&out, None, false).len(), data.len() + 2);
    }

    #[test]
    fn sps_1280x720_high() {
        // x264 High 3.1, 1280x720.
        let sps = [
            0x67, 0x64, 0x00, 0x1f, 0xac, 0xd9, 0x40, 0x50, 0x05, 0xbb, 0x01, 0x10, 0x00, 0x00,
            0x03, 0x00, 0x10, 0x00, 0x00, 0x03, 0x03, 0xc0, 0xf1, 0x83, 0x19, 0x60,
        ];
        let info = parse_sps(&sps).unwrap();
        assert_eq!(
            (info.width, info.height, info.profile.as_str(), info.level),
            (1280, 720, "high", 31)
        );
    }

    #[test]
    fn annexb_with_parameter_sets_before_idr() {
        // avcC: version 1, profile, compat, level, 4-byte lengths, 1 SPS (2 bytes), 1 PPS (1 byte).
        let avcc = [
            1, 0x42, 0, 0x1e, 0xff, 0xe1, 0, 2, 0x67, 0xAA, 1, 0, 1, 0x68,
        ];
        let frame = [0, 0, 0, 2, 0x65, 0x11, 0, 0, 0, 1, 0x06];
        assert_eq!(
            avcc_to_annexb(&frame, Some(&avcc), true),
            vec![
                0, 0, 0, 1, 0x67, 0xAA, 0, 0, 0, 1, 0x68, 0, 0, 0, 1, 0x65, 0x11, 0, 0, 0, 1, 0x06
            ]
        );
        assert_eq!(
            avcc_to_annexb(&frame, Some(&avcc), false),
            vec![0, 0, 0, 1, 0x65, 0x11, 0, 0, 0, 1, 0x06]
        );
        // A length running past the end stops the conversion.
        assert_eq!(
            avcc_to_annexb(&[0, 0, 0, 9, 0x65], None, false),
            Vec::<u8>::new()
        );
    }

    #[test]
    fn garbage_is_none() {
        assert_eq!(parse_sps(&[0x67]), None);
        assert_eq!(parse_avcc(&[1, 2, 3]), None);
    }
}
