//! Shared setup of the cluster-tier tests: a Case, the control plane, a
//! client and a fresh namespace, or a skip naming what is missing.

use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use serde_json::Value;
use wrenn_e2e::ControlPlane;
use wrenn_testkit::{Case, Tier, case};

// kube::Client has no Debug.
#[allow(missing_debug_implementations)]
pub struct Env {
    pub case: Case,
    pub cp: &'static ControlPlane,
    pub client: Client,
    pub ns: String,
}

/// `None` when the control plane cannot run here (the skip is recorded).
pub async fn setup(name: &str) -> Option<Env> {
    setup_in(name, false).await
}

/// [`setup`] in a namespace a cluster admin allowed to name node image
/// files (`rootfs.path`, `kernel`).
#[allow(dead_code)]
pub async fn setup_node_images(name: &str) -> Option<Env> {
    setup_in(name, true).await
}

async fn setup_in(name: &str, node_images: bool) -> Option<Env> {
    let case = case(Tier::Cluster, name);
    let cp = match tokio::task::spawn_blocking(ControlPlane::shared).await {
        Ok(Ok(cp)) => cp,
        Ok(Err(why)) => {
            case.skip(format!("no control plane: {why}"));
            return None;
        }
        Err(join) => panic!("control plane start panicked: {join}"),
    };
    let client = cp
        .client()
        .await
        .expect("client for the test control plane");
    let ns = if node_images {
        wrenn_e2e::node_images_namespace(&client, "wt").await
    } else {
        wrenn_e2e::temp_namespace(&client, "wt").await
    }
    .expect("create test namespace");
    Some(Env {
        case,
        cp,
        client,
        ns,
    })
}

pub fn api(env: &Env, kind: &str) -> Api<DynamicObject> {
    api_in(&env.client, &env.ns, kind)
}

/// [`api`] in namespace `ns`.
pub fn api_in(client: &Client, ns: &str, kind: &str) -> Api<DynamicObject> {
    let plural = match kind {
        "Capsule" => "capsules",
        "CapsuleSnapshot" => "capsulesnapshots",
        "CapsuleTemplate" => "capsuletemplates",
        other => panic!("unknown kind {other}"),
    };
    let ar = ApiResource {
        group: "wrenn.dev".into(),
        version: "v1alpha1".into(),
        api_version: "wrenn.dev/v1alpha1".into(),
        kind: kind.into(),
        plural: plural.into(),
    };
    Api::namespaced_with(client.clone(), ns, &ar)
}

pub fn object(kind: &str, name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "wrenn.dev/v1alpha1",
        "kind": kind,
        "metadata": { "name": name },
        "spec": spec,
    }))
    .expect("a well-formed object")
}

/// Creates an object, returning the API server's refusal message if any.
pub async fn create(
    env: &Env,
    kind: &str,
    name: &str,
    spec: Value,
) -> Result<DynamicObject, String> {
    create_in(&env.client, &env.ns, kind, name, spec).await
}

/// [`create`] in namespace `ns`.
pub async fn create_in(
    client: &Client,
    ns: &str,
    kind: &str,
    name: &str,
    spec: Value,
) -> Result<DynamicObject, String> {
    api_in(client, ns, kind)
        .create(&PostParams::default(), &object(kind, name, spec))
        .await
        .map_err(|e| match e {
            kube::Error::Api(resp) => resp.message,
            other => format!("not an API refusal: {other}"),
        })
}
