//! The rule for the names of nodes, regions and the manager's records, shared by the
//! configuration (a node's `--node-group`) and the stream manager (registrations, stored
//! records).
//!
//! Guarantees: a name that passes [`name_ok`] is 1 to 128 printable ASCII characters with no
//! spaces, so it goes into logs, metrics labels and URLs' path segments as it is. (Broadcast
//! names have their own rule: [`crate::media::valid_name`].)

/// A node id, region or record name: 1 to 128 printable ASCII characters, no spaces.
pub(crate) fn name_ok(s: &str) -> bool {
    (1..=128).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(name_ok("eu-west/1"));
        assert!(name_ok(&"a".repeat(128)));
        assert!(!name_ok(""));
        assert!(!name_ok(&"a".repeat(129)));
        assert!(!name_ok("a b"));
        assert!(!name_ok("é"));
    }
}
