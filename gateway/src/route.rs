//! What a request asks for, from its path (pure), and the API `Status`
//! bodies every refusal carries, so kubectl prints them as it prints the
//! API server's own.

use serde_json::{Value, json};

use crate::{GROUP, RESOURCE, VERSION};

/// A capsule subresource the group names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Subresource {
    /// Run a command (WebSocket, `v5.channel.k8s.io`). Served.
    Exec,
    /// Attach to a detached process's output (WebSocket). Served.
    Attach,
    /// Files and directories (plain HTTP). Served.
    Files,
    /// Detached processes (plain HTTP). Served.
    Processes,
    /// Serial console log (plain HTTP, text). Served.
    Console,
    /// TCP connections to declared ports (WebSocket, the port-forward
    /// channel protocol). Served.
    Portforward,
    /// HTTP to a declared port (any method, WebSocket upgrades passed
    /// through). Served.
    Proxy,
}

impl Subresource {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "exec" => Self::Exec,
            "attach" => Self::Attach,
            "files" => Self::Files,
            "processes" => Self::Processes,
            "console" => Self::Console,
            "portforward" => Self::Portforward,
            "proxy" => Self::Proxy,
            _ => return None,
        })
    }

    /// The name in paths, RBAC rules and SubjectAccessReviews.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exec => "exec",
            Self::Attach => "attach",
            Self::Files => "files",
            Self::Processes => "processes",
            Self::Console => "console",
            Self::Portforward => "portforward",
            Self::Proxy => "proxy",
        }
    }

    /// Whether this gateway serves it (the others answer 501).
    pub fn served(self) -> bool {
        Self::SERVED.contains(&self)
    }

    /// Subresources served, as discovery lists them.
    pub const SERVED: [Subresource; 7] = [
        Self::Exec,
        Self::Files,
        Self::Console,
        Self::Attach,
        Self::Processes,
        Self::Portforward,
        Self::Proxy,
    ];
}

/// What a path asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `/healthz`, `/livez`: the process answers.
    Live,
    /// `/readyz`: the front-proxy CA is loaded.
    Ready,
    /// `/apis`.
    ApiGroupList,
    /// `/apis/subresources.wrenn.dev`.
    ApiGroup,
    /// `/apis/subresources.wrenn.dev/v1alpha1`.
    ApiResourceList,
    /// `/openapi/v2`.
    OpenApiV2,
    /// `/openapi/v3`.
    OpenApiV3Index,
    /// `/openapi/v3/apis/subresources.wrenn.dev/v1alpha1`.
    OpenApiV3Group,
    /// A capsule's subresource.
    Capsule {
        /// Namespace.
        namespace: String,
        /// Capsule name.
        name: String,
        /// Subresource.
        sub: Subresource,
    },
    /// A `subresources.wrenn.dev` path naming something that does not exist.
    Unknown,
}

/// The route of `path` (without the query).
pub fn plan_route(path: &str) -> Route {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["healthz"] | ["livez"] => Route::Live,
        ["readyz"] => Route::Ready,
        ["apis"] => Route::ApiGroupList,
        ["apis", g] if *g == GROUP => Route::ApiGroup,
        ["apis", g, v] if *g == GROUP && *v == VERSION => Route::ApiResourceList,
        ["openapi", "v2"] => Route::OpenApiV2,
        ["openapi", "v3"] => Route::OpenApiV3Index,
        ["openapi", "v3", "apis", g, v] if *g == GROUP && *v == VERSION => Route::OpenApiV3Group,
        // `proxy/PORT/PATH…`: the rest of the path is the guest's.
        ["apis", g, v, "namespaces", ns, r, name, "proxy", ..]
            if *g == GROUP
                && *v == VERSION
                && *r == RESOURCE
                && valid_name(ns)
                && valid_name(name) =>
        {
            Route::Capsule {
                namespace: (*ns).to_string(),
                name: (*name).to_string(),
                sub: Subresource::Proxy,
            }
        }
        ["apis", g, v, "namespaces", ns, r, name, sub]
            if *g == GROUP
                && *v == VERSION
                && *r == RESOURCE
                && valid_name(ns)
                && valid_name(name) =>
        {
            match Subresource::parse(sub) {
                Some(sub) => Route::Capsule {
                    namespace: (*ns).to_string(),
                    name: (*name).to_string(),
                    sub,
                },
                None => Route::Unknown,
            }
        }
        _ => Route::Unknown,
    }
}

/// A DNS-1123 subdomain, as namespaces and capsule names are.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

/// Why a request is refused, as an API `Status` reason with its HTTP code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// 400.
    BadRequest,
    /// 401.
    Unauthorized,
    /// 403.
    Forbidden,
    /// 404.
    NotFound,
    /// 405.
    MethodNotAllowed,
    /// 409.
    Conflict,
    /// 411.
    LengthRequired,
    /// 413.
    RequestEntityTooLarge,
    /// 422 (metav1 `Invalid`).
    Invalid,
    /// 500.
    InternalError,
    /// 502 (not a metav1 reason; kubectl prints the message): nothing
    /// answers on the capsule's port.
    BadGateway,
    /// 501 (`NotImplemented` is not a metav1 reason; kubectl prints the message).
    NotImplemented,
    /// 503.
    ServiceUnavailable,
    /// 504.
    Timeout,
}

impl Reason {
    /// HTTP status code.
    pub fn code(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::Conflict => 409,
            Self::LengthRequired => 411,
            Self::RequestEntityTooLarge => 413,
            Self::Invalid => 422,
            Self::InternalError => 500,
            Self::BadGateway => 502,
            Self::NotImplemented => 501,
            Self::ServiceUnavailable => 503,
            Self::Timeout => 504,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "BadRequest",
            Self::Unauthorized => "Unauthorized",
            Self::Forbidden => "Forbidden",
            Self::NotFound => "NotFound",
            Self::MethodNotAllowed => "MethodNotAllowed",
            Self::Conflict => "Conflict",
            Self::LengthRequired => "LengthRequired",
            Self::RequestEntityTooLarge => "RequestEntityTooLarge",
            Self::Invalid => "Invalid",
            Self::InternalError => "InternalError",
            Self::BadGateway => "BadGateway",
            Self::NotImplemented => "NotImplemented",
            Self::ServiceUnavailable => "ServiceUnavailable",
            Self::Timeout => "Timeout",
        }
    }
}

/// A refusal: reason and the message the user reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Reason and code.
    pub reason: Reason,
    /// Message.
    pub message: String,
    /// The capsule concerned, for `details`.
    pub capsule: Option<String>,
}

impl Refusal {
    /// A refusal without a capsule.
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            capsule: None,
        }
    }

    /// The same, naming the capsule in `details`.
    pub fn capsule(reason: Reason, name: &str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            capsule: Some(name.to_string()),
        }
    }

    /// The same refusal, naming capsule `name` in `details`.
    pub fn with_capsule(mut self, name: &str) -> Self {
        self.capsule = Some(name.to_string());
        self
    }

    /// The `Status` body.
    pub fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason.as_str(),
            "code": self.reason.code(),
        });
        if let Some(name) = &self.capsule {
            s["details"] = json!({ "name": name, "group": GROUP, "kind": RESOURCE });
        }
        s
    }
}

/// A refusal from the agent as the user reads it (pure).
pub fn plan_agent_refusal(capsule: &str, status: &tonic::Status) -> Refusal {
    use tonic::Code;
    let reason = match status.code() {
        Code::NotFound => Reason::NotFound,
        Code::FailedPrecondition | Code::AlreadyExists => Reason::Conflict,
        Code::PermissionDenied => Reason::Forbidden,
        // A checksum that does not match what arrived.
        Code::DataLoss => Reason::Invalid,
        Code::ResourceExhausted => Reason::RequestEntityTooLarge,
        Code::InvalidArgument | Code::OutOfRange => Reason::BadRequest,
        Code::Unavailable => Reason::ServiceUnavailable,
        Code::DeadlineExceeded => Reason::Timeout,
        _ => Reason::InternalError,
    };
    Refusal::capsule(
        reason,
        capsule,
        format!("capsule \"{capsule}\": {}", status.message()),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn capsule_paths_name_namespace_capsule_and_subresource() {
        assert_eq!(
            plan_route("/apis/subresources.wrenn.dev/v1alpha1/namespaces/a/capsules/web/exec"),
            Route::Capsule {
                namespace: "a".into(),
                name: "web".into(),
                sub: Subresource::Exec
            }
        );
        assert_eq!(
            plan_route("/apis/subresources.wrenn.dev/v1alpha1/namespaces/a/capsules/web/files"),
            Route::Capsule {
                namespace: "a".into(),
                name: "web".into(),
                sub: Subresource::Files
            }
        );
        assert!(Subresource::Files.served());
        assert!(Subresource::Processes.served());
        assert!(Subresource::Portforward.served());
        assert_eq!(
            plan_route(
                "/apis/subresources.wrenn.dev/v1alpha1/namespaces/a/capsules/web/proxy/8080/x/y"
            ),
            Route::Capsule {
                namespace: "a".into(),
                name: "web".into(),
                sub: Subresource::Proxy
            }
        );
    }

    #[test]
    fn discovery_and_health_paths() {
        assert_eq!(plan_route("/apis"), Route::ApiGroupList);
        assert_eq!(plan_route("/apis/subresources.wrenn.dev"), Route::ApiGroup);
        assert_eq!(
            plan_route("/apis/subresources.wrenn.dev/v1alpha1"),
            Route::ApiResourceList
        );
        assert_eq!(plan_route("/readyz"), Route::Ready);
        assert_eq!(plan_route("/openapi/v2"), Route::OpenApiV2);
    }

    #[test]
    fn anything_else_is_unknown() {
        for p in [
            "/apis/wrenn.dev/v1alpha1",
            "/apis/subresources.wrenn.dev/v1",
            "/apis/subresources.wrenn.dev/v1alpha1/namespaces/a/capsules/web/shell",
            "/apis/subresources.wrenn.dev/v1alpha1/namespaces/A/capsules/web/exec",
            "/apis/subresources.wrenn.dev/v1alpha1/namespaces/a/pods/web/exec",
            "/apis/subresources.wrenn.dev/v1alpha1/namespaces/a/capsules/../exec",
            "/",
        ] {
            assert_eq!(plan_route(p), Route::Unknown, "{p}");
        }
    }

    #[test]
    fn a_refusal_is_a_status_kubectl_prints() {
        let s = Refusal::capsule(Reason::NotFound, "web", "capsules \"web\" not found").to_status();
        assert_eq!(s["kind"], "Status");
        assert_eq!(s["code"], 404);
        assert_eq!(s["reason"], "NotFound");
        assert_eq!(s["details"]["name"], "web");
    }

    #[test]
    fn agent_refusals_map_to_http() {
        let r = plan_agent_refusal(
            "web",
            &tonic::Status::failed_precondition("capsule u is Paused; resume it first"),
        );
        assert_eq!(r.reason, Reason::Conflict);
        assert!(r.message.contains("web") && r.message.contains("Paused"));
        assert_eq!(
            plan_agent_refusal("web", &tonic::Status::not_found("x")).reason,
            Reason::NotFound
        );
    }
}
