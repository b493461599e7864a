//! Shared by the benches: the 720p fixture's tags.

use bytes::Bytes;
use castnode::rtmp::flv::{FlvReader, RawTag};

/// The tags of `fixtures/bench-720p.flv` (run `bash fixtures/make.sh` first).
pub fn bench_tags() -> Vec<RawTag> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/bench-720p.flv");
    let data =
        std::fs::read(path).expect("fixtures/bench-720p.flv: run `bash fixtures/make.sh` first");
    FlvReader::new(Bytes::from(data))
        .expect("an FLV file")
        .collect()
}
