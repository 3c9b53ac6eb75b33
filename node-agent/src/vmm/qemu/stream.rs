//! QEMU's migration stream to and from a snapshot file, through a Unix
//! socket in the capsule's run dir that the agent serves.
//!
//! QEMU 7.2 has no `file:` migration, and `exec:` would make it fork a
//! shell: refused by `-sandbox spawn=deny`, and the shell would see only
//! QEMU's confined view, where snapshot directories are hidden. So the
//! agent, outside that view, holds the file and moves the bytes.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

/// The socket's name in the run dir.
pub const MIGRATION_SOCKET: &str = "migrate.sock";

/// A copy in flight; dropping it aborts the copy.
#[derive(Debug)]
pub struct Transfer {
    socket: PathBuf,
    task: Option<JoinHandle<io::Result<u64>>>,
}

impl Transfer {
    /// The `migrate`/`migrate-incoming` URI for QEMU.
    pub fn uri(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    /// Waits for the copy to end (QEMU closes its side once the migration
    /// completed) and returns the bytes moved.
    pub async fn finish(mut self, within: Duration) -> io::Result<u64> {
        let Some(task) = self.task.take() else {
            return Err(io::Error::other("transfer already finished"));
        };
        let result = match tokio::time::timeout(within, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(join)) => Err(io::Error::other(format!("copy task: {join}"))),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("stream not finished within {within:?}"),
            )),
        };
        let _ = std::fs::remove_file(&self.socket);
        result
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

/// Outgoing migration: listens on `run_dir/migrate.sock` and writes what
/// QEMU sends into `file` (created, synced before the copy reports done).
pub fn save(run_dir: &Path, file: &Path) -> io::Result<Transfer> {
    let socket = run_dir.join(MIGRATION_SOCKET);
    remove_stale(&socket)?;
    let listener = UnixListener::bind(&socket)?;
    let file = file.to_path_buf();
    let task = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await?;
        let mut out = tokio::fs::File::create(&file).await?;
        let n = tokio::io::copy(&mut conn, &mut out).await?;
        out.sync_all().await?;
        Ok(n)
    });
    Ok(Transfer {
        socket,
        task: Some(task),
    })
}

/// Incoming migration: once QEMU listens on `run_dir/migrate.sock` (after
/// `migrate-incoming`), sends it `file`. Connection attempts stop after
/// `within`.
pub fn load(run_dir: &Path, file: &Path, within: Duration) -> io::Result<Transfer> {
    let socket = run_dir.join(MIGRATION_SOCKET);
    remove_stale(&socket)?;
    let file = file.to_path_buf();
    let path = socket.clone();
    let task = tokio::spawn(async move {
        let mut input = tokio::fs::File::open(&file).await?;
        let deadline = tokio::time::Instant::now() + within;
        let mut conn = loop {
            match UnixStream::connect(&path).await {
                Ok(c) => break c,
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        let n = tokio::io::copy(&mut input, &mut conn).await?;
        conn.shutdown().await?;
        Ok(n)
    });
    Ok(Transfer {
        socket,
        task: Some(task),
    })
}

fn remove_stale(socket: &Path) -> io::Result<()> {
    match std::fs::remove_file(socket) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_round_trips_through_the_socket_into_the_file_and_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("memory.qemu");
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();

        // QEMU's side of an outgoing migration: connect and send.
        let out = save(dir.path(), &file).unwrap();
        assert!(out.uri().starts_with("unix:"));
        let mut qemu = UnixStream::connect(dir.path().join(MIGRATION_SOCKET))
            .await
            .unwrap();
        qemu.write_all(&payload).await.unwrap();
        drop(qemu);
        assert_eq!(
            out.finish(Duration::from_secs(5)).await.unwrap(),
            payload.len() as u64
        );
        assert_eq!(std::fs::read(&file).unwrap(), payload);
        assert!(!dir.path().join(MIGRATION_SOCKET).exists());

        // QEMU's side of an incoming one: listen (a little late) and read.
        let back = load(dir.path(), &file, Duration::from_secs(5)).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let listener = UnixListener::bind(dir.path().join(MIGRATION_SOCKET)).unwrap();
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut conn, &mut got)
            .await
            .unwrap();
        assert_eq!(got, payload);
        back.finish(Duration::from_secs(5)).await.unwrap();
    }
}
