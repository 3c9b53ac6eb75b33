//! Cloud Hypervisor's event monitor (`--event-monitor path=<file>`): each
//! event is a pretty-printed JSON object followed by a blank line, not one
//! object per line. [`EventParser`] takes bytes as they arrive (partial
//! reads included) and yields whole events; [`EventFile`] tails the file CH
//! writes, which survives agent restarts, unlike a pipe (CH writes
//! non-blocking and drops events a slow reader misses).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::vmm::Error;
use crate::vmm::process::{VmmExit, VmmProcess, classify_exit};

/// Time since VMM start (a serde `Duration`), not wall-clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct EventTimestamp {
    /// Seconds.
    pub secs: u64,
    /// Nanoseconds.
    pub nanos: u32,
}

/// One event as CH writes it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Event {
    /// Since VMM start.
    #[serde(default)]
    pub timestamp: EventTimestamp,
    /// `vmm`, `vm`, `virtio-device`, `guest`...
    pub source: String,
    /// `booted`, `shutdown`, `device-removed`...
    pub event: String,
    /// `null` or a string map, e.g. `{"id":"_disk0"}`.
    #[serde(default)]
    pub properties: Option<BTreeMap<String, String>>,
}

/// The events the agent acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// `vmm/starting`.
    VmmStarting,
    /// `vmm/shutdown`: the process is about to exit in order (guest
    /// poweroff or `vmm.shutdown`).
    VmmShutdown,
    /// `vm/booting`; without a following `booted`, the boot failed.
    VmBooting,
    /// `vm/booted`: vCPUs started (not guest readiness).
    VmBooted,
    /// `vm/paused`.
    VmPaused,
    /// `vm/resumed`.
    VmResumed,
    /// `vm/snapshotting`.
    VmSnapshotting,
    /// `vm/snapshotted`.
    VmSnapshotted,
    /// `vm/restored`.
    VmRestored,
    /// `vm/shutdown`.
    VmShutdown,
    /// `vm/deleted`.
    VmDeleted,
    /// `vm/rebooted`.
    VmRebooted,
    /// `guest/panic` (pvpanic).
    GuestPanic,
    /// Anything else.
    Other,
}

impl Event {
    /// Classifies the event.
    pub fn kind(&self) -> EventKind {
        match (self.source.as_str(), self.event.as_str()) {
            ("vmm", "starting") => EventKind::VmmStarting,
            ("vmm", "shutdown") => EventKind::VmmShutdown,
            ("vm", "booting") => EventKind::VmBooting,
            ("vm", "booted") => EventKind::VmBooted,
            ("vm", "paused") => EventKind::VmPaused,
            ("vm", "resumed") => EventKind::VmResumed,
            ("vm", "snapshotting") => EventKind::VmSnapshotting,
            ("vm", "snapshotted") => EventKind::VmSnapshotted,
            ("vm", "restored") => EventKind::VmRestored,
            ("vm", "shutdown") => EventKind::VmShutdown,
            ("vm", "deleted") => EventKind::VmDeleted,
            ("vm", "rebooted") => EventKind::VmRebooted,
            ("guest", "panic") => EventKind::GuestPanic,
            _ => EventKind::Other,
        }
    }
}

/// A stream parser over the event-monitor byte stream.
#[derive(Debug, Default)]
pub struct EventParser {
    buf: Vec<u8>,
}

/// An event that did not parse: its text is skipped.
#[derive(Debug, thiserror::Error)]
#[error("unreadable event {text:?}")]
pub struct BadEvent {
    /// The skipped text (truncated to 256 bytes).
    pub text: String,
    /// Why.
    #[source]
    pub source: serde_json::Error,
}

impl EventParser {
    /// Appends `bytes` and returns every event now complete, in order. An
    /// incomplete trailing object stays buffered for the next call.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Result<Event, BadEvent>> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut consumed = 0;
        loop {
            let rest = &self.buf[consumed..];
            // NULs are what a capped file's punched-out head reads as.
            let start = rest
                .iter()
                .take_while(|b| b.is_ascii_whitespace() || **b == 0)
                .count();
            if start == rest.len() {
                consumed = self.buf.len();
                break;
            }
            let rest = &rest[start..];
            // Framing first (any JSON value), typing second, so an event of
            // an unexpected shape cannot desynchronise the stream.
            let mut stream =
                serde_json::Deserializer::from_slice(rest).into_iter::<serde_json::Value>();
            match stream.next() {
                Some(Ok(value)) => {
                    let used = stream.byte_offset();
                    out.push(serde_json::from_value(value).map_err(|source| BadEvent {
                        text: lossy(&rest[..used]),
                        source,
                    }));
                    consumed += start + used;
                }
                Some(Err(e)) if e.is_eof() => {
                    consumed += start;
                    break;
                }
                Some(Err(source)) => {
                    // Garbage: skip to the next blank line, CH's separator.
                    let skip = rest.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
                    match skip {
                        Some(n) => {
                            out.push(Err(BadEvent {
                                text: lossy(&rest[..n]),
                                source,
                            }));
                            consumed += start + n;
                        }
                        None => {
                            consumed += start;
                            break;
                        }
                    }
                }
                None => {
                    consumed += start;
                    break;
                }
            }
        }
        self.buf.drain(..consumed);
        out
    }

    /// Bytes held back waiting for the rest of an event.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(256)]).into_owned()
}

/// Tails an event-monitor file from the start.
#[derive(Debug)]
pub struct EventFile {
    path: PathBuf,
    offset: u64,
    parser: EventParser,
}

impl EventFile {
    /// Tails `path` (it may not exist yet).
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            offset: 0,
            parser: EventParser::default(),
        }
    }

    /// Reads what was appended since the last call and returns the events
    /// now complete. A file shorter than what was read (CH truncates it when
    /// a new VMM starts) is read again from the start.
    pub async fn read_new(&mut self) -> std::io::Result<Vec<Result<Event, BadEvent>>> {
        let mut file = match tokio::fs::File::open(&self.path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let len = file.metadata().await?.len();
        if len < self.offset {
            self.offset = 0;
            self.parser = EventParser::default();
        }
        file.seek(std::io::SeekFrom::Start(self.offset)).await?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).await?;
        self.offset += bytes.len() as u64;
        Ok(self.parser.push(&bytes))
    }
}

impl EventFile {
    /// Waits until at least one new event (or unreadable entry) has been
    /// appended, checking every `poll`. A regular file gives no readiness
    /// signal, so this polls; pair it with the process watcher to stop.
    pub async fn next_batch(
        &mut self,
        poll: std::time::Duration,
    ) -> std::io::Result<Vec<Result<Event, BadEvent>>> {
        loop {
            let batch = self.read_new().await?;
            if !batch.is_empty() {
                return Ok(batch);
            }
            tokio::time::sleep(poll).await;
        }
    }
}

/// Waits for `process` to exit and classifies it
/// ([`classify_exit`](crate::vmm::process::classify_exit)) with the events
/// Cloud Hypervisor wrote to `event_file` (its `--event-monitor` file): a
/// `vmm/shutdown` among them is an orderly exit.
pub async fn watch_exit(process: &VmmProcess, event_file: &Path) -> Result<VmmExit, Error> {
    let status = process.wait().await?;
    let read = EventFile::new(event_file)
        .read_new()
        .await
        .map_err(|source| Error::ReadEvents {
            capsule: process.capsule().to_string(),
            path: event_file.to_path_buf(),
            source,
        })?;
    let orderly = read
        .into_iter()
        .filter_map(Result::ok)
        .any(|e| e.kind() == EventKind::VmmShutdown);
    Ok(classify_exit(status, orderly, process.stop_was_requested()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = "{\n  \"timestamp\": {\n    \"secs\": 11,\n    \"nanos\": 249433292\n  },\n  \"source\": \"vm\",\n  \"event\": \"booting\",\n  \"properties\": null\n}\n\n{\n  \"timestamp\": {\n    \"secs\": 11,\n    \"nanos\": 300000000\n  },\n  \"source\": \"virtio-device\",\n  \"event\": \"activated\",\n  \"properties\": {\n    \"id\": \"_disk0\"\n  }\n}\n\n";

    #[test]
    fn byte_at_a_time_gives_the_same_events() {
        let mut p = EventParser::default();
        let mut got = Vec::new();
        for b in TWO.as_bytes() {
            got.extend(p.push(std::slice::from_ref(b)));
        }
        let got: Vec<Event> = got.into_iter().map(Result::unwrap).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].kind(), EventKind::VmBooting);
        assert_eq!(got[0].timestamp.nanos, 249433292);
        assert_eq!(got[1].properties.as_ref().unwrap()["id"], "_disk0");
        assert_eq!(p.pending(), 0);
    }

    #[tokio::test]
    async fn a_tailed_file_yields_events_as_they_are_appended() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.json");
        let mut tail = EventFile::new(&path);
        assert!(
            tail.read_new().await.unwrap().is_empty(),
            "missing file is empty"
        );
        let mut f = std::fs::File::create(&path).unwrap();
        let (first, second) = TWO.split_at(TWO.len() / 2 + 20);
        f.write_all(first.as_bytes()).unwrap();
        let got = tail
            .next_batch(std::time::Duration::from_millis(5))
            .await
            .unwrap();
        assert_eq!(got.len(), 1);
        f.write_all(second.as_bytes()).unwrap();
        let got = tail
            .next_batch(std::time::Duration::from_millis(5))
            .await
            .unwrap();
        assert_eq!(
            got[0].as_ref().unwrap().properties.as_ref().unwrap()["id"],
            "_disk0"
        );
        // CH truncates the file when a new VMM starts: read from the top.
        std::fs::write(&path, &TWO[..TWO.len() / 2 + 20]).unwrap();
        let got = tail
            .next_batch(std::time::Duration::from_millis(5))
            .await
            .unwrap();
        assert_eq!(got[0].as_ref().unwrap().kind(), EventKind::VmBooting);
    }

    #[test]
    fn garbage_and_odd_shapes_are_skipped_not_fatal() {
        let mut p = EventParser::default();
        let input = format!("not json at all\n\n{{\"source\":1}}\n\n{TWO}");
        let got = p.push(input.as_bytes());
        assert_eq!(got.len(), 4);
        assert!(got[0].is_err() && got[1].is_err());
        assert!(got[2].is_ok() && got[3].is_ok());
    }
}
