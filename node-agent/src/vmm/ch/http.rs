//! The HTTP/1.1 exchange with Cloud Hypervisor's micro_http server over its
//! API Unix socket, hand-rolled because fds must ride as SCM_RIGHTS in the
//! same `sendmsg` as the request bytes, which no general HTTP client does
//! (CH's own `api_client` crate is the model).
//!
//! One connection per call: CH serialises requests anyway, the server caps
//! connections at 10, and a fresh connection never inherits a half-read
//! response from a call that timed out. Request bodies carry
//! `Content-Length` (CH rejects chunked); responses are framed by
//! `Content-Length` (204 has none) because CH keeps connections alive.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

use super::api::Method;
use super::error::ApiError;
use crate::sys::fd_passing::send_with_fds;

/// Responses larger than this are refused (CH's own request limit is 4 MiB;
/// `vm.info` of a large VM stays far below).
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// A response: status and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Body bytes (empty for 204).
    pub body: Vec<u8>,
}

/// Builds the request bytes. No body means no `Content-Length` header at
/// all, as CH's reference client does.
pub fn build_request(method: Method, path: &str, body: Option<&[u8]>) -> Vec<u8> {
    let mut head = format!(
        "{} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n",
        method.as_str()
    );
    if let Some(body) = body {
        head.push_str("Content-Type: application/json\r\n");
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    if let Some(body) = body {
        out.extend_from_slice(body);
    }
    out
}

/// A parsed response head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    /// Status code.
    pub status: u16,
    /// Body length (0 when absent).
    pub content_length: usize,
    /// Bytes taken by the head including the blank line.
    pub len: usize,
}

/// Parses a response head from the start of `buf`: `Ok(None)` until the
/// blank line has arrived. CH's status line has no reason phrase
/// (`HTTP/1.1 200 `).
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, ApiError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > 64 * 1024 {
            return Err(ApiError::Malformed(
                "response head longer than 64 KiB".into(),
            ));
        }
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..end])
        .map_err(|_| ApiError::Malformed("head is not UTF-8".into()))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split(' ');
    let proto = parts.next().unwrap_or_default();
    if !proto.starts_with("HTTP/1.") {
        return Err(ApiError::Malformed(format!("status line {status_line:?}")));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| ApiError::Malformed(format!("status line {status_line:?}")))?;
    let mut content_length = 0;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(ApiError::Malformed(format!("header line {line:?}")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = value
                .parse()
                .map_err(|_| ApiError::Malformed(format!("Content-Length {value:?}")))?;
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && !value.eq_ignore_ascii_case("identity")
        {
            return Err(ApiError::Malformed(format!(
                "unsupported Transfer-Encoding {value:?}"
            )));
        }
    }
    if content_length > MAX_RESPONSE_BYTES {
        return Err(ApiError::Malformed(format!(
            "body of {content_length} bytes"
        )));
    }
    Ok(Some(Head {
        status,
        content_length,
        len: end + 4,
    }))
}

/// Connects to `socket`, sends `request` with `fds` attached to its first
/// bytes and reads one response. No timeout here: the client wraps it.
pub async fn exchange(
    socket: &Path,
    request: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<Response, ApiError> {
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(ApiError::Connect)?;
    let mut sent = 0;
    if !fds.is_empty() {
        // The fds go with the first sendmsg that writes any bytes.
        sent = stream
            .async_io(Interest::WRITABLE, || {
                send_with_fds(stream.as_fd(), request, fds)
            })
            .await
            .map_err(ApiError::Send)?;
    }
    stream
        .write_all(&request[sent..])
        .await
        .map_err(ApiError::Send)?;
    read_response(&mut stream).await
}

async fn read_response(stream: &mut UnixStream) -> Result<Response, ApiError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(head) = parse_head(&buf)? {
            // A bare `100 Continue` precedes the real answer only if we sent
            // `Expect`, which we do not; skip it anyway.
            if head.status == 100 {
                buf.drain(..head.len);
                continue;
            }
            let total = head.len + head.content_length;
            while buf.len() < total {
                let n = stream.read(&mut chunk).await.map_err(ApiError::Receive)?;
                if n == 0 {
                    return Err(ApiError::Receive(std::io::ErrorKind::UnexpectedEof.into()));
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok(Response {
                status: head.status,
                body: buf[head.len..total].to_vec(),
            });
        }
        let n = stream.read(&mut chunk).await.map_err(ApiError::Receive)?;
        if n == 0 {
            return Err(ApiError::Receive(std::io::ErrorKind::UnexpectedEof.into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_with_and_without_body() {
        let r = build_request(Method::Put, "/api/v1/vm.boot", None);
        assert_eq!(
            String::from_utf8(r).unwrap(),
            "PUT /api/v1/vm.boot HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n"
        );
        let r = String::from_utf8(build_request(Method::Put, "/api/v1/vm.create", Some(b"{}")))
            .unwrap();
        assert!(r.contains("Content-Length: 2\r\n") && r.ends_with("\r\n\r\n{}"));
    }

    #[test]
    fn heads_as_ch_sends_them() {
        // 200 without reason phrase.
        let h = parse_head(b"HTTP/1.1 200 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\nhello")
            .unwrap()
            .unwrap();
        assert_eq!((h.status, h.content_length), (200, 5));
        // 204 without Content-Length.
        let h = parse_head(
            b"HTTP/1.1 204 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!((h.status, h.content_length), (204, 0));
        assert!(
            parse_head(b"HTTP/1.1 200 \r\nContent-Le")
                .unwrap()
                .is_none()
        );
        assert!(parse_head(b"SSH-2.0\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 \r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
    }
}
