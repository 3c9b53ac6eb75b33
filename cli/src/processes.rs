//! `exec --detach`, `ps`, `kill` and `logs`: detached processes in a
//! capsule through the gateway's `capsules/processes` (plain HTTP, JSON
//! answers; `logs` a WebSocket, [`crate::transfer`], which a follow needs
//! to outlive the API server's request timeout), as the user. The table `ps` prints is
//! built apart from the I/O ([`build_table`]); `attach` lives in
//! [`crate::attach`].

use serde_json::Value;
use tokio::io::AsyncWriteExt as _;
use wrenn_gateway::processes::build_path;
use wrenn_gateway::route::Subresource;

use crate::cluster::{self, Target};
use crate::transfer::Session;

/// Why a process verb failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request could not be built (a name no URL can carry).
    #[error("build the request for capsule {capsule:?}")]
    Request {
        /// The capsule.
        capsule: String,
        /// Why.
        #[source]
        source: http::Error,
    },
    /// The API server or the gateway refused.
    #[error("{what} in capsule {capsule:?}")]
    Refused {
        /// What was asked.
        what: &'static str,
        /// The capsule.
        capsule: String,
        /// Why.
        #[source]
        source: cluster::Error,
    },
    /// The output stream was refused or broke.
    #[error("read the output of {which} in capsule {capsule:?}")]
    Read {
        /// The pid or tag.
        which: String,
        /// The capsule.
        capsule: String,
        /// Why.
        #[source]
        source: crate::transfer::Error,
    },
}

/// The query naming a process: a number is a pid, anything else a tag
/// (pure).
pub fn plan_ref(which: &str) -> (&'static str, &str) {
    if !which.is_empty() && which.bytes().all(|b| b.is_ascii_digit()) {
        ("pid", which)
    } else {
        ("tag", which)
    }
}

async fn call(
    target: &Target,
    capsule: &str,
    what: &'static str,
    req: Result<http::Request<Vec<u8>>, http::Error>,
) -> Result<Value, Error> {
    let req = req.map_err(|source| Error::Request {
        capsule: capsule.to_string(),
        source,
    })?;
    target
        .client
        .request::<Value>(req)
        .await
        .map_err(|e| Error::Refused {
            what,
            capsule: capsule.to_string(),
            source: target.refusal(e, "capsule", capsule),
        })
}

/// Starts `command` detached, tagged `tag` when given; answers the
/// process as the gateway shows it.
pub async fn start(
    target: &Target,
    capsule: &str,
    tag: Option<&str>,
    command: &[String],
) -> Result<Value, Error> {
    let mut q: Vec<(&str, &str)> = command.iter().map(|c| ("command", c.as_str())).collect();
    if let Some(t) = tag {
        q.push(("tag", t));
    }
    let path = build_path(&target.namespace, capsule, Subresource::Processes, &q);
    call(
        target,
        capsule,
        "start a detached process",
        http::Request::post(path).body(Vec::new()),
    )
    .await
}

/// Every process the capsule keeps, oldest first.
pub async fn list(target: &Target, capsule: &str) -> Result<Vec<Value>, Error> {
    let path = build_path(&target.namespace, capsule, Subresource::Processes, &[]);
    let list = call(
        target,
        capsule,
        "list processes",
        http::Request::get(path).body(Vec::new()),
    )
    .await?;
    Ok(list["items"].as_array().cloned().unwrap_or_default())
}

/// Sends `signal` (a name or number) to the process `which` names.
pub async fn kill(
    target: &Target,
    capsule: &str,
    which: &str,
    signal: &str,
) -> Result<Value, Error> {
    let (key, value) = plan_ref(which);
    let q = [("op", "signal"), (key, value), ("signal", signal)];
    let path = build_path(&target.namespace, capsule, Subresource::Processes, &q);
    call(
        target,
        capsule,
        "signal a process",
        http::Request::post(path).body(Vec::new()),
    )
    .await
}

/// Copies the kept output of `which` to our stdout (and with `follow`
/// what comes next until it exits). The count of bytes the ring dropped
/// goes to stderr first, from the process list.
pub async fn logs(target: &Target, capsule: &str, which: &str, follow: bool) -> Result<(), Error> {
    let (key, value) = plan_ref(which);
    let dropped = list(target, capsule)
        .await?
        .iter()
        .rev()
        .find(|p| p[key].to_string().trim_matches('"') == value)
        .and_then(|p| p["droppedBytes"].as_u64())
        .unwrap_or(0);
    if dropped > 0 {
        eprint!(
            "{}",
            wrenn_gateway::processes::build_dropped_notice(dropped)
        );
    }
    // A WebSocket, so a follow outlives the API server's request timeout.
    let query = format!(
        "op=logs&{key}={}&follow={follow}",
        crate::transfer::encode(value)
    );
    let stream = |source| Error::Read {
        which: which.to_string(),
        capsule: capsule.to_string(),
        source,
    };
    let mut s = Session::open(target, capsule, "processes", &query)
        .await
        .map_err(stream)?;
    let mut stdout = tokio::io::stdout();
    while let Some(b) = s.next().await.map_err(stream)? {
        // A reader that went away (`| head`) ends us quietly.
        if stdout.write_all(&b).await.is_err() || stdout.flush().await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// One line of `ps` for a process (pure).
fn row(p: &Value) -> [String; 6] {
    let state = p["state"].as_str().unwrap_or("?").to_string();
    let exit = match (p["exitCode"].as_i64(), p["signal"].as_i64()) {
        (Some(c), _) => c.to_string(),
        (None, Some(s)) => format!("signal {s}"),
        (None, None) => String::new(),
    };
    let command = p["command"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    [
        p["pid"].to_string(),
        p["tag"].as_str().unwrap_or("").to_string(),
        state,
        exit,
        p["startedAt"].as_str().unwrap_or("").to_string(),
        command,
    ]
}

/// The `ps` table: a header and one aligned line per process (pure).
pub fn build_table(processes: &[Value]) -> String {
    let header = ["PID", "TAG", "STATE", "EXIT", "STARTED", "COMMAND"].map(String::from);
    let rows: Vec<[String; 6]> = std::iter::once(header)
        .chain(processes.iter().map(row))
        .collect();
    let mut widths = [0usize; 6];
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}   ", width = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_are_pids_and_the_rest_tags() {
        assert_eq!(plan_ref("123"), ("pid", "123"));
        assert_eq!(plan_ref("web"), ("tag", "web"));
        assert_eq!(plan_ref("web1"), ("tag", "web1"));
    }

    #[test]
    fn ps_shows_state_exit_and_command() {
        let t = build_table(&[
            json!({"pid": 7, "tag": "web", "state": "Running", "command": ["python3", "-m", "http.server"], "startedAt": "2026-12-03T20:00:00Z"}),
            json!({"pid": 9, "tag": "", "state": "Exited", "signal": 15, "command": ["sleep", "9"], "startedAt": "2026-12-03T20:00:01Z"}),
            json!({"pid": 11, "tag": "job", "state": "Exited", "exitCode": 3, "command": ["false"]}),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("PID   TAG   STATE"), "{t}");
        assert!(lines[1].contains("web") && lines[1].ends_with("python3 -m http.server"));
        assert!(lines[2].contains("signal 15"), "{t}");
        assert!(lines[3].contains(" 3 "), "{t}");
    }
}
