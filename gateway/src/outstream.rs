//! The WebSocket of a one-way transfer to the client (a download, a tar,
//! the console, a process's output), written without tungstenite: each
//! chunk from the agent goes to the TLS stream as it came, behind a frame
//! header and the channel byte written in the same vectored write.
//!
//! Why: tungstenite takes a message as one contiguous buffer (the channel
//! byte then the data, a copy of every chunk) and copies it again into
//! its write buffer; on a download those two copies were a third of the
//! gateway's memory traffic per byte. The client's side of such a stream
//! carries nothing but control frames, so what is read here is only
//! parsed far enough to answer a ping and to see a close. What goes on the
//! channels (`transfer`) and how the first frame is sent (`channel`) stay
//! theirs.

use std::io::{self, IoSlice};

use bytes::{Buf as _, BytesMut};
use futures::StreamExt as _;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::channel::{MAX_CLIENT_MESSAGE, Socket, number};
use crate::filestream::Chunks;

/// Frame opcodes (RFC 6455, 5.2).
mod opcode {
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// What a client's frame asks of a one-way stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inbound {
    /// The client is closing.
    Close,
    /// A ping, answered with a pong carrying this payload.
    Ping(Vec<u8>),
    /// Anything else (data, a pong): ignored.
    Other,
}

/// The first frame in `buf` (pure): `Ok(None)` until all of it arrived,
/// else what it asks and its length in bytes; `Err` for a frame larger
/// than a client may send.
pub fn parse_inbound(buf: &[u8]) -> Result<Option<(Inbound, usize)>, String> {
    let [b0, b1, rest @ ..] = buf else {
        return Ok(None);
    };
    let (len, rest) = match b1 & 0x7f {
        126 => match rest {
            [a, b, rest @ ..] => (u64::from(u16::from_be_bytes([*a, *b])), rest),
            _ => return Ok(None),
        },
        127 => match rest.split_first_chunk::<8>() {
            Some((l, rest)) => (u64::from_be_bytes(*l), rest),
            None => return Ok(None),
        },
        n => (u64::from(n), rest),
    };
    if len > MAX_CLIENT_MESSAGE as u64 {
        return Err(format!("a client frame of {len} bytes"));
    }
    let len = len as usize;
    let (mask, rest) = match b1 & 0x80 {
        0 => (None, rest),
        _ => match rest.split_first_chunk::<4>() {
            Some((m, rest)) => (Some(*m), rest),
            None => return Ok(None),
        },
    };
    let Some(payload) = rest.get(..len) else {
        return Ok(None);
    };
    let size = buf.len() - rest.len() + len;
    let frame = match b0 & 0x0f {
        opcode::CLOSE => Inbound::Close,
        opcode::PING => Inbound::Ping(
            payload
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask.map_or(0, |m| m[i % 4]))
                .collect(),
        ),
        _ => Inbound::Other,
    };
    Ok(Some((frame, size)))
}

/// The header of a final, unmasked server frame with opcode `op` and a
/// payload of `len` bytes, then `prefix` (the start of the payload); the
/// bytes used of the answer (pure).
pub fn build_head(op: u8, len: usize, prefix: &[u8]) -> ([u8; 16], usize) {
    let mut h = [0u8; 16];
    h[0] = 0x80 | op;
    let mut n = 2;
    match len {
        0..=125 => h[1] = len as u8,
        126..=0xffff => {
            h[1] = 126;
            h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            n = 4;
        }
        _ => {
            h[1] = 127;
            h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            n = 10;
        }
    }
    let p = prefix.len().min(h.len() - n);
    h[n..n + p].copy_from_slice(&prefix[..p]);
    (h, n + p)
}

/// How [`OutSocket::pump`] ended.
#[derive(Debug)]
pub enum Ended {
    /// The chunks ended.
    Done,
    /// The agent's stream failed, with its message.
    Failed(String),
    /// The client closed or the connection broke: nothing more to send.
    Gone,
}

/// The raw connection under a channel-protocol WebSocket.
#[derive(Debug)]
pub struct OutSocket {
    io: TokioIo<Upgraded>,
    inbound: BytesMut,
}

impl OutSocket {
    /// Takes the connection from `ws`, whose messages so far are sent
    /// (flushed) and which has read nothing yet.
    pub async fn take(mut ws: Socket) -> io::Result<Self> {
        futures::SinkExt::flush(&mut ws)
            .await
            .map_err(io::Error::other)?;
        Ok(Self {
            io: ws.into_inner(),
            inbound: BytesMut::with_capacity(256),
        })
    }

    /// Sends `chunks` on stdout until they end, fail, or the client goes.
    pub async fn pump(&mut self, chunks: &mut Chunks) -> Ended {
        loop {
            tokio::select! {
                c = chunks.next() => match c {
                    Some(Ok(b)) => {
                        if self.send(number::STDOUT, &b).await.is_err() {
                            return Ended::Gone;
                        }
                    }
                    Some(Err(e)) => return Ended::Failed(e.to_string()),
                    None => return Ended::Done,
                },
                // Read whatever the client sends: dropping the chunks
                // stops the read in the guest once it closes.
                r = self.io.read_buf(&mut self.inbound) => match r {
                    Ok(n) if n > 0 => {
                        if !self.answer_inbound().await {
                            return Ended::Gone;
                        }
                    }
                    _ => return Ended::Gone,
                },
            }
        }
    }

    /// Answers the complete frames read so far; false once the client
    /// closed or sent what a client may not.
    async fn answer_inbound(&mut self) -> bool {
        loop {
            match parse_inbound(&self.inbound) {
                Ok(None) => return true,
                Ok(Some((frame, size))) => {
                    self.inbound.advance(size);
                    match frame {
                        Inbound::Close => {
                            let _ = self.frame(opcode::CLOSE, &[], &[]).await;
                            return false;
                        }
                        Inbound::Ping(p) => {
                            if self.frame(opcode::PONG, &[], &p).await.is_err() {
                                return false;
                            }
                        }
                        Inbound::Other => {}
                    }
                }
                Err(_) => return false,
            }
        }
    }

    /// Ends the stream as `channel::send_final_status` does: `status` on
    /// the error channel, then a close. A client already gone is no error.
    pub async fn finish(mut self, status: &Value) {
        if self
            .send(number::ERROR, status.to_string().as_bytes())
            .await
            .is_ok()
        {
            let _ = self.frame(opcode::CLOSE, &[], &[]).await;
        }
    }

    /// One binary message on channel `ch`.
    async fn send(&mut self, ch: u8, data: &[u8]) -> io::Result<()> {
        self.frame(opcode::BINARY, &[ch], data).await
    }

    /// One frame whose payload is `prefix` then `data`, flushed: a
    /// console follow must not sit in a buffer.
    async fn frame(&mut self, op: u8, prefix: &[u8], data: &[u8]) -> io::Result<()> {
        let (head, n) = build_head(op, prefix.len() + data.len(), prefix);
        let (mut head, mut data) = (&head[..n], data);
        while !head.is_empty() {
            let w = self
                .io
                .write_vectored(&[IoSlice::new(head), IoSlice::new(data)])
                .await?;
            if w == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            let h = w.min(head.len());
            (head, data) = (&head[h..], &data[w - h..]);
        }
        self.io.write_all(data).await?;
        self.io.flush().await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;

    fn client_frame(op: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let (head, n) = build_head(op, payload.len(), &[]);
        let mut f = head[..n].to_vec();
        f[1] |= 0x80;
        f.extend(mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    #[test]
    fn heads_parse_back_as_tungstenite_reads_them() {
        for len in [0usize, 1, 125, 126, 65535, 65536, 1 << 20] {
            let (head, n) = build_head(opcode::BINARY, len + 1, &[7]);
            assert_eq!(head[n - 1], 7);
            let mut c = std::io::Cursor::new(&head[..n - 1]);
            let (h, l) = FrameHeader::parse(&mut c).unwrap().unwrap();
            assert!(h.is_final);
            assert!(h.mask.is_none());
            assert_eq!(l, len as u64 + 1, "{len}");
            assert_eq!(c.position() as usize, n - 1);
        }
    }

    #[test]
    fn client_frames_answer_pings_and_see_closes() {
        let ping = client_frame(opcode::PING, b"hi");
        for cut in 0..ping.len() {
            assert_eq!(parse_inbound(&ping[..cut]).unwrap(), None, "{cut}");
        }
        assert_eq!(
            parse_inbound(&ping).unwrap(),
            Some((Inbound::Ping(b"hi".to_vec()), ping.len()))
        );
        let mut two = client_frame(opcode::BINARY, &[0; 300]);
        let first = two.len();
        two.extend(client_frame(opcode::CLOSE, &[3, 232]));
        assert_eq!(parse_inbound(&two).unwrap(), Some((Inbound::Other, first)));
        assert_eq!(
            parse_inbound(&two[first..]).unwrap(),
            Some((Inbound::Close, 8))
        );
        let mut huge = vec![0x82, 0xff];
        huge.extend((1u64 << 40).to_be_bytes());
        assert!(parse_inbound(&huge).is_err());
    }
}
