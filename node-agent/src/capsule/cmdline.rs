//! The guest kernel command line: the agent's own part (root disk, init,
//! network) and the few tokens a template may add. Anything that could
//! change what runs as the guest's PID 1 or which disk is its root
//! (`init=`, `rdinit=`, `root=`, `--` and the arguments after it, module
//! parameters) is refused. The CRD's `KERNEL_ARG_PATTERN` mirrors
//! [`allowed`]; a test checks they agree token by token.

/// A template's kernel command line holds a token outside the allow-list.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "kernel command line token {token:?} is not allowed; a template may add only quiet, debug, \
     loglevel=0-7, panic=<seconds> and console=ttyS0-3|hvc0-7[,<baud>]"
)]
pub struct Refused {
    /// The first token refused.
    pub token: String,
}

/// Whether a template may add `token` (one space-separated word).
pub fn allowed(token: &str) -> bool {
    match token.split_once('=') {
        None => matches!(token, "quiet" | "debug"),
        Some(("loglevel", v)) => matches!(v.as_bytes(), [b'0'..=b'7']),
        Some(("panic", v)) => {
            let digits = v.strip_prefix('-').unwrap_or(v);
            (1..=4).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
        }
        Some(("console", v)) => {
            let (dev, baud) = match v.split_once(',') {
                Some((d, b)) => (d, Some(b)),
                None => (v, None),
            };
            let dev_ok = match (dev.strip_prefix("ttyS"), dev.strip_prefix("hvc")) {
                (Some(n), _) => matches!(n.as_bytes(), [b'0'..=b'3']),
                (_, Some(n)) => matches!(n.as_bytes(), [b'0'..=b'7']),
                _ => false,
            };
            let baud_ok = baud.is_none_or(|b| {
                (1..=7).contains(&b.len()) && b.bytes().all(|c| c.is_ascii_digit())
            });
            dev_ok && baud_ok
        }
        Some(_) => false,
    }
}

/// Checks a template's extra command line: space-separated tokens, each
/// [`allowed`]. Any other whitespace is part of a token, so it is refused
/// too (the kernel would split on it).
pub fn check(extra: &str) -> Result<(), Refused> {
    match extra.split(' ').find(|t| !t.is_empty() && !allowed(t)) {
        Some(token) => Err(Refused {
            token: token.to_string(),
        }),
        None => Ok(()),
    }
}

/// The whole command line: the agent's `base`, its network argument, then
/// the template's allowed tokens. The gRPC edge refuses a spec with any
/// other token; one journaled before the allow-list existed has those
/// dropped here, so a restart never boots what the edge now refuses.
pub fn build(base: &str, net: &str, extra: &str) -> String {
    let mut out: Vec<&str> = [base, net].into_iter().filter(|s| !s.is_empty()).collect();
    for token in extra.split(' ').filter(|t| !t.is_empty()) {
        if allowed(token) {
            out.push(token);
        } else {
            tracing::warn!(
                token,
                "dropping a kernel command line token outside the allow-list"
            );
        }
    }
    out.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens and whether a template may add them.
    const TABLE: &[(&str, bool)] = &[
        ("quiet", true),
        ("debug", true),
        ("loglevel=0", true),
        ("loglevel=7", true),
        ("panic=1", true),
        ("panic=-1", true),
        ("panic=9999", true),
        ("console=ttyS0", true),
        ("console=ttyS3,115200", true),
        ("console=hvc0", true),
        ("console=hvc7,9600", true),
        ("init=/bin/sh", false),
        ("rdinit=/bin/sh", false),
        ("root=/dev/vdb", false),
        ("rootfstype=9p", false),
        ("--", false),
        ("-", false),
        ("x", false),
        ("quiet=1", false),
        ("loglevel=8", false),
        ("loglevel=", false),
        ("loglevel=07", false),
        ("panic=", false),
        ("panic=12345", false),
        ("panic=1x", false),
        ("console=ttyS4", false),
        ("console=tty0", false),
        ("console=hvc8", false),
        ("console=ttyS0,", false),
        ("console=ttyS0,12345678", false),
        ("console=ttyS0,115200n8", false),
        ("Quiet", false),
        ("quiet\tinit=/bin/sh", false),
        ("quiet\ninit=/bin/sh", false),
        ("\"init=/bin/sh\"", false),
        ("modprobe.blacklist=virtio_net", false),
        ("systemd.unit=rescue.target", false),
        ("ip=10.0.0.9::10.0.0.1:255.255.255.0::eth0:off", false),
        ("single", false),
    ];

    #[test]
    fn only_allow_listed_tokens_pass() {
        for (token, ok) in TABLE {
            assert_eq!(allowed(token), *ok, "{token:?}");
        }
    }

    /// The API server refuses with the CRD's CEL rule what the agent
    /// refuses here; RE2 (CEL's `matches`) and the `regex` crate agree on
    /// this pattern's syntax.
    #[test]
    fn the_crd_rule_accepts_exactly_what_the_agent_accepts() {
        let cel = regex::Regex::new(wrenn_crds::template::KERNEL_ARG_PATTERN).unwrap();
        for (token, ok) in TABLE {
            assert_eq!(cel.is_match(token), *ok, "CRD pattern on {token:?}");
        }
        // The CRD checks the whole line with one pattern; it must agree
        // with the agent's token-by-token check on every line.
        let line = regex::Regex::new(wrenn_crds::template::KERNEL_CMDLINE_PATTERN).unwrap();
        let mut lines: Vec<String> = TABLE.iter().map(|(t, _)| t.to_string()).collect();
        for (a, _) in TABLE {
            for (b, _) in TABLE {
                lines.push(format!("{a} {b}"));
                lines.push(format!(" {a}  {b} "));
            }
        }
        lines.extend(["", "   ", "quiet\tinit=/x", "quiet -- x"].map(String::from));
        for l in &lines {
            assert_eq!(
                line.is_match(l),
                check(l).is_ok(),
                "CRD line pattern on {l:?}"
            );
        }
    }

    #[test]
    fn check_names_the_first_refused_token() {
        check("").unwrap();
        check("quiet  loglevel=3 console=hvc0").unwrap();
        for (line, token) in [
            ("quiet rdinit=/bin/sh", "rdinit=/bin/sh"),
            ("init=/bin/sh", "init=/bin/sh"),
            ("root=/dev/vdb quiet", "root=/dev/vdb"),
            ("quiet -- x", "--"),
            ("quiet\tinit=/x", "quiet\tinit=/x"),
        ] {
            let e = check(line).unwrap_err();
            assert_eq!(e.token, token, "{line:?}");
            assert!(e.to_string().contains(&format!("{token:?}")), "{e}");
        }
    }

    #[test]
    fn build_puts_the_agent_first_and_drops_what_is_not_allowed() {
        assert_eq!(
            build(
                "console=ttyS0 root=/dev/vda",
                "ip=1",
                "quiet  init=/bin/sh -- x"
            ),
            "console=ttyS0 root=/dev/vda ip=1 quiet"
        );
        assert_eq!(build("b", "", ""), "b");
    }
}
