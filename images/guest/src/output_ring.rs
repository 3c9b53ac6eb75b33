//! The bounded output of one detached process (pure): stdout and stderr
//! chunks in the order they were read, addressed by absolute byte offsets
//! since the process started, the oldest bytes dropped once the ring holds
//! more than its capacity. Readers keep their own offset, so any number
//! of them read one ring, each learning how many bytes it missed.

use std::collections::VecDeque;

/// Which stream a chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug)]
struct Chunk {
    /// Absolute offset of `data[0]`.
    start: u64,
    stream: Stream,
    data: Vec<u8>,
}

/// What one read returns.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Read {
    /// Bytes between the reader's offset and the oldest byte held: lost.
    pub dropped: u64,
    /// Chunks from the offset on, at most the read's limit in all.
    pub chunks: Vec<(Stream, Vec<u8>)>,
    /// Where the next read starts.
    pub next: u64,
}

/// The ring.
#[derive(Debug)]
pub struct Ring {
    capacity: usize,
    chunks: VecDeque<Chunk>,
    /// Absolute offset of the oldest byte held.
    head: u64,
    /// Absolute offset after the newest byte: bytes written since start.
    end: u64,
}

impl Ring {
    /// An empty ring keeping at most `capacity` bytes (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            chunks: VecDeque::new(),
            head: 0,
            end: 0,
        }
    }

    /// Bytes written since start.
    pub fn written(&self) -> u64 {
        self.end
    }

    /// Bytes dropped since start.
    pub fn dropped(&self) -> u64 {
        self.head
    }

    /// Appends `data` from `stream`, dropping the oldest bytes beyond the
    /// capacity (of `data` itself too, when it alone is larger).
    pub fn push(&mut self, stream: Stream, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.chunks.push_back(Chunk {
            start: self.end,
            stream,
            data: data.to_vec(),
        });
        self.end += data.len() as u64;
        let cap = self.capacity as u64;
        while self.end - self.head > cap {
            let excess = self.end - self.head - cap;
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let len = front.data.len() as u64;
            if len <= excess {
                self.head += len;
                self.chunks.pop_front();
            } else {
                let cut = usize::try_from(excess).unwrap_or(front.data.len());
                front.data.drain(..cut);
                front.start += excess;
                self.head += excess;
            }
        }
    }

    /// Up to `limit` bytes from offset `from` on.
    pub fn read_from(&self, from: u64, limit: usize) -> Read {
        let dropped = self.head.saturating_sub(from);
        let mut at = from.max(self.head);
        let mut left = limit;
        let mut chunks = Vec::new();
        for c in &self.chunks {
            if left == 0 {
                break;
            }
            let c_end = c.start + c.data.len() as u64;
            if c_end <= at {
                continue;
            }
            let skip = usize::try_from(at - c.start).unwrap_or(0);
            let take = (c.data.len() - skip).min(left);
            chunks.push((c.stream, c.data[skip..skip + take].to_vec()));
            at += take as u64;
            left -= take;
        }
        Read {
            dropped,
            chunks,
            next: at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(r: &Read) -> String {
        r.chunks
            .iter()
            .map(|(_, d)| String::from_utf8_lossy(d).into_owned())
            .collect()
    }

    #[test]
    fn keeps_order_across_streams_and_reads_in_pieces() {
        let mut r = Ring::new(100);
        r.push(Stream::Stdout, b"abc");
        r.push(Stream::Stderr, b"de");
        r.push(Stream::Stdout, b"f");
        let all = r.read_from(0, 100);
        assert_eq!(all.dropped, 0);
        assert_eq!(
            all.chunks,
            vec![
                (Stream::Stdout, b"abc".to_vec()),
                (Stream::Stderr, b"de".to_vec()),
                (Stream::Stdout, b"f".to_vec())
            ]
        );
        assert_eq!(all.next, 6);
        let first = r.read_from(0, 4);
        assert_eq!((text(&first), first.next), ("abcd".to_string(), 4));
        let rest = r.read_from(first.next, 100);
        assert_eq!((text(&rest), rest.next), ("ef".to_string(), 6));
        assert!(r.read_from(6, 100).chunks.is_empty());
    }

    #[test]
    fn drops_the_oldest_bytes_and_tells_each_reader_what_it_missed() {
        let mut r = Ring::new(4);
        r.push(Stream::Stdout, b"abc");
        r.push(Stream::Stdout, b"def");
        assert_eq!((r.written(), r.dropped()), (6, 2));
        let from_start = r.read_from(0, 100);
        assert_eq!(from_start.dropped, 2);
        assert_eq!(text(&from_start), "cdef");
        // A reader that had read "abc" missed nothing.
        let later = r.read_from(3, 100);
        assert_eq!((later.dropped, text(&later)), (0, "def".to_string()));
        // One chunk larger than the ring keeps its newest bytes.
        r.push(Stream::Stderr, b"0123456789");
        let all = r.read_from(0, 100);
        assert_eq!((all.dropped, text(&all)), (12, "6789".to_string()));
        assert_eq!(all.next, 16);
    }
}
