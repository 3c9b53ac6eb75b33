//! Test doubles of the controllers and the pool (controller-rs `fixtures.rs`): a fake
//! API server that answers a scripted sequence of requests and fails the
//! test on any request out of order, and a [`Context`] over it and a
//! [`FakeNodeAgent`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::Value;
use wrenn_proto::agent::v1 as pb;

use crate::agent::fake::{FakeConnector, FakeNodeAgent};
use crate::controller::{Context, Parts, Settings};
use crate::metrics::Metrics;
use crate::pool::{AgentPool, PoolStreams};

/// What one request must be, and the answer.
struct Expect {
    method: Method,
    /// Path, and the query parameters that must be present.
    path: String,
    query: Vec<String>,
    check: Box<dyn Fn(&Value) + Send>,
    reply: Reply,
}

/// The answer to a request.
pub enum Reply {
    /// This status and JSON body.
    Json(StatusCode, Value),
    /// 201 with the request's own body (what a create answers).
    Echo,
    /// Never answers (a watch that stays open).
    Hang,
    /// 200 with this body once the sender fires (a watch event the test
    /// releases when it is ready for it).
    When(tokio::sync::oneshot::Receiver<()>, Value),
}

/// A fake API server: requests must arrive exactly in the scripted order.
#[derive(Clone, Default)]
pub struct ApiServer {
    script: Arc<Mutex<VecDeque<Expect>>>,
    failures: Arc<Mutex<Vec<String>>>,
}

impl ApiServer {
    /// Expects `method` on `path_and_query` (every query parameter given
    /// must be present; others may be), answering `reply`; `check` looks at
    /// the JSON body.
    /// Expects a GET of `path_and_query` (a read has no body to check).
    pub fn get(&self, path_and_query: &str, reply: Reply) -> &Self {
        self.expect(Method::GET, path_and_query, |_| {}, reply)
    }

    pub fn expect(
        &self,
        method: Method,
        path_and_query: &str,
        check: impl Fn(&Value) + Send + 'static,
        reply: Reply,
    ) -> &Self {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        self.script.lock().unwrap().push_back(Expect {
            method,
            path: path.to_string(),
            query: query
                .split('&')
                .filter(|q| !q.is_empty())
                .map(str::to_string)
                .collect(),
            check: Box::new(check),
            reply,
        });
        self
    }

    /// A client whose every request goes to this server.
    pub fn client(&self) -> kube::Client {
        let me = self.clone();
        let svc = tower::service_fn(move |req: Request<Body>| {
            let me = me.clone();
            async move { me.serve(req).await }
        });
        kube::Client::new(svc, "default")
    }

    async fn serve(&self, req: Request<Body>) -> Result<Response<Body>, std::convert::Infallible> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let bytes = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let next = self.script.lock().unwrap().pop_front();
        let seen = format!("{method} {path}?{query}");
        let Some(e) = next else {
            return Ok(self.fail(format!("unexpected request {seen}")));
        };
        if e.method != method || e.path != path {
            return Ok(self.fail(format!("expected {} {}, got {seen}", e.method, e.path)));
        }
        let params: Vec<&str> = query.split('&').collect();
        if let Some(q) = e.query.iter().find(|q| !params.contains(&q.as_str())) {
            return Ok(self.fail(format!("{seen}: query lacks {q}")));
        }
        (e.check)(&body);
        match e.reply {
            Reply::Json(status, v) => Ok(json(status, &v)),
            Reply::Echo => Ok(json(StatusCode::CREATED, &body)),
            Reply::Hang => futures::future::pending().await,
            Reply::When(signal, v) => {
                let _ = signal.await;
                Ok(json(StatusCode::OK, &v))
            }
        }
    }

    fn fail(&self, what: String) -> Response<Body> {
        self.failures.lock().unwrap().push(what.clone());
        json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": what, "reason": "InternalError", "code": 500}),
        )
    }

    /// Fails the test unless every scripted request came, in order, and
    /// nothing else did.
    pub fn done(&self) {
        let failures = self.failures.lock().unwrap().clone();
        assert!(failures.is_empty(), "{failures:#?}");
        let left: Vec<String> = self
            .script
            .lock()
            .unwrap()
            .iter()
            .map(|e| format!("{} {}", e.method, e.path))
            .collect();
        assert!(left.is_empty(), "requests never made: {left:#?}");
    }
}

fn json(status: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

/// A 404 as the API server sends it.
pub fn not_found(kind: &str, name: &str) -> Reply {
    Reply::Json(
        StatusCode::NOT_FOUND,
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": format!("{kind} {name:?} not found"), "reason": "NotFound", "code": 404}),
    )
}

/// 200 with this object.
pub fn ok(v: impl serde::Serialize) -> Reply {
    Reply::Json(StatusCode::OK, serde_json::to_value(v).unwrap())
}

/// A node's fake agent with this many vCPUs, 8 GiB and 100 GiB.
pub fn agent(node: &str, vcpus: u32) -> Arc<FakeNodeAgent> {
    agent_booting_in(node, vcpus, Duration::from_secs(3600))
}

/// [`agent`] whose VMs boot in `boot` (zero: inside the create call, as
/// the real agent answers a create once the guest booted).
pub fn agent_booting_in(node: &str, vcpus: u32, boot: Duration) -> Arc<FakeNodeAgent> {
    FakeNodeAgent::new(
        node,
        pb::Resources {
            vcpus,
            memory_bytes: 8 << 30,
            disk_bytes: 100 << 30,
        },
        boot,
    )
}

/// A pool holding `agents`, each synced.
pub async fn pool(agents: &[Arc<FakeNodeAgent>]) -> (AgentPool, PoolStreams) {
    let connector = Arc::new(FakeConnector::default());
    for a in agents {
        connector.add(a.clone());
    }
    let (pool, streams) = AgentPool::new(connector, Duration::from_secs(3600));
    for (i, a) in agents.iter().enumerate() {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 1 + i as u16));
        pool.upsert(a.node(), addr);
    }
    pool.discovered();
    wrenn_testkit::eventually(Duration::from_secs(5), "agents never synced", || {
        pool.ready_nodes().len() >= agents.len()
    })
    .await;
    (pool, streams)
}

/// The common opening of a controller test: `node-a` (4 vCPUs) in a
/// synced pool, and an API server that expects nothing yet. Keep the
/// streams alive for as long as the pool is used.
pub async fn node_a() -> (Arc<FakeNodeAgent>, AgentPool, PoolStreams, ApiServer) {
    let node = agent("node-a", 4);
    let (pool, streams) = pool(std::slice::from_ref(&node)).await;
    (node, pool, streams, ApiServer::default())
}

/// A context over `server` and `pool`, with empty Node and Capsule stores
/// and no settle grace.
pub fn context(server: &ApiServer, pool: AgentPool) -> Arc<Context> {
    let (nodes, _) = kube::runtime::reflector::store();
    let (capsules, _) = kube::runtime::reflector::store();
    let parts = Parts {
        client: server.client(),
        pool,
        nodes,
        metrics: Arc::new(Metrics::new(
            &mut prometheus_client::registry::Registry::default(),
        )),
        settings: Settings {
            settle_grace: Duration::ZERO,
            ..Settings::default()
        },
        instance: None,
    };
    Arc::new(parts.into_context(capsules))
}

/// Capsule `c1` (uid `u1`) in namespace `ns`, from template `base`, at
/// generation 1.
pub fn capsule_c1() -> wrenn_crds::Capsule {
    let mut c = wrenn_crds::Capsule::new(
        "c1",
        wrenn_crds::capsule::CapsuleSpec {
            source: wrenn_crds::capsule::CapsuleSource {
                template_ref: Some(wrenn_crds::capsule::TemplateRef {
                    name: "base".into(),
                }),
                snapshot_ref: None,
            },
            ..Default::default()
        },
    );
    c.metadata.namespace = Some("ns".into());
    c.metadata.uid = Some("u1".into());
    c.metadata.generation = Some(1);
    c
}

/// Template `base` (uid `t1`) in namespace `ns`, from an image.
pub fn template() -> wrenn_crds::CapsuleTemplate {
    let mut t = wrenn_crds::CapsuleTemplate::new(
        "base",
        wrenn_crds::template::CapsuleTemplateSpec {
            source: wrenn_crds::template::TemplateSource {
                image: Some(wrenn_crds::template::ImageSource {
                    reference: "docker.io/library/debian:bookworm".into(),
                    pull_secret: None,
                }),
                ..Default::default()
            },
            ..Default::default()
        },
    );
    t.metadata.namespace = Some("ns".into());
    t.metadata.uid = Some("t1".into());
    t
}
