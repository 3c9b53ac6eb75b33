//! Discovery and OpenAPI documents (pure). The API server marks the
//! `APIService` available only when `/apis/GROUP/VERSION` answers, and
//! kubectl reads these to map `capsules/exec`. Only subresources this
//! gateway serves are listed.

use serde_json::{Value, json};

use crate::route::Subresource;
use crate::{GROUP, RESOURCE, VERSION};

fn group_version() -> String {
    format!("{GROUP}/{VERSION}")
}

/// `/apis/GROUP`: the group and its one version.
pub fn build_api_group() -> Value {
    let gv = json!({ "groupVersion": group_version(), "version": VERSION });
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": GROUP,
        "versions": [gv.clone()],
        "preferredVersion": gv,
    })
}

/// `/apis`: the groups this server serves.
pub fn build_api_group_list() -> Value {
    let mut g = build_api_group();
    if let Some(o) = g.as_object_mut() {
        o.remove("kind");
        o.remove("apiVersion");
    }
    json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": [g] })
}

/// `/apis/GROUP/VERSION`: one entry per served subresource, with the verbs
/// kubectl and RBAC use for it (as `pods/exec`: create and get).
pub fn build_api_resource_list() -> Value {
    let resources: Vec<Value> = Subresource::SERVED
        .iter()
        .map(|s| {
            json!({
                "name": format!("{RESOURCE}/{}", s.as_str()),
                "singularName": "",
                "namespaced": true,
                "kind": "Status",
                "verbs": ["create", "get"],
            })
        })
        .collect();
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version(),
        "resources": resources,
    })
}

fn paths() -> Value {
    let mut paths = serde_json::Map::new();
    for s in Subresource::SERVED {
        let path = format!(
            "/apis/{GROUP}/{VERSION}/namespaces/{{namespace}}/{RESOURCE}/{{name}}/{}",
            s.as_str()
        );
        let op = |verb: &str| {
            json!({
                "description": format!("connect {verb} requests to {} of a Capsule (WebSocket, v5.channel.k8s.io)", s.as_str()),
                "operationId": format!("connect{verb}NamespacedCapsule{}", s.as_str()),
                "responses": { "101": { "description": "Switching Protocols" } },
                "x-kubernetes-action": "connect",
                "x-kubernetes-group-version-kind": { "group": GROUP, "version": VERSION, "kind": "Capsule" },
            })
        };
        paths.insert(
            path,
            json!({
                "get": op("Get"),
                "post": op("Post"),
                "parameters": [
                    { "name": "namespace", "in": "path", "required": true, "type": "string" },
                    { "name": "name", "in": "path", "required": true, "type": "string" },
                    { "name": "command", "in": "query", "type": "string" },
                    { "name": "stdin", "in": "query", "type": "boolean" },
                    { "name": "stdout", "in": "query", "type": "boolean" },
                    { "name": "stderr", "in": "query", "type": "boolean" },
                    { "name": "tty", "in": "query", "type": "boolean" },
                ],
            }),
        );
    }
    Value::Object(paths)
}

/// `/openapi/v2`.
pub fn build_openapi_v2() -> Value {
    json!({
        "swagger": "2.0",
        "info": { "title": "wrenn-gateway", "version": VERSION },
        "paths": paths(),
        "definitions": {},
    })
}

/// `/openapi/v3`: where the group's document is.
pub fn build_openapi_v3_index() -> Value {
    json!({ "paths": { format!("apis/{GROUP}/{VERSION}"): {
        "serverRelativeURL": format!("/openapi/v3/apis/{GROUP}/{VERSION}")
    } } })
}

/// `/openapi/v3/apis/GROUP/VERSION`. Path parameters in v3 carry a schema.
pub fn build_openapi_v3_group() -> Value {
    let mut paths = paths();
    if let Some(map) = paths.as_object_mut() {
        for item in map.values_mut() {
            if let Some(params) = item.get_mut("parameters").and_then(Value::as_array_mut) {
                for p in params {
                    let ty = p.get("type").cloned().unwrap_or(json!("string"));
                    if let Some(o) = p.as_object_mut() {
                        o.remove("type");
                        o.insert("schema".into(), json!({ "type": ty }));
                    }
                }
            }
        }
    }
    json!({
        "openapi": "3.0.0",
        "info": { "title": "wrenn-gateway", "version": VERSION },
        "paths": paths,
        "components": {},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resource_list_names_capsules_exec_with_create_and_get() {
        let l = build_api_resource_list();
        assert_eq!(l["groupVersion"], "subresources.wrenn.dev/v1alpha1");
        assert_eq!(l["resources"][0]["name"], "capsules/exec");
        assert_eq!(l["resources"][0]["verbs"], json!(["create", "get"]));
        assert_eq!(l["resources"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn group_documents_agree() {
        let g = build_api_group();
        assert_eq!(
            g["preferredVersion"]["groupVersion"],
            "subresources.wrenn.dev/v1alpha1"
        );
        let list = build_api_group_list();
        assert_eq!(list["groups"][0]["name"], "subresources.wrenn.dev");
        assert!(list["groups"][0].get("kind").is_none());
    }

    #[test]
    fn openapi_v3_parameters_have_schemas() {
        let d = build_openapi_v3_group();
        let p = &d["paths"]["/apis/subresources.wrenn.dev/v1alpha1/namespaces/{namespace}/capsules/{name}/exec"];
        assert_eq!(p["parameters"][2]["schema"]["type"], "string");
        assert!(p["parameters"][2].get("type").is_none());
    }
}
