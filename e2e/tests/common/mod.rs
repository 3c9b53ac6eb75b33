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
    let ns = wrenn_e2e::temp_namespace(&client, "wt")
        .await
        .expect("create test namespace");
    Some(Env {
        case,
        cp,
        client,
        ns,
    })
}

pub fn api(env: &Env, kind: &str) -> Api<DynamicObject> {
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
    Api::namespaced_with(env.client.clone(), &env.ns, &ar)
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
    api(env, kind)
        .create(&PostParams::default(), &object(kind, name, spec))
        .await
        .map_err(|e| match e {
            kube::Error::Api(resp) => resp.message,
            other => format!("not an API refusal: {other}"),
        })
}
