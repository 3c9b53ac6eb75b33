//! How an error is reported at the edge (a gRPC status, a log line): its
//! whole chain of sources, printed once. Each module's `Error` leaves its
//! source out of its own message, so this is the one place they join.

/// The error and its sources, `: `-separated.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_prints_every_source() {
        let e = crate::files::Error::Io {
            op: "open",
            path: "/x".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(chain(&e), "open \"/x\": entity not found");
    }
}
