//! FFmpeg's own log lines, through `tracing`: FFmpeg's default callback writes raw lines
//! (`[h264 @ 0x…] …`) to stderr, outside the node's log format and with no broadcast named.
//!
//! Guarantees:
//! - Once [`super::init`] ran, every line FFmpeg logs at [`FFMPEG_LEVEL`] or more severe goes to
//!   `tracing` under the target `ffmpeg`, at a mapped level (FFmpeg's errors and worse as
//!   `warn`, its warnings as `info`), with the broadcast named by the [`Scope`] of the thread
//!   that called FFmpeg (`-` on FFmpeg's own threads).
//! - Nothing reaches stderr directly.
//!
//! The one place castnode uses `unsafe`: FFmpeg takes a C function pointer with a C `va_list`,
//! which only FFmpeg's own formatter (`av_log_format_line2`) reads.
#![allow(unsafe_code)] // A C callback and two FFI calls; each `unsafe` block says why it holds.

use std::cell::RefCell;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::Arc;

use ffmpeg_next::ffi;
use tracing::{debug, info, trace, warn};

/// FFmpeg's log levels (libavutil/log.h).
const AV_LOG_ERROR: c_int = 16;
const AV_LOG_WARNING: c_int = 24;
const AV_LOG_INFO: c_int = 32;
/// The least severe level FFmpeg formats and hands over: its warnings.
pub(crate) const FFMPEG_LEVEL: c_int = AV_LOG_WARNING;

thread_local! {
    /// The broadcast this thread is calling FFmpeg for.
    static BROADCAST: RefCell<Option<Arc<str>>> = const { RefCell::new(None) };
}

/// Names a broadcast in FFmpeg's log lines from this thread until it drops.
pub(crate) struct Scope(Option<Arc<str>>);

impl Scope {
    /// FFmpeg calls on this thread are for `broadcast` until the scope drops.
    pub(crate) fn enter(broadcast: &Arc<str>) -> Scope {
        Scope(BROADCAST.with_borrow_mut(|b| b.replace(broadcast.clone())))
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let previous = self.0.take();
        BROADCAST.with_borrow_mut(|b| *b = previous);
    }
}

/// Routes FFmpeg's log through [`callback`]. Called once, by [`super::init`].
pub(super) fn install() {
    // SAFETY: both are plain setters of FFmpeg's global log state; `callback` has the exact
    // signature FFmpeg's bindings declare and never unwinds (it only formats and logs).
    unsafe {
        ffi::av_log_set_level(FFMPEG_LEVEL);
        ffi::av_log_set_callback(Some(callback));
    }
}

/// The `va_list` parameter as the bindings declare it: a pointer on x86-64, a value elsewhere.
#[cfg(target_arch = "x86_64")]
type VaList = *mut ffi::__va_list_tag;
#[cfg(not(target_arch = "x86_64"))]
type VaList = ffi::va_list;

unsafe extern "C" fn callback(avcl: *mut c_void, level: c_int, fmt: *const c_char, vl: VaList) {
    if level > FFMPEG_LEVEL {
        return;
    }
    let mut line = [0 as c_char; 1024];
    let mut print_prefix: c_int = 1;
    // SAFETY: FFmpeg hands `avcl`, `fmt` and `vl` to this callback to be formatted exactly
    // this way (its own default callback does the same); `line` is writable for its length,
    // and FFmpeg NUL-terminates what it writes, truncating to fit.
    unsafe {
        ffi::av_log_format_line2(
            avcl,
            level,
            fmt,
            vl,
            line.as_mut_ptr(),
            line.len() as c_int,
            &mut print_prefix,
        );
    }
    // SAFETY: `line` is NUL-terminated (zeroed, and written by FFmpeg with a terminator).
    let text = unsafe { CStr::from_ptr(line.as_ptr()) }.to_string_lossy();
    emit(level, text.trim_end());
}

/// Logs one of FFmpeg's lines at the mapped level.
fn emit(level: c_int, text: &str) {
    if text.is_empty() {
        return;
    }
    BROADCAST.with_borrow(|b| {
        let broadcast = b.as_deref().unwrap_or("-");
        match level {
            l if l <= AV_LOG_ERROR => warn!(target: "ffmpeg", broadcast, "{text}"),
            l if l <= AV_LOG_WARNING => info!(target: "ffmpeg", broadcast, "{text}"),
            l if l <= AV_LOG_INFO => debug!(target: "ffmpeg", broadcast, "{text}"),
            _ => trace!(target: "ffmpeg", broadcast, "{text}"),
        }
    });
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Mutex;

    use super::*;
    use crate::ffmpeg::video::Reencoder;
    use crate::media::Frame;

    /// What a test's `tracing` subscriber wrote.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn scope_names_the_broadcast_and_nests() {
        let name: Arc<str> = "live/a".into();
        let inner: Arc<str> = "live/b".into();
        {
            let _a = Scope::enter(&name);
            BROADCAST.with_borrow(|b| assert_eq!(b.as_deref(), Some("live/a")));
            {
                let _b = Scope::enter(&inner);
                BROADCAST.with_borrow(|b| assert_eq!(b.as_deref(), Some("live/b")));
            }
            BROADCAST.with_borrow(|b| assert_eq!(b.as_deref(), Some("live/a")));
        }
        BROADCAST.with_borrow(|b| assert_eq!(b.as_deref(), None));
    }

    /// The decoder's complaint about a slice that names a PPS it never got (what a decoder fed
    /// from the middle of a GOP prints) comes through `tracing`, naming the broadcast.
    #[test]
    fn decoder_errors_are_logged_through_tracing() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let mut reencoder = Reencoder::new(None).unwrap();
            let name: Arc<str> = "live/mid-gop".into();
            let _scope = Scope::enter(&name);
            // A non-IDR slice (NAL type 1) of PPS 0: first_mb 0, slice_type P, pps_id 0.
            let payload = bytes::Bytes::from_static(&[0, 0, 0, 4, 0x41, 0xE0, 0x00, 0x00]);
            let frame = Frame {
                pts: 0,
                dts: 0,
                keyframe: false,
                payload,
            };
            let mut frames = Vec::new();
            for _ in 0..3 {
                let _ = reencoder.push(&frame, None, &mut frames);
            }
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.contains("WARN ffmpeg") && text.contains("live/mid-gop") && text.contains("PPS"),
            "logged:\n{text}"
        );
    }
}
