//! A small OCI distribution registry over plain HTTP on 127.0.0.1 for tests
//! of image pulls: it serves images pushed by the test (one uncompressed tar
//! layer each) and, when started with a user and password, asks for them
//! the way Docker Hub and most registries do: `GET /v2/` answers 401 with a
//! `Bearer realm=…/token` challenge, the token endpoint trades basic
//! credentials for a token, and manifests and blobs need that token.
//!
//! Refusals carry OCI error envelopes with the registry's own words, so a
//! test can check they reach the user: a repository under `limited/`
//! always answers 429 `TOOMANYREQUESTS`, an unknown tag 404
//! `MANIFEST_UNKNOWN`, a missing or wrong token 401 `UNAUTHORIZED`, and the
//! token endpoint 401 `incorrect username or password`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// The token endpoint's refusal, as registries word it.
pub const BAD_LOGIN: &str = "incorrect username or password";
/// What a `limited/` repository answers.
pub const RATE_LIMITED: &str = "pull rate limit exceeded for this test";
/// What an unknown tag answers.
pub const UNKNOWN: &str = "manifest unknown to this test registry";

#[derive(Default)]
struct State {
    /// `repo:tag` → manifest bytes.
    manifests: Mutex<HashMap<String, Vec<u8>>>,
    /// digest → bytes.
    blobs: Mutex<HashMap<String, Vec<u8>>>,
    manifest_gets: AtomicUsize,
    token_gets: AtomicUsize,
}

/// A running registry; stops when dropped.
pub struct Registry {
    addr: String,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The config of every test image: linux/amd64, nothing else.
pub const IMAGE_CONFIG: &[u8] =
    br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{}}"#;

/// The OCI manifest of an image of `config` and one `layer` whose media
/// type is `layer_type`.
pub fn image_manifest(config: &[u8], layer: &[u8], layer_type: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(config), "size": config.len()},
        "layers": [{"mediaType": layer_type, "digest": digest(layer), "size": layer.len()}],
    }))
    .expect("a JSON value always serialises")
}

/// `sha256:<hex>` of `b`, as OCI names content.
pub fn digest(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

/// Standard base64 (for the expected `Authorization: Basic` value).
pub fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A tar of one GNU sparse entry at `path` storing `data` at `offset` and
/// declaring `real_size` bytes: unpacked naively, it writes `real_size`
/// bytes (a hostile layer when that is far more than it carries).
pub fn sparse_layer(
    path: &str,
    offset: u64,
    data: &[u8],
    real_size: u64,
) -> std::io::Result<Vec<u8>> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_path(path)?;
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(data.len() as u64);
    let gnu = h
        .as_gnu_mut()
        .ok_or_else(|| std::io::Error::other("a GNU header has a GNU view"))?;
    gnu.sparse[0].set_offset(offset);
    gnu.sparse[0].set_length(data.len() as u64);
    gnu.set_real_size(real_size);
    h.set_cksum();
    let mut v = h.as_bytes().to_vec();
    v.extend_from_slice(data);
    v.resize(v.len().div_ceil(512) * 512, 0);
    v.extend_from_slice(&[0; 1024]);
    Ok(v)
}

/// An uncompressed tar of `files` (path, content), root-owned, mode 0755,
/// mtime 0: an image layer.
pub fn tar_layer(files: &[(&str, &[u8])]) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_data(&mut h, path, *data)?;
    }
    b.into_inner()
}

struct Auth {
    basic: String,
    token: String,
}

impl Registry {
    /// Starts a registry; with `login` (user, password) it asks for them.
    pub async fn start(login: Option<(&str, &str)>) -> std::io::Result<Registry> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let state = Arc::new(State::default());
        let auth = login.map(|(u, p)| {
            Arc::new(Auth {
                basic: format!("Basic {}", base64(format!("{u}:{p}").as_bytes())),
                token: format!("t-{}", &digest(format!("{u}{p}").as_bytes())[7..23]),
            })
        });
        let task = tokio::spawn(serve(listener, addr.clone(), state.clone(), auth));
        Ok(Registry { addr, state, task })
    }

    /// `127.0.0.1:PORT`, the registry part of references.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Pushes an image of `files` (path, content) as `repo:tag` and returns
    /// its manifest digest.
    pub fn push(&self, repo: &str, tag: &str, files: &[(&str, &[u8])]) -> std::io::Result<String> {
        let layer = tar_layer(files)?;
        let config = IMAGE_CONFIG.to_vec();
        let manifest = image_manifest(&config, &layer, "application/vnd.oci.image.layer.v1.tar");
        let md = digest(&manifest);
        let mut blobs = self.state.blobs.lock().unwrap_or_else(|p| p.into_inner());
        blobs.insert(digest(&config), config);
        blobs.insert(digest(&layer), layer);
        drop(blobs);
        let mut manifests = self
            .state
            .manifests
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        manifests.insert(format!("{repo}:{tag}"), manifest.clone());
        manifests.insert(format!("{repo}:{md}"), manifest);
        Ok(md)
    }

    /// Manifest requests answered so far (any outcome).
    pub fn manifest_gets(&self) -> usize {
        self.state.manifest_gets.load(Ordering::Relaxed)
    }

    /// Token requests answered so far.
    pub fn token_gets(&self) -> usize {
        self.state.token_gets.load(Ordering::Relaxed)
    }
}

struct Reply {
    status: &'static str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn envelope(status: &'static str, code: &str, message: &str) -> Reply {
    Reply {
        status,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: serde_json::json!({"errors": [{"code": code, "message": message}]})
            .to_string()
            .into_bytes(),
    }
}

fn answer(
    method: &str,
    path: &str,
    authz: &str,
    addr: &str,
    st: &State,
    auth: Option<&Auth>,
) -> Reply {
    let challenge = || {
        (
            "WWW-Authenticate".to_string(),
            format!(r#"Bearer realm="http://{addr}/token",service="wrenn-test""#),
        )
    };
    if path.starts_with("/token") {
        st.token_gets.fetch_add(1, Ordering::Relaxed);
        return match auth {
            Some(a) if authz == a.basic => Reply {
                status: "200 OK",
                headers: vec![("Content-Type".into(), "application/json".into())],
                body: serde_json::json!({"token": a.token})
                    .to_string()
                    .into_bytes(),
            },
            _ => Reply {
                status: "401 Unauthorized",
                headers: vec![("Content-Type".into(), "application/json".into())],
                body: serde_json::json!({"details": BAD_LOGIN})
                    .to_string()
                    .into_bytes(),
            },
        };
    }
    let authorized = auth.is_none_or(|a| authz == format!("Bearer {}", a.token));
    if path == "/v2/" {
        return if authorized {
            Reply {
                status: "200 OK",
                headers: Vec::new(),
                body: b"{}".to_vec(),
            }
        } else {
            let mut r = envelope(
                "401 Unauthorized",
                "UNAUTHORIZED",
                "authentication required",
            );
            r.headers.push(challenge());
            r
        };
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return envelope("404 Not Found", "NOT_FOUND", "no such route");
    };
    let is_manifest = rest.contains("/manifests/");
    if is_manifest {
        st.manifest_gets.fetch_add(1, Ordering::Relaxed);
    }
    if !authorized {
        let mut r = envelope(
            "401 Unauthorized",
            "UNAUTHORIZED",
            "authentication required",
        );
        r.headers.push(challenge());
        return r;
    }
    if rest.starts_with("limited/") {
        return envelope("429 Too Many Requests", "TOOMANYREQUESTS", RATE_LIMITED);
    }
    if let Some((repo, reference)) = rest.split_once("/manifests/") {
        let found = st
            .manifests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&format!("{repo}:{reference}"))
            .cloned();
        return match found {
            Some(m) => Reply {
                status: "200 OK",
                headers: vec![
                    (
                        "Content-Type".into(),
                        "application/vnd.oci.image.manifest.v1+json".into(),
                    ),
                    ("Docker-Content-Digest".into(), digest(&m)),
                ],
                body: if method == "HEAD" { Vec::new() } else { m },
            },
            None => envelope("404 Not Found", "MANIFEST_UNKNOWN", UNKNOWN),
        };
    }
    if let Some((_, d)) = rest.split_once("/blobs/") {
        let found = st
            .blobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(d)
            .cloned();
        return match found {
            Some(b) => Reply {
                status: "200 OK",
                headers: vec![("Content-Type".into(), "application/octet-stream".into())],
                body: b,
            },
            None => envelope("404 Not Found", "BLOB_UNKNOWN", "blob unknown"),
        };
    }
    envelope("404 Not Found", "NOT_FOUND", "no such route")
}

async fn serve(listener: TcpListener, addr: String, st: Arc<State>, auth: Option<Arc<Auth>>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            return;
        };
        let (st, auth, addr) = (st.clone(), auth.clone(), addr.clone());
        tokio::spawn(async move {
            let (r, mut w) = sock.into_split();
            let mut r = BufReader::new(r);
            // Keep-alive: one connection may carry several requests.
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let (mut authz, mut length) = (String::new(), 0usize);
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if h == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':') {
                        let v = v.trim().to_string();
                        match k.to_ascii_lowercase().as_str() {
                            "authorization" => authz = v,
                            "content-length" => length = v.parse().unwrap_or(0),
                            _ => {}
                        }
                    }
                }
                let mut body = vec![0; length];
                if r.read_exact(&mut body).await.is_err() {
                    return;
                }
                let mut parts = line.split_whitespace();
                let method = parts.next().unwrap_or("").to_string();
                let path = parts.next().unwrap_or("").to_string();
                let reply = answer(&method, &path, &authz, &addr, &st, auth.as_deref());
                let mut head = format!(
                    "HTTP/1.1 {}\r\nContent-Length: {}\r\n",
                    reply.status,
                    reply.body.len()
                );
                for (k, v) in &reply.headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                if w.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                if method != "HEAD" && w.write_all(&reply.body).await.is_err() {
                    return;
                }
            }
        });
    }
}
