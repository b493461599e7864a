//! Shared by the QUIC benches: the receiving side's reading of group streams.

use quinn_proto::{Connection, Dir, StreamId};

/// Takes the connection's new unidirectional streams into `open`, reads and drops what arrived
/// on each (so flow-control credit goes back, as an edge's reader gives it), forgets the streams
/// that ended, and returns the bytes read.
pub fn drain_uni(conn: &mut Connection, open: &mut Vec<StreamId>) -> u64 {
    let mut bytes = 0;
    while conn.poll().is_some() {}
    while let Some(id) = conn.streams().accept(Dir::Uni) {
        open.push(id);
    }
    open.retain(|&id| {
        let mut stream = conn.recv_stream(id);
        let Ok(mut chunks) = stream.read(true) else {
            return false;
        };
        let mut ended = false;
        loop {
            match chunks.next(usize::MAX) {
                Ok(Some(c)) => bytes += c.bytes.len() as u64,
                Ok(None) => {
                    ended = true;
                    break;
                }
                Err(_) => break,
            }
        }
        let _ = chunks.finalize();
        !ended
    });
    bytes
}
