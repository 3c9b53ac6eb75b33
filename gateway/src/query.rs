//! Query strings as client-go and kubectl write them: form decoding and
//! encoding, and the one way every subresource reads a boolean parameter.

use crate::route::{Reason, Refusal};

/// A boolean query parameter, as `strconv.ParseBool` spells the common
/// forms; a bare `k` (empty value) is true.
pub fn flag(k: &str, v: &str) -> Result<bool, Refusal> {
    match v {
        "" | "1" | "true" | "True" | "TRUE" => Ok(true),
        "0" | "false" | "False" | "FALSE" => Ok(false),
        _ => Err(Refusal::new(
            Reason::BadRequest,
            format!("query parameter {k}={v:?} is not a boolean"),
        )),
    }
}

/// Decodes `application/x-www-form-urlencoded` text (`+` is a space).
pub fn form_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Form-encodes one query value (pure).
pub fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn booleans_as_kubectl_sends_them() {
        for v in ["", "1", "true", "True", "TRUE"] {
            assert!(flag("follow", v).unwrap(), "{v}");
        }
        for v in ["0", "false", "False", "FALSE"] {
            assert!(!flag("follow", v).unwrap(), "{v}");
        }
        let e = flag("follow", "yes").unwrap_err();
        assert_eq!(e.reason, Reason::BadRequest);
        assert!(e.message.contains("follow=\"yes\""), "{}", e.message);
    }

    #[test]
    fn form_text_round_trips() {
        for s in ["echo a&b=c %", "/tmp/x y", "ünï"] {
            assert_eq!(form_decode(&form_encode(s)), s);
        }
        assert_eq!(form_decode("a+b%2"), "a b%2");
    }
}
