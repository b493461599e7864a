//! Pure bitstream code: no I/O, no protocol. Parsers take untrusted bytes and return `None` or an
//! error rather than panic.

pub(crate) mod aac;
pub(crate) mod bits;
pub mod h264;
