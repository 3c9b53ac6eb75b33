//! Discovery and OpenAPI documents (pure). The API server marks the
//! `APIService` available only when `/apis/GROUP/VERSION` answers, and
//! kubectl reads these to map `capsules/exec`, `capsules/attach`,
//! `capsules/files`, `capsules/processes`, `capsules/console`,
//! `capsules/portforward` and `capsules/proxy`. Only subresources this
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

/// The RBAC verbs of a subresource: exec as `pods/exec` (create and get),
/// files by HTTP method (GET get, PUT update, POST create), processes by
/// HTTP method (GET get, POST create), console as `pods/log` (get), attach
/// as `pods/attach` (create and get), portforward as `pods/portforward`
/// (create and get), proxy as `pods/proxy` (by HTTP method).
pub fn verbs(s: Subresource) -> &'static [&'static str] {
    match s {
        Subresource::Files => &["create", "get", "update"],
        Subresource::Console => &["get"],
        Subresource::Proxy => &["create", "delete", "get", "patch", "update"],
        _ => &["create", "get"],
    }
}

/// `/apis/GROUP/VERSION`: one entry per served subresource, with the verbs
/// kubectl and RBAC use for it.
pub fn build_api_resource_list() -> Value {
    let resources: Vec<Value> = Subresource::SERVED
        .iter()
        .map(|s| {
            json!({
                "name": format!("{RESOURCE}/{}", s.as_str()),
                "singularName": "",
                "namespaced": true,
                "kind": "Status",
                "verbs": verbs(*s),
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

/// Pairs of names: (method, description) or (query parameter, type).
type Pairs = Vec<(&'static str, &'static str)>;

/// The methods of a subresource's path, what each does, and its query
/// parameters (name, type).
fn operations(s: Subresource) -> (Pairs, Pairs) {
    match s {
        Subresource::Files => (
            vec![
                (
                    "get",
                    "read a file, or with op=stat|list|tar its metadata, a page of a directory, a directory as tar",
                ),
                (
                    "put",
                    "write a file from the body, or with op=tar extract a tar body into a directory",
                ),
                ("post", "op=mkdir|remove|rename|chmod|chown"),
            ],
            vec![
                ("path", "string"),
                ("op", "string"),
                ("mode", "string"),
                ("sha256", "string"),
                ("limit", "integer"),
                ("continue", "string"),
                ("recursive", "boolean"),
                ("to", "string"),
                ("uid", "integer"),
                ("gid", "integer"),
            ],
        ),
        Subresource::Console => (
            vec![("get", "read the serial console log (text/plain)")],
            vec![("tailLines", "integer"), ("follow", "boolean")],
        ),
        Subresource::Processes => (
            vec![
                (
                    "get",
                    "list detached processes, or with op=logs read one's kept output (text/plain)",
                ),
                (
                    "post",
                    "start a detached process, or with op=signal signal one",
                ),
            ],
            vec![
                ("op", "string"),
                ("tag", "string"),
                ("pid", "integer"),
                ("command", "string"),
                ("env", "string"),
                ("workingDir", "string"),
                ("user", "string"),
                ("signal", "string"),
                ("follow", "boolean"),
            ],
        ),
        Subresource::Portforward => (
            vec![
                (
                    "get",
                    "connect to portforward of a Capsule's declared ports (WebSocket, v4.channel.k8s.io or v5.channel.k8s.io)",
                ),
                (
                    "post",
                    "connect to portforward of a Capsule's declared ports (WebSocket, v4.channel.k8s.io or v5.channel.k8s.io)",
                ),
            ],
            vec![("ports", "string")],
        ),
        Subresource::Proxy => (
            ["get", "put", "post", "patch", "delete", "head", "options"]
                .into_iter()
                .map(|m| (m, "proxy HTTP to a declared port of a Capsule (WebSocket upgrades passed through)"))
                .collect(),
            vec![],
        ),
        Subresource::Attach => (
            vec![
                (
                    "get",
                    "connect to attach of a Capsule's detached process (WebSocket, v5.channel.k8s.io)",
                ),
                (
                    "post",
                    "connect to attach of a Capsule's detached process (WebSocket, v5.channel.k8s.io)",
                ),
            ],
            vec![
                ("tag", "string"),
                ("pid", "integer"),
                ("stdout", "boolean"),
                ("stderr", "boolean"),
            ],
        ),
        _ => (
            vec![
                (
                    "get",
                    "connect to exec of a Capsule (WebSocket, v5.channel.k8s.io)",
                ),
                (
                    "post",
                    "connect to exec of a Capsule (WebSocket, v5.channel.k8s.io)",
                ),
            ],
            vec![
                ("command", "string"),
                ("stdin", "boolean"),
                ("stdout", "boolean"),
                ("stderr", "boolean"),
                ("tty", "boolean"),
            ],
        ),
    }
}

fn paths() -> Value {
    let mut paths = serde_json::Map::new();
    for s in Subresource::SERVED {
        let suffix = if s == Subresource::Proxy {
            "/{port}/{path}"
        } else {
            ""
        };
        let path = format!(
            "/apis/{GROUP}/{VERSION}/namespaces/{{namespace}}/{RESOURCE}/{{name}}/{}{suffix}",
            s.as_str()
        );
        let (ops, query) = operations(s);
        let mut item = serde_json::Map::new();
        for (method, description) in ops {
            let mut verb = method.to_string();
            verb[..1].make_ascii_uppercase();
            let (code, what) = if matches!(
                s,
                Subresource::Exec | Subresource::Attach | Subresource::Portforward
            ) {
                ("101", "Switching Protocols")
            } else {
                ("200", "OK")
            };
            item.insert(
                method.to_string(),
                json!({
                    "description": description,
                    "operationId": format!("connect{verb}NamespacedCapsule{}", s.as_str()),
                    "responses": { code: { "description": what } },
                    "x-kubernetes-action": "connect",
                    "x-kubernetes-group-version-kind": { "group": GROUP, "version": VERSION, "kind": "Capsule" },
                }),
            );
        }
        let mut params = vec![
            json!({ "name": "namespace", "in": "path", "required": true, "type": "string" }),
            json!({ "name": "name", "in": "path", "required": true, "type": "string" }),
        ];
        if s == Subresource::Proxy {
            params
                .push(json!({ "name": "port", "in": "path", "required": true, "type": "string" }));
            params
                .push(json!({ "name": "path", "in": "path", "required": true, "type": "string" }));
        }
        params.extend(
            query
                .into_iter()
                .map(|(n, t)| json!({ "name": n, "in": "query", "type": t })),
        );
        item.insert("parameters".into(), Value::Array(params));
        paths.insert(path, Value::Object(item));
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
        assert_eq!(l["resources"][1]["name"], "capsules/files");
        assert_eq!(
            l["resources"][1]["verbs"],
            json!(["create", "get", "update"])
        );
        assert_eq!(l["resources"][2]["name"], "capsules/console");
        assert_eq!(l["resources"][2]["verbs"], json!(["get"]));
        assert_eq!(l["resources"][3]["name"], "capsules/attach");
        assert_eq!(l["resources"][3]["verbs"], json!(["create", "get"]));
        assert_eq!(l["resources"][4]["name"], "capsules/processes");
        assert_eq!(l["resources"][4]["verbs"], json!(["create", "get"]));
        assert_eq!(l["resources"][5]["name"], "capsules/portforward");
        assert_eq!(l["resources"][5]["verbs"], json!(["create", "get"]));
        assert_eq!(l["resources"][6]["name"], "capsules/proxy");
        assert_eq!(
            l["resources"][6]["verbs"],
            json!(["create", "delete", "get", "patch", "update"])
        );
        assert_eq!(l["resources"].as_array().map(Vec::len), Some(7));
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
