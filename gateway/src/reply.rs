//! HTTP replies: whole bodies (JSON, text, API `Status`) and streamed ones
//! (file contents, tar, the console), behind one body type.

use std::convert::Infallible;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::Value;

use crate::route::Refusal;

/// Why a streamed body stopped early: the connection is cut, so the client
/// sees a short body rather than a complete-looking one.
#[derive(Debug, thiserror::Error)]
#[error("stream from the node agent broke: {0}")]
pub struct BodyError(pub String);

/// Every reply's body.
pub type Body = UnsyncBoxBody<Bytes, BodyError>;

/// A reply.
pub type Reply = Response<Body>;

fn full(b: Bytes) -> Body {
    Full::new(b)
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// `body` as JSON with `code`.
pub fn json(code: StatusCode, body: &Value) -> Reply {
    let mut r = Response::new(full(Bytes::from(body.to_string())));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The refusal's `Status` with its code.
pub fn refuse(r: &Refusal) -> Reply {
    json(
        StatusCode::from_u16(r.reason.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &r.to_status(),
    )
}

/// Plain text.
pub fn text(code: StatusCode, body: &'static str) -> Reply {
    let mut r = Response::new(full(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = code;
    r
}

/// A 200 streaming `chunks` as `content_type`, with `Content-Length` when
/// `length` is known.
pub fn stream<S>(content_type: &'static str, length: Option<u64>, chunks: S) -> Reply
where
    S: Stream<Item = Result<Bytes, BodyError>> + Send + 'static,
{
    let body = StreamBody::new(chunks.map(|c| c.map(Frame::data))).boxed_unsync();
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(n) = length {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    r
}
