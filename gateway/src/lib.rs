//! `wrenn-gateway`: the aggregated API server of `subresources.wrenn.dev`.
//! The kube-apiserver routes `/apis/subresources.wrenn.dev/v1alpha1/...`
//! here through an `APIService`; the gateway trusts only that front proxy
//! (`frontproxy`), authorizes every call with a SubjectAccessReview
//! (`authz`), finds the capsule's node agent (`locate`) and bridges the
//! Kubernetes WebSocket channel protocol to the agent's gRPC (`exec`),
//! and to its detached-process output (`attach`), and plain HTTP requests
//! to its file, process and console RPCs (`files`, `processes`,
//! `console`); `channel` is the channel protocol itself, `filestream` the
//! file bodies streamed to and from the agent, `transfer` the long
//! transfers' WebSocket form, which the API server's request timeout does
//! not cut, `outstream` the client's side of a one-way one; `query` reads query strings. `portforward` carries TCP
//! connections to declared ports over the port-forward channel protocol
//! and `proxy` HTTP requests to them, both through `tunnel` (the agent's
//! `Connect`); `upgrade` runs every channel-protocol WebSocket the same
//! way. `route` parses paths and builds API `Status` replies (pure);
//! `discovery` holds the discovery and OpenAPI documents (pure); `reply`
//! the response bodies; `server` is the HTTPS listener tying them
//! together.
#![forbid(unsafe_code)]

pub mod args;
pub mod attach;
pub mod authz;
pub mod channel;
pub mod console;
pub mod discovery;
pub mod exec;
pub mod files;
pub mod filestream;
pub mod frontproxy;
pub mod locate;
pub mod outstream;
pub mod portforward;
pub mod processes;
pub mod proxy;
pub mod query;
pub mod reply;
pub mod route;
pub mod server;
pub mod transfer;
pub mod tunnel;
pub mod upgrade;

/// API group served.
pub const GROUP: &str = "subresources.wrenn.dev";
/// API version served.
pub const VERSION: &str = "v1alpha1";
/// The resource whose subresources are served.
pub const RESOURCE: &str = "capsules";
