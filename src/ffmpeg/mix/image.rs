//! Overlay images: a PNG (any pixel format FFmpeg's PNG decoder gives: RGBA, RGB, grey, palette)
//! decoded once into YUV 4:2:0 with an alpha plane, and alpha-blended onto the canvas.
//!
//! Guarantees: an image without alpha is opaque; an odd-sized image is scaled to the even size
//! just below it (4:2:0 chroma); blending clips the image at the canvas's right and bottom
//! edges and allocates nothing.

use ff::format::Pixel;
use ff::software::scaling;
use ffmpeg_next as ff;

use crate::ffmpeg::FfmpegError;

/// A decoded overlay image: limited-range YUV 4:2:0 planes, tightly packed, with alpha for
/// the luma plane and (averaged over each 2×2 block) for the chroma planes.
#[derive(Debug)]
pub struct Image {
    width: u32,
    height: u32,
    y: Vec<u8>,
    u: Vec<u8>,
    v: Vec<u8>,
    /// Alpha per luma sample.
    a: Vec<u8>,
    /// Alpha per chroma sample.
    ca: Vec<u8>,
}

impl Image {
    /// Decodes PNG bytes.
    pub fn from_png(png: &[u8]) -> Result<Image, FfmpegError> {
        crate::ffmpeg::init();
        let codec = ff::decoder::find(ff::codec::Id::PNG)
            .ok_or(FfmpegError::MissingCodec("PNG decoder"))?;
        let mut decoder = ff::codec::context::Context::new_with_codec(codec)
            .decoder()
            .video()?;
        let mut packet = ff::Packet::copy(png);
        packet.set_flags(ff::packet::Flags::KEY);
        decoder
            .send_packet(&packet)
            .map_err(|_| FfmpegError::BadConfig("not a PNG image"))?;
        decoder.send_eof()?;
        let mut frame = ff::frame::Video::empty();
        decoder
            .receive_frame(&mut frame)
            .map_err(|_| FfmpegError::BadConfig("not a PNG image"))?;
        Image::from_picture(&frame)
    }

    /// An image from straight (not premultiplied) RGBA rows, `width * 4` bytes each.
    pub fn from_rgba(width: u32, height: u32, rgba: &[u8]) -> Result<Image, FfmpegError> {
        let row = width as usize * 4;
        if rgba.len() != row * height as usize {
            return Err(FfmpegError::BadConfig("RGBA data of the wrong length"));
        }
        let mut picture = ff::frame::Video::new(Pixel::RGBA, width, height);
        let stride = picture.stride(0);
        for (y, src) in rgba.chunks_exact(row.max(1)).enumerate() {
            picture.data_mut(0)[y * stride..y * stride + row].copy_from_slice(src);
        }
        Image::from_picture(&picture)
    }

    fn from_picture(picture: &ff::frame::Video) -> Result<Image, FfmpegError> {
        let (width, height) = (picture.width() & !1, picture.height() & !1);
        if width == 0 || height == 0 {
            return Err(FfmpegError::BadConfig("an image smaller than 2×2"));
        }
        let mut yuva = ff::frame::Video::empty();
        scaling::Context::get(
            picture.format(),
            picture.width(),
            picture.height(),
            Pixel::YUVA420P,
            width,
            height,
            scaling::Flags::BILINEAR,
        )?
        .run(picture, &mut yuva)?;
        let plane = |i: usize, w: u32, h: u32| {
            let stride = yuva.stride(i);
            let mut out = Vec::with_capacity((w * h) as usize);
            for row in 0..h as usize {
                out.extend_from_slice(&yuva.data(i)[row * stride..row * stride + w as usize]);
            }
            out
        };
        let (cw, ch) = (width / 2, height / 2);
        let a = plane(3, width, height);
        let mut ca = Vec::with_capacity((cw * ch) as usize);
        for cy in 0..ch as usize {
            for cx in 0..cw as usize {
                let at = |dx: usize, dy: usize| {
                    u16::from(a[(2 * cy + dy) * width as usize + 2 * cx + dx])
                };
                ca.push(((at(0, 0) + at(1, 0) + at(0, 1) + at(1, 1) + 2) / 4) as u8);
            }
        }
        Ok(Image {
            width,
            height,
            y: plane(0, width, height),
            u: plane(1, cw, ch),
            v: plane(2, cw, ch),
            a,
            ca,
        })
    }

    /// Width in pixels (even).
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels (even).
    pub fn height(&self) -> u32 {
        self.height
    }

    /// Blends the image onto `canvas` (YUV 4:2:0) with its top-left corner at the even
    /// position `(x, y)`, clipped at the canvas's edges.
    pub(crate) fn blend(&self, canvas: &mut ff::frame::Video, x: u32, y: u32) {
        let w = self.width.min(canvas.width().saturating_sub(x)) as usize;
        let h = self.height.min(canvas.height().saturating_sub(y)) as usize;
        let planes: [(&[u8], &[u8], usize); 3] = [
            (&self.y, &self.a, 0),
            (&self.u, &self.ca, 1),
            (&self.v, &self.ca, 1),
        ];
        for (i, (src, alpha, shift)) in planes.into_iter().enumerate() {
            let (pw, ph) = (w >> shift, h >> shift);
            let (px, py) = ((x as usize) >> shift, (y as usize) >> shift);
            let src_stride = (self.width as usize) >> shift;
            let stride = canvas.stride(i);
            let data = canvas.data_mut(i);
            for row in 0..ph {
                let dst = &mut data[(py + row) * stride + px..][..pw];
                let s = &src[row * src_stride..][..pw];
                let a = &alpha[row * src_stride..][..pw];
                for ((d, &s), &a) in dst.iter_mut().zip(s).zip(a) {
                    let (s, a, v) = (u32::from(s), u32::from(a), u32::from(*d));
                    *d = ((s * a + v * (255 - a) + 127) / 255) as u8;
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Encodes RGBA rows as PNG with FFmpeg's encoder: a real PNG for the decoder to read.
    pub(crate) fn png(width: u32, height: u32, rgba: &[u8]) -> Vec<u8> {
        crate::ffmpeg::init();
        let codec = ff::encoder::find(ff::codec::Id::PNG).unwrap();
        let mut enc = ff::codec::context::Context::new_with_codec(codec)
            .encoder()
            .video()
            .unwrap();
        enc.set_width(width);
        enc.set_height(height);
        enc.set_format(Pixel::RGBA);
        enc.set_time_base((1, 25));
        let mut enc = enc.open_as(codec).unwrap();
        let mut picture = ff::frame::Video::new(Pixel::RGBA, width, height);
        let (row, stride) = (width as usize * 4, picture.stride(0));
        for (y, src) in rgba.chunks_exact(row).enumerate() {
            picture.data_mut(0)[y * stride..y * stride + row].copy_from_slice(src);
        }
        picture.set_pts(Some(0));
        enc.send_frame(&picture).unwrap();
        enc.send_eof().unwrap();
        let mut packet = ff::Packet::empty();
        enc.receive_packet(&mut packet).unwrap();
        packet.data().unwrap().to_vec()
    }

    #[test]
    fn a_png_decodes_with_its_alpha_and_odd_sizes_become_even() {
        // 5×3: opaque red on the left column pair, transparent elsewhere.
        let mut rgba = Vec::new();
        for _y in 0..3 {
            for x in 0..5 {
                rgba.extend_from_slice(if x < 2 {
                    &[255, 0, 0, 255]
                } else {
                    &[0, 0, 0, 0]
                });
            }
        }
        let img = Image::from_png(&png(5, 3, &rgba)).unwrap();
        assert_eq!((img.width(), img.height()), (4, 2));
        assert!(img.a[0] > 200, "opaque on the left: {:?}", img.a);
        assert!(img.a[3] < 60, "transparent on the right: {:?}", img.a);
        assert!(Image::from_png(b"not a png").is_err());
        assert!(Image::from_rgba(1, 1, &[0; 4]).is_err());
    }
}
